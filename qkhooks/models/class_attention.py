"""CaiT (timm ``cait_*``): class attention and talking heads, exactly (METHODS.md C).

CaiT runs two kinds of attention. The patch blocks (``blocks``, ``TalkingHeadAttn``) see the patches only (no
class token) and mix the heads twice: with L = ``proj_l`` and W = ``proj_w`` (H x H Linear layers),

    A_h = Σ_h'' W[h, h''] softmax_j( Σ_h' L[h, h'] scale · q_h'(i)·k_h'(j) + l_h ) + w_h.

Before the softmax the mixed logit of output head h is one bilinear form of the tokens,
M_h = Σ_h' L[h, h'] W_q,h'^T W_k,h', of rank up to H·d_k: :func:`mixed_spectrum` gives its exact SVD per output
head, whose modes rebuild those mixed logits (the constant l_h cancels in the softmax). After the softmax, W mixes
probabilities, so a map is a weighted sum of H softmaxes, not the softmax of one form: no single set of modes
rebuilds the final maps, and qkhooks says so (:func:`refuse_modes_of_mixed_maps`) instead of pretending. The maps
themselves are rebuilt exactly with the model's own ``proj_l`` and ``proj_w`` (:class:`TalkingHeads`).

The class blocks (``blocks_token_only``, ``ClassAttn``) take [class; patches]: only the class token queries and
the keys are all of them, so the maps are (B, H, 1, N), the model's shape; modes are those of W_q^T W_k, the
query side meaningful for the class token (the projections of the other tokens are the same form evaluated
there, not rows the model computes).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, leading_rows, stacked_rows

__all__ = ["TalkingHeads", "held_mixer", "mixed_spectrum", "cait_site_fields", "refuse_modes_of_mixed_maps"]


class TalkingHeads:
    """The model's own head mixing before (``proj_l``) and after (``proj_w``) the softmax, read live. A module is
    held weakly: a finished recording keeps its sites (and so this) and must keep no model alive."""

    def __init__(self, proj_l: nn.Linear, proj_w: nn.Linear):
        self._mixers = tuple(weakref.ref(m) if isinstance(m, nn.Module) else (lambda m=m: m) for m in (proj_l, proj_w))

    @property
    def proj_l(self) -> nn.Linear:
        return held_mixer(self._mixers[0])

    @property
    def proj_w(self) -> nn.Linear:
        return held_mixer(self._mixers[1])

    def maps(self, logits: torch.Tensor) -> torch.Tensor:
        """Scaled per-head logits (B, H, T, N) -> the model's maps (B, H, T, N): mix, softmax, mix."""
        mixed = _mix(self.proj_l, logits).softmax(dim=-1)
        return _mix(self.proj_w, mixed)


def held_mixer(ref: Callable[[], Any]) -> Any:
    """The module ``ref`` (a weak reference) holds for a site's ``head_mixing``, or a refusal saying its model is
    gone."""
    held = ref()
    if held is None:
        raise QKHooksError("the model whose head mixing (talking heads, differential or gated maps) this site reads "
                           "is gone (a finished recording keeps no model alive); record the model again.")
    return held


def _mix(linear: nn.Linear, t: torch.Tensor) -> torch.Tensor:
    """A Linear over the head axis of (B, H, T, N), as CaiT applies it (heads moved last and back)."""
    w, b = linear.weight.to(t.dtype), None if linear.bias is None else linear.bias.to(t.dtype)
    return torch.nn.functional.linear(t.permute(0, 2, 3, 1), w, b).permute(0, 3, 1, 2)


def mixed_spectrum(site: AttentionSite, augmented: bool = True):
    """Exact SVD of each output head's mixed form M_h = Σ_h' L[h, h'] W_q,h'^T W_k,h' (on [x; 1] when
    ``augmented``, biases folded in), as a :class:`qkhooks.spectrum.LayerSpectrum` with H·d_k modes per head.

    σ_n u_n v_n^T summed over the modes of head h, times the site's scale, gives its mixed logit before the softmax
    up to the constant l_h (which the softmax ignores)."""
    from qkhooks.spectrum import LayerSpectrum, augmented_weights, factored_svd

    if site.head_mixing is None:
        raise QKHooksError(f"{site.path}: this attention does not mix heads; its forms are the per-head W_q^T W_k.")
    weights = site.weights()
    w_q, w_k = augmented_weights(weights) if augmented else (weights.w_q, weights.w_k)
    mix = site.head_mixing.proj_l.weight.detach().double().cpu()  # (H out, H in)
    w_q, w_k = w_q.double().cpu(), w_k.double().cpu()  # (H, d_k, d')
    a = torch.einsum("gh,hkd->ghkd", mix, w_q).flatten(1, 2)  # (H out, H·d_k, d'): L[g, h] W_q,h stacked
    b = w_k.flatten(0, 1).expand(mix.shape[0], -1, -1)  # (H out, H·d_k, d'): W_k,h stacked
    u, s, v = factored_svd(a, b)
    return LayerSpectrum(site.layer, u, s, v, augmented)


def refuse_modes_of_mixed_maps(site: AttentionSite) -> None:
    """Raise for an analysis that reads a site's maps as the softmax of one bilinear form."""
    if getattr(site, "map_heads", lambda: site.num_heads)() != site.num_heads:  # zoo13: two_softmax.DifferentialMaps
        raise QKHooksError(
            f"layer {site.layer} ({site.path}) is differential attention: each of its {site.map_heads()} maps is "
            f"softmax1 - lambda * softmax2 of two of its {site.num_heads} component heads, not the softmax of one "
            "bilinear form, and mode head h is component head h, not map head h. Its maps and terms are exact "
            "(rec.terms(l), run.terms(l)) and each component head's modes rebuild that component's logits; leave the "
            "layer out (layers=) for an analysis of the maps as one form."
        )
    if site.head_mixing is not None:
        raise QKHooksError(
            f"layer {site.layer} ({site.path}) mixes heads after the softmax (CaiT talking heads): each map is a weighted "
            "sum of several softmaxes, not the softmax of one bilinear form, so no modes rebuild it. Its maps are exact "
            "and qkhooks.models.class_attention.mixed_spectrum gives the exact modes of the mixed logits before the "
            "softmax; leave the layer out (layers=) for an analysis of the maps as one form."
        )


def cait_site_fields(attn: nn.Module, kind: str) -> dict[str, Any]:
    """The :class:`AttentionSite` fields of a CaiT attention module (``"TalkingHeadAttn"`` or ``"ClassAttn"``)."""
    heads = int(attn.num_heads)
    if kind == "TalkingHeadAttn":
        qkv = attn.qkv
        rows = qkv.out_features // 3
        return dict(qk_linear=leading_rows(qkv, 2 * rows), qk_modules=(qkv,), head_dim=rows // heads, num_prefix_tokens=0,
                    head_mixing=TalkingHeads(attn.proj_l, attn.proj_w))
    q, k = attn.q, attn.k
    return dict(qk_linear=stacked_rows(q, k), qk_modules=(), head_dim=q.out_features // heads, num_prefix_tokens=1,
                class_attention=True)  # the q Linear sees the class token only: project modes from the tokens
