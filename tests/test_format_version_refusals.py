"""Round 25: every run file carries its format number (root attribute ``qkhooks_format``). A resume, a merge, a repair
and ``--verify`` refuse a file of a newer format than this qkhooks writes (an older writer would leave it
inconsistent: round 24's digests, appended without), naming both numbers and the fix, and change nothing; readers
read it as before. Files without the attribute (written before it) resume, merge, repair and read as before. Values
are compared with what was written (numpy arrays, hashlib digests), the attributes' storage with HDF5's own object
info."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks import QKHooksError
from qkhooks.cli import main
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.store import format as fmt

BATCH = 3
# the root attributes record_dataset gives a run (stream.py), with the writer's ``complete`` and format: nine in all
ATTRS = {"qkhooks_version": "0", "model": "m", "config": json.dumps({"shard": None}), "model_note": "", "data": "d",
         "image_config": "{}", "identity": {"compute_dtype": "float32", "weights_sha256": "0" * 64}}


def ids_of(batch: int, prefix: str = "im") -> list[str]:
    return [f"{prefix}-{batch}-{i}" for i in range(BATCH)]


def maps(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((BATCH, 2, 5)).astype(np.float16)


def write(path: Path, batches: int = 2, first: int = 0, mode: str = "create", attrs: dict | None = None,
          prefix: str = "im") -> None:
    with RunWriter(path, mode=mode, attrs=ATTRS if attrs is None else attrs, checksum=True) as writer:
        for b in range(first, first + batches):
            writer.write_batch(ids_of(b, prefix), {"maps/a": maps(b)})


def set_format(path: Path, number: object | None) -> None:
    """Stamp the file with another format number (None: remove it, as in a file written before the number)."""
    with h5py.File(path, "r+") as f:
        del f.attrs[fmt.FORMAT_ATTR]
        if number is not None:
            f.attrs[fmt.FORMAT_ATTR] = number


def folder_state(folder: Path) -> dict[str, str]:
    """Every file of the folder by name, with its sha256: what a refusal must leave exactly as it was."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def refusal(number: int, doing: str) -> str:
    return (rf"cannot {doing} .*: it is a run file of format {number} \(root attribute {fmt.FORMAT_ATTR}\), newer "
            rf"than format {fmt.FORMAT}, the newest this qkhooks knows.*Upgrade qkhooks.*and {doing} it with that")


def test_a_new_run_a_merge_and_a_repair_carry_the_current_format_with_every_root_attribute_in_the_header(tmp_path):
    run = tmp_path / "run.h5"
    write(run)
    for rank in range(2):
        write(shard_path(tmp_path / "merged.h5", rank, 2), prefix=f"r{rank}",
              attrs={**ATTRS, "config": json.dumps({"shard": [rank, 2]})})
    merge_shards(tmp_path / "merged.h5", copy=True)
    set_format(run, None)  # a repair of a file from before the number writes the current one
    repair(run, tmp_path / "fixed.h5")
    for name in ("merged.h5", "fixed.h5", shard_path(tmp_path / "merged.h5", 0, 2).name):
        with h5py.File(tmp_path / name, "r") as f:
            value = f.attrs[fmt.FORMAT_ATTR]
            assert isinstance(value, np.integer) and int(value) == fmt.FORMAT == 4, name
            info = h5py.h5o.get_info(f.id)
            assert info.num_attrs == len(f.attrs) == 10, name  # 9, and the attributes' digests (round 39, --checksum)
            # compact storage: no attribute heap or name index, every attribute a message of the root's header
            assert (info.meta_size.attr.heap_size, info.meta_size.attr.index_size) == (0, 0), name


def test_a_resume_of_a_newer_format_is_refused_naming_both_numbers_and_leaves_every_byte(tmp_path):
    path = tmp_path / "run.h5"
    write(path)
    set_format(path, np.int64(fmt.FORMAT + 1))
    before = folder_state(tmp_path)
    with pytest.raises(QKHooksError, match=refusal(fmt.FORMAT + 1, "resume")):
        write(path, batches=1, first=2, mode="resume")
    assert folder_state(tmp_path) == before  # no lock file, no .creating left, the run byte for byte as it was
    with open_run(path) as run:  # reading it works: every part found by name, read exactly
        assert run.ids == ids_of(0) + ids_of(1)
        np.testing.assert_array_equal(run.array("maps/a")[:], np.concatenate([maps(0), maps(1)]))


