"""Semantic modes: top-k images per mode, same-object probability, anisotropy (Pan et al. Fig. 4, 5, S3).

METHODS A.3, A.5, A.6, A.7. For mode n of a head, an image's query map is x·u_n and its key map x·v_n over
its tokens. The paper ranks images by the largest attention the mode can induce in them,

    score = max(0, max_t q_t) * max(0, max_t k_t)          (t over patch tokens; prefix tokens dropped)

and, since the SVD fixes (u_n, v_n) only up to a joint sign, ranks the flipped pair (-u_n, -v_n) too:
``sign -1`` scores the maps (-q, -k). Ties go to the lower image index, so results never depend on the
batching, the device or the order in which partial results are merged.

Pieces, each usable alone:

- :class:`TopKModes`: streaming reducer keeping, per (layer, head, mode, sign), the k best images with their
  (signed) maps; memory O(layers x heads x modes x k x tokens), whatever the dataset size.
- :class:`AnisotropyReducer`: streaming per-layer mean cosine between the centre-patch embeddings of
  different images (the anisotropy baseline of Fig. S3); :func:`relative_cosine` subtracts it.
- :func:`optimal_objects` / :func:`same_object_probability`: the same-object statistic of Fig. 5 as pure
  functions on arrays; :func:`same_object_table` applies them to a whole top-k state.
- :func:`overlay` / :func:`plot_overlay_grid`: query map in red, key map in cyan over the dimmed image.
- :func:`analyze_modes`: the run-file driver behind ``qkhooks analyze modes``.

Names follow the paper's "L{l} H{h} M{m}", all 0-based (l is the block index used everywhere in qkhooks).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.cli import command, jsonable
from qkhooks.errors import QKHooksError, writable_dir
from qkhooks.reducers import Reducer
from qkhooks.spectrum import head_weighted_cosines

__all__ = [
    "TopKModes",
    "AnisotropyReducer",
    "CentreEmbeddings",
    "anisotropy_interval",
    "signed_scores",
    "infer_prefix_tokens",
    "layer_state",
    "top_images",
    "anisotropy_from_state",
    "relative_cosine",
    "anisotropy_table",
    "optimal_objects",
    "same_object_probability",
    "chance_same_object",
    "same_object_table",
    "map_to_grid",
    "overlay",
    "plot_overlay_grid",
    "plot_mode",
    "plot_layer_overview",
    "analyze_modes",
]

SIGNS: tuple[int, int] = (1, -1)
"""Sign axis of the top-k state: index 0 ranks (u_n, v_n), index 1 ranks (-u_n, -v_n)."""

MAX_INFERRED_PREFIX = 8
"""Largest prefix-token count :func:`infer_prefix_tokens` accepts (CLS + distillation + registers)."""

_CHUNK = 256  # images read from a run file at a time


# ------------------------------------------------------------------------------------------ helpers
def infer_prefix_tokens(num_tokens: int) -> int:
    """Prefix tokens of a square patch grid: ``num_tokens`` minus the largest square below it.

    A fallback for reducers fed by a recording that did not say (``batch.meta["num_prefix_tokens"]`` or the
    constructor argument win). It is exact for square grids with at most :data:`MAX_INFERRED_PREFIX` prefix
    tokens, which covers CLS, DeiT's distillation token and up to 4 registers plus CLS on grids from 5x5 up;
    anything else raises instead of guessing.
    """
    side = math.isqrt(int(num_tokens))
    prefix = int(num_tokens) - side * side
    if side == 0 or prefix > MAX_INFERRED_PREFIX:
        raise QKHooksError(
            f"cannot tell the prefix tokens of a {num_tokens}-token sequence (not a square grid plus at most "
            f"{MAX_INFERRED_PREFIX} prefix tokens); pass num_prefix_tokens=... to the reducer or put it in the "
            "batch metadata (run(images, meta={'num_prefix_tokens': site.num_prefix_tokens}))."
        )
    return prefix


def _resolve_prefix(fixed: int | None, meta: Mapping[str, Any], num_tokens: int) -> int:
    prefix = fixed if fixed is not None else meta.get("num_prefix_tokens")
    prefix = infer_prefix_tokens(num_tokens) if prefix is None else int(prefix)
    if not 0 <= prefix < num_tokens:
        raise QKHooksError(f"num_prefix_tokens={prefix} leaves no patch token in a {num_tokens}-token sequence.")
    return prefix


def _grid_of(patches: int, grid: Sequence[int] | None = None) -> tuple[int, int]:
    """The patch grid: ``grid`` when it fits, else the square one; anything else is an error."""
    if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == patches:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(patches)
    if side * side != patches:
        raise QKHooksError(
            f"{patches} patch tokens do not make a square grid; give the grid (rows, cols) explicitly "
            "(run info 'grid', or grid=... to the function)."
        )
    return side, side


def signed_scores(query: torch.Tensor, key: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Ranking scores (B, H, K, 2) of both signs from maps (B, H, K, N), in float32 (float64 stays).

    Sign +1: max(0, max_t q) * max(0, max_t k); sign -1: the same for (-q, -k), i.e. max(0, -min q) *
    max(0, -min k). Only patch tokens (t >= num_prefix_tokens) count. NaN scores become -inf (never kept).
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    q_min, q_max = _token_extremes(query[..., num_prefix_tokens:])
    k_min, k_max = _token_extremes(key[..., num_prefix_tokens:])
    q_min, q_max, k_min, k_max = (t.to(dtype) for t in (q_min, q_max, k_min, k_max))
    plus = q_max.clamp_min(0) * k_max.clamp_min(0)
    minus = (-q_min).clamp_min(0) * (-k_min).clamp_min(0)
    out = torch.stack([plus, minus], dim=-1)
    return torch.nan_to_num(out, nan=-math.inf)


def _token_extremes(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the last (token) axis. Maps from the q/k path are transposed views whose token axis is
    strided; reducing a contiguous copy is ~8x faster on the CPU than reducing the view (and than aminmax)."""
    maps = maps.contiguous()
    return maps.amin(-1), maps.amax(-1)


