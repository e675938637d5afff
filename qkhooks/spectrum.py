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

import collections
import contextlib
import ctypes
import dataclasses
import functools
import math
import sys
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

import numpy as np

from qkhooks._version import REMOVED_IN
from qkhooks.errors import QKHooksError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qkhooks.models.base import AttentionSite, QKWeights
    from qkhooks.models.load import LoadedModel

Array = Union["torch.Tensor", np.ndarray]
"""A torch tensor (computed live) or a numpy array (read from a run file); ``np.asarray`` takes either."""

__all__ = ["LayerSpectrum", "QKSpectrum", "spectrum", "factored_svd", "random_cosine_band", "null_modes", "tied_modes",
           "head_weighted_cosines", "mean_over_heads"]


def head_weighted_cosines(S: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """:attr:`LayerSpectrum.cosine_weighted` from arrays S, cos (H, K): each head's sigma-weighted sum of cosines,
    sum_n (sigma_n / sum_m sigma_m) cos_n (METHODS A.2). Pass every mode of each head (a spectrum's
    :meth:`LayerSpectrum.all_modes`): over fewer modes the weights are renormalised and the number is another one.

    A head whose sigma are all zero (W_q or W_k zero) has no weights: its value is NaN (0/0), not 0, and
    :func:`mean_over_heads` leaves it out of a layer's mean; so is a head with a mode of weight whose cosine is NaN
    (no token part: :attr:`LayerSpectrum.cos`). A mode of zero weight adds nothing, whatever its cosine.
    """
    S, cos = np.asarray(S, np.float64), np.asarray(cos, np.float64)
    total = S.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(S > 0, S / np.where(total > 0, total, 1.0) * cos, 0.0).sum(-1)
    return np.where(total[..., 0] > 0, out, np.nan)


def mean_over_heads(values: Any) -> float:
    """A layer's plain mean of its heads' weighted cosines, leaving out the NaN of heads without weights (all
    sigma = 0); NaN when no head has weights."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


NULL_MODE_NOTE = ("numerically null modes (sigma_n <= max_n sigma_n * d * eps, eps of the float type sigma is held in: "
                  "float32 for every spectrum qkhooks computes or stores) and tied modes (sigma_n within "
                  "max_n sigma_n * 8 * eps of another mode's: the weights fix only their common subspace, any rotation "
                  "of it is an SVD too) are left out: their u_n, v_n are not determined by the weights, so their "
                  "cosines are arbitrary")

TIE_ULPS = 8
"""Two sigma of a head closer than TIE_ULPS * eps * (the head's largest sigma) are tied (:func:`null_modes`). Weights
with exactly tied sigma, rounded to float32, give sigma within 0.5 eps of each other (orthonormal rows, d up to 1024);
a trained ViT's closest distinct pair is farther (DINOv2-S: none of its 4608 modes' non-null neighbours within 8 eps,
26 within d * eps, which would flag modes whose vectors the weights do fix)."""


def null_modes(S: Any, dim: int, eps: float | None = None) -> np.ndarray:
    """(H, K) bool: the modes of each head whose u_n, v_n the weights do not determine: numerically null ones,
    sigma_n <= max_n sigma_n(head) * dim * eps, and tied ones, sigma_n within max_n sigma_n(head) * TIE_ULPS * eps
    of another mode's sigma.

    The null rule is numpy's ``matrix_rank`` tolerance for the d x d form W_q^T W_k (``dim`` = d, or d + 1
    augmented), with ``eps`` the machine epsilon of the float type ``S`` is held in (default; float32 for qkhooks'
    spectra: the precision of the weights and of the stored sigma). A null mode's u_n, v_n are any basis of the null
    spaces, not determined by the weights, so its cosine means nothing; a head with every sigma = 0 is all null.
    Tied modes (review r45): for sigma_n = sigma_m, (U R, V R) with R any rotation of the tied block is an SVD of the
    same form, so each mode's cosine, top images and BFD cells depend on the factorisation's basis (two
    factorisations of one W_q^T W_k gave head cosines in [-0.13, 0.23] and [-0.09, 0.35]); the block's sigma-weighted
    cosine sum_n sigma cos_n = sigma tr(U_b^T V_b) does not, and stays in :attr:`LayerSpectrum.cosine_weighted`.
    ``S`` sorted or not; numpy or torch. Pass the head's *all* modes or a leading part of them (the largest sigma
    is the first mode's; a tie of the last mode passed with one left out is not seen).
    """
    S, top, eps = _sigma_scale(S, eps)
    return (S <= top * dim * eps) | _ties(S, top, eps)


def tied_modes(S: Any, dim: int, eps: float | None = None) -> np.ndarray:
    """(H, K) bool: the modes :func:`null_modes` flags for a tie alone (sigma_n not numerically null, within TIE_ULPS *
    eps * max sigma of another mode's): a head with such modes carries energy in a block whose basis the weights do
    not fix, so sums over its modes of products of per-mode quantities (BFD's additive shares, participation ratios)
    change with the factorisation; a numerically null mode carries no energy and changes none of them."""
    S, top, eps = _sigma_scale(S, eps)
    return _ties(S, top, eps) & ~(S <= top * dim * eps)


def _sigma_scale(S: Any, eps: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """``S`` (numpy or torch) as float64, each head's largest sigma, and ``eps``: by default the machine epsilon of
    the float type ``S`` is held in (the precision its sigma carry), float64's for an integer array."""
    if not isinstance(S, np.ndarray):
        S = S.detach().cpu().numpy() if hasattr(S, "detach") else np.asarray(S)
    if eps is None:
        eps = float(np.finfo(S.dtype).eps) if np.issubdtype(S.dtype, np.floating) else float(np.finfo(np.float64).eps)
    S = np.asarray(S, np.float64)
    return S, (S.max(-1, keepdims=True) if S.size else S), eps


def _ties(S: np.ndarray, top: np.ndarray, eps: float) -> np.ndarray:
    """(H, K) bool: sigma within TIE_ULPS * eps * ``top`` (each head's largest) of another sigma of the head."""
    tied = np.zeros(S.shape, dtype=bool)
    if S.shape[-1] < 2:
        return tied
    order = np.argsort(-S, axis=-1, kind="stable")
    ranked = np.take_along_axis(S, order, -1)
    close = -np.diff(ranked, axis=-1) <= top * TIE_ULPS * eps  # neighbours in sigma order: the closest other sigma
    tied_ranked = np.zeros(S.shape, dtype=bool)
    tied_ranked[..., :-1] |= close
    tied_ranked[..., 1:] |= close
    np.put_along_axis(tied, order, tied_ranked, -1)
    return tied


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
        truncated: whether U, S, V keep only the leading K of each head's modes (``top(k)``; a recording's
            ``modes=K``). False for a spectrum built by hand: it is taken to hold every mode.
        S_all, cos_all: (H, d_k) every mode's sigma and cosine, for a truncated spectrum that knows them (``top``
            of a whole one; a run file's ``S_all``/``cos_all``), else None. The per-head and per-layer statistics
            (:attr:`cosine_weighted`, :meth:`QKSpectrum.table`) are over all modes (METHODS A.2): a truncated
            spectrum without S_all/cos_all refuses them instead of renormalising over the K kept modes.

    The arrays are torch tensors when computed from a model and numpy arrays when read from a run file;
    every statistic below returns the same kind (``np.asarray`` turns either into numpy).
    """

    layer: int
    U: Array
    S: Array
    V: Array
    augmented: bool = False
    _stored: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False, compare=False)
    S_all: Array | None = dataclasses.field(default=None, repr=False, compare=False)
    cos_all: Array | None = dataclasses.field(default=None, repr=False, compare=False)
    truncated: bool = False

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
        """(H, K) cosine between u_n and v_n: high = grouping, near 0 = contextualisation (token part only).

        NaN for a mode of the augmented [x; 1] form whose u_n or v_n has no token part (its norm at most the square
        root of the dtype's eps: a head with W_q = 0 and a bias makes u_n the bias direction alone), where the cosine
        is 0/0: normalised, the float noise left there read as an arbitrary cosine (review r34)."""
        u, v = self.U[:, : self.dim], self.V[:, : self.dim]
        if isinstance(u, np.ndarray):
            nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
            tiny = math.sqrt(np.finfo(u.dtype).eps) if np.issubdtype(u.dtype, np.floating) else 0.0
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where((nu > tiny) & (nv > tiny), (u * v).sum(1) / (nu * nv), np.nan)
        import torch

        nu, nv = u.norm(dim=1), v.norm(dim=1)
        tiny = math.sqrt(torch.finfo(u.dtype).eps)
        return torch.where((nu > tiny) & (nv > tiny), (u * v).sum(1) / (nu * nv), torch.full_like(nu, math.nan))

    @property
    def null_modes(self) -> np.ndarray:
        """(H, K) bool numpy: the kept modes that are numerically null (see :func:`null_modes`); their cosines are
        arbitrary and are left out of the table's cos>band fractions and the Fig. S1 histograms."""
        S = self.S if self.S_all is None else self.S_all
        return null_modes(S, self.U.shape[1])[:, : self.num_modes]

    def all_modes(self) -> tuple[Array, Array]:
        """(S, cos), each (H, d_k): every mode's sigma and cosine, the ones the per-head statistics are over.

        Raises QKHooksError for a truncated spectrum that does not know its other modes."""
        if not self.truncated:
            return self.S, self.cos
        if self.S_all is None or self.cos_all is None:
            raise QKHooksError(
                f"layer {self.layer}'s spectrum keeps only the top {self.num_modes} modes of each head and does not "
                "know the others' sigma and cosine, so it cannot give the sigma-weighted cosine (METHODS A.2: a sum "
                "over all modes; over the kept ones only it would be another number). Use qkhooks.spectrum(model) "
                "(every mode, from the weights), a recording's spectrum (it carries every mode's sigma and cosine), "
                "or a run file's spectrum_arrays(layer)['S_all'], ['cos_all'] with "
                "qkhooks.spectrum.head_weighted_cosines.")
        return self.S_all, self.cos_all

    def all_modes_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`all_modes` as numpy arrays (S, cos), each (H, d_k), in the spectrum's own float type."""
        return tuple(np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)  # type: ignore[return-value]
                     for a in self.all_modes())

    def non_null_cosines(self) -> np.ndarray:
        """Every mode's cosine of every head, flat float64, but the numerically null modes' (:func:`null_modes`):
        the cosines whose values mean something, which :meth:`QKSpectrum.table`'s cos>band fractions and the Fig. S1
        histograms count."""
        S, cos = self.all_modes_numpy()
        return np.asarray(cos, np.float64)[~null_modes(S, self.U.shape[1])]

    @property
    def cosine_weighted(self) -> Array:
        """(H,) sigma-weighted *sum* of the mode cosines over every mode of each head,
        sum_n (sigma_n / sum_m sigma_m) cos_n (METHODS A.2), also when this spectrum keeps fewer modes (from
        :attr:`S_all`, :attr:`cos_all`; refused when it does not know them). NaN for a head whose sigma are all
        zero (no weights: 0/0)."""
        S, cos = self.all_modes()
        if isinstance(S, np.ndarray):
            return head_weighted_cosines(S, cos)
        import torch

        return torch.from_numpy(head_weighted_cosines(S.detach().cpu().numpy(), np.asarray(cos.detach().cpu().numpy()))
                                ).to(S.dtype)

    def top(self, k: int | None) -> "LayerSpectrum":
        """The leading ``k`` modes of every head (all of them for None); it keeps every mode's sigma and cosine
        (:attr:`S_all`, :attr:`cos_all`) for the per-head statistics."""
        if k is None or k >= self.num_modes:
            return self
        if k < 1:
            raise QKHooksError(f"modes must be >= 1 or 'all', got {k}.")
        if self.truncated:
            S_all, cos_all = self.S_all, self.cos_all
        else:
            S_all, cos_all = self.S, self.cos
        return LayerSpectrum(self.layer, self.U[..., :k], self.S[:, :k], self.V[..., :k], self.augmented,
                             S_all=S_all, cos_all=cos_all, truncated=True)

    def bilinear(self) -> Array:
        """(H, d', d') the dense form sum_n sigma_n u_n v_n^T of the kept modes (for checks, small models)."""
        if isinstance(self.U, np.ndarray):
            return np.einsum("hdk,hk,hek->hde", self.U, self.S, self.V)
        import torch

        return torch.einsum("hdk,hk,hek->hde", self.U, self.S, self.V)

    # ``RunReader.spectrum(l)`` used to return the stored arrays as a dict; that use keeps working, with a warning.
    def _stored_arrays(self) -> dict[str, np.ndarray]:
        warnings.warn("RunReader.spectrum(l) now returns a LayerSpectrum (.U, .S, .V, .cos); for the stored arrays "
                      f"as a dict use RunReader.spectrum_arrays(l). The dict use is removed in qkhooks {REMOVED_IN}.",
                      DeprecationWarning, stacklevel=3)
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
        """Per layer: the mean over heads of each head's sigma-weighted cosine over all its modes (paper Fig. 3,
        METHODS A.2), also for a recording's truncated spectrum. Heads whose sigma are all zero (NaN) are left out
        of the mean; NaN when no head has weights."""
        return [mean_over_heads(np.asarray(s.cosine_weighted)) for s in self.layers]

    def top(self, k: int | None) -> "QKSpectrum":
        return QKSpectrum([s.top(k) for s in self.layers], self.model)

    def to_dict(self) -> dict:
        """JSON-ready summary: the shape documented for ``qkhooks spectrum --json``. ``cosine_weighted`` is over all
        modes (also for a truncated spectrum, whose ``singular_values``/``cosine`` list the kept ones); None for a
        head whose sigma are all zero (and a layer with no other head)."""
        layers = []
        for spec, layer_cos in zip(self.layers, self.cosine_weighted_by_layer()):
            weighted = np.asarray(spec.cosine_weighted, np.float64)
            heads = [
                {
                    "head": h,
                    "singular_values": spec.S[h].tolist(),
                    "cosine": spec.cos[h].tolist(),
                    "cosine_weighted": _finite_or_none(weighted[h]),
                }
                for h in range(spec.num_heads)
            ]
            layers.append({"layer": spec.layer, "cosine_weighted": _finite_or_none(layer_cos), "heads": heads})
        return {
            "model": self.model,
            "dim": self.dim,
            "augmented": self.layers[0].augmented,
            "random_baseline_cos95": self.random_baseline_cos95,
            "layers": layers,
        }

    def table(self) -> str:
        """A per-layer text table: heads, modes, top singular value, weighted cosine, fraction of modes above the band.

        Every statistic is over all modes of each head (for a truncated spectrum, from :attr:`LayerSpectrum.S_all`
        and ``cos_all``; "modes" then reads kept/all). The cos>band and cos<-band fractions leave out numerically
        null modes (:func:`null_modes`), whose cosines are arbitrary; "null" counts them."""
        band = self.random_baseline_cos95
        lines = [
            f"QK spectrum of {self.model or 'model'}: d={self.dim}, random 95% cosine band +-{band:.3f}",
            f"{'layer':>5} {'heads':>5} {'modes':>5} {'sigma_max':>10} {'cos_w':>7} {'cos>band':>8} {'cos<-band':>9} "
            f"{'null':>5}",
        ]
        for spec, cos_w in zip(self.layers, self.cosine_weighted_by_layer()):
            S, cos = spec.all_modes_numpy()[0], spec.non_null_cosines()
            modes = f"{spec.num_modes}/{S.shape[1]}" if spec.truncated else f"{spec.num_modes}"
            lines.append(
                f"{spec.layer:>5} {spec.num_heads:>5} {modes:>5} {float(S.max()):>10.3f} {cos_w:>7.3f} "
                f"{_fraction(cos > band):>8.2f} {_fraction(cos < -band):>9.2f} {S.size - cos.size:>5}"
            )
        return "\n".join(lines)


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _fraction(mask: Array) -> float:
    """The fraction of True entries of a boolean tensor or array."""
    return float(mask.sum()) / max(math.prod(mask.shape), 1)


def augmented_weights(weights: QKWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """[W | b] so that (W x + b) = [W | b] [x; 1]; a missing bias is a zero column."""
    import torch

    out = []
    for w, b in ((weights.w_q, weights.b_q), (weights.w_k, weights.b_k)):
        col = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device) if b is None else b
        out.append(torch.cat([w, col[..., None]], dim=-1))
    return out[0], out[1]


def _compute_layer_spectrum(site: AttentionSite, augmented: bool) -> LayerSpectrum:
    import torch

    weights = site.weights()
    if augmented:
        w_q, w_k = augmented_weights(weights)
    else:
        w_q, w_k = weights.w_q, weights.w_k
    u, s, v = factored_svd(w_q.double().cpu(), w_k.double().cpu())
    # kept in float32, or in float64 for float64 weights: their maps are float64, and vectors rounded to float32
    # made them float32-accurate (5e-8 off x·u_n, review r34)
    kept = torch.float64 if weights.w_q.dtype == torch.float64 else torch.float32
    # normal tensors also when computed in inference mode: their version counters tell the cache of a caller's edit
    with torch.inference_mode(False), torch.no_grad():
        u, s, v = (a.to(kept, copy=True) for a in (u, s, v))
    return LayerSpectrum(site.layer, u, s, v, augmented)


# Attention module -> (_copied_state of its weights, {augmented: (spectrum, its arrays as computed)}). Weak keys: a
# deleted model frees its entries (a spectrum holds no reference to its module).
_SPECTRUM_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[WeightsState, dict[bool, tuple[LayerSpectrum, tuple]]]]" = (
    weakref.WeakKeyDictionary()
)


