"""Damage in the heap that holds a run's string attributes (``/``, ``/images``, ``/model``: config, identity, model,
``model/info``, the attributes' digests), which carries no checksum of HDF5's own.

A zeroed disk page over such a global heap collection: HDF5 walks a collection's objects by each one's size and never
checks the step, so an object header read as zeros keeps it in place for ever. ``open_run`` of a ``--checksum`` run
(it reads every attribute against its digest) and ``run.config`` or ``verify_run`` of any run never returned. The
attributes' heap collections are now checked off the file's raw bytes as the run opens, never asked of HDF5: every
reader refuses with :class:`DamagedRunError` naming the attributes and ``qkhooks repair``, which still recovers every
image. The expected attributes are read off the intact file's bytes (where each value's text lies), not through the
code under test."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import child_json
from qkhooks.store import RunWriter, open_run, verify_run
from qkhooks.store import format as fmt

CONFIG = {"modes": 7, "note": "findme-c0nf"}
INFO = {"layers": [3], "marker": "inf0-q7k"}

READ_CHILD = """
import json, sys, warnings
import h5py
from qkhooks.store import open_run, verify_run
from qkhooks.store._hdf5 import unreadable_attributes
warnings.simplefilter("ignore")
with h5py.File(sys.argv[1], "r") as f:  # opening reads no attribute's string
    out = {"lost": unreadable_attributes(f)}
try:
    with open_run(sys.argv[1]) as run:
        out["config"] = run.config
except Exception as exc:
    out["read"] = [type(exc).__name__, str(exc)]
report = verify_run(sys.argv[1])
out["verify"] = [report.ok, report.problems, report.summary()]
print(json.dumps(out))
"""

REPAIR_CHILD = """
import json, sys, warnings
import numpy as np
from qkhooks.store import open_run, repair
warnings.simplefilter("ignore")
report = repair(sys.argv[1], sys.argv[2])
with open_run(sys.argv[2]) as fixed:
    print(json.dumps([report.recovered, report.problems, fixed.ids, fixed.array("v")[:].tolist()]))
"""

RESUME_CHILD = """
import json, sys, warnings
from qkhooks import QKHooksError
from qkhooks.store import RunWriter
warnings.simplefilter("ignore")
try:
    with RunWriter(sys.argv[1], mode="resume", dtype="float32", attrs=json.loads(sys.argv[2])):
        print(json.dumps("resumed"))
except QKHooksError as exc:
    print(json.dumps(str(exc)))
"""
ATTRS = {"model": "model-m0d3l", "config": json.dumps(CONFIG), "data": "photos-x9d4t4"}


def _run(path: Path, checksum: bool) -> np.ndarray:
    values = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    with RunWriter(path, dtype="float32", checksum=checksum, attrs=ATTRS) as writer:
        writer.write_static("model/info", json.dumps(INFO))
        writer.write_batch(["a", "b", "c"], {"v": values})
    return values


def _string_attributes(path: Path) -> dict[str, bytes]:
    """{``/OBJ@NAME``: its value's UTF-8 bytes} of every variable-length string attribute of ``/``, ``/images``,
    ``/model``, read through HDF5 on the intact file."""
    found = {}
    with h5py.File(path, "r") as f:
        for obj in (f, f["images"], f["model"]):
            for name in obj.attrs:
                if h5py.check_string_dtype(obj.attrs.get_id(name).dtype):
                    found[f"{obj.name}@{name}"] = fmt.as_str(obj.attrs[name]).encode()
    return found


def _zero_collection(path: Path, text: bytes) -> tuple[int, int]:
    """Zero the heap object holding ``text`` and the rest of its collection, as a zeroed disk page leaves them; returns
    the collection's [start, end) in the file."""
    data = bytearray(path.read_bytes())
    at = data.find(text)
    start = data.rfind(b"GCOL", 0, at)
    end = start + int.from_bytes(data[start + 8:start + 16], "little")
    assert start < at < end
    data[at - 16:end] = bytes(end - at + 16)
    path.write_bytes(bytes(data))
    return start, end


def _zero_attribute(run: Path, text: bytes) -> list[str]:
    """Zero the heap collection of ``run`` holding ``text`` from its object on; returns the attributes whose strings
    lay in that collection (as a reader names them), read off the intact bytes."""
    strings, intact = _string_attributes(run), run.read_bytes()
    for key, value in strings.items():
        assert intact.count(value) == 1, f"{key}'s value must be stored once to be found by its bytes"
    start, end = _zero_collection(run, text)
    return sorted(fmt.attr_words(key) for key, value in strings.items() if start <= intact.find(value) < end)


def _damaged(tmp_path: Path, checksum: bool) -> tuple[Path, np.ndarray, list[str]]:
    """A run whose attributes' heap collection is zeroed from the config on, its values, and the attributes whose
    strings lay in that collection."""
    run = tmp_path / "run.h5"
    values = _run(run, checksum)
    held = _zero_attribute(run, json.dumps(CONFIG).encode())
    assert "root attribute config" in held
    return run, values, held


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "plain"])
def test_a_zeroed_page_in_the_attributes_heap_is_refused_by_open_config_and_verify_never_spun_on(tmp_path, checksum):
    run, _, held = _damaged(tmp_path, checksum)
    got = child_json(READ_CHILD, run, what="open_run, run.config or verify_run of a run whose attributes' heap "
                                           "collection is zeroed")
    assert "config" not in got, "the config of a damaged heap must not be read"
    assert sorted(fmt.attr_words(key) for key in got["lost"]) == held
    kind, message = got["read"]
    assert kind == "DamagedRunError", message
    assert f"qkhooks repair {run}" in message
    for words in held:
        assert words in message, (words, message)
    ok, problems, summary = got["verify"]
    assert not ok
    assert any(all(words in line for words in held) for line in problems), problems
    assert "qkhooks repair" in summary


