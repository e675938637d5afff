"""One item of qkhooks' own datasets, from loading to a batch: the full-resolution record (:class:`_Raw`), how to
load it (:class:`_Record`), the dataset that preprocesses it for one model (:class:`ImageDataset`), and
:func:`collate`. Shared by the folder, sample, ADE20K and O3 datasets and by the user's sources."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from qkhooks.data.preprocess import ImageConfig, to_rgb
from qkhooks.errors import QKHooksError

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "collate"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
"""Extensions a folder dataset picks up (compared case-insensitively)."""


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
