"""Round 22 (reading): a slice of the image axis reaches HDF5 without an index array of its images."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest

from qkhooks.store import reader
from qkhooks.store.reader import RunArray, _spans


class KeyLog:
    """An h5py dataset that records the keys it is indexed with."""

    def __init__(self, dataset: h5py.Dataset):
        self.dataset, self.keys = dataset, []

    def __getitem__(self, key):
        self.keys.append(key if isinstance(key, tuple) else (key,))
        return self.dataset[key]

    def __getattr__(self, name):
        return getattr(self.dataset, name)


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
