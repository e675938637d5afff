"""``qkhooks repair``: copy what is still readable of a damaged run file into a new run file; and
``qkhooks info --verify`` (:func:`verify_run`): read a whole run file back and say what does not read.

The damaged file is only read (through a view that clears its open flags, rebuilds a zeroed superblock and
reads a truncated tail as zeros), never changed. An image is copied when its id and its rows of every per-image
array read back (with a checksum, ``--checksum``: that they pass it, and that its id matches its digest,
:data:`~qkhooks.store.format.ID_DIGESTS`) and lie wholly inside the file as it is on disk
(zeros read past a truncation are not data) and lie inside every array (one cut shorter than ``committed`` loses
its missing rows). The copy keeps the arrays' compression and checksum (and the ids' digests), and the attributes of the root and of
``/images`` (a shard's block start) but the image count and the list of arrays, which are the new file's own.
Statics and the reducer checkpoint are copied when they read; the checkpoint only when every image it counts
was recovered, so ``--resume`` on the new file continues correctly. :func:`verify_run` reads the same chunks the
same way, one at a time, through the reader's bounded opening (a file a writer has open included), and changes
nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import resource
import shutil
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import h5py
import numpy as np

from qkhooks.errors import QKHooksError, writable_dir
from qkhooks.store import format as fmt
from qkhooks.store._hdf5 import (DamagedRunError, HeldOpenError, attribute_message, create_run_file, dataspace_count,
                                 heap_collections_readable, heap_reference_layout, heap_walk_ends, open_damaged,
                                 unreadable_strings)
from qkhooks.store.lock import short_of_room
from qkhooks.store.reader import RunReader, held_shards, missing_shard_rows, rewritten_shards

__all__ = ["repair", "RepairReport", "verify_run", "VerifyReport"]

_READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


@dataclasses.dataclass
class RepairReport:
    """What :func:`repair` found and copied."""

    source: Path
    out: Path
    committed: int | None
    recovered: list[str]
    lost: list[int]
    arrays: list[str]
    states: list[str]
    problems: list[str]

    def summary(self) -> str:
        lines = [f"repaired {self.source} -> {self.out}: {len(self.recovered)} of {self.committed} committed images "
                 f"recovered ({len(self.arrays)} per-image arrays)"]
        if self.lost:
            lines.append(f"lost     {len(self.lost)} images (rows {self.lost[:10]}{' ...' if len(self.lost) > 10 else ''})")
        lines.append("reducers " + (", ".join(self.states) if self.states else "none recovered"))
        lines += [f"note     {p}" for p in self.problems]
        return "\n".join(lines)


def repair(run: str | os.PathLike, out: str | os.PathLike) -> RepairReport:
    """Copy every readable committed image (and statics and reducer states) of ``run`` into a new file ``out``."""
    run, out = Path(run), Path(out)
    if not run.exists():
        raise QKHooksError(f"no file at {run}.")
    if not run.is_file():  # opening a FIFO waits for a writer forever (a directory, a device: nothing to recover)
        raise QKHooksError(f"{run} is not a regular file (a folder, a FIFO, a device or a socket), not a run file; "
                           "give the damaged run file (RUN.h5) itself.")
    if out.exists() or out.resolve() == run.resolve():
        raise QKHooksError(f"{out} already exists; repair writes a new file and never replaces one.")
    _refuse_unwritable(out, os.path.getsize(run))
    try:
        src = open_damaged(run)
    except _READ_ERRORS as exc:
        raise QKHooksError(f"nothing of {run} can be read ({exc}); no image can be recovered.") from None
    with src:
        _refuse_newer_format(src, run, "repair")
        tmp = out.with_name(out.name + ".creating")
        made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
        had_states = fmt.checkpoint_path(out).exists()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with create_run_file(tmp) as dst:
                report = _copy(src, dst, run, out, os.path.getsize(run))
            os.replace(tmp, out)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # a failure to clean up must not hide why the copy failed
                tmp.unlink(missing_ok=True)
                if not had_states:  # the copy's checkpoint, written with it (_copy_states)
                    fmt.checkpoint_path(out).unlink(missing_ok=True)
                for folder in made:  # the folders made for it, innermost first: nothing is left behind
                    folder.rmdir()
            if isinstance(exc, OSError):
                raise QKHooksError(f"writing {out} failed ({exc}); {run} is unchanged and nothing was left at {out}: "
                                   "free space or choose another --out, then repair again.") from None
            raise
    return report


def _refuse_unwritable(out: Path, source_bytes: int) -> None:
    """Before any work: ``out``'s folder must take a file (it is made, if missing, when the copy starts), and hold
    the copy, which is at most the damaged file's size (the same images, chunks and compression, fewer where rows
    are lost); past a full disk HDF5 fails while closing, where a process can die without a word (review r36 saw a
    segfault)."""
    writable_dir(out.parent, "--out folder")  # it, or the nearest folder above it (made at the copy), takes a file
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free < source_bytes + _SPARE_BYTES:
        raise QKHooksError(f"repair needs up to {source_bytes / 2**20:.1f} MiB (the damaged file's size) in {folder}, "
                           f"which has {free / 2**20:.1f} MiB free; free space there, or give --out on another disk. "
                           "Nothing was written.")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # past it HDF5 fails as on a full disk (and died closing)
    if limit != resource.RLIM_INFINITY and source_bytes + _SPARE_BYTES > limit:
        raise QKHooksError(f"repair needs up to {(source_bytes + _SPARE_BYTES) / 2**20:.1f} MiB (the damaged file's "
                           f"size), more than the largest file this process may write ({limit / 2**20:.1f} MiB, "
                           "`ulimit -f`); raise the limit on file size, then repair again. Nothing was written.")


_SPARE_BYTES = 4 << 20
"""Room kept beyond the copy's bound (HDF5's metadata and the file system's own)."""


def _refuse_disk_filled(run: Path, out: Path, name: str, nbytes: int) -> None:
    """Before each write of the copy (256 images of one array): a disk that filled since :func:`_refuse_unwritable`
    (something else writing there) stops the repair here, before HDF5 meets it; :func:`repair` removes the copy."""
    free = short_of_room(out.parent, nbytes, _SPARE_BYTES)
    if free is not None:
        raise QKHooksError(f"repair stopped before copying more of /{name}: {out.parent} has {free / 2**20:.1f} MiB "
                           f"free, and the next write needs {(nbytes + _SPARE_BYTES) / 2**20:.1f} MiB with HDF5's "
                           "spare (the disk filled since the repair began: something else writes there); free space "
                           f"or give --out on another disk, then repair again. {run} is unchanged and nothing was "
                           f"left at {out}.")


