"""Pixel masks to patch-token grids.

Attention and QK-mode analyses live on the ViT's patch grid, while object
masks live on pixels. These helpers make that hop explicit and exact: a patch's
value is the *fraction of its pixels* that belong to the object, so small
objects are not lost (as they would be with nearest-neighbour downsampling)
and partial coverage stays visible.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from qkhooks.errors import QKHooksError

__all__ = ["LABEL_LIMIT", "OVERLAP_TOLERANCE", "TokenCells", "downscale_mask", "labels_to_onehot", "majority_labels",
           "patch_argmax", "receptive_cells", "refuse_outside_fractions", "refuse_overlap", "token_cells"]


@dataclasses.dataclass(frozen=True)
class TokenCells:
    """The input pixels each token of a patch grid shows: per grid row the input rows ``[start, stop)``, per grid
    column the input columns; a token shows the product of its row's and its column's.

    Masks are read onto tokens through these, so a token's object is that of the pixels it shows and no other: a
    grid that tiles the input gives blocks; a patch embedding that floors (a 230 px input, 16 px patches: 14
    patches, 6 px never read) leaves the unread edge out; one that pads ends its last cell at the image's edge.
    """

    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    def weights(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per axis, a (cells, pixels) float64 matrix of 0/1: which input pixels each cell holds."""
        out = []
        for cells, n in zip((self.rows, self.cols), size):
            if not cells or cells[-1][1] > n or cells[0][0] < 0:
                raise QKHooksError(f"token cells {cells[:1]}...{cells[-1:]} do not lie inside {n} pixels; make them "
                                   "for this input size (token_cells).")
            pixels = torch.arange(n, dtype=torch.int64)
            starts = torch.tensor([c[0] for c in cells])[:, None]
            stops = torch.tensor([c[1] for c in cells])[:, None]
            out.append(((pixels >= starts) & (pixels < stops)).to(torch.float64))
        return out[0], out[1]


def token_cells(size: tuple[int, int], grid: tuple[int, int], patch: tuple[int, int] | None = None) -> TokenCells:
    """The pixels each token of ``grid`` shows in a ``size`` input: a patch embedding's cells where ``patch`` (the
    layer's pixels per patch) makes that grid, by flooring (the edge it never reads left out) or by padding at the
    bottom and right (the last cell ends at the image's edge); else blocks, where the grid divides the input.

    Raises:
        QKHooksError: for a grid that neither rule makes: its tokens are not cells of the input (overlapping
            patches, a convolutional stem at a size it does not divide), so masks read onto it would be a guess.
    """
    axes = []
    for name, n, g, p in zip(("rows", "columns"), (int(v) for v in size), (int(v) for v in grid),
                             patch if patch is not None else (None, None)):
        if g <= 0 or g > n:
            raise QKHooksError(f"a grid of {g} {name} cannot lie on {n} pixels; pass the layer's patch grid.")
        p = int(p) if p is not None else None
        if p is not None and p > 0 and g in (n // p, -(-n // p)):  # the patch embedding floors or pads
            axes.append(tuple((i * p, min((i + 1) * p, n)) for i in range(g)))
        elif n % g == 0:
            step = n // g
            axes.append(tuple((i * step, (i + 1) * step) for i in range(g)))
        else:
            raise QKHooksError(
                f"the {int(grid[0])}x{int(grid[1])} token grid does not tile the {int(size[0])}x{int(size[1])} input "
                f"({n} pixel {name} over {g} tokens), and no patch embedding of the layer says which pixels each "
                "token shows (overlapping patches, a convolutional stem, or a stage padded at this size), so object "
                "and target masks read onto its tokens would be a guess. Record it on images without masks (a "
                "folder, 'samples'), or at an input size its grids divide."
            )
    return TokenCells(axes[0], axes[1])


def receptive_cells(size: tuple[int, int], convs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]
                    ) -> TokenCells:
    """The input pixels each token reads through a chain of convolutions (``(kernel, stride, padding)``, each a
    (rows, cols) pair, from the image up): a token's cell spans the cells its kernel covers one layer down, clipped
    to the image (padding reads no pixel). PiT's patch embedding (16 px kernels every 8 px) gives overlapping cells.

    Raises:
        QKHooksError: for a chain whose output would be empty, or a token whose kernel covers only padding.
    """
    axes = []
    for axis in (0, 1):
        cells = [(i, i + 1) for i in range(int(size[axis]))]
        for kernel, stride, padding in convs:
            k, s, p = int(kernel[axis]), int(stride[axis]), int(padding[axis])
            count = (len(cells) + 2 * p - k) // s + 1 if k > 0 and s > 0 else 0  # a stride of 0 is refused, not divided by
            if count <= 0:
                raise QKHooksError(f"a convolution of kernel {k}, stride {s}, padding {p} makes no token of "
                                   f"{len(cells)}; the input is too small for the model.")
            spans = [(max(0, s * i - p), min(len(cells), s * i - p + k)) for i in range(count)]
            if any(lo >= hi for lo, hi in spans):
                raise QKHooksError(f"a convolution of kernel {k}, stride {s}, padding {p} has a token that reads only "
                                   "padding, so it shows no pixel; masks cannot be read onto it.")
            cells = [(cells[lo][0], cells[hi - 1][1]) for lo, hi in spans]
        axes.append(tuple(cells))
    return TokenCells(axes[0], axes[1])


