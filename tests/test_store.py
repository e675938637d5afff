"""Run files: schema round trip per dataset, resume after SIGKILL, SWMR reading, layout, skipped images, error paths."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import qkhooks
from qkhooks import QKHooksError
from qkhooks.cli import main
from qkhooks.data import collate, open_dataset
from qkhooks.store import RunWriter, open_run
from qkhooks.store._hdf5 import clear_open_flags, lookup3
from qkhooks.stream import record_dataset

# A small ViT at the real 224 input (7 x 7 patches of 32 px), so every dataset's preprocessing applies as is.
BUILD = "timm.create_model('vit_small_patch16_224', pretrained=False, patch_size=32, embed_dim=32, depth=2, num_heads=4)"


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    model = eval(BUILD).eval()
    return qkhooks.load_model(model)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_memory_maps(loaded, data: str, layers=(0, 1), limit=None) -> tuple[list[str], dict[str, np.ndarray]]:
    """The same images through qkhooks.record directly (no store): the reference for the file's contents."""
    ds = open_dataset(data, loaded.image_config, limit=limit)
    batch = collate([ds[i] for i in range(len(ds))])
    with qkhooks.record(loaded.model, modes=8, layers=list(layers)) as run, torch.no_grad():
        loaded.model(batch["pixel_values"])
    return list(batch["id"]), {k: v.numpy() for k, v in run.last.arrays().items()}


@pytest.mark.parametrize("data,limit", [("samples", 5), ("voc", None), ("arc2017", None), ("o3:5:3", None)])
def test_round_trip_of_every_dataset(tmp_path, data, limit):
    loaded = tiny_vit()
    out = tmp_path / "run.h5"
    result = record_dataset(loaded, data, out, modes=8, layers="0,1", dtype="float32", limit=limit, batch_size=2,
                            reducers=[], progress=False)
    ids, ref = in_memory_maps(loaded, data, limit=limit)
    spec = qkhooks.spectrum(loaded.model)
    with open_run(out) as run:
        assert run.complete and run.n == result.images == len(ids)
        assert run.ids == ids
        assert run.layers == [0, 1]
        assert run.model == loaded.spec and run.config["data"] == run.attrs["data"]
        assert run.info["grid"] == [7, 7] and run.info["num_prefix_tokens"] == 1
        for name in ("modes/L0/query", "modes/L1/key"):
            np.testing.assert_allclose(run.array(name)[:], ref[name], rtol=0, atol=1e-5)
        for layer in (0, 1):
            stored = run.spectrum(layer)
            np.testing.assert_allclose(stored["S"], spec[layer].S[:, :16].numpy(), rtol=1e-6)
            np.testing.assert_allclose(stored["U"], spec[layer].U[:, :, :16].numpy(), atol=1e-6)
        if data in ("voc", "arc2017"):
            objects = run.array("masks/objects")[:]
            assert objects.shape == (run.n, 7, 7) and objects.dtype == np.int32 and objects.max() >= 1
        if data.startswith("o3"):
            target = run.array("masks/target")[:]
            assert target.shape == (run.n, 7, 7) and 0 < target.max() <= 1
        assert f"{run.n} committed" in run.summary()


def test_float16_storage_and_lazy_indexing(tmp_path):
    loaded = tiny_vit()
    out = tmp_path / "run.h5"
    record_dataset(loaded, "samples", out, layers="1", limit=6, batch_size=4, reducers=[], progress=False)
    _, ref = in_memory_maps(loaded, "samples", layers=(1,), limit=6)
    with open_run(out) as run:
        q = run.query(1)
        assert q.dtype == np.float16 and q.shape == (6,) + ref["modes/L1/query"].shape[1:]
        np.testing.assert_array_equal(q[[4, 0, 2]], ref["modes/L1/query"][[4, 0, 2]].astype(np.float16))
        np.testing.assert_array_equal(q[-1, 2], ref["modes/L1/query"][5, 2].astype(np.float16))
        with pytest.raises(IndexError):
            q[6]
        blocks = [block for _, block in q.chunks(4)]
        assert [len(b) for b in blocks] == [4, 2]



