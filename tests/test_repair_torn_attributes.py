"""Round 45: ``repair`` of a run cut inside the heap collection that holds an attribute's string never returned:
HDF5 spins without end reading a variable-length string whose collection the cut tore (round 44 fixed it for the
ids and the skipped list, ``_strings_outside``). In the default layout, a merged ``--checksum`` run (``merge --copy``)
writes its attribute digests last, in a collection at the file's end: 5 of 7 cuts inside it hung in ``_seal_copy``
(of 161 cuts of 9 kinds of run, each cut inside every heap collection: finished, killed, resumed, a shard, a merged
copy and view, with and without --checksum, and one with long attributes a user added, which hung in ``_copy_attrs``
4 times). Repair now reads each attribute message's reference off the raw bytes (``_attrs_outside``) and asks HDF5
for none whose collection is not wholly in the file: that attribute is lost and named."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import timm
import torch

import qkhooks
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import format as fmt
from qkhooks.store import open_run
from qkhooks.stream import record_dataset

repair_module = importlib.import_module("qkhooks.store.repair")  # the module (qkhooks.store.repair is its function)

# the report as JSON: the child is killed if it spins (the hang this guards against)
_REPAIR_CHILD = """
import json, sys, warnings
from qkhooks.store import repair
warnings.simplefilter("ignore")
report = repair(sys.argv[1], sys.argv[2])
print(json.dumps({"recovered": report.recovered, "lost": report.lost, "problems": report.problems,
                  "states": report.states}))
"""


def _tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32,
                                                depth=1, num_heads=2).eval())


def _collections(path: Path) -> list[tuple[int, int]]:
    """(address, size) of each global heap collection ("GCOL", version, 3 reserved bytes, 8-byte size)."""
    data = path.read_bytes()
    at, found = data.find(b"GCOL"), []
    while at >= 0:
        found.append((at, int.from_bytes(data[at + 8:at + 16], "little")))
        at = data.find(b"GCOL", at + 1)
    return found


def _repair_in_child(cut: Path, fixed: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _REPAIR_CHILD, str(cut), str(fixed)], env=env, timeout=60,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"repair of {cut.name} cut inside a heap collection did not return in 60 s")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _cut(path: Path, at: int) -> Path:
    cut = path.with_name("cut.h5")
    cut.write_bytes(path.read_bytes()[:at])
    return cut


def test_a_merged_checksum_run_cut_inside_its_attribute_digests_collection_is_repaired(tmp_path):
    """A merged --checksum copy writes its attribute digests last, in a collection at the file's end; a cut 64 bytes
    into it (its header in the file, its strings not) hung in ``_seal_copy``. Now every image is recovered, the
    digests are named as past the file's end, and the copy, carrying none, opens with every id of the merge."""
    out = tmp_path / "run.h5"
    for rank in range(2):
        record_dataset(_tiny_vit(), "o3:4:1", shard_path(out, rank, 2), shard=(rank, 2), modes=8, attention="rows",
                       batch_size=2, progress=False, checksum=True)
    merge_shards(out, copy=True)
    with h5py.File(out, "r") as f:
        ids = [fmt.as_str(s) for s in f[fmt.IDS][:]]
    last, size = _collections(out)[-1]
    assert last + size == out.stat().st_size  # the case: the digests' collection ends the file
    fixed = tmp_path / "fixed.h5"
    report = _repair_in_child(_cut(out, last + 64), fixed)
    assert report["recovered"] == ids and report["lost"] == []
    assert any(fmt.ATTR_DIGESTS in line and "past the file's end" in line for line in report["problems"])
    with open_run(fixed) as run:
        assert run.ids == ids