def _copy(src: h5py.File, dst: h5py.File, run: Path, out: Path, real_size: int) -> RepairReport:
    problems: list[str] = []
    n = fmt.committed(src) if _readable(lambda: src[fmt.IDS]) else None
    if n is None:
        raise QKHooksError(f"{run} has no readable /images/ids with a committed count; no image can be recovered.")
    # never asked of HDF5: the attributes whose strings a cut left outside the file (a hang)
    attrs_outside = _attrs_outside(run, _attr_names(src), real_size)
    # the copy's format is its own; its attribute digests are written for it at the end (_seal_copy)
    _copy_attrs(src, dst, "root attribute", problems, skip=(fmt.FORMAT_ATTR, fmt.ATTR_DIGESTS),
                outside=attrs_outside)
    ids = np.array([""] * n, dtype=object)
    good = np.zeros(n, dtype=bool)
    digest_rows = None  # images a chunk of the source's id digests (None: it has none)
    try:
        raw, unread = _read_ids(src[fmt.IDS], n, run, real_size)  # fewer than n where the ids were cut: the rest lost
        vouched = np.ones(len(raw), dtype=bool)
        vouched[unread] = False
        if unread:
            problems.append(_rows_line(f"/{fmt.IDS}", fmt.row_spans(unread), "their ids do not read"))
        if fmt.ID_DIGESTS in src:  # an id is kept only when its digest reads and matches it
            digests = src[fmt.ID_DIGESTS]
            digest_rows = digests.chunks[0]
            off, failing, why = _ids_off_their_digests(digests, raw, len(raw), real_size, fmt.row_spans(unread))
            if digests.shape[0] < len(raw):
                vouched[digests.shape[0]:] = False
                problems.append(_past_the_end(digests.name, digests.shape[0], n))
            for lo, hi in failing:
                vouched[lo:hi] = False
            if failing:
                problems.append(_rows_line(digests.name, failing, why))
            vouched[off] = False
            if off:
                problems.append(_off_digest_line(off))
        garbled = [row for row in fmt.not_text(raw) if vouched[row]]  # one changed byte loses that image alone
        vouched[garbled] = False
        if garbled:
            problems.append(_rows_line(f"/{fmt.IDS}", fmt.row_spans(garbled), f"their ids are {fmt.NOT_TEXT}"))
        ids[:len(raw)] = [fmt.as_str(s) if ok else "" for s, ok in zip(raw, vouched)]  # a changed id is not decoded
        good[:] = ids != ""
        if len(raw) < n:
            problems.append(_past_the_end(f"/{fmt.IDS}", len(raw), n))
    except _READ_ERRORS as exc:
        problems.append(f"image ids unreadable ({exc})")
    try:
        # not through the reducer states, never per-image: one whose header a cut took (a merge wrote them after
        # its arrays' rows) hid every array, and repair recovered no image
        arrays = fmt.per_image_datasets(src, skip=(fmt.REDUCERS,))
    except _READ_ERRORS as exc:
        arrays = {}
        good[:] = False
        problems.append(f"the per-image arrays cannot be listed ({exc})")
    virtual = sorted(name for name, ds in arrays.items() if ds.is_virtual)
    if virtual:  # HDF5 would open the shards through this file's read-only view of itself: a crash, not a copy
        raise QKHooksError(f"{run} is a merge whose per-image arrays ({virtual[0]}, ...) are views of its shard files, "
                           "where the images are: repair the damaged shard (qkhooks repair SHARD --out SHARD), then "
                           "merge again (qkhooks merge).")
    for name, ds in arrays.items():
        good &= _readable_rows(ds, n, real_size, problems)
    keep = np.flatnonzero(good)
    images = dst.create_group("images")
    # A shard's block start (``shard``: the merge renumbers its top-k images by it) and a merge's ``shards`` are
    # copied; ``committed`` and the layout's array list are this file's own, written below
    _copy_attrs(src["images"], images, "/images attribute", problems, skip=("committed", fmt.ARRAYS_ATTR),
                outside=attrs_outside)
    images.create_dataset("ids", data=ids[keep].astype(object), maxshape=(None,), chunks=(1024,),
                          dtype=h5py.string_dtype())
    if digest_rows is not None:  # of the ids kept, each of which matched its digest
        fmt.create_id_digests(dst, fmt.id_digests(ids[keep]), digest_rows)
    fmt.set_committed(dst, len(keep))
    lost = np.flatnonzero(~good).tolist()
    skipped = [(str(ids[i]) or f"row {i}", "unreadable in the damaged run file") for i in lost]
    try:  # the rows that read, from the first; none whose string a cut left outside the file is asked of HDF5 (a hang)
        listed = src.get(fmt.SKIPPED)  # a group in its place is refused as damage by read_skipped_rows
        outside = unreadable_strings(listed, listed.shape[0], run, real_size, _chunk_locations(listed)) \
            if isinstance(listed, h5py.Dataset) and listed.ndim else set()
        held, unread, total = fmt.read_skipped_rows(src, unasked=outside)
        skipped = held + skipped  # type: ignore[operator]
        if unread:  # every row that reads is kept, the lost ones named (before, none past the first lost one)
            problems.append(_rows_line(f"/{fmt.SKIPPED}", fmt.row_spans(unread), f"the copy lists the {len(held)} of its "
                                       f"{total} rows that read"))
    except _READ_ERRORS as exc:
        problems.append(f"/{fmt.SKIPPED} unreadable, so the copy lists no image the recording skipped ({exc})")
    images.create_dataset("skipped", data=np.array(skipped, dtype=object).reshape(-1, 2), maxshape=(None, 2),
                          chunks=(64, 2), dtype=h5py.string_dtype())
    for name, ds in arrays.items():
        rest = ds.shape[1:]
        copy = dst.create_dataset(name, shape=(len(keep),) + rest, maxshape=(None,) + rest, dtype=ds.dtype,
                                  chunks=ds.chunks, compression=ds.compression, fletcher32=ds.fletcher32)
        row = max(1, int(np.prod(rest, dtype=np.int64)) * ds.dtype.itemsize)
        for start in range(0, len(keep), 256):
            rows = keep[start:start + 256]
            _refuse_disk_filled(run, out, name, len(rows) * row)
            # rows that passed the source's checks: a zero row as format 4 stores it (-0.0), as the copy is of format 4
            copy[start:start + len(rows)] = fmt.signed_zero_rows(name, ds[rows]) if len(rows) else ds[:0]
        copy.attrs["per_image"] = True
    images.attrs[fmt.ARRAYS_ATTR] = json.dumps(sorted(arrays))
    _copy_statics(src, dst, problems, attrs_outside, real_size)
    dst.attrs["complete"] = bool(src.attrs.get("complete", False)) and len(keep) == n
    _seal_copy(src, dst, problems, attrs_outside)
    states = _copy_states(src, run, out, keep, n, problems, attrs_outside)
    return RepairReport(run, out, n, [str(ids[i]) for i in keep], lost, sorted(arrays), states, problems)


