"""Round 39 review: a ``--checksum`` run's attributes carry sha256 digests (root attribute ``attr_digests``).

HDF5 keeps string attributes (``config``, ``identity``, ``model/info`` with the layer geometry) in its global heap,
which has no checksum, and an edit with h5py passes any checksum: a changed layer index in ``model/info`` had an
analysis read numbers under the wrong layer without a word. Here a byte of an attribute is flipped on disk, or an
attribute is edited with h5py, and every reader (open_run, ``info --verify``, a resume, a merge) must refuse naming
the attribute; what the writer changes legitimately (a resume's statics), a merge (view and --copy) and a repair
must leave a file that verifies clean; runs without the digests (no --checksum, or older) read as before. The
reference digests are computed here with hashlib."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks import QKHooksError
from qkhooks.cli import main
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.store import format as fmt

INFO = {"layers": [3], "layer_geometry": {"3": {"grid": [2, 2]}}, "marker": "q7k"}
CONFIG = {"modes": 7, "dtype": "float16"}


def ids_of(batch: int, prefix: str) -> list[str]:
    return [f"{prefix}-{batch}-{i}" for i in range(2)]


def write(path: Path, checksum: bool = True, batches: int = 2, prefix: str = "img", config: dict | None = None,
          mode: str = "create", info: dict | None = None) -> None:
    attrs = {"model": "m", "config": json.dumps(config or CONFIG), "data": "photos"}
    with RunWriter(path, checksum=checksum, attrs=attrs, mode=mode) as writer:
        writer.write_static("model/info", json.dumps(info or INFO))
        writer.write_static("spectrum/L3/S_all", np.arange(4.0))
        start = 0 if mode == "create" else writer.committed // 2
        for b in range(start, start + batches):
            rng = np.random.default_rng(b)
            writer.write_batch(ids_of(b, prefix), {"maps/a": rng.standard_normal((2, 3)).astype(np.float16)})


def stored(path: Path) -> dict[str, str]:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs[fmt.ATTR_DIGESTS])


def sha(text: str) -> str:
    return hashlib.sha256(b"s:" + text.encode()).hexdigest()


def assert_sealed_clean(path: Path) -> None:
    """The file has digests, they cover config and model/info as hashlib computes them, and verify says clean."""
    with h5py.File(path, "r") as f:
        digests = json.loads(f.attrs[fmt.ATTR_DIGESTS])
        assert digests["/@config"] == sha(f.attrs["config"])
        assert digests["/model@info"] == sha(f["model"].attrs["info"])
        assert "/@complete" not in digests and "/images@committed" not in digests
        layers = json.loads(f["model"].attrs["info"])["layers"]
    report = verify_run(path)
    assert report.ok, report.problems
    assert report.attr_digests and "every attribute checked" in report.summary()
    with open_run(path) as run:
        assert run.info["layers"] == layers


def flip_in_file(path: Path, needle: bytes, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    assert data.count(needle) == 1, "the attribute's text must be stored exactly once"
    data[data.index(needle) + offset] ^= bit
    path.write_bytes(bytes(data))


def test_a_checksum_run_stores_a_digest_of_each_attribute(tmp_path):
    path = tmp_path / "run.h5"
    write(path)
    assert_sealed_clean(path)
    digests = stored(path)
    with h5py.File(path, "r") as f:
        assert digests["/@identity"] == sha(f.attrs["identity"])
        assert digests["/images@arrays"] == sha(f["images"].attrs["arrays"])


def test_a_flipped_byte_in_the_config_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "run.h5"
    write(path)
    flip_in_file(path, b'"modes": 7', len(b'"modes": '), 0x01)  # 7 -> 6: still JSON, a number read otherwise
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["config"])["modes"] == 6  # the flip did change the config as HDF5 reads it
    with pytest.raises(QKHooksError) as raised:
        open_run(path)
    message = str(raised.value)
    assert "root attribute config changed since it was written" in message
    assert f"qkhooks info --verify {path}" in message and "qkhooks repair" in message
    assert "Record the run again" in message
    report = verify_run(path)
    assert not report.ok and report.attrs_off == [
        "root attribute config changed since it was written (its digest in root attribute attr_digests)"]
    assert main(["info", str(path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "damaged  root attribute config changed" in out and "no repair restores" in out
    with pytest.raises(QKHooksError, match="cannot resume .*root attribute config changed"):
        RunWriter(path, mode="resume", checksum=True, attrs={"model": "m", "config": json.dumps(CONFIG),
                                                              "data": "photos"})
    with pytest.raises(QKHooksError, match="root attribute config changed"):  # a resume changed nothing
        open_run(path)


@pytest.mark.parametrize("where", ["model", "images"])
def test_an_attribute_edited_with_h5py_is_refused_naming_it(tmp_path, where):
    path = tmp_path / "run.h5"
    write(path)
    with h5py.File(path, "r+") as f:
        if where == "model":  # the layer index: numbers read under the wrong layer
            f["model"].attrs["info"] = json.dumps(dict(INFO, layers=[2]))
        else:
            f["images"].attrs["shard"] = "{}"  # an attribute added since the digests
    named = ("attribute info of /model changed" if where == "model" else
             "attribute shard of /images not covered by the digests")
    with pytest.raises(QKHooksError, match=named):
        open_run(path)
    report = verify_run(path)
    assert not report.ok and len(report.attrs_off) == 1 and named in report.attrs_off[0]


def test_an_attribute_deleted_or_digests_that_do_not_parse_are_refused(tmp_path):
    path = tmp_path / "run.h5"
    write(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["data"]
    with pytest.raises(QKHooksError, match="root attribute data missing"):
        open_run(path)
    with h5py.File(path, "r+") as f:
        f.attrs[fmt.ATTR_DIGESTS] = "{not json"
    with pytest.raises(QKHooksError, match="root attribute attr_digests does not parse"):
        open_run(path)


def test_a_resumed_checksum_run_verifies_clean_also_with_a_static_rewritten(tmp_path):
    path = tmp_path / "run.h5"
    write(path)
    write(path, mode="resume")  # the same statics written again
    assert_sealed_clean(path)
    changed = dict(INFO, marker="r8z")  # a string static the resume writes with another value (the same length)
    write(path, mode="resume", info=changed)
    assert_sealed_clean(path)
    with open_run(path) as run:
        assert run.n == 12 and run.info["marker"] == "r8z"


def test_a_resume_by_ids_alone_rewrites_a_checksummed_runs_config_sealed_and_it_verifies_clean(tmp_path, monkeypatch):
    """record_dataset(..., resume_ids_only=True) marks the resume in the run's config (fmt.UNCHECKED_RESUMES), which it
    rewrites in place; on a --checksum run the config's digest must follow, or every reader refuses the file. Round 48
    checked that by hand. Here the rewritten config carries hashlib's digest and verify is clean; the same resume with
    the digest's update skipped (RunWriter._resealing a no-op) leaves a config that verify names."""
    import contextlib

    import torch

    import qkhooks
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    class Jittered(torch.utils.data.Dataset):
        """A random transform in __getitem__: other pixels on each read."""

        rng = np.random.default_rng(0)

        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> dict:
            return {"image": self.rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "id": f"j{index}"}

    loaded, sealed, unsealed = _tiny_loaded(), tmp_path / "sealed.h5", tmp_path / "unsealed.h5"
    options = {**_KW, "checksum": True}
    for path in (sealed, unsealed):
        _interrupted(loaded, path, batches=3, data=Jittered(), checksum=True)
        assert_sealed_clean(path)
    with pytest.warns(UserWarning, match=r"checks the 4 images it keeps by their ids alone"):
        qkhooks.record_dataset(loaded, Jittered(), sealed, resume=True, resume_ids_only=True, **options)
    assert_sealed_clean(sealed)
    with open_run(sealed) as run:
        assert run.n == 8 and json.loads(run.attrs["config"])[fmt.UNCHECKED_RESUMES] == [{"kept": 4, "shard": None}]
    monkeypatch.setattr(RunWriter, "_resealing", lambda self, group, key, value: contextlib.nullcontext())
    with pytest.warns(UserWarning, match=r"checks the 4 images it keeps by their ids alone"):
        qkhooks.record_dataset(loaded, Jittered(), unsealed, resume=True, resume_ids_only=True, **options)
    report = verify_run(unsealed)
    assert not report.ok and len(report.attrs_off) == 1 and "config" in report.attrs_off[0]