def test_an_attribute_added_with_h5py_in_a_heap_collection_of_its_own_is_named_alone(tmp_path):
    """A long attribute a user added (h5py's own message layout, in the header's continuation block, its string in a
    heap collection of its own): only it is named when that collection is zeroed, the run's own attributes in their
    intact collection are not."""
    run = tmp_path / "run.h5"
    _run(run, checksum=False)
    note = "user-n0te-" + "n" * 5000  # more than the run's own collection has free: a new collection
    with h5py.File(run, "a") as f:
        f.attrs["note"] = note
    held = _zero_attribute(run, note.encode())
    assert held == ["root attribute note"]
    got = child_json(READ_CHILD, run, what="open_run of a run whose added attribute's heap collection is zeroed")
    assert sorted(fmt.attr_words(key) for key in got["lost"]) == held
    kind, message = got["read"]
    assert kind == "DamagedRunError" and "(root attribute note lies in a heap block" in message, message


def test_a_resume_of_such_a_run_is_refused_naming_the_attributes_and_repair(tmp_path):
    run, _, held = _damaged(tmp_path, checksum=True)
    message = child_json(RESUME_CHILD, run, json.dumps(ATTRS), what="a resume of a run whose attributes' heap "
                                                                   "collection is zeroed")
    assert message.startswith(f"cannot resume {run}: it is damaged (") and f"qkhooks repair {run}" in message
    for words in held:
        assert words in message, (words, message)


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "plain"])
def test_repair_of_a_run_whose_attributes_heap_is_zeroed_keeps_every_image(tmp_path, checksum):
    """Repair asks none of those attributes of HDF5 for the copy, nor ``identity`` to tie the reducer checkpoint to the
    run (round 50: it did, and never returned): every image is recovered, the attributes lost are named, and the
    repaired file opens."""
    run, values, _ = _damaged(tmp_path, checksum)
    recovered, problems, ids, rows = child_json(REPAIR_CHILD, run, tmp_path / "fixed.h5",
                                                what="repair of a run whose attributes' heap collection is zeroed")
    assert recovered == ids == ["a", "b", "c"]
    np.testing.assert_array_equal(np.array(rows, np.float32), values)
    assert any(line.startswith("root attribute config lost") for line in problems), problems


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "plain"])
def test_an_intact_run_opens_and_reads_its_attributes(tmp_path, checksum):
    run = tmp_path / "run.h5"
    _run(run, checksum)
    with open_run(run) as reader:
        assert reader.config == CONFIG and reader.info == INFO and reader.model == "model-m0d3l"
    assert verify_run(run).ok
