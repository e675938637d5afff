"""The anisotropy baseline (Pan et al. Fig. S3; METHODS A.7): how alike different images' centre patches are.

:class:`AnisotropyReducer` streams, per layer, the mean cosine between the centre-patch embeddings of
different images; :func:`relative_cosine` subtracts it from the modes' cosines; :class:`CentreEmbeddings`
keeps the embeddings themselves, from which :func:`baseline_pivots` gives the baseline's bootstrap-t intervals
over images (:mod:`qkhooks.readings`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from qkhooks.capture import BatchCapture
from qkhooks.errors import QKHooksError
from qkhooks.readings import Pivots, pair_pivots
from qkhooks.reducers import Reducer, TakenParts, refuse_mixed_batch_axes, refuse_non_finite
from qkhooks.spectrum import head_weighted_cosines, mean_over_heads
from qkhooks.analysis.geometry import grid_of, layer_geometry, layer_grid, resolve_prefix, tokens_on_grid

__all__ = ["AnisotropyReducer", "CentreEmbeddings", "baseline_pivots", "anisotropy_from_state",
           "relative_cosine", "anisotropy_table"]


class AnisotropyReducer(Reducer):
    """Per layer, the mean cosine between the centre-patch embeddings of different images (Fig. S3 baseline).

    With unit vectors z_i and s = sum_i z_i, the mean over ordered pairs i != j of z_i·z_j is
    (|s|^2 - n) / (n (n - 1)), so the state is s (float64, d) and n per layer: memory O(layers x d), exact
    merge by addition. The embeddings are what the recording hands to the modes (``cap.inputs``: the normed
    input of W_q/W_k by default, the residual stream with ``input="residual"``). Zero vectors are skipped.

    Args:
        num_prefix_tokens: as in :class:`TopKModes`.
        grid: the patch grid (rows, cols); None reads ``batch.meta["grid"]`` or assumes a square grid.
            The centre token is ``prefix + (rows // 2) * cols + cols // 2`` (the same one ``qkhooks record``
            uses for attention rows).
    """

    name = "anisotropy"
    needs_inputs = True

    def __init__(self, num_prefix_tokens: int | None = None, grid: tuple[int, int] | None = None):
        self.num_prefix_tokens = None if num_prefix_tokens is None else int(num_prefix_tokens)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.sums: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}
        # take_inputs' centre rows (B, d) and token counts per layer, for the batch it saw (a weak reference, so a
        # batch whose forward failed is not kept alive); update folds them, or refuses the batch, and drops them
        self._taken = TakenParts()  # layer -> (B, d) centre rows and the token count, taken in the layer hooks

    def __repr__(self) -> str:
        return f"AnisotropyReducer(layers={sorted(self.sums)}, images={self.images_held()})"

    def images_held(self) -> int:
        return max(self.count.values(), default=0)

    def centre_token(self, num_tokens: int, meta: Mapping[str, Any] | None = None) -> int:
        """Index of the centre patch token in a sequence of ``num_tokens``."""
        meta = meta or {}
        prefix = resolve_prefix(self.num_prefix_tokens, meta, num_tokens)
        rows, cols = grid_of(num_tokens - prefix, self.grid or meta.get("grid"))
        return prefix + (rows // 2) * cols + cols // 2

    def centre_embeddings(self, batch: BatchCapture, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(B, d): each image's centre-patch token at ``layer``, on that layer's own grid (windowed layers' tokens
        put back on the image grid first)."""
        x = tokens_on_grid(x, layer_geometry(batch.meta, layer))
        prefix, (rows, cols) = layer_grid(batch.meta, layer, int(x.shape[1]), self.num_prefix_tokens, self.grid)
        return x[:, prefix + (rows // 2) * cols + cols // 2]

    def take_inputs(self, batch: BatchCapture, layer: int, tokens: torch.Tensor) -> None:
        """One layer's tokens (B, N, d), handed over by the recording in the layer's hook: only the centre patch's
        row is kept (a copy), so the recording need not keep every layer's tokens until the batch ends (a ViT-B batch
        of 16: 116 MB). Nothing is folded here: :meth:`update` folds the batch's rows, or refuses the batch whole."""
        centres = self.centre_embeddings(batch, layer, _checked_tokens(layer, tokens)).clone()
        self._taken.put(batch, layer, (centres, int(tokens.shape[1])))

    def update(self, batch: BatchCapture) -> None:
        """Fold one batch: every layer's centre rows, taken in its hook (:meth:`take_inputs`) or from its kept tokens."""
        centres, stacked, tokens = self._batch_centres(batch)  # every layer's first: a refused batch changes nothing
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = resolve_prefix(None, batch.meta, tokens)
        for layer, z in centres.items():
            if layer in self.sums and self.sums[layer].shape[0] != z.shape[-1]:
                raise QKHooksError(f"layer {layer}: width {z.shape[-1]} differs from the earlier {self.sums[layer].shape[0]}.")
        # layers of one width and device as one (L, B, d) stack: a dozen tensor operations for all of them, not a
        # dozen a layer (on a GPU each costs the host a launch); the same arithmetic, layer by layer, otherwise
        groups: dict[tuple, list[int]] = {}
        for layer, z in centres.items():
            groups.setdefault((tuple(z.shape), z.device), []).append(layer)
        parts, kept = [], []
        for members in groups.values():
            if stacked is not None:  # one group, every layer in order: the finite check's stack
                z = stacked
            else:
                z = centres[members[0]].unsqueeze(0) if len(members) == 1 else torch.stack([centres[l] for l in members])
            norm = z.norm(dim=-1, keepdim=True)
            ok = norm > 0  # a zero vector has no direction, so is not counted; masks by multiplying: no device sync
            parts.append((members, (z / norm.clamp_min(torch.finfo(z.dtype).tiny) * ok).sum(1)))
            kept.append(ok.sum((1, 2)))
        counts = iter(torch.cat(kept).tolist())  # every layer's count in one read of the device
        for members, part in parts:
            if all(l in self.sums for l in members):
                part = torch.stack([self.sums[l] for l in members]).to(part.device, part.dtype) + part
            elif any(l in self.sums for l in members):  # a merge brought some of them: layer by layer
                part = torch.stack([self.sums[l].to(part.device, part.dtype) + p if l in self.sums else p
                                    for l, p in zip(members, part.unbind(0))])
            self.sums.update(zip(members, part.unbind(0)))
            for layer in members:
                self.count[layer] = self.count.get(layer, 0) + int(next(counts))

    def _batch_centres(self, batch: BatchCapture) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, int]:
        """Layer -> (B, d) centre embeddings in the accumulation dtype, in layer order, for every recorded layer of
        ``batch``: taken in its hook (:meth:`take_inputs`) or read off its kept tokens. Also their (L, B, d) stack where
        every layer's are of one shape, dtype and device, else None (the dict's values are views of the stack, which
        :meth:`update` folds as it is rather than stacking them again), and the first layer's token count. A batch
        with a NaN or inf among them is refused (:func:`~qkhooks.reducers.refuse_non_finite`) before the state
        changes; so is one with a layer whose tokens were neither taken nor kept."""
        taken = self._taken.pop(batch)
        refuse_mixed_batch_axes(batch, type(self).__name__)
        kept = {l: c.inputs for l, c in batch.captures.items() if c.inputs is not None and l not in taken}
        if not taken and not kept:
            raise QKHooksError(f"{type(self).__name__} needs the captured tokens: record with keep_inputs=True.")
        missing = sorted(set(batch.captures) - set(taken) - set(kept))
        if missing:
            raise QKHooksError(f"{type(self).__name__} got no tokens of layer(s) {missing}: the recording neither "
                               "handed them over (it does so for the sinks it holds as the batch begins) nor kept them; "
                               "pass this reducer in record(..., sinks=[...]), or record with keep_inputs=True.")
        centres: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for layer in sorted({*taken, *kept}):
            if layer in taken:
                centres[layer], counts[layer] = taken[layer]
            else:
                x = _checked_tokens(layer, kept[layer])
                centres[layer], counts[layer] = self.centre_embeddings(batch, layer, x), int(x.shape[1])
        shapes = {(tuple(z.shape), z.dtype, z.device) for z in centres.values()}
        stacked = None
        if len(shapes) == 1:  # one stack, one cast and one check for all layers (a GPU launches 4 kernels, not 36)
            stacked = torch.stack(list(centres.values()))
            stacked = stacked.to(torch.float32 if stacked.device.type == "mps" else torch.float64)
            finite = torch.isfinite(stacked).all(-1)
            centres = dict(zip(centres, stacked.unbind(0)))
        else:
            centres = {layer: z.to(torch.float32 if z.device.type == "mps" else torch.float64)
                       for layer, z in centres.items()}
            finite = torch.stack([torch.isfinite(z).all(-1) for z in centres.values()])
        refuse_non_finite(finite, list(centres), batch, type(self).__name__, "centre-patch embeddings")
        return centres, stacked, counts[min(counts)]

    def merge(self, other: Reducer) -> None:
        """Fold a reducer that saw a disjoint set of images."""
        self._check_same_kind(other)
        assert isinstance(other, AnisotropyReducer)
        for layer, s in other.sums.items():
            if layer in self.sums:
                if self.sums[layer].shape != s.shape:
                    raise QKHooksError(f"cannot merge anisotropy reducers of different widths at layer {layer}.")
                self.sums[layer] = self.sums[layer] + s.to(self.sums[layer].device, self.sums[layer].dtype)
                self.count[layer] += other.count[layer]
            else:
                self.sums[layer], self.count[layer] = s.clone(), other.count[layer]
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = other.num_prefix_tokens

    def baselines(self) -> dict[int, float]:
        """Layer -> mean pairwise cosine (NaN with fewer than 2 images)."""
        return anisotropy_from_state(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        layers = sorted(self.sums)
        sums = [self.sums[l].detach().double().cpu().numpy() for l in layers]
        out = {
            "layers": np.asarray(layers, dtype=np.int64),
            "count": np.asarray([self.count[l] for l in layers], dtype=np.int64),
            "sum": _stack_widths(sums, 0) if layers else np.zeros((0, 0)),
            "num_prefix_tokens": -1 if self.num_prefix_tokens is None else int(self.num_prefix_tokens),
        }
        return _with_widths(out, [v.shape[0] for v in sums])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("layers", "count", "sum") if k not in state]
        if missing:
            raise QKHooksError(f"not an AnisotropyReducer state: missing {missing}.")
        layers = [int(l) for l in np.asarray(state["layers"]).reshape(-1)]
        counts = np.asarray(state["count"]).reshape(-1)
        widths = _widths(state, len(layers))
        self.sums = {l: torch.as_tensor(np.asarray(state["sum"][i][:widths[i]], dtype=np.float64)) for i, l in enumerate(layers)}
        self.count = {l: int(c) for l, c in zip(layers, counts)}
        prefix = int(np.asarray(state.get("num_prefix_tokens", -1)))
        self.num_prefix_tokens = None if prefix < 0 else prefix


class CentreEmbeddings(AnisotropyReducer):
    """The unit centre-patch embeddings of each image, per layer: what the anisotropy baseline averages, kept
    so that its uncertainty over images can be measured (:func:`baseline_pivots`).

    Keeps the first ``max_images`` images (float32, images x layers x d: 2048 x 12 x 384 is 38 MB); the
    baseline itself comes from :class:`AnisotropyReducer`, which sees every image. A zero centre embedding (no
    direction, no cosine) is kept as a zero row, so every layer keeps one row per image; :func:`baseline_pivots`
    skips zero rows, as :class:`AnisotropyReducer` skips zero vectors, so the interval is over the baseline's images.
    """

    name = "anisotropy_images"

    def __init__(self, num_prefix_tokens: int | None = None, grid: tuple[int, int] | None = None, max_images: int = 2048):
        super().__init__(num_prefix_tokens, grid)
        self.max_images = int(max_images)
        self.vectors: dict[int, list[np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"CentreEmbeddings(layers={sorted(self.vectors)}, images={self._images()})"

    def _images(self) -> int:
        return max((sum(len(v) for v in vs) for vs in self.vectors.values()), default=0)

    def update(self, batch: BatchCapture) -> None:
        room = self.max_images - self._images()
        if room <= 0:
            return
        for layer, z in self._batch_centres(batch)[0].items():
            z = z[:room].double()
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            self.vectors.setdefault(layer, []).append(z.float().cpu().numpy())

    def merge(self, other: Reducer) -> None:
        """Append a reducer of the images after this one's, keeping the first ``max_images`` as one pass would."""
        self._check_same_kind(other)
        assert isinstance(other, CentreEmbeddings)
        for layer, vs in other.vectors.items():
            kept = np.concatenate(self.vectors.get(layer, []) + list(vs))[: self.max_images]
            self.vectors[layer] = [kept]

    def state_dict(self) -> dict[str, Any]:
        layers = sorted(self.vectors)
        vectors = [np.concatenate(self.vectors[l]) for l in layers]
        return _with_widths({"layers": np.asarray(layers, dtype=np.int64),
                             "vectors": _stack_widths(vectors, 1) if layers else np.zeros((0, 0, 0), np.float32)},
                            [v.shape[-1] for v in vectors])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vectors = np.asarray(state["vectors"])
        layers = np.asarray(state["layers"]).reshape(-1)
        widths = _widths(state, len(layers))
        self.vectors = {int(l): [vectors[:, i, :widths[i]]] for i, l in enumerate(layers)}


def _checked_tokens(layer: int, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 3:
        raise QKHooksError(f"layer {layer}: tokens must be (batch, tokens, dim), got {tuple(x.shape)}.")
    return x


def _stack_widths(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    """Per-layer vectors (..., d_l) stacked along ``axis``, zero-padded to the widest (stages of different widths:
    Swin, PiT); zeros change no sum, dot product or norm, and ``widths`` says where each layer's own width ends."""
    width = max(a.shape[-1] for a in arrays)
    padded = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]) for a in arrays]
    return np.stack(padded, axis)


def _with_widths(state: dict[str, Any], widths: list[int]) -> dict[str, Any]:
    if len(set(widths)) > 1:
        state["widths"] = np.asarray(widths, dtype=np.int64)
    return state


def _widths(state: Mapping[str, Any], layers: int) -> list[int | None]:
    """Each layer's own width in a padded state (None: the whole last axis)."""
    if "widths" in state:
        return [int(w) for w in np.asarray(state["widths"]).reshape(-1)]
    return [None] * layers


def baseline_pivots(centre_state: Mapping[str, Any], layers: Sequence[int]) -> Pivots:
    """The baseline of each of ``layers`` (all in the state) from a :class:`CentreEmbeddings` state, with what its
    bootstrap-t intervals are made of: the mean cosine over pairs of different images (:func:`pair_pivots`; a
    zero embedding has no cosine and is left out, as :class:`AnisotropyReducer` leaves it out), the images
    resampled together across layers, so :mod:`qkhooks.readings` reads every layer at once."""
    where = {int(l): i for i, l in enumerate(np.asarray(centre_state["layers"]).reshape(-1))}
    return pair_pivots(np.asarray(centre_state["vectors"])[:, [where[int(l)] for l in layers]])


def anisotropy_from_state(state: Mapping[str, Any]) -> dict[int, float]:
    """Layer -> mean cosine between centre-patch embeddings of different images, from a saved state."""
    out: dict[int, float] = {}
    sums = np.asarray(state["sum"], dtype=np.float64)
    for i, (layer, n) in enumerate(zip(np.asarray(state["layers"]).reshape(-1), np.asarray(state["count"]).reshape(-1))):
        n = int(n)
        out[int(layer)] = float((sums[i] @ sums[i] - n) / (n * (n - 1))) if n >= 2 else math.nan
    return out


def relative_cosine(cos: Any, baseline: Any) -> np.ndarray:
    """Mode cosines minus the layer's anisotropy baseline (Fig. S3): ``cos`` (..., H, K), baseline broadcast."""
    return np.asarray(cos, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)


def _weighted_cos(S: np.ndarray, cos: np.ndarray) -> float:
    """Mean over heads of each head's sigma-weighted *sum* of cosines over every mode (paper's formula, METHODS
    A.2/A.7): ``QKSpectrum.cosine_weighted_by_layer()`` from S and cos alone (tests check the two agree on a run).
    Heads whose sigma are all zero (NaN) are left out of the mean."""
    return mean_over_heads(head_weighted_cosines(S, cos))


def anisotropy_table(spectra: Mapping[int, Mapping[str, Any]], baselines: Mapping[int, float]) -> dict[str, Any]:
    """Per layer: sigma-weighted cosine and, where the layer has a baseline, the baseline and the relative values
    (per layer and per mode); a layer without one keeps its cosine, which needs only the spectrum (review 49).

    Args:
        spectra: layer -> {"S": (H, K), "cos": (H, K)} of the stored modes, plus "S_all", "cos_all" (H, d_k)
            of every mode where the run has them: the weighted cosine is over all modes, as in Fig. 3 and
            ``qkhooks spectrum`` (METHODS A.2). Without them "S"/"cos" are taken as every mode, unless the entry
            says ``"truncated": True`` (a file from before runs stored S_all, recorded with modes=K < d_k): its
            weighted cosine is then NaN, with a ``cos_weighted_note``, never the K-mode renormalised number.
            Per-mode rows are the stored modes.
        baselines: layer -> anisotropy baseline; a layer not in it has no ``baseline``, ``relative_cos_weighted``
            or ``relative_cos`` key.
    """
    layers = sorted(spectra)
    rows = []
    for layer in layers:
        S, cos = np.asarray(spectra[layer]["S"], np.float64), np.asarray(spectra[layer]["cos"], np.float64)
        every = "S_all" in spectra[layer] and "cos_all" in spectra[layer]
        note = None
        if every:
            weighted = _weighted_cos(*(np.asarray(spectra[layer][k], np.float64) for k in ("S_all", "cos_all")))
        elif bool(spectra[layer].get("truncated", False)):
            weighted = math.nan
            note = (f"the run keeps {S.shape[-1]} modes per head and not every mode's sigma and cosine (recorded before "
                    "runs stored S_all/cos_all), so the sigma-weighted cosine over all modes is unknown; "
                    "qkhooks spectrum MODEL gives it from the weights")
        else:
            weighted = _weighted_cos(S, cos)
        row: dict[str, Any] = {"layer": layer, "cos_weighted": weighted, "cos": cos.tolist(), "S": S.tolist()}
        if layer in baselines:
            base = float(baselines[layer])
            row.update(baseline=base, relative_cos_weighted=weighted - base,
                       relative_cos=relative_cosine(cos, base).tolist())
        if note is not None:
            row["cos_weighted_note"] = note
        rows.append(row)
    return {"layers": layers, "rows": rows}
