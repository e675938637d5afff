"""Synthetic odd-one-out search displays in the spirit of O3 (Kotseruba et al., 2019).

A display is a set of identical distractors plus one target that differs from
them in exactly one feature (colour, orientation, shape or size). Because we
draw every pixel ourselves, the target/distractor masks are exact, which makes
these displays a controlled probe of whether attention or a QK mode "pops out"
the singleton.

Design choices (and why):

* No anti-aliasing: every pixel is either item or background, so masks equal
  the drawn pixels exactly and colour tests are exact.
* Items are placed one per grid cell and kept ``margin / 2`` pixels inside their
  cell, so any two items are at least ``margin`` background pixels apart (and at
  least ``margin // 2`` from the border), even with jitter.
* Item centres are snapped to pixel centres, so all distractors have exactly the
  same pixels up to translation.
* "Size" means the side of the equal-area square (``sqrt(area)``), so a shape
  singleton (circle among squares) has the same area as its distractors and
  differs only in shape.
* Everything is drawn from ``numpy.random.default_rng(SeedSequence([seed,
  index]))``: each display is reproducible on its own, independent of how many
  others are generated or in which order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from qkhooks.errors import QKHooksError

__all__ = [
    "FEATURES",
    "ItemSpec",
    "O3Stimulus",
    "SHAPES",
    "generate_o3",
    "make_o3",
]

FEATURES: tuple[str, ...] = ("colour", "orientation", "shape", "size")
"""Features a target can differ in."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shapes used for the shape feature (bars are used for orientation)."""

_ALL_SHAPES: tuple[str, ...] = SHAPES + ("bar",)
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 40, 40),  # red
    (40, 170, 60),  # green
    (40, 90, 230),  # blue
    (240, 200, 30),  # yellow
    (200, 50, 200),  # magenta
    (30, 200, 210),  # cyan
    (245, 130, 20),  # orange
    (130, 60, 220),  # purple
)
_BAR_ANGLES: tuple[int, ...] = (0, 30, 45, 60, 90, 120, 135, 150)
_ORIENTATION_DELTAS: tuple[int, ...] = (45, 60, 90)
_BAR_ASPECT = 4.0  # length / width
_MIN_ITEM_SIZE = 3.5  # sqrt(area) in px; below this shapes stop being recognisable
_MIN_SIDE = 48
_MIN_CELL = 28  # px; automatic grids never use smaller cells


@dataclass(frozen=True)
class ItemSpec:
    """Appearance of one item.

    Attributes:
        shape: ``"circle"``, ``"square"``, ``"triangle"`` (equilateral, apex up) or ``"bar"``.
        colour: RGB fill.
        size: Square root of the item's area in pixels (area-equivalent square side).
        orientation: Degrees counter-clockwise from horizontal, in [0, 180); only bars rotate
            (it is 0 for other shapes).
    """

    shape: str
    colour: tuple[int, int, int]
    size: float
    orientation: float = 0.0

    def half_extents(self) -> tuple[float, float]:
        """Half height and half width of the item's bounding box, in pixels."""
        ey, ex = _unit_half_extents(self.shape, self.orientation)
        return ey * self.size, ex * self.size


def _unit_half_extents(shape: str, orientation: float) -> tuple[float, float]:
    """Bounding-box half extents ``(ey, ex)`` of a ``size == 1`` item."""
    if shape == "circle":
        r = 1.0 / math.sqrt(math.pi)
        return r, r
    if shape == "square":
        return 0.5, 0.5
    if shape == "triangle":
        a = math.sqrt(4.0 / math.sqrt(3.0))  # side of the unit-area equilateral triangle
        return math.sqrt(3.0) / 4.0 * a, a / 2.0
    if shape == "bar":
        w = 1.0 / math.sqrt(_BAR_ASPECT)
        length = _BAR_ASPECT * w
        t = math.radians(orientation)
        c, s = abs(math.cos(t)), abs(math.sin(t))
        return length / 2 * s + w / 2 * c, length / 2 * c + w / 2 * s
    raise QKHooksError(f"unknown shape {shape!r}; use one of {_ALL_SHAPES}.")


