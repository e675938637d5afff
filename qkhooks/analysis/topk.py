"""Top-k images per QK mode (Pan et al. Fig. 4; METHODS A.3, A.6): a streaming, exactly mergeable reducer.

For mode n of a head, an image's query map is x·u_n and its key map x·v_n over its tokens. The paper ranks
images by the largest attention the mode can induce in them,

    score = max(0, max_t q_t) * max(0, max_t k_t)          (t over patch tokens; prefix tokens dropped)

and, since the SVD fixes (u_n, v_n) only up to a joint sign, ranks the flipped pair (-u_n, -v_n) too:
``sign -1`` scores the maps (-q, -k). Ties go to the lower image index, so results never depend on the
batching, the device or the order in which partial results are merged.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from qkhooks._devices import to_device
from qkhooks.capture import BatchCapture
from qkhooks.errors import QKHooksError
from qkhooks.reducers import Reducer, overflows, refuse_mixed_batch_axes, refuse_non_finite, refuse_overflow
from qkhooks.analysis.geometry import layer_geometry, layer_prefix_tokens

__all__ = ["TopKModes", "signed_scores", "layer_state", "state_layers", "select_layers", "top_images", "SIGNS"]

SIGNS: tuple[int, int] = (1, -1)
"""Sign axis of the top-k state: index 0 ranks (u_n, v_n), index 1 ranks (-u_n, -v_n)."""


def signed_scores(query: torch.Tensor, key: torch.Tensor, num_prefix_tokens: int,
                  key_prefix_tokens: int | None = None) -> torch.Tensor:
    """Ranking scores (B, H, K, 2) of both signs from maps (B, H, K, N) and (B, H, K, M), in float32 (float64 stays).

    Sign +1: max(0, max_t q) * max(0, max_t k); sign -1: the same for (-q, -k), i.e. max(0, -min q) *
    max(0, -min k). Only patch tokens (t >= num_prefix_tokens; keys: ``key_prefix_tokens``, default the same;
    spatially reduced keys have none) count. NaN scores become -inf (never kept).
    """
    key_prefix = num_prefix_tokens if key_prefix_tokens is None else key_prefix_tokens
    q_min, q_max = _token_extremes(query[..., num_prefix_tokens:])
    k_min, k_max = _token_extremes(key[..., key_prefix:])
    return _scores(q_min, q_max, k_min, k_max)


def _scores(q_min: torch.Tensor, q_max: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor) -> torch.Tensor:
    """The ranking scores of both signs (..., 2) from the maps' token extremes, in float32 at least (half-precision
    maxima would overflow in their product); NaN becomes -inf."""
    dtype = torch.promote_types(q_min.dtype, torch.float32)
    q_min, q_max, k_min, k_max = (t.to(dtype) for t in (q_min, q_max, k_min, k_max))
    plus = q_max.clamp_min(0) * k_max.clamp_min(0)
    minus = (-q_min).clamp_min(0) * (-k_min).clamp_min(0)
    return torch.nan_to_num(torch.stack([plus, minus], dim=-1), nan=-math.inf)


def _token_extremes(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the last (token) axis. Reducing a strided token axis (a transposed view) is ~8x slower on
    the CPU than reducing a contiguous copy (and than aminmax), so such maps are copied first; maps whose tokens
    are already adjacent (the projectors' output, prefix tokens sliced off) are reduced in place."""
    if maps.stride(-1) != 1:
        maps = maps.contiguous()
    return maps.amin(-1), maps.amax(-1)


