"""The words for an id whose heap block (HDF5's global heap collection: variable-length strings) is damaged are true
to what HDF5 does with that block: it refuses to read a block whose header is not a collection's (an id's address
flipped, its header overwritten) or whose objects run past its end (h5py raises, checked here), and walks without end
over a stretch of zeros inside one (never asked of HDF5 here). Before, every case said "HDF5 would read it without
end"."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks.store import RunWriter, repair, verify_run
from qkhooks.store import format as fmt


def _run(path: Path) -> None:
    with RunWriter(path) as writer:
        writer.write_batch([f"image_{i:04d}.png" for i in range(12)], {"maps/a": np.ones((12, 3), np.float32)})


def _collection(path: Path) -> int:
    """The address of the heap collection holding the ids (read off their chunk's raw references: a 4-byte length,
    the collection's address, a 4-byte index), not the one holding the root's attributes."""
    with h5py.File(path, "r") as f:
        raw = f[fmt.IDS].id.read_direct_chunk((0,))[1]
    refs = np.frombuffer(raw[:12 * 16], np.dtype([("length", "<u4"), ("address", "<u8"), ("index", "<u4")]))
    assert len(set(refs["address"].tolist())) == 1
    return int(refs["address"][0])


def _edit(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)


def _words(path: Path, tmp_path: Path) -> tuple[str, str]:
    """What verify says of the ids' lost rows, and the error of reading them (open_run's path). Repair's line for
    them says only "their ids do not read": checked to claim nothing else."""
    line = next(p for p in verify_run(path).problems if p.startswith(f"/{fmt.IDS}"))
    fixed = [p for p in repair(path, tmp_path / "fixed.h5").problems if p.startswith(f"/{fmt.IDS}")]
    assert fixed == ["/images/ids: rows 0-11 do not read (their ids do not read)"]
    with h5py.File(path, "r") as f, pytest.raises(OSError) as read:
        fmt.read_ids(f, 12)
    return line, str(read.value)


def _hdf5_refuses(path: Path) -> None:
    """HDF5's own read of the ids raises (the independent reference for "refuses")."""
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        f[fmt.IDS][:12]


@pytest.mark.parametrize("damage", ["header", "objects past the end"])
def test_a_heap_block_hdf5_refuses_is_said_to_be_refused_not_read_without_end(tmp_path, damage):
    path = tmp_path / "run.h5"
    _run(path)
    at = _collection(path)
    if damage == "header":
        _edit(path, at, bytes(4))  # its signature overwritten
    else:
        _edit(path, at + 16 + 8, (10 ** 6).to_bytes(8, "little"))  # its first object's size past the block's end
    _hdf5_refuses(path)
    for words in _words(path, tmp_path):
        assert "without end" not in words and "HDF5 refuses to read" in words, words
        assert ("header" in words) == (damage == "header") and ("run past its end" in words) != (damage == "header")


def test_a_heap_block_with_a_zeroed_stretch_inside_is_said_to_be_walked_without_end(tmp_path):
    path = tmp_path / "run.h5"
    _run(path)
    _edit(path, _collection(path) + 16 + 64, bytes(64))  # a zeroed stretch among its objects (HDF5 would spin)
    for words in _words(path, tmp_path):
        assert "zeros inside" in words and "without end" in words and "refuses" not in words, words
