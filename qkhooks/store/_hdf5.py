"""Low-level HDF5 helpers: open a run file for reading in bounded time, reopen a dead writer's file for writing,
and read a damaged one for repair.

A file written in SWMR mode stays consistent on disk however its writer dies, but its superblock keeps the
writer's "open for write" flags, so HDF5 refuses to open it for writing again until they are cleared (the
job of the ``h5clear`` tool, which h5py does not ship): :func:`clear_open_flags` zeroes the flags byte of the
version 2/3 superblock and redoes its Jenkins lookup3 checksum. Only the writer, holding the run's lock,
calls it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import math
import mmap
import os
import time
import warnings
import weakref
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import h5py
import numpy as np

from qkhooks.errors import QKHooksError
from qkhooks.store.format import FORMAT, FORMAT_ATTR, attr_words, committed

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF
_WRITE_FLAG, _SWMR_WRITE_FLAG = 0x01, 0x04  # the superblock's "open for write" and "open for SWMR write" flags
READ_DEADLINE_S = 3.0
"""How long a reader retries a run file that does not open (or changes while it opens) before it gives up."""
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.01, 0.25
"""The pause between two tries of a file that a writer may be laying out, resuming or replacing: it doubles from
the first to the longest, so a writer in mid-step is met within milliseconds and a reader never spins a core."""
_clock, _sleep = time.monotonic, time.sleep  # module names, so a test can run a deadline on a fake clock


class Backoff:
    """Tries until a deadline with a growing pause between them: ``while ...: if not backoff.wait(): give up``."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self._start = _clock()
        self._pause = FIRST_PAUSE_S

    def remaining(self) -> float:
        return max(0.0, self.deadline_s - (_clock() - self._start))

    def wait(self) -> bool:
        """Pause before the next try; False (no pause) once the deadline has passed."""
        left = self.remaining()
        if left <= 0:
            return False
        _sleep(min(self._pause, left))
        self._pause = min(2 * self._pause, LONGEST_PAUSE_S)
        return True


class HeldOpenError(QKHooksError):
    """A run file that another program (not a qkhooks writer) has open for writing, or had and died: HDF5 opens it
    for nobody else. Not damage: nothing in the file needs repair. :attr:`problem` says which of the two."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"cannot open {path}: {problem}")
        self.problem = problem


class DamagedRunError(QKHooksError):
    """A run file that does not open: :attr:`problem` says what is wrong (the message adds how to recover it)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(damaged_message(path, problem))
        self.problem = problem


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


class Superblock:
    """The version 2/3 superblock qkhooks writes (``libver="latest"``): flags, stored end of file, checksum."""

    def __init__(self, head: bytes):
        self.ok_signature = head[:8] == _SIGNATURE
        self.version = head[8] if len(head) > 8 else 0
        self.offsets = head[9] if len(head) > 9 else 8
        self.size = 12 + 4 * self.offsets + 4
        self.block = bytearray(head[:self.size])
        self.ok_checksum = (self.ok_signature and self.version >= 2 and len(self.block) == self.size and
                            int.from_bytes(self.block[-4:], "little") == lookup3(bytes(self.block[:-4])))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Superblock":
        with open(path, "rb") as fh:
            return cls(fh.read(64))

    @property
    def flags(self) -> int:
        return self.block[11] if self.ok_checksum else 0

    @property
    def end_of_file(self) -> int:
        at = 12 + 2 * self.offsets
        return int.from_bytes(self.block[at:at + self.offsets], "little")

    def with_flags(self, flags: int) -> bytes:
        block = bytearray(self.block)
        block[11] = flags
        block[-4:] = lookup3(bytes(block[:-4])).to_bytes(4, "little")
        return bytes(block)

    @staticmethod
    def rebuilt(size: int) -> bytes:
        """The superblock h5py writes for a ``libver="latest"`` file (root group right after it, no
        extension), for a file of ``size`` bytes: what a zeroed superblock most likely was."""
        block = bytearray(_SIGNATURE + bytes([3, 8, 8, 0]))
        block += (0).to_bytes(8, "little") + b"\xff" * 8 + size.to_bytes(8, "little") + (48).to_bytes(8, "little")
        return bytes(block + lookup3(bytes(block)).to_bytes(4, "little"))


def heap_reference_layout(run: str | os.PathLike) -> tuple[np.dtype, int] | None:
    """How a variable-length string's reference to the global heap is laid out in ``run`` (a 4-byte length, the
    collection's address, a 4-byte index), with the file's size of lengths (a collection header's size field), where
    its superblock is of the layout qkhooks writes (version 2 or more, 4- or 8-byte offsets and lengths); else None."""
    block = Superblock.read(run)
    offsets, lengths = block.offsets, block.block[10] if len(block.block) > 10 else 0
    if block.version < 2 or offsets not in (4, 8) or lengths not in (4, 8):
        return None
    return np.dtype([("length", "<u4"), ("address", f"<u{offsets}"), ("index", "<u4")]), lengths


