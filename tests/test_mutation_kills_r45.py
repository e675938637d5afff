"""Round 45 (mutation): kill tests of round 44's run-file repair code (module ``round44``, ``--only ROUND44``): the
ids read a block, then a row, at a time (``repair._read_ids``), and the rows of a raw chunk that lie inside a cut
file (``repair._rows_inside``), each asserting what repair recovers against what was written."""

from __future__ import annotations

import importlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks.store import RunWriter, open_run, repair
from qkhooks.store.repair import verify_run

repair_module = importlib.import_module("qkhooks.store.repair")  # the module (qkhooks.store.repair is its function)


def _run(path: Path, n: int = 8, batch: int = 2, checksum: bool = False) -> np.ndarray:
    """A run of ``n`` images ``im0``... with one per-image array ``a`` (3 float32 a row, none of them 0); its rows."""
    a = (np.random.default_rng(0).standard_normal((n, 3)) + 5).astype(np.float32)
    with RunWriter(path, attrs={"model": "m", "config": "{}"}, dtype="float32", checksum=checksum) as w:
        for lo in range(0, n, batch):
            w.write_batch([f"im{i}" for i in range(lo, lo + batch)], {"a": a[lo:lo + batch]})
    return a


@pytest.mark.parametrize("walk", [True, False], ids=["chunk_walk", "chunk_by_chunk"])
def test_repair_loses_the_rows_of_a_chunk_missing_inside_the_committed_rows_and_reads_no_fill_value(tmp_path, walk,
                                                                                                   monkeypatch):
    """A chunk that was never allocated reads back as HDF5's fill value (zeros), which is no image's data: repair must
    lose its rows, say why, and keep every other row bit for bit (a raw chunk's rows inside the file are recovered
    only where the chunk is in the file at all)."""
    path = tmp_path / "run.h5"
    a = _run(path)
    with h5py.File(path, "r+") as f:  # /a again in chunks of 2 rows, rows 2-3's chunk never written
        attrs = dict(f["a"].attrs)
        del f["a"]
        ds = f.create_dataset("a", shape=(8, 3), maxshape=(None, 3), chunks=(2, 3), dtype="float32")
        ds.attrs.update(attrs)
        for lo in (0, 4, 6):
            ds[lo:lo + 2] = a[lo:lo + 2]
        assert sorted(ds.id.get_chunk_info(k).chunk_offset[0] for k in range(ds.id.get_num_chunks())) == [0, 4, 6]
        np.testing.assert_array_equal(ds[2:4], 0)  # what HDF5 reads there
    if not walk:
        monkeypatch.setattr(repair_module, "_chunk_locations", lambda ds: None)
    report = repair(path, tmp_path / "fixed.h5")
    assert report.lost == [2, 3] and report.recovered == ["im0", "im1", "im4", "im5", "im6", "im7"]
    assert report.problems == ["/a: rows 2-3 do not read (a chunk missing from the file or lying past its end)"]
    with open_run(tmp_path / "fixed.h5") as run:
        assert run.ids == report.recovered
        np.testing.assert_array_equal(run.array("a")[:], a[[0, 1, 4, 5, 6, 7]])
    assert "damaged  /a: rows 2-3 do not read (a chunk missing from the file or lying past its end)" in \
        verify_run(path).summary()


def _collection_of(data: bytes, value: bytes) -> tuple[int, list[bytes]]:
    """The address of the heap collection ("GCOL") holding the bytes ``value``, and every object it holds (HDF5's
    layout: a 16-byte header with the collection's size at byte 8; each object a 16-byte header, index at 0, size at
    8, then its bytes padded to 8; index 0 is the free space)."""
    where = data.find(value)
    start = data.rfind(b"GCOL", 0, where)
    size = int.from_bytes(data[start + 8:start + 16], "little")
    held, at = [], start + 16
    while at + 16 <= start + size and int.from_bytes(data[at:at + 2], "little"):
        length = int.from_bytes(data[at + 8:at + 16], "little")
        held.append(data[at + 16:at + 16 + length])
        at += 16 + (length + 7) // 8 * 8
    return start, held