def test_the_writing_process_can_read_its_own_run_while_writing(tmp_path):
    out = tmp_path / "run.h5"
    writer = RunWriter(out, attrs={"model": "m", "config": "{}"})
    try:
        writer.write_batch(["a", "b"], {"x": np.arange(6.0).reshape(2, 3)})
        writer.flush()
        with open_run(out) as run:  # same process: HDF5 shares the writer's handle, so the flags must agree
            assert run.n == 2 and run.ids == ["a", "b"]
            np.testing.assert_array_equal(run.array("x")[:], np.arange(6.0).reshape(2, 3))
    finally:
        writer.close()

CHILD = textwrap.dedent(
    """
    import sys, time, torch, timm, qkhooks
    from qkhooks.analysis.preference import PreferenceReducer
    from qkhooks.stream import record_dataset
    torch.manual_seed(0)
    loaded = qkhooks.load_model({build}.eval())
    record_dataset(loaded, "o3:40:1", sys.argv[1], modes=8, attention="rows", batch_size=2,
                   reducers=[PreferenceReducer()], progress=False, checkpoint_every=3,
                   on_batch=lambda batch: time.sleep(0.15), resume=len(sys.argv) > 2)
    """
)


def _resume_run(out: Path):
    from qkhooks.analysis.preference import PreferenceReducer

    return record_dataset(tiny_vit(), "o3:40:1", out, modes=8, attention="rows", batch_size=2,
                          reducers=[PreferenceReducer()], progress=False, checkpoint_every=3, resume=out.exists())


def test_killed_run_resumes_to_the_uninterrupted_file_and_is_readable_while_written(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(build=BUILD))
    killed = tmp_path / "killed.h5"
    child = subprocess.Popen([sys.executable, str(script), str(killed)], stderr=subprocess.PIPE)
    seen: list[int] = []
    watcher = None  # one handle held open the whole time, as a user watching from a notebook would
    try:
        deadline = time.time() + 300  # generous: a loaded CI machine imports torch slowly
        while time.time() < deadline:  # watch the run grow from another process's handle (SWMR)
            if killed.exists():
                try:
                    watcher = watcher or open_run(killed)
                    n = watcher.refresh()
                    seen.append(n)
                    assert len(watcher.ids) == n
                    if n:
                        assert watcher.query(0)[n - 1].shape == (4, 8, 50)
                    if n >= 14:
                        break
                except (QKHooksError, OSError, KeyError, RuntimeError):
                    # not written yet, or caught mid-way through one of the writer's few structural changes
                    # (refresh says so as a QKHooksError; array reads may surface HDF5's own error)
                    if watcher is not None:
                        watcher.close()
                    watcher = None
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if watcher is not None:
            watcher.close()
    assert seen and seen[-1] >= 14, child.stderr.read().decode()[-2000:]
    assert seen == sorted(seen)
    with open_run(killed) as run:  # a killed run is readable and says it is incomplete
        assert not run.complete and run.n >= 14

    resumed = _resume_run(killed)
    assert resumed.images == 40
    clean = tmp_path / "clean.h5"
    _resume_run(clean)
    with open_run(killed) as a, open_run(clean) as b:
        assert a.complete and a.ids == b.ids and len(set(a.ids)) == 40
        assert a.arrays() == b.arrays()
        for name in a.arrays():
            np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)
        sa, sb = a.state("preference"), b.state("preference")
        assert sa.keys() == sb.keys()
        for key in sa:
            np.testing.assert_allclose(sa[key], sb[key], rtol=1e-12, err_msg=key)


