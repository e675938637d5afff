"""Distributed recording: torchrun with 2 CPU processes (gloo) gives the single-process run file; resume per rank;
merging shards by hand (skipped images, empty shards, copies, refusals)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import noise_photos
import qkhooks
from qkhooks import QKHooksError
from qkhooks.cli import main
from qkhooks.distributed import find_shards, merge_shards, shard_path
from qkhooks.store import RunWriter, open_run
from qkhooks.stream import record_dataset

MODEL = "timm:vit_tiny_patch16_224"  # --random-init builds it from a fixed seed: the same weights in every process
OPTIONS = ["--modes", "8", "--layers", "0,11", "--attention", "rows", "--batch-size", "2"]


def torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_run(path_a: Path, path_b: Path) -> None:
    """Same ids in the same order, attributes, statics, per-image arrays (exactly), reducer states (top-k exactly,
    float sums to float32 rounding: a reducer folds each batch in float32 before adding it in float64)."""
    with open_run(path_a) as a, open_run(path_b) as b:
        assert a.n == b.n and a.ids == b.ids
        def same(attrs):  # identity's run_id: one per run file
            return {k: (json.loads(v) | {"run_id": ""} if k == "identity" else v) for k, v in attrs.items()}
        assert same(a.attrs) == same(b.attrs)  # model, data, config (shard null), version, complete, weights
        assert a.info == b.info and a.skipped == b.skipped
        assert a.arrays() == b.arrays() and a.arrays()
        for name in a.arrays():
            x, y = a.array(name)[:], b.array(name)[:]
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        for layer in a.layers:
            sa, sb = a.spectrum(layer), b.spectrum(layer)
            assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
        assert a.states() == b.states()
        for name in a.states():
            sa, sb = a.state(name), b.state(name)
            assert sa.keys() == sb.keys(), name
            for key in sa:
                x, y = np.asarray(sa[key]), np.asarray(sb[key])
                if name == "topk_modes" or not np.issubdtype(x.dtype, np.floating):
                    assert np.array_equal(x, y), (name, key)
                else:
                    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=f"{name}/{key}")


def test_torchrun_record_equals_a_single_process_run_and_survives_a_move(tmp_path):
    work = tmp_path / "runs"
    work.mkdir()
    done = torchrun(["-m", "qkhooks", "record", MODEL, "--random-init", "o3:8:1", "--out", "run.h5", *OPTIONS], work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wrote 8 images to run.h5" in done.stdout
    assert main(["record", MODEL, "--random-init", "o3:8:1", "--out", str(work / "single.h5"), *OPTIONS]) == 0

    shards = find_shards(work / "run.h5")
    assert [p.name for p in shards] == ["run.rank0-of-2.h5", "run.rank1-of-2.h5"]
    with open_run(shards[1]) as shard:
        assert shard.ids == [f"o3/1/{i}" for i in range(4, 8)] and shard.config["shard"] == [1, 2]
    with open_run(work / "run.h5") as run:
        assert run.complete and run.config["shard"] is None
        assert run.states() == ["anisotropy", "preference", "topk_modes"]  # the default reducers, merged
        assert run.file["modes/L11/query"].is_virtual and run.file["modes/L11/query"].attrs["per_image"]
        assert json.loads(run.file["images"].attrs["shards"]) == ["run.rank0-of-2.h5", "run.rank1-of-2.h5"]
    assert_same_run(work / "single.h5", work / "run.h5")
    before = (work / "run.h5").read_bytes()
    with pytest.raises(QKHooksError, match="merge of shard files.*--resume"):  # resume the shards, not the merge
        RunWriter(work / "run.h5", mode="resume")
    assert (work / "run.h5").read_bytes() == before

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(work), str(moved))
    cwd = os.getcwd()
    os.chdir(tmp_path / "elsewhere")  # relative source paths resolve against the run file, not the cwd
    try:
        assert_same_run(moved / "single.h5", moved / "run.h5")
        assert main(["info", str(moved / "run.h5")]) == 0
    finally:
        os.chdir(cwd)


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import torch.distributed as dist
    import qkhooks
    from qkhooks.distributed import record_dataset_distributed

    dist.init_process_group("gloo")
    rank, kill = dist.get_rank(), sys.argv[2] == "kill"
    batches = []

    def on_batch(batch):
        batches.append(batch.size)
        if kill and rank == 1 and len(batches) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies mid-shard, after one reducer checkpoint

    loaded = qkhooks.load_model("timm:vit_tiny_patch16_224", random_init=True)
    record_dataset_distributed(loaded, "o3:16:1", sys.argv[1], modes=8, layers="0,11", attention="rows",
                               batch_size=2, checkpoint_every=2, on_batch=on_batch, resume=not kill, progress=False)
    dist.destroy_process_group()
    """
)