def _layer_extremes(maps: Sequence[tuple[int, torch.Tensor, torch.Tensor]], prefix: int,
                    key_prefix: int | None,
                    stacked: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the patch tokens of (layer, query, key) maps of one shape, each (L, query / key, B, H, K);
    from ``stacked``, the maps' :func:`_stacked_maps`, where the fold has them (a few operations for all layers)."""
    for layer, q, k in maps:
        if q.dim() != 4 or k.dim() != 4 or k.shape[:3] != q.shape[:3]:
            raise QKHooksError(
                f"layer {layer}: query/key maps must both be (batch, heads, modes, tokens), got "
                f"{tuple(q.shape)} and {tuple(k.shape)}."
            )
    if stacked is not None:
        (q_lo, q_hi), (k_lo, k_hi) = (_token_extremes(stacked[0][..., prefix:]),
                                      _token_extremes(stacked[1][..., prefix if key_prefix is None else key_prefix:]))
        return torch.stack([q_lo, k_lo], 1), torch.stack([q_hi, k_hi], 1)
    b, h, m, _ = maps[0][1].shape
    extremes = [_token_extremes(x[..., skip:]) for _, q, k in maps
                for x, skip in ((q, prefix), (k, prefix if key_prefix is None else key_prefix))]
    lo = torch.stack([lo for lo, _ in extremes]).view(len(maps), 2, b, h, m)
    hi = torch.stack([hi for _, hi in extremes]).view(len(maps), 2, b, h, m)
    return lo, hi


def _map_peaks(maps: Sequence[tuple[int, torch.Tensor, torch.Tensor]], prefix: int, key_prefix: int | None,
               extremes: tuple[torch.Tensor, torch.Tensor],
               stacked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The largest finite |value| (L, B) of each layer's and image's query and key maps over all their tokens, which
    the kept maps hold: the patch tokens' from their :func:`_layer_extremes` (checked finite), the prefix tokens'
    read here (a few tokens, where class and register tokens' massive activations lie; from ``stacked`` where the
    fold has it: a few operations for all layers)."""
    lo, hi = extremes
    peak = torch.maximum(lo.abs(), hi.abs()).amax((1, 3, 4))
    key_prefix = prefix if key_prefix is None else key_prefix
    sides = [(0, prefix), (1, key_prefix)]
    if stacked is not None:
        heads = [stacked[side][..., :skip].flatten(2) for side, skip in sides if skip]
    else:
        heads = [torch.stack([entry[1 + side][..., :skip].flatten(1) for entry in maps]) for side, skip in sides if skip]
    for head in heads:  # (L, B, H·K·prefix); the model's own inf or NaN there is kept as it is: not an overflow
        peak = torch.maximum(peak, head.abs().nan_to_num(nan=0.0, posinf=0.0).amax(-1).to(peak.dtype))
    return peak


def _stacked_maps(maps: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key maps of (layer, query, key) layers of one shape, each stacked into one contiguous
    (L, B, H, K, N) tensor (a copy)."""
    return torch.stack([q for _, q, _ in maps]), torch.stack([k for _, _, k in maps])


STACK_BYTES = 256 * 2**20
"""The most bytes of maps (query and key) an accelerator's fold stacks at once: a group of layers past it is folded in
parts, and the stacks a batch keeps between its finite check and its folds take this much at most, so the copies add
at most twice this much device memory while a batch is folded (ViT-B, batch 32, top-16 modes: 116 MB for its 12
layers, one part, made once)."""


def _stack_parts(kind: tuple, maps: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[tuple[tuple, list]]:
    """``maps`` of one ``kind`` in the parts an accelerator stacks (:data:`STACK_BYTES` each at most, one layer at
    least), each part's kind followed by its number; on the CPU, which stacks nothing, the group as it is."""
    if _entrants_only(kind[4]):
        return [(kind, maps)]
    _, query, key = maps[0]
    layers = max(1, STACK_BYTES // (query.numel() * query.element_size() + key.numel() * key.element_size() or 1))
    return [(kind + (i // layers,), maps[i:i + layers]) for i in range(0, len(maps), layers)]


def _token_rows(maps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Maps (B, H, K, N) as rows of N tokens in their own memory, and the rows from one image to the next.

    Each image's (H, K, N) block is usually contiguous while the images need not be adjacent (the q/k path
    writes both sides of an image into one block): then the rows are a view and the step is the images' stride
    in rows; otherwise the maps are copied into contiguous ones (step H·K)."""
    b, h, m, n = maps.shape
    if b and maps.stride(0) % n == 0 and maps[0].is_contiguous():
        step = maps.stride(0) // n
        return maps.as_strided(((b - 1) * step + h * m, n), (n, 1)), step
    return maps.reshape(b * h * m, n), h * m


def _pick_rows(maps: torch.Tensor, image: torch.Tensor, lane: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The token rows of maps (B, H, K, N) at ``image`` and ``lane`` = head·K + mode (broadcast together), read in
    place (:func:`_token_rows`): row b·step + lane of the maps seen as rows of N tokens."""
    rows, step = _token_rows(maps)
    return torch.index_select(rows, 0, (image * step + lane).flatten(), out=out)


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


def _entrants_only(device: torch.device) -> bool:
    """Whether a fold copies the maps of entering images only. On the CPU their count costs nothing to read; on an
    accelerator reading it would wait for the device, so there every candidate's rows are copied (fixed shapes),
    from the layers' maps stacked into one tensor (:func:`_stacked_maps`): there each tensor operation costs the host
    a kernel launch whatever its size, so a few operations on the stack replace a few per layer (~370 fewer a
    12-layer batch), and the copy costs the device microseconds. On the CPU the copy would cost more than that."""
    return device.type == "cpu"


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
    image_index_fields = ("index",)

    def __init__(self, k: int = 8, num_prefix_tokens: int | None = None, map_dtype: str | torch.dtype = "float16"):
        if int(k) < 1:
            raise QKHooksError(f"TopKModes needs k >= 1 images per mode, got k={k}.")
        self.k = int(k)
        self.num_prefix_tokens = None if num_prefix_tokens is None else int(num_prefix_tokens)
        self.map_dtype = getattr(torch, map_dtype, None) if isinstance(map_dtype, str) else map_dtype
        if self.map_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise QKHooksError(f"map_dtype must be a float dtype such as 'float16' or 'float32', got {map_dtype!r}.")
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.prefixes: dict[int, int] = {}  # layer -> prefix tokens its scores left out
        self.images = 0
        # layers folded together -> (their state stacked, the per-layer views of it in self.layers)
        self._stacks: dict[tuple[int, ...], tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]] = {}
        self._signs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # see _signs_on

    def __repr__(self) -> str:
        return f"TopKModes(k={self.k}, layers={sorted(self.layers)}, images={self.images_held()})"

    def images_held(self) -> int:
        return self.images

    # ---------------------------------------------------------------- streaming
    def _empty(self, like: torch.Tensor, keys: int | None = None) -> dict[str, torch.Tensor]:
        b, h, m, n = like.shape
        dev = like.device
        return {
            "score": torch.full((h, m, 2, self.k), -math.inf, dtype=torch.float32, device=dev),
            "index": torch.full((h, m, 2, self.k), -1, dtype=torch.int64, device=dev),
            "query": torch.zeros((h, m, 2, self.k, n), dtype=self.map_dtype, device=dev),
            "key": torch.zeros((h, m, 2, self.k, n if keys is None else keys), dtype=self.map_dtype, device=dev),
        }

    def _signs_on(self, device: torch.device) -> torch.Tensor:
        """:data:`SIGNS` (2,) in the map dtype on ``device``, made once per device and dtype (a constant: nothing
        invalidates it), not a host-to-device copy every fold."""
        key = (device, self.map_dtype)
        signs = self._signs.get(key)
        if signs is None:
            signs = self._signs[key] = to_device(torch.tensor(SIGNS, dtype=self.map_dtype), device)
        return signs

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev, slots = a["score"].device, a["score"].dim() - 1  # the slot axis: last of the scores, (L,) H, K, 2, k
        both = {name: torch.cat([a[name], b[name].to(dev, a[name].dtype)], dim=slots) for name in a}
        pos = _rank(both["score"], both["index"], self.k)
        return {name: _take(value, pos) for name, value in both.items()}

    def _fold(self, layer: int, query: torch.Tensor, key: torch.Tensor, offset: int, prefix: int,
              key_prefix: int | None = None) -> None:
        """Fold one layer's maps of a batch (:meth:`update` folds all the layers of one shape together)."""
        self._fold_layers([(layer, query, key)], offset, prefix, key_prefix)

    def _fold_layers(self, maps: Sequence[tuple[int, torch.Tensor, torch.Tensor]], offset: int, prefix: int,
                     key_prefix: int | None = None,
                     extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
                     stacked: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fold a batch's maps of several layers, (layer, query, key) of one shape, dtype, device and prefix.

        The layers are ranked and merged as one stacked tensor, so a batch costs a few tensor operations per
        layer (its extremes and the rows it keeps) instead of some forty: each operation on these small tensors
        costs more in dispatch than in arithmetic. Every (layer, head, mode, sign) is ranked on its own, so the
        result is the one of folding each layer alone. ``extremes``: the maps' :func:`_layer_extremes`, where
        :meth:`update` has them already (it checks them before folding anything); ``stacked``: the maps'
        :func:`_stacked_maps`, likewise (an accelerator's fold reads its rows from them)."""
        layers = [layer for layer, _, _ in maps]
        query, key = maps[0][1], maps[0][2]
        dev = query.device
        if stacked is None and not _entrants_only(dev):
            stacked = _stacked_maps(maps)
        lo, hi = _layer_extremes(maps, prefix, key_prefix, stacked) if extremes is None else extremes  # checks shapes
        b, h, m, n = query.shape
        state = self._stacked_state(layers, query, int(key.shape[-1]))
        score = _scores(lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]).float().permute(0, 2, 3, 4, 1)  # (L, H, K, 2, B)
        index = (int(offset) + torch.arange(b, device=dev)).expand_as(score)
        if stacked is None:
            self._store_stacked(layers, self._merge_entrants(state, score, index, maps, m))
            return
        pos = _rank(score, index, min(self.k, b))  # the batch's own top-k first: never gather B maps
        sign = self._signs_on(dev).view(2, 1, 1)  # (2, k, N) of (L, H, K, 2, k, N)
        # row of (layer, image, head·K + mode) in a stack seen as rows of N tokens: all layers in one index
        rows_at = (pos.reshape(len(maps), h, m, -1) * (h * m) + torch.arange(h * m, device=dev).view(h, m, 1)
                   + torch.arange(0, len(maps) * b * h * m, b * h * m, device=dev).view(-1, 1, 1, 1)).flatten()

        def rows(side: int) -> torch.Tensor:
            # Only the picked rows are copied, both signs indexing the stacked maps in place (no (H, K, B, N)
            # permuted copy, no expanded copy).
            tokens = stacked[side].shape[-1]
            picked = stacked[side].view(-1, tokens).index_select(0, rows_at)
            return picked.view(len(maps), h, m, 2, -1, tokens).to(self.map_dtype) * sign

        cand = {"score": score.gather(-1, pos), "index": index.gather(-1, pos), "query": rows(0), "key": rows(1)}
        self._store_stacked(layers, self._combine(state, cand))

    def _merge_entrants(self, state: dict[str, torch.Tensor], score: torch.Tensor, index: torch.Tensor,
                        maps: Sequence[tuple[int, torch.Tensor, torch.Tensor]], modes: int) -> dict[str, torch.Tensor]:
        """The stacked state merged with a batch's scores (L, H, K, 2, B), copying the maps of entering images only.

        The state's slots and the batch's images are ranked together by the same total order as :meth:`_combine`,
        so the result is the one of folding the batch's own top-k first. Kept slots are gathered from the state;
        only the rows of images that enter are read from the maps (all of them in the first batch, few once the
        state holds good images), cast and signed."""
        k = self.k
        both_score = torch.cat([state["score"], score], dim=-1)
        both_index = torch.cat([state["index"], index], dim=-1)
        if index.numel() and int(state["index"].max()) < int(index.min()):
            # The state is ranked (index ascending among equal scores) and the batch's images follow it in index
            # order, so the entries' positions already are their index order: one stable sort by score gives the
            # total order of _rank (a merged or restored state holding later images takes _rank's two sorts).
            pos = torch.argsort(both_score, dim=-1, descending=True, stable=True)[..., :k]
        else:
            pos = _rank(both_score, both_index, k)  # (L, H, K, 2, k): a state slot (< k) or batch image k + i
        merged = {"score": both_score.gather(-1, pos), "index": both_index.gather(-1, pos)}
        enters = pos >= k
        where = enters.nonzero()  # (E, 5): layer, head, mode, sign, slot, in layer order
        image = pos[enters] - k
        slots = enters.flatten().nonzero().squeeze(1)
        counts = torch.bincount(where[:, 0], minlength=len(maps)).tolist()
        sign = self._signs_on(pos.device)[where[:, 3]].unsqueeze(1)
        kept = pos.clamp(max=k - 1)  # entering slots are overwritten below
        for side, name in ((1, "query"), (2, "key")):
            out = _take(state[name], kept)
            if len(slots):
                parts, lo = [], 0
                for entry, count in zip(maps, counts):
                    if count:
                        at = slice(lo, lo + count)
                        parts.append(_pick_rows(entry[side], image[at], where[at, 1] * modes + where[at, 2]))
                    lo += count
                picked = torch.cat(parts).to(self.map_dtype) * sign
                out.view(-1, out.shape[-1]).index_copy_(0, slots, picked)
            merged[name] = out
        return merged

    def _stacked_state(self, layers: list[int], like: torch.Tensor, keys: int) -> dict[str, torch.Tensor]:
        """The state of ``layers`` as (L, ...) tensors on ``like``'s device: the last fold's own stack when every
        layer still holds the views of it that :meth:`_store_stacked` handed out (no copy), else stacked anew
        (a merge or a restored state replaced a layer)."""
        cached = self._stacks.get(tuple(layers))
        if cached is not None and cached[0]["score"].device == like.device and all(
                self.layers.get(layer) is view for layer, view in zip(layers, cached[1])):
            self._check_state(layers[0], cached[1][0], like, keys)  # every layer of a stack has one shape
            return cached[0]
        parts = []
        for layer in layers:
            state = self.layers.get(layer)
            if state is None:
                state = self._empty(like, keys)
            elif state["score"].device != like.device:  # a restored (CPU) state follows the maps to their device
                state = {name: v.to(like.device) for name, v in state.items()}
            self._check_state(layer, state, like, keys)
            parts.append(state)
        return {name: torch.stack([part[name] for part in parts]) for name in parts[0]}

    @staticmethod
    def _check_state(layer: int, state: Mapping[str, torch.Tensor], like: torch.Tensor, keys: int) -> None:
        """A layer's later batches keep its heads, modes and token counts."""
        _, h, m, n = like.shape
        if state["query"].shape[:2] != (h, m) or state["query"].shape[-1] != n or state["key"].shape[-1] != keys:
            raise QKHooksError(
                f"layer {layer}: maps of shape (heads={h}, modes={m}, tokens={n}) do not match the earlier "
                f"{tuple(state['query'].shape[:2])} x {state['query'].shape[-1]} tokens; keep one model, mode "
                "count and image size per reducer."
            )

    def _store_stacked(self, layers: list[int], stacked: dict[str, torch.Tensor]) -> None:
        """Each layer's state becomes a view of ``stacked``, kept for the next batch's fold."""
        views = [dict(zip(stacked, parts)) for parts in zip(*(value.unbind(0) for value in stacked.values()))]
        for layer, view in zip(layers, views):
            self.layers[layer] = view
        self._stacks[tuple(layers)] = (stacked, views)

    def update(self, batch: BatchCapture) -> None:
        """Fold one batch: every layer that has query/key maps, layers of one shape together."""
        layers = {l: c for l, c in batch.captures.items() if c.query is not None and c.key is not None}
        if not layers:
            raise QKHooksError("TopKModes needs query/key maps: record with modes=K (e.g. qkhooks.record(model, modes=16)).")
        refuse_mixed_batch_axes(batch, "TopKModes")
        groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        prefixes: dict[int, int] = {}  # committed with the folds, after the check: a refused batch changes nothing
        for layer, cap in sorted(layers.items()):
            geometry = layer_geometry(batch.meta, layer)
            if cap.key.shape[-1] != cap.query.shape[-1] and geometry is None:
                raise QKHooksError(f"layer {layer}: {cap.key.shape[-1]} keys for {cap.query.shape[-1]} queries "
                                   "(spatially reduced keys) and no geometry in the batch metadata to tell the key "
                                   "side's prefix tokens; record with qkhooks.record_dataset, which gives it.")
            # the layer's own prefix (its geometry's, or its site's: CaiT, stages, TimeSformer) over one count for all
            prefix = layer_prefix_tokens(batch.meta, layer, int(cap.query.shape[-1]), self.num_prefix_tokens)
            prefixes[layer] = prefix
            key_prefix = geometry.key_prefix_tokens if geometry is not None and geometry.reduced_keys else None
            kind = (tuple(cap.query.shape), tuple(cap.key.shape), cap.query.dtype, cap.key.dtype, cap.query.device,
                    prefix, key_prefix)
            groups.setdefault(kind, []).append((layer, cap.query, cap.key))
        # kind: (query shape, key shape, dtypes, device, prefix, key prefix[, part of the layers an accelerator stacks])
        groups = {part_kind: part for kind, maps in groups.items() for part_kind, part in _stack_parts(kind, maps)}
        stacks, extremes, peaks, kept = {}, {}, {}, 0
        for kind, maps in groups.items():  # the stacks kept for the folds take STACK_BYTES at most; others are made again
            stacked = None if _entrants_only(kind[4]) else _stacked_maps(maps)
            extremes[kind] = _layer_extremes(maps, kind[5], kind[6], stacked)
            if torch.finfo(self.map_dtype).max < torch.finfo(kind[2]).max:  # float16 kept maps of float32 maps
                peaks[kind] = _map_peaks(maps, kind[5], kind[6], extremes[kind], stacked)
            size = 0 if stacked is None else sum(t.numel() * t.element_size() for t in stacked)
            if stacked is not None and kept + size <= STACK_BYTES:
                stacks[kind], kept = stacked, kept + size
            del stacked  # a stack not kept is freed before the next one is made
        dev = next(iter(extremes.values()))[0].device
        finite = torch.cat([(torch.isfinite(lo) & torch.isfinite(hi)).all(1).flatten(2).all(-1).to(dev)
                            for lo, hi in extremes.values()])  # (layers, B): NaN and inf survive min and max
        peak = torch.cat(list(peaks.values())) if peaks else None
        fits = finite.all() if peak is None else finite.all() & ~overflows(peak, self.map_dtype).any()
        if not bool(fits):  # one value read back a batch (each would wait for an accelerator)
            refuse_non_finite(finite, [layer for maps in groups.values() for layer, _, _ in maps], batch, "TopKModes",
                              "query/key maps (their extremes over the patch tokens)")
            refuse_overflow(peak, [layer for kind in peaks for layer, _, _ in groups[kind]], batch, "TopKModes",
                            "query/key maps", self.map_dtype,
                            "Keep them in float32: TopKModes(map_dtype='float32'), which `qkhooks record --dtype "
                            "float32` (record_dataset(dtype='float32')) makes.")
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = prefixes[min(prefixes)]
        self.prefixes.update(prefixes)
        for kind, maps in groups.items():
            self._fold_layers(maps, batch.offset, kind[5], kind[6], extremes[kind], stacks.pop(kind, None))
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
        self.prefixes.update(other.prefixes)
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = other.num_prefix_tokens
        self.images += other.images

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Per-layer arrays stacked along a leading layer axis (``layers`` names them); maps in ``map_dtype``.

        Layers of different heads, modes or tokens (multi-stage models: Swin, PiT) are stored one per layer instead,
        under ``L{layer}.score`` etc. (``per_layer`` = 1); :func:`layer_state` reads either. ``layer_prefix``: the
        prefix tokens each layer's scores left out."""
        layers = sorted(self.layers)
        shapes = {(tuple(self.layers[l]["query"].shape), tuple(self.layers[l]["key"].shape)) for l in layers}  # keys: reduced or not
        out: dict[str, Any] = {
            "layers": np.asarray(layers, dtype=np.int64),
            "k": self.k,
            "images": int(self.images),
            "num_prefix_tokens": -1 if self.num_prefix_tokens is None else int(self.num_prefix_tokens),
        }
        if self.prefixes:
            out["layer_prefix"] = np.asarray([self.prefixes.get(l, -1) for l in layers], dtype=np.int64)
        np_dtype = {torch.bfloat16: np.float32}.get(self.map_dtype, None)

        def host(name: str, value: torch.Tensor) -> np.ndarray:
            value = value.detach().cpu()
            return (value.float() if name in ("query", "key") and np_dtype is not None else value).numpy()

        if len(shapes) > 1:
            out["per_layer"] = 1
            for l in layers:
                for name in ("score", "index", "query", "key"):
                    out[f"L{l}.{name}"] = host(name, self.layers[l][name])
            return out
        for name in ("score", "index", "query", "key"):
            if not layers:
                stored = torch.int64 if name == "index" else torch.float32 if name == "score" or np_dtype else self.map_dtype
                out[name] = torch.zeros(0, dtype=stored).numpy()  # an empty state still names its map dtype
                continue
            out[name] = host(name, torch.stack([self.layers[l][name] for l in layers]))
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors on the CPU; they move to the maps' device on the next update)."""
        missing = [k for k in ("layers", "k") + (() if _per_layer(state) else ("score", "index", "query", "key"))
                   if k not in state]
        if missing:
            raise QKHooksError(f"not a TopKModes state: missing {missing}.")
        k = int(np.asarray(state["k"]))
        if k != self.k:
            raise QKHooksError(f"this TopKModes keeps k={self.k} images but the saved state has k={k}; build TopKModes(k={k}).")
        prefix = int(np.asarray(state.get("num_prefix_tokens", -1)))
        self.num_prefix_tokens = None if prefix < 0 else prefix
        self.images = int(np.asarray(state.get("images", 0)))
        layers = state_layers(state)
        self.layers = {}
        if "layer_prefix" in state:
            self.prefixes = {l: int(p) for l, p in zip(layers, np.asarray(state["layer_prefix"]).reshape(-1)) if p >= 0}
        for layer in layers:
            st = layer_state(state, layer)
            self.layers[layer] = {
                "score": torch.as_tensor(np.asarray(st["score"], dtype=np.float32)),
                "index": torch.as_tensor(np.asarray(st["index"], dtype=np.int64)),
                "query": torch.as_tensor(np.asarray(st["query"])).to(self.map_dtype),
                "key": torch.as_tensor(np.asarray(st["key"])).to(self.map_dtype),
            }

    @classmethod
    def _legacy_configuration(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """k and the map dtype of a state saved before states described themselves."""
        dtype = np.asarray(state["query"] if "query" in state else layer_state(state, state_layers(state)[0])["query"]).dtype
        return {"k": int(np.asarray(state["k"])), "map_dtype": "float16" if dtype == np.float16 else "float32"}

    def top(self, layer: int, head: int, mode: int, sign: str | int = "both", k: int | None = None) -> dict[str, np.ndarray]:
        """The kept images of one mode, best first (see :func:`top_images`)."""
        if layer not in self.layers:
            raise QKHooksError(f"TopKModes has no layer {layer}; it has {sorted(self.layers)}.")
        state = {name: v.detach().cpu().float().numpy() if name != "index" else v.cpu().numpy()
                 for name, v in self.layers[layer].items()}
        return top_images(state, head, mode, sign, k)


def _per_layer(state: Mapping[str, Any]) -> bool:
    return bool(int(np.asarray(state.get("per_layer", 0))))


def state_layers(state: Mapping[str, Any]) -> list[int]:
    """The layers of a :meth:`TopKModes.state_dict`."""
    return [int(l) for l in np.asarray(state["layers"]).reshape(-1)]


def layer_state(state: Mapping[str, Any], layer: int) -> dict[str, np.ndarray]:
    """One layer's ``score``/``index``/``query``/``key`` out of a :meth:`TopKModes.state_dict` (stacked or per layer)."""
    layers = state_layers(state)
    if layer not in layers:
        raise QKHooksError(f"the top-k state has no layer {layer}; it has {layers}.")
    if _per_layer(state):
        return {name: np.asarray(state[f"L{layer}.{name}"]) for name in ("score", "index", "query", "key")}
    i = layers.index(layer)
    return {name: np.asarray(state[name][i]) for name in ("score", "index", "query", "key")}


def layer_prefix(state: Mapping[str, Any], layer: int, default: int) -> int:
    """The prefix tokens ``layer``'s scores left out (``default``: the run's, for states that do not say)."""
    if "layer_prefix" in state:
        found = dict(zip(state_layers(state), np.asarray(state["layer_prefix"]).reshape(-1)))
        if int(found.get(layer, -1)) >= 0:
            return int(found[layer])
    return int(default)


def select_layers(state: Mapping[str, Any], layers: Sequence[int], k: int | None) -> dict[str, Any]:
    """Keep only ``layers`` and the first ``k`` slots of a top-k state, stored one per layer."""
    kk = int(np.asarray(state["k"])) if k is None else min(int(k), int(np.asarray(state["k"])))
    out: dict[str, Any] = {"layers": np.asarray(layers, dtype=np.int64), "k": kk, "per_layer": 1}
    for name in ("images", "num_prefix_tokens"):
        if name in state:
            out[name] = state[name]
    if "layer_prefix" in state:
        out["layer_prefix"] = np.asarray([layer_prefix(state, l, -1) for l in layers], dtype=np.int64)
    for l in layers:
        for name, value in layer_state(state, l).items():
            out[f"L{l}.{name}"] = value[..., :kk] if name in ("score", "index") else value[..., :kk, :]
    return out


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
