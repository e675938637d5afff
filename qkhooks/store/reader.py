"""Read a run file lazily, by schema name, seeing only committed images: ``qkhooks.open_run(path)``.

Nothing is loaded until sliced, so notebooks can open a 100 GB run and look at one image. The reader opens
the file in SWMR mode, so it works while ``qkhooks record`` is still writing; :meth:`RunReader.refresh`
picks up images committed since.

:class:`RunReader` speaks the vocabulary of live results (:mod:`qkhooks.access`): ``run.query(l)`` here and
``recording.query(l)`` there. It needs h5py and numpy only, never torch.

Every read answers with the file's contents or a :class:`QKHooksError`, never a raw HDF5 error, a short block or
a hang: an HDF5 error reading the run is reported as damage with the ``qkhooks repair`` command (reading a file that
was or is being written, after reading it again on the file opened anew, :meth:`RunReader._retried`), an SWMR
reader's metadata reads give up within about a second (:data:`qkhooks.store._hdf5.SWMR_READ_ATTEMPTS`), and a reader
of a closed run whose file is changed under it (a resume cuts and rewrites it in place) says so instead of returning
stale rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence, TypeVar

import h5py
import numpy as np

from qkhooks.access import Layer, LayerGeometry, require_layer, resolve_layer
from qkhooks.errors import QKHooksError
from qkhooks.spectrum import LayerSpectrum, QKSpectrum
from qkhooks.store import format as fmt
from qkhooks.store._hdf5 import (READ_DEADLINE_S, Backoff, being_written, damaged_message, held_for_write, not_hdf5_at_all,
                                 open_reader)
from qkhooks.store.lock import writer_alive

__all__ = ["open_run", "RunReader", "RunArray"]

_T = TypeVar("_T")

_REQUIRED: Any = object()
"""``RunReader.state``'s default when none is given: an unknown name is refused."""


SPAN_BYTES = 1 << 26
"""The most bytes one contiguous read of images takes (the images asked for and those between them)."""


