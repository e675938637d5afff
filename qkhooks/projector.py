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
        self.a = (weights.w_k.double().cpu() @ spectrum.V.double()) * inv[:, None, :]
        self.c = (weights.w_q.double().cpu() @ spectrum.U.double()) * inv[:, None, :]
        # (q - b_q) @ a = q @ a - b_q @ a: the biases fold into (H, 1, K) offsets, so no (B, H, N, d_k) temporary
        self.q_offset = None if weights.b_q is None else weights.b_q.double().cpu()[:, None, :] @ self.a
        self.k_offset = None if weights.b_k is None else weights.b_k.double().cpu()[:, None, :] @ self.c
        self._cache: dict[tuple[torch.device, torch.dtype], tuple] = {}

    def _weights(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        if key not in self._cache:
            conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            self._cache[key] = (conv(self.a), conv(self.c), conv(self.q_offset), conv(self.k_offset))
        return self._cache[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key maps (B, H, K, N) from q, k (B, H, N, d_k) with biases included."""
        a, c, q_offset, k_offset = self._weights(q.device, q.dtype)
        # One (N, d_k) @ (d_k, K) product per image and head: the same kernel whatever the batch size, so an
        # image's maps do not depend on the batch it came in (a sharded run equals a single-process one).
        query, key = q @ a, k @ c
        if q_offset is not None:
            query = query.sub_(q_offset)
        if k_offset is not None:
            key = key.sub_(k_offset)
        # Contiguous (B, H, K, N) maps: every consumer reduces or copies them along the token axis (top-k extremes
        # and row picks, the float16 cast and the run file's write), which on a transposed view costs a strided
        # copy each; one copy here serves them all.
        return query.transpose(-1, -2).contiguous(), key.transpose(-1, -2).contiguous()

    def from_linear(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from the q and k Linear outputs as the model produced them: (B, N, H·d_k) each."""
        h, dk = self.a.shape[0], self.a.shape[1]
        # "b n (h d) -> b h n d" by hand: per batch and layer (see ModeProjector.__call__)
        return self(q.unflatten(-1, (h, dk)).transpose(1, 2), k.unflatten(-1, (h, dk)).transpose(1, 2))
