"""Round 21 (live reading): a reader following a run that another process writes never returns fewer rows than it
reports and never calls the healthy file damaged; a closed run whose array is shorter than its count is refused as
damaged, never read as a short block.

The writer is a child process (an SWMR reader in the writer's own process shares its file and sees every write at
once), driven one batch at a time, so the races are placed, not waited for: a batch is committed exactly where the
test says (before each dataset refresh), and the reads compare every value against what the child wrote."""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks.errors import QKHooksError
from qkhooks.store import _hdf5, open_run
from qkhooks.store import format as fmt
from qkhooks.store.writer import RunWriter

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["a", "modes/L0/query", "modes/L0/key"]
WIDTH = 4


def _rows(k: int, lo: int, hi: int) -> "np.ndarray":
    """Array ``k``'s rows ``lo:hi`` as the writer writes them: each row says its array, image and column (its source
    is the writer child's too, hence the import)."""
    import numpy as np

    return (1000.0 * k + np.arange(lo, hi)[:, None] + np.arange(4)[None, :] / 4).astype(np.float32)


CHILD = inspect.getsource(_rows) + textwrap.dedent(
    """
    import sys
    from qkhooks.store import format as fmt
    from qkhooks.store._hdf5 import open_swmr_writer
    from qkhooks.store.lock import WriterLock

    lock = WriterLock(sys.argv[1])  # held as RunWriter holds it: a reader can tell a live writer from a killed one
    f = open_swmr_writer(sys.argv[1], 1 << 20)
    names = sys.argv[2].split(",")
    n = fmt.committed(f)
    print("ready", flush=True)
    for line in sys.stdin:  # one batch of int(line) images, committed in RunWriter._do_batch's order
        b = int(line)
        for k, name in enumerate(names):
            ds = f[name]
            ds.resize(n + b, axis=0)
            ds[n:n + b] = _rows(k, n, n + b)
        ids = f[fmt.IDS]
        ids.resize(n + b, axis=0)
        ids[n:n + b] = [f"im{i}" for i in range(n, n + b)]
        f.flush()  # the rows reach the disk before the count that commits them
        fmt.set_committed(f, n + b)
        f.flush()
        n += b
        print(n, flush=True)
    f.close()
    """
)


class _Writer:
    """The child that appends and commits batches to a run file when told, one at a time."""

    def __init__(self, path: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), ",".join(NAMES)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._answer("ready")

    def _answer(self, expected: str | None = None) -> str:
        line = self.proc.stdout.readline().strip()
        if not line or (expected is not None and line != expected):
            self.proc.kill()
            raise AssertionError(f"the writer child answered {line!r}: {self.proc.stderr.read()[-2000:]}")
        return line

    def commit(self, images: int = 2) -> int:
        """Write and commit one batch (on disk when this returns); the new committed count."""
        self.proc.stdin.write(f"{images}\n")
        self.proc.stdin.flush()
        return int(self._answer())

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            self.proc.kill()


def _laid_out(tmp_path: Path) -> Path:
    """A run of two images laid out by the real writer, two images a chunk, then handed to the child."""
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "m", "config": "{}"}, dtype="float32", chunk_images=2) as w:
        w.write_batch(["im0", "im1"], {name: _rows(k, 0, 2) for k, name in enumerate(NAMES)})
    return path


def _check(run, at_least: int) -> None:
    """The ids and every array read back all the images the reader counts (at least ``at_least``: reading the ids of
    images committed since the file was opened opens it anew, which counts again), each value as the writer wrote it."""
    for k, name in enumerate(NAMES):
        a = run.array(name)
        n = a.n
        assert n >= at_least and a.shape == (n, WIDTH)
        np.testing.assert_array_equal(a[:], _rows(k, 0, n), err_msg=name)
        np.testing.assert_array_equal(a[n - 1], _rows(k, n - 1, n)[0], err_msg=name)
    ids = run.ids
    assert at_least <= len(ids) == run.n and ids == [f"im{i}" for i in range(len(ids))]


def test_a_batch_committed_before_each_dataset_refresh_never_leaves_an_array_short(tmp_path, monkeypatch):
    """The count is read before the arrays are refreshed: a batch committed between the two only makes the arrays
    longer than the count (refreshed first, they held fewer rows than the count, and h5py cut ``a[:]`` short)."""
    path = _laid_out(tmp_path)
    with _Writer(path) as child, open_run(path) as run:
        assert run.file.swmr_mode
        refresh = h5py.Dataset.refresh
        committed = []

        def commit_then_refresh(ds: h5py.Dataset) -> None:
            committed.append(child.commit())
            refresh(ds)

        for _ in range(3):
            monkeypatch.setattr(h5py.Dataset, "refresh", commit_then_refresh)
            n = run.refresh()
            monkeypatch.setattr(h5py.Dataset, "refresh", refresh)
            assert committed[0] <= n  # batches committed during the refresh
            _check(run, n)
            committed.clear()


