"""The singular modes of each head's query-key form W_q^T W_k, computed from thin factors.

W_q^T W_k has rank <= d_k, so we never form the d x d product: with thin QRs W_q^T = Q_a R_a and
W_k^T = Q_b R_b, the SVD of the small d_k x d_k matrix R_a R_b^T = U' S V'^T gives U = Q_a U', V = Q_b V'
(TransformerLens' FactoredMatrix idea). Cost O(d d_k^2) per head, all heads batched, in float64.

Sign convention: the SVD fixes (u_n, v_n) only up to a joint sign flip, so we make the entry of u_n with
the largest magnitude positive and flip v_n with it; sigma_n u_n v_n^T is unchanged.

Importing this module needs numpy only: a :class:`LayerSpectrum` holds torch tensors when computed from a
model and numpy arrays when read from a run file (``RunReader.spectrum``), and its statistics work on both.
Torch is imported where a spectrum is computed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import numpy as np

from qkhooks.errors import QKHooksError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qkhooks.models.base import AttentionSite, QKWeights
    from qkhooks.models.load import LoadedModel

Array = Union["torch.Tensor", np.ndarray]
"""A torch tensor (computed live) or a numpy array (read from a run file); ``np.asarray`` takes either."""

__all__ = ["LayerSpectrum", "QKSpectrum", "spectrum", "factored_svd", "random_cosine_band"]


def head_weighted_cosines(S: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """:attr:`LayerSpectrum.cosine_weighted` from arrays S, cos (H, K): each head's sigma-weighted sum of cosines."""
    S, cos = np.asarray(S, np.float64), np.asarray(cos, np.float64)
    return (S / np.maximum(S.sum(-1, keepdims=True), 1e-30) * cos).sum(-1)


def random_cosine_band(dim: int, z: float = 1.96) -> float:
    """Half-width of the 95% interval of the cosine between two random directions in R^dim.

    For random unit vectors the cosine is approximately N(0, 1/dim), so the band is +-z/sqrt(dim) (METHODS
    A.2). The paper's figures show about +-0.065 for d = 768 from a slightly different sampling.
    """
    return z / math.sqrt(dim)


def factored_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a^T b for batched thin factors a, b of shape (..., r, d), without forming the d x d product.

    Returns U (..., d, r), S (..., r), V (..., d, r) with a^T b = U diag(S) V^T, sorted by decreasing S,
    signs fixed so that the largest-magnitude entry of each u_n is positive.
    """
    import torch

    qa, ra = torch.linalg.qr(a.transpose(-1, -2))
    qb, rb = torch.linalg.qr(b.transpose(-1, -2))
    u_small, s, vh_small = torch.linalg.svd(ra @ rb.transpose(-1, -2))
    u, v = qa @ u_small, qb @ vh_small.transpose(-1, -2)
    pivot = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(u, -2, pivot))
    sign[sign == 0] = 1
    return u * sign, s, v * sign


@dataclasses.dataclass
class LayerSpectrum:
    """Modes of every head of one layer.

    Attributes:
        layer: 0-based block index.
        U, V: (H, d, K) query-side and key-side singular vectors (K = d_k unless truncated). With
            ``augmented=True`` the vectors live in R^{d+1}: the last coordinate multiplies a constant 1.
        S: (H, K) singular values, decreasing.
        augmented: whether biases were folded in through x -> [x; 1].
        dim: the embedding width d.

    The arrays are torch tensors when computed from a model and numpy arrays when read from a run file;
    every statistic below returns the same kind (``np.asarray`` turns either into numpy).
    """

    layer: int
    U: Array
    S: Array
    V: Array
    augmented: bool = False
    _stored: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_heads(self) -> int:
        return self.S.shape[0]

    @property
    def num_modes(self) -> int:
        return self.S.shape[1]

    @property
    def dim(self) -> int:
        return self.U.shape[1] - int(self.augmented)

    @property
    def cos(self) -> Array:
        """(H, K) cosine between u_n and v_n: high = grouping, near 0 = contextualisation (token part only)."""
        u, v = self.U[:, : self.dim], self.V[:, : self.dim]
        if isinstance(u, np.ndarray):
            return (u * v).sum(1) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1), 1e-30)
        return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-30)

    @property
    def cosine_weighted(self) -> Array:
        """(H,) sigma-weighted *sum* of the mode cosines, sum_n (sigma_n / sum_m sigma_m) cos_n (paper's formula)."""
        if isinstance(self.S, np.ndarray):
            weights = self.S / np.maximum(self.S.sum(-1, keepdims=True), 1e-30)
        else:
            weights = self.S / self.S.sum(-1, keepdim=True).clamp_min(1e-30)
        return (weights * self.cos).sum(-1)

    def top(self, k: int | None) -> "LayerSpectrum":
        """The leading ``k`` modes of every head (all of them for None)."""
        if k is None or k >= self.num_modes:
            return self
        if k < 1:
            raise QKHooksError(f"modes must be >= 1 or 'all', got {k}.")
        return LayerSpectrum(self.layer, self.U[..., :k], self.S[:, :k], self.V[..., :k], self.augmented)

    def bilinear(self) -> Array:
        """(H, d', d') the dense form sum_n sigma_n u_n v_n^T of the kept modes (for checks, small models)."""
        if isinstance(self.U, np.ndarray):
            return np.einsum("hdk,hk,hek->hde", self.U, self.S, self.V)
        import torch

        return torch.einsum("hdk,hk,hek->hde", self.U, self.S, self.V)

    # ``RunReader.spectrum(l)`` used to return the stored arrays as a dict; that use keeps working, with a warning.
    def _stored_arrays(self) -> dict[str, np.ndarray]:
        warnings.warn("RunReader.spectrum(l) now returns a LayerSpectrum (.U, .S, .V, .cos); for the stored arrays "
                      "as a dict use RunReader.spectrum_arrays(l).", DeprecationWarning, stacklevel=3)
        if self._stored is None:
            return {"U": np.asarray(self.U), "S": np.asarray(self.S), "V": np.asarray(self.V), "cos": np.asarray(self.cos)}
        return self._stored

    def __getitem__(self, name: str) -> np.ndarray:
        return self._stored_arrays()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored_arrays())

    def __contains__(self, name: str) -> bool:
        return name in self._stored_arrays()

    def keys(self) -> Any:
        return self._stored_arrays().keys()

    def items(self) -> Any:
        return self._stored_arrays().items()

    def values(self) -> Any:
        return self._stored_arrays().values()


