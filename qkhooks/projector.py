"""Project captured tokens onto the query-key modes, on the tokens' own device, in one matmul per layer.

The query map of mode n is x·u_n over tokens, the key map x·v_n. We stack [U_K | V_K] of all heads into a
single (d, 2·H·K) matrix so one GEMM serves every head and both sides; the matrix is moved to the tokens'
device and dtype once and cached.

A second path (DESIGN.md) starts from q and k when they are already computed: u_n lies in the row space of W_q, so
x·u_n = (q - b_q)·a_n with a_n the solution of W_q^T a_n = u_n (a_n = W_k v_n / sigma_n in exact arithmetic), and
x·v_n = (k - b_k)·c_n with W_k^T c_n = v_n; it costs a d_k x K matmul per head instead of d x K. ``benchmarks/``
times both; :class:`ModeProjector` uses the x path, which needs nothing the model has not already given us and is
exact for every mode (also sigma_n = 0).

The q/k path is exact in exact arithmetic only: the model's q carries its own float rounding, and the product with
a_n magnifies it by up to kappa_n = ||a_n|| (||W_q||_2 + ||b_q|| / sqrt(d)) relative to the x path's rounding
(:func:`qk_path_amplification`). :func:`qk_path_check` is the one rule that decides, per layer, whether the q/k path
gives the x path's maps to float rounding (every kept mode's kappa below :data:`QK_PATH_MAX_AMPLIFICATION`), for
q and k in float32 or float64; ``capture`` takes the x path for every other layer, and for any batch whose q or k
comes out in less (bfloat16 or float16 rounding times kappa >= 1 is more than the x path's error at that dtype).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange

from qkhooks.models.base import QKWeights
from qkhooks.sdpa import autocast_off
from qkhooks.spectrum import LayerSpectrum

__all__ = ["ModeProjector", "QKPathProjector", "QK_PATH_MAX_AMPLIFICATION", "qk_path_amplification", "qk_path_fits",
           "qk_path_check", "qk_path_vectors", "QKPathCheck", "QKPathSolution"]

#: The largest error amplification kappa (:func:`qk_path_amplification`) of any kept mode, on either side, for which
#: a layer's maps are taken from the model's own q and k. Measured (``benchmarks/round18_qkpath_precision.py``, on
#: DINOv2-S/14, whose biases are about as large as W_q x, and on ill-conditioned synthetic heads): a mode's float32
#: map is within about 4·eps32·kappa (2.4e-7·kappa) of its float64 reference relative to the map's largest entry, so
#: kappa <= 32 keeps every map within ~1e-5, about 10x the x path's own rounding (~1e-6 on DINOv2-S); DINOv2-S modes
#: with kappa in 64..128 were off by up to 3.6e-5, kappa ~ 1e3 by 2e-4. Random-init ViTs have kappa <= cond(W_q) ~ 2.
QK_PATH_MAX_AMPLIFICATION = 32.0

#: How far (2-norm) W_q^T a_n may be from u_n (a unit vector) for a_n to stand for u_n: u_n is stored in float32, so
#: about 3e-8 is its own rounding; more means u_n is not in W_q's row space (a spectrum of other weights, a
#: rank-deficient W_q) and the q/k path would give another vector's maps.
QK_PATH_MAX_RESIDUAL = 1e-6


class QKPathCheck(NamedTuple):
    """What :func:`qk_path_check` found for one layer: ``fits`` (the verdict), ``amplification`` (2, H, K) kappa of the
    query and key maps, ``residual`` (2, H, K) ||W_q^T a_n - u_n|| and ||W_k^T c_n - v_n||, and the vectors a, c
    (H, d_k, K) float64 on the CPU, handed to :class:`QKPathProjector` so that they are solved once."""

    fits: bool
    amplification: torch.Tensor
    residual: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor


class _SideSolution:
    """One side of a layer's q/k path, solved once for every mode of its spectrum (:class:`QKPathSolution`).

    Normal equations (W W^T) a = W u with one step of refinement (residual 1e-16 at cond W ~ 1e3): BLAS products
    and a d_k x d_k Cholesky, 2x cheaper than a column-pivoted QR (gelsy) on one thread and ~30x on two busy cores
    (LAPACK's threads on d x d_k panels). Where the Cholesky fails (W rank-deficient, d_k > d) or the refined residual
    of a kept mode is not float rounding, least squares with gelsy for the kept modes (W = 0 gives a = 0), solved only
    where some mode needs it. Each mode's column is solved on its own, so the leading k of the whole solution are the
    solution of the leading k modes (:meth:`top`). Only the (H, d_k, K) vectors and (H, K) residuals are kept: a
    recording caches this per layer for the model's lifetime."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, modes, dim: int):
        w = w.detach().double().cpu()
        wt, target = w.transpose(1, 2), torch.as_tensor(modes).double().cpu()  # (H, d, d_k), (H, d, K)
        gram = w @ wt
        factor, info = torch.linalg.cholesky_ex(gram)
        # (vectors (H, d_k, K), residual (H, K)) of the normal equations, and of least squares where needed
        self._normal: tuple[torch.Tensor, torch.Tensor] | None = None
        self._least_squares: tuple[torch.Tensor, torch.Tensor] | None = None
        if not bool(info.any()):
            vectors = torch.cholesky_solve(w @ target, factor)
            vectors = vectors + torch.cholesky_solve(w @ (target - wt @ vectors), factor)
            self._normal = vectors, (wt @ vectors - target).norm(dim=1)
        if self._normal is None or not bool((self._normal[1] <= QK_PATH_MAX_RESIDUAL).all()):
            vectors = torch.linalg.lstsq(wt, target, driver="gelsy").solution
            self._least_squares = vectors, (wt @ vectors - target).norm(dim=1)
        self._gain = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()  # ||W||_2, from the Gram matrix formed
        if b is not None:
            self._gain = self._gain + b.detach().double().cpu().norm(dim=-1) / dim ** 0.5

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors (H, d_k, k), residual (H, k), amplification (H, k)) of the leading ``k`` modes, float64 CPU: the
        normal equations' where every head's residual of those modes is float rounding, else least squares'."""
        normal = self._normal
        if normal is not None and bool((normal[1][:, :k] <= QK_PATH_MAX_RESIDUAL).all()):
            vectors, residual = (x[..., :k] for x in normal)
        else:
            assert self._least_squares is not None  # solved where any mode's normal residual is not rounding
            vectors, residual = (x[..., :k] for x in self._least_squares)
        return vectors, residual, vectors.norm(dim=1) * self._gain[:, None]


