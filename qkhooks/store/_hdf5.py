"""Low-level HDF5 helpers: reopen a file a killed writer left marked "open", and pick a codec.

A file written in SWMR mode stays consistent on disk however its writer dies (that is what SWMR's ordered
metadata flushes guarantee), but the superblock keeps the writer's "open for write" flags, so HDF5 refuses
to open it for writing again until they are cleared (the job of the ``h5clear`` tool, which h5py does not
ship). :func:`clear_open_flags` does the same: it zeroes the flags byte of a version 2/3 superblock and
rewrites the superblock's Jenkins lookup3 checksum.

A writer killed during one of its brief structural changes (outside SWMR mode) leaves flags that stop even
SWMR readers; :func:`open_swmr_reader` tells that case (no process holds the file's lock) from a live writer
mid-change (it waits) and opens the file as of its last flush, through a read-only view whose superblock
reads as closed (:class:`FlagsClearedView`), so readers never write to a run file. If the kill fell inside a
flush, objects created in that change may be half-written: :func:`walk` skips and lists them, and
:func:`salvage` (run by a resume) rewrites the file without them, since HDF5 cannot unlink them in place.
"""

from __future__ import annotations

import fcntl
import io
import os
import time
import warnings
from pathlib import Path

import h5py

from qkhooks.errors import QKHooksError

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' ``hashlittle`` (lookup3), the checksum HDF5 uses for its metadata."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    i = 0
    while length > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 4); c = (c + b) & _MASK
        b = (b - a) & _MASK; b ^= _rot(a, 6); a = (a + c) & _MASK
        c = (c - b) & _MASK; c ^= _rot(b, 8); b = (b + a) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 16); c = (c + b) & _MASK
        b = (b - a) & _MASK; b ^= _rot(a, 19); a = (a + c) & _MASK
        c = (c - b) & _MASK; c ^= _rot(b, 4); b = (b + a) & _MASK
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i:i + length] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    c ^= b; c = (c - _rot(b, 14)) & _MASK
    a ^= c; a = (a - _rot(c, 11)) & _MASK
    b ^= a; b = (b - _rot(a, 25)) & _MASK
    c ^= b; c = (c - _rot(b, 16)) & _MASK
    a ^= c; a = (a - _rot(c, 4)) & _MASK
    b ^= a; b = (b - _rot(a, 14)) & _MASK
    c ^= b; c = (c - _rot(b, 24)) & _MASK
    return c


def held_by_writer(path: str | os.PathLike) -> bool:
    """True when a live process holds HDF5's write lock on ``path`` (so the file must not be touched).

    On Linux this reads ``/proc/locks`` rather than trying a lock: even a brief shared lock taken to probe
    would make a live writer's own (non-blocking) relock fail as it leaves SWMR mode for a layout change.
    """
    try:
        with open("/proc/locks") as locks:
            table = locks.read()
    except OSError:
        table = None
    if table is not None:
        inode = str(os.stat(path).st_ino)
        # "1: FLOCK  ADVISORY  WRITE 3974 fe:00:2146314 0 EOF": the inode ends the MAJ:MIN:INODE field (matched
        # on the inode alone, as overlay file systems may report another device; a false match only waits)
        return any(field.count(":") == 2 and field.rsplit(":", 1)[1] == inode
                   for line in table.splitlines() for field in line.split())
    with open(path, "rb") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def clear_open_flags(path: str | os.PathLike) -> bool:
    """Clear the "open for (SWMR) write" flags a dead writer left in the superblock; True if any were set."""
    path = Path(path)
    if held_by_writer(path):
        raise QKHooksError(f"{path} is being written by another running process; wait for it or stop it first.")
    with open(path, "r+b") as fh:
        block = _superblock(fh, path)
        if block is None or block[11] == 0:
            return False
        fh.seek(0)
        fh.write(_with_flags(block, 0))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _superblock(fh: io.RawIOBase | io.BufferedIOBase, path: Path) -> bytearray | None:
    """The checksummed bytes of a version 2/3 superblock, checksum included (None for v0/v1: no open flags)."""
    fh.seek(0)
    head = fh.read(12)
    if head[:8] != _SIGNATURE:
        raise QKHooksError(f"{path} is not an HDF5 file (no superblock at offset 0).")
    version, size_of_offsets = head[8], head[9]
    if version < 2:
        return None
    end = 12 + 4 * size_of_offsets
    fh.seek(0)
    block = bytearray(fh.read(end + 4))
    if int.from_bytes(block[end:], "little") != lookup3(bytes(block[:end])):
        raise QKHooksError(f"{path}: the superblock checksum is wrong; the file is damaged beyond a resume.")
    return block