def test_a_merge_a_repair_and_verify_refuse_a_newer_format_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "run.h5"
    for rank in range(2):
        write(shard_path(out, rank, 2), prefix=f"r{rank}", attrs={**ATTRS, "config": json.dumps({"shard": [rank, 2]})})
    newer = shard_path(out, 1, 2)
    set_format(newer, np.int64(fmt.FORMAT + 3))
    before = folder_state(tmp_path)
    with pytest.raises(QKHooksError, match=refusal(fmt.FORMAT + 3, "merge")) as raised:
        merge_shards(out)
    assert str(newer) in str(raised.value)
    with pytest.raises(QKHooksError, match=refusal(fmt.FORMAT + 3, "repair")):
        repair(newer, tmp_path / "fixed.h5")
    with pytest.raises(QKHooksError, match=refusal(fmt.FORMAT + 3, "verify")):
        verify_run(newer)
    assert folder_state(tmp_path) == before
    assert main(["repair", str(newer), "--out", str(tmp_path / "fixed.h5")]) == 2
    assert main(["info", str(newer), "--verify"]) == 2
    err = capsys.readouterr().err
    assert [line.split()[:4] for line in err.splitlines()] == [["qkhooks:", "error:", "cannot", "repair"],
                                                              ["qkhooks:", "error:", "cannot", "verify"]]
    assert err.count(f"it is a run file of format {fmt.FORMAT + 3}") == 2 and err.count("Upgrade qkhooks") == 2
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("value", ["2", 1.0, True, -1], ids=["string", "float", "bool", "negative"])
def test_a_format_attribute_qkhooks_never_writes_is_refused_on_resume(tmp_path, value):
    path = tmp_path / "run.h5"
    write(path)
    set_format(path, value)
    before = folder_state(tmp_path)
    with pytest.raises(QKHooksError, match=rf"cannot resume .*its root attribute {fmt.FORMAT_ATTR} is .*not a run-file "
                                           "format number qkhooks writes"):
        write(path, batches=1, first=2, mode="resume")
    assert folder_state(tmp_path) == before


def test_files_without_the_format_number_resume_merge_repair_and_read_as_before(tmp_path):
    """A file written before the number (format 0) is resumed in its own layout: it keeps having no number (an
    attribute cannot be added in SWMR mode, and the layout it describes is the file's own)."""
    path = tmp_path / "run.h5"
    write(path)
    set_format(path, None)
    write(path, batches=1, first=2, mode="resume")
    written = ids_of(0) + ids_of(1) + ids_of(2)
    with h5py.File(path, "r") as f:
        assert fmt.FORMAT_ATTR not in f.attrs
        digests = np.array([list(hashlib.blake2b(i.encode(), digest_size=16).digest()) for i in written], np.uint8)
        np.testing.assert_array_equal(f[fmt.ID_DIGESTS][()], digests)
    with open_run(path) as run:
        assert run.ids == written and run.complete
        np.testing.assert_array_equal(run.array("maps/a")[:], np.concatenate([maps(b) for b in range(3)]))
    assert verify_run(path).ok
    out = tmp_path / "merged.h5"
    for rank in range(2):
        write(shard_path(out, rank, 2), prefix=f"r{rank}", attrs={**ATTRS, "config": json.dumps({"shard": [rank, 2]})})
        set_format(shard_path(out, rank, 2), None)
    merge_shards(out, copy=True)
    with open_run(out) as run:
        assert run.ids == ids_of(0, "r0") + ids_of(1, "r0") + ids_of(0, "r1") + ids_of(1, "r1")
    fixed = repair(path, tmp_path / "fixed.h5")
    assert fixed.recovered == written and not fixed.lost
    assert sorted(os.listdir(tmp_path)) == sorted(["fixed.h5", "merged.h5", "run.h5",
                                                   *(shard_path(out, r, 2).name for r in range(2))])
