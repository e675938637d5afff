"""Figures of the modes analysis: query map in red, key map in cyan over the dimmed image (Fig. 4).

:func:`overlay` draws one panel, :func:`plot_overlay_grid` a grid of them in whole pixels, :func:`plot_mode`
one mode's top images for both signs, :func:`plot_layer_overview` the leading mode of every head of a layer.
Figures are :class:`matplotlib.figure.Figure` objects: the global matplotlib backend is never changed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qkhooks.errors import QKHooksError
from qkhooks.analysis.geometry import grid_of
from qkhooks.analysis.topk import top_images

__all__ = ["map_to_grid", "overlay", "Panel", "plot_overlay_grid", "grid_layout", "mode_name", "plot_mode",
           "plot_layer_overview"]


def map_to_grid(values: Any, num_prefix_tokens: int, grid: Sequence[int] | None = None) -> np.ndarray:
    """A map over all tokens (N,) -> its patch part on the grid (gh, gw) (row-major, as ViTs order patches)."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    patches = values.shape[0] - int(num_prefix_tokens)
    rows, cols = grid_of(patches, grid)
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
    from matplotlib.figure import Figure

    nrows = len(rows)
    ncols = max((len(r) for r in rows), default=0)
    if nrows == 0 or ncols == 0:
        raise QKHooksError("plot_overlay_grid needs at least one panel.")
    width, height, box = grid_layout(nrows, ncols, panel_px, bool(row_labels))
    fig = Figure(figsize=((width + 0.01) / dpi, (height + 0.01) / dpi), dpi=dpi)
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
        c = "" if cos is None else f"\ncos {float(cos[h, mode]):+.2f}" if np.isfinite(cos[h, mode]) else "\nnull mode"
        labels.append(f"H{h} M{mode}{c}")
    title = f"L{layer}: mode {mode} of each head (red: query, cyan: key; +/− = sign of the mode)"
    return plot_overlay_grid(rows, path, title, labels, panel_px=120, normalize=normalize)