@dataclasses.dataclass
class QKSpectrum:
    """Per-layer spectra of a model, with the derived statistics of Pan et al. (2024)."""

    layers: list[LayerSpectrum]
    model: str = ""

    def __iter__(self) -> Iterator[LayerSpectrum]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerSpectrum:
        """The spectrum of block index ``layer`` (not list position)."""
        for spec in self.layers:
            if spec.layer == layer:
                return spec
        raise QKHooksError(f"layer {layer} is not in this spectrum; it has layers {[s.layer for s in self.layers]}.")

    @property
    def dim(self) -> int:
        return self.layers[0].dim

    @property
    def random_baseline_cos95(self) -> float:
        """Half-width of the 95% band of cosines between random directions in R^d."""
        return random_cosine_band(self.dim)

    def cosine_weighted_by_layer(self) -> list[float]:
        """Per layer: the mean over heads of each head's sigma-weighted cosine (paper Fig. 3)."""
        return [float(s.cosine_weighted.mean()) for s in self.layers]

    def top(self, k: int | None) -> "QKSpectrum":
        return QKSpectrum([s.top(k) for s in self.layers], self.model)

    def to_dict(self) -> dict:
        """JSON-ready summary: the shape documented for ``qkhooks spectrum --json``."""
        layers = []
        for spec, layer_cos in zip(self.layers, self.cosine_weighted_by_layer()):
            heads = [
                {
                    "head": h,
                    "singular_values": spec.S[h].tolist(),
                    "cosine": spec.cos[h].tolist(),
                    "cosine_weighted": float(spec.cosine_weighted[h]),
                }
                for h in range(spec.num_heads)
            ]
            layers.append({"layer": spec.layer, "cosine_weighted": layer_cos, "heads": heads})
        return {
            "model": self.model,
            "dim": self.dim,
            "augmented": self.layers[0].augmented,
            "random_baseline_cos95": self.random_baseline_cos95,
            "layers": layers,
        }

    def table(self) -> str:
        """A per-layer text table: heads, top singular value, weighted cosine, fraction of modes above the band."""
        band = self.random_baseline_cos95
        lines = [
            f"QK spectrum of {self.model or 'model'}: d={self.dim}, random 95% cosine band +-{band:.3f}",
            f"{'layer':>5} {'heads':>5} {'modes':>5} {'sigma_max':>10} {'cos_w':>7} {'cos>band':>8} {'cos<-band':>9}",
        ]
        for spec, cos_w in zip(self.layers, self.cosine_weighted_by_layer()):
            cos = spec.cos
            lines.append(
                f"{spec.layer:>5} {spec.num_heads:>5} {spec.num_modes:>5} {float(spec.S.max()):>10.3f} {cos_w:>7.3f} "
                f"{_fraction(cos > band):>8.2f} {_fraction(cos < -band):>9.2f}"
            )
        return "\n".join(lines)


def _fraction(mask: Array) -> float:
    """The fraction of True entries of a boolean tensor or array."""
    return float(mask.sum()) / max(math.prod(mask.shape), 1)