class QKPathSolution:
    """The q/k path's a_n and c_n of every mode of one layer's spectrum and weights, solved once: :meth:`check`
    gives the verdict for the leading k modes (a recording's ``modes=k``) from the same solution, sliced, so a layer
    recorded with several k is solved once (``capture`` keeps one per layer and weights)."""

    def __init__(self, spectrum: LayerSpectrum, weights: QKWeights):
        self.spectrum, self.weights = spectrum, weights
        self._sides = [_SideSolution(w, b, modes, spectrum.dim)
                       for w, b, modes in ((weights.w_q, weights.b_q, spectrum.U), (weights.w_k, weights.b_k, spectrum.V))]

    def check(self, modes: int | None = None, bound: float = QK_PATH_MAX_AMPLIFICATION) -> QKPathCheck:
        """:func:`qk_path_check` of the leading ``modes`` (None: all) of the spectrum."""
        k = self.spectrum.num_modes if modes is None else min(int(modes), self.spectrum.num_modes)
        (a, res_q, amp_q), (c, res_k, amp_k) = (side.top(k) for side in self._sides)
        amplification, residual = torch.stack([amp_q, amp_k]), torch.stack([res_q, res_k])
        fits = (not self.spectrum.augmented and bool((torch.as_tensor(self.spectrum.S)[:, :k] > 0).all())
                and bool((residual <= QK_PATH_MAX_RESIDUAL).all()) and bool((amplification < bound).all()))
        return QKPathCheck(fits, amplification, residual, a, c)


