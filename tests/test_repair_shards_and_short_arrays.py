"""Round 21: ``qkhooks repair`` keeps a shard's block start (the merge renumbers the shard's top-k images by it, and a
resume of the repaired shard rewrites it), recovers the whole images of an array cut shorter than ``committed``, and
the modes analysis never names an image past the run's end (a state whose indices are not the file's rows is
recomputed from the stored maps, or refused)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

import qkhooks
from conftest import noise_photos
from qkhooks.analysis.modes import TopKModes, analyze_modes, layer_state
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import RunWriter, open_run, repair
from qkhooks.stream import record_dataset

NAMES = [f"im{i}.png" for i in range(8)]
KW = dict(modes=2, layers="0", batch_size=2, progress=False, checkpoint_every=1)


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                embed_dim=32, depth=1, num_heads=2).eval())


def top_ids(path: Path) -> list[list[str]]:
    """Every (head, mode, sign)'s top-k image ids of a run's saved state, read by its indices into the run's ids."""
    with open_run(path) as run:
        index, ids = layer_state(run.state("topk_modes"), 0)["index"], run.ids
        assert 0 <= index.min() and index.max() < len(ids)  # a row past the end has no id
        return [[ids[i] for i in row] for row in index.reshape(-1, index.shape[-1])]


def replace_run(new: Path, old: Path) -> None:
    """Put a repaired file (and its checkpoint) in the place of the damaged one, as the damage message advises."""
    os.replace(new, old)
    os.replace(f"{new}.reducers", f"{old}.reducers")


@pytest.fixture(scope="module")
def died(tmp_path_factory) -> dict[str, Path]:
    """Shards of 8 photos over 2 ranks where rank 0 died in its second batch (it kept 2 images of its block of 4),
    their merge, and a single-process run of the same photos (the reference a whole run must equal)."""
    tmp = tmp_path_factory.mktemp("died")
    folder = tmp / "imgs"
    noise_photos(folder, NAMES, size=(40, 40))
    out = tmp / "run.h5"
    calls = []

    def die(batch) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            record_dataset(tiny_vit(), str(folder), shard_path(out, 0, 2), reducers=[TopKModes(k=3)], shard=(0, 2),
                           on_batch=die, **KW)
        record_dataset(tiny_vit(), str(folder), shard_path(out, 1, 2), reducers=[TopKModes(k=3)], shard=(1, 2), **KW)
        record_dataset(tiny_vit(), str(folder), tmp / "single.h5", reducers=[TopKModes(k=3)], **KW)
    merge_shards(out, copy=True)
    with open_run(out) as run:
        assert run.ids == NAMES[:2] + NAMES[4:]  # rank 0's images 2, 3 are missing: rank 1 starts at row 2, not 4
    return {"folder": folder, "out": out, "single": tmp / "single.h5"}


def _copied_shards(died, tmp_path: Path) -> Path:
    """The died run's two shards and their reducer checkpoints copied under ``tmp_path``; the copy's merged path."""
    out = tmp_path / "run.h5"
    for rank in range(2):
        for suffix in ("", ".reducers"):
            Path(f"{shard_path(out, rank, 2)}{suffix}").write_bytes(Path(f"{shard_path(died['out'], rank, 2)}{suffix}").read_bytes())
    return out


def test_a_repaired_shard_keeps_its_block_start_so_the_merge_names_the_same_top_k_images(died, tmp_path):
    out = _copied_shards(died, tmp_path)
    shard = shard_path(out, 1, 2)
    with h5py.File(shard, "r") as f:
        before = dict(f["images"].attrs)
    report = repair(shard, tmp_path / "fixed.h5")
    assert report.lost == [] and report.states == ["topk_modes"]
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        after = dict(f["images"].attrs)
    assert json.loads(after["shard"]) == json.loads(before["shard"]) == {"rank": 1, "world": 2, "start": 4, "stop": 8}
    assert set(after) == set(before) and after["committed"] == 4 and json.loads(after["arrays"]) == json.loads(before["arrays"])
    replace_run(tmp_path / "fixed.h5", shard)
    merge_shards(out, copy=True)
    assert top_ids(out) == top_ids(died["out"])  # the unrepaired shards' merge: the same images, in the same order


