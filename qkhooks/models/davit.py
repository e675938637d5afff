"""DaViT (timm ``davit_*``): spatial window attention exact, channel attention left out by name (METHODS.md C, windows).

Each DaViT stage alternates a ``SpatialBlock`` and a ``ChannelBlock``. The spatial block's ``WindowAttention`` is plain
softmax(scale·q·k) within non-overlapping windows: no shift, no mask, no bias; the block pads its (B, H, W, C) grid at
the bottom and right to whole windows *after* its LayerNorm (padding tokens enter W_q/W_k as zeros) and cuts the
windows row-major, as timm's Swin does, so the windowed site of :mod:`qkhooks.models.windows` records it: full maps
per window in the model's order, query and key maps on the image grid.

The channel blocks (``ChannelAttention``, ``ChannelAttentionV2``) take a softmax over channels, not tokens: there is no
token-to-token map and no W_q^T W_k form. A DaViT model is therefore refused by default, and recorded on its spatial
blocks only with ``skip_unmodelled=True``, every channel block named as left out (``Recording.left_out``, the run
file's ``left_out_unmodelled``). Layer indices number the spatial blocks in forward order.
"""

from __future__ import annotations

import weakref

from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, as_pair, recast
from qkhooks.models.unsupported import MODELLED_FORMS, UNMODELLED_FORMS
from qkhooks.models.windows import WindowSite, timm_qkv_rows


def _davit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """``SpatialBlock`` (B, C, H, W) in; its windows of ``block.window_size``, no shift, padding after the norm."""
    block_ref = weakref.ref(site.block)  # a finished recording keeps no model alive

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        return int(x.shape[2]), int(x.shape[3])

    stage = site.path.split(".blocks.")[0]  # "stages.N": the spatial blocks of a stage share its grid
    return recast(
        site, WindowSite, family="timm-davit", grid=None, patch_size=None, num_prefix_tokens=0, stage=stage, geometry=lambda: (as_pair(block_ref().window_size), (0, 0)), call_grid=call_grid, pad_first=False)


timm_adapter.EXTRA_FORMS["DavitWindowAttention"] = timm_adapter.ExtraForm(
    "timm.models.davit.WindowAttention", timm_qkv_rows, _davit_site)
MODELLED_FORMS.update({"timm.models.davit.WindowAttention", "timm.models.davit.SpatialBlock"})

_CHANNEL_SOFTMAX = ("so there is no token-to-token attention map and no W_q^T W_k form to record. DaViT's spatial window "
                    "attention (WindowAttention) is modelled exactly")
UNMODELLED_FORMS.update({
    "timm.models.davit.ChannelAttention": "its softmax runs over channels, not tokens (per head softmax(scale·kᵀv), a "
    "d_k x d_k map that then mixes q), " + _CHANNEL_SOFTMAX,
    "timm.models.davit.ChannelAttentionV2": "its softmax runs over channels, not tokens (per group softmax(qᵀk), a "
    "d_k x d_k map applied to v), " + _CHANNEL_SOFTMAX,
})
