"""Where a run's photos came from, so that they can be found again: the data spec made absolute, and each file's size.

A run stores no pixels: ``analyze modes`` (and reports) reopen the dataset from the run's ``data`` attribute to draw
maps over the photos. A spec such as ``imgs`` typed in one folder names other files, or none, from another folder,
so :func:`absolute_spec` makes the paths in a spec absolute at record time. :func:`file_size_column` gives each
image file's size as it is recorded, for the per-image array :data:`qkhooks.store.format.FILE_SIZES` (it grows with
the run: a shard holds its own images' sizes, a resume continues it), and :func:`changed_files` checks a reopened
dataset against the sizes :func:`recorded_sizes` reads of the images drawn: every image drawn that is still there
must have the size it had when recorded (images that are gone are left out and counted). Runs written before that
array keep every file's size in one root attribute (:data:`SIZES_ATTR`, JSON ``{id: bytes}``), read when the array
is absent. A run from before both names its data as typed and has no sizes: when that is a relative path and images
are missing, the folder found is taken to be another one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from qkhooks.data.items import ImageDataset, digest_value
from qkhooks.data.datasets import BUNDLED_PREFIX, FOLDER_PREFIXES, GENERATED_PREFIXES, NAMED_SPECS, STREAMED_PREFIXES
from qkhooks.data.readers import split_spec
from qkhooks.store.format import FILE_SIZES

__all__ = ["SIZES_ATTR", "absolute_spec", "file_sizes", "file_size_column", "file_mtime_column", "file_hash_column",
           "file_hash", "stamp_columns", "recorded_sizes",
           "changed_files"]

SIZES_ATTR = "data_file_sizes"
"""Root attribute of older run files (before :data:`qkhooks.store.format.FILE_SIZES`): JSON ``{image id: file size
in bytes}`` of the whole dataset, for datasets read from files (read when the run has no such array; no longer
written)."""


def _absolute(path: str) -> str:
    """``path`` absolute (``~`` expanded), keeping the user's names (symbolic links are not resolved)."""
    return os.path.abspath(os.path.expanduser(path))


def _absolute_part(spec: str) -> str:
    if spec in NAMED_SPECS or spec.startswith(GENERATED_PREFIXES + (BUNDLED_PREFIX,)):
        return spec  # generated or installed: no path (a named spec beside a folder of its name is refused)
    for prefix in FOLDER_PREFIXES + STREAMED_PREFIXES:
        if spec.startswith(prefix):
            rest = spec[len(prefix):]
            if not rest or "://" in rest or rest.startswith(("pipe:", "/")):
                return spec
            if prefix == "hfds:":  # hfds:DIR_OR_NAME[:SPLIT], split off as the reader does: a hub name stays a name
                head, split = split_spec(rest)
                tail = "" if split is None else ":" + split
                return prefix + _absolute(head) + tail if Path(head).expanduser().exists() else spec
            if prefix == "wds:":  # a (brace) pattern: its folder must exist here
                folder = os.path.dirname(rest) or "."
                return prefix + _absolute(rest) if Path(folder).expanduser().is_dir() else spec
            return prefix + _absolute(rest) if Path(rest).expanduser().exists() else spec
    return _absolute(spec) if Path(spec).expanduser().exists() else spec


def absolute_spec(spec: Any) -> Any:
    """A dataset spec with the paths in it made absolute (a folder, ``ade20k:DIR``, ``o3dir:DIR``, ``hfds:DIR``,
    ``wds:PATTERN``, parts joined with ``+``); named specs, paths that do not exist here and anything that is not a
    spec string (your own dataset objects) as given."""
    if isinstance(spec, os.PathLike):
        return _absolute(os.fspath(spec)) if Path(spec).expanduser().exists() else spec
    if not isinstance(spec, str) or not spec:
        return spec
    if "+" in spec and not spec.startswith(STREAMED_PREFIXES) and not Path(spec).expanduser().exists():
        return "+".join(_absolute_part(part) if part else part for part in spec.split("+"))
    return _absolute_part(spec)


def _paths(dataset: Any) -> dict[str, str]:
    """Image id -> file path, for datasets read from files (folders, ade20k:, o3dir:, joins of them)."""
    return dataset.files() if isinstance(dataset, ImageDataset) else {}


def _size(path: str | None) -> int:
    """The file's size in bytes; -1 for no file or one that cannot be read now (the recording skips it and says
    why)."""
    if path is None:
        return -1
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def file_sizes(dataset: Any, ids: Sequence[str] | None = None) -> dict[str, int]:
    """``{id: size in bytes}`` of the image files behind ``dataset`` (only ``ids`` when given); {} for data that is
    not read from files (generated displays, your own containers)."""
    paths = _paths(dataset)
    wanted = paths if ids is None else {i: paths[i] for i in ids if i in paths}
    sizes = {id_: _size(path) for id_, path in wanted.items()}
    return {id_: size for id_, size in sizes.items() if size >= 0}


def _column(dataset: Any, per_file: Callable[[str | None], int]) -> Callable[[Sequence[str]], np.ndarray] | None:
    """A per-image int64 column of ``dataset``'s files for a batch of ids (``per_file`` of each id's path, -1 for
    none); None for data not read from files, whose runs have no such array. The paths are looked up once."""
    paths = _paths(dataset)
    if not paths:
        return None
    return _path_column(paths, per_file)