def downscale_mask(mask: torch.Tensor, grid: tuple[int, int], cells: TokenCells | None = None) -> torch.Tensor:
    """Average a pixel mask over each token's pixels: the fraction of the patch an object covers.

    ``cells`` says which pixels each token shows (:func:`token_cells`); without it the grid must divide the mask
    (the ViT case, ``H = gh * patch``: blocks). A grid that does not is refused, never spread over the image.

    Args:
        mask: ``(..., H, W)`` tensor; bool and integer masks are converted to float.
        grid: ``(gh, gw)`` patch grid, each at most the corresponding pixel size.
        cells: the tokens' pixels, for a grid that does not divide the mask.

    Returns:
        ``(..., gh, gw)`` float tensor (float64 input stays float64).

    Raises:
        QKHooksError: for a mask with fewer than 2 dims, a grid finer than the mask, cells of another grid, or a
        grid that does not divide the mask given no cells.
    """
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(np.asarray(mask))
    if mask.ndim < 2:
        raise QKHooksError(f"mask must have shape (..., H, W), got {tuple(mask.shape)}.")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(int(g) > 0 for g in grid)):
        raise QKHooksError(f"grid must be a (gh, gw) pair of positive ints, got {grid!r}.")
    gh, gw = int(grid[0]), int(grid[1])
    h, w = mask.shape[-2:]
    if gh > h or gw > w:
        raise QKHooksError(f"grid {(gh, gw)} is finer than the mask {(h, w)}; pass the patch grid, e.g. (14, 14).")
    x = mask if mask.is_floating_point() else mask.to(torch.float32)
    lead = x.shape[:-2]
    if cells is None and h % gh == 0 and w % gw == 0:
        return x.reshape(*lead, gh, h // gh, gw, w // gw).mean(dim=(-3, -1))
    rows, cols = _cell_weights(cells, (h, w), (gh, gw))
    sums = rows @ x.to(torch.float64) @ cols.T  # exact: 0/1 weights
    area = rows.sum(1)[:, None] * cols.sum(1)[None, :]
    return (sums / area).to(x.dtype)


def _cell_weights(cells: TokenCells | None, size: tuple[int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 0/1 (cells, pixels) matrices of ``cells``, which must be of ``grid`` (None: blocks, or the refusal)."""
    if cells is None:
        cells = token_cells(size, grid)
    if cells.grid != tuple(grid):
        raise QKHooksError(f"token cells of a {cells.grid[0]}x{cells.grid[1]} grid were given for a "
                           f"{grid[0]}x{grid[1]} grid; make them for this grid (token_cells).")
    return cells.weights(size)


def labels_to_onehot(labels: torch.Tensor, num_objects: int | None = None) -> torch.Tensor:
    """Split an instance label map into one binary mask per object.

    Label 0 is background and gets no channel; channel ``k`` is ``labels == k + 1``
    so channel order equals object id order.

    Args:
        labels: ``(H, W)`` (or ``(..., H, W)``) integer tensor of ids ``0..M``.
        num_objects: Number of channels ``M``; defaults to ``labels.max()``. Pass it to
            get a fixed channel count across images (absent objects give all-zero channels).

    Returns:
        ``(M, H, W)`` (or ``(..., M, H, W)``) float32 tensor.

    Raises:
        QKHooksError: for non-integer labels, negative ids, or ids above ``num_objects``.
    """
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise QKHooksError(f"labels must be an integer tensor of object ids, got {labels.dtype}.")
    if labels.ndim < 2:
        raise QKHooksError(f"labels must have shape (H, W), got {tuple(labels.shape)}.")
    if labels.numel() and int(labels.min()) < 0:
        raise QKHooksError("labels must be >= 0 (0 = background, 1..M = objects).")
    top = int(labels.max()) if labels.numel() else 0
    m = top if num_objects is None else int(num_objects)
    if m < 0:
        raise QKHooksError(f"num_objects must be >= 0, got {num_objects}.")
    if top > m:
        raise QKHooksError(f"labels contain object id {top} but num_objects={m}; raise num_objects or drop ids.")
    ids = torch.arange(1, m + 1, device=labels.device).view(-1, 1, 1)
    out = labels.unsqueeze(-3) == ids
    return out.to(torch.float32)


LABEL_LIMIT = int(np.iinfo(np.int32).max)
"""The largest object id a run file stores (``masks/objects`` is int32, as the model-size label maps are)."""


def majority_labels(labels: torch.Tensor, grid: tuple[int, int], cells: TokenCells | None = None) -> torch.Tensor:
    """Per patch, the label covering most of the pixels it shows (0 = background wins ties, then the lower id), as
    an int32 ``(gh, gw)`` grid of the labels' own ids. ``cells``: which pixels each token shows, for a grid that
    does not divide the labels (:func:`token_cells`); without them such a grid is refused.

    Used for ``masks/objects`` in run files: every patch token gets the object it mostly shows. The ids present
    are counted, not every id up to the largest (memory does not grow with the ids' values: COCO-panoptic ids
    ``R + 256 G + 65536 B`` cost what 1, 2, 3 do).

    Raises:
        QKHooksError: for non-integer or negative labels, or ids above :data:`LABEL_LIMIT`.
    """
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise QKHooksError(f"labels must be an integer tensor of object ids, got {labels.dtype}.")
    if labels.ndim != 2:
        raise QKHooksError(f"labels must have shape (H, W), got {tuple(labels.shape)}.")
    if labels.numel() and int(labels.min()) < 0:
        raise QKHooksError("labels must be >= 0 (0 = background, 1..M = objects).")
    if labels.numel() and int(labels.max()) > LABEL_LIMIT:
        raise QKHooksError(f"object id {int(labels.max())} is above {LABEL_LIMIT}, the largest a run file stores "
                           "(int32); renumber the objects, e.g. np.unique(labels, return_inverse=True).")
    gh, gw = int(grid[0]), int(grid[1])
    h, w = labels.shape
    # 0 first (background wins ties), then the ids present in ascending order: argmax's first maximum is the
    # lowest id, as a one-hot over every id would give
    ids, compact = torch.unique(torch.cat([labels.reshape(-1).to(torch.int64), labels.new_zeros(1, dtype=torch.int64)]),
                                return_inverse=True)
    compact = compact[:-1].reshape(h, w)
    k = len(ids)
    if not (0 < gh <= h and 0 < gw <= w):
        raise QKHooksError(f"grid {(gh, gw)} does not fit the labels {(h, w)}; pass the patch grid, e.g. (14, 14).")
    if cells is None and h % gh == 0 and w % gw == 0:  # exact blocks (the ViT case): integer counts
        cell = (torch.arange(h) // (h // gh))[:, None] * gw + (torch.arange(w) // (w // gw))[None, :]
        counts = torch.bincount((cell * k + compact).reshape(-1), minlength=gh * gw * k).reshape(gh * gw, k)
    else:  # each token's own pixels (cells may overlap or leave an unread edge out): integer counts per id present
        rows, cols = _cell_weights(cells, (h, w), (gh, gw))
        onehot = (compact[None] == torch.arange(k).view(-1, 1, 1)).to(torch.float64)
        counts = (rows @ onehot @ cols.T).reshape(k, gh * gw).T  # exact integers (0/1 weights, float64)
    winner = first_argmax(counts).reshape(gh, gw)
    return ids[winner].to(torch.int32)


def first_argmax(flat: torch.Tensor) -> torch.Tensor:
    """Per row of ``flat`` (B, N), the first index of the maximum (explicit, so ties never depend on the backend)."""
    is_max = flat == flat.max(dim=1, keepdim=True).values
    return (is_max.long().cumsum(1) == 0).sum(1)


def patch_argmax(mask_grid: torch.Tensor) -> int:
    """Flat index of the patch with the largest value.

    The index is into the row-major flattening of the grid, which is the order
    of patch tokens in a ViT sequence (add the number of prefix tokens, e.g. 1
    for CLS, to index the sequence). Ties resolve to the first (lowest) index,
    so the result is deterministic.

    Args:
        mask_grid: ``(gh, gw)`` values (any shape is flattened row-major).

    Returns:
        The flat index.

    Raises:
        QKHooksError: for an empty grid or one containing NaN.
    """
    arr = mask_grid.detach().cpu().numpy() if isinstance(mask_grid, torch.Tensor) else np.asarray(mask_grid)
    flat = arr.reshape(-1)
    if flat.size == 0:
        raise QKHooksError("patch_argmax got an empty grid.")
    if flat.dtype.kind == "f" and np.isnan(flat).any():
        raise QKHooksError("patch_argmax got NaN values; clean the grid first (e.g. torch.nan_to_num).")
    return int(first_argmax(torch.from_numpy(np.ascontiguousarray(flat))[None])[0])


OVERLAP_TOLERANCE = 2e-3
"""How far target + distractor fractions may exceed 1 in one cell before the masks count as overlapping: rounding
of area-averaged masks and of masks stored in float16, well below one pixel of a 16 x 16 patch (1/256)."""


def refuse_overlap(target: torch.Tensor | np.ndarray, distractor: torch.Tensor | np.ndarray, names: Sequence[str],
                   cells: str, error: type[QKHooksError] = QKHooksError) -> None:
    """Refuse odd-one-out masks that overlap: METHODS A.7 takes background = 1 - target - distractor, so the three
    values of a query sum to 1 only for disjoint masks (overlapping cells count twice, background goes negative).

    Args:
        target, distractor: (B, H, W) masks, booleans or fractions; a cell overlaps where the two add up to more than
            1 + :data:`OVERLAP_TOLERANCE` (booleans: where both are set), so touching masks and area-averaged edges
            pass.
        names: how the message names each of the B images (ids, files, run-file indices).
        cells: what a cell is, for the message (e.g. "pixels", "patches of the 14 x 14 grid").
        error: the refusal's type (:class:`~qkhooks.errors.DataRefusal` for items found while a run is recorded).
    """
    t, d = (torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m) for m in (target, distractor))
    both = t.to(torch.float64) + d.to(torch.float64)
    overlap = (both > 1 + OVERLAP_TOLERANCE).flatten(1).sum(1)
    bad = overlap.nonzero().flatten().tolist()
    if not bad:
        return
    counts = ", ".join(f"{names[i]}: {int(overlap[i])} of {both[i].numel()} {cells}" for i in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    raise error(
        f"the target and distractor masks overlap ({counts}{more}). METHODS A.7 takes background = 1 - target - "
        "distractor, so overlapping masks count those cells twice and a query's three values (T, D, B) no longer sum "
        "to 1. The masks must be disjoint: fix or drop these items (e.g. distractor = distractor & ~target, if the "
        "target was drawn into the distractor mask)."
    )


def refuse_outside_fractions(mask: torch.Tensor, name: str, cells: str) -> None:
    """Refuse a mask with a value outside [0, 1] (or NaN): METHODS A.7 reads a mask as the fraction of each cell the
    object covers and takes background = 1 - target - distractor, so a value of 255 (an 8-bit PNG) or below 0 (a
    signed or normalised mask) gives shares outside [0, 1] (review r45: 0/255 masks were refused as "overlapping", a
    mask of -0.2 outside its object gave T->T = -0.05 and T->B = 1.18 without a word)."""
    if mask.numel() == 0:
        return
    # rounding of area-resampled or float16-stored fractions is let by, as refuse_overlap lets it by
    bad = ~((mask >= -OVERLAP_TOLERANCE) & (mask <= 1 + OVERLAP_TOLERANCE))
    if not bool(bad.any()):
        return
    values = mask[bad]
    shown = ", ".join(f"{float(v):g}" for v in values.unique()[:4].tolist())
    count = int(bad.sum())
    where = f"{count} {cells}" + ("" if count == 1 else "es" if cells.endswith("ch") else "s")  # "patches"
    raise QKHooksError(
        f"the {name} holds values outside [0, 1] ({shown} at {where}): a mask is the fraction of "
        "each cell its object covers (METHODS A.7: background = 1 - target - distractor), so such values make shares "
        "outside [0, 1]. Pass booleans or fractions: mask > 0 for a 0/255 (8-bit) or labelled mask, mask / 255 for "
        "an anti-aliased 8-bit one; NaN has no fraction."
    )