def _spans(images: np.ndarray | range, gap: int, most: int) -> list[np.ndarray | range]:
    """Increasing, distinct image indices cut into runs, each read as one contiguous slice: cut wherever the next
    image is more than ``gap`` on (a chunk's images: a run reads no chunk HDF5 would skip), and a run with gaps
    every ``most`` images (what it reads beyond the images asked for stays bounded). A slice's images (a forward
    ``range``) are cut by arithmetic into ranges, with no index array: a step-1 slice is one run, whatever its size."""
    if isinstance(images, range):
        if images.step == 1:
            return [images]
        if images.step > gap:
            return [range(i, i + 1) for i in images]
        bounds = [images.start, *range((images.start // most + 1) * most, images[-1] + 1, most), images.stop]
        return [images[-(-(lo - images.start) // images.step):-(-(hi - images.start) // images.step)]
                for lo, hi in zip(bounds, bounds[1:])]
    runs = np.split(images, np.flatnonzero(np.diff(images) > gap) + 1)
    return [part for run in runs
            for part in ([run] if run[-1] - run[0] < len(run) else np.split(run, np.flatnonzero(np.diff(run // most)) + 1))]


_AXES = (
    (r"modes/L\d+/query", ("images", "heads", "modes", "tokens")),
    (r"modes/L\d+/key", ("images", "heads", "modes", "keys")),
    (r"attention/L\d+/rows", ("images", "heads", "query rows", "tokens")),
    (r"attention/L\d+/pooled", ("images", "heads", "query rows", "masks")),
    (r"(attention/L\d+/full|terms/L\d+/\w+|relative/L\d+)", ("images", "heads", "queries", "keys")),
    (r"attention/query_tokens", ("images", "query rows")),
    (r"masks/\w+", ("images", "grid rows", "grid columns")),
)
"""The axes of the per-image arrays by schema name (README's run file schema), for messages."""


def _axis_names(name: str, ndim: int) -> tuple[str, ...]:
    """The names of the axes of the per-image array ``name``: the schema's where it has that many axes (a windowed
    layer's arrays have more), else ``axis i`` after the images."""
    for pattern, names in _AXES:
        if re.fullmatch(pattern, name.strip("/")) and len(names) == ndim:
            return names
    return ("images",) + tuple(f"axis {i}" for i in range(1, ndim))


def shard_sources(ds: h5py.Dataset) -> list[tuple[str, int, int]]:
    """(shard file name, first row, last row + 1) of each source of a merged view (a virtual dataset) that lies in
    another file; [] for any other dataset."""
    return [(name, lo, hi) for name, _, lo, hi, _ in fmt.view_sources(ds)]


def missing_shard_rows(ds: h5py.Dataset, folder: Path, n: int,
                       sources: Sequence[tuple[str, int, int]] | None = None) -> list[tuple[int, int]]:
    """The [start, stop) rows of a merged view (a virtual dataset) whose shard file is missing: HDF5 reads them as
    the view's fill value, without an error. ``sources``: :func:`shard_sources` of ``ds``, where already read."""
    return [(lo, min(hi, n)) for name, lo, hi in (shard_sources(ds) if sources is None else sources)
            if lo < n and not (folder / name).exists()]


def held_shards(ds: h5py.Dataset, folder: Path, n: int,
                sources: Sequence[tuple[str, int, int]] | None = None) -> list[tuple[str, int, int]]:
    """(shard, first row, stop) of a merged view's shards whose files are open for writing (a writer runs, or died
    before closing them): HDF5 refuses to open them through the view, which is not damage of the view or the shard.
    ``sources``: :func:`shard_sources` of ``ds``, where already read."""
    return [(name, lo, min(hi, n)) for name, lo, hi in (shard_sources(ds) if sources is None else sources)
            if lo < n and held_for_write(folder / name)]


def held_shards_text(names: Sequence[str]) -> str:
    """Why a merged view cannot read the shards ``names``, and what to do."""
    return ("a merged view reads its images from the shard files in place, and shard(s) "
            f"{', '.join(names)} are open for writing (their writer is running, or was killed before closing them), "
            "which HDF5 does not read through a view; that is not damage. Let the writer finish, or resume that "
            "shard's recording (--resume) so that it closes, then read again; or merge again with --copy "
            "(copy=True), which reads the shards as they stand.")


_SHARD_RUN_IDS: "OrderedDict[tuple[str, int, int, int], str | None]" = OrderedDict()
"""(path, inode, mtime_ns, size) -> the shard's run_id; the most recently read ``_SHARD_RUN_IDS_KEPT`` versions."""
_SHARD_RUN_IDS_KEPT = 4096


_SHARD_GONE: Any = ("the shard file is gone",)
"""What :func:`_shard_run_id` answers for a shard removed before or while it looks: a missing shard, which
``missing_shard_rows`` refuses by name (a raw FileNotFoundError before round 34)."""


def _shard_run_id(path: Path) -> str | None:
    """A shard file's run_id, read again only when the file changed (its inode, mtime or size); :data:`_SHARD_GONE`
    when the file is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return _SHARD_GONE
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    if key in _SHARD_RUN_IDS:
        _SHARD_RUN_IDS.move_to_end(key)
        return _SHARD_RUN_IDS[key]
    try:
        f = open_reader(path)
    except FileNotFoundError:
        return _SHARD_GONE
    try:
        run_id = fmt.run_id_of(f)
    finally:
        f.close()
    _SHARD_RUN_IDS[key] = run_id
    while len(_SHARD_RUN_IDS) > _SHARD_RUN_IDS_KEPT:
        _SHARD_RUN_IDS.popitem(last=False)
    return run_id


def rewritten_shards(ds: h5py.Dataset, folder: Path, n: int,
                     sources: Sequence[tuple[str, int, int]] | None = None) -> list[tuple[str, int, int]]:
    """(shard, first row, stop) of a merged view's shards that hold another run than when merged (rewritten by a
    rerun since): HDF5 would read that run's rows into this view without a word. Views merged before round 33 say
    nothing of their shards' runs: none is found."""
    merged = json.loads(fmt.as_str(ds.attrs.get(fmt.SHARD_RUNS, "{}")) or "{}")
    out = []
    for name, lo, hi in (shard_sources(ds) if sources is None else sources):
        if lo < n and name in merged:
            run_id = _shard_run_id(folder / name)
            if run_id is not _SHARD_GONE and run_id != merged[name]:  # a missing shard: missing_shard_rows
                out.append((name, lo, min(hi, n)))
    return out


class _SpectrumArrays(dict):
    """A layer's stored spectrum arrays (:meth:`RunReader.spectrum_arrays`). An array that damage took (a repair
    could not copy it: :func:`~qkhooks.store.format.lost_spectrum`) is refused by name when asked for, where a plain
    dict would raise a bare ``KeyError`` (round 49: found by the damage sweep)."""

    def __init__(self, arrays: dict[str, np.ndarray], lost: Sequence[str], path: Path, layer: int):
        super().__init__(arrays)
        self._lost, self._path, self._layer = list(lost), path, layer

    def __missing__(self, key: str) -> NoReturn:
        name = f"spectrum/L{self._layer}/{key}"
        if name in self._lost or any(lost.startswith("(") for lost in self._lost):
            raise QKHooksError(f"{self._path} lost {name if name in self._lost else self._lost[0]} to damage (a repair "
                               "could not copy it), so it is not known; `qkhooks spectrum MODEL` recomputes the "
                               "spectrum from the weights.")
        raise KeyError(key)


class RunArray:
    """A per-image dataset limited to the committed images; slicing returns numpy arrays."""

    def __init__(self, dataset: h5py.Dataset, n: int, owner: "RunReader | None" = None):
        self._dataset = dataset
        self._name = dataset.name
        self.n = n
        self._owner = owner
        self._opened = owner._shared.opened if owner is not None else 0
        self._shards: tuple[h5py.Dataset, list[tuple[str, int, int]]] | None = None  # (the handle, its shard_sources)

    @property
    def dataset(self) -> h5py.Dataset:
        """The owner's one handle on this array (taken again after the owner reopened its file)."""
        owner = self._owner
        if owner is not None and self._opened != owner._shared.opened:
            self._dataset, self._opened = owner._per_image(self._name) or self._dataset, owner._shared.opened
        return self._dataset

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n,) + tuple(self.dataset.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.dataset.dtype

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._owner is None:
            return self._checked_read(key)
        return self._owner._retried(f"its array {self._name}", lambda: self._checked_read(key))

    def _check_integers(self, key: Any) -> None:
        """Refuse an integer past an axis after the images as numpy does, naming the axis, before HDF5 sees it (its
        own IndexError names neither axis nor array). The image axis is checked where the images are picked."""
        key = tuple(k for k in (key if isinstance(key, tuple) else (key,)) if k is not None)
        shape = self.shape
        if any(k is Ellipsis for k in key):  # the indices after ``...`` count from the last axis
            at = next(i for i, k in enumerate(key) if k is Ellipsis)  # by identity: tuple.index compares arrays
            key = key[:at] + (slice(None),) * (len(shape) - len(key) + 1) + key[at + 1:]
        names = _axis_names(self._name, len(shape))
        for axis, (k, size) in enumerate(zip(key, shape)):
            if axis and isinstance(k, (int, np.integer)) and not isinstance(k, bool) and not -size <= k < size:
                raise IndexError(f"index {k} is out of bounds for axis {axis} ({names[axis]}) with size {size}: "
                                 f"{self._name} is {' x '.join(names)} {shape}.")

    def _checked_read(self, key: Any) -> np.ndarray:
        """:meth:`_read`, refused when the dataset holds fewer rows than the images counted: h5py would quietly cut
        every slice short (and raise its own IndexError past the end) while ``shape`` claims them all. Inside the
        owner's read guard, which refuses a closed reader before the shape is asked for."""
        self._check_integers(key)
        rows = self.dataset.shape[0]
        if rows < self.n:
            what = f"its array {self._name}"
            if self._owner is not None:
                raise self._owner._too_few_rows(what, rows, self.n)
            raise QKHooksError(damaged_message(Path(self.dataset.file.filename), _too_few(what, rows, self.n)))
        self._refuse_missing_shards()
        try:
            return self._read(key)
        except OSError as exc:
            if self._shards and self._shards[1]:
                path = Path(self.dataset.file.filename)
                held = held_shards(self.dataset, path.parent, self.n, self._shards[1])
                if held:
                    raise QKHooksError(f"{path}: {held_shards_text([h[0] for h in held])}") from None
                raise QKHooksError(_damaged_view_message(path, self._name, self._shards[1], exc)) from None
            raise

    def _refuse_missing_shards(self) -> None:
        """Refuse a read of a merged view (``merge_shards``' virtual datasets) whose shard file is gone: HDF5 reads
        that shard's images as the fill value (NaN maps) without an error (found by review). Each read looks again
        (a stat a shard); the view's sources are read once a handle."""
        ds = self.dataset
        if self._shards is None or self._shards[0] is not ds:
            self._shards = (ds, shard_sources(ds))
        if not self._shards[1]:
            return
        path = Path(ds.file.filename)
        changed = rewritten_shards(ds, path.parent, self.n, self._shards[1])
        if changed:
            raise QKHooksError(
                f"{self._name} of {path} is a merged view, and its shard(s) {', '.join(c[0] for c in changed)} now hold "
                "another run than the one merged (rewritten since, e.g. by a rerun with --overwrite), so the view "
                "would read that run's images as its own. Merge the shards again (qkhooks merge), or rerun the "
                "recording.")
        gone = missing_shard_rows(ds, path.parent, self.n, self._shards[1])
        if gone:
            raise QKHooksError(
                f"{self._name} of {path} is a merged view that reads its images from the shard files beside it, and "
                f"the shard(s) holding {fmt.span_words(gone, 'image')} are missing there, so HDF5 would read those "
                "images as NaN without an error. Put the shard files back next to the merged file (`qkhooks info "
                "--verify` lists them), or merge again with copy=True (a self-contained file) while they are there.")

    def _read(self, key: Any) -> np.ndarray:
        """numpy's indexing over the committed images: the images asked for are read from the file each once, in
        increasing order, in contiguous slices (:meth:`_read_images`), then put in the order asked for (a backward
        slice reversed); the other axes go to HDF5 where it selects them itself (integers and forward slices: only
        those bytes are read), else to numpy on what was read."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = len(self.shape) - (len(key) - 1 - sum(k is None for k in key))
            key = key[:at] + (slice(None),) * max(fill, 0) + key[at + 1:]
        if any(k is None for k in key):  # new axes: numpy's shape (on a zero-stride stand-in), read without them
            want = np.lib.stride_tricks.as_strided(np.zeros(1, bool), self.shape, (0,) * len(self.shape))[key].shape
            got = self._read(tuple(k for k in key if k is not None))
            if [d for d in want if d != 1] != [d for d in got.shape if d != 1]:
                raise IndexError("new axes among several index arrays move numpy's axes; read the array first "
                                 "(np.asarray(a)) and index that.")
            return got.reshape(want)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if len(rest) > len(self.shape) - 1:
            raise IndexError(f"too many indices: the array has {len(self.shape)} axes {self.shape}, {len(key)} were "
                             "given.")
        native = all(isinstance(k, (int, np.integer)) or (isinstance(k, slice) and (k.step or 1) > 0) for k in rest)
        if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            if not -self.n <= first < self.n:
                raise IndexError(f"image {first} is out of range for a run of {self.n} images.")
            i = int(first) % self.n
            # HDF5 selects the rest itself; otherwise numpy, on the one image read with the same kind of key
            got = self.dataset[(i,) + rest] if native else self.dataset[i:i + 1][(0,) + rest]
            self._refuse_zeroed([i], got)
            return got
        if isinstance(first, slice):  # a backward slice: the same images read forward, then reversed
            picked = range(*first.indices(self.n))
            in_order = picked.step > 0
            images: np.ndarray | range = picked if in_order else picked[::-1]
            after: slice | np.ndarray = slice(None, None, 1 if in_order else -1)
        else:
            index = self._image_indices(first)
            images, after = np.unique(index, return_inverse=True)  # increasing, each once, as HDF5 reads them
            in_order, after = np.array_equal(images, index), after.reshape(-1)
        if native:  # HDF5 selects the other axes; the image axis then put in the order asked for
            got = self._read_images(images, rest)
            return got if in_order else got[after]
        return self._read_images(images, ())[(after,) + rest]  # numpy's rules for the other axes, on the images read

    def _read_images(self, images: np.ndarray | range, rest: tuple) -> np.ndarray:
        """The images ``images`` (increasing, distinct) with HDF5's own selection ``rest`` of the other axes, read in
        contiguous slices and picked in numpy: HDF5 reads a strided or listed selection of images row by row, 10-50x
        slower than the same chunks read contiguously (h5py 3.16, HDF5 2.0)."""
        if not len(images):
            return self.dataset[(slice(0, 0),) + rest]
        chunk = self.dataset.chunks[0] if self.dataset.chunks else 1
        most = max(chunk, SPAN_BYTES // max(1, self.dataset.dtype.itemsize * int(np.prod(self.dataset.shape[1:]))))
        parts = []
        for span in _spans(images, chunk, most):
            part = self.dataset[(slice(int(span[0]), int(span[-1]) + 1),) + rest]
            if len(part) != len(span):  # a copy of the images asked for: the span read is let go
                part = np.ascontiguousarray(part[::span.step]) if isinstance(span, range) else part[span - span[0]]
            self._refuse_zeroed(span, part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _refuse_zeroed(self, images: Sequence[int], values: np.ndarray) -> None:
        """Refuse images read as zeros from a checksummed chunk whose stored bytes are all zero
        (:func:`~qkhooks.store.format.zeroed_chunks`: the checksum passes it)."""
        zeroed = fmt.zeroed_chunks(self.dataset, images, values)
        if not zeroed:
            return
        path, words = Path(self.dataset.file.filename), fmt.zeroed_chunk_words(self.dataset, zeroed[0])
        source = fmt.view_source_at(self.dataset, zeroed[0])
        shard = None if source is None else path.parent / source[0]  # repair refuses a view: the shard is what to repair
        if fmt.MAY_BE_TRUE_ZEROS in words:  # not known to be damage: said so, still not read
            raise QKHooksError(f"{path}: {words}; not read, as its rows are not known to be those recorded "
                               f"(`qkhooks repair {shard or path} --out FIXED.h5` copies every other image"
                               f"{'' if shard is None else ', then merge again with the copy in its place'}).")
        if shard is None:
            raise QKHooksError(damaged_message(path, words))
        raise QKHooksError(
            f"{path} is a merged view, and the shard it reads that image from is damaged ({words}): run `qkhooks "
            f"repair {shard} --out FIXED.h5` (it leaves that image out), then merge again with the fixed shard in "
            f"place of {shard.name} (qkhooks merge); the view's other images read as before.")

    def _image_indices(self, first: Any) -> np.ndarray:
        """The images an index array or boolean mask picks, as non-negative integers in the order asked for."""
        index = np.asarray(first)
        if index.size == 0:  # [] is float64 to numpy; an empty pick of images whatever its dtype
            index = index.astype(np.intp)
        if index.dtype == bool:
            if index.shape != (self.n,):
                raise IndexError(f"a boolean image mask must have one entry per image ({self.n}), not {index.shape}.")
            return np.flatnonzero(index)
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise IndexError(f"images are picked by an integer, a slice, a list of integers or a boolean mask, not "
                             f"{first!r}; for anything else read the array first (np.asarray(a)).")
        index = np.where(index < 0, index + self.n, index)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"an image index is out of range for a run of {self.n} images.")
        return index

    def chunks(self, size: int = 256) -> Iterator[tuple[slice, np.ndarray]]:
        """(slice, block) pairs over all committed images, ``size`` images at a time."""
        for start in range(0, self.n, size):
            sl = slice(start, min(start + size, self.n))
            yield sl, self[sl]

    def __repr__(self) -> str:
        return f"RunArray({self.dataset.name}, shape={self.shape}, dtype={self.dtype})"


class _SharedFile:
    """The one HDF5 handle on a run file that every open :class:`RunReader` of it in this process reads through, with
    its per-image arrays and ids. HDF5 shares a file's datasets among all its handles in a process, and refreshing a
    dataset through one handle while another handle has it open breaks reads through that one (see
    :meth:`RunReader._refresh`); with one handle, whichever reader refreshes refreshes it for all, and opening it anew
    after a failed read opens it anew for all."""

    def __init__(self) -> None:
        self.file: h5py.File | None = None
        self.stamp: tuple[int, int, int, int] | None = None
        self.swmr = False
        self.datasets: dict[str, h5py.Dataset] = {}
        self.ids: h5py.Dataset | None = None
        self.digests: h5py.Dataset | None = None
        """The ids' digests (:data:`qkhooks.store.format.ID_DIGESTS`) where the run has them, refreshed as the arrays."""
        self.opened = 0
        """How many times the file was opened: a :class:`RunArray` takes its dataset again when this changes."""
        self.readers = 0
        """Open readers: the last to close closes the handle."""
        self.attrs_off: list[str] = []
        """The attributes that fail the file's attribute digests (:func:`qkhooks.store.format.attr_digest_problems`)."""

    def changed(self, now: tuple[int, int, int, int] | None) -> str | None:
        """How the file, whose stamp is now ``now``, differs from the one opened (None: the same). A closed run is read
        without SWMR, from what HDF5 read at opening, so any change to its file (a resume cuts and rewrites it in
        place, an overwrite replaces it) makes what a reader would return wrong; an SWMR reader follows its writer in
        place and only loses track of a file replaced under its name."""
        if now is None:
            return "was deleted or renamed"
        if now[:2] != self.stamp[:2]:
            return "was replaced by another file (an --overwrite or a copy)"
        if not self.swmr and now != self.stamp:
            return "was changed (a writer resumed or truncated it)"
        return None


_SHARED: "weakref.WeakValueDictionary[tuple[int, int], _SharedFile]" = weakref.WeakValueDictionary()
"""The shared handle of each run file open here, by (device, inode): the identity by which HDF5 itself shares a file
opened twice in a process. Weak: an entry goes with the last reader holding it (closed or collected)."""
_SHARED_LOCK = threading.RLock()


class RunReader:
    """Labelled, lazy access to one run file. Prefer :func:`open_run`."""

    def __init__(self, path: str | os.PathLike, *, check_attributes: bool = True):
        """``check_attributes=False`` (``verify_run``, which names them) opens a run whose attributes fail their
        digests (:data:`qkhooks.store.format.ATTR_DIGESTS`); every other reader refuses it."""
        self.path = Path(path)
        if not self.path.exists():
            raise QKHooksError(f"no run file at {self.path}; record one with `qkhooks record`.")
        _refuse_non_run(self.path)
        self.problems: list[str] = []
        """Damage :meth:`summary` found that does not stop the run from being read (``qkhooks info`` exits 2)."""
        self.n = 0
        self._closed = False
        with _SHARED_LOCK:  # another reader of this file here: its handle (HDF5 shares the file's datasets anyway)
            stamp = _stamp(self.path)
            shared = _SHARED.get(stamp[:2]) if stamp is not None else None
            if shared is not None and shared.file.id.valid and shared.changed(stamp) is None:
                self._shared = shared
                self.refresh()
            else:
                self._shared = _SharedFile()
                self._open(Backoff(READ_DEADLINE_S))
            self._shared.readers += 1
        if check_attributes and self._shared.attrs_off:  # numbers read under a changed config: refused
            problems = self._shared.attrs_off
            self.close()
            raise QKHooksError(fmt.attr_damage_message(self.path, problems))

    @property
    def file(self) -> h5py.File:
        """The HDF5 handle this reader reads through, shared with every other open reader of the file here."""
        return self._shared.file

    def _open(self, backoff: Backoff) -> None:
        """Open the file (again) for every reader sharing its handle, its per-image arrays and this reader's count, by
        ``backoff``'s deadline."""
        shared = self._shared
        shared.opened += 1
        while True:  # a writer that changes the file while it opens (a resume starting): open again, after a pause
            shared.stamp = _stamp(self.path)
            if shared.stamp is None:  # gone between the check above and now
                raise QKHooksError(f"no run file at {self.path}; record one with `qkhooks record`.")
            shared.file = open_reader(self.path, backoff.remaining())
            shared.swmr = shared.file.swmr_mode
            shared.datasets = {}
            self.n = 0
            try:
                with self._reading():
                    if fmt.committed(self.file) is None:
                        raise QKHooksError(f"{self.path} is an HDF5 file but not a qkhooks run (no /images/ids with "
                                           "`committed`): give the .h5 that `qkhooks record` wrote; if it wrote this "
                                           "one, `qkhooks info --verify` on it says what is damaged.")
                    shared.ids = self.file[fmt.IDS]
                    shared.digests = self.file[fmt.ID_DIGESTS] if fmt.ID_DIGESTS in self.file else None
                    shared.attrs_off = fmt.attr_digest_problems(self.file)
                self._refresh()
                with _SHARED_LOCK:
                    _SHARED[shared.stamp[:2]] = shared
                return
            except _ReadAgain as exc:
                self.file.close()
                if not (exc.live and backoff.wait()):
                    raise
            except _Stale as exc:
                self.file.close()
                if not backoff.wait():
                    raise _Stale(f"{self.path} kept changing while it was being opened, for {READ_DEADLINE_S:g} s (a "
                                 "writer laying it out, resuming, truncating or replacing it): open it again once that "
                                 "writer is past that step (a resume's cut takes seconds).") from exc
            except BaseException:
                self.file.close()
                raise

    # ------------------------------------------------------------------ damage and staleness
    def _changed(self) -> str | None:
        """How the file at :attr:`path` differs from the one opened (None: the same; :meth:`_SharedFile.changed`)."""
        return self._shared.changed(_stamp(self.path))

    def _stale_error(self, why: str) -> QKHooksError:
        return _Stale(f"{self.path} {why} since this reader opened it, so what it would read is stale; open it "
                            "again (qkhooks.open_run).")

    @contextlib.contextmanager
    def _reading(self, what: str = "it") -> Iterator[None]:
        """Turn any HDF5 error while reading ``what`` into a QKHooksError (stale, or damaged with the repair command:
        a data chunk failing its checksum included), and refuse an answer read from a closed run's file that changed
        under this reader."""
        if self._closed or not self.file.id.valid:  # h5py answers a closed file with empty groups or damage-like errors
            raise QKHooksError(f"this reader of {self.path} is closed (it was used after its `with "
                               "qkhooks.open_run(...)` block, or after close()); read inside the block, or open the "
                               "run again.")
        try:
            yield
        except QKHooksError:
            raise
        except json.JSONDecodeError as exc:  # round 33: an attribute's JSON (model/info, config) that does not parse
            raise QKHooksError(damaged_message(self.path, f"an attribute's JSON does not parse ({exc})")) from None
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            if isinstance(exc, (KeyError, ValueError)) and not _from_hdf5(exc):
                raise
            why = self._changed()
            if why is not None:
                raise self._stale_error(why) from None
            others = _other_handles(self.file)
            # read again on the file opened anew before calling it damaged
            if self._shared.swmr or being_written(self.path):
                live = being_written(self.path) and writer_alive(self.path) is not False
                raise _ReadAgain(self._unreadable(what, exc, live, others), live) from None
            raise QKHooksError(self._unreadable(what, exc, False, others)) from None
        if not self._shared.swmr:
            why = self._changed()
            if why is not None:
                raise self._stale_error(why)

    def _unreadable(self, what: str, exc: BaseException, live: bool, others: int) -> str:
        """Why ``what`` did not read: damage, unless a writer holds the file or other handles on it are open here."""
        held = (f"{others} other handle(s) on this file are open in this process (an h5py.File of it, or a dataset "
                "taken from one; qkhooks readers of it share one handle), and HDF5 shares datasets among them: "
                "refreshing one while another holds it breaks its reads. Close them and open the run again "
                "(qkhooks.open_run).")
        if live:
            return (f"{self.path} is being written (a writer holds it) and HDF5 could not read {what} ({exc}), also on "
                    f"the file opened anew for {READ_DEADLINE_S:g} s: that is not damage. "
                    + (held if others else "Open the run again once the writer has finished (qkhooks.open_run)."))
        if others:
            return f"{self.path}: HDF5 could not read {what} ({exc}), also on the file opened anew: {held}"
        return damaged_message(self.path, f"HDF5 cannot read {what}: {exc}")

    def _retried(self, what: str, read: Callable[[], _T]) -> _T:
        """``read()`` as :meth:`_reading` answers; an HDF5 error reading a file that was or is being written is read
        again on the file opened anew: at once, then, while a writer holds the file, after growing pauses until the
        read deadline. Opening anew drops the views HDF5 holds of the file, and moves its end, which an SWMR reader
        never does by itself: the ids (variable-length strings) of images committed since opening can lie past it
        ("address of object past end of allocation")."""
        backoff = None
        while True:
            try:
                if backoff is None and not self._closed and not self.file.id.valid:  # another reader of it failed to
                    backoff = Backoff(READ_DEADLINE_S)  # open it anew (and raised that): open it anew for this one
                if backoff is not None:
                    self.file.close()
                    self._open(backoff)
                with self._reading(what):
                    return read()
            except _ReadAgain as exc:
                if backoff is None:
                    backoff = Backoff(READ_DEADLINE_S)
                elif not exc.live or not backoff.wait():
                    raise

    def refresh(self) -> int:
        """Re-read the committed count (a run still being written grows); returns it.

        Per-image arrays grow in place (a run file's layout never changes once it has images). Group
        attributes are read as of opening (HDF5 refreshes datasets only); reducer states are read afresh
        from the run's checkpoint at every :meth:`state`. A run that was closed when opened is read as it was
        then: once its file changes (a resume), refresh and every read raise, asking to open it again.
        """
        return self._retried("it", self._refresh)

    def _refresh(self) -> int:
        """The count first, then the arrays: the writer flushes an image's rows before the count that commits it, so
        every array refreshed after the count holds at least that many rows (refreshed before it, an array could
        hold fewer, and h5py cuts a slice past its end short without a word).

        Each array is refreshed through the reader's one handle on it, which every :class:`RunArray` reads through:
        HDF5 (1.10 to 2.0) refreshing a dataset that has another handle open reloads its layout without the chunk
        counts it numbers chunks by, so every later read spanning two chunks fails ("can't insert duplicate key")
        until all its handles are closed."""
        why = self._changed()
        if why is not None:
            raise self._stale_error(why)
        shared = self._shared
        with self._reading():
            if shared.swmr:
                shared.ids.refresh()  # the count is an attribute of the ids
            n = fmt.committed(self.file) or 0
            if shared.swmr:
                if not shared.datasets:  # once: a run's layout is fixed by its first batch
                    shared.datasets = fmt.per_image_datasets(self.file)
                for ds in shared.datasets.values():
                    ds.refresh()
                if shared.digests is not None:
                    shared.digests.refresh()
            self.n = n
        return self.n

    # ------------------------------------------------------------------ metadata
    @property
    def attrs(self) -> dict[str, Any]:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.file.attrs.items()}

    @property
    def model(self) -> str:
        return str(self.attrs.get("model", ""))

    @property
    def data(self) -> str:
        """The data the run was recorded from, as a spec (paths made absolute when recorded) or, for your own dataset
        object, its name: what :func:`qkhooks.data.open_dataset` reopens to draw the photos."""
        return str(self.attrs.get("data", ""))

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.attrs.get("config", "{}"))

    @property
    def mode_source(self) -> dict[int, str]:
        """Layer -> where its maps were taken from, as a live ``Recording.mode_source`` says: ``"qk"`` (the model's
        q/k outputs) or ``"x"`` (the tokens entering W_q/W_k); empty without modes or for runs written before it was
        stored."""
        return {int(layer): str(source) for layer, source in self.info.get("mode_source", {}).items()}

    @property
    def modes_kept(self) -> int | str | None:
        """Modes kept per head, as a live ``Recording.modes_kept`` says: an int, ``"all"``, or None (no modes)."""
        return self.config.get("modes")

    @property
    def complete(self) -> bool:
        return bool(self.file.attrs.get("complete", False))

    @property
    def info(self) -> dict[str, Any]:
        """Model facts the analyses need: num_prefix_tokens, heads, head_dim, dim, layers, family, grid."""
        group = self.file.get("model")
        return json.loads(group.attrs["info"]) if group is not None and "info" in group.attrs else {}

    @property
    def ids(self) -> list[str]:
        """The committed images' ids; in a checksummed run each is checked against its digest (a mismatch is refused
        as damage, naming the image and ``qkhooks repair``)."""
        ids = self._retried("its image ids", lambda: fmt.read_ids(self.file, self.n))
        if len(ids) < self.n:
            raise self._too_few_rows(f"its image ids /{fmt.IDS}", len(ids), self.n)
        return ids

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """The (id, reason) rows of the images the recording skipped. A list whose last rows do not read is refused,
        saying how the run is mended, never returned shorter."""
        try:
            rows, lost, total = fmt.read_skipped_rows(self.file)
        except ValueError as exc:  # not laid out as qkhooks writes it: damage, never rows read as others
            raise QKHooksError(damaged_message(self.path, str(exc))) from None
        if lost:
            raise QKHooksError(self.lost_skipped_rows(lost, total))
        return rows  # type: ignore[return-value]

    def lost_skipped_rows(self, lost: Sequence[int], total: int) -> str:
        """What to do about a list of skipped images of ``total`` rows whose rows ``lost`` do not read: damage in a
        finished run; in an unfinished one, what a writer killed while it added rows leaves (a resume writes the list
        again, whole, from the data). ``qkhooks info`` and ``verify_run`` say the same."""
        what = f"its list of skipped images /{fmt.SKIPPED} {fmt.skipped_loss_words(lost, total)}"
        if self.complete:
            return damaged_message(self.path, what)
        if being_written(self.path) and writer_alive(self.path) is not False:
            return (f"{self.path} is being written and {what}: its writer is adding rows; read it again once the "
                    "writer has written its next checkpoint or ended.")
        return (f"{self.path}: {what} (HDF5 cannot read the rest's strings). A writer killed while it added rows to "
                "the list leaves it so: resume the run (the same command plus --resume), which keeps its images and "
                f"writes the list again, or copy its images and the rows that read into a new file with `qkhooks "
                f"repair {self.path} --out FIXED.h5`.")

    # ------------------------------------------------------------------ data
    def has(self, name: str) -> bool:
        return name in self.file

    def array(self, name: str) -> RunArray:
        """Any per-image dataset by schema name, e.g. ``modes/L3/query`` or ``masks/objects``."""
        ds = self._per_image(name)
        if ds is None:
            have = ", ".join(self.arrays()) or "none"
            raise QKHooksError(f"{self.path} has no per-image array {name!r}; it has: {have}.")
        return RunArray(ds, self.n, self)

    def _per_image(self, name: str) -> h5py.Dataset | None:
        """The reader's one handle on the per-image array ``name`` (None: the run has none), kept while the file is
        open: see :meth:`_refresh` for why an array is never read or refreshed through a second one."""
        key, shared = name.strip("/"), self._shared
        ds = shared.datasets.get(key)
        if ds is None and not shared.swmr:  # an SWMR reader holds every array from its first refresh on
            found = self.file.get(key) if key else None
            if isinstance(found, h5py.Dataset) and found.attrs.get("per_image", False):
                ds = shared.datasets[key] = found
        return ds

    def _too_few_rows(self, what: str, rows: int, n: int) -> QKHooksError:
        """The refusal of ``what`` holding fewer rows than the ``n`` images counted (never a short block)."""
        why = self._changed()
        if why is not None:
            return self._stale_error(why)
        if not self._shared.swmr:
            return QKHooksError(damaged_message(self.path, _too_few(what, rows, n)))
        return QKHooksError(f"{self.path}: {_too_few(what, rows, n)} when this reader counted them: a writer cut the "
                            "run since (a resume drops the images past its last checkpoint), or the file is damaged. "
                            "Call run.refresh() and take the array again; if it is still short, run "
                            f"`qkhooks repair {self.path} --out FIXED.h5`.")

    def arrays(self) -> list[str]:
        """Names of all per-image arrays."""
        return sorted(fmt.per_image_datasets(self.file), key=_natural)

    # ------------------------------------------------------------------ the shared vocabulary (qkhooks.access)
    def _groups(self, top: str) -> list[int]:
        group = self.file.get(top, {})
        return sorted(int(k[1:]) for k in group.keys() if k[:1] == "L" and k[1:].isdigit())

    @property
    def layers(self) -> list[int]:
        """Every recorded layer (0-based block indices), whether it stored modes, attention or only its spectrum."""
        if "layers" in self.info:
            return sorted(int(l) for l in self.info["layers"])
        return sorted(set(self._groups("modes")) | set(self._groups("attention")) | set(self._groups("spectrum")))

    @property
    def module_paths(self) -> dict[int, str]:
        """Layer -> dotted path of its attention module (empty for runs written before qkhooks stored them)."""
        info = self.info
        return {int(l): str(p) for l, p in zip(info.get("layers", []), info.get("paths", []))}

    @property
    def mode_layers(self) -> list[int]:
        """Layers with stored query/key maps."""
        return self._groups("modes")

    @property
    def attention_kinds(self) -> list[str]:
        """Kinds of stored attention (rows, pooled, full)."""
        group = self.file.get("attention", {})
        return sorted({kind for k in group.keys() if k[:1] == "L" for kind in group[k].keys()})

    def attention_layers(self, kind: str = "rows") -> list[int]:
        """Layers with stored attention of ``kind`` (rows, pooled, full)."""
        group = self.file.get("attention", {})
        return sorted(int(k[1:]) for k in group.keys() if k.startswith("L") and kind in group[k])

    def _layer(self, layer: Layer) -> int:
        return resolve_layer(layer, self.layers, self.module_paths, str(self.path))

    def _mode_layer(self, layer: Layer) -> int:
        index = self._layer(layer)
        require_layer(index, self.mode_layers, "query/key maps", str(self.path), "record with modes= to store them.")
        return index

    def query(self, layer: Layer) -> RunArray:
        """(n, H, K, N) query maps x·u_n of ``layer`` (block index or module path)."""
        return self.array(f"modes/L{self._mode_layer(layer)}/query")

    def key(self, layer: Layer) -> RunArray:
        """(n, H, K, N) key maps x·v_n of ``layer``."""
        return self.array(f"modes/L{self._mode_layer(layer)}/key")

    def attention(self, layer: Layer, kind: str = "rows") -> RunArray:
        """Rebuilt attention of ``layer``: rows (n, H, T, N), pooled (n, H, T, M) or full (n, H, N, N)."""
        index = self._layer(layer)
        require_layer(index, self.attention_layers(kind), f"{kind!r} attention", str(self.path),
                      f"the run stores attention kinds {self.attention_kinds or 'none'} (the attention= option).")
        return self.array(f"attention/L{index}/{kind}")

    @property
    def relative_layers(self) -> list[int]:
        """Layers that stored a query-dependent relative-position term (SAM/ViTDet, with their full maps)."""
        return self._groups("relative")

    def relative_term(self, layer: Layer) -> RunArray:
        """``layer``'s query-dependent relative-position term (SAM/ViTDet decomposed positions q·R_h + q·R_w) per
        image, laid out as its full maps ((n, H, N, N), per window for windowed blocks): the model's logits are
        scale · content + this term, so content and position can be told apart per head and token."""
        index = self._layer(layer)
        require_layer(index, self.relative_layers, "query-dependent relative-position term", str(self.path),
                      "only layers with one (SAM/ViTDet decomposed positions), recorded with attention='full', store it.")
        return self.array(f"relative/L{index}")

    @property
    def terms_layers(self) -> list[int]:
        """Layers whose maps combine two softmaxes and stored their terms (differential attention, ConViT GPSA)."""
        return self._groups("terms")

    def terms(self, layer: Layer) -> dict[str, RunArray | np.ndarray]:
        """The terms ``layer``'s maps combine, by the names of :meth:`qkhooks.Recording.terms`: those shaped like the maps
        per image (``softmax1``, ``softmax2``, GPSA's ``content``: (n, H, N, N)), the others stored once for the run
        (GPSA's ``position`` (H, N, N) and ``gate`` (H,), differential attention's ``lambda``)."""
        index = self._layer(layer)
        require_layer(index, self.terms_layers, "two-softmax terms", str(self.path),
                      "only layers whose maps combine two softmaxes (ConViT GPSA), recorded with attention='full', store them.")
        group = self.file[f"terms/L{index}"]
        return {name: self.array(f"terms/L{index}/{name}") if group[name].attrs.get("per_image", False) else group[name][()]
                for name in sorted(group)}

    def bias(self, layer: Layer) -> np.ndarray | None:
        """Layer ``layer``'s position-only additive term (H, N, N), stored once per run (see
        :meth:`qkhooks.Recording.bias`); None when the layer has none (masks are never stored)."""
        ds = self.file.get(f"bias/L{self._layer(layer)}")
        return None if ds is None else ds[()]

    def geometry(self, layer: Layer) -> LayerGeometry:
        """``layer``'s grid, prefix tokens, query/key token counts, stage and windows as recorded (files written
        before per-layer geometry: the run's one grid and prefix, which held for every layer of the models they
        could record)."""
        index = self._layer(layer)
        gap = fmt.geometry_gap(self.info, [index])
        if gap is not None:
            raise QKHooksError(damaged_message(self.path, gap))
        found = fmt.layer_geometry(self.info, index)
        if found is None:
            raise QKHooksError(f"{self.path} does not say layer {index}'s token grid (written before qkhooks stored "
                               "it); record it again.")
        return found

    @property
    def schema_version(self) -> int:
        """Version of the run's ``model/info`` (1: one grid for every layer; 2: per-layer geometry)."""
        return int(self.info.get("schema_version", 1))

    def spectrum(self, layer: Layer) -> LayerSpectrum:
        """The recorded modes of ``layer`` as a :class:`LayerSpectrum` of numpy arrays U (H, d, K), S (H, K), V.

        With K < d_k kept it is ``truncated`` and carries the file's every-mode ``S_all``/``cos_all``, so its
        ``cosine_weighted`` is the all-mode statistic of METHODS A.2, as ``qkhooks.spectrum(model)`` gives."""
        index = self._layer(layer)
        arrays = self.spectrum_arrays(index)
        gone = [name for name in fmt.lost_spectrum(self.attrs, index) if not name.startswith("(") or "U" not in arrays]
        if gone:
            raise QKHooksError(f"{self.path} lost {', '.join(gone)} to damage (a repair could not copy it), so layer "
                               f"{index}'s modes are not known; `qkhooks spectrum MODEL` recomputes them from the weights.")
        if not {"U", "S", "V"} <= set(arrays):
            raise QKHooksError(f"{self.path} stores no modes for layer {index} (recorded without modes); its every-mode "
                               f"sigma and cosine are in spectrum_arrays({index}) as S_all, cos_all.")
        augmented = bool(self.config.get("augmented", False))
        kept = arrays["S"].shape[-1]
        if "S_all" in arrays and "cos_all" in arrays:  # every mode's sigma and cosine: the statistics are over all
            truncated = arrays["S_all"].shape[-1] > kept
            return LayerSpectrum(index, arrays["U"], arrays["S"], arrays["V"], augmented, _stored=arrays,
                                 S_all=arrays["S_all"] if truncated else None,
                                 cos_all=arrays["cos_all"] if truncated else None, truncated=truncated)
        # a file written before runs stored S_all/cos_all: truncated unless it kept every mode (modes="all", or
        # as many as the head width); a truncated one refuses the all-mode statistics rather than renormalise
        head_dim = self.info.get("head_dim")
        truncated = self.config.get("modes") != "all" and (head_dim is None or kept < int(head_dim))
        return LayerSpectrum(index, arrays["U"], arrays["S"], arrays["V"], augmented, _stored=arrays, truncated=truncated)

    def spectrum_arrays(self, layer: Layer) -> dict[str, np.ndarray]:
        """The stored spectrum arrays of ``layer``: U (H, d, K), S (H, K), V (H, d, K), cos (H, K) with modes;
        S_all, cos_all (H, d_k) every mode's sigma and cosine."""
        index = self._layer(layer)
        group = self.file.get(f"spectrum/L{index}")
        if group is None:
            raise QKHooksError(f"{self.path} has no spectrum for layer {index}; layers with one: {self._groups('spectrum')}.")
        arrays = dict(group.items())
        broken = sorted(k for k, v in arrays.items() if not isinstance(v, h5py.Dataset))  # h5py hands None for an
        if broken:  # object whose header does not read (round 33: a raw TypeError on v[()])
            raise QKHooksError(damaged_message(self.path, f"spectrum/L{index}/{broken[0]} cannot be opened (its "
                                                          "object header does not read)"))
        return _SpectrumArrays({k: v[()] for k, v in arrays.items()}, fmt.lost_spectrum(self.attrs, index), self.path,
                               index)

    @property
    def qk_spectrum(self) -> QKSpectrum | None:
        """The recorded modes of every layer that has them (None for a run recorded without modes)."""
        layers = [l for l in self._groups("spectrum") if "U" in self.file[f"spectrum/L{l}"]]
        return QKSpectrum([self.spectrum(l) for l in layers], self.model) if layers else None

    def state(self, name: str, default: Any = _REQUIRED) -> Any:
        """The saved state of a streaming reducer (``topk_modes``, ``preference``, ...).

        Kept in the run's checkpoint ``RUN.h5.reducers`` next to it (merged files hold theirs inside). A name the run
        has no state for is refused, naming the states it has (a typo would otherwise surface later as an error on
        None), unless ``default`` is given: then that is returned (``run.state("anisotropy", default=None)``).
        """
        states = self._states()
        found = states.get(name.rpartition("/")[2], default)
        if found is _REQUIRED:
            raise QKHooksError(self._no_state(name, states))
        return found

    def _no_state(self, name: str, states: dict[str, dict[str, Any]]) -> str:
        """The refusal of a state the run does not hold: the names it has, and where the others went if it has none."""
        have = ", ".join(sorted(states)) or "none"
        return " ".join(filter(None, (f"{self.path} holds no reducer state {name!r}; its states: {have} "
                                      "(run.states() lists them).", self._missing_states(states))))

    def states(self) -> list[str]:
        """Names of the reducers with a saved state (a damaged checkpoint raises, naming it)."""
        return sorted(self._states())

    def _states(self) -> dict[str, dict[str, Any]]:
        images, states, problem = fmt.states_and_problem(self.file, self.path)
        if problem is not None:
            raise QKHooksError(self._damaged_checkpoint(problem))
        if (mismatch := self._checkpoint_mismatch(images)) is not None:
            raise QKHooksError(mismatch)
        return states

    def _checkpoint_mismatch(self, images: int | None) -> str | None:
        """Why the reducer states do not belong to the images this file holds, or None: states that count more images
        than are committed (a copy of a live run whose checkpoint was copied later), or fewer than a complete run
        holds (an earlier checkpoint of it: the run resumed or finished under another name, a hard link)."""
        if images is None:
            return None
        n = int(self.n)
        if images > n:  # the file's count now: a writer may have committed (and checkpointed) since this reader read
            n = max(n, self._committed_now())  # its count, or finished; this reader's view stays as it was
        if images > n and not writer_alive(self.path):
            why = f"they count {images} images, and the file holds {n}: they were saved after this file was"
        elif images < n and self.complete:
            why = (f"they count {images} images, and the file is complete with {n}: they are an earlier checkpoint "
                   "of it (the run was resumed or finished under another name, such as a hard link, or copied "
                   "without its last checkpoint)")
        else:
            return None
        if (changed := self._changed()) is not None:  # the file was resumed or replaced under this reader: reopen it
            raise self._stale_error(changed)
        ckpt = fmt.checkpoint_path(self.path)
        return (f"the reducer states of {self.path} ({ckpt}) do not belong to the images it holds: {why}. Their "
                "top-k images, preference and other statistics would describe other images, so they are not read. "
                f"Put the checkpoint saved with this file beside it, or move {ckpt.name} away to read the run without "
                "states (the per-image arrays are not affected).")

    def _committed_now(self) -> int:
        """The file's committed count as it is now (the ids' attribute read again where the file is SWMR), without
        moving this reader's own count (:meth:`refresh` does that)."""
        if self._shared.swmr:
            self._shared.ids.refresh()
        return fmt.committed(self.file) or 0

    def _damaged_checkpoint(self, problem: str) -> str:
        ckpt = fmt.checkpoint_path(self.path)
        return (f"the reducer checkpoint {ckpt} is damaged ({problem}): the reducer states (top-k images, preference, ...) "
                "are lost; the per-image arrays are not affected. A --resume of this run records every image again from "
                f"the first (the reducers need their states) and writes a new checkpoint; to read the run without "
                f"states, move {ckpt.name} away.")

    def missing_states(self) -> str:
        """A one-line notice when the run's config lists reducers but their saved states are nowhere: the sidecar
        ``RUN.h5.reducers`` is not next to the run file (copied or moved without it). Empty otherwise."""
        return self._missing_states(self._states())

    def _missing_states(self, states: dict[str, dict[str, Any]]) -> str:
        wanted = self.config.get("reducers") or []
        if not wanted or states:
            return ""
        sidecar = fmt.checkpoint_path(self.path)  # beside the run's real file (through a symlink, its target's)
        if not self.complete and not sidecar.exists() and writer_alive(self.path):
            return (f"no reducer checkpoint yet ({', '.join(wanted)}): the writer has not reached its first "
                    "(every --checkpoint-every / checkpoint_every batches, 8 by default); read the states again "
                    "later.")
        if not self.complete and not sidecar.exists():  # stopped before its first checkpoint: nothing was moved
            return (f"no reducer checkpoint yet ({', '.join(wanted)}): the run stopped before its first, so a --resume "
                    f"records its {self.n} committed images again, for the reducers to see them.")
        if sidecar.exists() and (theirs := self._other_runs_checkpoint(sidecar)) is not None:
            return (f"{sidecar.name} belongs to another run (its run_id {theirs}, this file's "
                    f"{fmt.as_str(fmt.run_id_of(self.file))}), so the states of the reducers this run kept "
                    f"({', '.join(wanted)}) are not read: it was copied or moved here from another run, or an "
                    "--overwrite stopped between writing the run and its checkpoint. Put this run's own checkpoint "
                    "beside it, or move this one away and record the run again; analyses recompute what they can "
                    "from the stored maps, the rest is left out.")
        return (f"{sidecar.name} is missing: the states of the reducers this run kept ({', '.join(wanted)}) live in "
                f"that file, next to {sidecar.with_suffix('').name}"  # the run's real file: through a link, its target
                f"{f' (in {sidecar.parent})' if sidecar.parent != self.path.absolute().parent else ''}; copy it along "
                "with the run (analyses recompute what they can "
                "from the stored maps, the rest is left out).")

    def _other_runs_checkpoint(self, sidecar: Path) -> str | None:
        """The run_id of a readable checkpoint beside this run that names another run's id, else None."""
        try:
            meta, _ = fmt._load_checkpoint(sidecar)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported as damaged elsewhere
            return None
        mine = fmt.run_id_of(self.file)
        if "run_id" in meta and mine is not None and str(meta["run_id"]) != fmt.as_str(mine):
            return str(meta["run_id"])
        return None

    # ------------------------------------------------------------------ summary
    def _incomplete_hint(self) -> str:
        if self.complete:
            return ""
        if writer_alive(self.path):  # a live writer (running, or stopped with Ctrl-Z): resuming it would be refused
            return (" (being written: a live writer holds it, running or paused; its images so far are readable, and "
                    "a resume is for a writer that has ended)")
        if "shards" in self.file["images"].attrs:  # a merged file is not resumed itself
            return " (incomplete: resume its shards with --resume)"
        return " (incomplete: resume with the same command plus --resume)"

    def summary(self) -> str:
        """What ``qkhooks info`` prints."""
        lines = [
            f"run      {self.path}",
            f"model    {self.model}",
            f"data     {self.attrs.get('data', '?')}",
            f"images   {self.n} committed{self._incomplete_hint()}",
            f"version  qkhooks {self.attrs.get('qkhooks_version', '?')}",
            f"format   {fmt.describe_format(self.attrs)}",
        ]
        self.problems = []
        try:
            skipped, lost, total = fmt.read_skipped_rows(self.file)
        except ValueError as exc:  # not laid out as qkhooks writes it
            skipped, lost, total = [], [], 0
            lines.append("skipped  unreadable")
            self.problems.append(f"{exc}: run `qkhooks repair {self.path} --out FIXED.h5` to copy every image still "
                                 "readable into a new file")
        if total:
            lines.append(f"skipped  {total}: " + ", ".join(i for i, _ in skipped[:5]) + (" ..." if total > 5 else "")
                         + (f"  ({fmt.skipped_loss_words(lost, total)})" if lost else ""))
        if lost and self.complete:
            self.problems.append(f"its list of skipped images /{fmt.SKIPPED} {fmt.skipped_loss_words(lost, total)}:"
                                 f" run `qkhooks repair {self.path} --out FIXED.h5` to copy every image still readable "
                                 "and the rows that read into a new file")
        elif lost:  # an unfinished run: said, and the resume the summary points to mends it
            lines.append("         " + self.lost_skipped_rows(lost, total))
        lines.append("arrays")
        unreadable = []
        names = self.arrays()
        checksummed = 0
        for name in names:
            ds = self.file[name]
            checksummed += bool(ds.fletcher32)
            shape = (self.n,) + tuple(ds.shape[1:])
            short = ds.shape[0] < self.n  # every read of it is refused (RunArray)
            bad = self.n > 0 and (short or not fmt.chunk_index_readable(ds, (0, self.n - 1)))
            unreadable += [name] if bad else []
            why = f"{ds.shape[0]} rows, fewer than committed" if short else "chunk index unreadable"
            lines.append(f"  {name:32s} {str(shape):24s} {ds.dtype}" + (f"  DAMAGED ({why})" if bad else ""))
        if checksummed:
            lines.append("checksum Fletcher-32 on " + ("every per-image array" if checksummed == len(names) else
                                                       f"{checksummed} of {len(names)} per-image arrays")
                         + (" and on the image ids (each read is checked against its digest): a damaged data chunk "
                            "or id is reported when read, never returned" if fmt.ID_DIGESTS in self.file else
                            ", not on the image ids (written before qkhooks stored their digests): a damaged data "
                            "chunk is reported when read, never returned; a changed id is not detected"))
        elif names:
            lines.append("checksum none on the per-image arrays: damage inside their data is not detected (record "
                         "with --checksum)")
        if unreadable:
            self.problems.append(f"{len(unreadable)} per-image arrays are unreadable ({', '.join(unreadable[:3])}"
                                 f"{' ...' if len(unreadable) > 3 else ''}): run `qkhooks repair {self.path} --out "
                                 "FIXED.h5` to copy every image still readable into a new file")
        images, states, problem = fmt.states_and_problem(self.file, self.path)  # one load of the checkpoint
        mismatch = self._checkpoint_mismatch(images) if problem is None else None
        if problem is not None:
            self.problems.append(self._damaged_checkpoint(problem))
            lines.append(f"reducers DAMAGED checkpoint {fmt.checkpoint_path(self.path).name} ({problem})")
        elif mismatch is not None:
            self.problems.append(mismatch)
            lines.append(f"reducers NOT THIS FILE'S: {fmt.checkpoint_path(self.path).name} ({', '.join(sorted(states))})")
        elif states:
            lines.append("reducers " + ", ".join(sorted(states)))
        elif notice := self._missing_states(states):
            lines.append("reducers none: " + notice)
        if self.info:
            lines.append(f"layers   (model/info schema {self.schema_version})")
            for layer in self.layers:
                found, gap = fmt.layer_geometry(self.info, layer), fmt.geometry_gap(self.info, [layer])
                if gap is not None:
                    self.problems.append(damaged_message(self.path, gap))
                lines.append(f"  L{layer:<3d} {self.module_paths.get(layer, '')}: "
                             + ("DAMAGED (no entry in model/info's layer_geometry)" if gap is not None else
                                "grid unknown" if found is None else found.describe()))
            for path, why in {**self.info.get("left_out_by_design", {}), **self.info.get("left_out_unmodelled", {})}.items():
                lines.append(f"  not recorded: {path}: {why}")
        return "\n".join(lines)

    def close(self) -> None:
        """Close this reader; the file's handle closes with the last open reader of it here."""
        if self._closed:
            return
        self._closed = True
        with _SHARED_LOCK:
            shared = self._shared
            shared.readers -= 1
            if shared.readers == 0:
                shared.datasets, shared.ids, shared.digests = {}, None, None
                if shared.file.id.valid:
                    shared.file.close()

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed or not self.file.id.valid:
            return f"RunReader({str(self.path)!r}, closed)"
        return f"RunReader({str(self.path)!r}, images={self.n}, layers={self.layers})"


# How files that are not HDF5 at all begin (a run file whose first bytes were zeroed is damaged, not foreign).
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _refuse_non_run(path: Path) -> None:
    """One clear line for what cannot be a run file: a folder, an empty file, a file that is not HDF5 at all
    (a photo, a text file). A file whose start is zeroed is left to :func:`open_reader`, which calls it damaged and
    names ``qkhooks repair``: that is how a real run's lost superblock looks."""
    if path.is_dir():
        raise QKHooksError(f"{path} is a folder, not a qkhooks run file; give a run file (RUN.h5) written by "
                           "`qkhooks record`.")
    if path.exists() and not path.is_file():  # a FIFO: opening it would wait for a writer forever
        raise QKHooksError(f"{path} is not a regular file (a FIFO, a device or a socket), not a qkhooks run file; "
                           "give a run file (RUN.h5) written by `qkhooks record`.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_HDF5_SIGNATURE))
    except OSError as exc:
        raise QKHooksError(f"cannot read {path} ({exc.strerror or exc}).") from None
    if not head:
        raise QKHooksError(f"{path} is an empty file, not a qkhooks run file; give a run file (RUN.h5) written by "
                           "`qkhooks record`.")
    if not_hdf5_at_all(path):  # a run whose start was overwritten is left to open_reader, which calls it damaged
        if path.name.endswith(".reducers") and len(path.name) > len(".reducers"):  # review r40: the checkpoint
            run = path.with_name(path.name[: -len(".reducers")])
            raise QKHooksError(
                f"{path} is the reducer checkpoint of the run file {run} (the reducers' saved states, written beside "
                f"it), not a run file; open the run: qkhooks.open_run({str(run)!r}) (its reducers' states: "
                f"run.state(name)), or `qkhooks info {run}`." + ("" if run.exists() else f" ({run} is not there.)"))
        raise QKHooksError(f"{path} is not a qkhooks run file (not an HDF5 file at all); give a run file (RUN.h5) "
                           "written by `qkhooks record`.")


class _Stale(QKHooksError):
    """The file changed under a reader that cannot follow it (see :meth:`RunReader._changed`)."""


class _ReadAgain(QKHooksError):
    """HDF5 failed to read a file that was or is being written: read it again (:meth:`RunReader._retried`); ``live``:
    a writer holds it (its message says so), else the message is the damage one."""

    def __init__(self, message: str, live: bool):
        super().__init__(message)
        self.live = live


def _too_few(what: str, rows: int, n: int) -> str:
    return f"{what} has {rows} rows, fewer than the {n} images committed"


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime) of the file at ``path``: what a change to it changes (None: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _other_handles(f: h5py.File) -> int:
    """Handles on ``f``'s file that this process opened otherwise than through ``f`` (other files, their objects)."""
    try:
        return h5py.h5f.get_obj_count(f.id, h5py.h5f.OBJ_ALL) - h5py.h5f.get_obj_count(f.id, h5py.h5f.OBJ_ALL |
                                                                                         h5py.h5f.OBJ_LOCAL)
    except (ValueError, RuntimeError, OSError):  # a file HDF5 no longer holds open
        return 0


def _damaged_view_message(path: Path, name: str, shards: Sequence[tuple[str, int, int]], exc: BaseException) -> str:
    """Why a merged view's read of ``name`` failed in HDF5 (a shard's chunk failing its checksum: a flipped byte), and
    the fix that works: repair the damaged shard and merge again (repair refuses a merged view itself; the damage
    message of a run named the view)."""
    names = sorted({shard for shard, _, _ in shards})
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"{path} is a merged view, and HDF5 cannot read {name} from its shard files ({exc}): one of its shards "
            f"({listed}) is damaged. `qkhooks info --verify SHARD` names the damaged images of each; run `qkhooks repair "
            "SHARD --out FIXED.h5` on the damaged one (it leaves those images out), then merge again with the fixed "
            "shard in its place (qkhooks merge); repair refuses a merged view itself.")


def _from_hdf5(exc: BaseException) -> bool:
    """Whether a KeyError or ValueError was raised by HDF5 failing to read, told by where it was raised, not by its
    text: HDF5's errors come out of h5py's compiled low-level modules (``h5py/h5o.pyx``, ``h5a.pyx``, ...), whereas
    Python code and h5py's own check of an index (``_selector.pyx``) raise for a key the caller got wrong. The reader
    looks names up with ``in``/``get`` before HDF5 opens them (a wrong one answers a QKHooksError), so a KeyError from
    HDF5 is a link that is there but cannot be followed: a dangling soft or external link, damage."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename)
    return where.parent.name == "h5py" and where.suffix == ".pyx" and where.name not in _H5PY_OWN_CHECKS


_H5PY_OWN_CHECKS = {"_selector.pyx", "utils.pyx"}
"""h5py's compiled modules that raise for a bad argument themselves, before HDF5 is asked (indices, shapes)."""


def _guarded(method: Any) -> Any:
    @functools.wraps(method)
    def guarded(self: RunReader, *args: Any, **kwargs: Any) -> Any:
        return self._retried("it", lambda: method(self, *args, **kwargs))

    return guarded


_UNGUARDED = {"file", "refresh", "close", "__repr__", "_reading", "_changed", "_stale_error", "_damaged_checkpoint",
              "_open", "_retried", "_refresh", "_per_image", "_too_few_rows", "_unreadable"}
for _name, _member in list(vars(RunReader).items()):  # every read of the file answers as _reading says
    if _name.startswith("__") or _name in _UNGUARDED:
        continue
    if isinstance(_member, property):
        setattr(RunReader, _name, property(_guarded(_member.fget), doc=_member.__doc__))
    elif callable(_member) and not isinstance(_member, (staticmethod, classmethod)):
        setattr(RunReader, _name, _guarded(_member))


def _natural(name: str) -> list[Any]:
    """Sort key putting L2 before L10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def open_run(path: str | os.PathLike) -> RunReader:
    """Open a run file for reading (also while it is being written)."""
    return RunReader(path)