_ARRAYS = ("U", "S", "V", "S_all", "cos_all")
"""A spectrum's arrays: what :func:`spectrum_copy` copies and :func:`unedited` watches."""


def spectrum_copy(spec: LayerSpectrum) -> LayerSpectrum:
    """``spec`` with arrays of its own (torch tensors cloned, outside inference mode so that their version counters
    count edits; numpy arrays copied, read-only): what a recording keeps and hands out, so that a caller editing the
    spectrum it was given (``S.div_(S.max())`` for a plot, a sign flipped) changes nothing the recording reports,
    writes or projects with."""
    import torch

    def own(a: Any) -> Any:
        if a is None:
            return None
        if isinstance(a, np.ndarray):
            a = np.array(a, copy=True)
            a.setflags(write=False)
            return a
        return a.detach().clone()

    with torch.inference_mode(False), torch.no_grad():
        return dataclasses.replace(spec, **{name: own(getattr(spec, name)) for name in _ARRAYS})


def edit_stamps(spec: LayerSpectrum) -> tuple:
    """What :func:`unedited` compares: each array of ``spec`` with its version counter (None for numpy: those
    :func:`spectrum_copy` makes are read-only), and its plain fields. The cache keeps them for the spectrum it hands
    out, and a recording for the copy it hands out: a caller that edits one in place (``S.div_(S.max())`` for a plot)
    or assigns another array changes nothing later recordings use."""
    return (tuple((a, getattr(a, "_version", None)) for a in (getattr(spec, n) for n in _ARRAYS)),
            (spec.layer, spec.augmented, spec.truncated))


