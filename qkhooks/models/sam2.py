"""SAM2's Hiera-det image encoder: timm ``sam2_hiera_*`` (``hieradet_sam2.MultiScaleAttention``) and HF
``Sam2VisionModel`` / ``Sam2HieraDetModel`` (``Sam2MultiScaleAttention``), METHODS.md C ("windows", pooled queries).

Each block normalises its (B, H, W, d) grid, and a windowed block pads it (bottom, right, zeros) to whole windows and
calls the attention on the windows stacked along the batch axis, (B·nW, w_h, w_w, d), row-major over the padded grid,
no shift, no mask, no bias; a global block calls it on the whole grid. The first block of a stage transition
(``q_stride``) max-pools q after W_q over the module's own q pool (2x2, stride 2, on each window's or the grid's own
(h, w)), so the logits are::

    logit_h(i, j) = scale · q̂_i·k_j,   q̂_i = max over the 2x2 group i of (W_q x + b_q)   (elementwise)

- **Maps** (``full``): rebuilt from the model's own pooled q and k, the model's shape: per window (B, nW, H, N_q, N_k)
  in the model's window order (N_q = N_k / 4 in a pooling block), or (B, H, N_q, N_k) for a global block.
- **Modes**: those of the content form W_q^T W_k over the tokens entering W_q and W_k (the unpooled, padded window
  tokens), on the image grid (B, H, K, H·W). For an unpooled block they rebuild its logits exactly. For a pooling block
  they rebuild x_i^T W_q^T W_k x_j of the unpooled tokens, not the pooled logits: a max over tokens is not linear
  (:meth:`content_only` says so). What is exact there: the pooled query's own projection through the q path,
  with the bias-free spectrum and :class:`qkhooks.projector.QKPathProjector` on q̂ (:func:`qkhooks.models.pooled.pooled_qk`),
  Σ_n σ_n (q̂ − b_q)·a_n (k − b_k)·c_n = (q̂ − b_q)·(k − b_k) when W_q, W_k have full rank d_k (tested).
- ``rows`` / ``pooled`` attention: as every windowed or grid layer for an unpooled block; refused for a pooling block
  (a query is a group of four tokens, not one).
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, as_pair, leading_rows, recast
from qkhooks.models.relpos import nhwc_grid
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite

__all__ = ["QueryPoolSite", "WindowedQueryPoolSite"]

# (B, C, h, w) -> (B, C, h', w'): the module's own max pool of q (None: the block does not pool)
QueryPool = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(eq=False)
class QueryPoolSite(AttentionSite):
    """A Hiera-det attention over a (B, h, w, d) grid whose q the module may max-pool after W_q.

    Attributes:
        pool_q: the module's own pooling of q as a (B, H·d_k, h, w) map (None: this block does not pool).
    """

    pool_q: QueryPool | None = None
    _call_hw: tuple[int, int] | None = dataclasses.field(default=None, repr=False)  # kept: the layer's geometry

    @property
    def pools_queries(self) -> bool:
        """The README table's form "pooled queries" (this block pools q)."""
        return self.pool_q is not None

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        if not block:
            raw = args[0] if args else kwargs.get(self.input_name)
            if isinstance(raw, torch.Tensor) and raw.dim() == 4:  # (B or B·nW, h, w, d)
                self._call_hw = (int(raw.shape[1]), int(raw.shape[2]))
        return super().hidden_states(args, kwargs, block)

    def model_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, N, d_k) -> as the module multiplies them: q max-pooled on the call's (h, w) with the module's own
        pool, the channels laid out as the module lays them (head, then d_k)."""
        q, k = super().model_qk(q, k)
        if self.pool_q is None:
            return q, k
        if self._call_hw is None:
            raise QKHooksError(f"{self.path}: its q is pooled on the call's grid; rebuild maps of this layer inside a "
                               "recording of a model call.")
        b, heads, n, dk = q.shape
        h, w = self._call_hw
        if h * w != n:
            raise QKHooksError(f"{self.path}: {n} query tokens do not form the call's {h}x{w} grid.")
        grid = q.transpose(1, 2).reshape(b, h, w, heads * dk).permute(0, 3, 1, 2)
        pooled = self.pool_q(grid)  # (B, H·d_k, h', w')
        return pooled.flatten(2).transpose(1, 2).unflatten(-1, (heads, dk)).transpose(1, 2), k

    def check_attention_kind(self, kind: str) -> None:
        if self.pool_q is not None and kind != "full":
            raise QKHooksError(f"layer {self.layer} ({self.path}): its queries are max-pooled after W_q (a query is a "
                               f"2x2 group of tokens, not one token), so '{kind}' attention (rows of chosen tokens) has no "
                               "exact meaning there; record attention='full' (the model's own maps, pooled queries x "
                               "keys).")

    def modes_rebuild_logits(self) -> bool:
        return self.pool_q is None and super().modes_rebuild_logits()

    def keys_shape_logits(self) -> bool:
        return self.pool_q is not None or super().keys_shape_logits()

    def content_only(self) -> str:
        why = "the queries are max-pooled after W_q (the form is that of the unpooled tokens)" if self.pool_q else ""
        return "; ".join(r for r in (super().content_only(), why) if r)

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        """The (h, w) grid of the call (a global block's whole grid), as the model hands it; never a guess."""
        if self._call_hw is None or self._call_hw[0] * self._call_hw[1] != num_tokens:
            raise QKHooksError(f"{self.path}: the grid of {num_tokens} tokens is read from the attention call's "
                               f"(B, h, w, d) input, and no call of that size is being recorded (last: {self._call_hw}).")
        return self._call_hw


@dataclasses.dataclass(eq=False)
class WindowedQueryPoolSite(WindowSite, QueryPoolSite):
    """A windowed Hiera-det block's attention: windows of the zero-padded grid (no shift, no mask, no bias), q pooled
    per window where the block pools; the maps' window axis and the modes' image grid as every windowed layer's."""


def _site(site: AttentionSite, block: nn.Module, pool_q: QueryPool | None, family: str, window: int | tuple[int, int],
          call_grid: Callable[[tuple, dict], tuple[int, int]]) -> AttentionSite:
    """The site of one Hiera-det attention: windowed (``window`` non-zero) or global, pooling q or not."""
    fields = dict(family=family, token_layout="grid", qk_modules=(), bias_input=None, rope_input=None, rope_apply=None,
                  grid=None, patch_size=None, num_prefix_tokens=0, pool_q=pool_q)
    if not any(as_pair(window)):
        return recast(site, QueryPoolSite, **fields)
    block_ref = weakref.ref(block)  # a finished recording keeps no model alive
    return recast(site, WindowedQueryPoolSite, **fields, geometry=lambda: (as_pair(block_ref().window_size), (0, 0)),
                  call_grid=call_grid, relative_bias=None)


def _stage(index: int, stage_ends: list[int]) -> int:
    """The Hiera stage of block ``index`` (a stage's first block, the one that pools, belongs to it)."""
    return sum(1 for end in stage_ends if end < index)


# ---------------------------------------------------------------------------------------------------- timm


def _timm_qk(attn: nn.Module):
    """q then k rows of the fused ``qkv`` (``dim_out`` each; the module reshapes it as (3, heads, d_k))."""
    return leading_rows(attn.qkv, 2 * int(attn.dim_out)), ()


def _timm_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    pool = attn.q_pool
    if pool is not None and not isinstance(pool, nn.MaxPool2d):
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): its q pool is a "
                           f"{type(pool).__name__}, not the max pool qkhooks models.")
    pool_ref = weakref.ref(pool) if pool is not None else None
    pool_q = None if pool_ref is None else (lambda t: pool_ref()(t))
    return _site(site, site.block, pool_q, "timm-sam2", site.block.window_size, nhwc_grid("x"))