def _rank(score: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the first ``k`` entries along the last axis by (score descending, index ascending).

    Two stable sorts make the order total and backend-independent (torch.topk breaks ties arbitrarily).
    """
    by_index = torch.argsort(index, dim=-1, stable=True)
    by_score = torch.argsort(score.gather(-1, by_index), dim=-1, descending=True, stable=True)
    return by_index.gather(-1, by_score)[..., :k]


def _take(values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``values`` (..., M) or (..., M, N) gathered at positions ``pos`` (..., k) along M."""
    if values.dim() == pos.dim():
        return values.gather(-1, pos)
    # Whole rows of N: one index_select of contiguous rows, not an element-wise gather (same values, faster).
    *lead, m, n = values.shape
    rows = values.reshape(-1, m, n)
    flat = (pos.reshape(rows.shape[0], -1) + m * torch.arange(rows.shape[0], device=pos.device)[:, None]).flatten()
    return rows.reshape(-1, n).index_select(0, flat).view(*pos.shape, n)


# -------------------------------------------------------------------------------------- top-k reducer
class TopKModes(Reducer):
    """Streaming top-k images per (layer, head, mode, sign) by the paper's ranking score.

    State per layer, kept on the maps' device while streaming (sign axis: 0 = (u, v), 1 = (-u, -v)):

    - ``score`` (H, K, 2, k) float32, decreasing; ``-inf`` marks an empty slot (fewer than k images seen);
    - ``index`` (H, K, 2, k) int64 global image index (``batch.offset + i``; -1 for an empty slot);
    - ``query``, ``key`` (H, K, 2, k, N): the maps of the kept images over all tokens, already multiplied by
      the sign, so they are exactly the maps of the ranked (signed) mode; stored in ``map_dtype``.

    Each batch is first cut to its own top-k, then merged with the state by one total order (score
    descending, then lower image index), so memory is independent of the dataset size and any split of the
    images, merged in any order, gives the one-pass result exactly.

    Args:
        k: images kept per (layer, head, mode, sign).
        num_prefix_tokens: tokens before the patches; None reads ``batch.meta["num_prefix_tokens"]`` and
            falls back to :func:`infer_prefix_tokens`.
        map_dtype: storage dtype of the kept maps (float16 halves the run file's reducer state).
    """

    name = "topk_modes"
    needs_modes = True

    def __init__(self, k: int = 8, num_prefix_tokens: int | None = None, map_dtype: str | torch.dtype = "float16"):
        if int(k) < 1:
            raise QKHooksError(f"TopKModes needs k >= 1 images per mode, got k={k}.")
        self.k = int(k)
        self.num_prefix_tokens = None if num_prefix_tokens is None else int(num_prefix_tokens)
        self.map_dtype = getattr(torch, map_dtype, None) if isinstance(map_dtype, str) else map_dtype
        if self.map_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise QKHooksError(f"map_dtype must be a float dtype such as 'float16' or 'float32', got {map_dtype!r}.")
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.images = 0

    def __repr__(self) -> str:
        return f"TopKModes(k={self.k}, layers={sorted(self.layers)}, images={self.images})"

    # ---------------------------------------------------------------- streaming
    def _empty(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, m, n = like.shape
        dev = like.device
        return {
            "score": torch.full((h, m, 2, self.k), -math.inf, dtype=torch.float32, device=dev),
            "index": torch.full((h, m, 2, self.k), -1, dtype=torch.int64, device=dev),
            "query": torch.zeros((h, m, 2, self.k, n), dtype=self.map_dtype, device=dev),
            "key": torch.zeros((h, m, 2, self.k, n), dtype=self.map_dtype, device=dev),
        }

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = a["score"].device
        both = {name: torch.cat([a[name], b[name].to(dev, a[name].dtype)], dim=3) for name in a}
        pos = _rank(both["score"], both["index"], self.k)
        return {name: _take(value, pos) for name, value in both.items()}

    def _fold(self, layer: int, query: torch.Tensor, key: torch.Tensor, offset: int, prefix: int) -> None:
        if query.dim() != 4 or key.shape != query.shape:
            raise QKHooksError(
                f"layer {layer}: query/key maps must both be (batch, heads, modes, tokens), got "
                f"{tuple(query.shape)} and {tuple(key.shape)}."
            )
        b, h, m, n = query.shape
        state = self.layers.get(layer)
        if state is None:
            state = self.layers[layer] = self._empty(query)
        if state["score"].device != query.device:  # a restored (CPU) state follows the maps to their device
            state = self.layers[layer] = {name: v.to(query.device) for name, v in state.items()}
        if state["query"].shape[:2] != (h, m) or state["query"].shape[-1] != n:
            raise QKHooksError(
                f"layer {layer}: maps of shape (heads={h}, modes={m}, tokens={n}) do not match the earlier "
                f"{tuple(state['query'].shape[:2])} x {state['query'].shape[-1]} tokens; keep one model, mode count "
                "and image size per reducer."
            )
        score = signed_scores(query, key, prefix).float().permute(1, 2, 3, 0)  # (H, K, 2, B), ranked as stored
        index = (int(offset) + torch.arange(b, device=score.device)).expand_as(score)
        pos = _rank(score, index, min(self.k, b))  # the batch's own top-k first: never gather B maps
        sign = torch.tensor(SIGNS, device=query.device, dtype=self.map_dtype).view(1, 1, 2, 1, 1)

        def maps(x: torch.Tensor) -> torch.Tensor:  # both signs pick from the same B maps: no expanded copy
            per = x.permute(1, 2, 0, 3)  # (H, K, B, N)
            return _take(per, pos.reshape(h, m, -1)).view(h, m, 2, -1, n).to(self.map_dtype) * sign

        cand = {"score": score.gather(-1, pos), "index": index.gather(-1, pos), "query": maps(query), "key": maps(key)}
        self.layers[layer] = self._combine(state, cand)

    def update(self, batch: BatchCapture) -> None:
        """Fold one batch: every layer that has query/key maps."""
        layers = {l: c for l, c in batch.captures.items() if c.query is not None and c.key is not None}
        if not layers:
            raise QKHooksError("TopKModes needs query/key maps: record with modes=K (e.g. qkhooks.record(model, modes=16)).")
        for layer, cap in sorted(layers.items()):
            prefix = _resolve_prefix(self.num_prefix_tokens, batch.meta, int(cap.query.shape[-1]))
            if self.num_prefix_tokens is None:
                self.num_prefix_tokens = prefix
            self._fold(layer, cap.query, cap.key, batch.offset, prefix)
        self.images += batch.size

    def merge(self, other: Reducer) -> None:
        """Fold a reducer that saw a disjoint set of images (same k and prefix)."""
        self._check_same_kind(other)
        assert isinstance(other, TopKModes)
        if other.k != self.k:
            raise QKHooksError(f"cannot merge TopKModes with k={other.k} into k={self.k}; use one k for all parts.")
        if None not in (self.num_prefix_tokens, other.num_prefix_tokens) and self.num_prefix_tokens != other.num_prefix_tokens:
            raise QKHooksError(
                f"cannot merge TopKModes scored with {other.num_prefix_tokens} prefix tokens into one with "
                f"{self.num_prefix_tokens}; they come from different models."
            )
        for layer, state in other.layers.items():
            mine = self.layers.get(layer)
            if mine is None:
                self.layers[layer] = {k: v.to(dtype=self.map_dtype, copy=True) if k in ("query", "key") else v.clone()
                                      for k, v in state.items()}
                continue
            if mine["query"].shape != state["query"].shape:
                raise QKHooksError(
                    f"cannot merge TopKModes with different shapes at layer {layer}: "
                    f"{tuple(mine['query'].shape)} vs {tuple(state['query'].shape)}."
                )
            self.layers[layer] = self._combine(mine, state)
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = other.num_prefix_tokens
        self.images += other.images

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Per-layer arrays stacked along a leading layer axis (``layers`` names them); maps in ``map_dtype``."""
        layers = sorted(self.layers)
        shapes = {tuple(self.layers[l]["query"].shape) for l in layers}
        if len(shapes) > 1:
            raise QKHooksError(f"TopKModes.state_dict needs the same heads, modes and tokens in every layer, got {shapes}.")
        out: dict[str, Any] = {
            "layers": np.asarray(layers, dtype=np.int64),
            "k": self.k,
            "images": int(self.images),
            "num_prefix_tokens": -1 if self.num_prefix_tokens is None else int(self.num_prefix_tokens),
        }
        np_dtype = {torch.bfloat16: np.float32}.get(self.map_dtype, None)
        for name in ("score", "index", "query", "key"):
            if not layers:
                stored = torch.int64 if name == "index" else torch.float32 if name == "score" or np_dtype else self.map_dtype
                out[name] = torch.zeros(0, dtype=stored).numpy()  # an empty state still names its map dtype
                continue
            stacked = torch.stack([self.layers[l][name].detach() for l in layers]).cpu()
            if name in ("query", "key") and np_dtype is not None:
                stacked = stacked.float()
            out[name] = stacked.numpy()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors on the CPU; they move to the maps' device on the next update)."""
        missing = [k for k in ("layers", "k", "score", "index", "query", "key") if k not in state]
        if missing:
            raise QKHooksError(f"not a TopKModes state: missing {missing}.")
        k = int(np.asarray(state["k"]))
        if k != self.k:
            raise QKHooksError(f"this TopKModes keeps k={self.k} images but the saved state has k={k}; build TopKModes(k={k}).")
        prefix = int(np.asarray(state.get("num_prefix_tokens", -1)))
        self.num_prefix_tokens = None if prefix < 0 else prefix
        self.images = int(np.asarray(state.get("images", 0)))
        layers = [int(l) for l in np.asarray(state["layers"]).reshape(-1)]
        self.layers = {}
        for i, layer in enumerate(layers):
            self.layers[layer] = {
                "score": torch.as_tensor(np.asarray(state["score"][i], dtype=np.float32)),
                "index": torch.as_tensor(np.asarray(state["index"][i], dtype=np.int64)),
                "query": torch.as_tensor(np.asarray(state["query"][i])).to(self.map_dtype),
                "key": torch.as_tensor(np.asarray(state["key"][i])).to(self.map_dtype),
            }

    def top(self, layer: int, head: int, mode: int, sign: str | int = "both", k: int | None = None) -> dict[str, np.ndarray]:
        """The kept images of one mode, best first (see :func:`top_images`)."""
        if layer not in self.layers:
            raise QKHooksError(f"TopKModes has no layer {layer}; it has {sorted(self.layers)}.")
        state = {name: v.detach().cpu().float().numpy() if name != "index" else v.cpu().numpy()
                 for name, v in self.layers[layer].items()}
        return top_images(state, head, mode, sign, k)


def layer_state(state: Mapping[str, Any], layer: int) -> dict[str, np.ndarray]:
    """One layer's ``score``/``index``/``query``/``key`` out of a stacked :meth:`TopKModes.state_dict`."""
    layers = [int(l) for l in np.asarray(state["layers"]).reshape(-1)]
    if layer not in layers:
        raise QKHooksError(f"the top-k state has no layer {layer}; it has {layers}.")
    i = layers.index(layer)
    return {name: np.asarray(state[name][i]) for name in ("score", "index", "query", "key")}


def top_images(
    state: Mapping[str, np.ndarray], head: int, mode: int, sign: str | int = "both", k: int | None = None
) -> dict[str, np.ndarray]:
    """The best images of one mode from one layer's state, in ranking order.

    Args:
        state: one layer's arrays (see :func:`layer_state`): score/index (H, K, 2, k), query/key (..., N).
        head, mode: 0-based.
        sign: ``+1``/``"+"`` ranks (u, v), ``-1``/``"-"`` ranks (-u, -v), ``"both"`` (default) ranks the
            *images* by their better sign (METHODS A.6/A.7: each image is scored for both signs and counted
            once): every image appears at most once, with the score, sign and signed maps of the sign that
            scores higher (ties: sign +1), and images are ordered by that score (ties: the lower index).
        k: at most this many images (default and maximum: the state's k). With ``"both"`` the first k distinct
            images are exact: an image among the best k by its better score holds that sign's slot among the
            best k of that sign, so it is in the state, with the right maps.

    Returns:
        ``index`` (k',) int, ``score`` (k',), ``sign`` (k',) +-1, ``query``/``key`` (k', N) signed maps.
        Empty slots (fewer images than k) are left out.
    """
    signs = {"both": (0, 1), "+": (0,), "-": (1,), 1: (0,), -1: (1,), "+1": (0,), "-1": (1,)}.get(sign)  # type: ignore[call-overload]
    if signs is None:
        raise QKHooksError(f"sign must be +1, -1 or 'both', got {sign!r}.")
    heads, modes, _, slots = np.asarray(state["score"]).shape
    if not (0 <= head < heads and 0 <= mode < modes):
        raise QKHooksError(f"head {head}, mode {mode} is outside this state's {heads} heads x {modes} modes.")
    limit = slots if k is None else min(int(k), slots)
    parts: dict[str, list[np.ndarray]] = {"index": [], "score": [], "sign": [], "query": [], "key": []}
    for s in signs:
        parts["index"].append(np.asarray(state["index"][head, mode, s]).astype(np.int64))
        parts["score"].append(np.asarray(state["score"][head, mode, s], dtype=np.float64))
        parts["sign"].append(np.full(parts["index"][-1].shape, SIGNS[s], dtype=np.int64))
        parts["query"].append(np.asarray(state["query"][head, mode, s], dtype=np.float32))
        parts["key"].append(np.asarray(state["key"][head, mode, s], dtype=np.float32))
    out = {name: np.concatenate(v) for name, v in parts.items()}
    keep = (out["index"] >= 0) & np.isfinite(out["score"])
    order = np.lexsort((-out["sign"], out["index"], -out["score"]))  # last key sorts first
    order = order[keep[order]]
    if len(signs) == 2:  # one entry per image: its first, i.e. its better-scoring sign (ties: +1)
        _, first = np.unique(out["index"][order], return_index=True)
        order = order[np.sort(first)]
    order = order[:max(limit, 0)]
    return {name: v[order] for name, v in out.items()}


# ------------------------------------------------------------------------------------ anisotropy
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

    def __repr__(self) -> str:
        return f"AnisotropyReducer(layers={sorted(self.sums)}, images={max(self.count.values(), default=0)})"

    def centre_token(self, num_tokens: int, meta: Mapping[str, Any] | None = None) -> int:
        """Index of the centre patch token in a sequence of ``num_tokens``."""
        meta = meta or {}
        prefix = _resolve_prefix(self.num_prefix_tokens, meta, num_tokens)
        rows, cols = _grid_of(num_tokens - prefix, self.grid or meta.get("grid"))
        return prefix + (rows // 2) * cols + cols // 2

    def update(self, batch: BatchCapture) -> None:
        """Fold one batch: every layer whose tokens were kept."""
        layers = {l: c.inputs for l, c in batch.captures.items() if c.inputs is not None}
        if not layers:
            raise QKHooksError("AnisotropyReducer needs the captured tokens: record with keep_inputs=True.")
        for layer, x in sorted(layers.items()):
            if x.dim() != 3:
                raise QKHooksError(f"layer {layer}: tokens must be (batch, tokens, dim), got {tuple(x.shape)}.")
            centre = self.centre_token(int(x.shape[1]), batch.meta)
            if self.num_prefix_tokens is None:
                self.num_prefix_tokens = _resolve_prefix(None, batch.meta, int(x.shape[1]))
            dtype = torch.float32 if x.device.type == "mps" else torch.float64
            z = x[:, centre].to(dtype)
            norm = z.norm(dim=-1, keepdim=True)
            ok = norm.squeeze(-1) > 0
            part = (z / norm.clamp_min(torch.finfo(dtype).tiny))[ok].sum(0)
            if layer in self.sums:
                if self.sums[layer].shape != part.shape:
                    raise QKHooksError(f"layer {layer}: width {part.shape[0]} differs from the earlier {self.sums[layer].shape[0]}.")
                self.sums[layer] = self.sums[layer].to(part.device, part.dtype) + part
                self.count[layer] += int(ok.sum())
            else:
                self.sums[layer], self.count[layer] = part, int(ok.sum())

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
        widths = {int(self.sums[l].shape[0]) for l in layers}
        if len(widths) > 1:
            raise QKHooksError(f"AnisotropyReducer.state_dict needs one width in every layer, got {sorted(widths)}.")
        return {
            "layers": np.asarray(layers, dtype=np.int64),
            "count": np.asarray([self.count[l] for l in layers], dtype=np.int64),
            "sum": np.stack([self.sums[l].detach().double().cpu().numpy() for l in layers]) if layers else np.zeros((0, 0)),
            "num_prefix_tokens": -1 if self.num_prefix_tokens is None else int(self.num_prefix_tokens),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("layers", "count", "sum") if k not in state]
        if missing:
            raise QKHooksError(f"not an AnisotropyReducer state: missing {missing}.")
        layers = [int(l) for l in np.asarray(state["layers"]).reshape(-1)]
        counts = np.asarray(state["count"]).reshape(-1)
        self.sums = {l: torch.as_tensor(np.asarray(state["sum"][i], dtype=np.float64)) for i, l in enumerate(layers)}
        self.count = {l: int(c) for l, c in zip(layers, counts)}
        prefix = int(np.asarray(state.get("num_prefix_tokens", -1)))
        self.num_prefix_tokens = None if prefix < 0 else prefix


class CentreEmbeddings(AnisotropyReducer):
    """The unit centre-patch embeddings of each image, per layer: what the anisotropy baseline averages, kept
    so that its uncertainty over images can be measured (:func:`anisotropy_interval`).

    Keeps the first ``max_images`` images (float32, images x layers x d: 2048 x 12 x 384 is 38 MB); the
    baseline itself comes from :class:`AnisotropyReducer`, which sees every image.
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
        for layer, x in sorted((l, c.inputs) for l, c in batch.captures.items() if c.inputs is not None):
            centre = self.centre_token(int(x.shape[1]), batch.meta)
            z = x[:room, centre].double()
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            self.vectors.setdefault(layer, []).append(z.float().cpu().numpy())

    def merge(self, other: Reducer) -> None:
        self._check_same_kind(other)
        assert isinstance(other, CentreEmbeddings)
        for layer, vs in other.vectors.items():
            self.vectors.setdefault(layer, []).extend(vs)

    def state_dict(self) -> dict[str, Any]:
        layers = sorted(self.vectors)
        return {"layers": np.asarray(layers, dtype=np.int64),
                "vectors": np.stack([np.concatenate(self.vectors[l]) for l in layers], 1) if layers
                else np.zeros((0, 0, 0), np.float32)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vectors = np.asarray(state["vectors"])
        self.vectors = {int(l): [vectors[:, i]] for i, l in enumerate(np.asarray(state["layers"]).reshape(-1))}


def anisotropy_interval(vectors: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean cosine between different images' unit vectors (n, d), with a 95% bootstrap interval over images.

    A resample with counts c_i uses the pairs of different images only: (c'Gc - sum c_i^2) / (n^2 - sum c_i^2),
    G the Gram matrix (unit diagonal), so an image drawn twice is never compared with itself.
    """
    z = np.asarray(vectors, dtype=np.float64)
    n = z.shape[0]
    if n < 2:
        return math.nan, math.nan, math.nan
    G = z @ z.T
    value = float((G.sum() - np.trace(G)) / (n * (n - 1)))
    if n < 3:
        return value, math.nan, math.nan
    c = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_boot).astype(np.float64)
    sq = (c**2).sum(1)
    boot = (np.einsum("bi,ij,bj->b", c, G, c) - (c**2 * np.diag(G)).sum(1)) / np.maximum(n * n - sq, 1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return value, float(low), float(high)


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
    """Mean over heads of each head's sigma-weighted *sum* of cosines (paper's formula, METHODS A.2/A.7):
    ``LayerSpectrum.cosine_weighted.mean()`` from S and cos alone (tests check the two agree on a run)."""
    return float(head_weighted_cosines(S, cos).mean())


def anisotropy_table(spectra: Mapping[int, Mapping[str, Any]], baselines: Mapping[int, float]) -> dict[str, Any]:
    """Per layer: baseline, sigma-weighted cosine and its relative value; per mode: relative cosine.

    Args:
        spectra: layer -> {"S": (H, K), "cos": (H, K)} of the stored modes, plus "S_all", "cos_all" (H, d_k)
            of every mode where the run has them: the weighted cosine is then over all modes, as in Fig. 3 and
            ``qkhooks spectrum``, otherwise over the K stored ones. Per-mode rows are the stored modes.
        baselines: layer -> anisotropy baseline.
    """
    layers = [l for l in sorted(spectra) if l in baselines]
    rows = []
    for layer in layers:
        S, cos = np.asarray(spectra[layer]["S"], np.float64), np.asarray(spectra[layer]["cos"], np.float64)
        base = float(baselines[layer])
        every = "S_all" in spectra[layer] and "cos_all" in spectra[layer]
        weighted = _weighted_cos(*(np.asarray(spectra[layer][k], np.float64) for k in ("S_all", "cos_all"))) if every \
            else _weighted_cos(S, cos)
        rows.append({"layer": layer, "baseline": base, "cos_weighted": weighted, "relative_cos_weighted": weighted - base,
                     "relative_cos": relative_cosine(cos, base).tolist(), "cos": cos.tolist(), "S": S.tolist()})
    return {"layers": layers, "rows": rows}


# ----------------------------------------------------------------------------------- same object
def optimal_objects(maps: Any, objects: Any) -> np.ndarray:
    """Per image, the object with the largest mean map value over its patches (METHODS A.6, A.7).

    Args:
        maps: (T, P) patch maps (prefix tokens already dropped) or (T, gh, gw).
        objects: (T, gh, gw) or (T, P) integer labels on the patch grid, 0 = background.

    Returns:
        (T,) int64 label of the optimal object (ties: the lowest label), 0 for an image with no object.
    """
    maps = np.asarray(maps, dtype=np.float64)
    objects = np.asarray(objects)
    t = maps.shape[0]
    maps, objects = maps.reshape(t, -1), objects.reshape(objects.shape[0], -1)
    if objects.shape != maps.shape:
        raise QKHooksError(f"maps {maps.shape} and object labels {objects.shape} must cover the same patches.")
    if objects.dtype.kind not in "iu" or (objects.size and objects.min() < 0):
        raise QKHooksError("object labels must be integers >= 0 (0 = background).")
    out = np.zeros(t, dtype=np.int64)
    for i in range(t):
        lab = objects[i].astype(np.int64)
        count = np.bincount(lab)
        total = np.bincount(lab, weights=maps[i])
        present = np.flatnonzero(count > 0)
        present = present[present > 0]
        if present.size:
            mean = total[present] / count[present]
            mean = np.where(np.isnan(mean), -np.inf, mean)
            out[i] = present[int(np.argmax(mean))]  # argmax: first (lowest label) on ties
    return out


def same_object_probability(
    query: Any, key: Any, objects: Any, num_prefix_tokens: int = 0
) -> tuple[float, int]:
    """Fraction of images where the query side and the key side pick the same object (Fig. 5).

    Args:
        query, key: (T, N) signed maps of one mode's top images over all tokens.
        objects: (T, gh, gw) labels on the patch grid (0 = background); gh * gw = N - num_prefix_tokens.
        num_prefix_tokens: tokens before the patches, dropped.

    Returns:
        (probability, images used); images with no object are not counted (NaN when none is left).
    """
    query, key, objects = np.asarray(query), np.asarray(key), np.asarray(objects)
    if query.shape != key.shape or query.ndim != 2:
        raise QKHooksError(f"query and key maps must both be (images, tokens), got {query.shape} and {key.shape}.")
    patches = query.shape[1] - int(num_prefix_tokens)
    if objects.shape[0] != query.shape[0] or int(np.prod(objects.shape[1:])) != patches:
        raise QKHooksError(
            f"object labels {objects.shape} do not fit {query.shape[0]} images x {patches} patch tokens "
            f"({query.shape[1]} tokens - {num_prefix_tokens} prefix)."
        )
    q_obj = optimal_objects(query[:, num_prefix_tokens:], objects)
    k_obj = optimal_objects(key[:, num_prefix_tokens:], objects)
    valid = (q_obj > 0) & (k_obj > 0)
    used = int(valid.sum())
    return (float(np.mean(q_obj[valid] == k_obj[valid])) if used else math.nan), used


def chance_same_object(objects: Any) -> float:
    """Same-object probability if the key side picked one of the image's objects at random: the mean over
    images with at least one object of 1 / (objects in the image). Fig. 5's chance line."""
    labels = np.asarray(objects)
    counts = np.array([np.count_nonzero(np.unique(lab) > 0) for lab in labels.reshape(len(labels), -1)])
    counts = counts[counts > 0]
    return float(np.mean(1.0 / counts)) if counts.size else math.nan


def _read_rows(array: Any, indices: np.ndarray) -> dict[int, np.ndarray]:
    """Rows of a (lazy) per-image array by index, reading each needed row once."""
    uniq = np.unique(indices[indices >= 0])
    if uniq.size == 0:
        return {}
    total = int(np.prod(array.shape))
    if total <= 50_000_000 or uniq.size > array.shape[0] // 4:
        full = np.asarray(array[:])
        return {int(i): full[i] for i in uniq}
    return {int(i): np.asarray(array[int(i)]) for i in uniq}


def same_object_table(
    topk: Mapping[str, Any],
    objects: Any,
    spectra: Mapping[int, Mapping[str, Any]],
    num_prefix_tokens: int,
    top: int = 5,
    sign: str | int = "both",
) -> dict[str, Any]:
    """Same-object probability per mode and per layer from a stacked top-k state and per-image object labels.

    Per mode: its ``top`` best distinct images (:func:`top_images`; with the default ``sign="both"`` each image
    is scored for both signs and counted once, with the maps of its better sign; ``top`` is capped at the
    state's k); per layer:
    ``p_same`` = mean over heads of each head's sigma-weighted average over its modes (weights renormalised
    over the modes that have a value, like the cosine average of METHODS A.7), plus ``p_same_pooled``
    (sum sigma p / sum sigma over all modes of the layer) and ``p_same_unweighted``.

    Args:
        topk: :meth:`TopKModes.state_dict` (numpy).
        objects: (n, gh, gw) integer labels per image (e.g. the run's ``masks/objects``), lazily indexable.
        spectra: layer -> {"S": (H, K)}.
    """
    layers = [int(l) for l in np.asarray(topk["layers"]).reshape(-1) if int(l) in spectra]
    needed = np.concatenate([np.asarray(topk["index"]).reshape(-1)]) if layers else np.zeros(0, np.int64)
    rows_by_index = _read_rows(objects, needed)
    out_layers = []
    for layer in layers:
        st = layer_state(topk, layer)
        S = np.asarray(spectra[layer]["S"], dtype=np.float64)
        heads, modes = st["score"].shape[:2]
        p = np.full((heads, modes), np.nan)
        used = np.zeros((heads, modes), dtype=np.int64)
        for h in range(heads):
            for m in range(modes):
                best = top_images(st, h, m, sign, top)
                if best["index"].size == 0:
                    continue
                labels = np.stack([rows_by_index[int(i)] for i in best["index"]])
                p[h, m], used[h, m] = same_object_probability(best["query"], best["key"], labels, num_prefix_tokens)
        w = np.where(np.isnan(p), 0.0, S[:, :modes])
        pz = np.nan_to_num(p)
        head_w = w.sum(1)
        per_head = np.where(head_w > 0, (w * pz).sum(1) / np.maximum(head_w, 1e-300), np.nan)
        out_layers.append({
            "layer": layer,
            "p_same": float(np.nanmean(per_head)) if np.isfinite(per_head).any() else math.nan,
            "p_same_pooled": float((w * pz).sum() / w.sum()) if w.sum() > 0 else math.nan,
            "p_same_unweighted": float(np.nanmean(p)) if np.isfinite(p).any() else math.nan,
            "per_head": per_head.tolist(),
            "per_mode": p.tolist(),
            "images_used": used.tolist(),
            "modes_with_value": int(np.isfinite(p).sum()),
        })
    return {"layers": [r["layer"] for r in out_layers], "rows": out_layers, "top": int(top), "sign": str(sign)}


# ---------------------------------------------------------------------------------------- figures
def map_to_grid(values: Any, num_prefix_tokens: int, grid: Sequence[int] | None = None) -> np.ndarray:
    """A map over all tokens (N,) -> its patch part on the grid (gh, gw) (row-major, as ViTs order patches)."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    patches = values.shape[0] - int(num_prefix_tokens)
    rows, cols = _grid_of(patches, grid)
    return values[int(num_prefix_tokens):].reshape(rows, cols)


def _normalise(m: np.ndarray, how: str) -> np.ndarray:
    if how == "max":  # positive part over its maximum
        top = float(np.nanmax(m)) if m.size else 0.0
        return np.clip(m, 0, None) / top if top > 0 else np.zeros_like(m)
    if how == "percentile":  # the authors' display: clip to the 30th-95th percentile, scale to [0, 1]
        lo, hi = np.nanpercentile(m, [30, 95])
        return (np.clip(m, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    raise QKHooksError(f"normalize must be 'max' or 'percentile', got {how!r}.")


def _bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a 2-D map with half-pixel centres (torch's ``align_corners=False``).

    Separable gathers and blends in plain numpy: no BLAS call, whose threads stall on a busy machine.
    """

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    m = np.asarray(m, dtype=np.float32)
    r0, r1, fr = axis(size[0], m.shape[0])
    c0, c1, fc = axis(size[1], m.shape[1])
    rows = m[r0] * (1 - fr)[:, None] + m[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc)[None, :] + rows[:, c1] * fc[None, :]


def overlay(
    image: np.ndarray | None,
    query_grid: np.ndarray,
    key_grid: np.ndarray,
    size: tuple[int, int] | None = None,
    normalize: str = "max",
    dim: float = 0.35,
) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1]: query map in red, key map in green+blue (cyan), overlap white.

    Each patch-grid map is upsampled bilinearly to the image and normalised (``"max"``: positive part over
    its maximum; ``"percentile"``: the authors' 30th-95th percentile clip), then added to the dimmed
    grayscale image (``dim`` x luminance; black without an image).
    """
    if image is not None:
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[2] != 3:
            raise QKHooksError(f"image must be (H, W, 3) in [0, 1], got {image.shape}.")
        h, w = image.shape[:2]
    else:
        g = np.asarray(query_grid).shape
        h, w = size or (max(8 * g[0], 112), max(8 * g[1], 112))

    q, k = _normalise(_bilinear(query_grid, (h, w)), normalize), _normalise(_bilinear(key_grid, (h, w)), normalize)
    gray = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114 if image is not None else None
    base = np.zeros((h, w), np.float32) if gray is None else dim * gray
    return np.clip(base[..., None] + np.stack([q, k, k], axis=-1), 0.0, 1.0)


@dataclasses.dataclass
class Panel:
    """One image of a grid figure: the photo (or None), the two patch-grid maps and a caption."""

    image: np.ndarray | None
    query: np.ndarray
    key: np.ndarray
    caption: str = ""


def plot_overlay_grid(
    rows: Sequence[Sequence[Panel | None]],
    path: str | os.PathLike,
    title: str = "",
    row_labels: Sequence[str] | None = None,
    panel_px: int = 150,
    normalize: str = "max",
    dpi: int = 100,
) -> Path:
    """A grid of overlays with captions and row labels, written as a PNG of a predictable pixel size.

    The layout is in whole pixels (see :func:`grid_layout`: title band, row-label column, a caption band
    above each panel), so the PNG's size is known in advance and figures line up across modes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = len(rows)
    ncols = max((len(r) for r in rows), default=0)
    if nrows == 0 or ncols == 0:
        raise QKHooksError("plot_overlay_grid needs at least one panel.")
    width, height, box = grid_layout(nrows, ncols, panel_px, bool(row_labels))
    fig = plt.figure(figsize=((width + 0.01) / dpi, (height + 0.01) / dpi), dpi=dpi)
    fig.patch.set_facecolor("white")
    if title:
        fig.text(0.5, 1 - 17 / height, title, ha="center", va="center", fontsize=11, weight="bold")
    for r, row in enumerate(rows):
        if row_labels:
            x0, y0, _, _ = box(r, 0)
            fig.text(6 / width, 1 - (y0 + panel_px / 2) / height, row_labels[r], ha="left", va="center", fontsize=9)
        for c, panel in enumerate(row):
            if panel is None:
                continue
            x0, y0, pw, ph = box(r, c)
            ax = fig.add_axes((x0 / width, 1 - (y0 + ph) / height, pw / width, ph / height))
            ax.imshow(overlay(panel.image, panel.query, panel.key, normalize=normalize), interpolation="bilinear")
            ax.set_axis_off()
            if panel.caption:
                fig.text((x0 + pw / 2) / width, 1 - (y0 - 13) / height, panel.caption, ha="center", va="center", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def grid_layout(nrows: int, ncols: int, panel_px: int = 150, labels: bool = False):
    """Pixel size (width, height) of :func:`plot_overlay_grid`'s figure and ``box(r, c)`` -> (x, y, w, h) from top-left."""
    title_px, label_px, caption_px, gap = 34, (92 if labels else 4), 26, 4
    width = label_px + ncols * (panel_px + gap)
    height = title_px + nrows * (panel_px + caption_px + gap)

    def box(r: int, c: int) -> tuple[int, int, int, int]:
        return label_px + c * (panel_px + gap), title_px + r * (panel_px + caption_px + gap) + caption_px, panel_px, panel_px

    return width, height, box


def _short(text: str, n: int = 20) -> str:
    text = str(text)
    return text if len(text) <= n else "…" + text[-(n - 1):]


def mode_name(layer: int, head: int, mode: int) -> str:
    """The paper's label, 0-based: ``L6 H4 M1``."""
    return f"L{layer} H{head} M{mode}"


def plot_mode(
    state: Mapping[str, np.ndarray],
    layer: int,
    head: int,
    mode: int,
    path: str | os.PathLike,
    num_prefix_tokens: int,
    images: Mapping[int, np.ndarray | None] | None = None,
    ids: Sequence[str] | None = None,
    grid: Sequence[int] | None = None,
    cos: float | None = None,
    relative: float | None = None,
    sigma: float | None = None,
    k: int | None = None,
    normalize: str = "max",
) -> Path:
    """One mode's figure: its top-k images for sign + (u, v) and sign - (-u, -v), one row each.

    Args:
        state: one layer's top-k arrays (:func:`layer_state`).
        images: image index -> (H, W, 3) photo in [0, 1] (None or missing: maps on black).
        ids: image ids for the captions (by global index).
        cos, relative, sigma: shown in the title when given.
    """
    rows, labels = [], []
    for sign, label in ((1, "+\n(u, v)"), (-1, "−\n(−u, −v)")):
        best = top_images(state, head, mode, sign, k)
        row = []
        for rank, (i, score) in enumerate(zip(best["index"], best["score"])):
            name = _short(ids[int(i)], 16) if ids is not None and int(i) < len(ids) else f"#{int(i)}"
            row.append(Panel((images or {}).get(int(i)), map_to_grid(best["query"][rank], num_prefix_tokens, grid),
                             map_to_grid(best["key"][rank], num_prefix_tokens, grid), f"{rank + 1}. {name} s={score:.3g}"))
        rows.append(row or [None])
        labels.append(f"sign {label}")
    title = mode_name(layer, head, mode)
    extras = [f"cos {cos:+.2f}" if cos is not None else "", f"rel {relative:+.2f}" if relative is not None else "",
              f"σ {sigma:.3g}" if sigma is not None else ""]
    title += "   " + "  ".join(e for e in extras if e) + "   (red: query x·u, cyan: key x·v)"
    return plot_overlay_grid(rows, path, title, labels, normalize=normalize)


def plot_layer_overview(
    state: Mapping[str, np.ndarray],
    layer: int,
    path: str | os.PathLike,
    num_prefix_tokens: int,
    images: Mapping[int, np.ndarray | None] | None = None,
    ids: Sequence[str] | None = None,
    grid: Sequence[int] | None = None,
    cos: np.ndarray | None = None,
    mode: int = 0,
    per_head: int = 6,
    normalize: str = "max",
) -> Path:
    """One layer's sheet: a row per head with the best images of its leading mode.

    Each image appears once, with its better-scoring sign (``+``: (u, v), ``−``: (−u, −v), in the caption);
    :func:`plot_mode` shows the two signs' rankings separately.
    """
    heads = np.asarray(state["score"]).shape[0]
    rows, labels = [], []
    for h in range(heads):
        best = top_images(state, h, mode, "both", per_head)
        row = []
        for rank, (i, score, s) in enumerate(zip(best["index"], best["score"], best["sign"])):
            name = _short(ids[int(i)], 14) if ids is not None and int(i) < len(ids) else f"#{int(i)}"
            row.append(Panel((images or {}).get(int(i)), map_to_grid(best["query"][rank], num_prefix_tokens, grid),
                             map_to_grid(best["key"][rank], num_prefix_tokens, grid),
                             f"{'+' if s > 0 else '−'} {name} {score:.2g}"))
        rows.append(row or [None])
        c = f"\ncos {float(cos[h, mode]):+.2f}" if cos is not None else ""
        labels.append(f"H{h} M{mode}{c}")
    title = f"L{layer}: mode {mode} of each head (red: query, cyan: key; +/− = sign of the mode)"
    return plot_overlay_grid(rows, path, title, labels, panel_px=120, normalize=normalize)


# ----------------------------------------------------------------------------------------- driver
def _open_run(path: str | os.PathLike):
    try:
        from qkhooks.store import open_run
    except ImportError as exc:  # pragma: no cover - the store ships with qkhooks
        raise QKHooksError(f"qkhooks.store is not available ({exc}); reinstall qkhooks.") from None
    if not Path(path).exists():
        raise QKHooksError(f"run file {str(path)!r} does not exist; write one with `qkhooks record MODEL DATA --out RUN.h5`.")
    return open_run(path)


def _topk_from_maps(run: Any, layers: Sequence[int], k: int, prefix: int) -> TopKModes:
    """Stream a run's stored maps through a fresh :class:`TopKModes` (when its saved state does not fit)."""
    reducer = TopKModes(k=k, num_prefix_tokens=prefix)
    n = int(run.n)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        caps = {}
        for l in layers:
            q = torch.from_numpy(np.asarray(run.query(l)[lo:hi], dtype=np.float32))
            key = torch.from_numpy(np.asarray(run.key(l)[lo:hi], dtype=np.float32))
            caps[l] = LayerCapture(l, hi - lo, query=q, key=key)
        reducer.update(BatchCapture(ids=[], meta={"num_prefix_tokens": prefix}, captures=caps, offset=lo))
    return reducer


def _topk_state(run: Any, layers: Sequence[int] | None, k: int | None, prefix: int) -> tuple[dict[str, Any], str]:
    """The top-k state to analyse and where it came from: the saved reducer when it fits, else the maps."""
    saved = run.state(TopKModes.name)
    stored = [int(l) for l in run.mode_layers]
    reasons = []
    if saved is not None:
        saved_layers = [int(l) for l in np.asarray(saved["layers"]).reshape(-1)]
        want = saved_layers if layers is None else list(layers)
        problems = []
        if k is not None and int(np.asarray(saved["k"])) < k:
            problems.append(f"it keeps k={int(np.asarray(saved['k']))} < {k}")
        saved_prefix = int(np.asarray(saved.get("num_prefix_tokens", -1)))
        if saved_prefix not in (-1, prefix):
            problems.append(f"it was scored with {saved_prefix} prefix tokens, the model has {prefix}")
        if "images" in saved and int(np.asarray(saved["images"])) != int(run.n):
            problems.append(f"it covers {int(np.asarray(saved['images']))} of {run.n} images")
        missing = [l for l in want if l not in saved_layers]
        if missing:
            problems.append(f"it lacks layers {missing}")
        if not problems:
            return dict(saved), "reducer state saved with the run"
        reasons.append("the saved top-k state does not fit (" + "; ".join(problems) + ")")
    want = stored if layers is None else list(layers)
    if not stored or any(l not in stored for l in want):
        raise QKHooksError(
            f"{'; '.join(reasons) or 'the run has no saved top-k state'} and its stored maps cover layers {stored}, "
            f"not {want}; record the run with modes (the default --modes 16) and the TopKModes reducer."
        )
    reducer = _topk_from_maps(run, want, k or 8, prefix)
    return reducer.state_dict(), ("; ".join(reasons) + "; " if reasons else "") + "recomputed from the stored maps"


def _select_state(state: Mapping[str, Any], layers: Sequence[int], k: int | None) -> dict[str, Any]:
    """Keep only ``layers`` and the first ``k`` slots of a stacked top-k state."""
    all_layers = [int(l) for l in np.asarray(state["layers"]).reshape(-1)]
    idx = [all_layers.index(l) for l in layers]
    kk = int(np.asarray(state["k"])) if k is None else min(int(k), int(np.asarray(state["k"])))
    out = dict(state)
    out["layers"] = np.asarray(layers, dtype=np.int64)
    out["k"] = kk
    for name in ("score", "index"):
        out[name] = np.asarray(state[name])[idx][..., :kk]
    for name in ("query", "key"):
        out[name] = np.asarray(state[name])[idx][..., :kk, :]
    return out


def _image_config_for(attrs: Mapping[str, Any], given: Any) -> tuple[Any, str]:
    """The preprocessing to redraw the run's images: given, stored in the run, or from the model spec."""
    from qkhooks.data.preprocess import ImageConfig

    if given is not None:
        return given, "given"
    raw = attrs.get("image_config")
    if raw:
        try:
            cfg = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
            return ImageConfig(**cfg), "stored in the run"
        except (TypeError, ValueError, QKHooksError):
            pass
    spec = attrs.get("model")
    if not spec:
        return None, "the run names no model"
    try:  # only the preprocessing is needed: a random-init build reads the architecture's config, no weights
        from qkhooks.models.load import load_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_model(str(spec), random_init=True).image_config, f"from {spec}"
    except Exception as exc:  # no network, an unknown or unloadable spec
        return None, f"cannot rebuild the preprocessing of {spec!r} ({type(exc).__name__}: {exc})"


def load_images(attrs: Mapping[str, Any], ids: Sequence[str], wanted: Sequence[int], image_config: Any = None) -> tuple[dict[int, np.ndarray | None], str]:
    """Photos (H, W, 3) in [0, 1] in model-input geometry for the image indices ``wanted``, and a note.

    A run stores no pixels: the dataset is reopened from its spec (root attr ``data``) with the model's
    preprocessing and un-normalised. Anything missing gives no photos (maps on black) and says why.
    """
    cfg, how = _image_config_for(attrs, image_config)
    if cfg is None:
        return {}, f"no photos: {how}"
    spec = attrs.get("data")
    if not spec:
        return {}, "no photos: the run names no dataset"
    from qkhooks.data import open_dataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = open_dataset(str(spec), cfg)
    except Exception as exc:
        return {}, f"no photos: cannot reopen dataset {spec!r} ({type(exc).__name__}: {exc})"
    position = {id_: i for i, id_ in enumerate(dataset.ids)}
    mean = np.asarray(cfg.mean, np.float32)[:, None, None]
    std = np.asarray(cfg.std, np.float32)[:, None, None]
    out: dict[int, np.ndarray | None] = {}
    missing = 0
    for i in sorted(set(int(i) for i in wanted)):
        pos = position.get(ids[i]) if 0 <= i < len(ids) else None
        item = dataset[pos] if pos is not None else None
        if item is None:
            missing += 1
            out[i] = None
            continue
        pixels = item["pixel_values"].numpy() * std + mean
        out[i] = np.clip(pixels.transpose(1, 2, 0), 0.0, 1.0)
    note = f"photos from {spec!r}, preprocessing {how}"
    return out, note + (f"; {missing} image(s) not found in the dataset" if missing else "")


def _fmt(value: Any) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.6g}"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def analyze_modes(
    run_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    k: int | None = None,
    layers: Sequence[int] | str | None = None,
    figure_modes: int | None = 2,
    overview: bool = True,
    images: bool = True,
    image_config: Any = None,
    same_object_top: int = 5,
    normalize: str = "max",
) -> dict[str, Any]:
    """Top-k images per mode, same-object probability and anisotropy of a run file, as figures and tables.

    Args:
        run_path: a run written by :func:`qkhooks.stream.record_dataset` (``qkhooks record``).
        out_dir: where ``modes.json``, ``same_object.csv/.png``, ``anisotropy.csv/.png`` and ``figures/`` go.
        k: images per mode and sign (default: what the saved reducer kept, 8). A larger k than saved, a state
            that does not cover the run, or no state at all is recomputed from the stored maps.
        layers: block indices (``"0,3,5-7"``, a list, or None for all recorded); negative indices count back from
            the highest *recorded* layer (-1 = the last recorded one; see :func:`_choose_layers`), not from the
            model's last block as in ``qkhooks record``: a run does not store the model's depth.
        figure_modes: per head, draw a figure for its first this-many modes (None: all; 0: none).
        overview: draw one sheet per layer with the leading mode of every head.
        images: redraw the photos under the maps (reopens the dataset; off: maps on black).
        image_config: preprocessing to redraw the photos (default: stored in the run or from its model spec).
        same_object_top: images per mode for the same-object statistic (paper: 5).
        normalize: map display, ``"max"`` or ``"percentile"`` (see :func:`overlay`).

    Returns:
        The JSON summary (also written to ``modes.json``), with ``files``.
    """
    from qkhooks.models.base import parse_layers
    from qkhooks.plots import plot_anisotropy, plot_layer_curves

    out = Path(out_dir)
    with _open_run(run_path) as run:
        info = dict(run.info)
        prefix = int(info["num_prefix_tokens"])
        grid = info.get("grid")
        attrs = dict(run.attrs)
        ids = list(run.ids)
        n = int(run.n)
        if n == 0:
            raise QKHooksError(f"{run_path} holds no committed images yet.")
        available = sorted(set(int(l) for l in run.mode_layers) | set(_state_layers(run.state(TopKModes.name))))
        if not available:
            _no_modes(run, run_path)
        chosen = _choose_layers(parse_layers(layers) if isinstance(layers, str) or layers is None else list(layers), available)
        topk, source = _topk_state(run, chosen, k, prefix)
        chosen = chosen or [int(l) for l in np.asarray(topk["layers"]).reshape(-1)]
        topk = _select_state(topk, chosen, k)
        spectra = {l: {name: np.asarray(v) for name, v in run.spectrum_arrays(l).items()} for l in chosen}
        aniso_state = run.state(AnisotropyReducer.name)
        centre_state = run.state(CentreEmbeddings.name)
        objects = None
        if run.has("masks/objects"):
            objects = np.asarray(run.array("masks/objects")[:n])
    model, data = str(attrs.get("model", "")), str(attrs.get("data", ""))
    out.mkdir(parents=True, exist_ok=True)  # only once the run is known to hold what the analysis needs

    # --- anisotropy
    files: dict[str, str] = {}
    baselines = anisotropy_from_state(aniso_state) if aniso_state is not None else {}
    aniso = anisotropy_table(spectra, baselines)
    if aniso["layers"]:
        rows = []
        for r in aniso["rows"]:
            rows.append([r["layer"], "mean", "weighted", "", _fmt(r["cos_weighted"]), _fmt(r["baseline"]), _fmt(r["relative_cos_weighted"])])
            for h, (s_h, c_h) in enumerate(zip(r["S"], r["cos"])):
                for m, (s, c) in enumerate(zip(s_h, c_h)):
                    rows.append([r["layer"], h, m, _fmt(s), _fmt(c), _fmt(r["baseline"]), _fmt(c - r["baseline"])])
        files["anisotropy_csv"] = str(_write_csv(out / "anisotropy.csv", ["layer", "head", "mode", "sigma", "cos", "baseline", "relative_cos"], rows))
        if centre_state is not None:
            where = {int(l): i for i, l in enumerate(np.asarray(centre_state["layers"]).reshape(-1))}
            vectors = np.asarray(centre_state["vectors"])
            for r in aniso["rows"]:
                if r["layer"] in where:
                    _, r["baseline_low"], r["baseline_high"] = anisotropy_interval(vectors[:, where[r["layer"]]])
                    r["baseline_images"] = int(vectors.shape[0])
        ci = all("baseline_low" in r for r in aniso["rows"])
        files["anisotropy_png"] = str(plot_anisotropy(
            aniso["layers"], [r["baseline"] for r in aniso["rows"]],
            [r["baseline_low"] for r in aniso["rows"]] if ci else None,
            [r["baseline_high"] for r in aniso["rows"]] if ci else None,
            [r["cos_weighted"] for r in aniso["rows"]], out / "anisotropy.png",
            f"Anisotropy baseline: centre patches of {n} images of {data or 'the run'} — {model}"))

    # --- same object
    same = None
    if objects is not None:
        same = same_object_table(topk, objects, spectra, prefix, top=same_object_top)
        rows = []
        for r in same["rows"]:
            rows.append([r["layer"], "mean", "weighted", "", "", _fmt(r["p_same"]), _fmt(r["p_same_pooled"]), _fmt(r["p_same_unweighted"]), r["modes_with_value"]])
            S, cos = spectra[r["layer"]]["S"], spectra[r["layer"]]["cos"]
            for h, ph in enumerate(r["per_mode"]):
                for m, p in enumerate(ph):
                    rows.append([r["layer"], h, m, _fmt(S[h, m]), _fmt(cos[h, m]), _fmt(p), "", "", r["images_used"][h][m]])
        files["same_object_csv"] = str(_write_csv(
            out / "same_object.csv",
            ["layer", "head", "mode", "sigma", "cos", "p_same", "p_same_pooled", "p_same_unweighted", "images"], rows))
        if same["rows"]:
            from qkhooks.readings import layer_intervals

            per_head = np.array([r["per_head"] for r in same["rows"]], dtype=np.float64).T  # (heads, layers)
            _, low, high = layer_intervals(per_head)
            same["chance"] = chance_same_object(objects)
            weighted = "σ-weighted (per head, mean of heads)"
            files["same_object_png"] = str(plot_layer_curves(
                same["layers"],
                {weighted: [r["p_same"] for r in same["rows"]],
                 "unweighted": [r["p_same_unweighted"] for r in same["rows"]]},
                out / "same_object.png", ylabel="P(query and key pick the same object)",
                title=f"Same object or not: top-{same_object_top} of {n} images per mode — {Path(run_path).name}",
                bands={weighted: (low, high)}, references={f"chance ({same['chance']:.2f})": same["chance"]},
                ylim=(0, 1)))

    # --- figures
    kk = int(topk["k"])
    heads, modes = np.asarray(topk["score"]).shape[1:3] if chosen else (0, 0)
    n_fig = modes if figure_modes is None else min(int(figure_modes), modes)
    wanted: set[int] = set()
    for i, l in enumerate(chosen):
        idx = np.asarray(topk["index"][i])
        if n_fig:
            wanted.update(int(v) for v in idx[:, :n_fig].reshape(-1) if v >= 0)
        if overview:
            wanted.update(int(v) for v in idx[:, :1].reshape(-1) if v >= 0)
    photos, photo_note = (load_images(attrs, ids, sorted(wanted), image_config) if images and wanted
                          else ({}, "no photos (images=False)" if not images else "no figures"))
    figures: list[str] = []
    for l in chosen:
        st = layer_state(topk, l)
        cos = spectra[l]["cos"]
        if overview:
            figures.append(str(plot_layer_overview(st, l, out / "figures" / f"L{l}_overview.png", prefix, photos, ids,
                                                   grid, cos=cos, normalize=normalize)))
        for h in range(heads):
            for m in range(n_fig):
                rel = float(cos[h, m] - baselines[l]) if l in baselines and np.isfinite(baselines[l]) else None
                figures.append(str(plot_mode(st, l, h, m, out / "figures" / f"L{l}" / f"L{l}_H{h}_M{m}.png", prefix,
                                             photos, ids, grid, cos=float(cos[h, m]), relative=rel,
                                             sigma=float(spectra[l]["S"][h, m]), normalize=normalize)))

    # --- summary
    summary: dict[str, Any] = {
        "run": str(run_path), "model": model, "data": data, "images": n, "k": kk, "num_prefix_tokens": prefix,
        "topk_source": source, "photos": photo_note, "naming": "L{layer} H{head} M{mode}, all 0-based",
        "score": "max(0, max_t q) * max(0, max_t k) over patch tokens; sign -1 ranks (-q, -k)",
        "top_note": "per mode, the best k distinct images, each with its better-scoring sign (never listed twice)",
        "layers": [],
        "anisotropy": None if not aniso["layers"] else {r["layer"]: {k_: r[k_] for k_ in ("baseline", "baseline_low", "baseline_high", "cos_weighted", "relative_cos_weighted") if k_ in r} for r in aniso["rows"]},
        "anisotropy_note": ("cos_weighted is the sigma-weighted sum over the recorded modes only (the run keeps the "
                            f"top {int(np.asarray(topk['score']).shape[2]) if chosen else 0} per head), mean over heads; "
                            "baseline = mean cosine between centre-patch embeddings of different images")
        if aniso_state is not None else "the run has no anisotropy reducer state",
        "same_object": None if same is None else {
            "top": same_object_top, "sign": same["sign"],
            "chance": same.get("chance"),
            "layers": {r["layer"]: {k_: r[k_] for k_ in ("p_same", "p_same_pooled", "p_same_unweighted", "modes_with_value", "per_head")} for r in same["rows"]}},
        "same_object_note": None if objects is not None else "the run has no masks/objects (record a dataset with object masks)",
    }
    same_rows = {r["layer"]: r for r in same["rows"]} if same is not None else {}
    for l in chosen:
        st = layer_state(topk, l)
        entry: dict[str, Any] = {"layer": l, "heads": []}
        for h in range(heads):
            head_modes = []
            for m in range(modes):
                best = top_images(st, h, m, "both", kk)
                rec: dict[str, Any] = {
                    "mode": m, "name": mode_name(l, h, m), "sigma": float(spectra[l]["S"][h, m]), "cos": float(spectra[l]["cos"][h, m]),
                    "top": [{"index": int(ix), "id": ids[int(ix)] if int(ix) < len(ids) else None, "score": float(sc), "sign": int(sg)}
                            for ix, sc, sg in zip(best["index"], best["score"], best["sign"])],
                }
                if l in baselines:
                    rec["relative_cos"] = rec["cos"] - baselines[l]
                if same is not None and l in same_rows:
                    p = same_rows[l]["per_mode"][h][m]
                    rec["p_same"] = None if p is None or (isinstance(p, float) and math.isnan(p)) else p
                head_modes.append(rec)
            entry["heads"].append({"head": h, "modes": head_modes})
        summary["layers"].append(entry)
    files["figures"] = str(out / "figures") if figures else ""
    summary["files"] = {**files, "json": str(out / "modes.json"), "figure_count": len(figures)}
    (out / "modes.json").write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False))
    return summary


