"""Maps made of two softmaxes (METHODS.md C): differential attention and ConViT's GPSA, exactly, each term on its own.

**Differential attention** (timm ``DiffAttention``, ``vit_dwee_*``): each of the H output heads has two component
heads c = 0, 1 (the model reshapes q and k to 2H heads of d_k = d / 2H; component head 2h + c), and

    A_h = softmax(scale · q_{2h}·k_{2h}) − λ · softmax(scale · q_{2h+1}·k_{2h+1}),     λ = the module's _compute_lambda()

(a sub-RMSNorm then acts on A_h @ v, not on the map). So the site has **2H component heads**: modes, projections and
the spectrum are those of the 2H content forms W_q,j^T W_k,j (j = 2h + c), each exact for its own logits; full maps
and rows have the model's H heads (the combined map). ``rec.terms(l)`` gives ``softmax1``, ``softmax2`` (B, H, N, N)
and ``lambda`` (a scalar, shared by the heads). The analyses that read one map per mode head refuse the layer (its
maps are no softmax of one form). In run files (zoo13) the maps have H heads, ``modes/L{l}`` and ``spectrum/L{l}`` the
2H component heads, and the layer's geometry says so (``LayerGeometry.component_heads`` = 2H, ``heads`` = H); the
terms go to ``/terms/L{l}/`` (``softmax1``, ``softmax2`` per image, ``lambda`` once).

**ConViT GPSA** (timm ``GPSA``, the first ``local_up_to_layer`` blocks of ``convit_*``, patch tokens only):

    A_h = renormalised( (1 − σ(g_h)) · softmax(scale · q·k) + σ(g_h) · softmax(pos_proj(r)) )

with r the module's own relative indices (Δx, Δy, Δx² + Δy²) of the token pair. The content softmax has the W_q^T W_k
form (its modes rebuild its logits exactly); the position softmax is position-only and the gate σ(g_h) a per-head
number: ``rec.terms(l)`` gives ``content`` (B, H, N, N), ``position`` (H, N, N) and ``gate`` (H,). ConViT's MHSA
blocks after them (class token joined) are plain attention.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, recast
from qkhooks.models.class_attention import held_mixer
from qkhooks.models.parallel import ParallelBlockSite, parallel_block_qk, parallel_block_site
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import timm_qk_rows, timm_qkv_rows

__all__ = ["DifferentialMaps", "GatedPositionalMaps", "TwoSoftmaxSite"]


class _HeldWeakly:
    """A head mixing that reads its attention module's own parameters, holding the module weakly: a finished
    recording keeps its sites (and so this) and must keep no model alive."""

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)

    @property
    def module(self) -> nn.Module:
        return held_mixer(self._module)


class DifferentialMaps(_HeldWeakly):
    """Differential attention's combination of its 2H component softmaxes into H maps, with the module's own λ."""

    def terms(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scaled logits (B, 2H, T, N) of the component heads -> ``softmax1``, ``softmax2`` (B, H, T, N), ``lambda``."""
        maps = logits.softmax(dim=-1).unflatten(1, (-1, 2))
        return {"softmax1": maps[:, :, 0], "softmax2": maps[:, :, 1],
                "lambda": self.module._compute_lambda().detach().type_as(maps)}

    def maps(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's maps (B, H, T, N): softmax1 − λ · softmax2, as its forward combines them."""
        return self.combine(self.terms(logits))

    @staticmethod
    def combine(t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The maps from the terms (kept separately, so a recording that keeps both computes the softmaxes once)."""
        return t["softmax1"] - t["lambda"] * t["softmax2"]


class GatedPositionalMaps(_HeldWeakly):
    """GPSA's gated mix of the content softmax and its position-only softmax, from the module's own parameters."""

    def position(self, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """softmax(pos_proj(r)) (H, N, N) on the module's own relative indices for ``num_tokens`` patches."""
        rel = self.module.rel_indices
        if rel is None or rel.shape[1] != num_tokens:  # the forward rebuilds them the same way for a new size
            rel = self.module.get_rel_indices(num_tokens)
        return self.module.pos_proj(rel).permute(0, 3, 1, 2).softmax(dim=-1)[0].detach().to(dtype)

    def gate(self, dtype: torch.dtype) -> torch.Tensor:
        """σ(g_h) (H,): the weight of the position softmax in each head."""
        return torch.sigmoid(self.module.gating_param.detach()).to(dtype)

    def terms(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scaled content logits (B, H, N, N) -> ``content`` (B, H, N, N), ``position`` (H, N, N), ``gate`` (H,)."""
        return {"content": logits.softmax(dim=-1), "position": self.position(logits.shape[-1], logits.dtype),
                "gate": self.gate(logits.dtype)}

    def maps(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's maps (B, H, N, N): gated mix, renormalised per row as its forward does."""
        return self.combine(self.terms(logits))

    @staticmethod
    def combine(t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The maps from the terms (kept separately, so a recording that keeps both computes the softmaxes once)."""
        gate = t["gate"].view(1, -1, 1, 1)
        attn = (1.0 - gate) * t["content"] + gate * t["position"]
        return attn / attn.sum(dim=-1).unsqueeze(-1)


@dataclasses.dataclass(eq=False)
class TwoSoftmaxSite(AttentionSite):
    """A site whose maps combine two softmaxes (``head_mixing`` is a :class:`DifferentialMaps` or
    :class:`GatedPositionalMaps`): maps exact, modes those of the content form(s), the terms on their own."""

    def content_only(self) -> str:
        reasons = ["q and k are normalised per token (the form is the pre-norm one)"] if self.qk_norm is not None else []
        if isinstance(self.head_mixing, DifferentialMaps):
            reasons.append("differential attention: each map is softmax1 − λ·softmax2 of two component heads; the modes "
                           "are those of the 2H component content forms (head 2h + c is term c of map h), each exact for "
                           "its own logits; the terms are rec.terms(l)")
        else:
            reasons.append("gated positional attention: each map is a gated mix of the content softmax and a "
                           "position-only softmax; the modes are those of the content form W_q^T W_k; the terms are "
                           "rec.terms(l)")
        return "; ".join(reasons)

    def attention_rows(self, x: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        """Rows (B, H, T, N) read off the full maps: GPSA's position softmax is a whole-map term."""
        if isinstance(self.head_mixing, DifferentialMaps):
            return super().attention_rows(x, query_tokens)
        from qkhooks.attention import check_tokens, attention_full

        idx = check_tokens(query_tokens, x.shape[0], x.shape[1], x.device)
        maps = attention_full(self, x)
        return torch.gather(maps, 2, idx[:, None, :, None].expand(-1, maps.shape[1], -1, maps.shape[-1]))

    def map_heads(self) -> int:
        """Differential attention: H maps of the 2H component heads (``num_heads``); else one map per head."""
        return self.num_heads // 2 if isinstance(self.head_mixing, DifferentialMaps) else self.num_heads

    def map_terms(self, logits: torch.Tensor) -> dict[str, Any]:
        """The call's terms from the scaled (float) logits of its content form(s)."""
        return self.head_mixing.terms(logits)


# -------------------------------------------------------------------------------------- differential attention


def _diff_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """2H component heads of d / 2H (the model's own reshape of q and k), combined into H maps."""
    heads = 2 * int(attn.num_heads)
    if int(attn.head_dim) * heads != site.dim:
        raise QKHooksError(f"unsupported attention in {site.path!r} (DiffAttention): {heads} component heads of "
                           f"{attn.head_dim} do not make its width {site.dim}.")
    return recast(site, TwoSoftmaxSite, num_heads=heads, head_dim=int(attn.head_dim), scale=float(attn.scale), family="timm-diff",
                 head_mixing=DifferentialMaps(attn))


@dataclasses.dataclass(eq=False)
class _DiffParallelSite(TwoSoftmaxSite, ParallelBlockSite):
    """timm ``DiffParallelScalingBlock`` (``vit_dpwee_*``): a parallel block (:class:`ParallelBlockSite`: the block
    itself is hooked, its tokens are its ``in_norm`` of the block's input) with differential attention."""


def _diff_parallel_site(site: AttentionSite, block: nn.Module) -> AttentionSite:
    return parallel_block_site(_diff_site(site, block), block, _DiffParallelSite)


timm_adapter.EXTRA_FORMS["DiffAttention"] = timm_adapter.ExtraForm(
    "timm.layers.diff_attention.DiffAttention", timm_qkv_rows, _diff_site)
timm_adapter.EXTRA_FORMS["DiffParallelScalingBlock"] = timm_adapter.ExtraForm(
    "timm.models.vision_transformer.DiffParallelScalingBlock", parallel_block_qk, _diff_parallel_site)
MODELLED_FORMS.update({"timm.layers.diff_attention.DiffAttention",
                       "timm.models.vision_transformer.DiffParallelScalingBlock"})


# -------------------------------------------------------------------------------------------------- ConViT


def _convit_mhsa_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """Plain softmax(scale·q·k) on the block's tokens (class token first: ConViT joins it before its MHSA blocks)."""
    return dataclasses.replace(site, family="timm-convit")


def _gpsa_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """Patch tokens only (ConViT joins its class token after the GPSA blocks)."""
    return recast(site, TwoSoftmaxSite, num_prefix_tokens=0, family="timm-convit-gpsa", head_mixing=GatedPositionalMaps(attn))


timm_adapter.EXTRA_FORMS["ConvitMHSA"] = timm_adapter.ExtraForm("timm.models.convit.MHSA", timm_qkv_rows, _convit_mhsa_site)
timm_adapter.EXTRA_FORMS["ConvitGPSA"] = timm_adapter.ExtraForm("timm.models.convit.GPSA", timm_qk_rows, _gpsa_site)
MODELLED_FORMS.update({"timm.models.convit.MHSA", "timm.models.convit.GPSA"})
