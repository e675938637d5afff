"""Project captured tokens onto the query-key modes, on the tokens' own device, in one matmul per layer.

The query map of mode n is x·u_n over tokens, the key map x·v_n. We stack [U_K | V_K] of all heads into a
single (d, 2·H·K) matrix so one GEMM serves every head and both sides; the matrix is moved to the tokens'
device and dtype once and cached.

A second path (DESIGN.md) starts from q and k when they are already computed: x·u_n = (q - b_q)·a_n with
a_n = W_k v_n / sigma_n, and x·v_n = (k - b_k)·c_n with c_n = W_q u_n / sigma_n; it costs a d_k x K matmul
per head instead of d x K. ``benchmarks/`` times both; :class:`ModeProjector` uses the x path, which needs
nothing the model has not already given us and is exact for every mode (also sigma_n = 0).
"""

from __future__ import annotations

import torch
from einops import rearrange

from qkhooks.models.base import QKWeights
from qkhooks.spectrum import LayerSpectrum

__all__ = ["ModeProjector", "QKPathProjector"]


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

    Only valid for the bias-free spectrum and modes with sigma_n > 0 (others give zero maps here).
    """

    def __init__(self, spectrum: LayerSpectrum, weights: QKWeights):
        if spectrum.augmented:
            raise ValueError("the q/k path needs the bias-free spectrum")
        s = spectrum.S.double()
        inv = torch.where(s > s.max() * 1e-7, 1.0 / s, torch.zeros_like(s))
        # a_n = W_k v_n / sigma_n  (H, d_k, K);  c_n = W_q u_n / sigma_n.
        a = (weights.w_k.double().cpu() @ spectrum.V.double()) * inv[:, None, :]
        c = (weights.w_q.double().cpu() @ spectrum.U.double()) * inv[:, None, :]
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
                torch.bmm(weights, heads[image].permute(1, 2, 0), out=out[image])
            if offsets is not None:
                out.sub_(offsets)
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
        maps = self._maps(qk[..., :2 * h * dk].unflatten(-1, (2 * h, dk)), slice(None))
        return maps[0], maps[1]

    def _split(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k heads (B, N, H, d_k) held apart: one product per side."""
        h = self._dims[0]
        return self._maps(q, slice(0, h))[0], self._maps(k, slice(h, 2 * h))[0]