def unedited(spec: LayerSpectrum, stamps: tuple) -> bool:
    """Whether ``spec`` still holds the arrays and fields :func:`edit_stamps` saw, none edited in place since (views
    such as ``top(k)``'s share their base's version counter, so their edits count too)."""
    arrays, fields = stamps
    return (all(getattr(spec, n) is a and getattr(a, "_version", None) == v for n, (a, v) in zip(_ARRAYS, arrays))
            and (spec.layer, spec.augmented, spec.truncated) == fields)


# Integer dtypes of each float size: weights compared as integers are compared bit for bit (a NaN equals itself).
_SAME_SIZE_INTS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
WeightsState = tuple  # (_weights_key or None, a copy of _qk_tensors or None): see weights_state, _copied_state


def _weights_key(site: AttentionSite) -> tuple | None:
    """Identity and version of every parameter behind the site's W_q/W_k (None: some keep no version counter).

    ``tensor._version`` counts in-place edits (``copy_``, ``load_state_dict``, optimiser steps); the data
    pointer, dtype, device and shape catch replaced tensors (``.to()``, ``param.data = ...``).
    """
    modules = site.qk_modules or (site.module,)
    try:  # every parameter of the modules and their submodules; _parameters directly: half of parameters()' ~5 us
        return tuple(
            (id(p), p.data_ptr(), p._version, p.dtype, p.device, p.shape)
            for m in modules for sub in m.modules() for p in sub._parameters.values() if p is not None
        )
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def _qk_tensors(site: AttentionSite) -> tuple[torch.Tensor, ...]:
    """W_q/W_k and their bias as the site reads them (``qk_linear``, detached): what spectra and modes are made of."""
    import torch

    with torch.no_grad():
        w, b = site.qk_linear()
    return (w.detach(),) if b is None else (w.detach(), b.detach())


