"""EfficientViT-MSRA (timm ``efficientvit_m*``) cascaded group attention: maps only (METHODS.md C, q/k made inside).

``CascadedGroupAttention`` runs one attention per head, in turn: head h projects its channel split plus head h-1's
output (``qkvs[h]``, a 1x1 conv + BatchNorm), so heads 1.. see an input that depends on the previous head's
attention; its q then passes a depthwise k x k conv + BatchNorm (``dws[h]``) that mixes neighbouring tokens, and each
head adds its own attention-bias table (per window offset) before its softmax. Its ``LocalWindowAttention`` (the
block qkhooks reads the grid from) pads the (H, W) map at the bottom and right to whole windows and calls the
attention on the windows stacked along the batch axis, row-major; a map the size of one window is called as is.

No head's logits are x_i^T W_q^T W_k x_j of the tokens the module is handed (head 0 included: its q is conv-mixed),
so the site is maps only (:mod:`qkhooks.models.inside`): the full maps (B, nW, H, N, N), windows in the model's
order, are the module's own per-head softmaxes, taken in its forward and stacked in head order (bias tables
included); modes of the layer are refused, naming it.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, recast
from qkhooks.models.inside import InsideSite
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite

CASCADED = ("its heads run in cascade: head h projects its channel split plus head h-1's output (qkvs[h], a 1x1 conv "
            "+ BatchNorm), and its q then passes a depthwise conv + BatchNorm (dws[h]) that mixes neighbouring tokens, "
            "so no head's logits are x_i^T W_q^T W_k x_j of the tokens the module is handed")


@dataclasses.dataclass(eq=False)
class CascadedWindowSite(InsideSite, WindowSite):
    """An EfficientViT-MSRA attention: one softmax per head, in head order, on the windows its block cuts."""


def _geometry(attn: nn.Module):
    """A (2·H·key_dim, C) stand-in for W_q, W_k, so the adapter reads heads, d_k and d (the site replaces it)."""
    heads, key_dim = int(attn.num_heads), int(attn.key_dim)
    dim = int(attn.qkvs[0].conv.in_channels) * heads

    def shape_only() -> tuple[torch.Tensor, None]:
        return torch.zeros(2 * heads * key_dim, dim), None

    return shape_only, ()


def _cascaded_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    block_ref = weakref.ref(site.block)  # LocalWindowAttention: pads and cuts the windows

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        return int(x.shape[2]), int(x.shape[3])  # (B, C, H, W)

    def geometry() -> tuple[tuple[int, int], tuple[int, int]]:
        size = int(block_ref().attn.resolution)
        return (size, size), (0, 0)

    return recast(site, CascadedWindowSite, family="timm-efficientvit-msra", grid=None, patch_size=None,
                  num_prefix_tokens=0, qk_modules=(), token_layout="channels_first", geometry=geometry,
                  call_grid=call_grid, relative_bias=None, pad_first=False, inside=CASCADED,
                  softmaxes_per_call=int(attn.num_heads))


timm_adapter.EXTRA_FORMS["EfficientVitMsraCascadedGroupAttention"] = timm_adapter.ExtraForm(
    "timm.models.efficientvit_msra.CascadedGroupAttention", _geometry, _cascaded_site)
MODELLED_FORMS.update({"timm.models.efficientvit_msra.CascadedGroupAttention",
                       "timm.models.efficientvit_msra.LocalWindowAttention"})