def _no_modes(run: Any, run_path: str | os.PathLike) -> None:
    """Raise the error for a run with neither stored query/key maps nor a saved top-k state."""
    config = run.config
    if "modes" not in config or config.get("modes") is None:
        raise QKHooksError(
            f"{run_path}: this run stored no modes (it was recorded with --modes 0/none); record with --modes K "
            "(e.g. --modes 16, the default) to analyse modes."
        )
    raise QKHooksError(
        f"{run_path}: this run stored no modes (recorded with --modes {config.get('modes')} but without per-image "
        "maps and without the topk_modes reducer); record with --modes K, the default reducers and the maps stored."
    )


def _state_layers(state: Mapping[str, Any] | None) -> list[int]:
    return [] if state is None else [int(l) for l in np.asarray(state["layers"]).reshape(-1)]


def _choose_layers(requested: Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """Resolve a layer selection against the run's recorded layers.

    A run does not store the model's block count, so a negative index counts back from the highest *recorded*
    layer + 1: -1 is the highest recorded layer, -2 the block index below it (which must be recorded too).
    This equals ``qkhooks record``/``spectrum``'s meaning (from the model's last block) whenever the last
    block was recorded, as with the default (all blocks).
    """
    if requested is None:
        return list(available)
    out = []
    for l in requested:
        if l < 0 and available:
            l = max(available) + 1 + l
        if l not in available:
            raise QKHooksError(f"layer {l} is not in this run; it has layers {list(available)} (negative indices "
                               "count back from the highest recorded layer).")
        out.append(l)
    return out


def format_summary(summary: Mapping[str, Any]) -> str:
    """Per-layer anisotropy and same-object numbers as aligned text."""
    lines = [f"{'layer':>5}  {'cos_w':>8}  {'baseline':>8}  {'rel_cos_w':>9}  {'p_same':>7}"]
    aniso = summary.get("anisotropy") or {}
    same = (summary.get("same_object") or {}).get("layers", {})
    for entry in summary["layers"]:
        l = entry["layer"]
        a, s = aniso.get(l, {}), same.get(l, {})
        cells = [a.get("cos_weighted"), a.get("baseline"), a.get("relative_cos_weighted"), s.get("p_same")]
        text = ["—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}" for v in cells]
        lines.append(f"{l:>5}  {text[0]:>8}  {text[1]:>8}  {text[2]:>9}  {text[3]:>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run file written by `qkhooks record` (with modes, the default)")
    p.add_argument("--out", required=True, help="folder for modes.json, same_object.csv, anisotropy.csv and figures/")
    p.add_argument("--k", type=int, help="images per mode and sign (default: as recorded, 8)")
    p.add_argument("--layers", help="block indices, e.g. '0,3,5-7,-1' (default all recorded); unlike in `qkhooks "
                   "record`/`spectrum`, negative indices count back from the highest *recorded* layer (-1 = the last "
                   "recorded one), since a run does not store the model's depth")
    p.add_argument("--figure-modes", default="2", help="per head, draw figures for its first N modes ('all', 0 = none; default 2)")
    p.add_argument("--no-overview", action="store_true", help="skip the per-layer sheets of each head's leading mode")
    p.add_argument("--no-images", action="store_true", help="draw the maps on black instead of reopening the dataset")
    p.add_argument("--same-object-top", type=int, default=5, help="images per mode for the same-object probability (5)")
    p.add_argument("--normalize", default="max", choices=["max", "percentile"], help="map display scaling")


@command("analyze modes", "top-k images per QK mode, same-object probability and anisotropy (Fig. 4, 5, S3)")(_args)
def run_modes(args: argparse.Namespace) -> int:
    fm = args.figure_modes
    try:
        figure_modes = None if str(fm).lower() == "all" else int(fm)
    except ValueError:
        raise QKHooksError(f"--figure-modes must be a number or 'all', got {fm!r}.") from None
    if args.k is not None and args.k < 1:
        raise QKHooksError(f"--k must be >= 1, got {args.k}.")
    writable_dir(args.out, "--out folder")
    summary = analyze_modes(
        args.run, args.out, k=args.k, layers=args.layers, figure_modes=figure_modes, overview=not args.no_overview,
        images=not args.no_images, same_object_top=args.same_object_top, normalize=args.normalize,
    )
    print(format_summary(summary))
    print(f"top-k: {summary['topk_source']}; {summary['photos']}")
    files = summary["files"]
    print("wrote " + ", ".join(v for k_, v in files.items() if k_ not in ("figures", "figure_count") and v)
          + (f" and {files['figure_count']} figures under {files['figures']}" if files["figure_count"] else ""))
    return 0
