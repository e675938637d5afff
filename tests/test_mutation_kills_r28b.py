"""Round 28 (stale entries): tests that kill the surviving mutants of ``RunWriter._check_whole`` found when its stale
equivalent entries were renumbered (tests/MUTATION.md, round 28, "stale entries"): a resume reads and checks the
committed part of a run file only, refuses damage where it cuts, and resumes a run killed before it committed an image.
Each checked against h5py's own reads of the file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from qkhooks.store import RunWriter, open_run

ATTRS = {"model": "m"}


def _resumed_with_one_batch(path, ids: list[str], checksum: bool = False) -> tuple[list[str], np.ndarray]:
    """Resume the run at ``path`` (recorded with ``checksum``), write one batch of ``ids`` (row i full of i), and read
    the run back."""
    with RunWriter(path, mode="resume", dtype="float32", attrs=ATTRS, checksum=checksum) as w:
        w.write_batch(ids, {"v": np.arange(len(ids), dtype=np.float32)[:, None].repeat(4, axis=1)})
    with open_run(path) as run:
        return run.ids, run.array("v")[:]


def test_a_resume_after_a_kill_between_the_ids_and_their_digests_cuts_the_uncommitted_ids(tmp_path):
    """RunWriter._check_whole (_12: every id read, not the committed ones): in a checksummed run the writer writes a
    batch's ids before their digests and commits after both, so a kill between leaves ids past the committed count
    without digests. The resume must check only the committed ids and cut the rest, as it cuts the arrays' uncommitted
    rows."""
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2, attrs=ATTRS, checksum=True) as w:
        w.write_batch(["a", "b"], {"v": np.zeros((2, 4), np.float32)})
    with h5py.File(path, "r+") as f:  # the next batch's ids written, the kill before their digests and the count
        f["images/ids"].resize(4, axis=0)
        f["images/ids"][2:4] = [b"c", b"d"]
    with h5py.File(path, "r") as f:
        assert f["images/ids"].shape[0] == 4 and f["images/id_digests"].shape[0] == 2
        assert f["images/ids"].attrs["committed"] == 2
    ids, v = _resumed_with_one_batch(path, ["e", "f"], checksum=True)
    assert ids == ["a", "b", "e", "f"]
    np.testing.assert_array_equal(v, np.array([[0.0] * 4, [0.0] * 4, [0.0] * 4, [1.0] * 4], np.float32))


def test_a_run_stopped_before_its_first_batch_committed_resumes_from_no_image(tmp_path):
    """RunWriter._check_whole (_4: no committed image taken as one): the first batch lays the file out under its
    name, then writes the arrays' rows, then the ids, then the count; a kill before the ids leaves a run with no
    committed image and empty ids. Its resume must start it from no image, not refuse it as damaged for an image it
    never committed."""
    from qkhooks.store import format as fmt

    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2, attrs=ATTRS) as w:
        w.write_batch(["a", "b"], {"v": np.full((2, 4), 7, np.float32)})
    with h5py.File(path, "r+") as f:  # the kill: the arrays' rows written, neither the ids nor the count
        f["images/ids"].resize(0, axis=0)
        fmt.set_committed(f, 0)
        f.attrs.modify("complete", False)
    with h5py.File(path, "r") as f:
        assert (f["images/ids"].shape[0], f["v"].shape[0], fmt.committed(f)) == (0, 2, 0)
    ids, v = _resumed_with_one_batch(path, ["c", "d"])
    assert ids == ["c", "d"]
    np.testing.assert_array_equal(v, np.array([[0.0] * 4, [1.0] * 4], np.float32))


def test_a_resume_refuses_a_chunk_index_damaged_only_past_the_committed_rows_and_changes_nothing(tmp_path):
    """RunWriter._check_whole (_41: the last row's lookup made past the end; _43: made at the row before it): a killed
    writer's uncommitted row (the count not yet raised) whose chunk index is damaged, in the extensible array's first
    data block (rows 4 on; the committed rows 0-3 are in its index block). The resume cuts that row, so the index there
    must read: the resume is refused, read-only, before anything is written, as for damage in the committed rows."""
    from test_store_safety import _as_if_killed, sha

    from qkhooks import QKHooksError
    from qkhooks.store import format as fmt

    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=1, attrs=ATTRS) as w:
        for i in range(5):
            w.write_batch([f"image_{i}"], {"v": np.full((1, 4), i, np.float32)})
    with h5py.File(path, "r+") as f:  # the kill: the fifth image's rows written, the count not raised
        fmt.set_committed(f, 4)
        f.attrs.modify("complete", False)
    data = bytearray(path.read_bytes())
    assert data.count(b"EADB") == 1  # v's one data block (the ids' chunks hold more images: no data block)
    data[data.index(b"EADB") + 8] ^= 0xFF
    path.write_bytes(bytes(data))
    with h5py.File(path, "r") as f:  # h5py's own lookups: the committed rows answer, the uncommitted one does not
        ds = f["v"]
        for row in range(4):
            ds.id.get_chunk_info_by_coord((row, 0))
        with pytest.raises((OSError, RuntimeError)):
            ds.id.get_chunk_info_by_coord((4, 0))
        assert (fmt.committed(f), ds.shape[0]) == (4, 5)
    _as_if_killed(path)  # the SWMR-write flags a killed writer leaves
    before = sha(path)
    with pytest.raises(QKHooksError) as refused:
        RunWriter(path, mode="resume", dtype="float32", attrs=ATTRS)
    assert f"cannot resume {path}: it is damaged (v's chunk index is unreadable, with 4 images committed)" in str(
        refused.value)
    assert sha(path) == before