@functools.cache
def _memcmp() -> Callable[[int, int, int], int] | None:
    """libc's ``memcmp`` (None where ctypes cannot find it: :func:`_same_bits` then compares with torch)."""
    try:
        memcmp = ctypes.CDLL("msvcrt" if sys.platform == "win32" else None).memcmp
    except (OSError, AttributeError):
        return None
    memcmp.restype, memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


def _same_bits(copy: tuple[torch.Tensor, ...], now: tuple[torch.Tensor, ...]) -> bool:
    """Whether two tuples of tensors hold the same bits (a NaN equals itself): libc's ``memcmp`` where both are
    contiguous on the CPU (ViT-S/B's W_q/W_k, one thread: ~0.6x numpy's compare, ~0.3x ``torch.equal``'s element
    loop), else ``torch.equal`` of same-size integer views on their device."""
    import torch

    if len(copy) != len(now):
        return False
    memcmp = _memcmp()
    for a, b in zip(copy, now):
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if memcmp is not None and a.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
            same = memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
        else:
            ints = getattr(torch, _SAME_SIZE_INTS[a.element_size()])
            same = torch.equal(a.view(ints), b.view(ints))
        if not same:
            return False
    return True


def weights_state(site: AttentionSite, cache_checked: bool = False) -> WeightsState:
    """What tells ``site``'s W_q/W_k apart, now: the identity and version of its parameters (:func:`_weights_key`,
    a few us) and a copy of the tensors it reads, on their device: the spectrum cache's copy where it holds these
    bits (shared, never edited; the usual case, as ``record()`` computes its modes through the cache), else a new one
    (memory: W_q/W_k and biases once more). A recording takes it when it computes its modes and checks it per batch.
    The copy is compared bit for bit (:func:`same_weights`) every batch, versioned weights too: an edit through
    ``param.data`` keeps ``_version`` (it gave maps off by O(10) on the q/k path without a word), and ``.data`` of an
    inference tensor (no version counter) can be edited outside inference mode too. The compare is exact and cheap
    (batch-8 forwards, one thread of the 2-core VM: ViT-S 2.0 ms a batch, ViT-B 5.5, ~0.15 % of the forward; on a GPU
    one device read for all layers). ``cache_checked``: :func:`layer_spectrum` of this site has just held the cache's
    copy against these weights (or made it), so the copy is taken without comparing it a second time (entering
    ``record()``)."""
    cached = _SPECTRUM_CACHE.get(site.module) if site.module is not None else None
    if cached is not None and (cache_checked or same_weights(cached[0], site)):
        return cached[0]
    return _copied_state(site, _weights_key(site))