def test_resume_refuses_other_model_or_options_and_leaves_file_untouched(tmp_path):
    out = tmp_path / "run.h5"
    loaded = tiny_vit()
    record_dataset(loaded, "samples", out, layers="0", limit=4, batch_size=2, reducers=[], progress=False)
    before = sha(out)
    with pytest.raises(QKHooksError, match=r"config differs from this run's \(layers: file \[0\], now \[0, 1\]\)"):
        record_dataset(loaded, "samples", out, layers="0,1", limit=4, reducers=[], progress=False, resume=True)
    other = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                 embed_dim=32, depth=2, num_heads=4, class_token=False,
                                                 global_pool="avg").eval())
    other.spec = "timm:other"
    with pytest.raises(QKHooksError, match="model differs"):
        record_dataset(other, "samples", out, layers="0", limit=4, reducers=[], progress=False, resume=True)
    assert sha(out) == before


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run.h5"
    loaded = tiny_vit()
    record_dataset(loaded, "samples", out, layers="0", limit=2, batch_size=2, reducers=[], progress=False)
    before = sha(out)
    with pytest.raises(QKHooksError, match="--resume .* --overwrite"):
        record_dataset(loaded, "samples", out, layers="0", limit=3, reducers=[], progress=False)
    assert sha(out) == before
    with pytest.raises(QKHooksError, match="exclude each other"):
        record_dataset(loaded, "samples", out, layers="0", reducers=[], progress=False, resume=True, overwrite=True)
    record_dataset(loaded, "samples", out, layers="0", limit=3, batch_size=2, reducers=[], progress=False, overwrite=True)
    with open_run(out) as run:
        assert run.n == 3


def test_unwritable_or_missing_places_are_clear_errors(tmp_path):
    loaded = tiny_vit()
    with pytest.raises(QKHooksError, match="does not exist; create it first"):
        record_dataset(loaded, "samples", tmp_path / "nope" / "run.h5", limit=1, reducers=[], progress=False)
    with pytest.raises(QKHooksError, match="is a directory"):
        record_dataset(loaded, "samples", tmp_path, limit=1, reducers=[], progress=False)
    with pytest.raises(QKHooksError, match="no such file"):
        RunWriter(tmp_path / "absent.h5", mode="resume")
    with pytest.raises(QKHooksError, match="no images found"):
        (tmp_path / "empty").mkdir()
        record_dataset(loaded, str(tmp_path / "empty"), tmp_path / "e.h5", reducers=[], progress=False)
    assert not (tmp_path / "e.h5").exists()



@pytest.mark.parametrize("options, message", [
    ({"layers": "1-0"}, "low to high"),
    ({"layers": []}, "selection is empty"),
    ({"layers": "0", "attention": "full:1"}, r"layers \[1\], which this recording does not hook"),
    ({"attention": "pooled"}, "o3:N or o3dir:DIR"),
    ({"batch_size": 0}, "batch size must be a whole number >= 1"),
    ({"modes": "2.5"}, "positive integer"),
    ({"device": "cuda:7"}, "cuda:7"),
])
def test_bad_options_are_refused_before_any_file_is_written(tmp_path, options, message):
    out = tmp_path / "run.h5"
    with pytest.raises(QKHooksError, match=message):
        record_dataset(tiny_vit(), "samples", out, limit=2, progress=False, **options)
    assert not out.exists()


def test_modes_zero_means_capture_without_modes_and_the_default_reducers_follow(tmp_path):
    out = tmp_path / "run.h5"
    result = record_dataset(tiny_vit(), "samples", out, modes="0", limit=2, batch_size=2, progress=False)
    assert [r.name for r in result.reducers] == ["anisotropy"]  # no top-k reducer without modes
    with open_run(out) as run:
        assert run.n == 2 and not [name for name in run.arrays() if name.startswith("modes/")]

def test_corrupt_images_are_skipped_and_listed_in_the_file(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.jpg", "c.webp"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = folder / "late.jpg"  # a valid header with the body cut: found only when decoded
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:400])
    out = tmp_path / "run.h5"
    with pytest.warns(UserWarning, match="skipping"):
        result = record_dataset(tiny_vit(), str(folder), out, layers="0", batch_size=2, reducers=[], progress=False)
    with open_run(out) as run:
        assert run.ids == ["a.png", "c.webp", "sub/b.jpg"]
        skipped = dict(run.skipped)
    assert {Path(k).name for k in skipped} == {"broken.png", "late.jpg"}
    assert dict(result.skipped).keys() == skipped.keys()