def _augment(weights: QKWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """[W | b] so that (W x + b) = [W | b] [x; 1]; a missing bias is a zero column."""
    import torch

    out = []
    for w, b in ((weights.w_q, weights.b_q), (weights.w_k, weights.b_k)):
        col = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device) if b is None else b
        out.append(torch.cat([w, col[..., None]], dim=-1))
    return out[0], out[1]


def _compute_layer_spectrum(site: AttentionSite, augmented: bool) -> LayerSpectrum:
    weights = site.weights()
    if augmented:
        w_q, w_k = _augment(weights)
    else:
        w_q, w_k = weights.w_q, weights.w_k
    u, s, v = factored_svd(w_q.double().cpu(), w_k.double().cpu())
    return LayerSpectrum(site.layer, u.float(), s.float(), v.float(), augmented)


# Attention module -> {augmented: (key, fingerprint, spectrum)}. Weak keys: a deleted model frees its entries
# (a spectrum holds no reference to its module).
_SPECTRUM_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[bool, tuple[tuple, tuple, LayerSpectrum]]]" = (
    weakref.WeakKeyDictionary()
)
_PROBES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _weights_key(site: AttentionSite) -> tuple | None:
    """Identity and version of every parameter behind the site's W_q/W_k (None: not trackable, do not cache).

    ``tensor._version`` counts in-place edits (``copy_``, ``load_state_dict``, optimiser steps); the data
    pointer, dtype, device and shape catch replaced tensors (``.to()``, ``param.data = ...``).
    """
    modules = site.qk_modules or (site.module,)
    try:
        return tuple(
            (id(p), p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
            for m in modules for p in m.parameters()
        )
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def _weights_fingerprint(site: AttentionSite) -> tuple:
    """W·r for a fixed random r, and b: edits that bypass the version counter (``param.data.mul_()``) still
    change it, so a cached spectrum is never reused for weights it was not computed from."""
    w, b = site.qk_linear()
    w = w.detach()
    import torch

    probe_key = (w.shape[-1], w.device)
    if probe_key not in _PROBES:
        gen = torch.Generator().manual_seed(w.shape[-1])
        _PROBES[probe_key] = torch.rand(w.shape[-1], generator=gen, dtype=torch.float64).add_(0.5).to(w.device)
    probe = _PROBES[probe_key]
    with torch.no_grad():
        projected = (w.double() @ probe).cpu()
        bias = None if b is None else b.detach().double().cpu()
    return w.dtype, tuple(w.shape), projected, bias


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    import torch

    return a[:2] == b[:2] and torch.equal(a[2], b[2]) and (
        (a[3] is None and b[3] is None) or (a[3] is not None and b[3] is not None and torch.equal(a[3], b[3]))
    )


def layer_spectrum(site: AttentionSite, augmented: bool = False) -> LayerSpectrum:
    """Spectrum of one site: float64 SVD, stored as float32 on the CPU.

    Computed once per set of weights: cached per attention module and reused while the weights' identity,
    version and fingerprint are unchanged, so ``record()`` entered per batch does no SVD. The returned
    spectrum is shared with the cache: treat it as read-only.
    """
    module = site.module
    key = _weights_key(site) if module is not None else None
    if key is None:
        return _compute_layer_spectrum(site, augmented)
    fingerprint = _weights_fingerprint(site)
    entries = _SPECTRUM_CACHE.setdefault(module, {})
    hit = entries.get(augmented)
    if hit is not None and hit[0] == key and _same_fingerprint(hit[1], fingerprint) and hit[2].layer == site.layer:
        return hit[2]
    spec = _compute_layer_spectrum(site, augmented)
    entries[augmented] = (key, fingerprint, spec)
    return spec


def spectrum(
    model: nn.Module | LoadedModel | Sequence[AttentionSite],
    layers: str | Sequence[int] | None = None,
    augmented: bool = False,
    name: str = "",
) -> QKSpectrum:
    """Query-key spectrum of every head of every (chosen) layer.

    Args:
        model: a supported model (or the :class:`LoadedModel` from :func:`load_model`), or its sites from
            :func:`qkhooks.sites`.
        layers: block indices to keep, or a string such as "0,5-7,-1" (None: all).
        augmented: fold the biases in through x -> [x; 1] (default: the papers' bias-free form, Linear
            weights only, no 1/sqrt(d_k), no LayerNorm affine).
        name: a label for reports (defaults to the model's class name).
    """
    from torch import nn

    from qkhooks.models import sites as find_sites
    from qkhooks.models.base import select_layers
    from qkhooks.models.load import unwrap_loaded

    model = unwrap_loaded(model)
    if isinstance(model, nn.Module):
        found = find_sites(model, layers)
        name = name or getattr(model, "qkhooks_spec", "") or type(model).__name__
    else:
        found = select_layers(list(model), layers)
    return QKSpectrum([layer_spectrum(site, augmented) for site in found], name)