def _copied_state(site: AttentionSite, key: tuple | None) -> WeightsState:
    """``key`` with a copy of the tensors ``site`` reads: the spectrum cache keeps one also for versioned weights, as
    an edit through ``param.data`` keeps ``_version``."""
    return key, tuple(t.clone() for t in _qk_tensors(site))


def same_weights(state: WeightsState, site: AttentionSite) -> bool:
    """Whether ``site``'s W_q/W_k are still the weights ``state`` (:func:`weights_state`) was taken of."""
    key, copy = state
    return _weights_key(site) == key and (copy is None or _same_bits(copy, _qk_tensors(site)))


# Attention module -> (its weights key, whether its cached copy holds the same bits): the verdicts of the
# cached_weights_checked block open in this thread, each taken (and dropped) by the next layer_spectrum of that module.
# Scoped to the block: a verdict outliving it (an entry that failed at an earlier layer) would answer a later spectrum
# for weights edited since through .data, which keeps the key.
_VERDICTS = threading.local()


def _compared_on_device(t: torch.Tensor) -> bool:
    """Whether a cached copy is compared on its device, every layer in one read (a GPU's); CPU copies take memcmp."""
    return t.device.type != "cpu"


@contextlib.contextmanager
def cached_weights_checked(sites: Sequence[AttentionSite],
                           live: Sequence[tuple[torch.Tensor, ...] | None] | None = None) -> Iterator[None]:
    """Within the block, ``layer_spectrum`` of these ``sites`` takes its cached-weights verdict from one comparison of
    the spectrum cache's copies of W_q/W_k with the weights now, for all ``sites`` together (:func:`weights_unchanged`:
    on a GPU one read of the device instead of one ``torch.equal`` a layer, each of which makes the host wait for every
    kernel queued: entering ``record()`` per batch stalled the forward of the batch before it once per layer). The
    verdicts are dropped when the block ends. ``live``: per site, its :func:`live_qk_tensors` taken just before (the
    recording keeps them for its per-batch check), compared in place instead of sliced off the weights again."""
    outer = getattr(_VERDICTS, "by_module", None)
    _VERDICTS.by_module = _cache_verdicts(sites, live)
    try:
        yield
    finally:
        _VERDICTS.by_module = outer


