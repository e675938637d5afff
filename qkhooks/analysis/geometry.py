"""Prefix tokens and patch grid of a batch, for the analyses' reducers and figures.

Both come from the attention sites: the recording puts ``num_prefix_tokens`` and ``grid`` into every batch's
metadata (:class:`qkhooks.capture.BatchCapture`), and a run file keeps them in ``model/info``. The functions
here read them from there; only a caller that gives neither (hand-made batches) gets the square-grid
fallback, which refuses what it cannot tell instead of guessing.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from qkhooks.errors import QKHooksError

__all__ = ["infer_prefix_tokens", "resolve_prefix", "grid_of", "MAX_INFERRED_PREFIX"]

MAX_INFERRED_PREFIX = 8
"""Largest prefix-token count :func:`infer_prefix_tokens` accepts (CLS + distillation + registers)."""


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


def resolve_prefix(fixed: int | None, meta: Mapping[str, Any], num_tokens: int) -> int:
    """The prefix-token count: the reducer's own setting, else the batch metadata's (the site's), else the
    square-grid fallback; checked against the sequence length."""
    prefix = fixed if fixed is not None else meta.get("num_prefix_tokens")
    prefix = infer_prefix_tokens(num_tokens) if prefix is None else int(prefix)
    if not 0 <= prefix < num_tokens:
        raise QKHooksError(f"num_prefix_tokens={prefix} leaves no patch token in a {num_tokens}-token sequence.")
    return prefix


def grid_of(patches: int, grid: Sequence[int] | None = None) -> tuple[int, int]:
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
