"""Cosine attention, exactly: Swin-v2 (timm ``swinv2_*`` and ``swinv2_cr_*``, HF ``Swinv2Model``), METHODS.md C.

Swin-v2 replaces q·k / √d_k by a cosine with a learned temperature per head, plus a log-spaced continuous
relative-position bias (log-CPB) that a small MLP computes from the window offsets:

    logit_h(i, j) = τ_h · (q_i·k_j) / (|q_i| |k_j|) + 16·sigmoid(cpb_mlp(Δ_ij))_h + shift mask(i, j),
    τ_h = exp(min(logit_scale_h, log 100)),    q = W_q x + b_q,  k = W_k x + b_k.

The maps are rebuilt from the model's own q and k, normalised and scaled with the model's own ``logit_scale``
(:class:`CosineNorm`, applied where a q/k-norm is), plus the model's own bias (its ``cpb_mlp`` run on its own
coordinate table) and the shift mask the block hands the attention; the windows are those of
:mod:`qkhooks.models.windows`. The site's ``scale`` is 1: τ_h is per head and enters with the normalisation.

Modes: the content form W_q^T W_k (pre-normalisation; ``augmented=True`` folds b_q, b_k in through x̃ = [x; 1]).
Exact normalised form: the cosine is the RMS q/k-norm of :mod:`qkhooks.models.qknorm` with γ_q = τ_h/d_k, γ_k = 1,
β = 0 and ε ≈ 0 (then s_q = |q|/√d_k and γ_q·γ_k/(s_q s_k) = τ_h/(|q||k|)), so ``normalised_form(site)`` gives modes
of τ_h/d_k · W̃_q^T W̃_k (the singular vectors of W̃_q^T W̃_k, values scaled by τ_h/d_k) whose projections, divided
by the per-token scales, rebuild the cosine logits exactly.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, as_pair, leading_rows, recast
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite

__all__ = ["CosineNorm"]

_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)  # Swin-v2 clamps the log temperature at log 100 (timm and transformers)
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default


@dataclasses.dataclass(eq=False)
class CosineNorm:
    """The model's cosine normalisation: q, k (B, H, N, d_k) -> τ_h · q/|q|, k/|k| (``F.normalize``, as the model).

    Attributes:
        logit_scale: ``() -> (H,)`` the module's own ``logit_scale`` parameter, read live.
    """

    logit_scale: Callable[[], torch.Tensor]

    def temperature(self) -> torch.Tensor:
        """τ_h (H,) = exp(min(logit_scale_h, log 100)), as the model computes it."""
        return torch.clamp(self.logit_scale().detach().reshape(-1), max=_MAX_LOGIT_SCALE).exp()

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau = self.temperature().to(q.device, q.dtype)[:, None, None]
        return torch.nn.functional.normalize(q, dim=-1) * tau, torch.nn.functional.normalize(k, dim=-1)

    def normalised_form(self, site: AttentionSite):
        """The exact cosine form as a :class:`qkhooks.models.qknorm.NormalisedForm` (module docstring)."""
        from qkhooks.models.qknorm import NormalisedForm
        from qkhooks.spectrum import augmented_weights, factored_svd

        heads, dk = site.num_heads, site.head_dim
        w_q, w_k = (w.double().cpu() for w in augmented_weights(site.weights()))  # (H, d_k, d+1)
        gamma_q = (self.temperature().double().cpu() / dk)[:, None, None]
        u, s, v = factored_svd(gamma_q * w_q, w_k)
        zeros = torch.zeros(heads, w_q.shape[-1], dtype=torch.float64)
        # F.normalize divides by max(|q|, 1e-12): as an ε of the RMS scale only a (near) zero vector notices it, and
        # a zero q or k (a padding token's, with no bias) then has zero content, as in the model
        eps = _NORMALIZE_EPS**2 / dk
        return NormalisedForm(U=u, S=s, V=v, query_linear=zeros, key_linear=zeros.clone(),
                              constant=torch.zeros(heads, dtype=torch.float64), kind="rms", group=dk, eps_q=eps,
                              eps_k=eps, _w_q=w_q, _w_k=w_k)


def _log_cpb(mlp: nn.Module, coords: torch.Tensor, index: torch.Tensor, heads: int, window: tuple[int, int]) -> torch.Tensor:
    """(1, H, Nw, Nw): 16·sigmoid of the module's own ``cpb_mlp`` on its own log-spaced offset table."""
    area = window[0] * window[1]
    table = mlp(coords).view(-1, heads)
    return (16 * torch.sigmoid(table[index.view(-1)].view(area, area, heads).permute(2, 0, 1)))[None]


def _cosine_site(site: AttentionSite, attn: nn.Module, family: str, bias_input: str, **fields: Any) -> AttentionSite:
    """The windowed site of a cosine attention: scale 1 (τ_h enters with the normalisation), the shift mask as
    ``bias_input``, the window ``fields`` of :class:`qkhooks.models.windows.WindowSite`."""
    attn_ref = weakref.ref(attn)  # a finished recording keeps no model alive
    return recast(site, WindowSite, family=family, scale=1.0, grid=None, patch_size=None, bias_input=bias_input,
                  qk_norm=CosineNorm(lambda: attn_ref().logit_scale), **fields)


