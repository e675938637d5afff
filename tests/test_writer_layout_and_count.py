"""Round 23 (issue 20, the writer thread's fixed costs): the layout's array list taken from the arrays the writer made
(no walk of the file) and the committed count written through attributes opened once. Both must leave the file as
before: checked against h5py's own walk of the file and against ``set_committed``'s bytes."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks.errors import QKHooksError
from qkhooks.store import RunWriter
from qkhooks.store import format as fmt


def _per_image_by_h5py(path: Path) -> list[str]:
    """The datasets marked ``per_image``, found by h5py's own visit (not qkhooks' walk)."""
    found: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.append(name)
                     if isinstance(obj, h5py.Dataset) and obj.attrs.get("per_image", False) else None)
    return sorted(found)


@pytest.mark.parametrize("mode", ["create", "overwrite"])
def test_layout_lists_every_per_image_array(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "run.h5"
    if mode == "overwrite":
        with RunWriter(path, attrs={"model": "old", "config": "{}"}) as w:
            w.write_batch(["x"], {"other/array": np.zeros((1, 2), np.float32)})
    rng = np.random.default_rng(0)
    arrays = {"modes/L0/query": rng.standard_normal((3, 2, 5)), "/modes/L10/key": rng.standard_normal((3, 2, 7)),
              "attention/rows/L2": rng.standard_normal((3, 4)), "labels": np.arange(3, dtype=np.int64)}
    with RunWriter(path, mode=mode, attrs={"model": "m", "config": "{}"}) as w:
        w.write_static("spectrum/L0/S", np.arange(4.0))  # a static dataset: not per image
        w.write_static("model/info", "text")
        w.write_batch(["a", "b", "c"], arrays)
        w.write_batch(["d", "e", "f"], arrays)
    with h5py.File(path, "r") as f:
        listed = json.loads(fmt.as_str(f["images"].attrs[fmt.ARRAYS_ATTR]))
        assert int(f["images"].attrs["committed"]) == 6
    assert listed == _per_image_by_h5py(path) == sorted(name.lstrip("/") for name in arrays)


def test_layout_of_a_run_without_batches_lists_none(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "m", "config": "{}"}) as w:
        w.write_static("spectrum/L0/S", np.arange(4.0))
    with h5py.File(path, "r") as f:
        assert json.loads(fmt.as_str(f["images"].attrs[fmt.ARRAYS_ATTR])) == []


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_committed_count_writes_set_committeds_bytes(tmp_path: Path, dtype: type) -> None:
    """Two files laid out alike, their counts set by ``set_committed`` and by ``CommittedCount``: the same bytes, the
    value in the attribute's own dtype (an older file's int32 stays int32, as h5py's ``modify`` keeps it)."""
    digests = []
    for name in ("reference", "counted"):
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w", libver="latest") as f:
            f.create_group("images").create_dataset("ids", (0,), maxshape=(None,), chunks=(8,),
                                                    dtype=h5py.string_dtype())
            for holder in (f["images"], f[fmt.IDS]):
                holder.attrs["committed"] = dtype(0)
            count = fmt.CommittedCount(f)
            for n in (3, 7, 2**40 if dtype is np.int64 else 11):
                fmt.set_committed(f, n) if name == "reference" else count.set(n)
                assert [int(h.attrs["committed"]) for h in (f["images"], f[fmt.IDS])] == [n, n]
                assert {h.attrs["committed"].dtype for h in (f["images"], f[fmt.IDS])} == {np.dtype(dtype)}
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_run_file_bytes_do_not_depend_on_the_batches_count_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run written by the writer (count set through ``CommittedCount``) against the same run with the count set by
    ``set_committed`` each batch: byte for byte the same file (the run id fixed)."""
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    rng = np.random.default_rng(1)
    batches = [{f"modes/L{l}/{s}": rng.standard_normal((4, 2, 3, 9)).astype(np.float16) for l in range(2)
                for s in ("query", "key")} for _ in range(3)]
    digests = []
    for name in ("counted", "reference"):
        if name == "reference":
            class Reference:
                def __init__(self, f: h5py.File):
                    self.f = f

                def set(self, n: int) -> None:
                    fmt.set_committed(self.f, n)
            monkeypatch.setattr(fmt, "CommittedCount", Reference)
        path = tmp_path / f"{name}.h5"
        with RunWriter(path, attrs={"model": "m", "config": "{}"}) as w:
            w.write_static("spectrum/L0/S", np.arange(3.0))
            for i, arrays in enumerate(batches):
                w.write_batch([f"{i}-{j}" for j in range(4)], arrays)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_statics_written_before_the_layout_land_in_their_groups(tmp_path: Path) -> None:
    """The layout's groups are kept between statics; a static that replaces a group (and so the group's handle)
    leaves no stale handle behind: a later static under that name is refused as before, never written into the
    deleted group where no reader finds it."""
    path = tmp_path / "run.h5"
    w = RunWriter(path, attrs={"model": "m", "config": "{}"})
    w.write_static("spectrum/L0/S", np.arange(3.0))
    w.write_static("spectrum/L0/cos", np.arange(2.0))
    w.write_static("spectrum/L1/S", np.arange(4.0))
    w.write_static("g/x", np.float64(1.0))
    w.write_static("g", np.arange(5))  # a dataset in the place of the group g
    w.write_static("g/y", np.float64(2.0))  # g is a dataset now: no group to put y in
    with pytest.raises(QKHooksError, match="writing .* failed"):
        w.flush()
    w.close(complete=False)
    assert not path.exists()  # a run that failed before its first image leaves no file
    path = tmp_path / "run2.h5"
    with RunWriter(path, attrs={"model": "m", "config": "{}"}) as w:
        w.write_static("spectrum/L0/S", np.arange(3.0))
        w.write_static("spectrum/L0/cos", np.arange(2.0))
        w.write_static("spectrum/L1/S", np.arange(4.0))
        w.write_static("g/x", np.float64(1.0))
        w.write_static("g", np.arange(5))
        w.write_batch(["a"], {"labels": np.zeros(1, np.int64)})
    with h5py.File(path, "r") as f:
        assert f["spectrum/L0/S"][()].tolist() == [0.0, 1.0, 2.0] and f["spectrum/L0/cos"][()].tolist() == [0.0, 1.0]
        assert f["spectrum/L1/S"][()].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert f["g"][()].tolist() == [0, 1, 2, 3, 4] and isinstance(f["g"], h5py.Dataset)
