"""Reading the user's containers: one item (a PIL image, an array, bytes, a path, a pair or a dict with masks)
to a full-resolution record through the folders' RGB conversion, and one reader per kind of source (torch
Datasets and sequences, iterables, Hugging Face datasets, webdataset tar shards) with its opener. Readers read
cheaply in order (:meth:`rows`) and decode later, in worker processes when asked (:meth:`decode`)."""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from qkhooks.data.annotated import o3_item
from qkhooks.data.items import (
    IMAGE_EXTENSIONS,
    exif_orientation,
    file_fault,
    mask_as_shown,
    mask_pixels,
    nas_thumbnail_folder,
    nas_thumbnails_left_out,
    not_a_label_map,
    RawItem,
    read_mask,
    read_oriented,
    read_stamped,
    bytes_hash,
    digest_value,
)
from qkhooks.data.preprocess import to_rgb
from qkhooks.errors import DataRefusal, QKHooksError

DATASETS_INSTALL = "pip install 'qkhooks[datasets]'  (or: pip install datasets)"
MASK_KEYS: tuple[str, ...] = ("objects", "target", "distractor")
ID_COLUMNS: tuple[str, ...] = ("id", "image_id", "img_id", "uid", "key", "__key__", "file_name", "filename")
_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS) + ("bmp", "tif", "tiff", "gif", "ppm", "pgm")
CHECK_BAR_DELAY = 2.0  # seconds a resume's check of its kept images runs before its progress bar shows (check_bar)
READ_AGAIN_BUDGET = 60.0  # seconds a resume spends reading a torch Dataset's kept items again (MapReader._read_again)


# ---------------------------------------------------------------------------------------------- items


def _decoded(read: Any, value: Any) -> Any:
    """``read(value)``, a failure to decode that is the data's own (corrupt or truncated bytes, a missing file:
    :func:`file_fault`) turned into :class:`Unreadable`; the machine's (out of memory, ...) propagate."""
    try:
        return read(value)
    except QKHooksError:
        raise
    except Exception as exc:
        if not file_fault(exc):
            raise
        raise Unreadable(f"{type(exc).__name__}: {exc}") from exc


def _image_of(value: Any, where: str) -> tuple[Image.Image, int]:
    """Any accepted image value to RGB through the folders' conversion, and the EXIF orientation that applied (1 for
    arrays, which carry none), from one opening of a file; tensors and unknown types refused, and pixels without
    display colours (:func:`to_rgb`) refused naming the item."""
    try:
        return _decoded(lambda v: _convert_image(v, where), value)
    except DataRefusal as exc:
        raise DataRefusal(f"{where}: {exc}") from None


def _convert_image(value: Any, where: str) -> tuple[Image.Image, int]:
    if isinstance(value, Image.Image):
        return to_rgb(value), exif_orientation(value.getexif())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return read_oriented(io.BytesIO(bytes(value)))
    if isinstance(value, (str, os.PathLike)):
        return read_oriented(os.fspath(value))
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a Hugging Face Image(decode=False) cell
        if value.get("bytes") is not None:
            return read_oriented(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return read_oriented(value["path"])
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3, 4))):
            raise QKHooksError(
                f"{where}: an image array must be uint8 (H, W) or (H, W, 3|4) as read from a file, got {value.dtype} "
                f"{value.shape}; pass the image as loaded (PIL or uint8 HWC), not normalised or CHW."
            )
        # as an L, RGB or RGBA image, so that an array and the file it was read from convert alike
        return to_rgb(np.ascontiguousarray(value)), 1
    if isinstance(value, torch.Tensor):
        raise QKHooksError(
            f"{where}: the image is already a tensor {tuple(value.shape)} {value.dtype}, the output of some transform "
            "or collate_fn; qkhooks applies the model's own preprocessing, so give it the images as loaded (PIL "
            "images or uint8 HWC arrays): drop the transform, or pass the dataset without it."
        )
    raise QKHooksError(
        f"{where}: cannot read an image from a {type(value).__name__}; give a PIL image, a uint8 (H, W[, 3]) array, "
        "encoded bytes, a file path, or a dict with 'image'."
    )


def _mask_of(value: Any) -> tuple[np.ndarray, bool]:
    """A mask as an array, read as is (a PNG of labels without RGB conversion), and whether it carried an EXIF
    orientation tag of its own (then applied: it is in the frame of its photo as shown)."""
    return _decoded(_mask_array, value)


def _mask_array(value: Any) -> tuple[np.ndarray, bool]:
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    if isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(bytes(value))
    if isinstance(value, (io.IOBase, str, os.PathLike)):
        return read_mask(value)
    if isinstance(value, Image.Image):
        return mask_pixels(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value), False


def _photo_masks(item: Mapping[str, Any], value: Any, image: Image.Image, orientation: int, where: str
                 ) -> dict[str, np.ndarray]:
    """The item's masks, each a 2-D array in the frame of its photo (``image``, shown turned by the EXIF
    ``orientation``) as shown (README: masks beside EXIF-rotated photos); a colour-coded (H, W, 3) label image is
    refused with the conversion."""
    masks: dict[str, np.ndarray] = {}
    named = [f"id {str(item['id'])!r}"] if item.get("id") is not None else []
    if isinstance(value, (str, os.PathLike)):
        named.append(os.fspath(value))
    photo = f"{where} ({', '.join(named)})" if named else where
    for key in MASK_KEYS:
        if item.get(key) is None:
            continue
        mask, tagged = _mask_of(item[key])
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[:, :, 0]
        if mask.ndim == 3:
            raise QKHooksError(f"{photo}: mask {key!r} {not_a_label_map(mask.shape)}")
        source = os.fspath(item[key]) if isinstance(item[key], (str, os.PathLike)) else None
        masks[key] = mask_as_shown(mask, orientation, (image.height, image.width), photo, key, tagged, source)
    return masks


def _is_pair(item: Any) -> bool:
    """Whether ``item`` is read as an (image, label) pair, as torchvision datasets return."""
    return isinstance(item, (tuple, list)) and len(item) == 2 and not isinstance(item[0], (int, float))


