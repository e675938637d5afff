"""Round 30 (read): kills of `RunArray._read`'s mutants left out of round 28 (`_1`-`_94`, `_140`-`_142`), module
"round30read". Each read of a RunArray is checked against numpy on the committed rows read whole by h5py, or against
the exact words of its refusal."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from qkhooks.store.reader import RunArray
from conftest import KeyLog

N = 5  # committed images; the dataset holds two more, uncommitted, which no read may show


@pytest.fixture
def stored(tmp_path):
    """A (N + 2, 3, 4) float32 dataset chunked by 2 images, and its first N rows read whole by h5py."""
    values = np.arange((N + 2) * 3 * 4, dtype=np.float32).reshape(N + 2, 3, 4)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("a", data=values, chunks=(2, 3, 4), maxshape=(None, 3, 4))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        yield f["a"], f["a"][:N]


def test_an_integer_image_with_numpys_keys_on_the_other_axes_is_numpys_answer(stored):
    """One image with keys HDF5 refuses on the other axes (a list, a backward slice): numpy's answer on the rows
    read whole, for positive and negative image numbers."""
    dataset, whole = stored
    array = RunArray(dataset, N)
    for key in [(0, [2, 0]), (-1, slice(None, None, -1)), (3, slice(None), [3, 3, 0]), (-N, [1], slice(2, None, -1))]:
        got, want = array[key], whole[key]
        assert got.shape == want.shape and np.array_equal(got, want), key


def test_an_ellipsis_standing_for_no_axis_is_numpys_answer(stored):
    """``...`` with every axis given beside it stands for no axis (numpy's rule), wherever it is; with one index too
    many it is still refused as numpy refuses it (_25: one axis always filled in for ``...``)."""
    dataset, whole = stored
    array = RunArray(dataset, N)
    for key in [(0, Ellipsis, 1, 2), (Ellipsis, -1, 2, 3), (1, 2, 3, Ellipsis), ([3, 1], Ellipsis, 0, slice(None)),
                (slice(None, None, -1), Ellipsis, [2, 0], 1)]:
        got, want = array[key], whole[key]
        assert got.shape == want.shape and np.array_equal(got, want), key
    with pytest.raises(IndexError) as err:
        array[0, Ellipsis, 1, 2, 3]
    assert str(err.value) == "too many indices: the array has 3 axes (5, 3, 4), 4 were given."


def test_one_image_with_hdf5s_own_keys_on_the_other_axes_reads_only_those_bytes(stored):
    """An integer image with integers and forward slices on the other axes reaches HDF5 as that one key, the image
    counted from the committed end when negative (the docstring's "only those bytes are read"; _88: the whole image
    read and picked in numpy)."""
    dataset, whole = stored
    for key, sent in [((2,), (2,)), ((3, 1, slice(1, 3)), (3, 1, slice(1, 3))), ((-1, slice(None), 2), (N - 1, slice(None), 2)),
                      ((np.int64(-N), slice(0, 3, 2)), (0, slice(0, 3, 2)))]:
        log = KeyLog(dataset)
        got = RunArray(log, N)[key]
        assert got.shape == whole[key].shape and np.array_equal(got, whole[key]), key
        assert log.keys == [sent], (key, log.keys)


def test_one_image_with_numpys_keys_on_the_other_axes_reads_that_image_alone(stored):
    """An integer image with a list or a backward slice on another axis reads that one image (one contiguous read of
    one row, never the row after it: for the last committed image that is an uncommitted one), then picks in numpy
    (_92: two rows read)."""
    dataset, whole = stored
    for key, image in [((3, [2, 0]), 3), ((-1, slice(None, None, -1)), N - 1), ((N - 1, 0, [3, 3, 1]), N - 1)]:
        log = KeyLog(dataset)
        got = RunArray(log, N)[key]
        assert got.shape == whole[key].shape and np.array_equal(got, whole[key]), key
        assert log.keys == [(slice(image, image + 1),)], (key, log.keys)


def test_new_axes_among_index_arrays_of_an_array_larger_than_memory_read_only_the_image_asked_for(tmp_path):
    """The shape numpy gives a key with new axes is taken on a zero-stride stand-in of the array, which holds one byte
    whatever the array's size: picking from it with index arrays reads that byte only. Here 2**57 images of two
    bytes (never written: HDF5's fill value but the last), so a stand-in with any non-zero stride (_33, _36: numpy's
    contiguous strides; _43: one byte an axis) reads 2**57 bytes past its one byte, outside any process's memory (a
    segfault). The answer is h5py's read of the same image."""
    n = 2**57
    with h5py.File(tmp_path / "big.h5", "w") as f:
        dataset = f.create_dataset("a", shape=(n, 2), dtype=np.uint8, chunks=(1, 2), fillvalue=7)
        dataset[n - 1] = [3, 9]
    with h5py.File(tmp_path / "big.h5", "r") as f:
        array = RunArray(f["a"], n)
        for key, want in [((n - 1, None, [1]), [[9]]), ((-1, None, [0, 1]), [[3], [9]]),
                          ((np.array([n - 1, 0]), None, [1, 0]), [[9], [7]])]:
            got = array[key]
            assert got.shape == np.shape(want) and got.tolist() == want, key
        assert f["a"][n - 1].tolist() == [3, 9] and f["a"][0].tolist() == [7, 7]  # the reference, read by h5py