def test_a_killed_rank_resumes_on_its_own_to_the_single_process_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(KILLED)
    out = tmp_path / "run.h5"
    died = torchrun([str(script), str(out), "kill"], tmp_path)
    assert died.returncode != 0
    assert not out.exists()
    rank0, rank1 = (shard_path(out, r, 2) for r in range(2))
    # torchrun stops rank 0 too when rank 1 dies, finished or not: both shards stay readable, each holding a
    # prefix of its block
    with open_run(rank0) as a, open_run(rank1) as b:
        assert a.ids == [f"o3/1/{i}" for i in range(a.n)] and a.n <= 8
        assert not b.complete and b.ids == [f"o3/1/{i}" for i in range(8, 8 + b.n)] and b.n < 8
        seen = a.ids + b.ids
    # a view cannot read a shard its killed writer left open for writing (HDF5 opens it for no one through a view)
    with pytest.raises(qkhooks.QKHooksError, match="as a view: .*open for writing.*--copy"):
        merge_shards(tmp_path / "partial.h5", [rank1, rank0])
    partial = merge_shards(tmp_path / "partial.h5", [rank1, rank0], copy=True)  # what is there, marked incomplete
    with open_run(partial) as run:
        assert not run.complete and set(run.ids) <= set(seen)

    resumed = torchrun([str(script), str(out), "resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    with open_run(rank1) as b:
        assert b.complete and b.n == 8

    torch.set_num_threads(1)  # the reference in this process with the workers' thread count
    try:
        from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
        from qkhooks.analysis.preference import PreferenceReducer

        loaded = qkhooks.load_model(MODEL, random_init=True)
        record_dataset(loaded, "o3:16:1", tmp_path / "single.h5", modes=8, layers="0,11", attention="rows",
                       batch_size=2, progress=False, reducers=[TopKModes(), AnisotropyReducer(), PreferenceReducer()])
    finally:
        torch.set_num_threads(2)
    assert_same_run(tmp_path / "single.h5", out)


# ------------------------------------------------------------------------------- merging by hand
def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    return qkhooks.load_model(model)


def _reducers():
    from qkhooks.analysis.modes import AnisotropyReducer, TopKModes

    return [TopKModes(k=8), AnisotropyReducer()]


def _record_shards(loaded, data: str, out: Path, world: int, **kw) -> list[Path]:
    paths = [shard_path(out, r, world) for r in range(world)]
    for r, p in enumerate(paths):
        record_dataset(loaded, data, p, shard=(r, world), reducers=_reducers(), progress=False, **kw)
    return paths


def test_merge_renumbers_top_k_past_skipped_images_and_copies_on_request(tmp_path):
    folder = tmp_path / "imgs"
    rng = noise_photos(folder, [f"i{i}.png" for i in range(7)])
    (folder / "i0b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # left out when the folder is opened
    late = folder / "i1b.jpg"  # passes the open-time check, fails to decode inside rank 0's block
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(late, quality=95)
    late.write_bytes(late.read_bytes()[: len(late.read_bytes()) // 2])
    loaded, kw = tiny_vit(), dict(modes=8, layers="0,1", batch_size=2)
    out = tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record_dataset(loaded, str(folder), tmp_path / "single.h5", reducers=_reducers(), progress=False, **kw)
        shards = _record_shards(loaded, str(folder), out, 2, **kw)
    with open_run(shards[1]) as shard:  # rank 1 numbers its images from its block start (4), past the bad file
        assert shard.ids[0] == "i3.png" and shard.state("topk_modes")["index"].max() == 7
    merge_shards(out)
    assert_same_run(tmp_path / "single.h5", out)
    with open_run(out) as run:
        assert [Path(i).name for i, _ in run.skipped] == ["i0b.png", "i1b.jpg"]
        assert run.state("topk_modes")["index"].max() == 6  # renumbered to rows of the merged file

    copied = tmp_path / "copied.h5"
    assert main(["merge", str(copied), *map(str, reversed(shards)), "--copy"]) == 0
    for p in shards:
        p.unlink()
    with open_run(copied) as run:
        assert not run.file["modes/L1/key"].is_virtual and run.file["modes/L1/key"].chunks
    assert_same_run(tmp_path / "single.h5", copied)
    with open_run(out) as run:  # a view whose shards are gone: its reads refused (NaN before round 31), never zeros
        with pytest.raises(QKHooksError, match=r"the shard\(s\) holding images 0-2, 3-6 are missing there"):
            run.query(0)[0]


def test_empty_shards_and_the_merge_command(tmp_path):
    loaded, kw = tiny_vit(), dict(modes=4, layers="1", batch_size=2, attention="rows")
    record_dataset(loaded, "o3:2:5", tmp_path / "single.h5", reducers=_reducers(), progress=False, **kw)
    shards = _record_shards(loaded, "o3:2:5", tmp_path / "run.h5", 3, **kw)  # blocks of 1, 1 and 0 images
    with open_run(shards[2]) as empty:
        assert empty.complete and empty.n == 0
    assert main(["merge", str(tmp_path / "run.h5")]) == 0
    assert_same_run(tmp_path / "single.h5", tmp_path / "run.h5")


def test_merge_refuses_shards_that_are_not_one_run(tmp_path):
    loaded, kw = tiny_vit(), dict(modes=4, layers="1", batch_size=2, limit=4)
    out = tmp_path / "run.h5"
    shards = _record_shards(loaded, "o3:4:1", out, 2, **kw)
    merge_shards(out)
    with pytest.raises(QKHooksError, match="already exists"):
        merge_shards(out)
    with pytest.raises(QKHooksError, match="ranks 0..W-1"):
        merge_shards(out, shards[:1], overwrite=True)
    other = shard_path(tmp_path / "other.h5", 1, 2)
    record_dataset(loaded, "o3:4:2", other, shard=(1, 2), reducers=_reducers(), progress=False, **kw)
    with pytest.raises(QKHooksError, match="another model, dataset or options"):
        merge_shards(out, [shards[0], other], overwrite=True)
    record_dataset(loaded, "o3:4:1", tmp_path / "single.h5", reducers=_reducers(), progress=False, **kw)
    with pytest.raises(QKHooksError, match="not a shard"):
        merge_shards(out, [shards[0], tmp_path / "single.h5"], overwrite=True)
    assert_same_run(tmp_path / "single.h5", out)  # refused merges leave the file as it was
    shards[1].rename(tmp_path / "moved.h5")
    with pytest.raises(QKHooksError, match=r"ranks \[1\] \(of 2\) are missing"):
        merge_shards(out, overwrite=True)
    assert not list(tmp_path.glob("*.merging"))