def _timm_block_geometry(block: nn.Module, path: str, attn: nn.Module) -> dict[str, Any]:
    """The window fields of a timm Swin-v2 block (``(B, H, W, C)`` calls, rolled then padded, mask as ``mask``)."""
    if getattr(block, "dynamic_mask", False):
        raise QKHooksError(f"unsupported attention in {path!r} ({type(attn).__name__}): its block builds the shift "
                           "mask per call (dynamic_mask), a window layout qkhooks does not model.")
    block_ref = weakref.ref(block)

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1]), int(x.shape[2])

    return dict(geometry=lambda: (as_pair(block_ref().window_size), as_pair(block_ref().shift_size)), call_grid=call_grid,
                pad_first=False)


# ---------------------------------------------------------------------------------------------------- timm


def _timm_swinv2_qkv(attn: nn.Module):
    """q then k rows of ``qkv`` with the module's own ``q_bias`` and ``k_bias`` (added outside the Linear, so its
    output is not q: modes are projected from the tokens)."""
    rows = 2 * int(attn.qkv.out_features) // 3
    if getattr(attn, "q_bias", None) is None:
        return leading_rows(attn.qkv, rows), (attn.qkv,)
    return leading_rows(attn.qkv, rows, biases=attn), ()


def _timm_swinv2_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    heads = int(attn.num_heads)
    attn_ref = weakref.ref(attn)

    def relative_bias() -> torch.Tensor:
        a = attn_ref()
        return _log_cpb(a.cpb_mlp, a.relative_coords_table, a.relative_position_index, heads, as_pair(a.window_size))

    return _cosine_site(site, attn, "timm-swinv2", bias_input="mask", relative_bias=relative_bias,
                        **_timm_block_geometry(site.block, site.path, attn))


def _timm_swinv2_cr_qkv(attn: nn.Module):
    return leading_rows(attn.qkv, 2 * int(attn.qkv.out_features) // 3), (attn.qkv,)


def _timm_swinv2_cr_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """``swinv2_cr_*``: its ``meta_mlp`` on its own log offsets is the bias, without the 16·sigmoid."""
    attn_ref = weakref.ref(attn)
    return _cosine_site(site, attn, "timm-swinv2-cr", bias_input="mask",
                        relative_bias=lambda: attn_ref()._relative_positional_encodings(),
                        **_timm_block_geometry(site.block, site.path, attn))


timm_adapter.EXTRA_FORMS["Swinv2WindowAttention"] = timm_adapter.ExtraForm(
    "timm.models.swin_transformer_v2.WindowAttention", _timm_swinv2_qkv, _timm_swinv2_site)
timm_adapter.EXTRA_FORMS["Swinv2CrWindowAttention"] = timm_adapter.ExtraForm(
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention", _timm_swinv2_cr_qkv, _timm_swinv2_cr_site)
MODELLED_FORMS.update({"timm.models.swin_transformer_v2.WindowAttention",
                       "timm.models.swin_transformer_v2.SwinTransformerV2Block",
                       "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention",
                       "timm.models.swin_transformer_v2_cr.SwinTransformerV2CrBlock"})


# ------------------------------------------------------------------------------------------- transformers
def _hf_swinv2_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """transformers ``Swinv2SelfAttention`` (query/key/value, ``continuous_position_bias_mlp``, ``logit_scale``).

    It adds the block's shift mask twice (``attention_scores + mask`` after a view that already added it), so the
    rebuilt maps add it twice too (``mask_repeats=2``)."""
    block_ref, module_ref = weakref.ref(site.block), weakref.ref(module)
    heads = site.num_heads

    def relative_bias() -> torch.Tensor:
        m = module_ref()
        return _log_cpb(m.continuous_position_bias_mlp, m.relative_coords_table, m.relative_position_index, heads,
                        as_pair(m.window_size))

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
        return int(dims[0]), int(dims[1])

    return _cosine_site(site, module, "hf-swinv2", bias_input="attention_mask", relative_bias=relative_bias,
                        geometry=lambda: (as_pair(block_ref().window_size), as_pair(block_ref().shift_size)),
                        call_grid=call_grid, pad_first=True, mask_repeats=2)


hf.EXTRA_FORMS["Swinv2SelfAttention"] = (frozenset({"continuous_position_bias_mlp", "logit_scale"}), _hf_swinv2_site)
MODELLED_FORMS.update({"Swinv2SelfAttention", "Swinv2Attention", "Swinv2Layer"})
# zoo-hfsmall: transformers' Swin2SR copies Swin-v2's self-attention and layer verbatim (same children, same forward)
hf.EXTRA_FORMS["Swin2SRSelfAttention"] = hf.EXTRA_FORMS["Swinv2SelfAttention"]
MODELLED_FORMS.update({"Swin2SRSelfAttention", "Swin2SRAttention", "Swin2SRLayer"})
