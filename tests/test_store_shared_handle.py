"""Round 22 (reading): a slice of the image axis reaches HDF5 without an index array of its images; readers of one
run in one process share one HDF5 handle, so one refreshing never breaks another's reads while a writer appends."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest

from test_store_live_reading import NAMES, _broken_by_another_handle, _check, _laid_out, _Pauses, _rows, _Writer
from qkhooks.errors import QKHooksError
from qkhooks.store import _hdf5, open_run
from qkhooks.store.reader import RunArray, _spans
from qkhooks.store.repair import verify_run
from qkhooks.store.writer import RunWriter
from conftest import KeyLog


M = 300_000  # images of one byte: an index array of them (8 bytes each) dwarfs any answer


@pytest.fixture(scope="module")
def bytes_run(tmp_path_factory):
    """A (M + 5, 2) uint8 array chunked by 4096 images, its first M rows committed; and those rows."""
    values = (np.arange(M + 5)[:, None] * np.array([1, 7])).astype(np.uint8)
    path = tmp_path_factory.mktemp("r22") / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=values, chunks=(4096, 2), maxshape=(None, 2))
    with h5py.File(path, "r") as f:
        yield f["a"], values[:M]


def _traced_peak(read):
    """What ``read()`` returns and the most bytes numpy (and Python) held at once while it ran."""
    tracemalloc.start()
    try:
        got = read()
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _held(a: np.ndarray) -> int:
    """The bytes of the buffer ``a`` keeps alive (its own, or those of the array it is a view of)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.nbytes


@pytest.mark.parametrize("first", [slice(None), slice(10, M - 3), slice(None, None, -1), slice(M - 4, 5, -1)])
@pytest.mark.parametrize("rest", [(), (1,), (slice(None, None, -1),)])
def test_a_step_one_slice_is_one_hdf5_read_with_no_index_array(bytes_run, first, rest):
    """A slice of step 1 or -1 reaches HDF5 as the one forward slice of its images (the other axes with it where HDF5
    selects them), and the read holds no more than the answer: no array of the images picked (2.4 MB here, against
    an answer of at most 0.6 MB; the index array built for every slice before made the peak 4-5x the answer)."""
    dataset, whole = bytes_run
    log = KeyLog(dataset)
    got, peak = _traced_peak(lambda: RunArray(log, M)[(first, *rest)])
    assert np.array_equal(got, whole[(first, *rest)])
    picked = range(*first.indices(M))
    lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
    native = rest if rest != (slice(None, None, -1),) else ()  # a backward slice of another axis is numpy's
    assert log.keys == [(slice(lo, hi), *native)]
    assert peak < (hi - lo) * 2 + (64 << 10)  # the rows read (numpy picks from them in place) and a little


@pytest.mark.parametrize("first", [slice(None, None, 2), slice(1, None, 3), slice(M - 1, None, -5),
                                   slice(7, M - 7, 4096)])
def test_a_stepped_slice_reads_no_index_array(bytes_run, first):
    """A slice stepping within a chunk is read as contiguous spans as before, then picked (a copy: the span read is
    let go), with no array of the images it picks: at most the rows read and the answer are held at once."""
    dataset, whole = bytes_run
    got, peak = _traced_peak(lambda: RunArray(dataset, M)[first])
    assert np.array_equal(got, whole[first]) and _held(got) == got.nbytes
    picked = range(*first.indices(M))
    assert peak < (abs(picked[-1] - picked[0]) + 1) * 2 + got.nbytes + (64 << 10)