def _rasterise(spec: ItemSpec, cy: float, cx: float, hw: tuple[int, int]) -> tuple[slice, slice, np.ndarray]:
    """Pixels whose centres ``(i + 0.5, j + 0.5)`` fall inside the item.

    Returns:
        Row slice, column slice and the boolean mask inside that window.
    """
    h, w = hw
    ey, ex = spec.half_extents()
    r0, r1 = max(0, math.floor(cy - ey - 1)), min(h, math.ceil(cy + ey + 1))
    c0, c1 = max(0, math.floor(cx - ex - 1)), min(w, math.ceil(cx + ex + 1))
    dy = (np.arange(r0, r1) + 0.5 - cy)[:, None]
    dx = (np.arange(c0, c1) + 0.5 - cx)[None, :]
    s = spec.size
    if spec.shape == "circle":
        r = s / math.sqrt(math.pi)
        inside = dx * dx + dy * dy <= r * r
    elif spec.shape == "square":
        inside = (np.abs(dx) <= s / 2) & (np.abs(dy) <= s / 2)
    elif spec.shape == "triangle":
        a = s * math.sqrt(4.0 / math.sqrt(3.0))
        th = math.sqrt(3.0) / 2.0 * a
        from_apex = dy + th / 2  # 0 at the apex, th at the base (y grows downwards)
        inside = (from_apex >= 0) & (from_apex <= th) & (np.abs(dx) <= (a / 2) * from_apex / th)
    elif spec.shape == "bar":
        bw = s / math.sqrt(_BAR_ASPECT)
        length = _BAR_ASPECT * bw
        t = math.radians(spec.orientation)
        # Counter-clockwise on screen: the long axis points along (cos t, -sin t) in (x, y-down).
        along = dx * math.cos(t) - dy * math.sin(t)
        across = dx * math.sin(t) + dy * math.cos(t)
        inside = (np.abs(along) <= length / 2) & (np.abs(across) <= bw / 2)
    else:
        raise QKHooksError(f"unknown shape {spec.shape!r}; use one of {_ALL_SHAPES}.")
    return slice(r0, r1), slice(c0, c1), np.asarray(inside, dtype=bool)


@dataclass(frozen=True)
class O3Stimulus:
    """One odd-one-out display with exact full-resolution masks.

    Attributes:
        image: The RGB display.
        target: ``(H, W)`` bool, pixels of the target.
        distractor: ``(H, W)`` bool, union of all distractor pixels.
        distractor_items: ``(H, W)`` int32, 0 outside distractors, ``1..K`` per distractor
            (numbered in row-major cell order).
        feature: The one feature in which target and distractors differ.
        target_spec: Appearance of the target.
        distractor_spec: Appearance shared by every distractor.
        target_centre: ``(y, x)`` of the target centre in pixels.
        distractor_centres: ``(y, x)`` per distractor, in ``distractor_items`` id order.
        layout: ``"grid"`` or ``"scatter"``.
        background: ``"plain"`` or ``"texture"``.
        seed: Seed the display was drawn from.
        index: Index the display was drawn for.
    """

    image: Image.Image
    target: np.ndarray
    distractor: np.ndarray
    distractor_items: np.ndarray
    feature: str
    target_spec: ItemSpec
    distractor_spec: ItemSpec
    target_centre: tuple[float, float]
    distractor_centres: tuple[tuple[float, float], ...]
    layout: str
    background: str
    seed: int
    index: int
    margin: int = field(default=0)

    @property
    def num_distractors(self) -> int:
        """Number of distractors ``K``."""
        return len(self.distractor_centres)

    @property
    def objects(self) -> np.ndarray:
        """Instance map: 0 background, 1 target, ``2..K+1`` distractors (``distractor_items + 1``)."""
        out = np.where(self.distractor_items > 0, self.distractor_items + 1, 0).astype(np.int32)
        out[self.target] = 1
        return out


