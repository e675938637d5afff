"""Round 25: the ids' digests are read by the one chunk reader of repair and verify (``_failing_rows``), a few thousand
rows a read and chunk by chunk only around a chunk that does not read. A digest whose chunk lies past a truncated
file's end is reported as that (it was "their ids do not match their digests: changed on disk", though no id
changed); block reads fail exactly the chunks that chunk-by-chunk reads fail and hand every other row on once. The
references are the chunks' byte ranges as h5py reports them and digests computed with hashlib."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import h5py
import numpy as np

from qkhooks.store import format as fmt
from test_format_version_refusals import ids_of, write

repair = importlib.import_module("qkhooks.store.repair")  # the module (qkhooks.store.repair is also its function)
IMAGES = 9  # write's three batches of three


def chunk_places(path: Path) -> list[tuple[int, int, int]]:
    """(byte offset, end, row) of every digest chunk (one row a chunk), in file order."""
    with h5py.File(path, "r") as f:
        ds = f[fmt.ID_DIGESTS]
        assert ds.chunks == (1, 16)
        infos = [(ds.id.get_chunk_info_by_coord((row, 0)), row) for row in range(ds.shape[0])]
    return sorted((info.byte_offset, info.byte_offset + info.size, row) for info, row in infos)


def test_a_digest_past_a_truncated_end_is_reported_as_lying_past_it_and_only_its_image_is_lost(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    with monkeypatch.context() as old_writer:  # laid out as before round 44, which sends the ids and their digests
        # to the file before the arrays: left to the file's flush, the last digest ends the file, after every array
        old_writer.setattr(h5py.Dataset, "flush", lambda ds: None)
        write(path, batches=3)
    places = chunk_places(path)
    assert places[-1][1] == path.stat().st_size  # the last digest written ends the file: cut where it begins
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[:places[-1][0]])
    last = places[-1][2]
    report = repair.repair(cut, tmp_path / "fixed.h5")
    assert report.lost == [last]
    every = [i for b in range(3) for i in ids_of(b)]
    assert report.recovered == every[:last] + every[last + 1:]
    assert report.problems == [f"/{fmt.ID_DIGESTS}: row {last} does not read (a chunk missing from the file or "
                               "lying past its end)"]  # never the id "changed on disk"


def test_block_reads_of_the_digests_fail_exactly_the_chunks_that_chunk_by_chunk_reads_fail(tmp_path):
    path = tmp_path / "run.h5"
    write(path, batches=3)
    places = {row: (start, end) for start, end, row in chunk_places(path)}
    for row in (2, 3, 7):  # flip a byte inside three chunks' data: their Fletcher-32 fails
        with open(path, "r+b") as fh:
            fh.seek(places[row][0] + 4)
            byte = fh.read(1)[0]
            fh.seek(places[row][0] + 4)
            fh.write(bytes([byte ^ 0x10]))
    size = places[5][0]  # as if the file ended where row 5's digest begins: rows at or past it lie past the end
    past = {row for row, (_, end) in places.items() if end > size}
    with h5py.File(path, "r") as f:
        ds = f[fmt.ID_DIGESTS]
        handed: dict[int, int] = {}

        def count(lo: int, block: np.ndarray) -> None:
            for row in range(lo, lo + len(block)):
                handed[row] = handed.get(row, 0) + 1

        blocks = repair._failing_rows(ds, IMAGES, size, rows_per_read=4096, each=count)
        chunks = repair._failing_rows(ds, IMAGES, size)
    failed = sorted({2, 3, 7} | past)
    assert blocks[0] == chunks[0] == [(row, row + 1) for row in failed]
    assert blocks[1] == chunks[1]  # the first failing chunk's reason either way
    assert handed == {row: 1 for row in range(IMAGES) if row not in failed}


def test_ids_are_compared_with_their_digests_but_in_the_rows_whose_ids_do_not_read(tmp_path):
    path = tmp_path / "run.h5"
    write(path, batches=3)
    ids = np.array([i.encode() for b in range(3) for i in ids_of(b)], dtype=object)
    ids[4], ids[6] = b"im-1-1-changed", b"im-2-0-changed"  # as a flipped bit in the heap would read
    with h5py.File(path, "r") as f:
        stored = f[fmt.ID_DIGESTS][()]
        reference = [row for row in range(IMAGES)
                     if hashlib.blake2b(ids[row], digest_size=16).digest() != stored[row].tobytes()]
        assert reference == [4, 6]
        size = path.stat().st_size
        assert repair._ids_off_their_digests(f[fmt.ID_DIGESTS], ids, IMAGES, size) == ([4, 6], [], "")
        # rows 3-5 unread (their ids' chunk failed): not compared, so row 4 is not reported again
        assert repair._ids_off_their_digests(f[fmt.ID_DIGESTS], ids, IMAGES, size, [(3, 6)]) == ([6], [], "")