@pytest.mark.parametrize("damage", ["collection_zeroed", "object_past_its_collection"])
def test_repair_reads_every_id_outside_a_damaged_heap_collection_a_block_then_a_row_at_a_time(tmp_path, damage):
    """600 long ids, several heap collections: one collection damaged. Zeroed, repair never asks HDF5 for its ids
    (no "GCOL": not wholly in the file); with one object's size past the collection, HDF5 fails every read of it, the
    whole array's included, so the ids are read a block of 256 at a time, row by row in a block that fails. Either
    way exactly the ids that collection holds are lost, each named once, and every other id is kept with its rows,
    the clean blocks after the damaged one included."""
    path = tmp_path / "run.h5"
    ids = [f"image-{i:04d}-" + "x" * 80 for i in range(600)]
    with RunWriter(path, dtype="float32") as w:
        for lo in range(0, 600, 10):
            w.write_batch(ids[lo:lo + 10], {"v": np.arange(lo, lo + 10, dtype=np.float32)[:, None].repeat(4, 1)})
    data = bytearray(path.read_bytes())
    start, held = _collection_of(bytes(data), ids[0].encode())
    lost = sorted(ids.index(value.decode()) for value in held)
    assert 0 < len(lost) < 256 and lost[-1] < 256  # one damaged block, two clean ones after it
    if damage == "collection_zeroed":
        size = int.from_bytes(data[start + 8:start + 16], "little")
        data[start:start + size] = bytes(size)
    else:
        data[start + 16 + 8:start + 16 + 16] = (1 << 40).to_bytes(8, "little")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(data))
    report = repair(bad, tmp_path / "fixed.h5")
    kept = [i for i in range(600) if i not in set(lost)]
    assert report.lost == lost and report.recovered == [ids[i] for i in kept]
    spans = [f"{a}-{b}" if b > a else f"{a}" for a, b in _spans(lost)]
    assert report.problems == [f"/images/ids: rows {', '.join(spans[:5])}{' ...' if len(spans) > 5 else ''} do not "
                               "read (their ids do not read)"]
    with open_run(tmp_path / "fixed.h5") as run:
        assert run.ids == report.recovered
        np.testing.assert_array_equal(np.asarray(run.array("v")[:])[:, 0], np.array(kept, dtype=np.float32))


def _spans(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as (first, last) of each run of consecutive rows."""
    out: list[tuple[int, int]] = []
    for row in rows:
        out = out[:-1] + [(out[-1][0], row)] if out and out[-1][1] == row - 1 else out + [(row, row)]
    return out


@pytest.mark.parametrize("complete", [True, False], ids=["finished", "unfinished"])
def test_a_skipped_list_that_reads_whole_is_no_problem_for_info_or_verify_finished_or_not(tmp_path, complete):
    """Two skipped images, every row of the list read: the summary names them with nothing after, and verify counts
    the list and the run's other static (2 datasets) and finds nothing to mend or resume, whether the run was marked
    finished or its writer stopped before."""
    from qkhooks.store import format as fmt

    path = tmp_path / "run.h5"
    w = RunWriter(path, dtype="float32")
    w.write_static("extra/table", np.arange(6, dtype=np.float32).reshape(2, 3))  # statics go before the first batch
    w.write_batch(["a", "b"], {"v": np.ones((2, 3))})
    w.write_skipped([("x.png", "unreadable"), ("w.png", "too large")])
    w.close(complete=complete)
    with open_run(path) as run:
        assert fmt.read_skipped_rows(run.file) == ([("x.png", "unreadable"), ("w.png", "too large")], [], 2)
        summary = run.summary()
        assert run.problems == []
    assert "\nskipped  2: x.png, w.png\narrays" in summary
    report = verify_run(path)
    assert report.ok and report.complete is complete and report.statics == 2 and report.resumable == []
    assert report.problems == [] and "\nstatics  2 datasets and every attribute read\n" in report.summary()


def test_verify_checks_a_run_without_its_complete_attribute_as_an_unfinished_one(tmp_path):
    """The root's ``complete`` attribute gone (an edit, a tool that rewrote the root's attributes): verify neither
    fails on it nor calls the run finished; it checks the committed images as an incomplete run's, as info does."""
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32") as w:
        w.write_batch(["a", "b"], {"v": np.ones((2, 3))})
    with h5py.File(path, "r+") as f:
        del f.attrs["complete"]
    report = verify_run(path)
    assert report.ok and report.complete is False and report.images == 2 and report.problems == []
    assert "\nimages   2 committed (an incomplete run: those checked): their ids and their rows of 1 per-image " \
           "arrays read, chunk by chunk\n" in report.summary()
    with open_run(path) as run:
        assert run.complete is False and run.ids == ["a", "b"]


