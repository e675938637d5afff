"""A relative term (``relative/L{l}``: SAM's decomposed relative positions, laid out as the maps) is all zero where the
model's tables are (timm initialises them to zero): a recorded value. Since format 4 such a row is stored as -0.0
(``format.signed_zero_rows``), so a --checksum chunk of zero bytes is a zeroed page there, refused by every reader and
named by verify; in files of older formats, whose writers stored it as +0.0, it is read as zeros, as before."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks import QKHooksError
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.store import format as fmt

NAME = "relative/L0"


def _run(path: Path) -> np.ndarray:
    values = np.random.default_rng(2).standard_normal((6, 2, 3, 3)).astype(np.float16)
    values[1] = 0  # a model whose tables are zero for this image's term
    with RunWriter(path, checksum=True) as writer:
        for lo in (0, 3):
            writer.write_batch([f"im{i}" for i in range(lo, lo + 3)], {NAME: values[lo:lo + 3]})
    return values


def _zero_chunk(path: Path, image: int) -> None:
    with h5py.File(path, "r") as f:
        info = f[NAME].id.get_chunk_info_by_coord((image, 0, 0, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))


def _repaired_copy_keeps_the_zero_row_signed(path, fixed, values) -> None:
    """A repair's copy is of format 4: the zero row it keeps (image 1's) is stored -0.0 there, and reads and verifies
    as the run's values."""
    assert repair(path, fixed).lost == []
    with h5py.File(fixed, "r") as f:
        assert int(f.attrs[fmt.FORMAT_ATTR]) == fmt.FORMAT and np.signbit(f[NAME][1]).all()
    with open_run(fixed) as run:
        np.testing.assert_array_equal(run.array(NAME)[:], values)
    assert verify_run(fixed).ok


def test_a_zero_relative_row_reads_as_zeros_and_a_zeroed_chunk_of_one_is_damage(tmp_path):
    path = tmp_path / "run.h5"
    values = _run(path)
    with h5py.File(path, "r") as f:
        assert np.signbit(f[NAME][1]).all()  # stored as -0.0: not zero bytes
    with open_run(path) as run:
        np.testing.assert_array_equal(run.array(NAME)[:], values)
    assert verify_run(path).ok
    _repaired_copy_keeps_the_zero_row_signed(path, tmp_path / "fixed.h5", values)
    _zero_chunk(path, 4)
    with open_run(path) as run, pytest.raises(QKHooksError, match=f"is damaged .*image 4's chunk.*{NAME}"):
        run.array(NAME)[4]
    assert verify_run(path).damaged.get(NAME) == [(4, 5)]


def test_in_a_run_before_format_4_a_zero_relative_chunk_reads_as_zeros_as_before(tmp_path):
    path = tmp_path / "run.h5"
    values = _run(path)
    _zero_chunk(path, 1)  # as a writer before format 4 stored the zero row: +0.0, its checksum 0
    with h5py.File(path, "r+") as f:
        f.attrs[fmt.FORMAT_ATTR] = np.int64(3)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.array(NAME)[:], values)
    assert verify_run(path).ok
    _repaired_copy_keeps_the_zero_row_signed(path, tmp_path / "fixed.h5", values)
