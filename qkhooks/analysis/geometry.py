"""Prefix tokens and patch grid of a batch or a layer, for the analyses' reducers and figures.

Both come from the attention sites: :func:`qkhooks.record_dataset` puts every layer's geometry into each batch's
metadata (``meta["geometry"]``: layer -> :class:`qkhooks.access.LayerGeometry`) with the first layer's
``num_prefix_tokens`` and ``grid``, and a run file keeps them in ``model/info``. The functions here read them
from there. A hand-made batch that says neither is refused: a token count does not tell its grid (4x6 + CLS
and 5x5 both have 25 tokens). :func:`infer_prefix_tokens` stays for callers that know their grid is square.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from qkhooks._devices import to_device
from qkhooks.errors import QKHooksError

__all__ = ["infer_prefix_tokens", "resolve_prefix", "layer_prefix_tokens", "grid_of", "layer_geometry",
           "layer_grid", "tokens_on_grid", "MAX_INFERRED_PREFIX"]

MAX_INFERRED_PREFIX = 8
"""Largest prefix-token count :func:`infer_prefix_tokens` accepts (CLS + distillation + registers)."""


def infer_prefix_tokens(num_tokens: int) -> int:
    """Prefix tokens of a grid the caller knows to be square: ``num_tokens`` minus the largest square below it.

    Exact for square grids with at most :data:`MAX_INFERRED_PREFIX` prefix tokens (CLS, DeiT's distillation token
    and up to 4 registers plus CLS on grids from 5x5 up); anything else raises. Not a fallback for batches that
    do not say their geometry (:func:`resolve_prefix` refuses those): 25 tokens are 5x5 or 4x6 + CLS.
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


def resolve_prefix(fixed: int | None, meta: Mapping[str, Any], num_tokens: int, layer: int | None = None) -> int:
    """The prefix-token count of ``layer``: its own in the batch metadata (``meta["prefix_tokens"]``, each recorded
    layer's site's: a recording puts it there), else the reducer's own setting, else the batch metadata's one count
    (``meta["num_prefix_tokens"]``, the first layer's); refused when none says (a token count does not tell it);
    checked against the sequence length. A layer's own comes first: layers differ (TimeSformer's time attention has no
    class token, its space attention one), and a reducer's count is often the first batch's first layer's."""
    prefix = (meta.get("prefix_tokens") or {}).get(layer) if layer is not None else None
    if prefix is None:
        prefix = fixed if fixed is not None else meta.get("num_prefix_tokens")
    if prefix is None:
        raise QKHooksError(
            f"cannot tell the prefix tokens of a {num_tokens}-token sequence: the batch does not say them (a token "
            "count does not: 25 tokens are a 5x5 grid or 4x6 + CLS); pass num_prefix_tokens=... to the reducer or "
            "put it in the batch metadata (run(images, meta={'num_prefix_tokens': site.num_prefix_tokens, "
            "'grid': (rows, cols)})).")
    prefix = int(prefix)
    if not 0 <= prefix < num_tokens:
        raise QKHooksError(f"num_prefix_tokens={prefix} leaves no patch token in a {num_tokens}-token sequence.")
    return prefix


def grid_of(patches: int, grid: Sequence[int] | None = None, layer: int | None = None) -> tuple[int, int]:
    """The patch grid: ``grid`` (the recording's or the caller's) when it has ``patches`` tokens; otherwise refused,
    naming the layer where known. A square is never assumed (zoo11-build): 16 tokens may be 4x4 or 2x8."""
    if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == patches:
        return int(grid[0]), int(grid[1])
    where = f"layer {layer}: " if layer is not None else ""
    said = f"the grid {tuple(int(g) for g in grid)} has {int(grid[0]) * int(grid[1])}" if grid is not None and len(grid) == 2 \
        else "no grid was recorded for them"
    raise QKHooksError(
        f"{where}{patches} patch tokens, and {said}; their grid is not known (a square is never assumed). Give the "
        "grid (rows, cols) explicitly (the run's per-layer geometry, meta['grid'], or grid=... to the function)."
    )


def layer_geometry(meta: Mapping[str, Any], layer: int) -> Any:
    """``layer``'s :class:`qkhooks.access.LayerGeometry` from a batch's metadata, or None where it has none."""
    return (meta.get("geometry") or {}).get(layer)


def layer_prefix_tokens(meta: Mapping[str, Any], layer: int, num_tokens: int, fixed: int | None = None) -> int:
    """``layer``'s prefix-token count: its recorded geometry's, else :func:`resolve_prefix` of the layer (its own in
    the batch metadata, then ``fixed``, the reducer's, then the batch's one count); checked against the sequence
    length."""
    geometry = layer_geometry(meta, layer)
    if geometry is not None:
        return resolve_prefix(geometry.num_prefix_tokens, meta, num_tokens)
    return resolve_prefix(fixed, meta, num_tokens, layer)


def layer_grid(meta: Mapping[str, Any], layer: int, num_tokens: int, prefix: int | None = None,
               grid: Sequence[int] | None = None) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, grid) of ``layer`` in a batch of ``num_tokens`` tokens: the layer's recorded geometry (each
    layer its own: stages, CaiT's class-attention blocks), else the caller's values, else the batch's
    ``num_prefix_tokens`` and ``grid``; refused when none says. A layer whose geometry has no grid (the recording
    could not tell one: GroupViT's segments, tokens in no grid order) never takes the batch's, another layer's."""
    geometry = layer_geometry(meta, layer)
    fallback = meta.get("grid") if geometry is None else None
    if geometry is not None:
        grid = geometry.grid or grid
    prefix = layer_prefix_tokens(meta, layer, num_tokens, prefix)
    return prefix, grid_of(num_tokens - prefix, grid if grid is not None else fallback, layer)


def tokens_on_grid(x: Any, geometry: Any) -> Any:
    """A layer's captured tokens as the model's attention saw them -> per image in row-major grid order: a windowed
    layer's (B·nW, Nw, d) windows go back to (B, H·W, d) (padding dropped); others are returned as they are."""
    if geometry is None or geometry.window is None:
        return x
    from qkhooks.models.windows import window_index  # the model's own window order; torch only where windows are

    win = geometry.window
    index = window_index(tuple(geometry.grid), tuple(win["size"]), tuple(win["shift"]), bool(win["pad_first"]))
    flat = x.reshape(-1, index.numel(), x.shape[-1])  # (B, nW·Nw, d)
    valid = index.flatten() >= 0
    where = index.new_empty(int(valid.sum()))
    where[index.flatten()[valid]] = index.new_tensor(range(index.numel()))[valid]
    return flat[:, to_device(where, flat.device)]