def _path_id(value: Any) -> str | None:
    """An image given as a file path is named by that path, as given (found by review: named by its position, a
    resume over a list that changed could not tell that a position now holds another file); None for other images."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        return os.fsdecode(path) if isinstance(path, bytes) else path
    return None


def _cell_path_id(cell: Any) -> str | None:
    """The id of a Hugging Face image cell read from a file: its path as given, whether the column holds path strings
    or ``Image(decode=False)`` dicts ``{"path": ..., "bytes": None}`` (what ``datasets`` stores for a path or an image
    opened from a file; review r38: those rows were named by position). None for a cell that holds its image's bytes
    (the path beside them, if any, is only a label, often the bare file name): named by its position."""
    if isinstance(cell, Mapping):
        path = cell.get("path")
        return _path_id(path) if cell.get("bytes") is None and isinstance(path, (str, os.PathLike)) and path else None
    return _path_id(cell)


def _image_path(item: Any) -> str | None:
    """The file an item's image is read from, without decoding: a path given alone, as a pair's image or as a dict's
    ``"image"``, or a Hugging Face ``{"path": ..., "bytes": None}`` cell (one with bytes is read from them); None for
    an image not read from a file (in memory, bytes, a webdataset sample's member)."""
    if _is_pair(item):
        item = item[0]
    if isinstance(item, Mapping) and "image" in item:
        item = item["image"]
    if isinstance(item, Mapping):  # a Hugging Face cell; a webdataset sample's image is a member's bytes
        path = item.get("path")
        return os.fspath(path) if item.get("bytes") is None and isinstance(path, (str, os.PathLike)) and path else None
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


def _item_id(item: Any, position: int) -> str:
    """An item's id as the readers name it: its own (:func:`_own_id`), else its position."""
    own = _own_id(item)
    return str(position) if own is None else own


def _own_id(item: Any) -> str | None:
    """The id an item names itself by, or None (then its position is its id): a dict's ``"id"``; a webdataset
    sample's image member (``__key__`` and the image's extension); an image given as a file path (alone, as the
    image of a pair, or as a dict's ``"image"``), that path as given. Cheap: nothing is decoded."""
    if _is_pair(item):
        item = item[0]
    if not isinstance(item, Mapping):
        return _path_id(item)
    if item.get("id") is not None:
        return str(item["id"])
    if "__key__" in item and "image" not in item:  # a webdataset sample: its NAME.json's id, else its image member
        meta = _sample_meta(item)
        if meta.get("id") is not None:  # as wds: reads it
            return str(meta["id"])
        images = [e for e in _EXTENSIONS if e in item]
        if len(images) > 1:  # skipped (_item_to_raw), named by its key as wds: names it
            return str(item["__key__"])
        if item.get("__member__"):  # its own letter case, found in the shard (IterReader.rows)
            return str(item["__member__"])
        return f"{item['__key__']}.{images[0]}" if images else None
    return _path_id(item.get("image"))


def _sample_meta(sample: Mapping[str, Any], where: str | None = None) -> Mapping[str, Any]:
    """A webdataset sample's ``NAME.json`` as a dict (``{}`` where it has none); one that is not a JSON object (does
    not parse, is not UTF-8, holds a list) is refused naming the shard, the sample, the member and the fix, as the
    sample's other members are (it names the image: read as nothing, the sample would be recorded under another id)."""
    meta = sample.get("json")
    if meta is None:
        return {}
    problem = None
    if isinstance(meta, (bytes, bytearray, str)):
        try:
            meta = json.loads(meta)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            problem = f"is not valid JSON ({type(exc).__name__}: {exc})"
    if problem is None and not isinstance(meta, Mapping):
        problem = f"holds a JSON {type(meta).__name__}, not an object"
    if problem is None:
        return meta
    key = str(sample.get("__key__", "?"))
    member = sample.get("__members__", {}).get("json") or f"{key.rpartition('/')[2]}.json"
    if where is None:
        where = f"sample {key!r}" + (f" of {sample['__shard__']}" if sample.get("__shard__") else "")
    raise DataRefusal(f"{where}: its member {member!r} {problem}; a sample's .json is read as its metadata (its "
                      f"\"id\" names the image), so write it as one JSON object (e.g. {{\"id\": \"{key}\"}}) or leave "
                      "it out, and write the shard again.")


_READ_KEYS = ("image", "id", *MASK_KEYS)


def _unread_keys(item: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields of an item dict that are not read (labels, or a mask under another name): named in a warning once
    per stream, since a mask under another key would otherwise be dropped without a word. Webdataset's own
    ``__key__``-like fields and fields that are None are left out."""
    read = set(_READ_KEYS) | ({_image_ext(item)} if "image" not in item else set())
    return tuple(sorted(str(k) for k, v in item.items() if k not in read and v is not None
                        and not (isinstance(k, str) and k.startswith("__") and k.endswith("__"))))


def _image_value(item: Mapping[str, Any]) -> Any:
    if "image" in item:
        return item["image"]
    ext = _image_ext(item)  # webdataset samples: the image under its file extension
    return None if ext is None else item[ext]


def _item_to_raw(item: Any, where: str) -> tuple[str | None, RawItem]:
    """One user item to (its own id or None, the full-resolution image and masks)."""
    own = _own_id(item)
    if _is_pair(item):
        if not (isinstance(item[1], str) or np.ndim(item[1]) == 0):  # a mask or a second image would be lost
            raise QKHooksError(
                f"{where}: a 2-item {type(item).__name__} is read as (image, label), and its second element is taken "
                "as a label and not used; only a label that is one value (an int, a float, a str, a 0-d array or "
                "tensor) is accepted there, so that a mask or a second image given there is not lost without a "
                f"word. This one is a {type(item[1]).__name__} of shape {tuple(np.shape(item[1]))} (a multi-label "
                "or one-hot vector, boxes, a mask?). Give each item as a dict instead: {'image': image} records "
                "the image alone (e.g. [{'image': img} for img, _ in pairs], or a Dataset whose __getitem__ "
                "returns {'image': img}); give masks in a dict {'image': image, 'objects': mask}."
            )
        item = item[0]  # (image, label) as torchvision datasets return
    if not isinstance(item, Mapping):
        return own, RawItem(image=_image_of(item, where)[0])
    if "image" not in item and "__key__" in item:  # a webdataset sample: read as wds: reads its members
        item = _webdataset_item(item, own, where)
    value = _image_value(item)
    if value is None:
        raise QKHooksError(
            f"{where} has no image: its keys are {sorted(map(str, item))}; put the image under 'image' (or pass "
            "image_column= for a Hugging Face dataset)."
        )
    image, orientation = _image_of(value, where)
    masks = _photo_masks(item, value, image, orientation, where)
    if ("target" in masks) != ("distractor" in masks):
        raise QKHooksError(f"{where}: odd-one-out data needs both 'target' and 'distractor' masks, got only one.")
    if "target" in masks:
        named = f"{where} (id {str(item['id'])!r})" if item.get("id") is not None else where
        raw = o3_item((masks["target"] > 0, masks["distractor"] > 0), image, native=False, where=named)
        if "objects" in masks:
            raw.objects = masks["objects"]
    else:
        raw = RawItem(image=image, objects=masks.get("objects"))
    if raw.objects is not None and not np.issubdtype(raw.objects.dtype, np.integer) and raw.objects.dtype != bool:
        raise QKHooksError(f"{where}: 'objects' must hold integer instance labels, got {raw.objects.dtype}.")
    raw.unread = _unread_keys(item)
    return own, raw


def _mask_keys(item: Any) -> list[str]:
    """The masks an item carries, without decoding: its non-None mask keys (a webdataset sample's ``NAME.png``
    members, as :func:`_webdataset_item` reads them)."""
    if not isinstance(item, Mapping):
        return []
    wds = "__key__" in item and "image" not in item
    return [k for k in MASK_KEYS if item.get(f"{k}.png" if wds else k) is not None]


def _mask_layout(present: Iterable[str]) -> tuple[bool, bool]:
    """(has objects, has target/distractor) of an item whose non-None mask keys are ``present``, as
    :func:`_item_to_raw` makes it (odd-one-out masks give objects too)."""
    keys = set(present)
    odd = bool(keys & {"target", "distractor"})
    return ("objects" in keys or odd), odd


# ---------------------------------------------------------------------------------------------- readers


class MapReader:
    """A torch map-style Dataset or a sequence: rows are indices, so workers read only their own items."""

    holds_images = True  # an image not read from a file is stamped with its content's hash (a folder's: its file's)

    def __init__(self, container: Any):
        self.container = container
        self.length: int | None = len(container)
        # _read_again's: ((first, stop), the items read, seconds), and the ids among them named by position alone
        self._again: tuple[tuple[int, int], list[tuple[str, str | None, int | None]], float] | None = None
        self._positional: list[str] = []

    def __getstate__(self) -> dict[str, Any]:  # workers decode: the resume's reading again stays here
        return {**self.__dict__, "_again": None}

    @property
    def reads_again(self) -> bool:
        """Whether a resume reads the kept items again through ``__getitem__`` (a torch Dataset's: :meth:`_read_again`;
        a list's or tuple's are in memory, a folder's files are stamped)."""
        return self.holds_images and not isinstance(self.container, (list, tuple))

    def rows(self, start: int) -> Iterator[Any]:
        return iter(range(start, self.length or 0))

    def decode(self, row: int, position: int) -> tuple[str | None, RawItem]:
        item = _spelled(self.container[row])
        own, raw = _item_to_raw(item, f"item {position}")
        if self.holds_images:
            _stamp_held(raw, item)
        return own, raw

    def row_id(self, row: int, position: int) -> str:
        """A skipped item's id: its own (:func:`_own_id`: a dict's ``"id"``, a file path) as :meth:`decode` names the
        item, else its position. Named by position alone, a lost item was listed under another item's id, or a
        recorded one's (found by review). An item that cannot even be fetched is named by its position."""
        try:
            item = _spelled(self.container[row])
        except Exception:  # noqa: BLE001 - the item's own failure is reported where it was read
            return str(position)
        return _item_id(item, position)

    def mask_layouts(self, stop: int) -> Iterator[tuple[int, str, tuple[bool, bool]]] | None:
        """Each item's (position, id, mask layout) without decoding, for a list or tuple (whose items are already
        in memory); None for a Dataset, whose ``__getitem__`` may load the image."""
        if not isinstance(self.container, (list, tuple)):
            return None
        return ((i, _item_id(_spelled(item), i),
                 _mask_layout(_mask_keys(item)))
                for i, item in enumerate(self.container[:stop]))

    def ids_by_position(self, stop: int, progress: bool = False, first: int = 0) -> list[str]:
        """The ids of the items from ``first`` to ``stop`` named by their position alone (no id of their own:
        :func:`_own_id`): a list's or tuple's without decoding, a torch Dataset's among its items read again
        (:meth:`_read_again`, which a resume's :meth:`file_paths` then reuses; round 51: a Dataset's were not
        told). A position says nothing of the item at it: a resume of a run that holds no stamps of its images
        cannot check those."""
        if not isinstance(self.container, (list, tuple)):
            self._read_again(stop, progress, first)
            return list(self._positional)
        return [str(i) for i, item in enumerate(self.container[first:stop], start=first)
                if _own_id(_spelled(item)) is None]

    def file_paths(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, str | None]]:
        """Each item's (id, image file or None) from position ``first`` (a shard's first) to ``stop``, as
        :meth:`decode` names and reads it (a resume checks the kept files' stamps): a list's or tuple's without
        decoding; a torch Dataset's items read again (:meth:`_read_again`: once a resume, with their hashes)."""
        if not isinstance(self.container, (list, tuple)):
            return [(item_id, path) for item_id, path, _ in self._read_again(stop, progress, first)]
        return [(item_id, _image_path(item)) for item_id, item in self._kept(stop, first=first)]

    def held_hashes(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, int | None]]:
        """Each in-memory item's (id, :func:`_held_hash` as :meth:`decode` stamps it) from ``first`` to ``stop``,
        leaving out those read from a file (:meth:`file_paths`): a list's or tuple's items as it holds them, a torch
        Dataset's read again (:meth:`_read_again`). A resume compares them with the hashes the run recorded (review
        r46: a list of other images of the same length, or the same reordered, resumed into one run of two data sets
        without a word; r47: a torch Dataset's alike, which resumed with a warning that they were not checked)."""
        if not isinstance(self.container, (list, tuple)):
            return [(item_id, held) for item_id, path, held in self._read_again(stop, progress, first) if path is None]
        return [(item_id, held) for item_id, path, held in (_kept_stamp(*kept) for kept in self._kept(stop, progress,
                                                                                                    first))
                if path is None]

    def _kept(self, stop: int, progress: bool = False, first: int = 0) -> Iterator[tuple[str, Any]]:
        """Each item from position ``first`` to ``stop`` as (its id as :meth:`decode` names it, the item): a list's or
        tuple's as it holds them; a torch Dataset's read again through its ``__getitem__``, one call an item (with
        ``progress``, a bar where that takes a while: :func:`check_bar`)."""
        if isinstance(self.container, (list, tuple)):
            items: Iterable[Any] = self.container[first:stop]
            total = len(items)  # type: ignore[arg-type]
        else:
            total = max(min(stop, self.length or 0) - first, 0)
            items = (self._read_item(i) for i in range(first, first + total))
        shown = check_bar(map(_spelled, items), total, progress)
        try:
            for i, item in enumerate(shown, start=first):
                yield _item_id(item, i), item
        finally:
            if hasattr(shown, "close"):  # a bar left before its end (_read_again's budget)
                shown.close()

    def _read_item(self, row: int) -> Any:
        try:
            return self.container[row]
        except Exception as exc:
            if not isinstance(exc, QKHooksError):
                exc.add_note(f"(while qkhooks read item {row} of the data again, to check the images a resume keeps)")
            raise

    def _read_again(self, stop: int, progress: bool, first: int = 0) -> list[tuple[str, str | None, int | None]]:
        """A torch Dataset's items from ``first`` (a shard's first: review r47, a shard read every item before its own
        too, within the budget) to ``stop`` read again through its ``__getitem__`` (the items a resume
        keeps: it cannot tell what they hold otherwise), each as (id, its image file or None, the hash of its
        in-memory image as :meth:`decode` stamps it, or None): once for one ``stop`` (:meth:`file_paths` and
        :meth:`held_hashes` of one resume share it). One ``__getitem__`` an item: a Dataset of in-memory images
        (CIFAR's arrays) is read again quickly (20,000 224x224 arrays: 4.3 s); one that loads its photos from files
        loads each kept one once more (a 12-megapixel JPEG: a quarter of a second, and as long again to hash it), so
        the reading stops once it has taken :data:`READ_AGAIN_BUDGET` seconds, and only the items read by then are
        given (:meth:`read_again_cut` says where and how fast; the resume checks those and says the rest are not)."""
        if self._again is None or self._again[0] != (first, stop):
            found: list[tuple[str, str | None, int | None]] = []
            self._positional = []
            began = time.monotonic()
            rows = self._kept(stop, progress, first)
            for item_id, item in rows:
                found.append(_kept_stamp(item_id, item))
                if _own_id(item) is None:
                    self._positional.append(item_id)
                if time.monotonic() - began > READ_AGAIN_BUDGET and len(found) < min(stop, self.length or 0) - first:
                    rows.close()  # the bar, if any, closes with it
                    break
            self._again = ((first, stop), found, time.monotonic() - began)
        return self._again[1]

    def read_again_cut(self, stop: int) -> tuple[int, int, float] | None:
        """Where :meth:`_read_again` of ``stop`` stopped for its time budget: (items read, items it was to read: the
        shard's before ``stop``, seconds it took), or None where it read them all (or none: a list's, a tuple's)."""
        again = self._again
        if again is None or again[0][1] != stop:
            return None
        total = min(stop, self.length or 0) - again[0][0]
        return None if len(again[1]) >= total else (len(again[1]), total, again[2])


def _stamp_held(raw: RawItem, item: Any) -> None:
    """Stamp a decoded item whose image is held in memory (no file to stamp) with its content's hash, size and time
    -1 (:func:`_held_hash`), which a resume hashes again (review r46: a list's; r47: a torch Dataset's, an
    iterable's)."""
    if raw.stamp is None and _image_path(item) is None:
        held = _held_hash(item)
        if held is not None:
            raw.stamp = (-1, -1, held)


def _kept_stamp(item_id: str, item: Any) -> tuple[str, str | None, int | None]:
    """An item read again as a resume compares it: (id, its image file or None, the hash of its in-memory image as the
    readers' ``decode`` stamps it, or None). An image that does not decode now (a lazily opened PIL image of a
    truncated file) has no hash: the recording skipped it as unreadable, so the run keeps no image of it, or it
    changed since, and its recorded hash then differs (review r47: the resume failed with the bare OSError)."""
    path = _image_path(item)
    if path is not None:
        return item_id, path, None
    try:
        return item_id, None, _decoded(_held_hash, item)
    except Unreadable:
        return item_id, None, None


def check_bar(rows: Iterable[Any], total: int, progress: bool) -> Iterable[Any]:
    """``rows``, the items a resume hashes (or reads again) to check the images it keeps, with a progress bar like the
    recording's (tqdm, on stderr) where ``progress`` and the check takes over :data:`CHECK_BAR_DELAY`; a quick one
    says nothing. Review r47: a list of 100,000 224x224 arrays is hashed in about 25 s (20,000 in 5 s measured),
    which a resume spent without a word."""
    if not progress:
        return rows
    from tqdm.auto import tqdm

    return tqdm(rows, total=total, unit="img", desc="check kept images", delay=CHECK_BAR_DELAY)


class FolderReader(MapReader):
    """A torchvision ``DatasetFolder`` (``ImageFolder``): read as any map-style Dataset (its own loader and
    transform make the pixels), but each item is named by its file's path relative to the dataset's root, as a
    folder spec names it (not by its position: top-image lists read "0, 1, ..." and a resume could not check the
    files; found by review), and stamped with its file's (size, modification time, hash) so a resume and a redraw
    find a file replaced since. Made by :func:`folder_reader`."""

    holds_images = False  # its loader read a file: stamped with that file's stamp, not with the pixels' hash

    def __init__(self, container: Any, paths: list[str], root: str):
        super().__init__(container)
        self.paths, self.root = paths, root

    def _id(self, row: int) -> str:
        return os.path.relpath(self.paths[row], self.root).replace(os.sep, "/")

    def decode(self, row: int, position: int) -> tuple[str | None, RawItem]:
        _, raw = super().decode(row, position)
        if raw.stamp is None:  # the dataset's loader read the file (not qkhooks): stamp it from one more read
            raw.stamp = read_stamped(self.paths[row])[1]
        return self._id(row), raw

    def row_id(self, row: int, position: int) -> str:
        return self._id(row)

    def mask_layouts(self, stop: int) -> Iterator[tuple[int, str, tuple[bool, bool]]] | None:
        """Each item's id from its path, without decoding (a folder's items are (image, label) pairs: no masks), so
        that two items of one file are refused before anything is recorded, and a resume checks the items before its
        point (before: a resume over other files, or a subset of other indices, went on without a word)."""
        return ((row, self._id(row), (False, False)) for row in range(min(stop, self.length or 0)))

    def file_paths(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, str | None]]:
        return [(self._id(row), self.paths[row]) for row in range(first, min(stop, self.length or 0))]

    def held_hashes(self, stop: int, progress: bool = False, first: int = 0) -> None:
        return None  # every image is a file's (file_paths)

    def ids_by_position(self, stop: int, progress: bool = False, first: int = 0) -> list[str]:
        return []  # every item is named by its file


