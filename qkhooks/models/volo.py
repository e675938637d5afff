"""VOLO (timm ``volo_*``): its plain and class attention exactly; its outlook attention left out by name.

VOLO runs three kinds of token mixing. Outlooker blocks (``OutlookAttention``) weight each local window by a linear
layer of its centre token (no softmax of q·k: refused in unsupported.py, left out by a partial recording,
``skip_unmodelled=True``). Transformer blocks (``Attention``) compute softmax(scale · q·k) over the tokens of an
NHWC grid (B, h, w, C), q and k rows of one fused ``qkv``. Class blocks (``ClassAttention``) let the class token
alone query [class; patches], q from its own Linear and k the first half of the fused ``kv``: maps (B, H, 1, N), the
model's shape, as CaiT's class attention (:mod:`qkhooks.models.class_attention`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, QKRows, leading_rows, stacked_rows
from qkhooks.models.unsupported import MODELLED_FORMS


def _grid_rows(attn: nn.Module) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """q then k rows of the fused ``qkv``; projections from the tokens (the Linear's output is an NHWC grid)."""
    return leading_rows(attn.qkv, 2 * (attn.qkv.out_features // 3)), ()


def _class_rows(attn: nn.Module) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """The q Linear's rows, then the k half of the fused ``kv``; projections from the tokens (q sees the class token only)."""
    return stacked_rows(attn.q, attn.kv, k_rows=attn.q.out_features), ()


def _grid_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """Patch tokens only, on the NHWC grid of each call (no native grid: the grid is the call's own)."""
    return dataclasses.replace(site, token_layout="grid", family="timm-volo", num_prefix_tokens=0, grid=None,
                               patch_size=None)


def _class_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    return dataclasses.replace(site, family="timm-volo", num_prefix_tokens=1, class_attention=True, grid=None,
                               patch_size=None)


timm_adapter.EXTRA_FORMS["VoloAttention"] = timm_adapter.ExtraForm("timm.models.volo.Attention", _grid_rows,
                                                                   _grid_site)
timm_adapter.EXTRA_FORMS["VoloClassAttention"] = timm_adapter.ExtraForm("timm.models.volo.ClassAttention",
                                                                        _class_rows, _class_site)
MODELLED_FORMS.update({"timm.models.volo.Attention", "timm.models.volo.ClassAttention"})
