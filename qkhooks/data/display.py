"""Images as a viewer shows them: the one conversion (:func:`to_rgb`) every image source goes through, from any
PIL mode or numpy array to a decoded 8-bit RGB image, refusing what has no defined display colours."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from qkhooks.errors import DataRefusal, QKHooksError

__all__ = ["DISPLAY_BACKGROUND", "to_rgb"]

#: What transparent pixels are composited on: white, the page colour of image viewers and browsers. Dropping
#: alpha instead (timm's ``convert("RGB")``) would show whatever colour the file stores under alpha = 0.
DISPLAY_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_BITS16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_DIRECT_MODES = ("RGB", "RGBX", "L", "1", "YCbCr")
_EXIF_ORIENTATION = 0x0112


def to_rgb(image: Image.Image | np.ndarray, *, name: str | None = None) -> Image.Image:
    """An 8-bit RGB image of what a viewer displays: the one conversion every image source uses.

    * EXIF orientation is applied (``ImageOps.exif_transpose``): a photo is recorded as shown, not as stored.
    * 16-bit samples (PIL ``I;16*``, a 16-bit greyscale PNG opened as ``I``, a ``uint16`` array) are full-range
      by definition of the format, so 0..65535 maps to 0..255 as ``round(v / 257)`` (exact at 0, 257k and
      65535), as viewers show them; 12-bit data stored in 16 bits therefore looks dark, as it does there.
    * Float samples (PIL ``F``, float arrays) are taken as 0..1 and mapped by ``round(v * 255)``; values
      outside [0, 1] or NaN have no defined display range and are refused rather than clipped.
    * Other 32-bit integer images are refused (their display range is not defined).
    * Transparent pixels (RGBA, LA, palette, grey or RGB with a transparent level or colour: a PNG's tRNS) are
      composited on :data:`DISPLAY_BACKGROUND`
      (white): ``round((c * a + 255 * (255 - a)) / 255)``.
    * CMYK without colour management, like a browser without a profile: ``R = round((255 - C)(255 - K) / 255)``
      (likewise G with M, B with Y). Embedded ICC profiles are not applied, for RGB images neither (as timm
      and torchvision do not).
    * Greyscale and 1-bit images are replicated to three channels; palette images are looked up.

    Arrays may be ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` of ``uint8``, ``uint16``, ``bool``
    or floats; other dtypes are refused with the fix.

    Returns:
        A new, fully decoded image: the caller may close the file it came from.

    Raises:
        DataRefusal: for an image whose display values are not defined (see above), naming the fix: a refusal of
            the data (a folder skips such a file, listing it; other sources stop the run, saying where its file
            stands).
        QKHooksError: for what is not an image, and while PIL loads truncated images.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if not isinstance(image, Image.Image):
        raise QKHooksError(f"expected a PIL.Image.Image, got {type(image).__name__}; use PIL.Image.open(path).")
    if getattr(image, "fp", None) is not None and ImageFile.LOAD_TRUNCATED_IMAGES:  # decoded below
        raise QKHooksError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (set by your code or a library), so a truncated "
            "photo would be decoded with its missing rows filled grey and recorded without a word, where qkhooks "
            "skips it naming it; set PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False while recording.")
    if getattr(image, "n_frames", 1) > 1:  # an animated PNG, WebP or GIF, a multi-page TIFF
        # name: the file an image decoded from its bytes in memory was read from (it has no filename of its own)
        warnings.warn(f"{name or getattr(image, 'filename', '') or 'an image'} has {image.n_frames} frames; its first frame is "
                      "recorded (as timm and Hugging Face read it); save the frame you mean as a still image to "
                      "record another.", stacklevel=2)
    from_png = image.format == "PNG"
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("RGB", "L") and "transparency" in image.info:  # a PNG tRNS colour or grey level: transparent there
        return _composite(np.asarray(image.convert("RGBA")))
    if mode == "RGB":
        return image.copy()  # decoded now, and independent of the caller's (possibly closed) file
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    if mode in _BITS16_MODES or (mode == "I" and from_png):
        return _array_to_rgb(np.asarray(image).astype(np.uint16, copy=False))
    if mode == "F":
        return _array_to_rgb(np.asarray(image, dtype=np.float32))
    if mode == "P" or mode in _ALPHA_MODES:
        has_alpha = mode != "P" or "transparency" in image.info or image.palette.mode == "RGBA"
        if not has_alpha:
            return image.convert("RGB")
        return _composite(np.asarray(image.convert("RGBA")))
    if mode == "CMYK":
        return _cmyk_to_rgb(np.asarray(image))
    raise DataRefusal(
        f"image mode {mode!r} has no defined display colours in qkhooks (it handles RGB, RGBA, L, LA, 1, P, "
        "CMYK, YCbCr, 16-bit and float images); convert the image to RGB yourself, e.g. image.convert('RGB')."
    )


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise DataRefusal(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}; "
            "for a (C, H, W) tensor pass array.transpose(1, 2, 0)."
        )
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), half up
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.isnan(arr).any() or arr.min() < 0.0 or arr.max() > 1.0):
            lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if not np.isnan(arr).all() else (np.nan, np.nan)
            raise DataRefusal(
                f"float image with values in [{lo:g}, {hi:g}]{' and NaN' if np.isnan(arr).any() else ''}: only "
                "0..1 has a defined display range, and qkhooks does not clip; scale it to 0..1 or to uint8 first."
            )
        arr = np.floor(arr.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise DataRefusal(
            f"image array of dtype {arr.dtype} has no defined display range (qkhooks reads uint8, uint16, bool "
            "and 0..1 floats); convert it, e.g. array.astype(np.uint8) if it already holds 0..255."
        )
    if arr.ndim == 3 and arr.shape[2] == 4:
        return _composite(arr)
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def _composite(rgba: np.ndarray) -> Image.Image:
    """Straight-alpha RGBA ``uint8`` composited on :data:`DISPLAY_BACKGROUND`."""
    colour = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    background = np.asarray(DISPLAY_BACKGROUND, dtype=np.uint32)
    mixed = (colour * alpha + background * (255 - alpha) + 127) // 255
    return Image.fromarray(mixed.astype(np.uint8), "RGB")


def _cmyk_to_rgb(cmyk: np.ndarray) -> Image.Image:
    white = 255 - cmyk.astype(np.uint32)
    rgb = (white[:, :, :3] * white[:, :, 3:] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")