def _cache_verdicts(sites: Sequence[AttentionSite],
                    live: Sequence[tuple[torch.Tensor, ...] | None] | None = None) -> dict[Any, tuple[tuple | None, bool]]:
    """Module -> (its weights key, whether the cache's copy still holds its weights) for every cached site; a module
    with several sites gets none (each site reads its own tensors). ``live``: see :func:`cached_weights_checked`."""
    seen = collections.Counter(s.module for s in sites if s.module is not None)
    views = list(live) if live is not None else [None] * len(sites)
    chosen = [(_SPECTRUM_CACHE[s.module][0], s, view) for s, view in zip(sites, views, strict=True)
              if s.module is not None and seen[s.module] == 1 and s.module in _SPECTRUM_CACHE]
    pairs = [(state, site) for state, site, _ in chosen]
    same = weights_unchanged(pairs, [view for _, _, view in chosen])
    return {site.module: (state[0], verdict) for (state, site), verdict in zip(pairs, same)}


def weights_unchanged(pairs: Sequence[tuple[WeightsState, AttentionSite]],
                      live: Sequence[tuple[torch.Tensor, ...] | None] | None = None) -> list[bool]:
    """:func:`same_weights` of every (state, site) pair. ``live``: per pair, the site's tensors as views of its
    parameters (:func:`live_qk_tensors`), read in place instead of sliced again (None: read them). Copies on the CPU
    are compared with ``memcmp``; those on a GPU in a few fused operations for all pairs (one difference and one
    max-norm a tensor, each a single multi-tensor launch) and one read of the device: one compare a layer made the host
    wait for every kernel queued, once a layer, and launched some ten kernels a layer."""
    import torch

    out: list[bool] = []
    pending: list[tuple[int, int]] = []  # (pair, how many of the tensors below are its)
    copies: list[torch.Tensor] = []
    nows: list[torch.Tensor] = []
    for i, ((key, copy), site) in enumerate(pairs):
        same_key = _weights_key(site) == key
        if not same_key or copy is None:
            out.append(same_key)
            continue
        now = live[i] if live is not None and live[i] is not None else _qk_tensors(site)
        if len(now) != len(copy) or any(a.dtype != b.dtype or a.shape != b.shape or a.device != b.device
                                        or not _compared_on_device(a) for a, b in zip(copy, now)):
            out.append(_same_bits(copy, now))  # memcmp on the CPU (or a mismatch of shape or place)
            continue
        pending.append((len(out), len(copy)))
        copies.extend(copy)
        nows.extend(now)
        out.append(False)  # answered below
    if pending:
        # by value: a difference of exactly 0 everywhere (NaN or inf weights read as changed, -0.0 as 0.0)
        peaks = torch.stack(torch._foreach_norm(torch._foreach_sub(nows, copies), float("inf")))
        changed = (peaks != 0).tolist()  # the one read of the device
        at = 0
        for pair, count in pending:
            out[pair] = not any(changed[at:at + count])
            at += count
    return out


