"""Relative positions (METHODS.md C): additive tables in timm, and the query-dependent decomposed term of SAM/ViTDet.

**Additive tables** (timm ``beit_*`` ``Attention`` with ``relative_position_bias_table`` and/or the model's shared
``RelativePositionBias``; timm ``vit_relpos_*`` ``RelPosAttention`` with ``RelPosBias`` or ``RelPosMlp``, per layer or
shared): the term the module adds to the scaled logits is position-only. It is taken from the call with the model's
own modules (``_get_rel_pos_bias()``, ``rel_pos.get_bias()``, the shared tensor handed in), never rebuilt by hand, and
is the layer's ``rec.bias(l)`` / ``run.bias(l)`` (H, N, N) like HF BEiT's.

**Decomposed relative position** (timm ``samvit_*`` ``Attention(use_rel_pos=True)``, HF ``SamVisionModel`` /
``SamHQVisionModel`` attention with ``rel_pos_h`` / ``rel_pos_w``, HF ``VitDetModel`` with
``use_relative_position_embeddings``; MViTv2's form)::

    logit_h(i, j) = scale · q_i·k_j + q_i·R_h[h_i − h_j] + q_i·R_w[w_i − w_j]

The second and third terms are **not a bias**: they are bilinear between the query (the image's own q, normalised
where the model normalises it) and a relative-position table, so they change with the image. qkhooks calls it the
*relative term*. Maps are rebuilt with it exactly (the model's own ``get_decomposed_rel_pos`` /
``add_decomposed_relative_positions`` on the model's tables, from the call's q and grid); the modes stay those of
W_q^T W_k, exact for the content term q·k (analyses of that one form say they are content-only); the term itself is
``rec.relative_term(l)`` (B, H, N, N), per window for windowed blocks; run files store it (``run.relative_term(l)``).

**SAM / ViTDet windows**: windowed blocks pad the (H, W) grid to whole windows (bottom, right, zeros) and call the
attention on the windows stacked along the batch axis, no shift; global blocks in between see the whole grid. The
windowed sites reuse :class:`qkhooks.models.windows.WindowSite`: ``full`` maps (B, nW, H, Nw, Nw) in the model's
window order, modes on the image grid.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks._devices import to_device
from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, leading_rows, recast
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite

__all__ = ["RelativeSite", "WindowedRelativeSite"]

# (q (B·H, N, d_k) as the model multiplies it, (h, w) of the call's grid) -> (B·H, N, N), the model's own computation
RelativeTerm = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


@dataclasses.dataclass(eq=False)
class RelativeSite(AttentionSite):
    """An attention site whose module takes a (B, h, w, d) grid and may add the decomposed relative term.

    Attributes:
        relative: the model's own ``(q, (h, w)) -> term`` (None: the layer has no relative term, plain q·k).
    """

    relative: RelativeTerm | None = None
    _call_tokens: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _call_hw: tuple[int, int] | None = dataclasses.field(default=None, repr=False)
    _term: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        if not block:
            raw = args[0] if args else kwargs.get(self.input_name)
            if isinstance(raw, torch.Tensor) and raw.dim() == 4:
                self._call_hw = (int(raw.shape[1]), int(raw.shape[2]))
        x = super().hidden_states(args, kwargs, block)
        if not block:
            self._call_tokens, self._term = x, None
        return x

    def relative_term(self) -> torch.Tensor | None:
        """The call's relative term (B·nW or B, H, N, N): q_i·R_h[h_i − h_j] + q_i·R_w[w_i − w_j], from the model's own
        q (the tokens entering W_q, the model's q bias and q norm) and tables; None for a layer without one."""
        if self.relative is None:
            return None
        if self._term is None:
            if self._call_tokens is None or self._call_hw is None:
                raise QKHooksError(f"{self.path}: its relative-position term is computed from the attention call's "
                                   "queries; rebuild maps of this layer inside a recording of a model call.")
            x = self._call_tokens
            w, b = self.qk_linear()
            rows = self.num_heads * self.head_dim
            with torch.no_grad():
                q = torch.nn.functional.linear(x, w[:rows].to(x.dtype), None if b is None else b[:rows].to(x.dtype))
                q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, N, d_k)
                if self.qk_norm is not None:
                    q = self.qk_norm(q, q)[0]
                term = self.relative(q.flatten(0, 1), self._call_hw)
            self._term = term.reshape(q.shape[0], self.num_heads, q.shape[2], q.shape[2]).detach()
        return self._term

    def add_logit_bias(self, logits: torch.Tensor, query_tokens: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().add_logit_bias(logits, query_tokens)
        term = self.relative_term()
        if term is None:
            return logits
        term = term.to(logits.device, logits.dtype)
        if query_tokens is not None:
            index = to_device(query_tokens.long(), term.device)[:, None, :, None]
            term = torch.gather(term, 2, index.expand(-1, term.shape[1], -1, term.shape[-1]))
        return logits + term

    def modes_rebuild_logits(self) -> bool:
        return self.relative is None and super().modes_rebuild_logits()

    def content_only(self) -> str:
        base = super().content_only()
        reasons = [base] if base else []
        if self.relative is not None:
            reasons.append("a query-dependent relative-position term q·R_h + q·R_w is added (the form is the content "
                           "term q·k; the relative term is its own, rec.relative_term(l))")
        return "; ".join(reasons)

    def forget_call(self) -> None:
        super().forget_call()
        self._call_tokens, self._call_hw, self._term = None, None, None


@dataclasses.dataclass(eq=False)
class WindowedRelativeSite(WindowSite, RelativeSite):
    """A SAM / ViTDet windowed block's attention: windows of the padded grid, no shift, no mask, the relative term
    computed per window (its grid is the window)."""

    def logit_bias(self) -> torch.Tensor | None:
        return None  # no table, no shift mask: the relative term is added by add_logit_bias


def _grid_site(site: AttentionSite, relative: RelativeTerm | None, family: str, block: nn.Module,
               window: int, block_grid: Callable[[tuple, dict], tuple[int, int]]) -> AttentionSite:
    """The site of a grid-taking attention: windowed (``window`` > 0) or global, with or without a relative term."""
    fields = dict(family=family, token_layout="grid", qk_modules=(), bias_input=None, rope_input=None, rope_apply=None,
                  relative=relative)
    if window <= 0:
        return recast(site, RelativeSite, **fields)
    block_ref = weakref.ref(block)  # a finished recording keeps no model alive
    return recast(site, WindowedRelativeSite, **fields, grid=None, patch_size=None,
                  geometry=lambda: ((int(block_ref().window_size),) * 2, (0, 0)), call_grid=block_grid,
                  relative_bias=None, pad_first=True)


def nhwc_grid(name: str) -> Callable[[tuple, dict], tuple[int, int]]:
    def grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs[name]
        return int(x.shape[1]), int(x.shape[2])

    return grid


def _nchw_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    x = args[0] if args else kwargs["hidden_states"]
    return int(x.shape[2]), int(x.shape[3])


# ---------------------------------------------------------------------------------------------------- timm
def _timm_fused_qk(attn: nn.Module):
    """q then k rows of the fused ``qkv`` (its own bias, or BEiT's ``q_bias`` / ``k_bias`` added by ``F.linear``)."""
    qkv = attn.qkv
    # the qkv module's output is q, k only where it adds the bias itself (BEiT adds q_bias / k_bias around it)
    return leading_rows(qkv, 2 * (qkv.out_features // 3), biases=attn), (qkv,) if getattr(attn, "q_bias", None) is None else ()


def _refuse_unknown_arguments(path: str, module: nn.Module, known: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name; an argument the adapter does not model is refused, named."""
    call = dict(zip(known, args), **kwargs)
    unknown = sorted(set(call) - set(known)) + [f"argument {i}" for i in range(len(known), len(args))]
    if unknown:
        raise QKHooksError(f"unsupported attention in {path!r} ({type(module).__name__}): the model passes {unknown}, "
                           "which the relative-position adapter does not model.")
    return call


def _batched(term: torch.Tensor) -> torch.Tensor:
    """A (H, N, N) table (the shared modules return one) as the (1, H, N, N) term it broadcasts to."""
    return term[None] if term.dim() == 3 else term


def _timm_beit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """timm BEiT: the layer's own table (``_get_rel_pos_bias()``) plus the shared table the block hands it."""
    path, ref = site.path, weakref.ref(attn)

    def bias(args: tuple, kwargs: dict) -> torch.Tensor | None:
        call = _refuse_unknown_arguments(path, ref(), ("x", "shared_rel_pos_bias"), args, kwargs)
        m = ref()
        total = m._get_rel_pos_bias() if m.relative_position_bias_table is not None else None
        shared = call.get("shared_rel_pos_bias")
        if shared is not None:
            total = shared if total is None else total + shared
        return None if total is None else _batched(total.detach())

    return dataclasses.replace(site, family="timm-beit", call_bias=bias, rope_input=None, rope_apply=None)


def _timm_relpos_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """timm ``RelPosAttention``: its ``rel_pos`` module's ``get_bias()`` when it has one (a shared table handed in is
    then not used, in the fused and the eager path alike), else the shared table handed in."""
    from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp

    rel_pos = attn.rel_pos
    if rel_pos is not None and type(rel_pos).forward not in (RelPosBias.forward, RelPosMlp.forward):
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): its relative-position module "
                           f"is a {type(rel_pos).__name__}, not the RelPosBias / RelPosMlp qkhooks models.")
    path, ref = site.path, weakref.ref(attn)

    def bias(args: tuple, kwargs: dict) -> torch.Tensor | None:
        call = _refuse_unknown_arguments(path, ref(), ("x", "shared_rel_pos"), args, kwargs)
        m = ref()
        term = m.rel_pos.get_bias() if m.rel_pos is not None else call.get("shared_rel_pos")
        return None if term is None else _batched(term.detach())

    return dataclasses.replace(site, family="timm-relpos", call_bias=bias, rope_input=None, rope_apply=None)


def _timm_sam_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """timm ``samvit_*``: (B, h, w, d) grids; ``use_rel_pos``: the module's ``get_decomposed_rel_pos_bias``."""
    if getattr(attn, "rope", None) is not None:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): it rotates q and k with "
                           "rotary tables it builds itself (rope), which qkhooks does not model for this family.")
    relative = None
    if attn.use_rel_pos:
        helper = sys.modules[type(attn).__module__].get_decomposed_rel_pos_bias
        ref = weakref.ref(attn)

        def relative(q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
            return helper(q, ref().rel_pos_h, ref().rel_pos_w, hw, hw)

    return _grid_site(site, relative, "timm-sam", site.block, int(site.block.window_size), nhwc_grid("x"))


timm_adapter.EXTRA_FORMS["BeitAttention"] = timm_adapter.ExtraForm(
    "timm.models.beit.Attention", _timm_fused_qk, _timm_beit_site)
timm_adapter.EXTRA_FORMS["RelPosAttention"] = timm_adapter.ExtraForm(
    "timm.models.vision_transformer_relpos.RelPosAttention", _timm_fused_qk, _timm_relpos_site)
timm_adapter.EXTRA_FORMS["SamAttention"] = timm_adapter.ExtraForm(
    "timm.models.vision_transformer_sam.Attention", _timm_fused_qk, _timm_sam_site)
# the shared tables live outside the attention (BEiT's ``rel_pos_bias``, vit_relpos' ``shared_rel_pos``): the sites take
# them from the call; RelPosBias / RelPosMlp inside other attention (MaxViT) stay refused by that attention's adapter
MODELLED_FORMS.update({"timm.models.beit.Attention", "timm.models.beit.RelativePositionBias",
                       "timm.models.vision_transformer_relpos.RelPosAttention",
                       "timm.models.vision_transformer_relpos.VisionTransformerRelPos",  # the model itself, by name only
                       "timm.layers.pos_embed_rel.RelPosBias", "timm.layers.pos_embed_rel.RelPosMlp"})

# pooled queries and keys (MViTv2, Hiera, SAM2's Hiera-det): models/pooled.py


# ------------------------------------------------------------------------------------------- transformers
def _hf_sam_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """HF SAM / SAM-HQ vision attention: (B, h, w, d) grids; ``use_rel_pos``: its own ``get_decomposed_rel_pos``."""
    relative = None
    if module.use_rel_pos:
        ref = weakref.ref(module)

        def relative(q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
            m = ref()
            return m.get_decomposed_rel_pos(q, m.rel_pos_h, m.rel_pos_w, hw, hw)

    return _grid_site(site, relative, site.family, site.block, int(site.block.window_size), nhwc_grid("hidden_states"))


def _hf_vitdet_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """HF VitDet: (B, h, w, d) grids; ``use_relative_position_embeddings``: the module's own
    ``add_decomposed_relative_positions`` added to zeros (the term alone, exactly)."""
    relative = None
    if module.use_relative_position_embeddings:
        add = sys.modules[type(module).__module__].add_decomposed_relative_positions
        ref = weakref.ref(module)

        def relative(q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
            n = hw[0] * hw[1]
            return add(q.new_zeros(q.shape[0], n, n), q, ref().rel_pos_h, ref().rel_pos_w, hw, hw)

    return _grid_site(site, relative, site.family, site.block, int(getattr(site.block, "window_size", 0)), _nchw_grid)


_SAM_TABLES = frozenset({"rel_pos_h", "rel_pos_w"})
for _cls in ("SamVisionAttention", "SamVisionSdpaAttention", "SamHQVisionAttention", "SamHQVisionSdpaAttention"):
    hf.EXTRA_FORMS[_cls] = (_SAM_TABLES, _hf_sam_site)
hf.EXTRA_FORMS["VitDetAttention"] = (_SAM_TABLES, _hf_vitdet_site)
MODELLED_FORMS.update({"SamVisionAttention", "SamVisionSdpaAttention", "SamHQVisionAttention", "SamHQVisionSdpaAttention",
                       "VitDetAttention"})
