"""``qkhooks repair``: copy what is still readable of a damaged run file into a new run file.

The damaged file is only read (through a view that clears its open flags, rebuilds a zeroed superblock and
reads a truncated tail as zeros), never changed. An image is copied when its id and its rows of every per-image
array read back (with a checksum, ``--checksum``: that they pass it) and lie wholly inside the file as it is on disk
(zeros read past a truncation are not data) and lie inside every array (one cut shorter than ``committed`` loses
its missing rows). The copy keeps the arrays' compression and checksum, and the attributes of the root and of
``/images`` (a shard's block start) but the image count and the list of arrays, which are the new file's own.
Statics and the reducer checkpoint are copied when they read; the checkpoint only when every image it counts
was recovered, so ``--resume`` on the new file continues correctly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from qkhooks.errors import QKHooksError
from qkhooks.store import format as fmt
from qkhooks.store._hdf5 import open_damaged

__all__ = ["repair", "RepairReport"]

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
    if out.exists() or out.resolve() == run.resolve():
        raise QKHooksError(f"{out} already exists; repair writes a new file and never replaces one.")
    try:
        src = open_damaged(run)
    except _READ_ERRORS as exc:
        raise QKHooksError(f"nothing of {run} can be read ({exc}); no image can be recovered.") from None
    tmp = out.with_name(out.name + ".creating")
    try:
        with src, h5py.File(tmp, "w", libver="latest") as dst:
            report = _copy(src, dst, run, out, os.path.getsize(run))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report


def _copy(src: h5py.File, dst: h5py.File, run: Path, out: Path, real_size: int) -> RepairReport:
    problems: list[str] = []
    n = fmt.committed(src) if _readable(lambda: src[fmt.IDS]) else None
    if n is None:
        raise QKHooksError(f"{run} has no readable /images/ids with a committed count; no image can be recovered.")
    _copy_attrs(src, dst, "root attribute", problems)
    ids = np.array([""] * n, dtype=object)
    good = np.zeros(n, dtype=bool)
    try:
        found = fmt.read_ids(src, n)  # fewer than n where the ids were cut: the rest are lost
        ids[:len(found)] = found
        good[:] = ids != ""
        if len(found) < n:
            problems.append(_past_the_end(f"/{fmt.IDS}", len(found), n))
    except _READ_ERRORS as exc:
        problems.append(f"image ids unreadable ({exc})")
    try:
        arrays = fmt.per_image_datasets(src)
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
    _copy_attrs(src["images"], images, "/images attribute", problems, skip=("committed", fmt.ARRAYS_ATTR))
    images.create_dataset("ids", data=ids[keep].astype(object), maxshape=(None,), chunks=(1024,),
                          dtype=h5py.string_dtype())
    fmt.set_committed(dst, len(keep))
    lost = np.flatnonzero(~good).tolist()
    skipped = [(str(ids[i]) or f"row {i}", "unreadable in the damaged run file") for i in lost]
    if _readable(lambda: src[fmt.SKIPPED][()]):
        skipped = fmt.read_skipped(src) + skipped
    images.create_dataset("skipped", data=np.array(skipped, dtype=object).reshape(-1, 2), maxshape=(None, 2),
                          chunks=(64, 2), dtype=h5py.string_dtype())
    for name, ds in arrays.items():
        rest = ds.shape[1:]
        copy = dst.create_dataset(name, shape=(len(keep),) + rest, maxshape=(None,) + rest, dtype=ds.dtype,
                                  chunks=ds.chunks, compression=ds.compression, fletcher32=ds.fletcher32)
        for start in range(0, len(keep), 256):
            rows = keep[start:start + 256]
            copy[start:start + len(rows)] = ds[rows] if len(rows) else ds[:0]
        copy.attrs["per_image"] = True
    images.attrs[fmt.ARRAYS_ATTR] = json.dumps(sorted(arrays))
    _copy_statics(src, dst, problems)
    dst.attrs["complete"] = bool(src.attrs.get("complete", False)) and len(keep) == n
    states = _copy_states(src, run, out, keep, n, problems)
    return RepairReport(run, out, n, [str(ids[i]) for i in keep], lost, sorted(arrays), states, problems)


def _readable(read: Any) -> bool:
    try:
        read()
        return True
    except _READ_ERRORS:
        return False


def _past_the_end(name: str, rows: int, n: int) -> str:
    """The note for a dataset cut shorter than the committed count (its missing rows are lost images)."""
    return f"{name}: rows {rows}-{n - 1} are past its end (it has {rows} rows, {n} images are committed)"


def _readable_rows(ds: h5py.Dataset, n: int, real_size: int, problems: list[str]) -> np.ndarray:
    """Rows of ``ds`` that read back (a chunk whose checksum fails does not) from chunks lying wholly inside the file
    on disk; the chunks that do not are noted in ``problems``, one line for the array, and rows past the array's end
    (an array cut shorter than ``committed``) in another."""
    ok = np.zeros(n, dtype=bool)
    rows = min(n, ds.shape[0])
    if rows < n:
        problems.append(_past_the_end(ds.name, rows, n))
    step = ds.chunks[0] if ds.chunks else rows
    lost: list[str] = []
    why = ""
    for lo in range(0, rows, max(1, step)):
        hi = min(lo + step, rows)
        try:
            if ds.chunks:
                info = ds.id.get_chunk_info_by_coord((lo,) + (0,) * (ds.ndim - 1))
                if info.byte_offset is None or info.byte_offset + info.size > real_size:
                    lost.append(f"{lo}-{hi - 1}")
                    why = why or "a chunk missing from the file or lying past its end"
                    continue
            ds[lo:hi]
        except _READ_ERRORS as exc:
            lost.append(f"{lo}-{hi - 1}")
            why = why or f"{exc}" + ("; the array carries a Fletcher-32 checksum" if ds.fletcher32 else "")
            continue
        ok[lo:hi] = True
    if lost:
        problems.append(f"{ds.name}: rows {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''} do not read "
                        f"({why})")
    return ok


def _copy_attrs(src: h5py.Group, dst: h5py.Group, what: str, problems: list[str], skip: tuple[str, ...] = ()) -> None:
    """Every attribute of ``src`` but ``skip`` onto ``dst``; one that does not read is noted in ``problems``."""
    try:
        keys = list(src.attrs)
    except _READ_ERRORS as exc:
        problems.append(f"{what}s unreadable ({exc})")
        return
    for key in keys:
        if key in skip:
            continue
        try:
            dst.attrs[key] = src.attrs[key]
        except _READ_ERRORS:
            problems.append(f"{what} {key} unreadable")


def _copy_statics(src: h5py.File, dst: h5py.File, problems: list[str]) -> None:
    """Groups' attributes and datasets that are not per-image, not image lists and not reducer states."""

    def visit(name: str, obj: Any) -> None:
        if name.split("/", 1)[0] in ("images", fmt.REDUCERS):
            return
        try:
            if isinstance(obj, h5py.Group):
                group = dst.require_group(name)
                for k, v in obj.attrs.items():
                    group.attrs[k] = v
            elif not obj.attrs.get("per_image", False):
                dst.create_dataset(name, data=obj[()], dtype=obj.dtype)
        except _READ_ERRORS as exc:
            problems.append(f"{name} unreadable ({exc})")

    try:
        src.visititems(visit)
    except _READ_ERRORS as exc:
        problems.append(f"the file's tree is partly unreadable ({exc})")


def _copy_states(src: h5py.File, run: Path, out: Path, keep: np.ndarray, n: int, problems: list[str]) -> list[str]:
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
    fmt.write_checkpoint(out, images, states)
    return sorted(states)
