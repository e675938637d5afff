"""Streaming statistics of the Bi-orthogonal Factor Decomposition (METHODS B): two passes, mergeable states.

Pass 1 (:class:`PositionMeans`) streams the per-position mean P[p] = mean_i X[i, p] of the tokens entering
W_q/W_k. Pass 2 (:class:`BFDEnergies`, :class:`PositionDecoding`) streams, with P fixed, everything the
energies and the isolation checks need. Nothing of size N x N is formed and memory does not grow with the
number of images.

Why the energies are cheap. Every head's bias-free form is M = W_q^T W_k = U diag(s) V^T (all d_k modes, so
exact). For token matrices A, B (N x d) let a = A U and b = B V (N x K, the query and key maps). Then
A M B^T = a diag(s) b^T and

    ||A M B^T||_F^2 = sum_{n,m} s_n s_m (a^T a)[n, m] (b^T b)[n, m],

so every Frobenius energy is an inner product of two K x K Gram matrices of the maps (K = d_k). Terms with
P on one side are linear in the other side's Gram (P is fixed), so only the image-sums of the content Grams,
the per-image CC and total energies and two per-mode products need streaming.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qkhooks._devices import to_device
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, find_sites, select_layers
from qkhooks.reducers import Reducer, TakenParts
from qkhooks.spectrum import LayerSpectrum, factored_svd

__all__ = ["PositionMeans", "BFDEnergies", "PositionDecoding", "full_modes", "patch_targets", "layer_state",
           "is_held_out"]


def full_modes(model: nn.Module | Sequence[AttentionSite], layers: Sequence[int] | None = None) -> list[LayerSpectrum]:
    """All d_k bias-free modes of every head (M = W_q^T W_k = U diag(S) V^T exactly), float64 on the CPU.

    Float64 because the interference is a difference of nearly equal energies; the spectra a recording
    stores are float32 and possibly truncated.
    """
    sites = find_sites(model, layers) if isinstance(model, nn.Module) else select_layers(list(model), layers)
    out = []
    for site in sites:
        w = site.weights()
        u, s, v = factored_svd(w.w_q.double().cpu(), w.w_k.double().cpu())
        out.append(LayerSpectrum(site.layer, u, s, v))
    return out


def patch_targets(grid: tuple[int, int]) -> np.ndarray:
    """(rows * cols, 2) float64 (row, column) of every patch token in raster order: the decoding targets."""
    rows, cols = grid
    index = np.arange(rows * cols)
    return np.stack([index // cols, index % cols], axis=1).astype(np.float64)


def is_held_out(image_id: str, holdout_every: int) -> bool:
    """Whether the position probes test on this image: the first 8 bytes of sha256(id), big-endian, are 0 modulo
    ``holdout_every`` (so one image in ``holdout_every`` is held out on average).

    A function of the image's id alone (ids are unique within a run), so batching, sharding, resuming and
    unreadable images elsewhere in the dataset never move an image between the splits.
    """
    digest = hashlib.sha256(str(image_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % int(holdout_every) == 0


def layer_state(state: Mapping[str, Any], layer: int) -> dict[str, np.ndarray]:
    """The arrays of one layer of a BFD reducer state, keyed without their ``L{layer}.`` prefix."""
    prefix = f"L{layer}."
    return {key[len(prefix):]: np.asarray(value) for key, value in state.items() if key.startswith(prefix)}


def batch_grid(batch: BatchCapture, layer: int) -> tuple[int, int] | None:
    """The patch grid ``layer``'s tokens had in ``batch``, as the recording read it (None: not read, e.g. a batch
    built by hand)."""
    geometry = batch.meta.get("geometry", {}).get(layer)
    grid = getattr(geometry, "grid", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


def _check_grids(grids: Mapping[int, tuple[int, int]], found: Mapping[int, tuple[int, int] | None], who: str) -> None:
    """Refuse grids ``found`` (layer -> grid) other than those already seen: two grids of the same token count (3x5
    and 5x3 images) give tokens of one shape whose positions are different places of the image."""
    for layer, grid in found.items():
        seen = grids.get(layer)
        if grid is not None and seen is not None and grid != seen:
            raise QKHooksError(
                f"layer {layer}: these tokens lie on a {grid[0]}x{grid[1]} patch grid, the earlier ones on "
                f"{seen[0]}x{seen[1]}; {who} compares tokens position by position, so it needs one grid (one input "
                "size) for the whole dataset: resize the images to one size, or record each size on its own.")


def _grid_state(grids: Mapping[int, tuple[int, int]]) -> dict[str, np.ndarray]:
    return {f"L{layer}.grid": np.asarray(grid, dtype=np.int64) for layer, grid in grids.items()}


def _grids_of(state: Mapping[str, Any], layers: Sequence[int]) -> dict[int, tuple[int, int]]:
    """The grids a state saved (states of an older qkhooks saved none: unknown)."""
    return {l: tuple(int(g) for g in np.asarray(state[f"L{l}.grid"]).reshape(-1)) for l in layers
            if f"L{l}.grid" in state}


def _state_layers(state: Mapping[str, Any]) -> list[int]:
    return [int(v) for v in np.asarray(state["layers"]).reshape(-1)]


def _one_sequence_an_image(batch: BatchCapture, layers: Mapping[int, int], who: str) -> None:
    """Refuse a batch where some layer's attention took another number of token sequences than the batch has
    images (``layers``: layer -> sequences): a windowed layer's (B·nW, Nw, d) windows or a layer's groups of tokens
    along the batch axis. BFD decomposes each image's one sequence of tokens position by position; summed as images,
    windows gave "position means" nW times the mean window, without a word."""
    for layer, rows in layers.items():
        images = batch.captures[layer].batch_size
        if rows != images:
            raise QKHooksError(
                f"layer {layer}: its attention took {rows} token sequences for {images} images (windows or groups of "
                f"tokens along the batch axis), and {who} decomposes each image's one sequence of tokens, position by "
                "position; leave the layer out (layers=[...]), as qkhooks bfd does.")


def _part_and_rows(taken: Mapping[int, Any], layer: int, cap: LayerCapture, who: str,
                   fold: Any = lambda tokens: tokens) -> tuple[Any, int]:
    """A layer's (part, token sequences): taken in its hook (:class:`~qkhooks.reducers.TakenParts`), or ``fold`` of its
    kept tokens."""
    if layer in taken:
        return taken[layer]
    kept = _inputs(cap, who)
    return fold(kept), int(kept.shape[0])


def _inputs(cap: LayerCapture, who: str) -> torch.Tensor:
    """A layer's kept tokens, for a batch whose tokens were not handed to the reducer in the layer's hook."""
    if cap.inputs is None:
        raise QKHooksError(
            f"{who} got no tokens entering W_q/W_k of layer {cap.layer}: the recording neither handed them over (it "
            "does so for the sinks it holds as the batch begins) nor kept them; pass this reducer in "
            "record(..., sinks=[...]), or record with keep_inputs=True."
        )
    return cap.inputs.detach()


def _means(positions: "Mapping[int, Any] | PositionMeans") -> dict[int, torch.Tensor]:
    means = positions.means() if isinstance(positions, PositionMeans) else positions
    return {int(l): torch.as_tensor(p).detach().cpu() for l, p in means.items()}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A host copy that never aliases the live tensor: the run writer saves states on its own thread while
    the reducer keeps updating in place (``.cpu().numpy()`` of a CPU tensor would share its memory)."""
    return t.detach().cpu().numpy().copy()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding (states written and read back, or merged across devices)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(a).max(initial=0.0)), 1e-300)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-9, atol=1e-9 * scale))


