"""Low-level HDF5 helpers: reopen a file a killed writer left marked "open", and pick a codec.

A file written in SWMR mode stays consistent on disk however its writer dies (that is what SWMR's ordered
metadata flushes guarantee), but the superblock keeps the writer's "open for write" flags, so HDF5 refuses
to open it for writing again until they are cleared (the job of the ``h5clear`` tool, which h5py does not
ship). :func:`clear_open_flags` does the same: it zeroes the flags byte of a version 2/3 superblock and
rewrites the superblock's Jenkins lookup3 checksum.
"""

from __future__ import annotations

import fcntl
import os
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
    """True when a live process holds HDF5's write lock on ``path`` (so the file must not be touched)."""
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
        head = fh.read(8 + 4 + 4 * 8 + 4)
        if head[:8] != _SIGNATURE:
            raise QKHooksError(f"{path} is not an HDF5 file (no superblock at offset 0).")
        version, size_of_offsets = head[8], head[9]
        if version < 2:
            return False  # v0/v1 superblocks carry no open flags
        end = 12 + 4 * size_of_offsets
        fh.seek(0)
        block = bytearray(fh.read(end + 4))
        if int.from_bytes(block[end:end + 4], "little") != lookup3(bytes(block[:end])):
            raise QKHooksError(f"{path}: the superblock checksum is wrong; the file is damaged beyond a resume.")
        if block[11] == 0:
            return False
        block[11] = 0
        block[end:end + 4] = lookup3(bytes(block[:end])).to_bytes(4, "little")
        fh.seek(0)
        fh.write(bytes(block))
        fh.flush()
        os.fsync(fh.fileno())
    return True


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