def _background(rng: np.random.Generator, hw: tuple[int, int], kind: str) -> np.ndarray:
    """Grey background, optionally with a mild smooth + fine noise texture (about +-12 levels)."""
    h, w = hw
    grey = int(rng.integers(90, 171))
    base = np.full((h, w), float(grey), dtype=np.float64)
    if kind == "texture":
        coarse = rng.normal(0.0, 1.0, size=(max(2, h // 16), max(2, w // 16))).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
        smooth = smooth / (np.abs(smooth).max() + 1e-9) * 8.0
        base = base + smooth + rng.uniform(-4.0, 4.0, size=(h, w))
    elif kind != "plain":
        raise QKHooksError(f"background must be 'plain' or 'texture', got {kind!r}.")
    grey_img = np.clip(np.rint(base), 0, 255).astype(np.uint8)
    return np.repeat(grey_img[:, :, None], 3, axis=2)


def _pick(rng: np.random.Generator, options: Sequence, exclude: object = None):  # type: ignore[no-untyped-def]
    """Uniform choice from ``options`` minus ``exclude`` (keeps native Python types)."""
    pool = [o for o in options if o != exclude]
    return pool[int(rng.integers(len(pool)))]


def make_o3(
    seed: int,
    index: int,
    size: tuple[int, int] = (224, 224),
    *,
    features: Sequence[str] = FEATURES,
    layout: str | None = None,
    background: str | None = None,
    cells: int | None = None,
    margin: int | None = None,
) -> O3Stimulus:
    """Draw display number ``index`` of the stream defined by ``seed``.

    Args:
        seed: Non-negative stream seed.
        index: Non-negative display index; ``(seed, index)`` fixes the display.
        size: ``(H, W)`` of the image in pixels, each at least 48.
        features: Features the target may differ in; one is chosen per display.
        layout: ``"grid"`` (all cells filled, items centred), ``"scatter"`` (a random
            subset of cells, items jittered inside them) or ``None`` to choose at random.
        background: ``"plain"``, ``"texture"`` or ``None`` to choose at random.
        cells: Number of grid cells along the shorter side (>= 2); ``None`` draws 3 to 5,
            capped so that cells stay at least 28 px.
        margin: Minimum number of background pixels between any two items (half of it
            to the image border); ``None`` uses 8% of a cell (at least 2).

    Returns:
        The display and its exact masks.

    Raises:
        QKHooksError: for bad arguments or an image too small for the requested grid.
    """
    if int(seed) != seed or seed < 0 or int(index) != index or index < 0:
        raise QKHooksError(f"seed and index must be non-negative integers, got seed={seed!r}, index={index!r}.")
    h, w = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) and len(size) == 2 else (0, 0)
    if min(h, w) < _MIN_SIDE:
        raise QKHooksError(f"o3 stimuli need size (H, W) with both sides >= {_MIN_SIDE}, got {size!r}.")
    features = tuple(features)
    bad = [f for f in features if f not in FEATURES]
    if not features or bad:
        raise QKHooksError(f"features must be a non-empty subset of {FEATURES}, got {features!r}.")
    if layout not in (None, "grid", "scatter"):
        raise QKHooksError(f"layout must be 'grid', 'scatter' or None, got {layout!r}.")
    if background not in (None, "plain", "texture"):
        raise QKHooksError(f"background must be 'plain', 'texture' or None, got {background!r}.")
    if cells is not None and (int(cells) != cells or cells < 2):
        raise QKHooksError(f"cells must be an integer >= 2, got {cells!r}.")

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    feature = _pick(rng, features)
    layout = layout or _pick(rng, ("grid", "scatter"))
    background = background or _pick(rng, ("plain", "texture"))
    drawn_k = int(rng.integers(3, 6))  # always drawn, so explicit `cells` leaves the rest of the stream alone
    k = int(cells) if cells is not None else min(drawn_k, max(2, min(h, w) // _MIN_CELL))

    # Grid: k cells along the shorter side, as many square-ish cells as fit along the longer.
    short = min(h, w)
    rows = max(1, math.floor(h / (short / k)))
    cols = max(1, math.floor(w / (short / k)))
    cell_h, cell_w = h / rows, w / cols
    m = int(margin) if margin is not None else max(2, round(0.08 * min(cell_h, cell_w)))
    if m < 0:
        raise QKHooksError(f"margin must be >= 0, got {margin!r}.")
    # Pixel centres of an item stay within its cell shrunk by m/2 + 0.5 on each side, so
    # two neighbours' pixel centres are >= m + 1 apart: at least m background pixels between.
    # A further 0.5 px is reserved for snapping centres onto pixel centres (see below).
    avail_y = (cell_h - m - 2) / 2
    avail_x = (cell_w - m - 2) / 2

    # Appearance of distractors and target: identical except in `feature`.
    if feature == "orientation":
        shape_d = "bar"
    elif feature == "shape":
        shape_d = _pick(rng, SHAPES)
    else:
        shape_d = _pick(rng, _ALL_SHAPES)
    shape_t = _pick(rng, SHAPES, exclude=shape_d) if feature == "shape" else shape_d
    colour_d = _pick(rng, _PALETTE)
    colour_t = _pick(rng, _PALETTE, exclude=colour_d) if feature == "colour" else colour_d
    angle_d = float(_pick(rng, _BAR_ANGLES)) if shape_d == "bar" else 0.0
    if feature == "orientation":
        delta = _pick(rng, _ORIENTATION_DELTAS) * (1 if rng.random() < 0.5 else -1)
        angle_t = float((angle_d + delta) % 180)
    else:
        angle_t = angle_d

    def fit(shape: str, angle: float) -> float:
        ey, ex = _unit_half_extents(shape, angle)
        return min(avail_y / ey, avail_x / ex)

    s_fit = min(fit(shape_d, angle_d), fit(shape_t, angle_t))
    if feature == "size":
        big = s_fit * float(rng.uniform(0.75, 0.9))
        small = big / float(rng.uniform(1.6, 2.0))
        size_t, size_d = (big, small) if rng.random() < 0.5 else (small, big)
    else:
        size_d = size_t = s_fit * float(rng.uniform(0.55, 0.8))
    if min(size_d, size_t) < _MIN_ITEM_SIZE:
        raise QKHooksError(
            f"image {(h, w)} is too small for a {rows}x{cols} grid with margin {m}: items would be under "
            f"{_MIN_ITEM_SIZE} px; pass fewer cells (e.g. cells=3), a smaller margin or a larger size."
        )
    spec_d = ItemSpec(shape_d, colour_d, size_d, angle_d)
    spec_t = ItemSpec(shape_t, colour_t, size_t, angle_t)

    n_cells = rows * cols
    if n_cells < 4:
        raise QKHooksError(f"a {rows}x{cols} grid holds fewer than 4 items; pass more cells.")
    if layout == "grid":
        occupied = np.arange(n_cells)
    else:
        count = int(rng.integers(max(4, math.ceil(0.5 * n_cells)), n_cells + 1))
        occupied = np.sort(rng.choice(n_cells, size=count, replace=False))
    target_slot = int(rng.integers(len(occupied)))

    img = _background(rng, (h, w), background)
    target = np.zeros((h, w), dtype=bool)
    items = np.zeros((h, w), dtype=np.int32)
    target_centre: tuple[float, float] = (0.0, 0.0)
    centres: list[tuple[float, float]] = []
    for slot, cell in enumerate(occupied.tolist()):
        spec = spec_t if slot == target_slot else spec_d
        r, c = divmod(cell, cols)
        cy, cx = (r + 0.5) * cell_h, (c + 0.5) * cell_w
        if layout == "scatter":
            ey, ex = spec.half_extents()
            cy += float(rng.uniform(-1, 1)) * max(0.0, avail_y - ey)
            cx += float(rng.uniform(-1, 1)) * max(0.0, avail_x - ex)
        # Snap to a pixel centre: identical specs then rasterise to identical pixel
        # patterns (integer translations), so all distractors are pixel-for-pixel alike.
        cy, cx = round(cy - 0.5) + 0.5, round(cx - 0.5) + 0.5
        rs, cs, inside = _rasterise(spec, cy, cx, (h, w))
        img[rs, cs][inside] = spec.colour
        if slot == target_slot:
            target[rs, cs] |= inside
            target_centre = (cy, cx)
        else:
            centres.append((cy, cx))
            items[rs, cs][inside] = len(centres)
    return O3Stimulus(
        image=Image.fromarray(img),
        target=target,
        distractor=items > 0,
        distractor_items=items,
        feature=feature,
        target_spec=spec_t,
        distractor_spec=spec_d,
        target_centre=target_centre,
        distractor_centres=tuple(centres),
        layout=layout,
        background=background,
        seed=int(seed),
        index=int(index),
        margin=m,
    )


def generate_o3(n: int, seed: int = 0, size: tuple[int, int] = (224, 224), **options: object) -> list[O3Stimulus]:
    """Draw displays ``0..n-1`` of the stream ``seed``.

    Args:
        n: Number of displays (>= 0).
        seed: Non-negative stream seed.
        size: ``(H, W)`` in pixels.
        **options: Forwarded to :func:`make_o3` (``features``, ``layout``, ``background``,
            ``cells``, ``margin``).

    Returns:
        ``[make_o3(seed, i, size, **options) for i in range(n)]``.
    """
    if int(n) != n or n < 0:
        raise QKHooksError(f"n must be a non-negative integer, got {n!r}.")
    return [make_o3(seed, i, size, **options) for i in range(int(n))]  # type: ignore[arg-type]
