"""Tests written to kill mutants of stream, store (writer, reader, format), data/preprocess and the analyses'
statistics (topk, anisotropy) that survived the rest of the suite in round 12 (tests/MUTATION.md), each against an
independent reference: numpy, a direct computation, or a run file read back with h5py."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from qkhooks import QKHooksError
from qkhooks.store import RunWriter, open_run
from qkhooks.store import format as fmt


# ------------------------------------------------------------------------------------------------ store
def test_a_checkpoint_keeps_scalars_in_its_json_and_arrays_as_members_numpy_scalars_as_plain_numbers(tmp_path):
    """The checkpoint archive read with numpy alone: numpy and Python scalars in ``__meta__``'s JSON as plain numbers
    and strings, arrays and tensors as members (copied when queued: changed afterwards, the checkpoint keeps the old
    values)."""
    out = tmp_path / "run.h5"
    total = np.arange(3.0)
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a", "b"], {"v": np.ones((2, 2), np.float32)})
        w.write_checkpoint({"r": {"count": np.int64(3), "mean": np.float32(0.5), "n": 4, "name": "x", "total": total,
                                  "t": torch.tensor([1.0, 2.0])}})
        total[:] = -1  # a reducer keeps updating its buffers after the checkpoint was queued
        w.flush()
        with np.load(fmt.checkpoint_path(out), allow_pickle=False) as archive:
            assert sorted(archive.files) == ["__meta__", "r/t", "r/total"]
            meta = json.loads(str(archive["__meta__"]))
            np.testing.assert_array_equal(archive["r/total"], [0.0, 1.0, 2.0])
            np.testing.assert_array_equal(archive["r/t"], [1.0, 2.0])
        assert meta == {"images": 2, "scalars": {"r": {"count": 3, "mean": 0.5, "n": 4, "name": "x"}}}
        images, states = w.checkpoint()
        assert images == 2 and {k: states["r"][k] for k in ("count", "mean", "n", "name")} == meta["scalars"]["r"]
        assert type(states["r"]["count"]) is int and type(states["r"]["name"]) is str


def test_a_full_disk_gives_back_the_lock_files_reserve_and_keeps_the_batches_committed_before_it(tmp_path, monkeypatch):
    """The free-space check meets a full disk at the second batch: the error names the committed count, the lock
    file's reserved MiB goes back to the file system (so that closing can flush), and the run keeps its first batch."""
    from qkhooks.store import writer as writer_module
    from qkhooks.store.lock import RESERVE_BYTES

    out = tmp_path / "run.h5"
    lock = fmt.lock_path(out)
    w = RunWriter(out, dtype="float32")
    w.write_batch(["a", "b"], {"v": np.arange(4.0, dtype=np.float32).reshape(2, 2)})
    w.flush()
    note = json.loads(lock.read_bytes().split(b"\n", 1)[0])
    note_size = len(json.dumps(note)) + 1
    assert lock.stat().st_size == note_size + RESERVE_BYTES

    class FullDisk:
        free = 1000

    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda path: FullDisk())
    w.write_batch(["c"], {"v": np.ones((1, 2), np.float32)})
    with pytest.raises(QKHooksError) as err:
        w.flush()
    assert str(err.value) == ("disk full while writing run.h5: 2 images are committed and safe; free space and run the "
                              "same command with --resume")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert lock.stat().st_size == note_size  # the reserve given back
    w.close()
    with open_run(out) as run:
        assert run.ids == ["a", "b"] and not run.complete
        np.testing.assert_array_equal(run.array("v")[:], np.arange(4.0).reshape(2, 2))


def test_resuming_a_file_that_is_not_a_run_or_a_merge_of_shards_is_refused_with_the_whole_reason(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["images/ids"] = np.array([b"a"])
    with pytest.raises(QKHooksError) as err:
        RunWriter(other, mode="resume")
    assert str(err.value) == f"cannot resume {other}: it is not a qkhooks run file; use --overwrite."
    merged = tmp_path / "merged.h5"
    with RunWriter(merged, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
    with h5py.File(merged, "a") as f:
        f["images"].attrs["shards"] = "[\"s0.h5\", \"s1.h5\"]"
    with pytest.raises(QKHooksError) as err:
        RunWriter(merged, mode="resume")
    assert str(err.value) == (f"cannot resume {merged}: it is a merge of shard files ([\"s0.h5\", \"s1.h5\"]); resume the "
                              "shards with the same torchrun command plus --resume, which merges again.")
    assert not fmt.lock_path(other).exists() and not fmt.lock_path(merged).exists()  # a refusal releases the lock


def test_a_string_static_is_an_attribute_of_the_group_its_path_names_and_the_layout_marks_the_run_incomplete(tmp_path):
    """``a/b/c`` as a string is attribute ``c`` of group ``a/b`` (a dataset ``a/b/c`` otherwise); the file laid out
    and published says ``complete = False`` until its writer closes it complete."""
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_static("spectrum/L0/note", "made by hand")
        w.write_static("spectrum/L0/S", np.arange(3.0))
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
        w.flush()
        assert fmt.lock_path(out).exists() and not out.with_name("run.h5.creating").exists()
        with h5py.File(out, "r", swmr=True) as f:
            assert dict(f["spectrum/L0"].attrs) == {"note": "made by hand"}
            np.testing.assert_array_equal(f["spectrum/L0/S"][()], [0.0, 1.0, 2.0])
            assert f.attrs["complete"] == False  # noqa: E712 - a numpy bool read back
            assert sorted(f.attrs) == ["complete"]
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == True  # noqa: E712