def folder_reader(container: Any) -> FolderReader | None:
    """A :class:`FolderReader` for a torchvision ``DatasetFolder`` (found by its class, and its ``samples`` of
    (path, class) and ``root``), or for a ``torch.utils.data.Subset`` of one (nested ones too: the way qkhooks' own
    messages tell a user to record part of a dataset), else None. A subset's items are named by their files as the
    whole folder's are (before: by their position in the subset, and a resume over other indices mixed two sets of
    photos in one run without a word)."""
    folder, rows = container, None
    while isinstance(folder, torch.utils.data.Subset):
        indices = folder.indices
        indices = indices.tolist() if hasattr(indices, "tolist") else list(indices)  # a tensor's: 28x faster
        rows = indices if rows is None else [indices[r] for r in rows]
        folder = folder.dataset
    if not any(c.__name__ == "DatasetFolder" and c.__module__.startswith("torchvision.")
               for c in type(folder).__mro__):
        return None
    samples, root = getattr(folder, "samples", None), getattr(folder, "root", None)
    if not isinstance(samples, (list, tuple)) or not isinstance(root, (str, os.PathLike)) \
            or len(samples) != len(folder):
        return None
    try:
        paths = [os.fspath(path) for path, _ in samples]
        if rows is not None:
            paths = [paths[int(r)] for r in rows]  # a negative index counts from the end, as the subset reads it
    except (TypeError, ValueError, IndexError):  # an index the subset cannot read either: its own error says so
        return None
    return FolderReader(container, paths, os.fspath(root))