def _timm_stages(model: nn.Module, site: AttentionSite) -> AttentionSite:
    """Hiera-det blocks sit in one ``blocks`` list; each site's stage is read off the model's ``stage_ends``."""
    if site.family != "timm-sam2" or not hasattr(model, "stage_ends"):
        return site
    index = int(site.block_path.rpartition(".")[2])
    return dataclasses.replace(site, stage=f"{site.block_path.rpartition('.')[0]} (stage {_stage(index, model.stage_ends)})")


timm_adapter.EXTRA_FORMS["HieraDetMultiScaleAttention"] = timm_adapter.ExtraForm(
    "timm.models.hieradet_sam2.MultiScaleAttention", _timm_qk, _timm_site)
timm_adapter.SITE_FINISHERS.append(_timm_stages)
MODELLED_FORMS.update({"timm.models.hieradet_sam2.MultiScaleAttention", "timm.models.hieradet_sam2.MultiScaleBlock"})


# ------------------------------------------------------------------------------------------- transformers
def _hf_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """HF ``Sam2MultiScaleAttention``: q pooled with its module's own ``do_pool`` where it has a ``query_stride``."""
    stride = module.query_stride
    do_pool = sys.modules[type(module).__module__].do_pool  # (B, h, w, C) -> (B, h', w', C), max pool

    def pool(t: torch.Tensor) -> torch.Tensor:
        return do_pool(t.permute(0, 2, 3, 1), stride).permute(0, 3, 1, 2)

    pool_q = pool if stride else None
    container = site.block_path.rpartition(".")[0]
    owner = modules.get(container.rpartition(".")[0] if "." in container else "")
    if getattr(owner, "stage_ends", None) is not None:
        site = dataclasses.replace(site, stage=f"{container} (stage "
                                   f"{_stage(int(site.block_path.rpartition('.')[2]), list(owner.stage_ends))})")
    return _site(site, site.block, pool_q, site.family, int(site.block.window_size), nhwc_grid("hidden_states"))


hf.EXTRA_FORMS["Sam2MultiScaleAttention"] = (frozenset(), _hf_site)
MODELLED_FORMS.update({"Sam2MultiScaleAttention", "Sam2MultiScaleBlock"})