def test_writer_commits_whole_batches_and_checkpoints_replace_each_other(tmp_path):
    out = tmp_path / "w.h5"
    with RunWriter(out, attrs={"model": "m", "config": {"a": 1}}, dtype="float32") as w:
        w.write_batch(["x", "y"], {"v": torch.arange(6.0).reshape(2, 3)})
        w.write_checkpoint({"r": {"s": np.ones(2), "note": "two"}})
        w.write_batch(["z"], {"v": torch.full((1, 3), 7.0)})
        assert w.ids == ["x", "y", "z"]
        images, states = w.checkpoint()  # counts the images committed when the writer reached it
        assert images == 2 and states["r"]["s"].tolist() == [1.0, 1.0] and states["r"]["note"] == "two"
        w.write_checkpoint({"r": {"s": np.zeros(2), "note": "three"}})
        assert w.checkpoint()[0] == 3
        w.truncate(2)
        assert w.ids == ["x", "y"]
        with pytest.raises(QKHooksError, match="one row per id"):
            w.write_batch(["q"], {"v": torch.zeros(2, 3)})
        w.write_batch(["q"], {"v": torch.zeros(1, 4)})  # wrong per-image shape: reported on the next call
        with pytest.raises(QKHooksError, match="shape"):
            w.flush()
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "w.h5.lock").exists()
    with open_run(out) as run:
        assert run.ids == ["x", "y"]
        np.testing.assert_array_equal(run.array("v")[:], np.arange(6.0).reshape(2, 3))
        assert not run.complete
        with pytest.raises(QKHooksError, match="they count 3 images, and the file holds 2"):  # cut under them
            run.state("r")
        with pytest.raises(QKHooksError, match="no per-image array 'w'.*v"):
            run.array("w")


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_appends_on_a_chunk_boundary_go_as_whole_chunks_and_every_other_append_through_hdf5(tmp_path, monkeypatch,
                                                                                            compression):
    """A batch that starts a chunk of an unfiltered array, in the array's own dtype, is written as whole chunks (the
    last one padded); one that starts inside a chunk (after a short batch, or in a resume), one of another dtype, or
    a compressed array goes through HDF5's own write. Either way the file holds exactly the rows written."""
    from qkhooks.store import writer as writer_module

    direct: list[tuple[str, int, int]] = []
    write_chunks = writer_module._PerImage._write_chunks

    def spy(self, n, value):
        direct.append((self.ds.name, n, len(value)))
        write_chunks(self, n, value)

    monkeypatch.setattr(writer_module._PerImage, "_write_chunks", spy)
    rng = np.random.default_rng(0)
    sizes = [4, 4, 3, 2, 3, 4, 5]  # with chunks of 4: starts 0, 4, 8 on a boundary, 11 and 13 inside, 16 and 20 on one
    maps = [rng.standard_normal((b, 2, 3)).astype(np.float32) for b in sizes]
    counts = [rng.integers(-2**30, 2**30, (b, 3)) for b in sizes]
    counts[5] = counts[5].astype(np.int32)  # an int32 batch (on a boundary) into the int64 array: converted by HDF5
    out = tmp_path / "chunks.h5"
    ids = [[f"{i}-{j}" for j in range(b)] for i, b in enumerate(sizes)]
    options = {"dtype": "float32", "compression": compression, "chunk_images": 4}
    with RunWriter(out, **options) as w:  # the first three batches, closed on a partly filled (padded) chunk
        for i in range(3):
            w.write_batch(ids[i], {"maps": maps[i], "counts": counts[i]})
    with RunWriter(out, mode="resume", **options) as w:  # the rest, the first batch inside that chunk
        for i in range(3, len(sizes)):
            w.write_batch(ids[i], {"maps": maps[i], "counts": counts[i]})
    with open_run(out) as run:
        assert run.ids == sum(ids, [])
        np.testing.assert_array_equal(run.array("maps")[:], np.concatenate(maps))
        np.testing.assert_array_equal(run.array("counts")[:], np.concatenate([c.astype(np.int64) for c in counts]))
    if compression == "gzip":
        assert direct == []
    else:
        starts = {"/maps": [(0, 4), (4, 4), (8, 3), (16, 4), (20, 5)], "/counts": [(0, 4), (4, 4), (8, 3), (20, 5)]}
        assert sorted(direct) == sorted((name, n, b) for name, rows in starts.items() for n, b in rows)