def live_qk_tensors(site: AttentionSite) -> tuple[torch.Tensor, ...] | None:
    """The W_q/W_k tensors ``site`` reads, where each is a view of one of its parameters' own memory (a slice of a
    fused qkv weight): they follow every in-place edit, through ``.data`` too, so a recording compares them with its
    copy each batch without reading (slicing) them again; None where one is computed (a concatenation, a product),
    which must be read anew each time."""
    modules = site.qk_modules or (site.module,)
    memory = {p.untyped_storage().data_ptr() for m in modules for sub in m.modules()
              for p in sub._parameters.values() if p is not None}
    tensors = _qk_tensors(site)
    return tensors if all(t.untyped_storage().data_ptr() in memory for t in tensors) else None


def _cached_still_valid(state: WeightsState, site: AttentionSite) -> bool:
    """:func:`same_weights` of the cache's state, answered by the open :func:`cached_weights_checked` where it has a
    verdict for this module and the weights key is still the one it was taken with."""
    verdicts = getattr(_VERDICTS, "by_module", None)
    checked = verdicts.pop(site.module, None) if verdicts and site.module is not None else None
    if checked is not None and checked[0] == state[0] and _weights_key(site) == checked[0]:
        return checked[1]
    return same_weights(state, site)


GIVEN_SPECTRUM_TOLERANCE = 1e-4
"""How far, relative to a head's largest singular value, a spectrum handed to ``record(spectrum=...)`` may be from
the site's own W_q^T W_k (float32 storage leaves ~1e-6; weights moved by a training step leave far more)."""


def is_cached_spectrum(site: AttentionSite, spec: LayerSpectrum) -> bool:
    """Whether ``spec`` is the spectrum cache's own for ``site``'s weights as they are now (its copy compared bit for
    bit): ``qkhooks.spectrum(model)`` handed back to ``record(spectrum=...)``, the usual case, costs no other check."""
    cached = _SPECTRUM_CACHE.get(site.module) if site.module is not None else None
    held = cached[1].get(spec.augmented) if cached is not None else None
    return (held is not None and held[0] is spec and unedited(spec, held[1])
            and _cached_still_valid(cached[0], site))  # type: ignore[index]