def test_an_array_held_across_refreshes_reads_every_row_and_the_file_is_never_called_damaged(tmp_path):
    """HDF5 refreshing a dataset that has a second handle open breaks every later read spanning two chunks ("can't
    insert duplicate key") until all its handles close; the reader refreshes and reads through one handle."""
    path = _laid_out(tmp_path)
    with _Writer(path) as child, open_run(path) as run:
        held = {name: run.array(name) for name in NAMES}
        for _ in range(3):
            n = child.commit(3)  # 3 images: a batch across a chunk boundary
            assert run.refresh() == n
            _check(run, n)
            for k, name in enumerate(NAMES):  # an array keeps the count it was taken with, read through the same handle
                np.testing.assert_array_equal(held[name][:], _rows(k, 0, 2))
        n = child.commit(5)
        assert run.refresh() == n
        for k, name in enumerate(NAMES):
            np.testing.assert_array_equal(held[name][1:], _rows(k, 1, 2))
        _check(run, n)


class _Pauses:
    """The reader's back-off on a fake clock, with something to do at its first pause."""

    def __init__(self, at_first_pause=lambda: None):
        self.now, self.sleeps, self._first = 0.0, [], at_first_pause

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if not self.sleeps:
            self._first()
        self.sleeps.append(seconds)
        self.now += seconds


def _broken_by_another_handle(run, other: h5py.File, child: _Writer) -> tuple[int, h5py.Dataset]:
    """Refresh ``run`` while ``other`` (a second handle on the file in this process) holds array ``a`` open: HDF5
    shares the dataset between them, so its chunk bookkeeping breaks and a read across chunks fails in HDF5 until
    both handles are closed. The count, and the other handle (keep it to keep the dataset broken)."""
    held = other["a"]
    n = child.commit(3)
    assert run.refresh() == n
    with pytest.raises(OSError, match="duplicate key"):
        held[:]
    return n, held


def test_an_hdf5_error_while_a_writer_has_the_file_open_is_read_again_on_the_file_opened_anew(tmp_path, monkeypatch):
    path = _laid_out(tmp_path)
    with _Writer(path) as child, open_run(path) as run:
        other = h5py.File(path, "r", swmr=True, locking=False)
        n, held = _broken_by_another_handle(run, other, child)
        pauses = _Pauses(at_first_pause=other.close)  # the other handle is closed while the reader waits
        monkeypatch.setattr(_hdf5, "_clock", pauses.monotonic)
        monkeypatch.setattr(_hdf5, "_sleep", pauses.sleep)
        np.testing.assert_array_equal(run.array("a")[:], _rows(0, 0, n))
        # failed, opened anew at once (still broken: the other handle is open), a pause, opened anew: read
        assert pauses.sleeps == [_hdf5.FIRST_PAUSE_S] and not held.id.valid
        _check(run, n)


def test_an_hdf5_error_that_lasts_while_a_writer_has_the_file_open_says_it_is_being_written(tmp_path, monkeypatch):
    path = _laid_out(tmp_path)
    with _Writer(path) as child, open_run(path) as run:
        other = h5py.File(path, "r", swmr=True, locking=False)
        try:
            _, held = _broken_by_another_handle(run, other, child)  # held open: broken for good
            pauses = _Pauses()
            monkeypatch.setattr(_hdf5, "_clock", pauses.monotonic)
            monkeypatch.setattr(_hdf5, "_sleep", pauses.sleep)
            with pytest.raises(QKHooksError) as caught:
                run.array("a")[:]
        finally:
            other.close()
        message = str(caught.value)
        assert message.startswith(f"{path} is being written (a writer holds it) and HDF5 could not read its array /a")
        assert "damaged" not in message and "repair" not in message
        assert "2 other handle(s) on this file are open in this process" in message  # the test's h5py.File, its "a"
        assert sum(pauses.sleeps) == pytest.approx(_hdf5.READ_DEADLINE_S)  # bounded: the reader's deadline


