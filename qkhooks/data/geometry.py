"""Where the pixels of a source image go in the model input (:class:`Geometry`), and the exact area resampling
that coverage fractions and ``interpolation="area"`` images use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from qkhooks.errors import QKHooksError

__all__ = ["Geometry", "crop_offset", "CROP_RULES"]


def _area_resize_axis(arr: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Exact area-weighted resampling of ``arr`` along one axis to ``n_out`` samples.

    Treats the input as a step function (pixel ``j`` covers ``[j, j + 1)``) and
    integrates it over each output interval ``[i * s, (i + 1) * s)``, ``s = n_in / n_out``,
    via the piecewise-linear cumulative sum. Works for shrinking and enlarging.
    Processed in column chunks so a large photo never needs a full float64 copy.
    """
    n_in = arr.shape[axis]
    moved = np.moveaxis(arr, axis, 0)
    flat = moved.reshape(n_in, -1)
    scale = n_in / n_out
    edges = np.arange(n_out + 1, dtype=np.float64) * scale
    idx = np.minimum(np.floor(edges).astype(np.int64), n_in - 1)
    frac = (edges - idx)[:, None]
    out = np.empty((n_out, flat.shape[1]), dtype=np.float64)
    step = max(1, (1 << 22) // max(1, n_in))  # ~32 MB of float64 per chunk
    for c0 in range(0, flat.shape[1], step):
        block = flat[:, c0 : c0 + step].astype(np.float64)
        cum = np.zeros((n_in + 1, block.shape[1]), dtype=np.float64)
        np.cumsum(block, axis=0, out=cum[1:])
        at_edges = cum[idx] + frac * block[idx]
        out[:, c0 : c0 + step] = (at_edges[1:] - at_edges[:-1]) / scale
    return np.moveaxis(out.reshape((n_out,) + moved.shape[1:]), 0, axis)


def _area_resize(arr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Exact area averaging of an ``(H, W)`` or ``(H, W, C)`` array to ``out_hw`` (float64)."""
    out = arr if arr.shape[0] == out_hw[0] else _area_resize_axis(arr, out_hw[0], 0)
    out = out if out.shape[1] == out_hw[1] else _area_resize_axis(out, out_hw[1], 1)
    return np.asarray(out, dtype=np.float64)


def _crop_pad(arr: np.ndarray, top: int, left: int, out_hw: tuple[int, int], fill: float) -> np.ndarray:
    """Cut ``out_hw`` starting at ``(top, left)`` from ``arr``; outside the array is ``fill``."""
    oh, ow = out_hw
    out = np.full((oh, ow) + arr.shape[2:], fill, dtype=arr.dtype)
    h, w = arr.shape[:2]
    r0, r1 = max(top, 0), min(top + oh, h)
    c0, c1 = max(left, 0), min(left + ow, w)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = arr[r0:r1, c0:c1]
    return out


@dataclass(frozen=True)
class Geometry:
    """Where the pixels of one source image end up in the model input.

    Resizing happens first (``source_hw -> resized_hw``), then a window of
    ``output_hw`` pixels starting at ``(top, left)`` of the resized image is
    cut out. ``top``/``left`` are negative when the resized image is smaller
    than the output; the uncovered border is zero (black image, background
    mask), exactly as torchvision's ``CenterCrop`` pads.

    Keeping this as data rather than code is what lets :meth:`ImageConfig.mask`
    put masks precisely where :meth:`ImageConfig.__call__` puts the pixels.

    Attributes:
        source_hw: ``(H, W)`` of the original image.
        resized_hw: ``(H, W)`` after the resize step (equal to ``source_hw`` when no resize happens).
        top: Row of the resized image that becomes output row 0.
        left: Column of the resized image that becomes output column 0.
        output_hw: ``(H, W)`` fed to the model.
    """

    source_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    top: int
    left: int
    output_hw: tuple[int, int]

    def apply(self, image: Image.Image, resample: Image.Resampling, fill: int = 0) -> Image.Image:
        """Resize then crop/pad a PIL image of any mode with the given filter.

        Args:
            image: Image whose ``(H, W)`` equals :attr:`source_hw`.
            resample: Pillow filter; the caller picks it by data type (bicubic for
                photos, NEAREST for labels; coverage fractions use :meth:`apply_area`).
            fill: Value of padded pixels (every band); masks always use 0.

        Returns:
            The image in model-input geometry (``output_hw``).

        Raises:
            QKHooksError: if the image size does not match the geometry, which means
                a mask and its image disagree in size.
        """
        if (image.height, image.width) != self.source_hw:
            raise QKHooksError(
                f"array of size {(image.height, image.width)} does not match the image size {self.source_hw} "
                "this geometry was computed for; masks must have the same (H, W) as their image."
            )
        if self.resized_hw != self.source_hw:
            image = image.resize((self.resized_hw[1], self.resized_hw[0]), resample)
        oh, ow = self.output_hw
        if (self.top, self.left) == (0, 0) and self.resized_hw == self.output_hw:
            return image
        if fill == 0:
            # PIL fills out-of-bounds crop regions with 0, matching torchvision's zero padding.
            return image.crop((self.left, self.top, self.left + ow, self.top + oh))
        colour = (fill,) * len(image.getbands()) if len(image.getbands()) > 1 else fill
        canvas = Image.new(image.mode, (ow, oh), colour)
        canvas.paste(image, (-self.left, -self.top))
        return canvas

    def apply_area(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Resize by exact area averaging, then crop/pad, a numpy ``(H, W[, C])`` array.

        Used for coverage fractions (and ``interpolation="area"`` images): each output
        pixel is the mean of the source over its footprint, partial pixels weighted by
        the overlapping area.

        Args:
            array: Array whose first two dims equal :attr:`source_hw`.
            fill: Value of padded pixels.

        Returns:
            float64 array of shape ``output_hw (+ C)``.
        """
        if tuple(array.shape[:2]) != self.source_hw:
            raise QKHooksError(
                f"array of size {tuple(array.shape[:2])} does not match the image size {self.source_hw} "
                "this geometry was computed for; masks must have the same (H, W) as their image."
            )
        resized = _area_resize(array, self.resized_hw)
        return _crop_pad(resized, self.top, self.left, self.output_hw, fill)

    def source_box(self) -> tuple[float, float, float, float]:
        """The model-input window expressed in source-image pixel coordinates.

        Useful to map a patch back to the original photo (e.g. for plotting).

        Returns:
            ``(top, left, bottom, right)`` in source pixels (may extend outside the
            image when the output is padded).
        """
        sy = self.source_hw[0] / self.resized_hw[0]
        sx = self.source_hw[1] / self.resized_hw[1]
        return (
            self.top * sy,
            self.left * sx,
            (self.top + self.output_hw[0]) * sy,
            (self.left + self.output_hw[1]) * sx,
        )


CROP_RULES = ("torchvision", "hf")
"""Where a centre crop starts: torchvision's (timm's) rule, or Hugging Face image processors' (:func:`crop_offset`)."""


def crop_offset(source: int, crop: int, rule: str = "torchvision") -> int:
    """Centre-crop offset along one axis (negative means zero padding), by ``rule``.

    torchvision pads ``(crop - source) // 2`` on the leading side when the image is
    too small, and otherwise starts at ``int(round((source - crop) / 2))`` (Python's
    banker's rounding). Copying it exactly keeps us bit-identical with timm.
    Hugging Face's ``center_crop`` starts at ``(source - crop) // 2`` (floor), padding ``ceil((crop - source) / 2)``
    before: one pixel earlier than torchvision where the margin is odd (a margin of 3 mod 4 in the rounding).
    """
    if rule == "hf":
        return (source - crop) // 2
    if crop > source:
        return -((crop - source) // 2)
    return int(round((source - crop) / 2.0))