def test_the_layout_is_fixed_by_the_first_batch_and_a_file_appears_only_then(tmp_path):
    out = tmp_path / "w.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_static("model/info", "{}")
        w.write_static("spectrum/S", np.arange(3.0))
        w.flush()
        assert not out.exists()  # laid out beside it, under RUN.h5.creating
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
        w.flush()
        with h5py.File(out, "r", swmr=True) as f:  # SWMR from the moment it has its name
            assert f["images/ids"].attrs["committed"] == 1
        w.write_static("spectrum/S", np.arange(3.0) + 1)  # in place: allowed
        w.write_static("model/info", '{"a": 1}')
        w.flush()
        w.write_static("spectrum/T", np.arange(3.0))  # a new object after the first batch: refused
        with pytest.raises(QKHooksError, match="layout is fixed"):
            w.flush()
    with h5py.File(out, "r") as f:
        assert f["spectrum/S"][()].tolist() == [1.0, 2.0, 3.0] and f["model"].attrs["info"] == '{"a": 1}'
        assert not f.attrs["complete"] and "spectrum/T" not in f
    assert not list(tmp_path.glob("*.creating"))


def test_an_unfinished_new_run_without_images_leaves_no_file_and_an_overwrite_keeps_the_old_run_until_then(tmp_path):
    out = tmp_path / "w.h5"
    with RunWriter(out) as w:
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
    before = sha(out)
    w = RunWriter(out, mode="overwrite")
    w.write_static("x", np.zeros(2))
    w.flush()
    assert sha(out) == before  # the old run stays until the new one has a batch
    w.close(complete=False)
    assert sha(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]


def test_clear_open_flags_matches_hdf5_checksum(tmp_path):
    # lookup3 reference values from Bob Jenkins' lookup3.c driver (hashlittle of "", "Four score ...").
    assert lookup3(b"", 0) == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago", 0) == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161
    path = tmp_path / "f.h5"
    code = f"import h5py, os, signal; f = h5py.File({str(path)!r}, 'w', libver='latest'); f.swmr_mode = True; " \
           "f.flush(); os.kill(os.getpid(), signal.SIGKILL)"
    subprocess.run([sys.executable, "-c", code])
    with pytest.raises(OSError):
        h5py.File(path, "r+")
    assert clear_open_flags(path) is True
    h5py.File(path, "r+").close()
    assert clear_open_flags(path) is False


def test_sigterm_closes_a_cli_recording_cleanly_and_it_resumes(tmp_path):
    out = tmp_path / "run.h5"
    args = ["record", "timm:vit_tiny_patch16_224", "o3:60:1", "--random-init", "--out", str(out), "--modes", "4",
            "--layers", "0,11", "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "qkhooks", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None:  # a few images in, as a preemption would find it
            if out.exists():
                try:
                    with open_run(out) as run:
                        if run.n >= 4:
                            break
                except QKHooksError:
                    pass
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=120) == 128 + signal.SIGTERM, child.stderr.read().decode()[-2000:]
    finally:
        child.kill()
    with h5py.File(out, "r") as f:  # closed by its writer: no open flags left, plain HDF5 opens it
        assert not f.attrs["complete"] and 4 <= int(f["images"].attrs["committed"]) < 60
    assert main([*args, "--resume"]) == 0
    with open_run(out) as run:
        assert run.complete and run.ids == [f"o3/1/{i}" for i in range(60)]