# ============================================================================================ pass 1
class PositionMeans(Reducer):
    """Pass 1: per layer, the mean over images of the token at every position (prefix tokens included).

    Float64 sums stay on the tokens' device; :meth:`means` divides by the image count.

    Args:
        layers: block indices to keep (None: every layer seen).
        dtype: accumulation dtype (float64 unless the device lacks it).
    """

    name = "bfd_position_means"
    needs_inputs = True

    def __init__(self, layers: Sequence[int] | None = None, dtype: torch.dtype = torch.float64):
        self.layers = None if layers is None else sorted({int(l) for l in layers})
        self.dtype = dtype
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.grids: dict[int, tuple[int, int]] = {}
        """Layer -> the patch grid of the tokens averaged, where the recording read it."""
        self._taken = TakenParts()  # layer -> the batch's token sum (N, d), taken in the layer hooks

    def _check_shape(self, layer: int, total: torch.Tensor) -> None:
        if layer in self.sums and self.sums[layer].shape != total.shape:
            raise QKHooksError(
                f"layer {layer}: tokens changed shape from {tuple(self.sums[layer].shape)} to {tuple(total.shape)}; "
                "BFD needs one input size (one token count) for the whole dataset."
            )

    def _add(self, layer: int, total: torch.Tensor, count: int) -> None:
        if layer not in self.sums:
            self.sums[layer], self.counts[layer] = total.clone(), count
            return
        self.sums[layer] += total.to(self.sums[layer])
        self.counts[layer] += count

    def _wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def take_inputs(self, batch: BatchCapture, layer: int, tokens: torch.Tensor) -> None:
        """One layer's tokens (B, N, d), in the layer's hook: summed over the images here, so the recording need
        not keep them to the batch's end; :meth:`update` folds the batch's sums, or refuses the batch whole."""
        if self._wants(layer):
            self._taken.put(batch, layer, (tokens.detach().to(self.dtype).sum(0), int(tokens.shape[0])))

    def update(self, batch: BatchCapture) -> None:
        """Fold one batch, every layer's sum (taken in its hook or read off its kept tokens) checked first."""
        taken = self._taken.pop(batch)
        parts = {layer: _part_and_rows(taken, layer, cap, "PositionMeans", lambda t: t.to(self.dtype).sum(0))
                 for layer, cap in batch.captures.items() if self._wants(layer)}
        _one_sequence_an_image(batch, {layer: rows for layer, (_, rows) in parts.items()}, "PositionMeans")
        totals = {layer: total for layer, (total, _) in parts.items()}
        for layer, total in totals.items():
            self._check_shape(layer, total)
        grids = {layer: batch_grid(batch, layer) for layer in totals}
        _check_grids(self.grids, grids, "PositionMeans")
        for layer, total in totals.items():
            self._add(layer, total, batch.captures[layer].batch_size)
        self.grids.update({layer: grid for layer, grid in grids.items() if grid is not None})

    def means(self) -> dict[int, torch.Tensor]:
        """Layer -> P (N, d), the per-position mean over images."""
        if not self.sums:
            raise QKHooksError("PositionMeans has seen no images: run pass 1 over the dataset first.")
        return {l: self.sums[l] / self.counts[l] for l in sorted(self.sums)}

    def images_held(self) -> int:
        return max(self.counts.values(), default=0)

    def merge(self, other: Reducer) -> None:
        self._check_same_kind(other)
        assert isinstance(other, PositionMeans)
        for layer in sorted(other.sums):
            self._check_shape(layer, other.sums[layer])
        _check_grids(self.grids, other.grids, "PositionMeans")
        for layer in sorted(other.sums):
            self._add(layer, other.sums[layer], other.counts[layer])
        self.grids.update(other.grids)

    def state_dict(self) -> dict[str, Any]:
        layers = sorted(self.sums)
        state: dict[str, Any] = {
            "layers": np.asarray(layers, dtype=np.int64),
            "counts": np.asarray([self.counts[l] for l in layers], dtype=np.int64),
        }
        for layer in layers:
            state[f"L{layer}.sum"] = _numpy(self.sums[layer])
        return {**state, **_grid_state(self.grids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layers, counts = _state_layers(state), np.asarray(state["counts"]).reshape(-1)
        self.sums = {l: torch.as_tensor(np.asarray(state[f"L{l}.sum"]), dtype=self.dtype) for l in layers}
        self.counts = {l: int(c) for l, c in zip(layers, counts)}
        self.grids = _grids_of(state, layers)


# ============================================================================================ pass 2
_CONSTANTS = ("P", "sigma", "gq_pos", "gk_pos", "q_mean", "k_mean")
_ENERGY_STATS = ("images", "gq_c", "gk_c", "cc", "total", "mode_cc", "mode_total", "content_ss", "content_sum")


class BFDEnergies(Reducer):
    """Pass 2: per head and mode, the streamed sums behind every BFD energy (METHODS B.1-B.4).

    Per layer the state holds constants fixed by pass 1 (``P`` the position factor, ``sigma``, the Grams
    ``gq_pos``/``gk_pos`` of the maps of P - mu, the maps ``q_mean``/``k_mean`` of the grand mean mu) and
    sums over images (``gq_c``/``gk_c`` content Grams, per-image CC and total energies ``cc``/``total``,
    per-mode products ``mode_cc``/``mode_total``, ``content_ss`` = sum_i ||C_i||^2 and ``content_sum`` =
    sum_i C_i, which is zero when both passes saw the same tokens). That is all
    :func:`qkhooks.analysis.bfd_summary.summarize` needs.

    Args:
        spectra: all modes of every layer, bias-free (:func:`full_modes`).
        positions: layer -> P (N, d) from pass 1, or the :class:`PositionMeans` itself.
        num_prefix_tokens: tokens before the patches.
        drop_prefix: leave prefix tokens out of every statistic (default: they are positions too, B.1).
        dtype: accumulation dtype.
    """

    name = "bfd_energies"
    needs_inputs = True

    def __init__(
        self,
        spectra: Sequence[LayerSpectrum],
        positions: Mapping[int, Any] | PositionMeans,
        num_prefix_tokens: int = 0,
        drop_prefix: bool = False,
        dtype: torch.dtype = torch.float64,
    ):
        means = _means(positions)
        self.dtype = dtype
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.drop_prefix = bool(drop_prefix)
        start = self.num_prefix_tokens if self.drop_prefix else 0
        self.layers = sorted(s.layer for s in spectra)
        self.constants: dict[int, dict[str, torch.Tensor]] = {}
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self._work: dict[int, dict[str, torch.Tensor]] = {}  # the same constants, on the tokens' device
        self._taken = TakenParts()  # layer -> the batch's increments (:meth:`_increments`), taken in the layer hooks
        self.grids: dict[int, tuple[int, int]] = dict(positions.grids) if isinstance(positions, PositionMeans) else {}
        """Layer -> the patch grid of pass 1's tokens (from a :class:`PositionMeans`) or of the first batch here."""
        for spec in spectra:
            if spec.layer not in means:
                raise QKHooksError(f"no position means for layer {spec.layer}: run pass 1 over the same layers.")
            self._set_up(spec, means[spec.layer].to(torch.float64)[start:])

    def _set_up(self, spec: LayerSpectrum, p: torch.Tensor) -> None:
        """One layer's constants and empty sums from its modes and its position factor P (the tokens used)."""
        if spec.augmented:
            raise QKHooksError("BFD uses the bias-free form W_q^T W_k: pass spectra with augmented=False.")
        u, s, v = (t.to(torch.float64).cpu() for t in (spec.U, spec.S, spec.V))
        h, d, k = u.shape
        if p.dim() != 2 or p.shape[1] != d:
            raise QKHooksError(f"layer {spec.layer}: position means of shape {tuple(p.shape)} do not fit width {d}.")
        u_all, v_all = u.permute(1, 0, 2).reshape(d, h * k), v.permute(1, 0, 2).reshape(d, h * k)
        qp, kp = (p @ u_all).view(-1, h, k).transpose(0, 1), (p @ v_all).view(-1, h, k).transpose(0, 1)  # (H, N, K)
        qpt, kpt = qp - qp.mean(1, keepdim=True), kp - kp.mean(1, keepdim=True)  # maps of P - mu
        self.constants[spec.layer] = {
            "P": p, "sigma": s,
            "gq_pos": qpt.transpose(1, 2) @ qpt, "gk_pos": kpt.transpose(1, 2) @ kpt,
            "q_mean": qp.mean(1), "k_mean": kp.mean(1),
        }
        self._work[spec.layer] = {"P": p, "U": u_all, "V": v_all, "qp": qp, "kp": kp, "ss": s[:, :, None] * s[:, None, :]}
        n = p.shape[0]
        z = lambda *shape: torch.zeros(shape, dtype=self.dtype)  # noqa: E731
        self.stats[spec.layer] = {"images": z(), "gq_c": z(h, k, k), "gk_c": z(h, k, k), "cc": z(h),
                                  "total": z(h), "mode_cc": z(h, k), "mode_total": z(h, k),
                                  "content_ss": z(), "content_sum": z(n, d)}

    @classmethod
    def _from_configuration(cls, config: Mapping[str, Any], state: Mapping[str, Any],
                            spectra: Sequence[LayerSpectrum] | None = None) -> "BFDEnergies":
        """From a saved state, which holds P and sigma but not the singular vectors (they are the model's): without
        ``spectra`` (:func:`full_modes`) the reducer merges and reports but cannot update."""
        reducer = cls.__new__(cls)
        reducer.dtype = config.get("dtype", torch.float64)
        reducer.num_prefix_tokens = int(config.get("num_prefix_tokens", 0))
        reducer.drop_prefix = bool(config.get("drop_prefix", False))
        reducer.layers = _state_layers(state)
        reducer.constants, reducer.stats, reducer._work, reducer._taken = {}, {}, {}, TakenParts()
        reducer.grids = _grids_of(state, reducer.layers)
        modes = {spec.layer: spec for spec in spectra or []}
        for layer in reducer.layers:
            saved = layer_state(state, layer)
            if layer in modes:
                reducer._set_up(modes[layer], torch.as_tensor(saved["P"], dtype=torch.float64))
            else:
                reducer.constants[layer] = {key: torch.as_tensor(saved[key]) for key in _CONSTANTS}
        return reducer

    def _on(self, layer: int, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        work, st = self._work[layer], self.stats[layer]
        for table in (work, st):
            first = next(iter(table.values()))
            if first.device != device or first.dtype != self.dtype:
                table.update({key: t.to(device=device, dtype=self.dtype) for key, t in table.items()})
        return work, st

    def _increments(self, layer: int, tokens: torch.Tensor) -> dict[str, Any]:
        """What one batch of one layer's tokens (B, N, d) adds to each of its sums."""
        if layer not in self._work:
            raise QKHooksError(
                f"this BFDEnergies was rebuilt from a saved state without the model's modes of layer {layer}, so "
                "it can merge and report but not update; pass spectra=full_modes(model) to BFDEnergies.from_state."
            )
        start = self.num_prefix_tokens if self.drop_prefix else 0
        w, _ = self._on(layer, tokens.device)
        x = tokens.detach()[:, start:].to(self.dtype)
        if x.shape[1:] != w["P"].shape:
            raise QKHooksError(
                f"layer {layer}: tokens of shape {tuple(x.shape[1:])} do not match the pass-1 position means "
                f"{tuple(w['P'].shape)}; both passes need the same images at the same size."
            )
        bsz, n = x.shape[:2]
        h, _, k = w["qp"].shape
        c = x - w["P"]
        qc = (c @ w["U"]).view(bsz, n, h, k).transpose(1, 2)  # (B, H, N, K) content query maps
        kc = (c @ w["V"]).view(bsz, n, h, k).transpose(1, 2)
        qx, kx = qc + w["qp"], kc + w["kp"]  # maps of X = P + C
        gqc, gkc = qc.transpose(-1, -2) @ qc, kc.transpose(-1, -2) @ kc  # (B, H, K, K)
        gqx, gkx = qx.transpose(-1, -2) @ qx, kx.transpose(-1, -2) @ kx
        return {
            "images": bsz,
            "gq_c": gqc.sum(0),
            "gk_c": gkc.sum(0),
            "cc": (w["ss"] * gqc * gkc).sum((0, -1, -2)),
            "total": (w["ss"] * gqx * gkx).sum((0, -1, -2)),
            "mode_cc": (gqc.diagonal(dim1=-2, dim2=-1) * gkc.diagonal(dim1=-2, dim2=-1)).sum(0),
            "mode_total": (gqx.diagonal(dim1=-2, dim2=-1) * gkx.diagonal(dim1=-2, dim2=-1)).sum(0),
            "content_ss": c.pow(2).sum(),
            "content_sum": c.sum(0),
        }

    def take_inputs(self, batch: BatchCapture, layer: int, tokens: torch.Tensor) -> None:
        """One layer's tokens (B, N, d), in the layer's hook: its increments are computed here, so the recording
        need not keep the tokens to the batch's end; :meth:`update` folds the batch's, or refuses the batch whole."""
        if layer in self.layers:
            self._taken.put(batch, layer, self._increments(layer, tokens))

    def update(self, batch: BatchCapture) -> None:
        """Fold one batch: every layer's increments (taken in its hook or computed from its kept tokens) first, so
        a refused layer leaves every sum as it was."""
        taken = self._taken.pop(batch)
        increments = {layer: taken[layer] if layer in taken else self._increments(layer, _inputs(cap, "BFDEnergies"))
                      for layer, cap in batch.captures.items() if layer in self.layers}
        _one_sequence_an_image(batch, {layer: added["images"] for layer, added in increments.items()}, "BFDEnergies")
        grids = {layer: batch_grid(batch, layer) for layer in increments}
        _check_grids(self.grids, grids, "BFDEnergies (the position factor of pass 1)")
        for layer, added in increments.items():
            st = self.stats[layer]
            for key in _ENERGY_STATS:
                st[key] += added[key]
        self.grids.update({layer: grid for layer, grid in grids.items() if grid is not None})

    def _check_compatible(self, layers: Sequence[int], drop_prefix: bool, constants: Mapping[int, Mapping[str, Any]],
                          what: str) -> None:
        if list(layers) != self.layers or bool(drop_prefix) != self.drop_prefix:
            raise QKHooksError(
                f"{what}: layers {list(layers)} / drop_prefix={bool(drop_prefix)} differ from this reducer's "
                f"{self.layers} / drop_prefix={self.drop_prefix}; use the same BFD options (or start again with "
                "overwrite)."
            )
        for layer in self.layers:
            for key in ("P", "sigma"):
                if not _same(np.asarray(constants[layer][key]), self.constants[layer][key].numpy()):
                    raise QKHooksError(
                        f"{what}: layer {layer} used other position means or weights than this reducer; states "
                        "combine only within one pass 2 over one pass-1 result (start again with overwrite)."
                    )

    def images_held(self) -> int:
        return max((int(stats["images"]) for stats in self.stats.values()), default=0)

    def merge(self, other: Reducer) -> None:
        self._check_same_kind(other)
        assert isinstance(other, BFDEnergies)
        self._check_compatible(other.layers, other.drop_prefix, other.constants, "cannot merge BFD energies")
        _check_grids(self.grids, other.grids, "BFDEnergies")
        for layer in self.layers:
            mine = self.stats[layer]
            for key in _ENERGY_STATS:
                mine[key] += other.stats[layer][key].to(mine[key])
        self.grids.update(other.grids)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "layers": np.asarray(self.layers, dtype=np.int64),
            "num_prefix_tokens": np.asarray(self.num_prefix_tokens),
            "drop_prefix": np.asarray(int(self.drop_prefix)),
        }
        for layer in self.layers:
            for table in (self.constants[layer], self.stats[layer]):
                for key, value in table.items():
                    state[f"L{layer}.{key}"] = _numpy(value)
        return {**state, **_grid_state(self.grids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layers = _state_layers(state)
        saved = {l: layer_state(state, l) for l in layers}
        self._check_compatible(layers, bool(np.asarray(state["drop_prefix"])), saved, "saved BFD energies")
        grids = _grids_of(state, layers)
        _check_grids(self.grids, grids, "BFDEnergies (a saved state)")
        for layer in layers:
            self.stats[layer] = {key: torch.as_tensor(saved[layer][key], dtype=self.dtype) for key in _ENERGY_STATS}
        self.grids.update(grids)


HOLDOUT_BY_ID = 1
"""``holdout_rule`` of a :class:`PositionDecoding` state whose split is :func:`is_held_out` of the ids; states
without it (0) split by position in the run, which sharding and unreadable images changed."""


class PositionDecoding(Reducer):
    """Pass 2: sufficient statistics of held-out ridge probes decoding patch row and column (METHODS B.5).

    An image is held out when :func:`is_held_out` of its id says so (one in ``holdout_every`` on average);
    the others train. The split depends on the image alone, never on its position in a batch, shard or
    resumed run, so every way of recording the same images gives the same probes. Per split the reducer keeps the image count, sum_i X_i^T X_i (d x d) and sum_i X_i (T x d) over
    patch tokens, which give the normal equations of probes on X, on C = X - P and on the split's own
    position means alike, so memory is O(d^2 + T d) whatever the number of images. The probes are solved
    in the summary (:func:`qkhooks.analysis.bfd_summary.decoding_r2`).

    Args:
        positions: layer -> P (N, d) from pass 1, or the :class:`PositionMeans`.
        grid: (rows, cols) of the patch grid.
        num_prefix_tokens: tokens before the patches (never decoded).
        holdout_every: one image in this many is held out (on average).
        dtype: accumulation dtype.
    """

    name = "bfd_decoding"
    needs_inputs = True

    def __init__(
        self,
        positions: Mapping[int, Any] | PositionMeans,
        grid: tuple[int, int],
        num_prefix_tokens: int = 0,
        holdout_every: int = 5,
        dtype: torch.dtype = torch.float64,
    ):
        if int(holdout_every) < 2:
            raise QKHooksError(f"holdout_every must be >= 2 (one image in that many is held out), got {holdout_every}.")
        means = _means(positions)
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.holdout_every = int(holdout_every)
        self.dtype = dtype
        self._taken = TakenParts()  # layer -> the batch's increments per split, or its tokens (ids not yet known)
        self._split: tuple[weakref.ref[BatchCapture], dict[torch.device, dict[int, torch.Tensor]]] | None = None
        self._set_up({l: means[l].to(torch.float64)[self.num_prefix_tokens :] for l in sorted(means)})

    def _set_up(self, patch_positions: Mapping[int, torch.Tensor]) -> None:
        """Empty sums for every layer of ``patch_positions`` (layer -> P over the patch tokens)."""
        self.layers = sorted(patch_positions)
        self.patch_positions: dict[int, torch.Tensor] = {}
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        for layer in self.layers:
            p = patch_positions[layer]
            if p.shape[0] != self.grid[0] * self.grid[1]:
                raise QKHooksError(
                    f"layer {layer}: {p.shape[0]} patch tokens do not fill the grid {self.grid}; pass the right grid "
                    "and num_prefix_tokens."
                )
            t, d = p.shape
            self.patch_positions[layer] = p
            self.stats[layer] = {"images": torch.zeros(2, dtype=self.dtype), "xtx": torch.zeros(2, d, d, dtype=self.dtype),
                                 "sums": torch.zeros(2, t, d, dtype=self.dtype)}

    @classmethod
    def _from_configuration(cls, config: Mapping[str, Any], state: Mapping[str, Any]) -> "PositionDecoding":
        """From a saved state, whose patch positions stand in for the pass-1 means."""
        reducer = cls.__new__(cls)
        reducer.grid = tuple(int(g) for g in config["grid"])
        reducer.num_prefix_tokens = int(config["num_prefix_tokens"])
        reducer.holdout_every = int(config["holdout_every"])
        reducer.dtype = config.get("dtype", torch.float64)
        reducer._taken, reducer._split = TakenParts(), None
        reducer._set_up({l: torch.as_tensor(layer_state(state, l)["P"], dtype=torch.float64) for l in _state_layers(state)})
        return reducer

    def _rows(self, batch: BatchCapture, device: torch.device) -> dict[int, torch.Tensor]:
        """Split -> the batch's row indices (0: training, 1: held out) on ``device``, made on the host once a batch
        and moved once a device: a boolean mask on the device would make the host wait for the GPU in every layer
        (the rows' count is read back)."""
        if self._split is None or self._split[0]() is not batch:
            held = torch.tensor([is_held_out(i, self.holdout_every) for i in batch.ids], dtype=torch.bool)
            host = {split: torch.nonzero(mask).flatten() for split, mask in ((0, ~held), (1, held))}
            self._split = weakref.ref(batch), {torch.device("cpu"): host}
        moved = self._split[1]
        if device not in moved:
            moved[device] = {split: to_device(index, device) for split, index in moved[torch.device("cpu")].items()}
        return moved[device]

    def _increments(self, layer: int, tokens: torch.Tensor, batch: BatchCapture) -> dict[int, tuple]:
        """Split -> (images, X^T X, sum X) one batch of one layer's tokens (B, N, d) adds."""
        x = tokens.detach()[:, self.num_prefix_tokens :].to(self.dtype)
        if x.shape[1:] != self.patch_positions[layer].shape:
            raise QKHooksError(
                f"layer {layer}: patch tokens of shape {tuple(x.shape[1:])} do not match the position means "
                f"{tuple(self.patch_positions[layer].shape)}; both passes need the same images at the same size."
            )
        out = {}
        for split, index in self._rows(batch, x.device).items():
            if len(index):
                part = x.index_select(0, index)
                flat = part.reshape(-1, part.shape[-1])
                out[split] = (len(index), flat.T @ flat, part.sum(0))
        return out

    def take_inputs(self, batch: BatchCapture, layer: int, tokens: torch.Tensor) -> None:
        """One layer's tokens (B, N, d), in the layer's hook: with the batch's ids given (``record_dataset`` gives
        them) its increments per split are computed here, so the recording need not keep the tokens to the batch's
        end; else the tokens are held for :meth:`update` (the ids are made as the batch ends)."""
        if layer not in self.stats:
            return
        if len(batch.ids) == tokens.shape[0]:
            self._taken.put(batch, layer, (self._increments(layer, tokens, batch), int(tokens.shape[0])))
        else:
            self._taken.put(batch, layer, (tokens.detach(), int(tokens.shape[0])))

    def update(self, batch: BatchCapture) -> None:
        """Fold one batch: every layer's increments (taken in its hook, or computed from its tokens) first, so a
        refused layer leaves every sum as it was."""
        taken = self._taken.pop(batch)
        parts = {layer: _part_and_rows(taken, layer, cap, "PositionDecoding")
                 for layer, cap in batch.captures.items() if layer in self.stats}
        _one_sequence_an_image(batch, {layer: rows for layer, (_, rows) in parts.items()}, "PositionDecoding")
        _check_grids({layer: self.grid for layer in parts}, {layer: batch_grid(batch, layer) for layer in parts},
                     f"PositionDecoding (made for the {self.grid[0]}x{self.grid[1]} grid)")
        increments = {layer: part if isinstance(part, dict) else self._increments(layer, part, batch)
                      for layer, (part, _) in parts.items()}
        self._split = None
        for layer, added in increments.items():
            st = self.stats[layer]
            device = next(iter(added.values()))[1].device if added else st["xtx"].device
            if st["xtx"].device != device:
                st.update({key: t.to(device) for key, t in st.items()})
            for split, (images, xtx, sums) in added.items():
                st["images"][split] += images
                st["xtx"][split] += xtx
                st["sums"][split] += sums

    def images_held(self) -> int:  # both splits: the fit and the held-out images
        return max((int(stats["images"].sum()) for stats in self.stats.values()), default=0)

    def merge(self, other: Reducer) -> None:
        self._check_same_kind(other)
        assert isinstance(other, PositionDecoding)
        if (other.layers, other.grid, other.num_prefix_tokens, other.holdout_every) != (
            self.layers, self.grid, self.num_prefix_tokens, self.holdout_every
        ) or not all(_same(other.patch_positions[l].numpy(), self.patch_positions[l].numpy()) for l in self.layers):
            raise QKHooksError("cannot merge position probes with other layers, grid, hold-out rule or position means.")
        for layer in self.layers:
            for key, value in other.stats[layer].items():
                self.stats[layer][key] += value.to(self.stats[layer][key])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "layers": np.asarray(self.layers, dtype=np.int64),
            "grid": np.asarray(self.grid, dtype=np.int64),
            "num_prefix_tokens": np.asarray(self.num_prefix_tokens),
            "holdout_every": np.asarray(self.holdout_every),
            "holdout_rule": np.asarray(HOLDOUT_BY_ID),
        }
        for layer in self.layers:
            state[f"L{layer}.P"] = _numpy(self.patch_positions[layer])
            for key, value in self.stats[layer].items():
                state[f"L{layer}.{key}"] = _numpy(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layers = _state_layers(state)
        if layers != self.layers or int(np.asarray(state["holdout_every"])) != self.holdout_every or tuple(
            int(g) for g in np.asarray(state["grid"]).reshape(-1)
        ) != self.grid:
            raise QKHooksError(
                "the saved position-probe state has other layers, grid or hold-out rule than this run; use the same "
                "options or start again with overwrite."
            )
        if int(np.asarray(state.get("holdout_rule", 0))) != HOLDOUT_BY_ID:
            raise QKHooksError(
                "the saved position-probe state chose its held-out images by their position in the run (an older "
                "qkhooks), which differs from the id rule this version uses; continuing or merging it would mix two "
                "splits. Start the BFD run again with overwrite."
            )
        for layer in layers:
            saved = layer_state(state, layer)
            if not _same(saved["P"], self.patch_positions[layer].numpy()):
                raise QKHooksError(f"the saved position probes of layer {layer} used other position means; start again.")
            self.stats[layer] = {key: torch.as_tensor(saved[key], dtype=self.dtype) for key in ("images", "xtx", "sums")}
