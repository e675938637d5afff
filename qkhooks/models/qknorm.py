"""q/k normalisation, exactly (METHODS.md C).

Models with q/k-norm (timm ``vit_*`` with ``qk_norm=True``, EVA, HF InternVL) normalise q and k per token before
the product. The maps are rebuilt from the model's own normalised q and k (its own norm modules, so they are
exact whatever the norm). The modes of W_q^T W_k stay available: they are the *pre-norm* form, exact for q·k
before the norm. This module adds the exact normalised form. With x̃ = [x; 1] and W̃ = [W | b] (the bias folded
in, since the norm acts on q including its bias), a LayerNorm over a group of g dimensions is

    q̂ = γ_q ⊙ C q / s_q + β_q,   C = I − 11^T/g (centring),   s_q = sqrt(|C q|² / g + ε)  (one per token),

so the content logit of head h splits into

    q̂_i·k̂_j = (1/(s_q,i s_k,j)) x̃_i^T A_h^T B_h x̃_j       A_h = diag(γ_q,h) (C W̃_q)_h,  B_h = diag(γ_k,h) (C W̃_k)_h
             + (1/s_q,i) x̃_i^T A_h^T β_k,h                   (a term of the query alone: constant along a row)
             + (1/s_k,j) β_q,h^T B_h x̃_j                     (a term of the key alone)
             + β_q,h·β_k,h.

The middle form A_h^T B_h = W̃_q^T C diag(γ_q γ_k) C W̃_k is bilinear: its SVD gives modes whose projections,
divided by the per-token scales, rebuild the normalised logits exactly with the two linear terms and the
constant. RMSNorm: no centring (C = I) and no β. The group is one head's d_k (timm, EVA) or all heads' H·d_k
(InternVL normalises q over the whole width before splitting heads); the same formulas hold, with C acting on
the group and γ, β sliced to head h.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite

__all__ = ["QKNorm", "NormalisedForm", "qk_norm_of", "normalised_form", "qk_norm_modelled"]


@dataclasses.dataclass(eq=False)
class QKNorm:
    """The model's own q and k norm modules, applied as the model applies them.

    Attributes:
        q_norm, k_norm: the norm modules (read live, so weight edits are seen).
        per_head: True when each head's d_k dimensions are normalised on their own (timm, EVA); False when the
            whole H·d_k width is normalised before the heads are split (InternVL).
    """

    q_norm: nn.Module
    k_norm: nn.Module
    per_head: bool = True

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, N, d_k) -> normalised, with the model's own modules."""
        if self.per_head:
            return self.q_norm(q), self.k_norm(k)
        heads, dk = q.shape[1], q.shape[-1]
        return tuple(  # type: ignore[return-value]
            norm(t.transpose(1, 2).flatten(2)).unflatten(-1, (heads, dk)).transpose(1, 2)
            for norm, t in ((self.q_norm, q), (self.k_norm, k))
        )


def qk_norm_of(path: str, module: nn.Module, per_head: bool = True) -> QKNorm | None:
    """The attention module's ``q_norm``/``k_norm`` as a :class:`QKNorm` (None when both are identities).

    Refused when only one side is normalised or a norm is not a LayerNorm or RMSNorm: the maps would still be the
    model's own, but the adapter would be vouching for a form it has never checked.
    """
    q, k = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    plain = [n is None or isinstance(n, nn.Identity) for n in (q, k)]
    if all(plain):
        return None
    if any(plain) or _kind(q) is None or _kind(k) is None:
        raise QKHooksError(
            f"unsupported attention in {path!r} ({type(module).__name__}): its q/k normalisation is "
            f"{type(q).__name__} on q and {type(k).__name__} on k; qkhooks models a LayerNorm or an RMSNorm on both "
            "sides, so it does not vouch for this one. Teach it the norm (qkhooks.models.qknorm) or record a model "
            "without it."
        )
    return QKNorm(q, k, per_head)