def _with_flags(block: bytearray, flags: int) -> bytes:
    """``block`` (from :func:`_superblock`) with its flags byte set to ``flags`` and its checksum redone."""
    block = bytearray(block)
    block[11] = flags
    block[-4:] = lookup3(bytes(block[:-4])).to_bytes(4, "little")
    return bytes(block)


class FlagsClearedView(io.RawIOBase):
    """A read-only file object over an HDF5 file whose superblock reads as closed (open flags cleared).

    HDF5 opens a dead writer's file through it (h5py's file-object driver) while the file on disk stays as
    found: no reader ever writes to a run file, so two readers cannot race over the flags, and a file the
    reader may not write can still be read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = open(self.path, "rb", buffering=0)
        try:
            block = _superblock(self._fh, self.path)
        except BaseException:
            self._fh.close()
            raise
        self._patch = b"" if block is None else _with_flags(block, 0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        at = self._fh.tell()
        n = self._fh.readinto(buffer)
        if n and at < len(self._patch):
            stop = min(n, len(self._patch) - at)
            memoryview(buffer).cast("B")[:stop] = self._patch[at:at + stop]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()

    def __repr__(self) -> str:  # h5py gives it as the File's ``filename``, which error messages quote
        return str(self.path)


def open_dead_writers_file(path: str | os.PathLike) -> h5py.File:
    """Open, read-only, a file whose writer died outside SWMR mode, as of that writer's last flush."""
    view = FlagsClearedView(path)
    try:
        return h5py.File(view, "r")
    except OSError as exc:
        view.close()
        raise QKHooksError(f"{path} was damaged when its writer died ({exc}); record it again with "
                           "--overwrite.") from None


_OPEN_FLAG_ERRORS = ("already open for write", "not already open for SWMR writing")
_DEAD_AFTER_S = 0.1  # how long "marked open, nobody holds the lock" must last to mean the writer died


def open_swmr_reader(path: str | os.PathLike, wait_s: float = 5.0, warn: bool = True) -> h5py.File:
    """Open ``path`` for SWMR reading without HDF5's lock, whatever state its writer left it in.

    No lock: a reader's shared lock would stop the writer from leaving SWMR mode for its structural changes.
    A live writer outside SWMR mode holds the lock for milliseconds, so this retries for up to ``wait_s``;
    flags with no lock holder mean the writer died: the file is opened as of its writer's last flush, with
    a warning, and left unchanged. Raises :class:`QKHooksError` when the file stays unreadable.
    """
    path = Path(path)
    start = time.monotonic()
    unlocked_since: float | None = None
    while True:
        try:
            return _open_swmr(path)
        except OSError as exc:
            if not any(text in str(exc) for text in _OPEN_FLAG_ERRORS):
                raise QKHooksError(f"cannot open {path} as a run file: {exc}") from None
        now = time.monotonic()
        if held_by_writer(path):
            unlocked_since = None
            if now - start > wait_s:
                raise QKHooksError(f"{path} stayed locked by its writer for {wait_s:g} s while it restructures "
                                   "the file; try again in a moment.")
        else:
            # Flags with no lock: a dead writer, or a live one caught between the failed open and the lock check
            # as it re-entered SWMR mode (no lock, readable again). Only a state that lasts is a dead writer.
            unlocked_since = now if unlocked_since is None else unlocked_since
            if now - unlocked_since >= _DEAD_AFTER_S:
                break
        time.sleep(0.01)
    # Not SWMR: nobody writes any more, and SWMR reads of a half-written object retry without end. The file
    # stays byte for byte as found, still saying that its writer died, so every later reader comes this way
    # too until a resume repairs it.
    f = open_dead_writers_file(path)
    if warn:
        damaged = walk(f)[1]
        lost = f" The objects it was creating are half-written and skipped: {', '.join(damaged)}; a --resume " \
               "rewrites the file without them." if damaged else ""
        warnings.warn(f"{path}: its writer died while changing the file's layout; reading it as of its last "
                      f"flush.{lost}", stacklevel=3)
    return f