def test_a_slices_spans_are_those_of_its_images_listed(monkeypatch):
    """The arithmetic cut of a slice's images equals the cut of the same images as an index array (the one rule for
    both): every start, stop and step against chunk sizes and span bounds that cut runs in between."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        gap = int(rng.choice([1, 2, 4, 7, 16]))
        most = max(gap, int(rng.choice([1, 3, 8, 50])))
        start, step = int(rng.integers(0, 200)), int(rng.integers(1, 20))
        images = range(start, start + int(rng.integers(1, 300)), step)
        listed = _spans(np.arange(images.start, images.stop, images.step), gap, most)
        spans = _spans(images, gap, most)
        assert all(isinstance(s, range) for s in spans)
        assert [list(s) for s in spans] == [list(s) for s in listed], (images, gap, most)
        checked += len(spans) > 1
    assert checked > 1000


# ------------------------------------------------------------------ several readers of one run in one process
def test_two_readers_of_a_live_run_in_one_process_read_every_committed_image_while_it_grows(tmp_path):
    """HDF5 shares a file's datasets among all its handles in a process, so one reader refreshing its arrays broke the
    other's reads ("can't insert duplicate key", refused after the read deadline, naming the other handles). Readers
    of one file share one handle: each refreshes, the other reads every image it counts, through arrays taken before
    and after, each value as the writer wrote it."""
    path = _laid_out(tmp_path)
    with _Writer(path) as child, open_run(path) as one, open_run(path) as two:
        held = {run: {name: run.array(name) for name in NAMES} for run in (one, two)}
        for batch in range(4):
            n = child.commit(3)  # 3 images: a batch across a chunk boundary
            first, second = (one, two) if batch % 2 else (two, one)
            before = second.n
            assert first.refresh() == n
            _check(first, n)
            for k, name in enumerate(NAMES):  # the other reader, not refreshed yet, reads what it counts
                np.testing.assert_array_equal(second.array(name)[:], _rows(k, 0, before))
                np.testing.assert_array_equal(held[second][name][1:], _rows(k, 1, 2))
            assert second.refresh() == n
            _check(second, n)
            _check(first, n)
            for run in (one, two):
                for k, name in enumerate(NAMES):
                    np.testing.assert_array_equal(held[run][name][:], _rows(k, 0, 2))


def test_a_reader_opening_the_shared_file_anew_takes_the_other_readers_arrays_with_it(tmp_path, monkeypatch):
    """A read that fails (here: a raw h5py handle in this process breaks the dataset) opens the file anew for every
    reader sharing it: the other reader's arrays, taken before, read on through the new handle."""
    path = _laid_out(tmp_path)
    with _Writer(path) as child, open_run(path) as one, open_run(path) as two:
        held = two.array("a")
        other = h5py.File(path, "r", swmr=True, locking=False)
        n, broken = _broken_by_another_handle(one, other, child)
        pauses = _Pauses(at_first_pause=other.close)
        monkeypatch.setattr(_hdf5, "_clock", pauses.monotonic)
        monkeypatch.setattr(_hdf5, "_sleep", pauses.sleep)
        np.testing.assert_array_equal(one.array("a")[:], _rows(0, 0, n))
        assert pauses.sleeps == [_hdf5.FIRST_PAUSE_S] and not broken.id.valid
        np.testing.assert_array_equal(held[:], _rows(0, 0, 2))
        assert two.refresh() == n
        _check(two, n)
        np.testing.assert_array_equal(two.array("a")[:], _rows(0, 0, n))


def test_the_shared_handle_closed_under_an_open_reader_is_opened_anew_at_its_next_read(tmp_path):
    """Another reader's opening anew that failed leaves the shared handle closed (it raised that reader's error):
    a reader still open opens the file anew at its next read rather than calling itself closed."""
    path = _laid_out(tmp_path)
    with _Writer(path) as child, open_run(path) as one, open_run(path) as two:
        n = child.commit(3)
        one.file.close()  # as a failed opening anew leaves it
        assert two.refresh() == n
        _check(two, n)
        _check(one, 2)  # as counted before, through the handle opened anew
        assert one.refresh() == n
        _check(one, n)


def test_each_reader_closes_alone_and_the_file_with_the_last(tmp_path):
    """Readers sharing a handle close one at a time: a closed one says so, the others (and a run verified meanwhile,
    as `qkhooks info --verify` does) read on; the handle closes with the last, and a reader opened later opens it
    anew."""
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "m", "config": "{}"}, dtype="float32", chunk_images=2) as w:
        for b in range(3):
            w.write_batch([f"im{2 * b}", f"im{2 * b + 1}"],
                          {name: _rows(k, 2 * b, 2 * b + 2) for k, name in enumerate(NAMES)})
    one, two = open_run(path), open_run(path)
    handle = one.file
    assert two.file is handle and not handle.swmr_mode
    a = one.array("a")
    one.close()
    for read in (lambda: a[:], lambda: one.ids, lambda: one.refresh()):
        with pytest.raises(QKHooksError, match="is closed .*open the run again"):
            read()
    assert "closed" in repr(one) and "closed" not in repr(two)
    assert verify_run(path).ok
    _check(two, 6)
    two.close()
    assert not handle.id.valid
    with open_run(path) as three:
        assert three.file is not handle
        _check(three, 6)