def test_a_root_attribute_whose_string_a_cut_tore_is_lost_and_named_and_the_others_are_copied(tmp_path):
    """An attribute added to a finished run lands in a new collection at the file's end; a cut inside it hung in
    ``_copy_attrs``. Now that attribute alone is lost (named), the others are copied equal to the run's, and every
    image is recovered."""
    run = tmp_path / "run.h5"
    record_dataset(_tiny_vit(), "o3:4:1", run, modes=2, batch_size=2, progress=False, reducers=[])
    with h5py.File(run, "a") as f:
        f.attrs["note"] = "n" * 3000
        ids = [fmt.as_str(s) for s in f[fmt.IDS][:]]
        config = fmt.as_str(f.attrs["config"])
    last, size = _collections(run)[-1]
    assert last + size == run.stat().st_size
    fixed = tmp_path / "fixed.h5"
    report = _repair_in_child(_cut(run, last + 64), fixed)
    assert report["recovered"] == ids and report["lost"] == []
    assert "root attribute note lost: its string lies past the file's end" in report["problems"]
    with h5py.File(fixed, "r") as f:
        assert "note" not in f.attrs and fmt.as_str(f.attrs["config"]) == config


def test_only_a_run_whose_cut_tore_a_heap_collection_is_searched_attribute_by_attribute(tmp_path, monkeypatch):
    """The search per attribute name reads the whole file once per name; it runs only where some collection runs
    past the file's end. An uncut run repairs without it (a search would raise here); the same run cut inside its
    last collection finds the one attribute whose string is there, and no other."""
    run = tmp_path / "run.h5"
    record_dataset(_tiny_vit(), "o3:4:1", run, modes=2, batch_size=2, progress=False, reducers=[])
    with h5py.File(run, "a") as f:
        f.attrs["note"] = "n" * 3000
        names = set(f.attrs) | set(f["images"].attrs)

    def searched(*args: object) -> None:
        raise AssertionError("searched attribute by attribute")

    with monkeypatch.context() as patch:
        patch.setattr(repair_module, "attribute_message", searched)
        report = qkhooks.store.repair(run, tmp_path / "fixed.h5")
        assert report.lost == [] and report.problems == []
        assert repair_module._attrs_outside(run, names, run.stat().st_size) == set()
    last, _ = _collections(run)[-1]
    cut = _cut(run, last + 64)
    assert repair_module._attrs_outside(cut, names, cut.stat().st_size) == {"note"}


def _garbled_in_place(path: Path, text: bytes) -> None:
    """Two bytes of ``text`` (a string stored once in the file's global heap) overwritten in place with bytes that are
    not UTF-8, as damage on the disk would: no h5py edit."""
    data = bytearray(path.read_bytes())
    at = data.find(text)
    assert at >= 0 and data.find(text, at + 1) < 0
    data[at + len(text) // 2:at + len(text) // 2 + 2] = b"\xff\x01"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("checksum", [True, False])
def test_a_root_attribute_whose_string_damage_made_invalid_utf8_is_copied_byte_for_byte(tmp_path, checksum):
    """Bytes of an attribute's string damaged into invalid UTF-8 (round 49's sweep: 64 bytes of a --checksum run's
    metadata, inside its attribute digests): h5py reads the value with surrogate escapes, and repair wrote it back as
    a str, which h5py cannot encode: a raw UnicodeEncodeError instead of a copy. Now every image is recovered and the
    attribute's bytes are copied as they are (a damaged digest entry keeps failing in the copy, as the report says)."""
    run = tmp_path / "run.h5"
    record_dataset(_tiny_vit(), "o3:4:1", run, modes=2, batch_size=2, progress=False, reducers=[], checksum=checksum)
    name = fmt.ATTR_DIGESTS if checksum else "note"
    with h5py.File(run, "a") as f:
        if not checksum:
            f.attrs["note"] = "a note of the user's own, " * 4
        ids = [fmt.as_str(s) for s in f[fmt.IDS][:]]
        raw = f.attrs[name].encode()
    _garbled_in_place(run, raw)
    with h5py.File(run, "r") as f:
        damaged = f.attrs[name].encode("utf-8", "surrogateescape")
    assert damaged != raw and len(damaged) == len(raw)
    fixed = tmp_path / "fixed.h5"
    report = _repair_in_child(run, fixed)
    assert report["recovered"] == ids and report["lost"] == []
    with h5py.File(fixed, "r") as f:
        assert f.attrs[name].encode("utf-8", "surrogateescape") == damaged
    if checksum:
        assert any(fmt.ATTR_DIGESTS in line and "does not parse" in line for line in report["problems"])
