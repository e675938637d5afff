"""Verify and repair find each chunk's place on disk from one walk of the chunk index (``H5Dchunk_iter``), not one
lookup per chunk (whose cost grows with the chunks: quadratic in the images of a ``--checksum`` run, one image a
chunk). The walk must say exactly what the lookups say, and the rows it fails must be the lookups' rows."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import importlib

repair = importlib.import_module("qkhooks.store.repair")  # the module (qkhooks.store.repair is also its function)


def _array(path, rows: int = 40, skip: tuple[int, ...] = (7, 23)) -> None:
    """A per-image-like array of one row a chunk, checksummed, with the chunks of ``skip`` never written."""
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("a", shape=(rows, 3), maxshape=(None, 3), chunks=(1, 3), dtype="f4", fletcher32=True)
        for row in range(rows):
            if row not in skip:
                ds[row] = np.arange(3) + row


def test_the_walk_finds_what_the_lookups_find(tmp_path):
    path = tmp_path / "a.h5"
    _array(path)
    with h5py.File(path, "r") as f:
        ds = f["a"]
        walked = repair._chunk_locations(ds)
        looked_up = {row: repair._chunk_location(ds, row) for row in range(ds.shape[0])}
    assert walked is not None
    assert walked == {row: place for row, place in looked_up.items() if place[0] is not None}
    assert looked_up[7][0] is None and looked_up[23][0] is None and 7 not in walked


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_failing_rows_agree_with_chunk_by_chunk_lookups(tmp_path, monkeypatch, cut):
    """Missing chunks, and chunks past a truncated file's end (the last ``cut`` written chunks), fail the same rows
    whether the walk or the lookups place them."""
    path = tmp_path / "a.h5"
    _array(path)
    with h5py.File(path, "r") as f:
        ds = f["a"]
        places = sorted((offset + size, row) for row, (offset, size) in repair._chunk_locations(ds).items())
        real_size = places[-cut - 1][0] if cut else path.stat().st_size  # the file as if cut after that chunk
        walked = repair._failing_rows(ds, ds.shape[0], real_size)
        monkeypatch.setattr(repair, "_chunk_locations", lambda ds: None)
        looked_up = repair._failing_rows(ds, ds.shape[0], real_size)
    assert walked == looked_up
    failed = {lo for lo, _ in walked[0]}
    assert failed == {7, 23} | {row for _, row in places[len(places) - cut:]}


def test_the_walk_replaces_the_lookups(tmp_path, monkeypatch):
    """Where the walk is offered, no chunk is looked up by coordinate (the lookups are what made verify quadratic)."""
    path = tmp_path / "a.h5"
    _array(path)

    def no_lookup(ds, row):
        raise AssertionError(f"row {row} looked up by coordinate")

    monkeypatch.setattr(repair, "_chunk_location", no_lookup)
    with h5py.File(path, "r") as f:
        failing, why = repair._failing_rows(f["a"], 40, path.stat().st_size)
    assert failing == [(7, 8), (23, 24)] and "missing" in why