def test_a_repaired_shard_of_a_rank_that_died_resumes_and_merges_to_the_single_process_run(died, tmp_path):
    out = _copied_shards(died, tmp_path)
    shard = shard_path(out, 0, 2)
    repair(shard, tmp_path / "fixed.h5")
    replace_run(tmp_path / "fixed.h5", shard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = record_dataset(tiny_vit(), str(died["folder"]), shard, reducers=[TopKModes(k=3)], shard=(0, 2),
                                resume=True, **KW)
    assert result.images == 4
    merge_shards(out, copy=True)
    with open_run(out) as run, open_run(died["single"]) as single:
        assert run.ids == single.ids == NAMES
        np.testing.assert_array_equal(run.query(0)[:], single.query(0)[:])
    assert top_ids(out) == top_ids(died["single"])


def test_the_modes_analysis_recomputes_a_top_k_state_that_names_rows_past_the_run_instead_of_naming_none(died, tmp_path):
    """A shard without its block start (as repair left it before round 21) merges into a state whose indices are not
    the merged file's rows; the analysis says so and ranks the stored maps itself, giving the good merge's images."""
    out = _copied_shards(died, tmp_path)
    with h5py.File(shard_path(out, 1, 2), "r+") as f:
        del f["images"].attrs["shard"]
    merge_shards(out, copy=True)
    with open_run(out) as run:
        assert layer_state(run.state("topk_modes"), 0)["index"].max() >= run.n  # the broken state this is about
    kw = dict(k=3, figure_modes=0, overview=False, images=False)
    good = analyze_modes(died["out"], tmp_path / "good", **kw)
    bad = analyze_modes(out, tmp_path / "bad", **kw)
    assert good["topk_source"] == "reducer state saved with the run"
    assert "past the run's 6 images" in bad["topk_source"] and "recomputed from the stored maps" in bad["topk_source"]

    def tops(summary):
        return [[(t["id"], t["sign"]) for t in m["top"]] for l in summary["layers"] for h in l["heads"] for m in h["modes"]]

    assert tops(bad) == tops(good) and all(i is not None for mode in tops(bad) for i, _ in mode)


def _short_run(path: Path, checksum: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    written = {"a": rng.standard_normal((8, 3)).astype(np.float32), "b": rng.standard_normal((8, 2, 2)).astype(np.float32)}
    with RunWriter(path, attrs={"model": "m", "config": "{}"}, dtype="float32", checksum=checksum) as w:
        for lo in range(0, 8, 2):
            w.write_batch([f"im{i}" for i in range(lo, lo + 2)], {k: v[lo:lo + 2] for k, v in written.items()})
    return written


@pytest.mark.parametrize("checksum", [False, True])
def test_repair_keeps_the_images_whole_in_every_array_when_arrays_and_ids_are_cut_shorter_than_committed(tmp_path, checksum):
    path = tmp_path / "run.h5"
    written = _short_run(path, checksum)
    with h5py.File(path, "r+") as f:  # damage: arrays shorter than the committed count (an h5py edit, a bad cut)
        f["a"].resize(5, axis=0)
        f["b"].resize(7, axis=0)
    report = repair(path, tmp_path / "fixed.h5")
    assert report.recovered == [f"im{i}" for i in range(5)] and report.lost == [5, 6, 7]
    assert "/a: rows 5-7 are past its end (it has 5 rows, 8 images are committed)" in report.problems
    assert "/b: row 7 is past its end (it has 7 rows, 8 images are committed)" in report.problems
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert f["images"].attrs["committed"] == 5 and [i.decode() for i in f["images/ids"][()]] == report.recovered
        for name, values in written.items():
            np.testing.assert_array_equal(f[name][()], values[:5])
            assert f[name].fletcher32 is checksum
        assert [tuple(x.decode() for x in row) for row in f["images/skipped"][()]] == [
            (f"im{i}", "unreadable in the damaged run file") for i in (5, 6, 7)]

    path2 = tmp_path / "ids.h5"
    written = _short_run(path2, checksum)
    with h5py.File(path2, "r+") as f:
        f["images/ids"].resize(6, axis=0)
    report = repair(path2, tmp_path / "fixed2.h5")
    assert report.recovered == [f"im{i}" for i in range(6)] and report.lost == [6, 7]
    assert "/images/ids: rows 6-7 are past its end (it has 6 rows, 8 images are committed)" in report.problems
    with open_run(tmp_path / "fixed2.h5") as run:
        assert run.ids == report.recovered
        np.testing.assert_array_equal(run.array("a")[:], written["a"][:6])