class ReadInPassing:
    """A reader whose rows before a resume point are read anyway as the stream skips them (an iterable has no index):
    a resume's check reads them there, once, and the stream goes on from where the check stopped. Review r47: an
    iterable's kept images were not checked (a warning said so), though a resume read every one of them."""

    reads_again = True  # the images may differ from one pass to the next (a shuffling iterable, a random transform)
    _again: tuple[tuple[int, int], list[tuple[str, str | None, int | None]], Iterator[Any] | None] | None = None
    _positional: Sequence[str] = ()  # the ids among the items read in passing named by their position alone

    def rows(self, start: int) -> Iterator[Any]:  # pragma: no cover - each reader's own
        raise NotImplementedError

    def file_paths(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, str | None]]:
        """Each item's (id, image file or None) from position ``first`` to ``stop``, read in passing
        (:meth:`_read_again`: from the source's first item, which has no index)."""
        return [(item_id, path) for item_id, path, _ in self._read_again(stop, progress, first)]

    def held_hashes(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, int | None]]:
        """Each in-memory item's (id, :func:`_held_hash`) from ``first`` to ``stop``, read in passing."""
        return [(item_id, held) for item_id, path, held in self._read_again(stop, progress, first) if path is None]

    def ids_by_position(self, stop: int, progress: bool = False, first: int = 0) -> list[str]:
        """The ids of the items from ``first`` to ``stop`` named by their position alone, read in passing (round 51:
        not told, and a run from before the stamps of such items resumed checking positions, which cannot differ)."""
        self._read_again(stop, progress, first)
        return list(self._positional)

    def _passing(self, item: Any, position: int) -> tuple[tuple[str, str | None, int | None], bool]:
        """An item read in passing as :func:`_kept_stamp` gives it, and whether it is named by its position alone."""
        own = _own_id(item)
        return _kept_stamp(str(position) if own is None else own, item), own is None

    def _read_again(self, stop: int, progress: bool, first: int = 0) -> list[tuple[str, str | None, int | None]]:
        """The items from position ``first`` (a shard's first) to ``stop`` as :func:`_kept_stamp` gives them, read
        from the start of the rows (with ``progress``, a bar where that takes a while): those before ``first`` (the
        earlier shards') are read, as they must be, but not hashed (round 48: they were, and never compared). The
        rows after ``stop`` are kept for :meth:`rows` of ``stop``, which goes on from there (the source is read once,
        as the skip read it: no second pass)."""
        if self._again is None or self._again[0] != (first, stop):
            rows = self.rows(0)
            found: list[tuple[str, str | None, int | None]] = []
            positional: list[str] = []
            read = 0  # the position of the item being read
            try:
                for item in check_bar(itertools.islice(rows, stop), stop, progress):
                    if read >= first:
                        stamp, by_position = self._passing(item, read)
                        found.append(stamp)
                        if by_position:
                            positional.append(stamp[0])
                    read += 1
            except Exception as exc:  # the source's own failure (a generator failing midway): said where
                if not isinstance(exc, QKHooksError):
                    exc.add_note(f"(while qkhooks read item {read} of the data again, to check the images a resume "
                                 "keeps)")
                raise
            self._again, self._positional = ((first, stop), found, rows), positional
        return self._again[1]

    def _rows_after_check(self, start: int) -> Iterator[Any] | None:
        """The rows from ``start`` where a resume's check has read those before it (once), else None."""
        again = self._again
        if again is None or again[2] is None or again[0][1] != start:
            return None
        self._again = (again[0], again[1], None)
        return again[2]