def test_the_ids_whose_heap_collection_ends_past_the_files_end_are_found_off_the_raw_bytes(tmp_path):
    """What repair never asks HDF5 for (it spins without end on a collection cut short): for a file ``real_size``
    bytes long, the rows whose string lies in a collection that ends past it, or every row of an ids chunk that does.
    Told of a shorter file than it is (a cut, without cutting it, so no read can hang), exactly the rows held by the
    collection the cut goes through are named: the reference is the collection's own objects, parsed here. One whose
    "GCOL" signature is gone is no collection, whatever its size field says: its rows too."""
    path = tmp_path / "run.h5"
    ids = [f"image-{i:04d}-" + "x" * 80 for i in range(600)]
    with RunWriter(path, dtype="float32") as w:
        for lo in range(0, 600, 10):
            w.write_batch(ids[lo:lo + 10], {"v": np.zeros((10, 1), dtype=np.float32)})
    data = path.read_bytes()
    start, held = _collection_of(data, ids[-1].encode())
    rows = {ids.index(value.decode()) for value in held}
    cut = start + int.from_bytes(data[start + 8:start + 16], "little") // 2  # through the collection's middle
    with h5py.File(path, "r") as f:
        ds = f["images/ids"]
        chunk = ds.id.get_chunk_info(0)
        assert ds.id.get_num_chunks() == 1 and chunk.byte_offset + chunk.size < start and 0 < len(rows) < 600
        outside = repair_module.unreadable_strings
        assert outside(ds, 600, path, len(data)) == set()
        assert outside(ds, 600, path, cut) == rows
        assert outside(ds, 300, path, cut) == {r for r in rows if r < 300}
        assert outside(ds, 600, path, chunk.byte_offset + chunk.size - 1) == set(range(600))
    signless = tmp_path / "signless.h5"  # the collection whole, its size intact, but no "GCOL": not a collection
    signless.write_bytes(data[:start] + b"XCOL" + data[start + 4:])
    with h5py.File(signless, "r") as f:
        assert outside(f["images/ids"], 600, signless, len(data)) == rows


def test_a_cut_through_the_second_chunk_of_ids_names_that_chunks_rows_not_the_first_chunks(tmp_path):
    """1,100 ids in two chunks of references (1,024 rows each), the file told to end inside the second chunk: its rows
    are outside (their references are not in the file), and of the first chunk's only those whose string lies in a
    collection that ends past the cut (none where every collection ends before it)."""
    path = tmp_path / "run.h5"
    ids = [f"id{i:05d}" for i in range(1100)]
    with RunWriter(path, dtype="float32") as w:
        for lo in range(0, 1100, 100):
            w.write_batch(ids[lo:lo + 100], {"v": np.zeros((100, 1), dtype=np.float32)})
    data = path.read_bytes()
    with h5py.File(path, "r") as f:
        ds = f["images/ids"]
        assert ds.chunks == (1024,) and ds.id.get_num_chunks() == 2
        second = ds.id.get_chunk_info_by_coord((1024,))
        cut = second.byte_offset + second.size - 1
        ends = {}
        for i, value in enumerate(ids):
            start, _ = _collection_of(data, value.encode())
            ends[i] = start + int.from_bytes(data[start + 8:start + 16], "little")
        expected = set(range(1024, 1100)) | {i for i in range(1024) if ends[i] > cut}
        assert len(expected) < 1100
        assert repair_module.unreadable_strings(ds, 1100, path, cut) == expected


def test_a_chunk_of_ids_whose_place_does_not_read_names_its_rows_as_outside(tmp_path):
    """A chunk of references whose place does not read (a damaged chunk index; simulated: the walk of the chunk index
    that repair hands over lacks the second chunk) cannot be read off the file: its rows are named, the first
    chunk's not. (Round 50: ``unreadable_strings`` moved to _hdf5 and takes the walk's places as ``where``.)"""
    path = tmp_path / "run.h5"
    ids = [f"id{i:05d}" for i in range(1100)]
    with RunWriter(path, dtype="float32") as w:
        for lo in range(0, 1100, 100):
            w.write_batch(ids[lo:lo + 100], {"v": np.zeros((100, 1), dtype=np.float32)})
    with h5py.File(path, "r") as f:
        where = {0: repair_module._chunk_location(f["images/ids"], 0)}
        assert repair_module.unreadable_strings(f["images/ids"], 1100, path, path.stat().st_size, where) == set(range(1024, 1100))
        assert repair_module.unreadable_strings(f["images/ids"], 1100, path, path.stat().st_size) == set()