def qk_norm_modelled(module: nn.Module) -> bool:
    """Whether an adapter takes this attention class's q/k norm (its forward is one qkhooks models with it)."""
    forwards = []
    try:
        from timm.layers import Attention, AttentionRope
        from timm.models.eva import EvaAttention

        forwards += [Attention.forward, AttentionRope.forward, EvaAttention.forward]
    except ImportError:  # pragma: no cover - timm missing: nothing of it to model
        pass
    try:
        from transformers.models.internvl.modeling_internvl import InternVLVisionAttention

        forwards.append(InternVLVisionAttention.forward)
    except ImportError:  # pragma: no cover - an older transformers without InternVL
        pass
    try:  # zoo11-build: Sapiens2's per-head RMSNorm on q and k, before its rotation (the HF adapter's DINOv3 rotation)
        from transformers.models.sapiens2.modeling_sapiens2 import Sapiens2Attention

        forwards.append(Sapiens2Attention.forward)
    except ImportError:  # pragma: no cover - an older transformers without Sapiens2
        pass
    return type(module).forward in forwards


def _kind(norm: nn.Module | None) -> str | None:
    """``"layer"`` or ``"rms"`` for the norms whose formula qkhooks knows, else None."""
    name = type(norm).__name__.lower()
    if isinstance(norm, nn.LayerNorm) or name in ("layernorm", "layernorm2d"):
        return "layer"
    if isinstance(norm, getattr(nn, "RMSNorm", ())) or "rmsnorm" in name:
        return "rms"
    return None