def qk_path_vectors(spectrum: LayerSpectrum, weights: QKWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """a_n and c_n, each (H, d_k, K) float64 on the CPU: the (least-squares) solutions of W_q^T a_n = u_n and
    W_k^T c_n = v_n, so that (q - b_q)·a_n = x·u_n and (k - b_k)·c_n = x·v_n.

    Solved from u_n itself, not formed as W_k v_n / sigma_n: that form also multiplies v_n's float32 rounding by up to
    ||W_k|| / sigma_n (on DINOv2-S layer 2 its maps were 7x further off). Where u_n is not in W_q's row space (W_q
    rank-deficient, a spectrum of other weights) the least-squares a_n gives another vector's maps, which
    :func:`qk_path_check` catches."""
    check = QKPathSolution(spectrum, weights).check()
    return check.a, check.c


def qk_path_amplification(spectrum: LayerSpectrum, weights: QKWeights) -> torch.Tensor:
    """(2, H, K) float64: how much the q/k path magnifies the model's float rounding of q (row 0) and k (row 1)
    relative to the x path's, per head and mode: kappa_n = ||a_n|| (||W_q^h||_2 + ||b_q^h|| / sqrt(d)) for the
    query map, ||c_n|| (||W_k^h||_2 + ||b_k^h|| / sqrt(d)) for the key map (no bias: the second term is 0).

    Why: the model's q = W_q x + b_q carries an error of about eps·(||W_q|| ||x|| + ||b_q||) and the query map
    (q - b_q)·a_n multiplies it by ||a_n||, while x·u_n (||u_n|| = 1) errs by about eps·||x||. sqrt(d) is the norm of
    a LayerNorm'd token (unit gain), the input the q/k path serves. a_n is the unique solution of W_q^T a = u_n, so
    ||a_n|| >= 1 / ||W_q||_2 and kappa_n >= 1; kappa_n <= cond(W_q^h) (more with a bias), which is small for random
    weights and large where W_q^h is ill-conditioned and u_n leans on its weak directions. Bias-free, kappa_n is
    ||a_n|| ||W_q^h||_2."""
    return QKPathSolution(spectrum, weights).check().amplification


def qk_path_check(spectrum: LayerSpectrum, weights: QKWeights, bound: float = QK_PATH_MAX_AMPLIFICATION) -> QKPathCheck:
    """Whether a layer's maps may be taken from the model's own q and k (:class:`QKPathProjector`) rather than from
    x (:class:`ModeProjector`): the one rule ``capture`` applies (:func:`qk_path_fits` gives the verdict alone).

    Fits when the spectrum is the bias-free one, every kept sigma_n > 0, every kept u_n (v_n) lies in W_q's (W_k's)
    row space to float32 rounding (:data:`QK_PATH_MAX_RESIDUAL`), and every kept mode's error amplification
    (:func:`qk_path_amplification`, both sides, every head) is below ``bound``. The last is why: the q/k path is a
    speed optimisation that must give the x path's maps to float rounding, and its error is about kappa_n times the
    x path's. It replaces a rule on sigma_n / sigma_max (> 1e-7), which let through maps off by O(1): the error grows
    with W_q's conditioning along u_n, not with sigma_n (a tiny sigma_n needs an ill-conditioned W_q or W_k, since
    sigma_n / sigma_1 >= 1 / (cond W_q · cond W_k), but not the other way round). A NaN (a failed solve) fails."""
    return QKPathSolution(spectrum, weights).check(bound=bound)


def qk_path_fits(spectrum: LayerSpectrum, weights: QKWeights, bound: float = QK_PATH_MAX_AMPLIFICATION) -> bool:
    """:func:`qk_path_check`'s verdict: whether the q/k path gives this layer's maps to float rounding."""
    return qk_path_check(spectrum, weights, bound).fits


class ModeProjector:
    """Maps tokens (B, N, d) of one layer to query and key maps (B, H, K, N).

    Args:
        spectrum: the layer's (possibly truncated) spectrum. With an augmented spectrum the constant
            coordinate's contribution is added, so maps equal [x; 1]·u_n.
    """

    def __init__(self, spectrum: LayerSpectrum):
        self.spectrum = spectrum
        # columns ordered (side, head, mode); built once, so einops' per-call cost (~10 us) does not matter here
        self._stacked = rearrange([torch.as_tensor(spectrum.U), torch.as_tensor(spectrum.V)], "s h d k -> d (s h k)")
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """(heads, modes)."""
        return self.spectrum.num_heads, self.spectrum.num_modes

    def _weights(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (device, dtype)
        if key not in self._cache:
            w = self._stacked.to(device=device, dtype=dtype)
            if self.spectrum.augmented:
                self._cache[key] = (w[:-1].contiguous(), w[-1].contiguous())
            else:
                self._cache[key] = (w.contiguous(), None)
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key maps, each (B, H, K, N), in x's dtype and device."""
        w, bias = self._weights(x.device, x.dtype)
        b, n, _ = x.shape
        h, k = self.shape
        with autocast_off(x.device):  # a caller's autocast would round the float32 product to bfloat16 (~1e-2 off)
            out = x @ w if bias is None else torch.addmm(bias, x.reshape(b * n, -1), w).view(b, n, -1)
        # "b n (s h k) -> s b h k n" by hand: this runs per batch and layer, where einops costs ~10 us a call
        out = out.view(b, n, 2, h, k).permute(2, 0, 3, 4, 1)
        return out[0], out[1]


def _product_layout(heads: torch.Tensor, modes: int) -> str:
    """Which shape of product computes the q/k path's maps fastest where they run (see ``QKPathProjector._maps``):
    "tokens" (tokens-major), "images" (one product per image) or "batched" (one product over the batch, also where
    autograd records a graph through the heads: the CPU products write with ``out=``, which records none)."""
    if heads.device.type != "cpu" or (torch.is_grad_enabled() and heads.requires_grad):
        return "batched"
    return "tokens" if 4 * modes <= heads.shape[-1] else "images"


class QKPathProjector:
    """The same maps computed from q and k (B, H, N, d_k) instead of x: a d_k x K matmul per head.

    Only for the bias-free spectrum. The maps are x·u_n exactly only where u_n lies in W_q's row space, and equal
    the x path's to float rounding only where the error amplification is small: :func:`qk_path_check` says whether
    both hold (``capture`` builds this projector only then). Elsewhere a_n is the least-squares solution (W_q = 0:
    zero maps). ``vectors``: (a, c) from :func:`qk_path_vectors` or :func:`qk_path_check`, solved here when not
    given.
    """

    def __init__(self, spectrum: LayerSpectrum, weights: QKWeights,
                 vectors: tuple[torch.Tensor, torch.Tensor] | None = None):
        if spectrum.augmented:
            raise ValueError("the q/k path needs the bias-free spectrum")
        # W_q^T a_n = u_n, W_k^T c_n = v_n  (H, d_k, K) each; given by qk_path_check when it has solved them
        a, c = vectors if vectors is not None else qk_path_vectors(spectrum, weights)
        # The one representation kept: both sides stacked and transposed for one product, rows (side, head), each
        # (K, d_k). (q - b_q) @ a = q @ a - b_q @ a: the biases fold into (2H, K, 1) offsets, so no (B, H, N, d_k)
        # temporary; None when the model has neither bias.
        self._stacked = torch.cat([a, c]).transpose(1, 2)
        offsets = [None if b is None else b.double().cpu()[:, None, :] @ m for b, m in ((weights.b_q, a), (weights.b_k, c))]
        self._offsets = None if all(o is None for o in offsets) else torch.cat(
            [torch.zeros(a.shape[0], 1, a.shape[2], dtype=torch.float64) if o is None else o for o in offsets]).transpose(1, 2)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def _dims(self) -> tuple[int, int, int]:
        """(heads, d_k, modes), read off the stacked weights."""
        sides_heads, modes, head_dim = self._stacked.shape
        return sides_heads // 2, head_dim, modes

    def _weights(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self._stacked.to(device=device, dtype=dtype).contiguous(),
                                None if self._offsets is None else self._offsets.to(device=device, dtype=dtype))
        return self._cache[key]

    def _maps(self, heads: torch.Tensor, sides: slice) -> torch.Tensor:
        """(B, N, S·H, d_k) q and/or k heads (any strides) -> (S, B, H, K, N) maps, S = the sides taken.

        The products read the Linear's output in place (a strided view, no copy of q or k). Which shape of product
        is fastest depends on where it runs (``benchmarks/round14_projection.py``): on the CPU the product is
        memory-bound, since the model's qkv Linear has pushed q and k out of the cache by now, so

        - with few modes per head (K <= d_k / 4), one (B·N, d_k) @ (d_k, K) product per side and head reads q and k
          row by row, and a transposing pass writes the (B, H, K, N) maps (18-26 % faster than the general way);
        - with more, one (K, d_k) @ (d_k, N) product per image and (side, head) writes each image's maps in place
          (20-38 % faster with all modes). The two sides of a fused qkv then share each image's block, so a side's
          (B, H, K, N) maps are a view, each image's (H, K, N) block contiguous;
        - elsewhere (an accelerator, where a Python loop over images costs a kernel launch each), and where autograd
          records a graph through q and k (the CPU products write with ``out=``, which records none), one
          (K, d_k) @ (d_k, B·N) product per side and head, then one pass into per-image (B, H, K, N) maps.

        Each map entry is the same d_k-long dot product whatever B, so an image's maps do not depend on the batch it
        came in (a sharded run equals a single-process one; tested).
        """
        weights, offsets = self._weights(heads.device, heads.dtype)
        if sides != slice(None):  # a fused qkv takes both sides: no slicing (on a GPU each op costs the host ~5 us)
            weights, offsets = weights[sides], None if offsets is None else offsets[sides]
        b, n, sh, dk = heads.shape
        h, modes = self._dims[0], weights.shape[1]
        tokens, layout = heads.reshape(b * n, sh, dk), _product_layout(heads, modes)
        if layout == "tokens":
            product = torch.bmm(tokens.transpose(0, 1), weights.transpose(1, 2))  # (S·H, B·N, K)
            maps = product.view(-1, h, b, n, modes).permute(0, 2, 1, 4, 3)
            if offsets is None:
                return maps.contiguous()
            # the transposing pass, the offsets subtracted on the way (into a contiguous block: an elementwise op's
            # own output would keep the permuted strides)
            return torch.sub(maps, offsets.view(-1, 1, h, modes, 1), out=heads.new_empty(maps.shape))
        if layout == "images":
            out = heads.new_empty(b, sh, modes, n)
            for image in range(b):
                if offsets is None:
                    torch.bmm(weights, heads[image].permute(1, 2, 0), out=out[image])
                else:  # the offsets subtracted while the image's block is in the cache, not in a pass over all maps
                    torch.baddbmm(offsets, weights, heads[image].permute(1, 2, 0), beta=-1, out=out[image])
            return out.view(b, -1, h, modes, n).transpose(0, 1)
        out = torch.bmm(weights, tokens.permute(1, 2, 0))  # (S·H, K, B·N)
        if offsets is not None:
            out = out.sub_(offsets)
        # Contiguous (B, H, K, N) maps: every consumer reduces or copies them along the token axis (top-k extremes
        # and row picks, the float16 cast and the run file's write), which with the tokens strided costs a copy each.
        return out.view(-1, h, modes, b, n).permute(0, 3, 1, 2, 4).contiguous()

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key maps (B, H, K, N) from q, k (B, H, N, d_k) with biases included."""
        return self._split(q.transpose(1, 2), k.transpose(1, 2))

    def from_linear(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from the q and k Linear outputs as the model produced them: (B, N, H·d_k) each."""
        h, dk, _ = self._dims
        return self._split(q.unflatten(-1, (h, dk)), k.unflatten(-1, (h, dk)))

    def from_fused(self, qk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from one Linear's output whose first 2·H·d_k features are q then k (a fused qkv): one product
        for both sides."""
        h, dk, _ = self._dims
        if qk.shape[-1] != 2 * h * dk:  # v too (a fused qkv's whole output)
            qk = qk[..., :2 * h * dk]
        with autocast_off(qk.device):  # maps in q's dtype, as the x path's (ModeProjector)
            query, key = self._maps(qk.unflatten(-1, (2 * h, dk)), slice(None)).unbind(0)
        return query, key

    def _split(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k heads (B, N, H, d_k) held apart: one product per side."""
        h = self._dims[0]
        with autocast_off(q.device):
            return self._maps(q, slice(0, h))[0], self._maps(k, slice(h, 2 * h))[0]