class IterReader(ReadInPassing):
    """Any iterable (an ``IterableDataset``, a generator): read in order here, items shipped to the workers."""

    length: int | None = None

    def __init__(self, iterable: Iterable[Any]):
        self.iterable = iterable
        self.one_shot = iter(iterable) is iterable
        self._used = False

    def rows(self, start: int) -> Iterator[Any]:
        checked = self._rows_after_check(start)
        if checked is not None:
            return checked
        if self.one_shot:
            if self._used:
                raise QKHooksError("a one-shot iterator (a generator) can be read only once; pass a list, a "
                                   "Dataset or an IterableDataset to read it again.")
            self._used = True
        return map(_spelled, itertools.islice(iter(self.iterable), start, None))

    def decode(self, row: Any, position: int) -> tuple[str | None, RawItem]:
        own, raw = _item_to_raw(row, f"item {position}")
        _stamp_held(raw, row)
        return own, raw

    def row_id(self, row: Any, position: int) -> str:
        return _item_id(row, position)

    def __getstate__(self) -> dict[str, Any]:  # workers only decode; a generator cannot be pickled (spawn, macOS)
        return {**self.__dict__, "iterable": None, "_again": None}


class _HFReader(ReadInPassing):
    """A Hugging Face ``Dataset`` or ``IterableDataset``, image (and image-mask) columns left undecoded here. A streamed
    one (an ``IterableDataset``: no index) is read in passing where a resume skips its rows (:class:`ReadInPassing`:
    its ``skip()`` reads them anyway; round 51: nothing of them was checked)."""

    def __init__(self, ds: Any, image_column: str, id_column: str | None, masks: Mapping[str, str],
                 root: str | None = None):
        self.ds, self.image_column, self.id_column, self.masks = ds, image_column, id_column, dict(masks)
        self.root = root  # an image folder read as a dataset: ids are the files' paths relative to it
        self.length = len(ds) if hasattr(ds, "__len__") and not _is_hf_iterable(ds) else None
        # a column of file paths (strings) and no id column: each row is named by its path as given, as in a list of
        # paths (review r38: named by its position, a resume over rows that changed could not tell)
        # (or of Image(decode=False) dicts read from files: named by their paths too, relative to an image folder's
        # root: _cell_id)
        features = getattr(ds, "features", None) or {}
        feature = features.get(image_column)
        self.path_column = (image_column if id_column is None
                            and (getattr(feature, "dtype", None) in ("string", "large_string")
                                 or type(feature).__name__ == "Image")
                            else None)

    def __getstate__(self) -> dict[str, Any]:  # workers only decode; the rows being read stay here
        return {**self.__dict__, "_again": None}

    # read by qkhooks (the same on each read: ReadInPassing's own reads_again is for the user's code, whose images may
    # differ), so resume_ids_only=True stays refused for a Hugging Face dataset, streamed or not, as before round 51
    reads_again = False

    def rows(self, start: int) -> Iterator[Any]:
        if self.length is not None:
            return (self.ds[i] for i in range(start, self.length))
        checked = self._rows_after_check(start)
        if checked is not None:
            return checked
        return iter(self.ds.skip(start) if start else self.ds)

    def _passing(self, item: Any, position: int) -> tuple[tuple[str, str | None, int | None], bool]:
        """A streamed row read in passing, named as :meth:`row_id` names it and stamped as :meth:`decode` stamps it
        (its image file, else the hash of the bytes its cell holds), and whether it is named by its position."""
        cell = item[self.image_column]
        path = _image_path(cell)
        held = None if path is not None else _held_bytes_hash(cell)
        return (self.row_id(item, position), path, held), self.id_column is None and self._cell_id(cell) is None

    def decode(self, row: Mapping[str, Any], position: int) -> tuple[str | None, RawItem]:
        item = {"image": row[self.image_column], "id": self.row_id(row, position)}
        item.update({key: row[column] for key, column in self.masks.items()})
        own, raw = _item_to_raw(item, f"row {position}")
        raw.unread = self.unread_columns(row)
        held = _held_bytes_hash(row[self.image_column])
        if raw.stamp is None and held is not None:  # review r46: an image held as bytes in the dataset has no file
            raw.stamp = (-1, -1, held)  # to stamp, but its bytes' hash: a resume reads them again
        return own, raw

    def unread_columns(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """The row's columns that are not read (a label, or a mask under a name qkhooks does not use), as a dict's
        unread keys are (:func:`_unread_keys`): named in a warning once per stream (review r38: they were not)."""
        read = {self.image_column, *self.masks.values(), *([self.id_column] if self.id_column is not None else [])}
        return tuple(sorted(str(c) for c, v in row.items() if c not in read and v is not None
                            and not (isinstance(c, str) and c.startswith("__") and c.endswith("__"))))

    def mask_layouts(self, stop: int) -> Iterator[tuple[int, str, tuple[bool, bool]]] | None:
        """Each row's (position, id, mask layout) from the mask columns' nulls and the id (or path) column, in Arrow
        (no image is decoded); None for a streamed dataset, or one without mask columns whose rows are named by their
        positions (nothing to check)."""
        named = self.id_column if self.id_column is not None else self.path_column
        if self.length is None or (not self.masks and named is None):
            return None
        wanted = list(dict.fromkeys([*self.masks.values(), *([named] if named is not None else [])]))
        view = self.ds.select_columns(wanted).with_format("arrow")
        return self._layouts(view, stop, named)

    def _layouts(self, view: Any, stop: int, named: str | None) -> Iterator[tuple[int, str, tuple[bool, bool]]]:
        for lo in range(0, stop, 4096):
            table = view[lo:min(stop, lo + 4096)]
            present = {key: ~np.asarray(table.column(column).is_null().to_numpy(zero_copy_only=False), dtype=bool)
                       for key, column in self.masks.items()}
            ids = None if named is None else _light_cells(table.column(named)) if named == self.path_column else (
                table.column(named).to_pylist())
            for n in range(table.num_rows):
                layout = _mask_layout(key for key, have in present.items() if have[n])
                # as row_id names the row (round 51: an image folder's rows were named by position here, by path there)
                name = None if ids is None else self._cell_id(ids[n]) if named == self.path_column else str(ids[n])
                yield lo + n, str(lo + n) if name is None else name, layout

    def ids_by_position(self, stop: int, progress: bool = False, first: int = 0) -> list[str]:
        """The ids of the rows from ``first`` to ``stop`` named by their position alone (no id column, and an image
        cell that names no file: its bytes), read from the Arrow column without the images' bytes; a streamed
        dataset's read in passing. A position says nothing of the row at it: a resume of a run that holds no stamps of
        its images cannot check those."""
        if self.length is None:
            return super().ids_by_position(stop, progress, first)
        if self.id_column is not None:
            return []
        return [item_id for item_id, cell in self._named_cells(stop, 4096, light=True, first=first)
                if self._cell_id(cell) is None]

    def file_paths(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, str | None]]:
        """Each row's (id, image file or None) before position ``stop``, as :meth:`row_id` names the row and
        :meth:`decode` reads its image (a path string, or an ``Image(decode=False)`` cell with a path and no bytes),
        read from the Arrow columns without the images' bytes; a streamed dataset's read in passing (a resume checks
        the kept files' stamps)."""
        if self.length is None:
            return super().file_paths(stop, progress, first)
        cells = self._named_cells(stop, 4096, light=True, first=first)
        return [(item_id, _image_path(cell)) for item_id, cell in cells]

    def held_hashes(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, int | None]]:
        """Each row's (id, BLAKE2b of its image's bytes as :meth:`decode` stamps it) from ``first`` to ``stop``, for
        the rows whose image is held in the dataset rather than read from a file: an ``Image`` cell with bytes, a
        binary cell; None in place of the hash for a cell that is neither a file nor bytes (an array), which cannot
        be checked. Read from the Arrow column in slices (the bytes are read, no image is decoded); a streamed
        dataset's in passing. A resume compares them with the hashes the run recorded (review r46: only the length was
        compared, and replaced images resumed into a run of two data sets without a word). With ``progress``, a bar
        where that takes a while (:func:`check_bar`)."""
        if self.length is None:
            return super().held_hashes(stop, progress, first)
        found: list[tuple[str, int | None]] = []
        cells = self._named_cells(stop, 256, light=False, first=first)
        for item_id, cell in check_bar(cells, max(min(stop, self.length) - first, 0), progress):
            if _image_path(cell) is None:
                found.append((item_id, _held_bytes_hash(cell)))
        return found

    def _named_cells(self, stop: int, step: int, light: bool, first: int = 0) -> Iterator[tuple[str, Any]]:
        """Each row's (id as :meth:`row_id` names it, image cell) from ``first`` to ``stop``, read from the Arrow
        columns ``step`` rows at a time; with ``light``, the cells without their images' bytes
        (:func:`_light_cells`)."""
        wanted = [self.image_column] + ([self.id_column] if self.id_column is not None else [])
        view = self.ds.select_columns(wanted).with_format("arrow")
        stop = min(stop, self.length or 0)
        for lo in range(first, stop, step):
            table = view[lo:min(stop, lo + step)]
            column = table.column(self.image_column)
            cells = _light_cells(column) if light else column.to_pylist()
            ids = table.column(self.id_column).to_pylist() if self.id_column is not None else None
            for n, cell in enumerate(cells):
                yield (str(ids[n]) if ids is not None else self._cell_id(cell) or str(lo + n)), cell

    def row_id(self, row: Mapping[str, Any], position: int) -> str:
        if self.id_column is not None:
            return str(row[self.id_column])
        named = self._cell_id(row[self.image_column])
        return str(position) if named is None else named

    def _cell_id(self, cell: Any) -> str | None:
        """A row's id from its image cell, where the dataset has no id column: the file's path relative to an image
        folder read as a dataset, or as given (a column of file paths: as a list of paths); None for a cell that
        names no file (its bytes): the row is named by its position."""
        if self.root is not None and isinstance(cell, Mapping) and cell.get("path"):
            return Path(os.path.relpath(cell["path"], self.root)).as_posix()
        return _cell_path_id(cell)