def test_cli_record_and_info(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert main(["record", "timm:vit_tiny_patch16_224", "samples", "--random-init", "--out", str(out), "--limit", "2",
                 "--layers", "11", "--modes", "4", "--batch-size", "2", "--dtype", "float32"]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "modes/L11/query" in text and "(2, 3, 4, 197)" in text and "float32" in text
    assert main(["record", "timm:vit_tiny_patch16_224", "samples", "--random-init", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with open_run(out) as run:
        assert json.loads(run.attrs["config"])["modes"] == 4


def test_limit_applies_to_an_opened_dataset_as_to_a_spec_string(tmp_path):
    loaded = tiny_vit()
    dataset = open_dataset("samples", loaded.image_config)
    assert len(dataset.ids) > 2
    record_dataset(loaded, dataset, tmp_path / "run.h5", layers="0", limit=2, reducers=[], progress=False)
    with open_run(tmp_path / "run.h5") as run:
        assert run.ids == list(dataset.ids[:2]) and json.loads(run.attrs["config"])["limit"] == 2



# ------------------------------------------------------------------ what is not a run; where the photos are (review 18)
def test_a_folder_an_image_and_an_empty_file_are_not_run_files_in_one_line(tmp_path, capsys):
    """Review 18 (11, 12): `info DIR` printed an IsADirectoryError traceback, and a PNG was called "damaged" with
    `qkhooks repair` suggested; each is now one line saying it is not a run file, status 2."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(photo)
    (tmp_path / "empty.h5").touch()
    for given, says in ((tmp_path, "is a folder, not a qkhooks run file"),
                        (photo, "is not a qkhooks run file (not an HDF5 file at all)"),
                        (tmp_path / "empty.h5", "is an empty file, not a qkhooks run file")):
        for argv in (["info", str(given)], ["analyze", "modes", str(given), "--out", str(tmp_path / "an")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert says in err and "repair" not in err and "Traceback" not in err, err
        with pytest.raises(QKHooksError, match="not a qkhooks run file"):
            open_run(given)


def _small_run(folder: Path, out: Path, n: int = 3) -> None:
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    record_dataset(tiny_vit(), str(folder.name), out, modes=2, layers="0", batch_size=4, progress=False)


def test_a_moved_run_without_its_reducer_states_file_says_so(tmp_path, monkeypatch, capsys):
    """Review 18 (19): a run copied without RUN.h5.reducers lost its reducer states with no word; info and
    analyze modes now name the missing file."""
    monkeypatch.chdir(tmp_path)
    _small_run(tmp_path / "imgs", tmp_path / "run.h5")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "run.h5").write_bytes((tmp_path / "run.h5").read_bytes())
    with open_run(tmp_path / "run.h5") as run:
        assert run.states() and run.missing_states() == ""
    assert main(["info", "moved/run.h5"]) == 0
    assert "run.h5.reducers is missing" in capsys.readouterr().out
    assert main(["analyze", "modes", "moved/run.h5", "--out", "an", "--figure-modes", "0", "--no-overview",
                 "--no-images"]) == 0
    assert "note: run.h5.reducers is missing" in capsys.readouterr().out


def test_a_run_names_its_folder_absolutely_and_photos_are_drawn_only_from_the_files_recorded(tmp_path, monkeypatch):
    """Review 18 (4): the run stored 'imgs' as typed, so analyze modes from another folder drew over whatever
    ./imgs held there. The path is now absolute, each file's size is stored, and a folder whose files are missing
    or have other sizes gives no photos, saying why."""
    from qkhooks.analysis.modes import load_images
    from qkhooks.data_files import SIZES_ATTR, recorded_sizes

    monkeypatch.chdir(tmp_path)
    _small_run(tmp_path / "imgs", tmp_path / "run.h5")
    with open_run(tmp_path / "run.h5") as run:
        attrs, ids, config = run.attrs, run.ids, run.config
        sizes = recorded_sizes(run, ids, [0, 1])
    assert attrs["data"] == str(tmp_path / "imgs") and config["data"] == str(tmp_path / "imgs")
    assert sizes == {i: (tmp_path / "imgs" / i).stat().st_size for i in ids[:2]}
    other = tmp_path / "elsewhere"
    (other / "imgs").mkdir(parents=True)
    for i in ids:  # same names, other pictures, in the folder 'imgs' would mean from there
        Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(other / "imgs" / i)
    monkeypatch.chdir(other)
    photos, note = load_images(attrs, ids, [0, 1], sizes=sizes)
    assert photos[0] is not None and "photos from" in note  # the recorded folder, named absolutely
    original, was = (tmp_path / "imgs" / ids[1]).read_bytes(), (tmp_path / "imgs" / ids[1]).stat()
    (tmp_path / "imgs" / ids[1]).write_bytes((other / "imgs" / ids[1]).read_bytes())  # a file replaced in place
    photos, note = load_images(attrs, ids, [0, 1], sizes=sizes)
    assert photos == {} and f"not the files this run recorded (first: {ids[1]!r}" in note
    photos, note = load_images({**attrs, SIZES_ATTR: json.dumps(sizes)}, ids, [0, 1])  # a round-19 run's attribute
    assert photos == {} and f"not the files this run recorded (first: {ids[1]!r}" in note
    (tmp_path / "imgs" / ids[1]).unlink()  # one gone: the others are still the recorded files, drawn
    photos, note = load_images(attrs, ids, [0, 1], sizes=sizes)
    assert photos[0] is not None and photos[1] is None and "1 image(s) not found" in note
    old = {**attrs, "data": "imgs"}  # a run from before: its data as typed, no sizes; images missing from a
    assert SIZES_ATTR not in old  # relative folder mean another folder
    (other / "imgs" / ids[2]).unlink()
    photos, note = load_images(old, ids, [0, 2])
    assert photos == {} and "not in 'imgs' (first: " in note and "relative to the folder it was recorded in" in note
    photos, note = load_images(old, ids, [0])
    assert photos[0] is not None and "photos from 'imgs'" in note
    monkeypatch.chdir(tmp_path)  # such a run, recorded here as 'imgs', still resumes from here (not refused with
    (tmp_path / "imgs" / ids[1]).write_bytes(original)  # 'data: file imgs, now /.../imgs')
    os.utime(tmp_path / "imgs" / ids[1], ns=(was.st_atime_ns, was.st_mtime_ns))  # put back as it was (round 39)
    with h5py.File(tmp_path / "run.h5", "r+") as f:
        f.attrs["config"] = json.dumps({**config, "data": "imgs"}, sort_keys=True)
    record_dataset(tiny_vit(), "imgs", tmp_path / "run.h5", modes=2, layers="0", batch_size=4, progress=False,
                   resume=True)
    with open_run(tmp_path / "run.h5") as run:
        assert run.complete and run.n == 3 and run.config["data"] == "imgs"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "run.h5"
    record_dataset(tiny_vit(), "samples", out, modes=4, layers="0", limit=5, batch_size=2, reducers=[], progress=False)
    return out


def test_a_run_array_indexes_the_committed_images_as_numpy_indexes_them(small_run):
    """Slicing a RunArray is numpy's indexing of the committed images, for the idioms HDF5 itself refuses (a reversed
    slice, repeated or unsorted images, lists on other axes, ``...``, new axes); the reference is the dataset read
    whole with h5py."""
    with h5py.File(small_run, "r") as f:
        full = f["modes/L0/query"][:5]
    with open_run(small_run) as run:
        q = run.query(0)
        keys = [0, -1, slice(None), slice(1, 4), slice(None, None, 2), slice(None, None, -1), slice(3, 0, -2),
                [2, 0], [0, 0, 3], np.array([4, 1, 1]), [], np.array([True, False, True, False, True]),
                (Ellipsis, 0), (Ellipsis, slice(1, None)), (1, Ellipsis, 2), (slice(None), 0, slice(None), slice(1, None)),
                (slice(None), slice(None), [3, 1]), ([2, 0], 1, [0, 0]), (slice(None, None, -1), 0, -1),
                (None, 0), (slice(None), None, 1), (-2, slice(None), [1]), (Ellipsis, None), ([1, 2], None, 0)]
        for key in keys:
            got, want = q[key], full[key]
            assert got.shape == want.shape and np.array_equal(got, want), key
        for bad in (5, -6, [0, 5], np.array([True, False])):
            with pytest.raises(IndexError):
                q[bad]
        with pytest.raises(IndexError, match="integer, a slice"):
            q[np.array([0.5])]


def test_a_closed_reader_says_it_is_closed_and_never_answers_empty_or_calls_the_file_damaged(small_run):
    with open_run(small_run) as run:
        q = run.query(0)
        assert run.layers == [0] and run.modes_kept == 4
        model = tiny_vit().model
        with qkhooks.record(model, modes=4, layers=[0]) as live:
            pass
        assert run.mode_source == live.mode_source == {0: "qk"}
    reads = [lambda: run.layers, lambda: run.mode_layers, lambda: run.module_paths, lambda: run.ids,
             lambda: run.config, lambda: run.query(0), lambda: run.spectrum(0), lambda: run.state("topk_modes"),
             lambda: q[0]]
    for read in reads:
        with pytest.raises(QKHooksError, match="is closed .*open the run again") as caught:
            read()
        assert "repair" not in str(caught.value)
    assert "closed" in repr(run)