def _seal_copy(src: h5py.File, dst: h5py.File, problems: list[str], outside: Collection[str] = frozenset()) -> None:
    """The copy of a run with attribute digests (:data:`~qkhooks.store.format.ATTR_DIGESTS`) gets its own, of what it
    holds now; an attribute that failed the source's digests keeps failing in the copy (the source's digest of it is
    carried, one added since stays uncovered): repair has no other copy of an attribute, so it never vouches for one
    that changed. Digests that do not parse are carried as they are (the copy vouches for none). Checking them reads
    every attribute, so where one lies outside the file (``outside``, :func:`_attrs_outside`) the copy carries none."""
    if outside and _readable(lambda: fmt.ATTR_DIGESTS in src.attrs) and fmt.ATTR_DIGESTS in src.attrs:
        problems.append(f"attributes {', '.join(sorted(outside))} lie past the file's end (a cut), so the attribute "
                        "digests cannot be checked: the copy's attributes carry no digests")
        return
    try:
        failing = fmt.failing_attrs(src)
        if failing is None:
            return
        raw = src.attrs[fmt.ATTR_DIGESTS]
        stored = fmt.stored_attr_digests(src)
    except (TypeError, ValueError):
        dst.attrs[fmt.ATTR_DIGESTS] = fmt.rewritable(raw)
        problems.append(f"root attribute {fmt.ATTR_DIGESTS} does not parse: copied as it is, so the copy's attributes "
                        "are refused as the damaged file's are; record the run again")
        return
    except _READ_ERRORS as exc:
        problems.append(f"root attribute {fmt.ATTR_DIGESTS} unreadable ({exc}): the copy's attributes carry no digests")
        return
    assert stored is not None
    # a user's own attribute (not sealed in the source) stays unsealed: the digests vouch only for what qkhooks wrote
    fmt.seal_attrs(dst, {**{name: None for name in fmt.unsealed_attrs(src)}, **{name: stored.get(name) for name in failing}})
    if failing:
        problems.append(f"{'; '.join(fmt.attr_words(name) + ' ' + why for name, why in failing.items())} in the damaged "
                        "file (its attribute digests), and repair has no other copy of an attribute: the copy keeps "
                        "failing the same check (readers refuse it); record the run again")


def _read_ids(ds: h5py.Dataset, n: int, run: Path, real_size: int, block: int = 256) -> tuple[np.ndarray, list[int]]:
    """The first ``n`` ids (fewer where the array was cut) and the rows that do not read: read whole, else a block at
    a time and one by one inside a block that fails. Ids are variable-length strings kept in heap collections, so
    one damaged collection loses the ids it holds, not every id (review r36: all 300 were lost to one 4 KiB block).
    An id in a collection HDF5 cannot read (cut short, or a zeroed page inside) is not asked of HDF5
    (:func:`~qkhooks.store._hdf5.unreadable_strings`)."""
    outside = unreadable_strings(ds, n, run, real_size, _chunk_locations(ds))
    if not outside:
        try:
            return ds[:n], []
        except _READ_ERRORS:
            pass
    out = np.empty(min(n, ds.shape[0]), dtype=object)
    out[:] = b""
    unread: list[int] = sorted(outside)
    skip = np.zeros(len(out), dtype=bool)
    skip[unread] = True
    for lo in range(0, len(out), block):
        hi = min(lo + block, len(out))
        try:
            if not skip[lo:hi].any():
                out[lo:hi] = ds[lo:hi]
                continue
        except _READ_ERRORS:
            pass
        for row in np.flatnonzero(~skip[lo:hi]) + lo:
            try:
                out[row] = ds[row]
            except _READ_ERRORS:
                unread.append(int(row))
    return out, sorted(unread)


def _attr_names(f: h5py.File) -> set[str]:
    """The name of every attribute of every object that lists (names only: no value is read)."""
    names: set[str] = set()

    def add(obj: h5py.HLObject) -> None:
        with contextlib.suppress(*_READ_ERRORS):
            names.update(obj.attrs.keys())

    add(f)
    with contextlib.suppress(*_READ_ERRORS):
        f.visititems(lambda name, obj: add(obj))
    return names