def _parameters(norm: nn.Module, width: int) -> tuple[str, torch.Tensor, torch.Tensor, float]:
    """(kind, γ, β, ε) of a norm over ``width`` dimensions (γ = 1, β = 0 where it has none), checked against the
    module itself on a probe: a norm computed otherwise (say γ applied as 1 + w) is refused, not guessed."""
    kind = _kind(norm)
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    eps = getattr(norm, "eps", None)
    eps = getattr(norm, "variance_epsilon", None) if eps is None else eps
    param = next(norm.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))
    gamma = torch.ones(width, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    beta = torch.zeros(width, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    if kind is None or eps is None or gamma.shape != (width,) or beta.shape != (width,):
        raise QKHooksError(f"{type(norm).__name__}: not a LayerNorm or RMSNorm over {width} dimensions with a known ε.")
    probe = torch.randn(3, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        theirs = norm(probe.to(device, dtype)).double().cpu()
    mine = _normalise(probe, kind, gamma, beta, float(eps))
    if float((mine - theirs).abs().max()) > 1e-4 * (1 + float(theirs.abs().max())):
        raise QKHooksError(
            f"{type(norm).__name__} does not compute the {kind} norm γ ⊙ (q − mean) / s + β qkhooks writes down, so the "
            "exact normalised form is not available for it (the maps, from the model's own norm, still are)."
        )
    return kind, gamma, beta, float(eps)  # type: ignore[return-value]


def _normalise(q: torch.Tensor, kind: str, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    centred = q - q.mean(-1, keepdim=True) if kind == "layer" else q
    return gamma * centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() + beta


@dataclasses.dataclass
class NormalisedForm:
    """The exact normalised content form of one layer (module docstring), all in float64 on the CPU.

    Attributes:
        U, S, V: (H, d+1, r), (H, r), (H, d+1, r): SVD of the middle form A_h^T B_h on x̃ = [x; 1].
        query_linear, key_linear: (H, d+1): A_h^T β_k,h and B_h^T β_q,h, the terms linear in one side.
        constant: (H,) β_q,h·β_k,h.
        kind: ``"layer"`` or ``"rms"``; group: the number of dimensions each norm acts on (d_k or H·d_k).
        eps_q, eps_k: the norms' ε, entering the per-token scales.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    query_linear: torch.Tensor
    key_linear: torch.Tensor
    constant: torch.Tensor
    kind: str
    group: int
    eps_q: float
    eps_k: float
    _w_q: torch.Tensor = dataclasses.field(repr=False)
    _w_k: torch.Tensor = dataclasses.field(repr=False)

    def scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token scales s_q, s_k (B, H, N) of the tokens x (B, N, d) entering W_q/W_k."""
        x1 = _augment_tokens(x)
        return self._scale(x1, self._w_q, self.eps_q), self._scale(x1, self._w_k, self.eps_k)

    def _scale(self, x1: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        heads = w.shape[0]
        q = torch.einsum("bnd,hkd->bnhk", x1, w).flatten(2)  # (B, N, H·d_k)
        q = q.unflatten(-1, (-1, self.group))  # groups the norm acts on
        if self.kind == "layer":
            q = q - q.mean(-1, keepdim=True)
        s = (q.pow(2).mean(-1) + eps).sqrt()  # (B, N, groups)
        return s.repeat_interleave(heads // s.shape[-1], dim=-1).transpose(1, 2) if s.shape[-1] != heads else s.transpose(1, 2)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key maps (B, H, r, N): x̃·u_n / s_q and x̃·v_n / s_k, the modes' projections."""
        x1 = _augment_tokens(x)
        s_q, s_k = self.scales(x)
        a = torch.einsum("bnd,hdr->bhrn", x1, self.U) / s_q[:, :, None]
        b = torch.einsum("bnd,hdr->bhrn", x1, self.V) / s_k[:, :, None]
        return a, b

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """q̂_i·k̂_j (B, H, N, N) of every head, rebuilt from the modes, the two linear terms and the constant
        (unscaled: multiply by the site's scale for the model's logits)."""
        x1 = _augment_tokens(x)
        s_q, s_k = self.scales(x)
        a, b = self.project(x)
        middle = torch.einsum("bhrn,hr,bhrm->bhnm", a, self.S, b)
        query_term = torch.einsum("bnd,hd->bhn", x1, self.query_linear) / s_q
        key_term = torch.einsum("bnd,hd->bhn", x1, self.key_linear) / s_k
        return middle + query_term[..., None] + key_term[:, :, None, :] + self.constant[None, :, None, None]


def _augment_tokens(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double().cpu()
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def normalised_form(site: AttentionSite) -> NormalisedForm:
    """The exact normalised content form of a q/k-normalised site (module docstring)."""
    from qkhooks.spectrum import augmented_weights, factored_svd

    norm: QKNorm | None = site.qk_norm
    if norm is None:
        raise QKHooksError(f"{site.path}: this attention has no q/k normalisation; its content form is W_q^T W_k.")
    if not isinstance(norm, QKNorm):  # a normalisation with its own exact form (Swin-v2's cosine, models/cosine.py)
        return norm.normalised_form(site)
    heads, dk = site.num_heads, site.head_dim
    group = dk if norm.per_head else heads * dk
    w_q, w_k = (w.double().cpu() for w in augmented_weights(site.weights()))  # (H, d_k, d+1)
    sides = []
    for w, module in ((w_q, norm.q_norm), (w_k, norm.k_norm)):
        kind, gamma, beta, eps = _parameters(module, group)
        rows = w.flatten(0, 1).unflatten(0, (-1, group))  # (groups, g, d+1)
        if kind == "layer":
            rows = rows - rows.mean(1, keepdim=True)  # C W̃: centring within each group
        gamma, beta = gamma.repeat(heads * dk // group).view(heads, dk), beta.repeat(heads * dk // group).view(heads, dk)
        sides.append((kind, gamma[..., None] * rows.reshape(heads, dk, -1), beta, eps))
    (kind_q, a, beta_q, eps_q), (kind_k, b, beta_k, eps_k) = sides
    if kind_q != kind_k:
        raise QKHooksError(f"{site.path}: q is normalised by a {kind_q} norm and k by a {kind_k} norm; qkhooks writes "
                           "down one kind on both sides.")
    u, s, v = factored_svd(a, b)
    return NormalisedForm(
        U=u, S=s, V=v,
        query_linear=torch.einsum("hkd,hk->hd", a, beta_k),
        key_linear=torch.einsum("hkd,hk->hd", b, beta_q),
        constant=(beta_q * beta_k).sum(-1),
        kind=kind_q, group=group, eps_q=eps_q, eps_k=eps_k, _w_q=w_q, _w_k=w_k,
    )