def _held_bytes_hash(cell: Any) -> int | None:
    """The BLAKE2b (as :func:`bytes_hash` stores it) of the encoded image a Hugging Face cell holds in the dataset
    (an ``Image`` cell's bytes, a binary cell), else None (a file path, an array: a Hugging Face dataset's array
    cells are not hashed, where :func:`_held_hash` hashes a list's arrays). What the reader stamps and a resume
    compares: one helper for both (round 49: the bytes were taken and hashed in each)."""
    if isinstance(cell, Mapping):
        cell = cell.get("bytes")
    return bytes_hash(bytes(cell)) if isinstance(cell, (bytes, bytearray, memoryview)) else None


def _held_hash(item: Any) -> int | None:
    """The BLAKE2b (as :func:`bytes_hash` stores it) of an item's image held in memory, else None (a file path, a
    type not read): encoded bytes as given (a Hugging Face cell's too); a numpy array's dtype, shape and bytes in C
    order; a PIL image's mode, size, palette, transparency, EXIF orientation and pixel bytes (all that its recorded
    pixels depend on). What a resume of a list or tuple compares, the items being in memory."""
    if _is_pair(item):
        item = item[0]
    if isinstance(item, Mapping) and ("image" in item or "__key__" in item):
        item = _image_value(item)
    held = _held_bytes_hash(item)
    if held is not None:
        return held
    if isinstance(item, np.ndarray) and not item.dtype.hasobject:
        head, data = f"array {item.dtype.str} {item.shape}", np.ascontiguousarray(item).reshape(-1).view(np.uint8)
    elif isinstance(item, Image.Image):
        orientation = exif_orientation(item.getexif())
        head = (f"PIL {item.mode} {item.size} {item.getpalette()} {item.info.get('transparency')!r} "
                f"{orientation}")
        data = item.tobytes()
    else:
        return None
    digest = hashlib.blake2b(head.encode(), digest_size=8)
    digest.update(data)
    return digest_value(digest)


def _light_cells(column: Any) -> list[Any]:
    """A path column's cells as :func:`_cell_path_id` reads them, without the images' bytes: an Image column's
    struct cells as ``{"path": path, "bytes": None or b""}`` (whether the cell holds bytes, read off the Arrow
    validity bitmap: the bytes are never copied out), a string column's as they are."""
    import pyarrow as pa  # present wherever a Hugging Face dataset is

    if not pa.types.is_struct(column.type):
        return column.to_pylist()
    names = [column.type.field(i).name for i in range(column.type.num_fields)]
    cells: list[Any] = []
    for chunk in column.chunks:
        fields = dict(zip(names, chunk.flatten()))  # each field with the struct's offset and nulls applied
        paths = fields["path"].to_pylist() if "path" in fields else [None] * len(chunk)
        held = (~np.asarray(fields["bytes"].is_null().to_numpy(zero_copy_only=False), dtype=bool) if "bytes" in fields
                else np.zeros(len(chunk), dtype=bool))
        cells += [{"path": path, "bytes": b"" if has else None} for path, has in zip(paths, held)]
    return cells