def _path_column(paths: Mapping[str, str], per_file: Callable[[str | None], int]) -> Callable[[Sequence[str]], np.ndarray]:
    return lambda ids: np.array([per_file(paths.get(i)) for i in ids], np.int64)


def stamp_columns(paths: Mapping[str, str]) -> tuple[Callable[[Sequence[str]], np.ndarray], ...]:
    """The size, modification-time and hash columns (as :func:`file_size_column`, :func:`file_mtime_column` and
    :func:`file_hash_column` give them) of the files ``paths`` names ``{image id: path}``: what a resume of a stream
    whose items are files compares with the run's."""
    return tuple(_path_column(paths, f) for f in (_size, _mtime, file_hash))


def file_size_column(dataset: Any) -> Callable[[Sequence[str]], np.ndarray] | None:
    """What a recording stores in :data:`~qkhooks.store.format.FILE_SIZES` for a batch of ids: each image file's
    size in bytes (int64, -1 where the image is not read from a file or cannot be read); None for data that is not
    read from files, whose runs have no such array."""
    return _column(dataset, _size)


def _mtime(path: str | None) -> int:
    """The file's modification time in nanoseconds (``st_mtime_ns``); -1 for no file or one that cannot be read now."""
    if path is None:
        return -1
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def file_mtime_column(dataset: Any) -> Callable[[Sequence[str]], np.ndarray] | None:
    """What a recording stores in :data:`~qkhooks.store.format.FILE_MTIMES` for a batch of ids: each image file's
    modification time in nanoseconds (int64, -1 where the image is not read from a file or cannot be read); None for
    data that is not read from files. One ``stat`` a file, so a resume checks every image it keeps at no real cost."""
    return _column(dataset, _mtime)


def file_hash(path: str | None) -> int:
    """The first 8 bytes of the file's BLAKE2b digest as a little-endian signed integer (-2 where that reads -1);
    -1 for no file or one that cannot be read now."""
    if path is None:
        return -1
    digest = hashlib.blake2b(digest_size=8)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return -1
    return digest_value(digest)


def file_hash_column(dataset: Any) -> Callable[[Sequence[str]], np.ndarray] | None:
    """Each image file's BLAKE2b (8 bytes; -1 where not read from a file) for a batch of ids, as
    :data:`~qkhooks.store.format.FILE_HASHES` stores it: what a resume compares for the files whose time changed (a
    data set copied again keeps its bytes); None for data that is not read from files. One read of each file, in
    this process: a recording does not call it (it stores the hash of the bytes each image was decoded from,
    :func:`qkhooks.data.items.stamps_read`), a resume does, for the kept files whose time changed."""
    return _column(dataset, file_hash)


def recorded_sizes(run: Any, ids: Sequence[str], rows: Iterable[int]) -> dict[str, int] | None:
    """``{id: bytes}`` a run (a :class:`qkhooks.store.RunReader`, whose ids are ``ids``) recorded for its images at
    ``rows``, reading only those rows of its :data:`~qkhooks.store.format.FILE_SIZES` array (images not read from a
    file left out); None for a run without the array (older runs keep theirs in the root attribute
    :data:`SIZES_ATTR`, which :func:`changed_files` reads)."""
    if not run.has(FILE_SIZES):
        return None
    rows = sorted({int(r) for r in rows if 0 <= int(r) < len(ids)})
    sizes = run.array(FILE_SIZES)[rows] if rows else []
    return {ids[r]: int(size) for r, size in zip(rows, sizes) if size >= 0}


def changed_files(attrs: Mapping[str, Any], dataset: Any, ids: Sequence[str],
                  sizes: Mapping[str, int] | None = None) -> str:
    """Why the reopened ``dataset`` does not hold the images ``ids`` the run recorded ("" when it does, as far as can
    be told). ``sizes``: what the run recorded of them (:func:`recorded_sizes`; None for a run without the array:
    its root attribute :data:`SIZES_ATTR` is read). A run with stored sizes: a file there with another size means
    other files (images that are gone are left out and counted by the caller). A run from before, naming a folder
    relative to where it was recorded: any image missing means the folder found from here is another one."""
    spec = str(attrs.get("data", "?"))
    present = set(getattr(dataset, "ids", []))
    if sizes is not None:
        stored = dict(sizes)
    else:
        try:
            stored = json.loads(attrs.get(SIZES_ATTR) or "{}")
        except (TypeError, ValueError):
            stored = {}
    if not stored:
        absent = [i for i in ids if i not in present]
        if absent and absolute_spec(spec) != spec:
            return (f"{len(absent)} of the {len(ids)} images to draw are not in {spec!r} (first: {absent[0]!r}), a "
                    "path this run names relative to the folder it was recorded in, so the folder found from here is "
                    "not the one recorded; drawing no photos rather than others. Run from that folder, or draw "
                    "without photos (--no-images).")
        return ""
    checked = [i for i in ids if i in stored and i in present]
    now = file_sizes(dataset, checked)
    differ = [i for i in checked if now.get(i) != stored[i]]
    if differ:
        first = differ[0]
        return (f"{len(differ)} of the {len(ids)} images to draw in {spec!r} are not the files this run recorded "
                f"(first: {first!r}, {stored[first]} bytes when recorded, {now.get(first, 'unreadable')} now); "
                "drawing no photos rather than others. Put the recorded files back, or draw without photos "
                "(--no-images).")
    return ""
