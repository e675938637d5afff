"""Attention whose queries are pooled after W_q: Hiera's mask-unit attention (timm ``hiera_*`` ``MaskUnitAttention``,
HF ``HieraModel`` ``HieraMaskUnitAttention``), METHODS.md C ("different key tokens", pooled queries).

Hiera's module takes its tokens in the model's *unrolled* order (``Unroll``: the tokens of each mask unit strided
over the sequence, not row-major), splits them into mask units inside the module where ``use_mask_unit_attn``
(token n is position n // nW of unit n % nW), and at a stage transition max-pools q over ``q_stride`` groups of that
order (a 2x2 spatial max of the pooled grid). The logits are scale · q̂_i·k_j with q̂ = max over the group of
W_q x + b_q, so:

- **Maps** are rebuilt from the model's own pooled q and k, computed in the site with the module's own recipe
  (:meth:`PooledQuerySite.model_qk`), in the model's shape: (B, H, nW, N_q, N_k) per mask unit (HF: always, nW = 1
  for global attention), timm's global attention (B, H, N / q_stride, N).
- **Modes** stay those of the content form W_q^T W_k over the tokens entering the module (unpooled): they rebuild
  x_i^T W_q^T W_k x_j (the zoo test checks it), not the pooled logits, since a max over tokens is not linear
  (:meth:`AttentionSite.content_only` says so, and analyses of the one bilinear form report the content-only variant).
- **The exact statement on q and k themselves**: with the bias-free spectrum and the q/k path
  (:class:`qkhooks.projector.QKPathProjector`: query map (q̂ - b_q)·a_n, key map (k - b_k)·c_n),
  Σ_n σ_n (q̂ - b_q)·a_n (k - b_k)·c_n = (q̂ - b_q)·(k - b_k) exactly when W_q and W_k have full rank d_k
  (``tests/test_pooled_forms.py``). :func:`pooled_qk` gives q̂ and k in the model's shape for that.
- Token maps on a grid are refused: the unrolled order is not a row-major grid (:meth:`PooledQuerySite.grid_for`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, leading_rows, recast, register_adapter
from qkhooks.models.unsupported import MODELLED_FORMS, UNMODELLED_FORMS, refuse_uncovered

__all__ = ["PooledQuerySite", "PooledMViTSite", "pooled_qk"]


@dataclasses.dataclass(eq=False)
class PooledQuerySite(AttentionSite):
    """A site whose module max-pools q after W_q, within mask units (Hiera).

    Attributes:
        query_stride: q is max-pooled over this many groups of the unrolled order (1: not pooled).
        mask_unit_size: tokens per mask unit after pooling (the module's ``window_size``); 0: global attention.
        unit_axis: the maps keep a mask-unit axis (B, H, nW, N_q, N_k) even for global attention (HF's shape).
    """

    query_stride: int = 1
    mask_unit_size: int = 0
    unit_axis: bool = False
    pools_queries: ClassVar[bool] = True  # the README table's form: "pooled queries"

    def units(self, tokens: int) -> int:
        """Mask units in a call with ``tokens`` tokens (1: global attention), as the module counts them."""
        return tokens // (self.query_stride * self.mask_unit_size) if self.mask_unit_size else 1

    def model_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, N, d_k) -> as the module multiplies them: split into mask units (token n is position n // nW of
        unit n % nW), q max-pooled over ``query_stride`` groups; 4-D for timm's global attention, else 5-D."""
        q, k = super().model_qk(q, k)
        b, h, n, dk = q.shape
        units = self.units(n)
        q, k = (t.reshape(b, h, n // units, units, dk).transpose(2, 3) for t in (q, k))  # (B, H, nW, T, d_k)
        if self.query_stride > 1:
            q = q.reshape(b, h, units, self.query_stride, -1, dk).amax(dim=3)
        if units == 1 and not self.unit_axis:
            return q[:, :, 0], k[:, :, 0]
        return q, k

    def check_attention_kind(self, kind: str) -> None:
        if kind != "full":
            raise QKHooksError(f"layer {self.layer} ({self.path}): its queries are max-pooled inside the module and its "
                               f"tokens are in Hiera's unrolled mask-unit order, so '{kind}' attention (rows of chosen "
                               "tokens, pooled over a grid) has no exact meaning there; record attention='full' (the "
                               "model's own (B, H, [units,] N_q, N_k) maps).")

    def modes_rebuild_logits(self) -> bool:
        return False  # they rebuild the unpooled content term; the pooled logits are a max over tokens

    def keys_shape_logits(self) -> bool:
        return True  # a row of logits needs the pooled q, not one token's x

    def content_only(self) -> str:
        why = "the queries are max-pooled after W_q (the form is that of the unpooled tokens)"
        return "; ".join(r for r in (super().content_only(), why) if r)

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        raise QKHooksError(f"{self.path}: Hiera hands its attention the tokens in its unrolled mask-unit order, not "
                           "row by row, so no grid position is read off a token index here.")


def pooled_qk(site: PooledQuerySite, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled q and the k of the call whose tokens entering the module are ``x``, in the model's shape
    ((B, H, [nW,] N_q, d_k), (B, H, [nW,] N_k, d_k)), biases included: scale · q̂·k are the model's logits."""
    return site.model_qk(*site.qk(x))


def _fields(module: nn.Module) -> dict[str, Any]:
    stride = int(getattr(module, "q_stride", getattr(module, "query_stride", 1)))
    units = int(module.window_size) if bool(module.use_mask_unit_attn) else 0
    return dict(query_stride=stride, mask_unit_size=units)


def _as_pooled(site: AttentionSite, unit_axis: bool, **changes: Any) -> PooledQuerySite:
    return recast(site, PooledQuerySite, **changes, **_fields(site.module), unit_axis=unit_axis)


# ---------------------------------------------------------------------------------------------------- HF Hiera
def _hf_hiera(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    # ``output_attentions`` is a flag, not a term; the tokens are unrolled: no grid, no patch size
    return _as_pooled(site, True, grid=None, patch_size=None, bias_input=None, qk_modules=(), num_prefix_tokens=0)


hf.EXTRA_FORMS["HieraMaskUnitAttention"] = (frozenset({"qkv", "proj"}), _hf_hiera)
MODELLED_FORMS.add("HieraMaskUnitAttention")


# ---------------------------------------------------------------------------------------------------- timm Hiera
def _is_timm_hiera(model: nn.Module) -> bool:
    try:
        from timm.models.hiera import Hiera
    except ImportError:  # pragma: no cover - a timm without Hiera
        return False
    return isinstance(model, Hiera)


def _timm_hiera_sites(model: nn.Module) -> list[AttentionSite]:
    """A site per ``MaskUnitAttention`` (input: the block's ``norm1`` output, the unrolled tokens)."""
    from timm.models.hiera import MaskUnitAttention

    modules = dict(model.named_modules())
    sites: list[AttentionSite] = []
    for name, attn in modules.items():
        if type(attn).forward is not MaskUnitAttention.forward:
            continue
        block_path = name.rpartition(".")[0]
        index = int(block_path.rpartition(".")[2])
        stage = sum(1 for end in model.stage_ends if end < index)  # blocks sit in one list; stages end at stage_ends
        qk_linear = leading_rows(attn.qkv, 2 * int(attn.dim_out))
        site = AttentionSite(layer=len(sites), path=name, module=attn, block_path=block_path, block=modules[block_path],
                             num_heads=int(attn.heads), head_dim=int(attn.head_dim), dim=int(attn.dim),
                             scale=float(attn.scale), num_prefix_tokens=0, grid=None, family="timm-hiera",
                             input_name="x", block_input_name="x", qk_linear=qk_linear, qk_modules=(attn.qkv,),
                             stage=f"blocks (stage {stage})")
        sites.append(_as_pooled(site, False))
    refuse_uncovered(model, sites)
    return sites


MODELLED_FORMS.add("timm.models.hiera.MaskUnitAttention")
register_adapter("timm-hiera", _is_timm_hiera, _timm_hiera_sites,
                 families="timm Hiera (mask-unit attention, queries max-pooled at stage transitions)", first=False)


# ------------------------------------------------------------------------------ pooled forms not modelled yet
# (SAM2's Hiera-det, pooled queries inside windows: models/sam2.py)
UNMODELLED_FORMS.update({
    "timm.models.mvitv2.MultiScaleAttentionPoolFirst": "MViTv2 with pool_first=True pools the tokens entering W_q and "
    "W_k inside the module (its input split into per-head channel groups, pooled by pool_q / pool_k on the call's "
    "feat_size and normed by norm_q / norm_k, the class token kept apart), so queries and keys are W_q and W_k applied "
    "to pooled tokens the module makes itself, not to its input, plus the decomposed relative term q·R_h + q·R_w on the "
    "pooled grids where rel_pos_type='spatial'; qkhooks does not read those pooled tokens out of this module yet "
    "(MViTv2 with pool_first=False, timm's default, is modelled). Note: in timm 1.0.31 this module's own forward "
    "fails for every configuration (k is reshaped to (B, N, H, d) and multiplied untransposed: q @ k), so such a "
    "model does not run at all",
})


# ------------------------------------------------------------------------------------- MViTv2: conv + norm pooling
@dataclasses.dataclass(eq=False)
class PooledMViTSite(AttentionSite):
    """timm MViTv2 ``MultiScaleAttention``: q and k pooled after W_q / W_k by the module's own ``pool_q`` / ``pool_k``
    (strided convs per head, or max / avg pools) on the call's grid (``feat_size``), the class token kept apart, then
    ``norm_q`` / ``norm_k``; the decomposed relative term q̂·R_h + q̂·R_w on the pooled grids (``rel_pos_type ==
    'spatial'``) is the layer's :meth:`relative_term`, added by :meth:`add_logit_bias`, never folded into the modes.
    Maps (B, H, N_q, N_k) are the model's; the modes are those of W_q^T W_k over the unpooled tokens (content only)."""

    pools_queries: ClassVar[bool] = True
    _call_feat: tuple[int, int] | None = dataclasses.field(default=None, repr=False)
    _call_tokens: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _sizes: tuple[list[int], list[int]] | None = dataclasses.field(default=None, repr=False)
    _term: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        x = super().hidden_states(args, kwargs, block)
        if not block:
            feat = args[1] if len(args) > 1 else kwargs.get("feat_size")
            if not isinstance(feat, (list, tuple)) or len(feat) != 2:
                raise QKHooksError(f"{self.path}: the call does not give the token grid (feat_size) its pooling needs.")
            self._call_feat, self._call_tokens, self._term = (int(feat[0]), int(feat[1])), x, None
        return x

    def model_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's own steps on q and k (B, H, N, d_k), in its forward's order."""
        from timm.models.mvitv2 import reshape_post_pool, reshape_pre_pool

        if self._call_feat is None or self._call_feat[0] * self._call_feat[1] + self.num_prefix_tokens != q.shape[2]:
            raise QKHooksError(f"{self.path}: its q and k are pooled on the call's grid; rebuild maps of this layer "
                               "inside a recording of a model call.")
        m, feat = self.module, list(self._call_feat)
        sizes = []
        pooled = []
        for t, pool, norm in ((q, m.pool_q, m.norm_q), (k, m.pool_k, m.norm_k)):
            size = feat
            if pool is not None:
                t, tok = reshape_pre_pool(t, feat, m.has_cls_token)
                t, size = reshape_post_pool(pool(t), m.num_heads, tok)
            pooled.append(t if norm is None else norm(t))
            sizes.append(size)
        self._sizes = (sizes[0], sizes[1])
        return pooled[0], pooled[1]

    @property
    def relative(self) -> Any:
        """What recordings read to tell a layer with a query-dependent relative term (``rel_pos_type='spatial'``), as
        SAM's sites hold it: this site's :meth:`relative_term`; None without one."""
        return self.relative_term if self.module.rel_pos_type == "spatial" else None

    def relative_term(self) -> torch.Tensor | None:
        """q̂_i·R_h[h_i − h_j] + q̂_i·R_w[w_i − w_j] (B, H, N_q, N_k) of the call, with the pooled, normalised q and the
        module's own ``cal_rel_pos_type`` and tables (zero on the class token's row and column); None without it."""
        m = self.module
        if m.rel_pos_type != "spatial":
            return None
        if self._term is None:
            from timm.models.mvitv2 import cal_rel_pos_type

            if self._call_tokens is None:
                raise QKHooksError(f"{self.path}: its relative term is computed from the attention call's queries; "
                                   "rebuild maps of this layer inside a recording of a model call.")
            with torch.no_grad():
                q, k = self.model_qk(*self.qk(self._call_tokens))
                zeros = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
                self._term = cal_rel_pos_type(zeros, q, m.has_cls_token, self._sizes[0], self._sizes[1], m.rel_pos_h,
                                              m.rel_pos_w).detach()
        return self._term

    def add_logit_bias(self, logits: torch.Tensor, query_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if query_tokens is not None:
            raise QKHooksError(f"{self.path}: rows of pooled queries are not modelled; record attention='full'.")
        term = self.relative_term()
        return logits if term is None else logits + term.to(logits.device, logits.dtype)

    def check_attention_kind(self, kind: str) -> None:
        if kind != "full":
            raise QKHooksError(f"layer {self.layer} ({self.path}): its queries are pooled inside the module (a query "
                               f"is not one token), so '{kind}' attention has no exact meaning there; record "
                               "attention='full' (the model's own (B, H, N_q, N_k) maps).")

    def modes_rebuild_logits(self) -> bool:
        return False

    def keys_shape_logits(self) -> bool:
        return True

    def content_only(self) -> str:
        reasons = [super().content_only(), "q and k are pooled and normalised after W_q / W_k (the form is that of the "
                   "unpooled tokens)"]
        if self.module.rel_pos_type == "spatial":
            reasons.append("a query-dependent relative-position term q·R_h + q·R_w is added (its own term, "
                           "rec.relative_term(l))")
        return "; ".join(r for r in reasons if r)

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        """The (h, w) grid of the tokens entering W_q in the call (its ``feat_size``, after the class token), as the
        model hands it; never a square guess (MViTv2 takes any h x w)."""
        if self._call_feat is None or self._call_feat[0] * self._call_feat[1] != num_tokens - self.num_prefix_tokens:
            raise QKHooksError(f"{self.path}: the grid of {num_tokens} tokens is the feat_size the model hands this "
                               f"attention, and no call of that size is being recorded (last: {self._call_feat}).")
        return self._call_feat

    def forget_call(self) -> None:
        super().forget_call()  # the call's grid stays: the layer's geometry in the recording just made (no tensor)
        self._call_tokens, self._sizes, self._term = None, None, None


def _mvit_reader(attn: nn.Module):
    """q then k rows of the fused qkv. No q/k modules: the maps are rebuilt in the site's own call hook, where the
    relative term of the same call is kept with them (rec.relative_term(l), run files' relative/L{l})."""
    return leading_rows(attn.qkv, 2 * (attn.qkv.out_features // 3)), ()


def _mvit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    if attn.rel_pos_type not in ("spatial", "") and attn.rel_pos_type is not None:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): relative positions of type "
                           f"{attn.rel_pos_type!r}, which qkhooks does not model.")
    return recast(site, PooledMViTSite, family="timm-mvitv2", grid=None, patch_size=None,
                  num_prefix_tokens=int(bool(attn.has_cls_token)))


timm_adapter.EXTRA_FORMS["MViTv2MultiScaleAttention"] = timm_adapter.ExtraForm(
    "timm.models.mvitv2.MultiScaleAttention", _mvit_reader, _mvit_site)
MODELLED_FORMS.add("timm.models.mvitv2.MultiScaleAttention")