_HDF5_ERRORS = (KeyError, OSError, RuntimeError, ValueError)


def walk(f: h5py.File) -> tuple[dict[str, h5py.Group | h5py.Dataset], list[str]]:
    """Every object of ``f`` that opens, by path (``visititems`` names, parents first), and the paths that do not.

    Unlike ``visititems``, one object half-written by a writer that died does not hide the rest.
    """
    found: dict[str, h5py.Group | h5py.Dataset] = {}
    damaged: list[str] = []

    def visit(group: h5py.Group, prefix: str) -> None:
        try:
            keys = list(group.keys())
        except _HDF5_ERRORS:
            damaged.append(prefix.rstrip("/") or "/")
            return
        for key in keys:
            name = prefix + key
            try:
                obj = group[key]
                dict(obj.attrs)  # attributes live in the object header too
            except _HDF5_ERRORS:
                damaged.append(name)
                continue
            found[name] = obj
            if isinstance(obj, h5py.Group):
                visit(obj, name + "/")

    visit(f, "")
    return found, damaged


def per_image_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """The per-image arrays of a run file (datasets marked ``per_image``), by schema name."""
    return {name: obj for name, obj in walk(f)[0].items()
            if isinstance(obj, h5py.Dataset) and obj.attrs.get("per_image", False)}


def salvage(path: str | os.PathLike, damaged: list[str]) -> None:
    """Rewrite ``path`` without the ``damaged`` objects a dying writer left half-written (a full copy)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".salvaging")
    skip = set(damaged)
    try:
        with open_dead_writers_file(path) as src, h5py.File(tmp, "w", libver="latest") as dst:
            def copy(group: h5py.Group, into: h5py.Group, prefix: str) -> None:
                for key, value in group.attrs.items():
                    into.attrs[key] = value
                for key in group.keys():
                    name = prefix + key
                    if name in skip:
                        continue
                    if any(bad.startswith(name + "/") for bad in skip):
                        copy(group[key], into.create_group(key), name + "/")
                    else:
                        group.copy(group[key], into, name=key)

            copy(src, dst, "")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_swmr(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", swmr=True, locking=False)
    except OSError as exc:
        if "locking flag" not in str(exc):
            raise
        return h5py.File(path, "r", swmr=True)  # this process writes the file too: HDF5 wants the writer's flags


def committed(f: h5py.File) -> int | None:
    """The committed image count of an open run file, or None when ``f`` is not a qkhooks run.

    Read from ``/images/ids``'s copy of the count: an SWMR reader that stays open sees a dataset's
    attributes change after ``Dataset.refresh()``, while a group's attributes stay as first read.
    """
    ds = f.get("images/ids")
    if not isinstance(ds, h5py.Dataset):
        return None
    for holder in (ds, f["images"]):
        if "committed" in holder.attrs:
            return int(holder.attrs["committed"])
    return None


def set_committed(f: h5py.File, n: int) -> None:
    """Record ``n`` committed images: on ``/images`` (the documented place) and on ``/images/ids``."""
    f["images"].attrs["committed"] = n
    f["images/ids"].attrs["committed"] = n
