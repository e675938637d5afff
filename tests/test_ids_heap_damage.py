"""Damage in the heap that holds the image ids (variable-length strings, no checksum of HDF5's own).

Round 50: a zeroed disk page inside a global heap collection of image ids. HDF5 walks a collection's objects by
each one's size and never checks the step, so an object header read as zeros (index 0, size 0) keeps it in place for
ever: ``open_run(...).ids``, ``verify_run`` and ``repair`` of a 1,200-image ``--checksum`` run with a zeroed 4 KiB page
over the tail of the ids' collection never returned (2 of 10 zeroed pages in round 50's cut-scan). Such a collection
is now read off its raw bytes first and never asked of HDF5: readers refuse naming repair, verify names the rows,
repair loses exactly the images whose ids it holds and lists them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import child_json
from qkhooks import QKHooksError
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.store import format as fmt

CHILD = """
import json, sys, warnings
from qkhooks import QKHooksError
from qkhooks.store import open_run, repair, verify_run
warnings.simplefilter("ignore")
out = {}
with open_run(sys.argv[1]) as run:
    try:
        run.ids
    except QKHooksError as exc:
        out["read"] = str(exc)
report = verify_run(sys.argv[1])
out["verify"] = [report.ok, {k: [list(s) for s in v] for k, v in report.damaged.items()}]
fixed = repair(sys.argv[1], sys.argv[2])
out["repair"] = [fixed.lost, fixed.recovered]
print(json.dumps(out))
"""


def _run(path: Path) -> tuple[list[str], np.ndarray]:
    ids = [f"photo-{i:04d}.png" for i in range(300)]
    values = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    with RunWriter(path, dtype="float32") as writer:
        for lo in range(0, 300, 20):
            writer.write_batch(ids[lo:lo + 20], {"v": values[lo:lo + 20]})
    return ids, values


def test_a_zeroed_page_inside_a_heap_collection_of_ids_is_refused_verified_and_repaired_never_spun_on(tmp_path):
    run = tmp_path / "run.h5"
    ids, values = _run(run)
    data = bytearray(run.read_bytes())
    collections = [at for at in range(len(data)) if data.startswith(b"GCOL", at)]
    at = data.find(b"photo-0150.png")  # an id's string in its collection, the object's 16-byte header before it
    start = max(c for c in collections if c < at)
    end = start + int.from_bytes(data[start + 8:start + 16], "little")
    assert start < at < end
    data[at - 16:end] = bytes(end - at + 16)  # that object and the rest of its collection zeroed, as a page leaves them
    run.write_bytes(bytes(data))
    # the images whose id strings the intact file holds in that collection: read off the bytes, not through HDF5
    intact = bytes(data[:start]) + bytes(data[end:])
    held = [row for row, name in enumerate(ids) if name.encode() not in intact]
    assert 150 in held and 0 < len(held) < len(ids)

    got = child_json(CHILD, run, tmp_path / "fixed.h5",
                     what="a read, verify or repair of a run with a zeroed heap collection")
    assert f"image {held[0]}'s id" in got["read"] and "qkhooks repair" in got["read"]
    ok, damaged = got["verify"]
    assert not ok and damaged[fmt.IDS] == [list(span) for span in fmt.row_spans(held)]
    lost, recovered = got["repair"]
    assert lost == held and recovered == [name for row, name in enumerate(ids) if row not in held]
    with open_run(tmp_path / "fixed.h5") as fixed:
        assert fixed.ids == recovered
        np.testing.assert_array_equal(fixed.array("v")[:], np.delete(values, held, axis=0))
    with h5py.File(run, "r") as f:  # the damage is in the heap only: the references still point there
        assert f[fmt.IDS].shape == (300,)


def test_one_id_changed_to_bytes_that_are_not_utf8_loses_that_image_alone_and_is_said_by_name(tmp_path):
    """Round 50's sweep of a 1,200-image run without --checksum flipped one byte of one id's string in the heap: the
    reader's ``run.ids`` raised a raw UnicodeDecodeError, ``verify`` called every row of the ids' chunk unreadable, and
    ``repair`` recovered none of the 1,200 images. That id's image alone is lost now: the read refuses naming it and
    repair, verify names its row, repair leaves it out and keeps every other image as it was."""
    run = tmp_path / "run.h5"
    ids, values = _run(run)
    data = bytearray(run.read_bytes())
    assert data.count(b"photo-0150.png") == 1
    data[data.find(b"photo-0150.png")] = 0xBA  # no UTF-8 text starts so
    run.write_bytes(bytes(data))
    with open_run(run) as reader:
        with pytest.raises(QKHooksError, match=r"image 150's id is not UTF-8 text.*qkhooks repair"):
            reader.ids
    report = verify_run(run)
    assert not report.ok and report.damaged == {fmt.IDS: [(150, 151)]}, report.problems
    fixed = repair(run, tmp_path / "fixed.h5")
    assert fixed.lost == [150] and fixed.recovered == ids[:150] + ids[151:]
    with open_run(tmp_path / "fixed.h5") as got:
        assert got.ids == ids[:150] + ids[151:]
        np.testing.assert_array_equal(got.array("v")[:], np.delete(values, 150, axis=0))