def foreign_spectrum(site: AttentionSite, spec: LayerSpectrum) -> str | None:
    """Why ``spec`` is not the spectrum of ``site``'s weights as they are now (None when it is), without an SVD.

    For a spectrum the cache did not vouch for (:func:`is_cached_spectrum`): a run file's, one computed before a
    training step or from another model. It must satisfy, per head, with M = W_q^T W_k (augmented: [W | b]):
    orthonormal U and V, U^T M V = diag(S), and where it keeps every mode's sigma (``S_all``) the sum of their
    squares = ||M||_F^2 with S its leading values: a few small products a layer (d x K per head, float64)."""
    import torch

    weights = site.weights()
    w_q, w_k = augmented_weights(weights) if spec.augmented else (weights.w_q, weights.w_k)
    w_q, w_k = w_q.detach().double().cpu(), w_k.detach().double().cpu()
    U, S, V = (torch.as_tensor(np.asarray(a)).double() for a in (spec.U, spec.S, spec.V))
    if U.shape[:2] != (w_q.shape[0], w_q.shape[-1]) or V.shape != U.shape or S.shape != U.shape[::2]:
        return (f"its U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)} do not fit the layer's "
                f"{w_q.shape[0]} heads of d={w_q.shape[-1]}")
    scale = S.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)  # (H, 1)
    eye = torch.eye(U.shape[-1], dtype=torch.float64)
    off = torch.stack([(U.transpose(-1, -2) @ U - eye).abs().amax(), (V.transpose(-1, -2) @ V - eye).abs().amax()])
    if float(off.max()) > GIVEN_SPECTRUM_TOLERANCE:
        return f"its singular vectors are not orthonormal (off by {float(off.max()):.3g})"
    product = (w_q @ U).transpose(-1, -2) @ (w_k @ V)  # U^T M V, (H, K, K)
    residual = ((product - torch.diag_embed(S)).abs().amax((-1, -2)) / scale[:, 0]).max()
    if float(residual) > GIVEN_SPECTRUM_TOLERANCE:
        return f"U^T (W_q^T W_k) V differs from diag(S) by {float(residual):.3g} of the head's largest sigma"
    if spec.S_all is not None:
        S_all = torch.as_tensor(np.asarray(spec.S_all)).double()
        frobenius = torch.einsum("hij,hji->h", w_q @ w_q.transpose(-1, -2), w_k @ w_k.transpose(-1, -2))  # ||M||_F^2
        gap = ((S_all.square().sum(-1) - frobenius).abs() / scale[:, 0].square()).max()
        lead = ((S_all[:, :S.shape[-1]] - S).abs() / scale).max() if S_all.shape[-1] >= S.shape[-1] else math.inf
        if float(gap) > GIVEN_SPECTRUM_TOLERANCE or float(lead) > GIVEN_SPECTRUM_TOLERANCE:
            return "its sigmas (S_all) are not those of W_q^T W_k"
    return None


def layer_spectrum(site: AttentionSite, augmented: bool = False) -> LayerSpectrum:
    """Spectrum of one site: float64 SVD, stored as float32 on the CPU.

    Computed once per set of weights: cached per attention module and reused while :func:`same_weights` holds
    (identity, version and a bit-for-bit copy of W_q/W_k, also for weights made in inference mode), so ``record()``
    entered per batch does no SVD. The returned spectrum is shared with the cache; one its caller has edited (in
    place or by assigning an array) is left to the caller and computed again here.
    """
    module = site.module
    if module is None:
        return _compute_layer_spectrum(site, augmented)
    entry = _SPECTRUM_CACHE.get(module)
    if entry is None or not _cached_still_valid(entry[0], site):
        entry = _SPECTRUM_CACHE[module] = (_copied_state(site, _weights_key(site)), {})
    held = entry[1].get(augmented)
    if held is None or held[0].layer != site.layer or not unedited(*held):
        spec = _compute_layer_spectrum(site, augmented)
        held = entry[1][augmented] = (spec, edit_stamps(spec))
    return held[0]


def spectrum(
    model: str | nn.Module | LoadedModel | Sequence[AttentionSite],
    layers: str | Sequence[int | str] | None = None,
    augmented: bool = False,
    name: str = "",
) -> QKSpectrum:
    """Query-key spectrum of every head of every (chosen) layer.

    Args:
        model: a supported model (or the :class:`LoadedModel` from :func:`load_model`), its sites from
            :func:`qkhooks.sites`, or a model spec as ``qkhooks spectrum`` takes it (``"timm:vit_small_patch16_224"``,
            ``"...@random"``), loaded on the CPU with :func:`load_model`.
        layers: block indices or attention module paths to keep, or a string such as "0,5-7,-1" (None: all).
        augmented: fold the biases in through x -> [x; 1] (default: the papers' bias-free form, Linear
            weights only, no 1/sqrt(d_k), no LayerNorm affine).
        name: a label for reports (defaults to the model's class name).
    """
    from torch import nn

    from qkhooks.models import sites as find_sites
    from qkhooks.models.base import select_layers
    from qkhooks.models.load import load_model, unwrap_loaded
    from qkhooks.models.unsupported import refuse_altered_qk

    if isinstance(model, str):  # a spec, as the command line takes it
        model = load_model(model, for_images=False)  # the weights alone: no image processor config needed
        name = name or model.spec
    model = unwrap_loaded(model)
    if isinstance(model, nn.Module):
        found = find_sites(model, layers)
        name = name or getattr(model, "qkhooks_spec", "") or type(model).__name__
    else:
        found = select_layers(list(model), layers)
    refuse_altered_qk(found)  # a tensor-subclass weight, like a hook or a patched forward, makes it another model's
    return QKSpectrum([layer_spectrum(site, augmented) for site in found], name)
