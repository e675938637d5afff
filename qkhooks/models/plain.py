"""Plain softmax(scale · q·k) attention of timm families outside the ViT file, taught to the timm adapter.

Each of these modules computes exactly softmax(scale · q·k) over the tokens of one image, with q and k rows of
one fused projection (q, then k, then v) and nothing else in the logits; what differs is only how the module
receives its tokens:

- MetaFormer (CAFormer) ``Attention``: (B, N, C) tokens, ``qkv`` Linear; the grid is the stage's downsampled map.
- FastViT ``Attention``: an NCHW map, flattened row by row inside the module, ``qkv`` Linear.
- Visformer ``Attention``: an NCHW map and a 1x1-conv ``qkv`` (a Linear applied at every pixel).

Sites read NCHW maps as tokens row by row (``token_layout="channels_first"``), as the modules do; the grid of a
stage is the map's own (no native grid is claimed).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, QKRows, conv_output_size, leading_rows
from qkhooks.models.unsupported import MODELLED_FORMS


def _fused_rows(attn: nn.Module) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """q then k rows of the fused ``qkv`` (a Linear, or a 1x1 conv read as one); projections from the Linear's output
    where it is a Linear applied to the tokens, from the tokens x for a conv (its output is an NCHW map)."""
    qkv = attn.qkv
    return leading_rows(qkv, 2 * int(attn.num_heads) * int(attn.head_dim)), (qkv,) if isinstance(qkv, nn.Linear) else ()


def _site(layout: str, family: str) -> Callable[[AttentionSite, nn.Module], AttentionSite]:
    def finish(site: AttentionSite, attn: nn.Module) -> AttentionSite:
        return dataclasses.replace(site, token_layout=layout, family=family, grid=None, patch_size=None)

    return finish


def _metaformer_grid(model: nn.Module, site: AttentionSite) -> AttentionSite:
    """zoo12: a MetaFormer stage flattens the map its ``downsample`` makes before its blocks, so the grid is read off
    the map the stage is handed, through that conv (kernel, stride, padding), never off the token count."""
    if site.family != "timm-metaformer":
        return site
    stage = model.get_submodule(site.stage.rpartition(".")[0])
    down = stage.downsample
    conv = getattr(down, "conv", None)
    if not isinstance(down, nn.Identity) and not isinstance(conv, nn.Conv2d):
        return site  # a downsampling qkhooks cannot follow: no grid is claimed

    def read(args: tuple, kwargs: dict) -> tuple[int, int]:
        h, w = (int(v) for v in (args[0] if args else kwargs["x"]).shape[-2:])
        return (h, w) if conv is None else (conv_output_size(h, conv, 0), conv_output_size(w, conv, 1))

    return dataclasses.replace(site, grid_source=(stage, read))


timm_adapter.SITE_FINISHERS.append(_metaformer_grid)

_FORMS = {
    "MetaFormerAttention": ("timm.models.metaformer", "Attention", "tokens", "timm-metaformer"),
    "FastVitAttention": ("timm.models.fastvit", "Attention", "channels_first", "timm-fastvit"),
    "VisformerAttention": ("timm.models.visformer", "Attention", "channels_first", "timm-visformer"),
}
for _kind, (_module, _name, _layout, _family) in _FORMS.items():
    timm_adapter.EXTRA_FORMS[_kind] = timm_adapter.ExtraForm(f"{_module}.{_name}", _fused_rows, _site(_layout, _family))
    MODELLED_FORMS.add(f"{_module}.{_name}")