class _TarReader:
    """webdataset shards read with the standard library: consecutive members sharing a key (the name before the first
    dot, as webdataset groups them) form one sample. Fields are matched by their lower-cased suffix; the image's id
    keeps the member's own spelling. A sample holding two images (``p1.jpg`` and ``p1.png``), or two members of one
    field (``p1.jpg`` and ``p1.JPG``), is skipped and listed with the reason, not cut to one of them."""

    def __init__(self, shards: Sequence[str]):
        self.shards = list(shards)
        self.length: int | None = None
        self._after_stamps: tuple[int, Iterator[dict[str, Any]]] | None = None  # file_stamps' point, the samples on

    def __getstate__(self) -> dict[str, Any]:  # workers only decode; the samples being read stay here
        return {**self.__dict__, "_after_stamps": None}

    def rows(self, start: int) -> Iterator[Any]:
        """The samples from position ``start``: where :meth:`file_stamps` read the shards up to there (a resume),
        on from where it stopped (round 48: the shards' headers were read twice, once to stamp, once to skip)."""
        after, self._after_stamps = self._after_stamps, None
        if after is not None and after[0] == start:
            return after[1]
        return itertools.islice(self._samples(), start, None)

    def _samples(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            sample: dict[str, Any] = {}
            last = ""  # the key of the last sample given
            try:
                with tarfile.open(shard, "r|*") as tar:  # streamed: no index, members in file order
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, _, base = member.name.rpartition("/")
                        stem, dot, ext = base.partition(".")
                        if not dot or base.startswith("."):
                            continue
                        key = f"{folder}/{stem}" if folder else stem
                        if sample and sample["__key__"] != key:
                            yield sample
                            sample, last = {}, sample["__key__"]
                        fh = tar.extractfile(member)
                        field = ext.lower()
                        members = sample.setdefault("__members__", {})
                        if field in members:  # two members for one field: which is meant is not guessed
                            sample.setdefault("__twice__", [members[field]]).append(base)
                        members.setdefault(field, base)
                        # the member's size and time from its header: an image's stamp (decode adds its bytes' hash)
                        sample.setdefault("__stamps__", {}).setdefault(field, (member.size, _tar_mtime_ns(member)))
                        sample.update({"__key__": key, "__shard__": shard, field: fh.read() if fh else b""})
            except (tarfile.TarError, OSError, EOFError) as exc:
                # the rest of a damaged shard is unreadable: one row says so, and the next shard goes on
                if _image_ext(sample):
                    yield sample  # its image was read whole
                    last = sample["__key__"]
                after = f" after {last!r}" if last else ""
                yield {"__key__": shard, "__shard__": shard,
                       "__error__": f"the rest of the shard{after} is unreadable ({type(exc).__name__}: {exc})"}
                continue
            if sample:
                yield sample

    def decode(self, row: Mapping[str, Any], position: int) -> tuple[str | None, RawItem]:
        where = f"sample {row['__key__']!r} of {row['__shard__']}"
        if "__error__" in row:
            raise Unreadable(row["__error__"])
        images = [row["__members__"][e] for e in _EXTENSIONS if e in row]
        if len(images) > 1 or "__twice__" in row:
            many = len(images) > 1
            raise Unreadable(_two_images(where, ", ".join(images if many else row["__twice__"]), many))
        ext = _image_ext(row)
        if ext is None:
            raise QKHooksError(f"{where} has no image member (looked for .{', .'.join(_EXTENSIONS)}); "
                               f"it holds {sorted(k for k in row if not k.startswith('__'))}.")
        meta = _sample_meta(row, where)
        item: dict[str, Any] = {"image": row[ext], "id": meta.get("id", self.row_id(row, position))}
        item.update({k: row[f"{k}.png"] for k in MASK_KEYS if f"{k}.png" in row})
        own, raw = _item_to_raw(item, where)
        size, mtime = row["__stamps__"][ext]
        raw.stamp = (size, mtime, bytes_hash(row[ext]))  # the member as read and decoded: a resume reads it again
        read = {ext, "json", *(f"{k}.png" for k in MASK_KEYS)}
        raw.unread = tuple(sorted("." + base.partition(".")[2] for f, base in row["__members__"].items()
                                  if f not in read))  # as member suffixes: .cls, .mask.png
        return own, raw

    def file_stamps(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, tuple[int, int, int]]]:
        """Each sample's (id, stamp of its image member) from position ``first`` to ``stop``, in order, as
        :meth:`decode` names and stamps it (the header's size and time, the hash of the member's bytes), without
        decoding an image: the shards are read again up to there (a tar has no index; a resume reads them so to find
        its position anyway, and its :meth:`rows` of ``stop`` go on from where this read stopped: the shards are read
        once). Samples that :meth:`decode` skips (a damaged shard, two images) are left out. With ``progress``, a bar
        where that takes a while (:func:`check_bar`; round 48: none was shown)."""
        found: list[tuple[str, tuple[int, int, int]]] = []
        samples = self._samples()
        for position, row in enumerate(check_bar(itertools.islice(samples, stop), stop, progress)):
            if position < first:  # an earlier shard's (of a run cut into shards): read, as it must be, not stamped
                continue
            ext = _image_ext(row)
            images = [e for e in _EXTENSIONS if e in row]
            if "__error__" in row or ext is None or len(images) > 1 or "__twice__" in row:
                continue
            try:
                meta = _sample_meta(row)
            except DataRefusal:
                continue
            size, mtime = row["__stamps__"][ext]
            found.append((str(meta.get("id", self.row_id(row, position))), (size, mtime, bytes_hash(row[ext]))))
        self._after_stamps = (stop, samples)  # the rows of a resume at ``stop`` go on from here (:meth:`rows`)
        return found

    def row_id(self, row: Mapping[str, Any], position: int) -> str:
        """The image member's name in its own letter case (a folder of the same files has the same ids); a sample
        of several images, its key; a damaged shard's path."""
        if "__error__" in row:
            return str(row["__key__"])
        images = [row["__members__"][e] for e in _EXTENSIONS if e in row]
        if len(images) != 1 or "__twice__" in row:
            return str(row["__key__"])
        folder = row["__key__"].rpartition("/")[0]
        return f"{folder}/{images[0]}" if folder else images[0]


def _tar_mtime_ns(member: tarfile.TarInfo) -> int:
    """A tar member's modification time (its header's, whole seconds or a pax header's fraction) in nanoseconds."""
    mtime = member.mtime
    return int(mtime) * 10**9 if isinstance(mtime, int) else int(round(float(mtime) * 10**9))


def _image_ext(sample: Mapping[str, Any]) -> str | None:
    return next((e for e in _EXTENSIONS if e in sample), None)


def _two_images(where: str, held: str, many: bool) -> str:
    """Why a webdataset sample of two images (or one field twice) is skipped: which to record is not guessed."""
    return (f"{where} holds {held}: webdataset makes one sample of the members whose names agree before the first "
            f"dot, so {'this sample has more than one image' if many else 'these are one field of it, twice'}, "
            "and which to record is not guessed; give each image its own name before the first dot (e.g. "
            "p1_a.jpg, p1_b.png) and write the shard again")


def _webdataset_item(sample: Mapping[str, Any], own: str | None, where: str) -> Mapping[str, Any]:
    """A webdataset sample (fields keyed by extension: ``jpg``, ``json``, ``objects.png``) as the item ``wds:``
    makes of the same members (review r38): its image, its id (:func:`_own_id`), the masks ``objects.png``,
    ``target.png`` and ``distractor.png`` under their names; the other fields as they are (named as unread). A
    sample of two images is skipped with the reason, as ``wds:`` skips it."""
    images = [e for e in _EXTENSIONS if e in sample]
    if len(images) > 1:
        raise Unreadable(_two_images(f"{where} (key {str(sample['__key__'])!r})",
                                      ", ".join(f"{sample['__key__']}.{e}" for e in images), True))
    if not images:
        return sample
    taken = {images[0], "json", *(f"{k}.png" for k in MASK_KEYS)}
    item = {k: v for k, v in sample.items() if k not in taken}
    item.update({"image": sample[images[0]], "id": own})
    item.update({k: sample[f"{k}.png"] for k in MASK_KEYS if sample.get(f"{k}.png") is not None})
    return item