def _attrs_outside(run: Path, names: set[str], real_size: int) -> set[str]:
    """Those of ``names`` under which some attribute message in the file holds a variable-length string in a heap
    collection not wholly in the file (``real_size`` bytes): HDF5 spins without end reading it (round 45: ``repair``
    of a merged ``--checksum`` run cut inside the collection holding its attr_digests never returned), so repair
    asks none of them of HDF5. Read off the raw bytes: each attribute message of the name (:func:`~qkhooks.store._hdf5.attribute_message`),
    its datatype's class (9: variable-length), its dataspace's element count, then each element's reference (a 4-byte
    length, the collection's address, a 4-byte index, as in :func:`~qkhooks.store._hdf5.unreadable_strings`): an empty string's too, which
    HDF5 also reads from its collection (round 46: every run's empty ``model_note`` hung a repair once the run's
    headers lay before that collection); only a null reference (address 0) has none. Every message of a name counts,
    a rewritten attribute's stale copy too: an attribute is lost rather than a hang risked. Repair asks none of them
    of the root, ``/images``, the statics or the reducer states kept in the file."""
    layout = heap_reference_layout(run)
    if layout is None or not names or real_size < 16:
        return set()
    reference, lengths = layout
    outside: set[str] = set()
    with open(run, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if not _unreadable_collection(data, lengths, real_size):  # no string can lie outside: no pass per name
            return outside
        collection_inside = heap_collections_readable(fh, lengths, real_size)
        for name in sorted(names):
            encoded = name.encode() + b"\0"
            at = data.find(encoded, 8)
            while at >= 0 and name not in outside:
                parts = attribute_message(data, at, len(encoded))
                if parts is not None and data[parts[0]] & 0x0F == 9:  # a variable-length datatype
                    count = min(dataspace_count(data, parts[1], lengths),
                                max(0, (real_size - parts[2]) // reference.itemsize))
                    refs = np.frombuffer(data[parts[2]:parts[2] + count * reference.itemsize], reference)
                    if any(not collection_inside(a) for a in np.unique(refs["address"][refs["address"] > 0]).tolist()):
                        outside.add(name)
                at = data.find(encoded, at + 1)
    return outside


def _unreadable_collection(data: mmap.mmap, lengths: int, real_size: int) -> bool:
    """Whether some global heap collection header in the file ("GCOL", version 1) gives a size running past its end
    (``real_size``), or heads objects that HDF5 walks without end (:func:`~qkhooks.store._hdf5.heap_walk_ends`, a
    zeroed page inside): only such a collection holds a string HDF5 spins on (one wholly past the end reads as zeros,
    which HDF5 refuses). Bytes of data that happen to look like a header only cost the search per name."""
    at = data.rfind(b"GCOL")
    while at >= 0:
        size = int.from_bytes(data[at + 8:at + 8 + lengths], "little")
        if data[at + 4:at + 5] == b"\x01" and size > 0 and (at + size > real_size
                                                           or not heap_walk_ends(data[at:at + size], lengths)):
            return True
        at = data.rfind(b"GCOL", 0, at)
    return False


def _format_attrs(f: h5py.File) -> dict[str, Any] | None:
    """The root's format attribute of a file that may be damaged, as :mod:`~qkhooks.store.format` takes it; None
    where it does not read (the copy and the check note unreadable root attributes)."""
    try:
        return {fmt.FORMAT_ATTR: f.attrs[fmt.FORMAT_ATTR]} if fmt.FORMAT_ATTR in f.attrs else {}
    except _READ_ERRORS:
        return None


def _refuse_newer_format(f: h5py.File, run: Path, doing: str) -> None:
    """:func:`~qkhooks.store.format.refuse_newer_format` for a file that may be damaged: a format attribute that does
    not read says nothing."""
    attrs = _format_attrs(f)
    if attrs is not None:
        fmt.refuse_newer_format(attrs, run, doing)


def _format_line(f: h5py.File) -> str:
    """:func:`~qkhooks.store.format.describe_format` of a file that may be damaged."""
    attrs = _format_attrs(f)
    return f"unreadable (root attribute {fmt.FORMAT_ATTR} does not read)" if attrs is None else fmt.describe_format(attrs)


def _readable(read: Any) -> bool:
    try:
        read()
        return True
    except _READ_ERRORS:
        return False


def _past_the_end(name: str, rows: int, n: int) -> str:
    """The note for a dataset cut shorter than the committed count (its missing rows are lost images)."""
    lost = fmt.span_words([(rows, n)])
    return (f"{name}: {lost} {'are' if n - rows > 1 else 'is'} past its end (it has {rows} rows, {n} images are "
            "committed)")


def _readable_rows(ds: h5py.Dataset, n: int, real_size: int, problems: list[str]) -> np.ndarray:
    """Rows of ``ds`` that read back (:func:`_failing_rows`); the chunks that do not are noted in ``problems``, one
    line for the array, and rows past the array's end (an array cut shorter than ``committed``) in another."""
    ok = np.ones(n, dtype=bool)
    rows = min(n, ds.shape[0])
    if rows < n:
        problems.append(_past_the_end(ds.name, rows, n))
        ok[rows:] = False
    failing, why = _failing_rows(ds, n, real_size)
    for lo, hi in failing:
        ok[lo:hi] = False
    if failing:
        problems.append(_rows_line(ds.name, failing, why))
    return ok


def _failing_rows(ds: h5py.Dataset, n: int, real_size: int, decode: bool = True, rows_per_read: int = 1,
                  each: Callable[[int, np.ndarray], None] | None = None) -> tuple[list[tuple[int, int]], str]:
    """The [start, stop) row ranges of ``ds``'s first ``n`` rows (those it has: rows past its end are the caller's to
    note) that do not read back, and why the first did not; ``each(lo, block)`` is handed every block of
    rows, from row ``lo``, that does. A chunk fails when its checksum does, when it does not decompress, or when it is
    missing from the file or lies past the file's end on disk (``real_size`` bytes), but for the rows of a raw chunk
    that lie wholly before that end (:func:`_rows_inside`); a string (the ids) when it is not
    UTF-8 (with ``decode``: ids with digests are checked against them instead, image by image). Read one chunk at a
    time (never more in memory; an unchunked view 64 MiB of rows), or whole chunks of about ``rows_per_read`` rows,
    chunk by chunk only around one that does not read (the ids' digests: one chunk a row by default, and a read per
    chunk would cost a call each). An unchunked block that does not read is halved down to the rows that do not (a
    merge's view reads each row from its shard's chunks: one damaged chunk fails every block around it)."""
    rows = min(n, ds.shape[0])
    chunk = ds.chunks[0] if ds.chunks else max(1, (64 << 20) // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
    step = chunk * max(1, rows_per_read // chunk)
    where = _chunk_locations(ds) if ds.chunks else None
    # strings in a heap collection HDF5 would read without end (cut short, a zeroed page inside) are never asked of it
    heap_lost = np.zeros(rows, dtype=bool)
    heap_why: dict[int, str] = {}  # what each such row's string lies in
    garbled: set[int] = set()  # rows of strings that read but are not UTF-8
    if ds.dtype.hasobject:
        heap_lost[sorted(unreadable_strings(ds, rows, ds.file.filename, real_size, where, heap_why))] = True

    def problem(lo: int, hi: int, located: bool = True) -> str | None:
        """Why rows [lo, hi), in whole chunks (or rows :func:`_rows_inside` placed: ``located``), do not read; None
        when they do (then handed to ``each``)."""
        for first in range(lo, hi, chunk) if ds.chunks and located else ():
            try:  # round 33: a cut file's chunk index can fail to answer for one chunk; that chunk does not read
                offset, size = _chunk_at(ds, first, where)
            except _READ_ERRORS as exc:
                return f"its chunk's place in the file cannot be read ({exc})"
            if offset is None or offset + size > real_size:
                return _PAST_THE_END
        text = decode and h5py.check_string_dtype(ds.dtype)
        try:
            if heap_lost[lo:hi].any():  # the other rows, run by run (the lost ones are named after the walk)
                for a, b in fmt.row_spans((lo + np.flatnonzero(~heap_lost[lo:hi])).tolist()):
                    if text:
                        garbled.update(_rows_not_text(a, ds[a:b]))
                return None
            block = ds[lo:hi]
            if text:  # a string that is not UTF-8 loses its row alone (named after the walk)
                garbled.update(_rows_not_text(lo, block))
        except _READ_ERRORS as exc:
            return f"{exc}" + ("; the array carries a Fletcher-32 checksum" if ds.fletcher32 else "")
        if zeroed := fmt.zeroed_chunks(ds, range(lo, hi), block):  # chunk-sized blocks here: the chunk is lost
            return fmt.zeroed_chunk_words(ds, zeroed[0])
        if each is not None:
            each(lo, block)
        return None

    def halved(lo: int, hi: int, why_not: str) -> list[tuple[int, int, str]]:
        """The runs of rows of the unchunked block [lo, hi), which does not read (``why_not``), that do not read."""
        if hi - lo == 1:
            return [(lo, hi, why_not)]
        mid = (lo + hi) // 2
        found = [span for a, b in ((lo, mid), (mid, hi)) if (w := problem(a, b)) is not None for span in halved(a, b, w)]
        for i in range(len(found) - 1, 0, -1):  # adjacent runs joined (the first's reason kept)
            if found[i - 1][1] == found[i][0]:
                found[i - 1:i + 1] = [(found[i - 1][0], found[i][1], found[i - 1][2])]
        return found

    failing: list[tuple[int, int]] = []
    why = ""
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        first = problem(lo, hi)
        cuts = [lo, *range(lo + chunk, hi, chunk), hi] if first is not None else []
        for a, b in zip(cuts, cuts[1:]):
            why_not = first if len(cuts) == 2 else problem(a, b)  # one chunk: known already
            if why_not == _PAST_THE_END and ds.chunks:  # its rows wholly inside the file read (never a torn one)
                inside = min(b - a, _rows_inside(ds, a, where, real_size))
                if inside and problem(a, a + inside, located=False) is None:
                    a += inside
                why_not = None if a == b else why_not
            if why_not is None:
                continue
            for start, stop, reason in [(a, b, why_not)] if ds.chunks else halved(a, b, why_not):
                failing.append((start, stop))
                why = why or reason
    if heap_lost.any() or garbled:
        failing = fmt.row_spans(sorted({row for lo, hi in failing for row in range(lo, hi)}
                                       | set(np.flatnonzero(heap_lost).tolist()) | garbled))
        lost_first = int(np.flatnonzero(heap_lost)[0]) if heap_lost.any() else None
        why = why or (f"their strings lie in {heap_why[lost_first]}, so they are not read" if lost_first is not None
                      else f"their strings are {fmt.NOT_TEXT}")
    return failing, why


def _rows_not_text(lo: int, block: np.ndarray) -> set[int]:
    """The rows, from row ``lo``, of a block of strings that hold one that is not UTF-8 (:func:`fmt.not_text`)."""
    width = max(1, int(np.prod(block.shape[1:], dtype=np.int64)))
    return {lo + cell // width for cell in fmt.not_text(block.reshape(-1))}


_PAST_THE_END = "a chunk missing from the file or lying past its end"


def _rows_inside(ds: h5py.Dataset, first: int, where: dict[int, tuple[int, int]] | None, real_size: int) -> int:
    """How many leading rows of the chunk that starts at row ``first`` lie wholly inside the file on disk
    (``real_size`` bytes), where that can be known: a chunk of raw bytes (no filter: no compression, no checksum, which
    both need the whole chunk) of a fixed-size type, whole rows wide, keeps row r at bytes [offset + r * row, offset +
    (r + 1) * row), so the rows before a truncation are the data written (a cut through the last chunk written lost
    every row of it: up to a chunk's images per cut, 20 of a 40-image run cut 0.1 % short). 0 for any other chunk,
    one missing from the file, and one whose place does not read."""
    if (ds.id.get_create_plist().get_nfilters() or ds.dtype.hasobject or h5py.check_vlen_dtype(ds.dtype) is not None
            or tuple(ds.chunks[1:]) != tuple(ds.shape[1:])):
        return 0
    try:
        offset, _ = _chunk_at(ds, first, where)
    except _READ_ERRORS:
        return 0
    row = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    return 0 if offset is None or row == 0 else max(0, (real_size - offset) // row)


def _chunk_at(ds: h5py.Dataset, first: int, where: dict[int, tuple[int, int]] | None) -> tuple[int | None, int]:
    """(byte offset or None, stored size) of the chunk starting at row ``first``: from the walk of every chunk
    (:func:`_chunk_locations`) where there was one, else asked of HDF5 for that chunk."""
    return where.get(first, (None, 0)) if where is not None else _chunk_location(ds, first)


def _chunk_location(ds: h5py.Dataset, row: int) -> tuple[int | None, int]:
    """(byte offset or None where the chunk is not in the file, stored size) of the chunk holding ``row``."""
    info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
    return info.byte_offset, info.size


def _chunk_locations(ds: h5py.Dataset) -> dict[int, tuple[int, int]] | None:
    """{first row: (byte offset, stored size)} of every chunk in the file, from one walk of the chunk index (HDF5's
    ``H5Dchunk_iter``), or None where that walk is not offered or fails (then :func:`_failing_rows` asks chunk by
    chunk, where each failure is one chunk's). Asking HDF5 for one chunk's location by coordinate costs time that
    grows with the chunks (an extensible array of 20,000 one-row chunks: 20 s for all of them, 50,000: 250 s; the
    walk: 26 ms), so a run with one image a chunk (``--checksum``) would verify in time quadratic in its images."""
    found: dict[int, tuple[int, int]] = {}
    try:
        ds.id.chunk_iter(lambda info: found.__setitem__(info.chunk_offset[0], (info.byte_offset, info.size)))
    except (AttributeError, *_READ_ERRORS):  # h5py or HDF5 without chunk_iter; a damaged index
        return None
    return found


def _ids_off_their_digests(digests: h5py.Dataset, ids: np.ndarray | h5py.Dataset, n: int, real_size: int,
                           unread: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[tuple[int, int]], str]:
    """(the rows of the first ``n`` whose id, as read from ``/images/ids`` (``ids``: the rows read, or the dataset,
    read a block at a time but for its ``unread`` [start, stop) rows), does not match its digest in ``digests``; the
    [start, stop) rows whose digests' chunk does not read, a chunk missing from the file or lying past its end on disk
    (``real_size`` bytes) included; why the first did not), read by :func:`_failing_rows` a few thousand rows at a
    time. Rows past the digests' end are the caller's to note."""
    skip = np.zeros(n, dtype=bool)
    for lo, hi in unread:
        skip[lo:hi] = True
    off: list[int] = []

    def compare(lo: int, stored: np.ndarray) -> None:
        edges = np.flatnonzero(np.diff(np.concatenate([[True], skip[lo:lo + len(stored)], [True]]).astype(np.int8)))
        for a, b in edges.reshape(-1, 2):  # the runs of rows whose ids read
            off.extend((lo + a + fmt.mismatched_ids(ids[lo + a:lo + b], stored[a:b])).tolist())

    failing, why = _failing_rows(digests, n, real_size, rows_per_read=4096, each=compare)
    return off, failing, why


def _off_digest_line(off: list[int]) -> str:
    return _rows_line(f"/{fmt.IDS}", [(i, i + 1) for i in off], "their ids do not match their digests "
                      f"in /{fmt.ID_DIGESTS}: changed on disk")


def _rows_line(name: str, failing: list[tuple[int, int]], why: str) -> str:
    one = len(failing) == 1 and failing[0][1] - failing[0][0] == 1
    return f"{name}: {fmt.span_words(failing, limit=5)} {'does' if one else 'do'} not read ({why})"


def _copy_attrs(src: h5py.Group, dst: h5py.Group, what: str, problems: list[str], skip: tuple[str, ...] = (),
                outside: Collection[str] = frozenset()) -> None:
    """Every attribute of ``src`` but ``skip`` onto ``dst``; one that does not read, or is named in ``outside`` (its
    string lies past the file's end: HDF5 would spin reading it, :func:`_attrs_outside`), is noted in ``problems``."""
    try:
        keys = list(src.attrs)
    except _READ_ERRORS as exc:
        problems.append(f"{what}s unreadable ({exc})")
        return
    for key in keys:
        if key in skip:
            continue
        if key in outside:
            problems.append(f"{what} {key} lost: its string lies past the file's end")
            continue
        try:
            dst.attrs[key] = fmt.rewritable(src.attrs[key])
        except _READ_ERRORS:
            problems.append(f"{what} {key} unreadable")


def _static_outside(ds: h5py.Dataset, real_size: int) -> str | None:
    """Why the data of ``ds`` (a static) cannot be copied from a file whose bytes on disk end at ``real_size``: a
    chunk or block of it not in the file, or lying past that end, which HDF5 reads as zeros (it fills a short read;
    a Fletcher-32 chunk of zeros passes its checksum). None where its data lie wholly inside (or in its header)."""
    if not ds.size:
        return None
    layout = ds.id.get_create_plist().get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()
        return _PAST_THE_END if offset is None or offset + ds.id.get_storage_size() > real_size else None
    if layout != h5py.h5d.CHUNKED:  # compact (in the header), virtual
        return None
    chunks = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    expected = int(np.prod([-(-size // rows) for size, rows in zip(ds.shape, ds.chunks)]))
    if len(chunks) < expected or any(c.byte_offset is None or c.byte_offset + c.size > real_size for c in chunks):
        return _PAST_THE_END
    return None


def _copy_statics(src: h5py.File, dst: h5py.File, problems: list[str], outside: Collection[str] = frozenset(),
                  real_size: int | None = None) -> None:
    """:func:`~qkhooks.store.format.copy_statics`, going on past what does not read and naming the datasets lost; an
    attribute named in ``outside`` (its string lies past the file's end, :func:`_attrs_outside`) is never read: it
    is lost and named, its object copied without it, and a dataset whose data are not wholly inside the file's
    ``real_size`` bytes (:func:`_static_outside`) is lost, never copied as the zeros HDF5 reads there."""
    lost: list[str] = []

    def unreadable(name: str, is_dataset: bool, exc: BaseException) -> None:
        problems.append(f"{name} unreadable ({exc})")
        if is_dataset:
            lost.append(name)

    def attr_outside(name: str, key: str) -> None:
        problems.append(f"/{name} attribute {key} lost: its string lies past the file's end")

    try:
        inside = None if real_size is None else (lambda ds: _static_outside(ds, real_size))
        fmt.copy_statics(src, dst, unreadable, _READ_ERRORS, outside, attr_outside, inside)
    except _READ_ERRORS as exc:
        problems.append(f"the file's tree is partly unreadable ({exc})")
        lost.append("(statics past the unreadable part of the tree)")
    if lost:  # named in the copy: its readers, verify and a refused resume say what is gone, not "never recorded"
        dst.attrs[fmt.LOST_STATICS] = json.dumps(sorted(set(fmt.lost_statics(src.attrs)) | set(lost)))


def _copy_states(src: h5py.File, run: Path, out: Path, keep: np.ndarray, n: int, problems: list[str],
                 outside: Collection[str] = frozenset()) -> list[str]:
    torn = sorted(set(outside) & set(fmt.STATE_ATTRS))
    if torn and _readable(lambda: fmt.REDUCERS in src) and fmt.REDUCERS in src:  # never asked of HDF5 (a hang)
        problems.append(f"reducer states lost: their attribute{'s' if len(torn) > 1 else ''} {', '.join(torn)} "
                        f"lie{'' if len(torn) > 1 else 's'} past the file's end, so {out.name} reads without reducer "
                        "states")
        return []
    if fmt.IDENTITY in outside:  # never asked of HDF5 (a hang)
        if fmt.checkpoint_path(run).exists():
            problems.append(f"reducer states left out: the run's {fmt.IDENTITY} attribute, whose run id ties "
                            f"{fmt.checkpoint_path(run).name} to it, lies in a heap block that is cut short or "
                            f"damaged, so {out.name} reads without reducer states")
        return []
    try:
        images, states = fmt.read_states(src, run)
    except _READ_ERRORS as exc:
        problems.append(f"reducer states unreadable ({exc})")
        return []
    if not states:
        return []
    if images is None or images > len(keep) or not np.array_equal(keep[:images], np.arange(images)):
        problems.append(f"the reducer checkpoint counts images that were not recovered; a --resume of {out.name} "
                        "starts again from its first image")
        return []
    if images < n and _readable(lambda: src.attrs["complete"]) and bool(src.attrs["complete"]):
        problems.append(f"the reducer checkpoint is an earlier one of this run (it counts {images} of the complete "
                        f"run's {n} images: resumed or finished under another name), so it is left out; {out.name} "
                        "reads without reducer states")
        return []
    fmt.write_checkpoint(out, images, states, fmt.run_id_of(src))  # tied to the run id the copy keeps
    return sorted(states)


# ------------------------------------------------------------------------------------------ verify
@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_run` read back of a run file. :attr:`ok` says that every part read (and that every chunk of
    a checksummed array passed its checksum), never that the data are intact: without a checksum a flipped bit
    inside an array's data reads back as another value, which no reader can see."""

    path: Path
    images: int | None
    """The committed images whose ids and rows of every per-image array were read (None: the file does not open)."""
    complete: bool
    arrays: list[str]
    """The per-image arrays read, chunk by chunk."""
    checksummed: list[str]
    """Those of :attr:`arrays` that carry a Fletcher-32 checksum: each of their chunks read was checked against it."""
    statics: int
    """How many other datasets (spectra, position terms, the skipped list) were read, each whole."""
    damaged: dict[str, list[tuple[int, int]]]
    """A per-image array (or ``images/ids``) -> the [start, stop) image rows of each chunk of it that does not
    read."""
    states: list[str]
    """The reducers whose saved state loads (``RUN.h5.reducers``, or inside a merged or repaired file)."""
    problems: list[str]
    """Everything that does not read, in words: the damaged arrays' lines first."""
    id_digests: bool = False
    """Whether the run stores its ids' digests (:data:`~qkhooks.store.format.ID_DIGESTS`, ``--checksum``): each id
    read was checked against its digest, and each digest's chunk against its checksum."""
    format: str = ""
    """The run file's format, as ``qkhooks info`` names it (:func:`~qkhooks.store.format.describe_format`): the rules
    the verdict was read by."""
    lost: list[str] = dataclasses.field(default_factory=list)
    """Statics a repair could not copy into this file (:data:`~qkhooks.store.format.LOST_STATICS`): gone, not damage
    in this file, so they do not make it fail; the summary names them."""
    view: bool = False
    """Whether the per-image arrays are views of shard files (a merge without --copy): its images are in the shards,
    which are what ``repair`` or a resume mends (``repair`` refuses a view)."""
    attr_digests: bool = False
    """Whether the run stores its attributes' digests (:data:`~qkhooks.store.format.ATTR_DIGESTS`, ``--checksum``)."""
    attrs_off: list[str] = dataclasses.field(default_factory=list)
    """The attributes (in :attr:`problems` too) that fail those digests: repair cannot restore them."""
    unsealed: list[str] = dataclasses.field(default_factory=list)
    """Attributes the digests do not list under names qkhooks does not read (a user's own, added with h5py): not
    damage, listed as not sealed (:func:`~qkhooks.store.format.unsealed_attrs`)."""
    resumable: list[str] = dataclasses.field(default_factory=list)
    """What an unfinished run's writer left half-written and its resume writes again (the last rows of the skipped
    list, added when the writer was killed): not damage, said with what to do."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """What ``qkhooks info RUN --verify`` prints."""
        fix = (f"run `qkhooks repair {self.path} --out FIXED.h5` to copy every image still readable into a new file "
               f"(it leaves {self.path.name} unchanged)")
        if self.view:
            fix = ("this merge reads its images from the shard files (a view): mend the shard the lines above name "
                   "(finish or resume its recording, or `qkhooks repair SHARD --out FIXED_SHARD.h5`), then merge again "
                   "(`qkhooks merge`, --copy for a self-contained file)")
        if self.images is None:
            return "\n".join([f"verify   {self.path}", f"result   DAMAGED: {self.problems[0]}; {fix}"])
        if self.attrs_off:  # no other copy of an attribute in the file: repair's copy keeps failing it
            again = ("record the run again (--overwrite, or a new --out); if you changed, added or deleted one "
                     "yourself, set it back to how it was recorded")
            fix = (f"attributes that say how the numbers are read changed, and no repair restores one (its copy keeps "
                   f"failing them): {again}" if len(self.attrs_off) == len(self.problems) else
                   f"{fix}; but no repair restores the attributes named above (its copy keeps failing them): {again}")
        unsummed = [a for a in self.arrays if a not in self.checksummed]
        lines = [f"verify   {self.path}", *([f"format   {self.format}"] if self.format else []),
                 f"images   {self.images} committed{'' if self.complete else ' (an incomplete run: those checked)'}: "
                 f"their ids and their rows of {len(self.arrays)} per-image arrays read, chunk by chunk",
                 f"statics  {self.statics} datasets and every attribute read"]
        if self.lost:
            lines.append(f"lost     {', '.join(self.lost)}: a repair could not copy them from the damaged file (their "
                         "values are gone: what needs them is refused, and the run cannot be resumed)")
        if self.arrays:
            lines.append(self._checksum_line(unsummed))
        sealed = ("every attribute checked against its own" if not self.unsealed else
                  f"every attribute qkhooks wrote checked against its own; {len(self.unsealed)} added since, under "
                  "names qkhooks does not read, are not sealed (listed below)")
        lines.append("attrs    " + ("sha256 digests: " + sealed if self.attr_digests
                                    else "no digests (written without --checksum, or before them): a changed attribute "
                                    "cannot be detected unless its JSON stops parsing"))
        lines += [f"unsealed {fmt.attr_words(name)}: not sealed (added after the digests were written; qkhooks reads no "
                  "attribute of that name, so it is accepted and not checked)" for name in self.unsealed]
        lines.append("reducers " + (", ".join(self.states) + " load" if self.states else "no saved state"))
        lines += [f"resume   {p}" for p in self.resumable]
        lines += [f"{'unsure ' if fmt.MAY_BE_TRUE_ZEROS in p else 'damaged'}  {p}" for p in self.problems]
        if self.problems and all(fmt.MAY_BE_TRUE_ZEROS in p for p in self.problems):  # a run before format 4
            lines.append("result   NOT VOUCHED FOR: the chunks named above may be true zero rows or zeroed disk pages "
                         "(their lines say how to tell); every other part read")
        elif self.problems:
            lines.append(f"result   DAMAGED: {fix}")
        elif self.resumable:
            lines.append("result   every committed part read; the part named above is half-written (its line says "
                         "what to do)")
        elif self.arrays and not unsummed:
            lines.append("result   every part read, every chunk passed its checksum" +
                         (" and every id its digest" if self.id_digests else " (the ids carry none)"))
        else:
            lines.append("result   every part read; damage inside data without a checksum would not show")
        return "\n".join(lines)

    def _checksum_line(self, unsummed: list[str]) -> str:
        if not unsummed and self.id_digests:
            return ("checksum Fletcher-32 on every per-image array and on the image ids: every chunk read was checked "
                    "against it, every id against its digest")
        if not unsummed:
            return ("checksum Fletcher-32 on every per-image array, not on the image ids (written before qkhooks stored "
                    "their digests): every chunk read was checked against it; a changed id cannot be detected")
        if self.checksummed:
            return (f"checksum Fletcher-32 on {len(self.checksummed)} of {len(self.arrays)} per-image arrays; none on "
                    f"{', '.join(unsummed[:3])}{' ...' if len(unsummed) > 3 else ''}, whose chunks were only read and "
                    "decompressed: a flipped bit inside their data cannot be detected")
        return ("checksum none: every chunk was read and decompressed, but a flipped bit inside the data reads back as "
                "another value and cannot be detected (record with --checksum)")


def verify_run(run: str | os.PathLike) -> VerifyReport:
    """Read every committed part of ``run`` back, one chunk at a time, and collect what does not read: each per-image
    array's chunks (against their checksum where they carry one) and the ids, the other datasets and every attribute,
    the layout's rows and arrays, and the reducer states a reader would load. Opens as every reader does (a writer's
    open file is not waited on; a run still being written, or killed, is checked up to its committed images) and
    changes nothing. A file that does not open at all is reported, not raised."""
    path = Path(run)
    try:
        reader = RunReader(path, check_attributes=False)  # attributes off their digests are named below
    except (DamagedRunError, HeldOpenError) as exc:
        return VerifyReport(path, None, False, [], [], 0, {}, [], [f"the file does not open ({exc.problem})"])
    with reader, reader._reading():  # a closed run changed during the check (a resume) raises: its answers are stale
        _refuse_newer_format(reader.file, path, "verify")  # its verdict stands on the rules of the file's format
        return _verify(reader, os.path.getsize(path))


def _verify(reader: RunReader, real_size: int) -> VerifyReport:
    f, n, problems = reader.file, reader.n, []
    found = fmt.datasets(f, read_every_attribute=True, unreadable=problems)
    complete = _readable(lambda: f.attrs["complete"]) and bool(f.attrs["complete"])
    arrays: dict[str, h5py.Dataset] = {}
    statics = 0
    resumable: list[str] = []
    for name, ds in found.items():
        try:
            if ds.attrs.get("per_image", False):
                arrays[name] = ds
            elif name == fmt.SKIPPED:
                _, lost, total = fmt.read_skipped_rows(f)
                statics += 1
                if lost:
                    (problems if complete else resumable).append(reader.lost_skipped_rows(lost, total))
            elif name not in (fmt.IDS, fmt.ID_DIGESTS):
                ds[()]  # a spectrum, a position term, the skipped list: small, read whole
                statics += 1
        except _READ_ERRORS as exc:
            problems.append(f"/{name} unreadable ({exc})")
    try:  # a group in the skipped list's place: the walk above lists datasets only
        if fmt.SKIPPED in f and fmt.SKIPPED not in found:
            fmt.read_skipped_rows(f)
    except _READ_ERRORS as exc:
        problems.append(f"/{fmt.SKIPPED} unreadable ({exc})")
    lost = fmt.lost_statics(f.attrs)
    try:  # the JSON attributes every reader parses (they carry no checksum): one that no longer parses is damage
        for key in ("config", fmt.IDENTITY, "image_config"):  # identity: the run id that ties its checkpoint to it
            if key in f.attrs:
                json.loads(fmt.as_str(f.attrs[key]))
        model = f.get("model")
        info = json.loads(fmt.as_str(model.attrs["info"])) if model is not None and "info" in model.attrs else {}
        gap = fmt.geometry_gap(info, info.get("layers", []))
        if gap is not None:
            problems.append(gap)
    except json.JSONDecodeError as exc:
        problems.append(f"an attribute's JSON does not parse ({exc})")
    except _READ_ERRORS as exc:
        problems.append(f"the run's attributes unreadable ({exc})")
    problems += reader._shared.attrs_off  # attributes that no longer match their digests (runs with --checksum)
    damaged: dict[str, list[tuple[int, int]]] = {}
    lines = []
    for name, ds in sorted(arrays.items()) + ([(fmt.IDS, found[fmt.IDS])] if fmt.IDS in found else []):
        failing, why = _failing_rows(ds, n, real_size, decode=fmt.ID_DIGESTS not in found)
        gone = missing_shard_rows(ds, reader.path.parent, n)
        changed = [(lo, hi) for _, lo, hi in rewritten_shards(ds, reader.path.parent, n)]
        held = held_shards(ds, reader.path.parent, n) if failing else []
        if held:  # not damage: HDF5 opens a shard open for writing for no one through a view
            why = (f"their shard(s) {', '.join(h[0] for h in held)} are open for writing (a writer runs, or was "
                   "killed before closing them), which a merged view cannot read: let it finish or resume that shard, "
                   "or merge again with --copy")
        if failing or gone or changed:
            damaged[name] = sorted(failing + gone + changed)
            lines.append(_rows_line(ds.name, damaged[name], why or ("their shard file is missing: this merged view "
                                    "reads them as NaN or -1" if gone else "their shard file holds another run than "
                                    "the one merged (rewritten since): merge again")))
    if fmt.ID_DIGESTS in found and fmt.IDS in found:
        ids = found[fmt.IDS]
        off, failing, why = _ids_off_their_digests(found[fmt.ID_DIGESTS], ids, min(n, ids.shape[0]), real_size,
                                                   damaged.get(fmt.IDS, []))
        if failing:
            damaged[fmt.ID_DIGESTS] = failing
            lines.append(_rows_line(f"/{fmt.ID_DIGESTS}", failing, why))
        if off:
            damaged[fmt.IDS] = sorted(damaged.get(fmt.IDS, []) + [(i, i + 1) for i in off])
            lines.append(_off_digest_line(off))
    try:
        problems += [f"the layout: {p}" for p in fmt.layout_problems(f, arrays, n)]
    except _READ_ERRORS as exc:
        problems.append(f"the layout's rows and arrays unreadable ({exc})")
    states: list[str] = []
    try:
        images, loaded, problem = fmt.states_and_problem(f, reader.path)
        states = sorted(loaded)
        if problem is not None:
            problems.append(reader._damaged_checkpoint(problem))
        elif (mismatch := reader._checkpoint_mismatch(images)) is not None:
            problems.append(mismatch)
        elif not loaded and reader._other_runs_checkpoint(fmt.checkpoint_path(reader.path)) is not None:
            # a checkpoint beside it that names another run id (copied from another run, or this file's run_id
            # damaged: attributes carry no checksum): the states the run kept do not load, which is not "intact"
            if notice := reader._missing_states({}):
                problems.append(notice)
    except _READ_ERRORS as exc:
        problems.append(f"the reducer states inside the file unreadable ({exc})")
    checksummed = sorted(name for name, ds in arrays.items() if ds.fletcher32)
    return VerifyReport(reader.path, n, complete, sorted(arrays), checksummed, statics, damaged, states,
                        lines + problems, fmt.ID_DIGESTS in found, _format_line(f), lost,
                        any(ds.is_virtual for ds in arrays.values()), fmt.ATTR_DIGESTS in f.attrs,
                        list(reader._shared.attrs_off), _unsealed(f), resumable)


def _unsealed(f: h5py.File) -> list[str]:
    try:
        return fmt.unsealed_attrs(f)
    except _READ_ERRORS:  # the attributes' damage is reported above
        return []