def _shards(tmp_path: Path, checksum: bool = True) -> Path:
    out = tmp_path / "run.h5"
    for rank in range(2):
        write(shard_path(out, rank, 2), checksum=checksum, prefix=f"rank{rank}", config=dict(CONFIG, shard=[rank, 2]))
    return out


@pytest.mark.parametrize("copy", [False, True])
def test_a_merge_of_checksum_shards_verifies_clean(tmp_path, copy):
    out = _shards(tmp_path)
    merge_shards(out, copy=copy)
    assert_sealed_clean(out)
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["config"])["shard"] is None  # the merge's own config, sealed as written
        assert ("/maps/a@shard_runs" in stored(out)) is not copy


def test_a_merge_refuses_a_shard_whose_attribute_changed(tmp_path):
    out = _shards(tmp_path)
    with h5py.File(shard_path(out, 1, 2), "r+") as f:
        f["model"].attrs["info"] = json.dumps(dict(INFO, layers=[2]))
    with pytest.raises(QKHooksError, match=r"cannot merge .*rank1-of-2\.h5: attribute info of /model changed"):
        merge_shards(out)
    assert not out.exists()


def test_a_repaired_checksum_run_verifies_clean_and_a_changed_attribute_stays_refused(tmp_path):
    path = tmp_path / "run.h5"
    write(path)
    repair(path, tmp_path / "fixed.h5")
    assert_sealed_clean(tmp_path / "fixed.h5")
    with h5py.File(path, "r+") as f:
        f["model"].attrs["info"] = json.dumps(dict(INFO, layers=[2]))
    report = repair(path, tmp_path / "again.h5")  # the images are copied; the attribute is not vouched for
    assert any("attribute info of /model changed since it was written in the damaged file" in p
               for p in report.problems)
    with pytest.raises(QKHooksError, match="attribute info of /model changed"):
        open_run(tmp_path / "again.h5")


def test_runs_without_digests_read_as_before(tmp_path):
    """No --checksum, or a checksum run written before the digests: an edited attribute is read as it is (nothing
    can tell), verify says the attributes carry no digests, and a resume adds none."""
    plain, older = tmp_path / "plain.h5", tmp_path / "older.h5"
    write(plain, checksum=False)
    write(older)
    with h5py.File(plain, "r") as f:
        assert fmt.ATTR_DIGESTS not in f.attrs
    with h5py.File(older, "r+") as f:
        del f.attrs[fmt.ATTR_DIGESTS]
    for path in (plain, older):
        with h5py.File(path, "r+") as f:
            f["model"].attrs["info"] = json.dumps(dict(INFO, marker="zz"))
        with open_run(path) as run:
            assert run.info["marker"] == "zz" and run.n == 4
        report = verify_run(path)
        assert report.ok and not report.attr_digests and "attrs    no digests" in report.summary()
    write(older, mode="resume")
    with h5py.File(older, "r") as f:
        assert fmt.ATTR_DIGESTS not in f.attrs
    assert verify_run(older).ok
