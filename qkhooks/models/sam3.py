"""SAM3's ViT (HF ``Sam3VisionModel`` / ``Sam3ViTModel``): 2-D axial RoPE on interleaved pairs, windows folded into the
batch axis, exactly (METHODS.md C: RoPE, windows).

Each ``Sam3ViTLayer`` hands its attention NHWC tokens (B, h, w, d) and the rotary tables ``(cos, sin)`` **by
position** (``attention(hidden_states, position_embeddings)``); the module rotates q and k with transformers'
``apply_rotary_pos_emb_2d``, whose ``rotate_pairwise`` turns the pairs (2i, 2i + 1): the first d_k / 4 pairs by the
token's column, the last d_k / 4 by its row, every token rotated (no prefix tokens). Windowed layers first zero-pad the
layer-normed (B, H, W, d) grid to whole windows (bottom, right; no shift, no mask: the zero tokens are keys like any
other) and fold the windows into the batch axis, (B·nW, w, w, d), each window rotated by the same window-local table;
global layers see the whole grid, rotated by a table of the configured image size.

Maps are rebuilt from the model's own q and k turned by that very function on the call's own tables (windowed sites:
:class:`qkhooks.models.windows.WindowSite`, ``full`` maps (B, nW, H, Nw, Nw) in the model's window order, modes on the
image grid); modes are those of the content form W_q^T W_k, the zero-offset term (Σ σ_n (x·u_n)(x·v_n) =
(q − b_q)·(k − b_k) before the rotation), as for the other RoPE models. RoPE bands (``--rope-bands``) read each layer's
tables as the model hands them: a global layer's on the native grid, a windowed layer's on one window.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import Any

import torch
from torch import nn

from qkhooks.models import hf
from qkhooks.models.base import AttentionSite, as_pair, recast
from qkhooks.models.relpos import nhwc_grid
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite

__all__ = ["Sam3Site", "Sam3WindowSite"]

_TABLES = "position_embeddings"


class _TablesByPosition:
    """SAM3's layer calls its attention as ``attention(hidden_states, (cos, sin), **kwargs)``: the second positional
    argument is read as the rotary tables; any other tensor handed in is refused by the base rule."""

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) >= 2 and _TABLES not in kwargs:
            args, kwargs = args[:1] + args[2:], {**kwargs, _TABLES: args[1]}
        super().refuse_unmodelled_inputs(args, kwargs)  # type: ignore[misc]


@dataclasses.dataclass(eq=False)
class Sam3Site(_TablesByPosition, AttentionSite):
    """A SAM3 global layer: the whole (h, w) grid, rotated by the call's tables."""


@dataclasses.dataclass(eq=False)
class Sam3WindowSite(_TablesByPosition, WindowSite):
    """A SAM3 windowed layer: zero-padded windows of the block's grid along the batch axis, each rotated by the
    window-local tables of the call."""

    @property
    def rope_grid(self) -> tuple[int, int]:
        """The grid the call's rotary tables are laid on: one window (RoPE bands measure their steps on it)."""
        return self.geometry()[0]  # type: ignore[misc]


def _rotation(module: nn.Module):
    """The module's own ``apply_rotary_pos_emb_2d`` on (B, H, N, d_k) q and k with the call's (cos, sin) (N, d_k)."""
    apply = sys.modules[type(module).__module__].apply_rotary_pos_emb_2d

    def rotate(q: torch.Tensor, k: torch.Tensor, tables: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = tables
        return apply(q, k, cos=cos, sin=sin)

    return rotate


def _sam3_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    config = site.block.config
    fields = dict(family="hf-sam3-vit", token_layout="grid", num_prefix_tokens=0, qk_modules=(), bias_input=None,
                  rope_input=_TABLES, rope_apply=_rotation(module), rope_layout="interleaved",
                  scale=float(module.scaling), patch_size=as_pair(config.patch_size))
    window = int(site.block.window_size)
    if window <= 0:
        return recast(site, Sam3Site, **fields, grid=hf.config_grid(config))
    block = weakref.ref(site.block)  # a finished recording keeps no model alive
    return recast(site, Sam3WindowSite, **fields, grid=None, geometry=lambda: ((int(block().window_size),) * 2, (0, 0)),
                  call_grid=nhwc_grid("hidden_states"), relative_bias=None, pad_first=True)


hf.EXTRA_FORMS["Sam3ViTRoPEAttention"] = (frozenset(), _sam3_site)
MODELLED_FORMS.add("transformers.models.sam3.modeling_sam3.Sam3ViTRoPEAttention")