def _spelled(item: Any) -> Any:
    """A ``webdataset.WebDataset`` sample with its image member's name in its own letter case (``__member__``),
    read from its shard's member names: webdataset lower-cases the extensions it keys a sample by (``p2.JPG`` under
    ``"jpg"``), while ``wds:`` and a folder of the same files keep the name (review r38: the two routes gave the same
    tar other ids). Other items, and samples whose shard is not a local file (a URL), are returned as they are (the
    id then has webdataset's lower-case extension)."""
    if not (isinstance(item, Mapping) and "__key__" in item and "__url__" in item and "image" not in item
            and "__member__" not in item):
        return item
    ext = _image_ext(item)
    shard = item.get("__local_path__") or item["__url__"]
    if ext is None or not isinstance(shard, (str, os.PathLike)):
        return item
    shard = os.fspath(shard)
    shard = shard[len("file:"):] if isinstance(shard, str) and shard.startswith("file:") else shard
    try:
        stat = os.stat(shard)
    except (OSError, ValueError, TypeError):
        return item
    name = _tar_members(shard, stat.st_mtime_ns, stat.st_size).get((str(item["__key__"]), ext))
    return item if name is None else {**item, "__member__": name}


@functools.lru_cache(maxsize=4)
def _tar_members(shard: str, mtime_ns: int, size: int) -> dict[tuple[str, str], str]:
    """A tar shard's members by (webdataset key, lower-cased extension): their names as written. Headers only (a
    plain tar's data is sought past); the members before a damaged part, if any. ``mtime_ns`` and ``size`` key the
    cache (a shard written again is read again)."""
    names: dict[tuple[str, str], str] = {}
    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if member.isfile() and dot and stem:
                    names.setdefault((f"{folder}/{stem}" if folder else stem, ext.lower()), member.name)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return names


class Unreadable(Exception):
    """Bytes that do not decode, or a row the source could not read (a damaged shard): the item is skipped and
    listed like a corrupt file in a folder. Errors raised by the user's own code are not this: they stop the run."""


# ---------------------------------------------------------------------------------------------- opening


def _is_hf_iterable(ds: Any) -> bool:
    return type(ds).__name__ == "IterableDataset" and type(ds).__module__.startswith("datasets")


def is_hf(ds: Any) -> bool:
    return type(ds).__module__.startswith("datasets.") and type(ds).__name__ in ("Dataset", "IterableDataset")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise QKHooksError(f"reading Hugging Face datasets needs the datasets package: {DATASETS_INSTALL}.") from None
    return datasets


def hf_reader(ds: Any, image_column: str | None, masks: Mapping[str, str] | None, root: str | None = None) -> _HFReader:
    """Find the image column (by feature type), an id-like column and the mask columns; leave images undecoded."""
    datasets = _import_datasets()
    features = ds.features or {}
    columns = list(features) or list(getattr(ds, "column_names", None) or [])
    if image_column is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image) and c not in MASK_KEYS
                  and c not in (masks or {}).values()]
        if len(images) > 1:
            raise QKHooksError(f"the dataset has several image columns {images}; pass image_column= (--image-column).")
        image_column = images[0] if images else next((c for c in ("image", "img") if c in columns), None)
        if image_column is None:
            raise QKHooksError(f"no image column in the dataset (columns: {columns}); pass image_column= "
                               "(--image-column) naming the column that holds the images.")
    elif columns and image_column not in columns:
        raise QKHooksError(f"image column {image_column!r} is not in the dataset; its columns are {columns}.")
    mask_map = dict(masks) if masks is not None else {k: k for k in MASK_KEYS if k in columns}
    for key, column in mask_map.items():
        if key not in MASK_KEYS:
            raise QKHooksError(f"masks= maps qkhooks' mask names {MASK_KEYS} to columns; {key!r} is not one of them.")
        if columns and column not in columns:
            raise QKHooksError(f"mask column {column!r} (for {key!r}) is not in the dataset; its columns are {columns}.")
    id_column = next((c for c in ID_COLUMNS if c in columns and c != image_column
                      and not isinstance(features.get(c), datasets.Image)), None)
    for column in [image_column, *mask_map.values()]:
        if isinstance(features.get(column), datasets.Image):  # decode here, through the folders' conversion
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return _HFReader(ds, image_column, id_column, mask_map, root)


def split_spec(rest: str) -> tuple[str, str | None]:
    """``DIR_OR_NAME[:SPLIT]``; a trailing ``:word`` is a split unless the whole thing is an existing path."""
    head, sep, split = rest.rpartition(":")
    if sep and re.fullmatch(r"[A-Za-z0-9_.\-\[\]%+]+", split) and not Path(rest).expanduser().exists():
        return head, split
    return rest, None


def open_hfds(rest: str) -> tuple[Any, str | None]:
    """``load_from_disk`` directories, local image folders and parquet files, else a hub name (streamed); and the
    image folder, whose relative paths are the ids."""
    datasets = _import_datasets()
    name, split = split_spec(rest)
    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split is None and len(ds) > 1:
                    raise QKHooksError(f"{name!r} holds the splits {sorted(ds)}; write hfds:{name}:SPLIT.")
                split = split or next(iter(ds))
                if split not in ds:
                    raise QKHooksError(f"{name!r} has no split {split!r}; its splits are {sorted(ds)}.")
                ds = ds[split]
            elif split is not None:
                raise QKHooksError(f"{name!r} is a single saved split; drop ':{split}'.")
            return ds, None
        if path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split or "train")
            return _without_nas_thumbnails(ds, str(path)), str(path)
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split=split or "train"), None
        if path.exists():
            tar = f" A webdataset shard is read as wds:{name}." if path.suffix.lower() == ".tar" else ""
            raise QKHooksError(
                f"hfds:{rest}: {str(path)!r} is not what hfds: reads: a save_to_disk folder, an image folder or a "
                ".parquet file. A list of image paths in a file (.txt, .csv, ...) is not read: read it yourself and "
                "pass the paths to qkhooks.record_dataset(model, paths, out) as a Python list (each image's id is "
                f"then its path as given), or pass the folder that holds the images.{tar}")
        if name.startswith((".", "/", "~")):
            raise QKHooksError(f"hfds:{rest}: {str(path)!r} does not exist.")
        return datasets.load_dataset(name, split=split or "train", streaming=True), None
    except QKHooksError:
        raise
    except Exception as exc:
        raise QKHooksError(f"cannot open the Hugging Face dataset hfds:{rest} ({type(exc).__name__}: {exc}); "
                           "a hub name needs network access and, for gated sets, a login.") from None


def _without_nas_thumbnails(ds: Any, root: str) -> Any:
    """An image folder read by datasets' imagefolder without the rows of the images in a NAS's thumbnail folders,
    warned of as a folder warns (:func:`~qkhooks.data.items.nas_thumbnails_left_out`; round 51: recorded as photos,
    where a folder leaves them out). The paths are read from the Arrow column; no image is decoded."""
    if "image" not in ds.column_names:
        return ds
    column = ds.select_columns(["image"]).with_format("arrow")[:].column("image")
    folders = [nas_thumbnail_folder(Path(os.path.relpath(cell["path"], root)).as_posix()) if cell.get("path") else None
               for cell in _light_cells(column)]
    left = [folder for folder in folders if folder is not None]
    if not left:
        return ds
    nas_thumbnails_left_out(Path(root), sorted(set(left)), len(left), stacklevel=6)  # record_dataset's caller
    return ds.select([k for k, folder in enumerate(folders) if folder is None])


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard patterns: ``{000..009}`` (zero-padded ranges) and ``{a,b}``, nested in order."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        lo, hi = ranged.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [out for part in parts for out in expand_braces(head + part + tail)]


def open_wds(pattern: str) -> _TarReader:
    shards = [str(Path(p).expanduser()) for p in expand_braces(pattern)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise QKHooksError(f"wds:{pattern}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]}).")
    return _TarReader(shards)