def test_a_closed_runs_array_shorter_than_its_count_is_refused_as_damaged_never_read_short(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "m", "config": "{}"}, dtype="float32", chunk_images=2) as w:
        for b in range(4):
            w.write_batch([f"im{2 * b}", f"im{2 * b + 1}"],
                          {name: _rows(k, 2 * b, 2 * b + 2) for k, name in enumerate(NAMES)})
    with h5py.File(path, "r+") as f:  # outside damage: array a and the ids lose their last row
        assert f["images"].attrs["committed"] == 8
        f["a"].resize(7, axis=0)
        f[fmt.IDS].resize(7, axis=0)
    with open_run(path) as run:
        assert not run.file.swmr_mode and run.n == 8
        a = run.array("a")
        for read in (lambda: a[:], lambda: a[7], lambda: a[4:], lambda: a[[1, 7]], lambda: a[::-1], lambda: a[0]):
            with pytest.raises(QKHooksError, match=rf"^{path} is damaged \(its array /a has 7 rows, fewer than the 8 "
                                                   rf"images committed\): run `qkhooks repair {path} --out FIXED.h5`"):
                read()
        with pytest.raises(QKHooksError, match=r"is damaged \(its image ids /images/ids has 7 rows, fewer than the 8 "):
            run.ids
        for k, name in enumerate(NAMES[1:], start=1):  # the whole arrays read as written
            np.testing.assert_array_equal(run.array(name)[:], _rows(k, 0, 8))
        lines = run.summary().splitlines()  # what `qkhooks info` prints (the problems make it exit 2)
        assert [line.split()[0] + line.partition("DAMAGED")[2] for line in lines if "DAMAGED" in line] == [
            "a (7 rows, fewer than committed)"]
        assert len(run.problems) == 1 and "(a): run `qkhooks repair" in run.problems[0]


def test_an_hdf5_error_met_by_a_live_reader_after_its_writer_finished_is_read_again_not_called_damage(tmp_path,
                                                                                                    monkeypatch):
    """The reader opened the file while it was written: an HDF5 error is read again on the file opened anew, though
    the writer has finished since (a damage report there would send a healthy run to `qkhooks repair`)."""
    path = _laid_out(tmp_path)
    with _Writer(path) as child:
        run = open_run(path)
        other = h5py.File(path, "r", swmr=True, locking=False)
        n, _ = _broken_by_another_handle(run, other, child)
        other.close()  # the reader's own handle keeps the dataset broken
    with run:
        assert run.file.swmr_mode and not _hdf5.being_written(path)  # the writer closed the file since
        pauses = _Pauses()
        monkeypatch.setattr(_hdf5, "_clock", pauses.monotonic)
        monkeypatch.setattr(_hdf5, "_sleep", pauses.sleep)
        np.testing.assert_array_equal(run.array("a")[:], _rows(0, 0, n))
        assert pauses.sleeps == [] and not run.file.swmr_mode  # opened anew at once, as the closed file it now is
        _check(run, n)


def test_a_killed_writers_file_broken_by_another_handle_here_is_not_called_damaged(tmp_path, monkeypatch):
    """The superblock still says a writer has the file open, but none holds it: one read on the file opened anew (no
    pauses: no writer will change it), then the other handles open in this process are named, not damage."""
    path = _laid_out(tmp_path)
    with _Writer(path) as child:
        run = open_run(path)
        other = h5py.File(path, "r", swmr=True, locking=False)
        _, held = _broken_by_another_handle(run, other, child)  # held open: broken for good
        child.proc.kill()
        child.proc.wait()
    try:
        assert _hdf5.being_written(path)  # a killed writer's flags
        pauses = _Pauses()
        monkeypatch.setattr(_hdf5, "_clock", pauses.monotonic)
        monkeypatch.setattr(_hdf5, "_sleep", pauses.sleep)
        with pytest.raises(QKHooksError, match=rf"^{path}: HDF5 could not read its array /a \(.*duplicate key.*\), "
                                               "also on the file opened anew: 2 other handle\\(s\\) on this file are "
                                               "open in this process") as caught:
            run.array("a")[:]
        assert pauses.sleeps == [] and "damaged" not in str(caught.value)
        other.close()
        np.testing.assert_array_equal(run.array("a")[:], _rows(0, 0, run.n))  # the file itself reads whole
    finally:
        other.close()
        run.close()


def test_listing_a_runs_arrays_leaves_no_handle_open(tmp_path):
    """The walk closes the handles it opened when its answer is dropped, without waiting for the garbage collector: an
    SWMR reader refreshing a dataset while such a handle is open breaks the dataset (see the tests above)."""
    path = _laid_out(tmp_path)
    with h5py.File(path, "r") as f:
        gc.disable()
        try:
            assert sorted(fmt.per_image_datasets(f)) == sorted(NAMES)
            assert h5py.h5f.get_obj_count(f.id, h5py.h5f.OBJ_DATASET) == 0
        finally:
            gc.enable()