HEAP_ZEROS = ("a heap block of the file with a stretch of zeros inside (a zeroed disk page), where HDF5 would walk its "
              "objects without end")
HEAP_OVERRUN = "a heap block of the file whose objects run past its end, which HDF5 refuses to read"
HEAP_NO_HEADER = "a heap block of the file whose header is damaged (or the reference to it), which HDF5 refuses to read"
HEAP_CUT = ("a heap block of the file that runs past its end (cut short, or the block's size damaged): HDF5 would read "
            "the missing bytes as zeros and walk them without end, or refuse it")
HEAP_REFERENCES_CUT = "a chunk of the file that lies past its end (cut short)"
"""What a string lies in that is never asked of HDF5 (:func:`unreadable_strings`), true to what HDF5 does with it:
it spins on a collection it walks without end, and raises on one whose header or objects do not parse (h5py 3.16,
HDF5 2.0: "bad global heap collection signature", "ran off end of input buffer while decoding")."""


def heap_walk_problem(collection: bytes, lengths: int) -> str | None:
    """Why HDF5's walk over the objects of a global heap collection (its bytes, header included) would not end at the
    collection's end (:data:`HEAP_ZEROS`, :data:`HEAP_OVERRUN`), or None. HDF5 steps from each object to the next by
    the object's size and never checks the step: an object of index 0 (free space) and size 0, which a zeroed disk
    page inside the collection leaves, keeps it in place for ever (round 50: open_run, verify and repair of a run with
    such a page never returned); a step past the end fails HDF5's check after the walk. Each object: a 2-byte index,
    2-byte count, 4 reserved bytes, its size, then its data padded to 8 bytes (free space: its size counts all of it)."""
    head = -(-(8 + lengths) // 8) * 8
    at, end = head, len(collection)
    while at < end:
        if at + 8 + lengths > end:  # too small for an object: HDF5 takes it as free space
            return None
        index = int.from_bytes(collection[at:at + 2], "little")
        size = int.from_bytes(collection[at + 8:at + 8 + lengths], "little")
        step = 8 + lengths + -(-size // 8) * 8 if index else size
        if step <= 0:
            return HEAP_ZEROS
        at += step
    return None if at == end else HEAP_OVERRUN


def heap_walk_ends(collection: bytes, lengths: int) -> bool:
    """Whether HDF5's walk over a collection's objects ends at its end (:func:`heap_walk_problem`)."""
    return heap_walk_problem(collection, lengths) is None


def heap_collection_problems(fh: BinaryIO, lengths: int, real_size: int) -> Callable[[int], str | None]:
    """Why HDF5 cannot read the global heap collection at an address, or None: its header ("GCOL", version, 3
    reserved bytes, its size) is not a collection's (:data:`HEAP_NO_HEADER`), it does not lie wholly in the file
    (``real_size`` bytes; :data:`HEAP_CUT`: HDF5 spins without end on one a cut tore, round 44), or its objects do not
    walk to its end (:func:`heap_walk_problem`). Read off its bytes in ``fh``, never through HDF5's heap; memoised."""
    problems: dict[int, str | None] = {}

    def check(address: int) -> str | None:
        if address not in problems:
            fh.seek(address)
            head = fh.read(8 + lengths)
            size = int.from_bytes(head[8:], "little") if len(head) == 8 + lengths else 0
            if head[:4] == b"GCOL" and size >= 8 + lengths and address + size > real_size:
                problems[address] = HEAP_CUT
            elif head[:4] != b"GCOL" or size < 8 + lengths:  # one wholly past the end reads as zeros: no header
                problems[address] = HEAP_NO_HEADER
            else:
                fh.seek(address)
                problems[address] = heap_walk_problem(fh.read(size), lengths)
        return problems[address]
    return check


def heap_collections_readable(fh: BinaryIO, lengths: int, real_size: int) -> Callable[[int], bool]:
    """Whether HDF5 can read the global heap collection at an address (:func:`heap_collection_problems`)."""
    problem = heap_collection_problems(fh, lengths, real_size)
    return lambda address: problem(address) is None


def unreadable_strings(ds: h5py.Dataset, n: int, run: str | os.PathLike, real_size: int,
                       where: dict[int, tuple[int, int]] | None = None, why: dict[int, str] | None = None) -> set[int]:
    """The rows of the first ``n`` of a variable-length string dataset (the ids, the skipped list) whose string lies
    in a heap collection HDF5 cannot read without end (:func:`heap_collections_readable`: cut short, or with a zeroed
    page inside), or whose chunk is not wholly in the file (``real_size`` bytes): HDF5 is never asked for them. Read
    off the chunks' raw bytes (each element: a 4-byte length, the collection's address, a 4-byte index), placed by
    ``where`` ({first row: (offset, size)}, from one walk of the chunk index) or else asked of HDF5 chunk by chunk.
    ``why``: filled with what each such row's string lies in (:data:`HEAP_CUT`, ...), for the words that name it."""
    layout = heap_reference_layout(run)
    why = {} if why is None else why
    if layout is None or not ds.chunks or not ds.dtype.hasobject or ds.id.get_create_plist().get_nfilters():
        return set()  # not the layout qkhooks writes
    reference, lengths = layout
    rows_per_chunk, width = ds.chunks[0], int(np.prod(ds.chunks[1:], dtype=np.int64))
    rows = min(n, ds.shape[0])
    unreadable: set[int] = set()
    with open(run, "rb") as fh:
        collection_problem = heap_collection_problems(fh, lengths, real_size)
        for first in range(0, rows, rows_per_chunk):
            last = min(first + rows_per_chunk, rows)
            try:
                if where is not None:
                    offset, size = where.get(first, (None, 0))
                else:
                    info = ds.id.get_chunk_info_by_coord((first,) + (0,) * (ds.ndim - 1))
                    offset, size = info.byte_offset, info.size
            except (OSError, KeyError, RuntimeError, ValueError):
                offset, size = None, 0
            if offset is None or offset + size > real_size:
                unreadable.update(range(first, last))  # the references themselves are not in the file (or unplaced)
                why.update(dict.fromkeys(range(first, last), HEAP_REFERENCES_CUT))
                continue
            fh.seek(offset)
            refs = np.frombuffer(fh.read((last - first) * width * reference.itemsize), reference).reshape(-1, width)
            used = refs["address"] > 0  # an empty string is in its collection too (HDF5 reads it); 0: none written
            for address in np.unique(refs["address"][used]).tolist():
                if (problem := collection_problem(address)) is not None:
                    rows = (first + np.flatnonzero((used & (refs["address"] == address)).any(axis=1))).tolist()
                    unreadable.update(rows)
                    why.update(dict.fromkeys(rows, problem))
    return unreadable


def attribute_message(data: bytes | mmap.mmap, at: int, name_size: int) -> tuple[int, int, int] | None:
    """Where the datatype, the dataspace and the data of the attribute message whose name (``name_size`` bytes, its
    ending zero included) starts at ``at`` begin: version 3 (what qkhooks writes: a 9-byte header, nothing padded),
    1 (h5py's default, as in an attribute a user added: an 8-byte header, each part padded to 8 bytes) or 2; None
    where the bytes before the name are no such header."""
    for version, head_size, pad in ((3, 9, 1), (1, 8, 8), (2, 8, 1)):
        head = data[at - head_size:at] if at >= head_size else b""
        if len(head) < head_size or head[0] != version or (version == 3 and head[8] > 1):
            continue
        sizes = [int.from_bytes(head[i:i + 2], "little") for i in (2, 4, 6)]
        type_at = at + -(-sizes[0] // pad) * pad
        space_at = type_at + -(-sizes[1] // pad) * pad
        data_at = space_at + -(-sizes[2] // pad) * pad
        if sizes[0] == name_size and sizes[1] >= 1 and sizes[2] >= 4 and data_at <= len(data):
            return type_at, space_at, data_at
    return None


def dataspace_count(data: bytes | mmap.mmap, at: int, lengths: int) -> int:
    """The element count of the dataspace message at ``at`` (version 1 or 2; 1 where it is neither: the first
    element is still checked)."""
    version, rank = data[at], data[at + 1]
    if version == 2 and data[at + 3] == 2:  # a null dataspace: no data
        return 0
    dims_at = {1: at + 8, 2: at + 4}.get(version)
    raw = data[dims_at:dims_at + rank * lengths] if dims_at is not None else b""
    if len(raw) != rank * lengths or dims_at is None:
        return 1
    return math.prod(int.from_bytes(raw[i:i + lengths], "little") for i in range(0, len(raw), lengths))


_ATTRIBUTE_OBJECTS = ("/", "images", "model")
"""The objects whose attributes a run's readers read as it opens or at once (its settings, its layout, the model's
facts): their strings are checked by :func:`unreadable_attributes` as it opens."""

_ATTRIBUTE, _CONTINUATION = 0x0C, 0x10  # object header message types


def _attribute_messages(fh: BinaryIO, address: int, offsets: int) -> Iterator[tuple[bytes, int]]:
    """(chunk, where its body starts) of each attribute message kept in the version 2 object header at ``address``
    (the format qkhooks writes), its continuation blocks included, read off ``fh``; the chunk's checksum is not checked
    here (:func:`_intact_chunk`: a third of the time of an open's check). Nothing for another header version (a file qkhooks did not write), nor for
    attributes kept densely, in a heap and an index of their own (past an object's compact limit: 8, the root's
    :data:`ROOT_COMPACT_ATTRIBUTES`; a run's groups hold at most 10)."""
    blocks: list[tuple[int, int | None]] = [(address, None)]
    seen, order = set(), 0
    while blocks and len(seen) < 64:
        at, length = blocks.pop()
        if at in seen:
            continue
        seen.add(at)
        fh.seek(at)
        if length is None:  # the header's first chunk: "OHDR", version 2, flags, optional times and limits, its size
            head = fh.read(32)
            if head[:4] != b"OHDR" or len(head) < 32 or head[4] != 2:
                return
            flags = head[5]
            first = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
            width, order = 1 << (flags & 0x03), 2 if flags & 0x04 else 0
            first += width
            fh.seek(at)
            chunk = fh.read(first + int.from_bytes(head[first - width:first], "little") + 4)
        else:  # a continuation block: "OCHK", messages, checksum
            chunk, first = fh.read(length), 4
            if chunk[:4] != b"OCHK":
                continue
        if len(chunk) < first + 4:
            continue
        pos, end = first, len(chunk) - 4
        while pos + 4 + order <= end:  # each message: type, 2-byte size, flags, creation order where tracked
            kind, size, shared = chunk[pos], int.from_bytes(chunk[pos + 1:pos + 3], "little"), chunk[pos + 3] & 0x02
            body = pos + 4 + order
            if body + size > end:
                break
            if kind == _CONTINUATION:
                blocks.append((int.from_bytes(chunk[body:body + offsets], "little"),
                               int.from_bytes(chunk[body + offsets:body + 2 * offsets], "little")))
            elif kind == _ATTRIBUTE and not shared:
                yield chunk, body
            pos = body + size


def _intact_chunk(chunk: bytes) -> bool:
    """Whether an object header chunk (its messages, then its checksum) matches its checksum: HDF5 refuses one that
    does not itself, so what its bytes seem to say is not damage of the heap."""
    return int.from_bytes(chunk[-4:], "little") == lookup3(bytes(chunk[:-4]))


def unreadable_attributes(f: h5py.File, objects: Sequence[str] = _ATTRIBUTE_OBJECTS) -> list[str]:
    """``/OBJECT@NAME`` of each variable-length attribute of ``objects`` with a string in a heap collection HDF5
    cannot read without end (:func:`heap_collections_readable`: cut short, or a zeroed page inside): HDF5 spins on
    any read of it (round 51: ``open_run`` of a ``--checksum`` run, ``run.config`` and ``verify`` of any run never
    returned), so :func:`open_reader` refuses the file instead. Read off the object headers' raw bytes
    (:func:`attribute_message`: its datatype's class, 9 for variable-length, its element count, then each element's
    reference: a 4-byte length, the collection's address, a 4-byte index), never through HDF5's heap. Every open
    runs it: 1.1 ms a run's three objects (round 51, the shared 2-core machine at load 11; 6 ms with each header chunk's
    checksum computed and numpy per attribute, so a chunk's checksum is computed only to confirm a loss)."""
    path = f.filename
    layout = heap_reference_layout(path)
    if layout is None:
        return []  # not the layout qkhooks writes
    reference, lengths = layout
    offsets, step = reference["address"].itemsize, reference.itemsize
    real_size = os.path.getsize(path)
    lost: list[str] = []
    with open(path, "rb") as fh:
        readable = heap_collections_readable(fh, lengths, real_size)
        for name in objects:
            try:
                obj = f[name]
                address = h5py.h5o.get_info(obj.id).addr
            except (OSError, KeyError, RuntimeError, ValueError):
                continue  # not there, or its header does not read: HDF5 says so where it is read
            for chunk, at in _attribute_messages(fh, address, offsets):
                name_at, name_size = at + (9 if chunk[at] == 3 else 8), int.from_bytes(chunk[at + 2:at + 4], "little")
                parts = attribute_message(chunk, name_at, name_size)
                if parts is None or chunk[parts[0]] & 0x0F != 9:  # not a variable-length datatype
                    continue
                count = min(dataspace_count(chunk, parts[1], lengths), (len(chunk) - parts[2]) // step)
                addresses = {int.from_bytes(chunk[i + 4:i + 4 + offsets], "little")
                             for i in range(parts[2], parts[2] + count * step, step)} - {0}
                if not all(readable(a) for a in sorted(addresses)) and _intact_chunk(chunk):
                    lost.append(f"{obj.name}@{chunk[name_at:name_at + name_size - 1].decode(errors='replace')}")
    return lost


def _unreadable_attributes_words(lost: Sequence[str]) -> str:
    """:func:`unreadable_attributes`' answer as the problem a refusal names."""
    words = [attr_words(key) for key in lost]
    listed = f"{', '.join(words[:-1])} and {words[-1]}" if len(words) > 1 else words[0]
    return (f"{listed} lie{'s' if len(words) == 1 else ''} in a heap block of the file that is cut short or damaged "
            f"(HDF5 would read {'it' if len(words) == 1 else 'them'} without end)")


def damage(path: str | os.PathLike) -> str | None:
    """What is visibly wrong with a run file's superblock and length (None: nothing seen)."""
    size = os.path.getsize(path)
    block = Superblock.read(path)
    if not block.ok_signature:
        return "it has no HDF5 superblock at its start (overwritten, zeroed, or not an HDF5 file)"
    if block.version < 2:
        return None
    if not block.ok_checksum:
        return "its superblock checksum is wrong"
    if size < block.end_of_file:
        return f"truncated at {size} of {block.end_of_file} bytes"
    return None


def clear_open_flags(path: str | os.PathLike) -> bool:
    """Clear the "open for (SWMR) write" flags a dead writer left in the superblock; True if any were set.

    Only a writer holding the run's lock may call it (no other process writes the file).
    """
    block = Superblock.read(path)
    if not block.ok_checksum:
        raise QKHooksError(f"{path}: the superblock is damaged; recover it with `qkhooks repair {path} --out FIXED.h5`.")
    if block.flags == 0:
        return False
    with open(path, "r+b") as fh:
        fh.write(block.with_flags(0))
        fh.flush()
        os.fsync(fh.fileno())
    return True


LOCK_REFUSED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})
"""The errnos of an ``flock`` HDF5 could not take: held elsewhere (EAGAIN, EWOULDBLOCK: see
:func:`open_swmr_writer`), no lock daemon (ENOLCK), not supported by the file system (ENOSYS, EOPNOTSUPP)."""


ROOT_COMPACT_ATTRIBUTES = 16
"""How many attributes the root of a run file keeps in its object header, where HDF5 reads them with the header
(HDF5's default is 8, and a run's root has 9 with :data:`~qkhooks.store.format.FORMAT_ATTR`, 10 with
:data:`~qkhooks.store.format.ATTR_DIGESTS` in a ``--checksum`` run; past the limit HDF5
moves every one of them to a heap and an index of their own)."""

META_BLOCK_BYTES = 16 * 1024
"""The metadata block a writer's SWMR session asks HDF5 for (:func:`open_swmr_writer`; file access only: the format is
unchanged, any HDF5 reads the file). HDF5 places an array's chunk index when its first chunk is written; with its
default 2 KiB blocks that went into a new block right after the chunk, in the room a larger chunk (``masks/objects``'
one chunk of many images) had not yet filled, so a cut there took the index and every image with it (16 of 234
cuts of a 24-image run lost 20 images each). A 16 KiB block opened before the first batch holds the indexes (8 KiB
did not). A new run's layout and a repair (:func:`create_run_file`, one session each) keep HDF5's default: with 16 KiB
blocks the unused rest of each block is lost at close (cuts of a merged copy written with 16 KiB blocks lost 915
images where the default lost 303). A merged copy (round 47) writes every object, states included, before the arrays'
rows, in one block sized to hold every array's chunk index (:func:`merged_meta_block_bytes`): with the default blocks
the index of the array copied last still went after its first chunk (a --checksum copy lost an image at 2 of 48
cuts)."""

INDEX_BYTES = 512
"""Room for one per-image array's chunk index as its first chunk places it (an extensible array's header and index
block: about 420 bytes, measured); a run of more arrays than 16 KiB holds gets a larger first block
(:func:`meta_block_bytes`)."""


def meta_block_bytes(arrays: int = 0) -> int:
    """The metadata block for a writer's session over ``arrays`` per-image arrays: :data:`META_BLOCK_BYTES`, or room
    for each array's chunk index (:data:`INDEX_BYTES`) in whole 4 KiB where that is more (a 12-layer run's 40 arrays
    take 15 KiB, a 24-layer one's 76 take 38 KiB)."""
    return max(META_BLOCK_BYTES, -(-arrays * INDEX_BYTES // 4096) * 4096)


INDEX_ENTRY_BYTES = 20
"""Room for one chunk's entry in an extensible array's index (its address, and a filtered chunk's size and filter
mask), measured: 8 bytes a raw chunk, 16 a filtered one, plus each data block's header and checksum."""


def merged_meta_block_bytes(chunks: Sequence[int]) -> int:
    """The metadata block for a merged copy of arrays of ``chunks`` chunks each: its objects (64 KiB) and every
    array's chunk index whole (:data:`INDEX_BYTES`, and an entry for up to twice its chunks: HDF5 makes each index
    data block whole, the last one up to as large as all before it), so the block open when the rows are copied holds
    every index before them. Its unused rest is left empty in the file: the entries are counted for twice the chunks, so
up to about half the block (one array of 100,000 one-image chunks: a 4.8 MiB block, the file 4 MiB larger, its index
0.8 MiB; measured by review)."""
    index = sum(INDEX_BYTES + (2 * n + 32) * INDEX_ENTRY_BYTES for n in chunks)
    return max(META_BLOCK_BYTES, -(-(64 * 1024 + index * 5 // 4) // 4096) * 4096)


def create_run_file(path: str | os.PathLike, chunk_cache_bytes: int | None = None,
                    meta_block: int | None = None) -> h5py.File:
    """A new, empty run file at ``path`` (replacing a file there), stamped with its format
    (:data:`~qkhooks.store.format.FORMAT`): every run file qkhooks writes (a new run's layout, a merge, a repair)
    begins here. Latest file format, no object times (as h5py's own files), room for
    :data:`ROOT_COMPACT_ATTRIBUTES` root attributes in the root's header, and with ``chunk_cache_bytes`` a raw-data
    chunk cache of that many bytes per dataset whose fully written chunks are evicted first (the writer's), and with
    ``meta_block`` metadata blocks of that many bytes (a merged copy's: :func:`merged_meta_block_bytes`)."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)
    fcpl.set_attr_phase_change(ROOT_COMPACT_ATTRIBUTES, ROOT_COMPACT_ATTRIBUTES - 2)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    if chunk_cache_bytes is not None:
        fapl.set_cache(0, 521, chunk_cache_bytes, 1.0)
    if meta_block is not None:
        fapl.set_meta_block_size(meta_block)
    f = h5py.File(h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fapl=fapl, fcpl=fcpl))
    try:
        f.attrs[FORMAT_ATTR] = np.int64(FORMAT)
    except BaseException:  # a full disk, an interrupt: no open handle left behind (the caller removes the file)
        f.close()
        raise
    return f


def open_swmr_writer(path: str | os.PathLike, chunk_cache_bytes: int, meta_block: int = META_BLOCK_BYTES) -> h5py.File:
    """Open an existing run file for writing directly in SWMR mode (no moment in which it is not SWMR), with a
    raw-data chunk cache of ``chunk_cache_bytes`` per dataset whose fully written chunks are evicted first, and
    metadata blocks of ``meta_block`` bytes (:data:`META_BLOCK_BYTES`, :func:`meta_block_bytes`).

    With HDF5's file lock where it can be had (the default flags, which a plain ``h5py.File`` of the same file in
    this process must match), else without: HDF5 drops its ``flock`` once a file is open for SWMR writing, so it
    only covers the open itself, and there it can stand in the way. On NFS, where ``flock`` is emulated with
    byte-range locks, it conflicts with the writer's own OFD lock on the run file (:mod:`qkhooks.store.lock`);
    anywhere, a program holding the file open with HDF5's default locking (``h5py.File(path, "r")`` in a notebook)
    made a resume fail with a raw lock error. One writer per run is what
    :class:`~qkhooks.store.lock.WriterLock` and the superblock's open-for-write flags guarantee.

    The refused lock is told by the OSError's ``errno`` (:data:`LOCK_REFUSED`), which h5py (3.2 on) sets from
    HDF5's innermost error, the failed ``flock`` (its ``errno = 11``): a refused lock is a ``BlockingIOError``. The
    error stack's minor code (``H5E_CANTLOCKFILE``) would say more, but h5py does not expose it; HDF5's wording
    ("unable to lock file") is not relied on. An open that fails otherwise (no such file, damage) is not retried."""
    for locking in (True, False):
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
        fapl.set_meta_block_size(meta_block)
        fapl.set_cache(0, 521, chunk_cache_bytes, 1.0)
        if not locking:
            fapl.set_file_locking(False, True)
        try:
            return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=fapl))
        except OSError as exc:
            if not locking or exc.errno not in LOCK_REFUSED:
                raise
    raise AssertionError("unreachable")


def open_reader(path: str | os.PathLike, deadline_s: float = READ_DEADLINE_S) -> h5py.File:
    """Open a run file read-only, never locking, in at most ``deadline_s`` (plus one open attempt).

    SWMR reading (which retries a metadata read whose checksum fails, for minutes on a damaged file) only
    when the superblock says a writer has the file open; a closed file is read plainly and fails fast.
    A file that stays unopenable is reported with what is wrong and how to recover its images, as is one whose
    settings HDF5 would read without end (:func:`unreadable_attributes`): every reader reads them.
    """
    path = Path(path)
    backoff = Backoff(deadline_s)
    while True:
        problem = damage(path)
        held = None
        if problem is None:
            try:
                f = open_read(path, swmr=being_written(path))
            except OSError as exc:
                problem = f"HDF5 cannot read it: {exc}"
                held = foreign_writer(path)  # not damage: a program that closes it soon is waited for, as below
            else:
                try:
                    lost = unreadable_attributes(f)
                except BaseException:
                    f.close()
                    raise
                if not lost:
                    return f
                f.close()  # a writer may still be writing that heap: tried again until the deadline, as any damage
                problem = _unreadable_attributes_words(lost)
        if not backoff.wait():
            raise HeldOpenError(path, held) if held is not None else DamagedRunError(path, problem)


_SCANNED_BYTES = 1 << 20


def not_hdf5_at_all(path: str | os.PathLike) -> bool:
    """Whether ``path`` is visibly no HDF5 file, not even a damaged one (a text file, a photo): its start is neither
    HDF5's signature nor a piece of it (a file cut short) nor zeroed (a run's lost superblock), and its first MiB
    holds no HDF5 object header (``OHDR``, which a run file holds from its first kilobytes on), so a run whose start
    was overwritten with other bytes is still taken for a damaged run, which ``qkhooks repair`` recovers (review r35
    C). False for an empty file, one that cannot be read now, and anything but a regular file (not opened: a FIFO
    would wait for a writer forever)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SIGNATURE))
            if not any(head) or _SIGNATURE.startswith(head):  # a run, or its start zeroed or cut short: read no more
                return False
            data = head + fh.read(_SCANNED_BYTES - len(head))
    except OSError:
        return False
    return b"OHDR" not in data and _SIGNATURE not in data


def other_program_file(path: str | os.PathLike) -> str | None:
    """What ``path`` holds when it is visibly no qkhooks run, damaged or not (None: a run, a damaged run, an empty
    file, or a file that cannot be read now): not HDF5 at all (:func:`not_hdf5_at_all`), or an HDF5 file with neither
    a run's ``images`` group nor its format attribute (one with either is left to the checks that say what is wrong).
    ``--resume`` called such a file damaged and named ``qkhooks repair``; ``--overwrite`` replaced it (review r35 B)."""
    if os.path.exists(path) and not os.path.isfile(path):  # opening a FIFO would wait for a writer forever
        return "not a regular file (a FIFO, a device or a socket)"
    if not_hdf5_at_all(path):
        return "not HDF5 at all"
    try:
        with h5py.File(path, "r", locking=False) as f:  # a damaged run or a zeroed start: HDF5 cannot open it
            if "images" not in f and FORMAT_ATTR not in f.attrs:
                return "another program's HDF5 file: neither a run's images nor its format number in it"
    except Exception:  # damaged, or being written: the caller's own checks say which
        return None
    return None


def foreign_writer(path: str | os.PathLike) -> str | None:
    """What holds ``path`` open for writing when that is not a qkhooks writer (None: nothing such).

    qkhooks' writers open run files for SWMR writing. A program that opens one with plain h5py (``h5py.File(path,
    "a")``, to add an attribute, say) sets the superblock's plain write flag, and HDF5 then opens the file for no
    one else: readers used to call that damage and point to ``repair``. A live such program holds HDF5's lock on the
    file (``flock``); one that died without closing leaves the flag and no lock."""
    block = Superblock.read(path)
    if block.version < 2 or not block.flags & _WRITE_FLAG or block.flags & _SWMR_WRITE_FLAG:
        return None
    with open(path, "rb") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return ("another program has it open for writing with plain HDF5 (not a qkhooks writer: e.g. a script "
                    "or notebook that opened it with h5py.File(path, 'a') or 'r+'), and HDF5 then opens it for no one "
                    "else. Close the file in that program (f.close()), then read it again; nothing needs repair.")
        except OSError:
            pass  # a file system without flock: say what is certain
        else:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return ("a program that opened it for writing with plain HDF5 (not a qkhooks writer: e.g. h5py.File(path, 'a') "
            "in a script or notebook) left its \"open for write\" flag set, and no program holds HDF5's lock on it "
            "now (it ended without closing the file, or runs without HDF5's file locking). Once no program has it "
            "open, clear the flag with HDF5's `h5clear -s FILE`, then read it again; its images need no repair.")


def held_for_write(path: str | os.PathLike) -> bool:
    """Whether the superblock keeps any "open for write" flag (a live writer, or one that died without closing): HDF5
    then opens the file for no one but an SWMR reader, and a merged view reading it in place cannot read it at all."""
    try:
        block = Superblock.read(path)
    except (OSError, ValueError):
        return False
    return block.version >= 2 and bool(block.flags & (_WRITE_FLAG | _SWMR_WRITE_FLAG))


def being_written(path: str | os.PathLike) -> bool:
    """Whether the superblock says a writer has the file open for SWMR writing (a live writer, or a killed one whose
    flags no writer has cleared yet)."""
    return bool(Superblock.read(path).flags & _SWMR_WRITE_FLAG)


SWMR_READ_ATTEMPTS = 29
"""Metadata read attempts of an SWMR reader (HDF5's ``H5Pset_metadata_read_attempts``). HDF5's default, 100 with a
doubling back-off, retries a metadata block whose checksum stays wrong (a damaged file, not a block a writer is
rewriting) for minutes to hours, at every read. 29 attempts give up on such a block in about half a second
(measured: 0.55 s; 28 gave up in 4 ms, 32 in 4.3 s) while still re-reading a block caught mid-write."""


def _libhdf5() -> ctypes.CDLL:
    """The HDF5 library h5py itself uses: dlsym on h5py's own extension module finds a symbol in the libhdf5 it is
    linked to (never another copy)."""
    return ctypes.CDLL(h5py.h5p.__file__)


def _set_read_attempts(fapl: h5py.h5p.PropFAID, attempts: int) -> bool:
    """Set ``fapl``'s metadata read attempts through the HDF5 library h5py itself uses (h5py does not wrap the call);
    False where that library cannot be reached."""
    global _H5P_SET_ATTEMPTS
    if _H5P_SET_ATTEMPTS is None:
        try:
            function = _libhdf5().H5Pset_metadata_read_attempts
            function.argtypes, function.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
            _H5P_SET_ATTEMPTS = function
        except (OSError, AttributeError):
            _H5P_SET_ATTEMPTS = False
    if not _H5P_SET_ATTEMPTS:
        return False
    with h5py._objects.phil:  # h5py's own lock around every HDF5 call (a writer thread may be inside the library)
        return _H5P_SET_ATTEMPTS(fapl.id, attempts) >= 0


_H5P_SET_ATTEMPTS = None
_WARNED_ATTEMPTS: list[bool] = []  # the warning below, once a process


def open_read(path: Path, swmr: bool) -> h5py.File:
    """Open read-only, without HDF5's file locking (readers never lock); an SWMR reader with bounded metadata retries."""
    for locking in (False, True):
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
        if not locking:
            fapl.set_file_locking(False, True)
        if swmr:
            if not _set_read_attempts(fapl, SWMR_READ_ATTEMPTS) and not _WARNED_ATTEMPTS:
                _WARNED_ATTEMPTS.append(True)
                warnings.warn("qkhooks could not bound HDF5's metadata read attempts in this HDF5 build: a reader of "
                              "a damaged run still being written may retry for minutes before it says so.")
        flags = h5py.h5f.ACC_RDONLY | (h5py.h5f.ACC_SWMR_READ if swmr else 0)
        try:
            return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))
        except OSError as exc:
            if locking or "locking flag" not in str(exc):
                raise
            # this process writes the file too: HDF5 wants the writer's locking flags
    raise AssertionError("unreachable")


def damaged_message(path: Path, problem: str) -> str:
    try:
        with open_damaged(path) as f:
            n = committed(f)
        found = f" (of {n} committed)" if n is not None else ""
    except (OSError, KeyError, RuntimeError, ValueError):
        found = ""
    return (f"{path} is damaged ({problem}): run `qkhooks repair {path} --out FIXED.h5` to copy every committed "
            f"image still readable{found} into a new file (it leaves {path.name} unchanged).")


class _RepairView(io.RawIOBase):
    """A read-only view of a damaged run file as HDF5 can open it: open flags cleared, a missing superblock
    rebuilt, a truncated tail read as zeros up to the length the superblock records. The file is never written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = open(self.path, "rb", buffering=0)
        size = self._real = os.fstat(self._fh.fileno()).st_size
        block = Superblock.read(self.path)
        if not block.ok_signature or (block.version >= 2 and not block.ok_checksum):
            # a damaged superblock's addresses cannot be trusted (re-summing them, as below, sent HDF5 to a root
            # object or an extension at a flipped address, or cut the file's end): the one qkhooks writes, rebuilt
            self._patch, self._size = Superblock.rebuilt(size), size
        else:
            self._patch = block.with_flags(0) if block.version >= 2 else b""
            self._size = max(size, block.end_of_file if block.version >= 2 else 0)
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._at = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence] + offset
        return self._at

    def tell(self) -> int:
        return self._at

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        out = memoryview(buffer).cast("B")
        want = max(0, min(len(out), self._size - self._at))
        got = 0
        if want and self._at < self._real:  # a damaged address can point past any file (past 2**63: seek overflows)
            self._fh.seek(self._at)
            got = self._fh.readinto(out[:want]) or 0
        out[got:want] = bytes(want - got)  # past the real end: zeros
        if self._at < len(self._patch):
            stop = min(want, len(self._patch) - self._at)
            out[:stop] = self._patch[self._at:self._at + stop]
        self._at += want
        return want

    def close(self) -> None:
        self._fh.close()
        super().close()

    def __repr__(self) -> str:  # h5py gives it as the File's ``filename``, which error messages quote
        return str(self.path)


def open_damaged(path: str | os.PathLike) -> h5py.File:
    """Open a damaged run file read-only through :class:`_RepairView` (plain, not SWMR: fails fast)."""
    view = _RepairView(path)
    try:
        f = h5py.File(view, "r")
    except BaseException:
        view.close()
        raise
    weakref.finalize(f, view.close)
    return f
