"""Run files: schema round trip per dataset, resume after SIGKILL, SWMR reading, skipped images, error paths."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
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
from qkhooks.store._hdf5 import clear_open_flags, lookup3, open_swmr_reader
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
    with qkhooks.record(loaded.model, modes=16, layers=list(layers)) as run, torch.no_grad():
        loaded.model(batch["pixel_values"])
    return list(batch["id"]), {k: v.numpy() for k, v in run.last.arrays().items()}


@pytest.mark.parametrize("data,limit", [("samples", 5), ("voc", None), ("arc2017", None), ("o3:5:3", None)])
def test_round_trip_of_every_dataset(tmp_path, data, limit):
    loaded = tiny_vit()
    out = tmp_path / "run.h5"
    result = record_dataset(loaded, data, out, modes=16, layers="0,1", dtype="float32", limit=limit, batch_size=2,
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
            assert objects.shape == (run.n, 7, 7) and objects.dtype == np.int16 and objects.max() >= 1
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
    ({"batch_size": 0}, "batch size must be >= 1"),
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


def test_writer_commits_whole_batches_and_states_alternate_slots(tmp_path):
    out = tmp_path / "w.h5"
    with RunWriter(out, attrs={"model": "m", "config": {"a": 1}}, dtype="float32") as w:
        w.write_batch(["x", "y"], {"v": torch.arange(6.0).reshape(2, 3)})
        w.write_state("reducers/r", {"s": np.ones(2), "_images": 2})
        w.write_batch(["z"], {"v": torch.full((1, 3), 7.0)})
        w.write_state("reducers/r", {"s": np.zeros(2), "_images": 3})
        assert w.ids == ["x", "y", "z"]
        assert w.read_state("reducers/r")["_images"] == 3 and w.read_state("reducers/r", previous=True)["_images"] == 2
        w.truncate(2)
        assert w.ids == ["x", "y"]
        with pytest.raises(QKHooksError, match="one row per id"):
            w.write_batch(["q"], {"v": torch.zeros(2, 3)})
        w.write_batch(["q"], {"v": torch.zeros(1, 4)})  # wrong per-image shape: reported on the next call
        with pytest.raises(QKHooksError, match="shape"):
            w.flush()
    with open_run(out) as run:
        assert run.ids == ["x", "y"]
        np.testing.assert_array_equal(run.array("v")[:], np.arange(6.0).reshape(2, 3))
        assert run.state("r")["s"].tolist() == [0.0, 0.0] and not run.complete
        with pytest.raises(QKHooksError, match="no per-image array 'w'.*v"):
            run.array("w")


MID_CHANGE = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from qkhooks.store import RunWriter

    w = RunWriter(sys.argv[1])
    for i in range(2):
        w.write_batch([f"i{2 * i}", f"i{2 * i + 1}"], {"v": np.full((2, 3), i, np.float32)})
    w.flush()
    with w._lock, w._structural() as f:  # outside SWMR mode, as while creating a dataset or a checkpoint
        f.attrs["note"] = "mid-change"
        print("inside", flush=True)
        while not os.path.exists(sys.argv[2]):  # until the test lets it go
            time.sleep(0.01)
    w.close()
    """
)


def _writer_paused_mid_change(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A writer process stopped inside a layout change; it goes on once the returned ``release`` file exists."""
    script, out, release = tmp_path / "child.py", tmp_path / "run.h5", tmp_path / "release"
    script.write_text(MID_CHANGE)
    child = subprocess.Popen([sys.executable, str(script), str(out), str(release)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert child.stdout.readline() == b"inside\n", child.stderr.read().decode()[-2000:]
    return child, out, release


def test_a_reader_waits_out_a_live_writers_structural_change(tmp_path):
    child, out, release = _writer_paused_mid_change(tmp_path)
    try:
        with pytest.raises(OSError, match="not already open for SWMR writing"):  # plain h5py, meanwhile
            h5py.File(out, "r", swmr=True, locking=False)
        threading.Timer(0.3, release.touch).start()  # the writer finishes its change while open_run waits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to repair: the writer is alive
            with open_run(out) as run:
                assert run.ids == ["i0", "i1", "i2", "i3"]
    finally:
        release.touch()
        assert child.wait(timeout=60) == 0, child.stderr.read().decode()[-2000:]
    with open_run(out) as run:
        assert run.complete and run.attrs["note"] == "mid-change"


CYCLING = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from qkhooks.store import RunWriter

    w = RunWriter(sys.argv[1])
    w.write_batch(["a"], {"v": np.zeros((1, 3), np.float32)})
    w.flush()
    print("ready", flush=True)
    start = time.time()
    while time.time() - start < float(sys.argv[2]):  # in and out of SWMR mode as fast as it goes
        with w._lock, w._structural() as f:
            f.attrs["t"] = time.time()
    w.close()
    """
)


def test_readers_never_mistake_a_writer_changing_layout_for_a_dead_one(tmp_path):
    # A reader that meets "open for write" flags and then no lock may have caught a live writer re-entering SWMR
    # mode; and probing the lock must not make the writer's own relock fail.
    script, out = tmp_path / "child.py", tmp_path / "run.h5"
    script.write_text(CYCLING)
    child = subprocess.Popen([sys.executable, str(script), str(out), "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert child.stdout.readline() == b"ready\n", child.stderr.read().decode()[-2000:]
    opened = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "writer died" path warns
        while child.poll() is None:
            open_swmr_reader(out).close()
            opened += 1
    assert child.returncode == 0, child.stderr.read().decode()[-2000:]
    assert opened > 10


def test_a_writer_killed_outside_swmr_mode_leaves_a_readable_resumable_run(tmp_path):
    child, out, _ = _writer_paused_mid_change(tmp_path)
    child.kill()
    child.wait()
    with pytest.raises(OSError, match="not already open for SWMR writing"):  # HDF5 alone refuses the file
        h5py.File(out, "r", swmr=True, locking=False)
    found = (sha(out), os.stat(out).st_mtime_ns)
    with pytest.warns(UserWarning, match="writer died while changing"):
        run, other = open_run(out), open_run(out)  # two readers at once: neither writes, so neither races
    with run, other:
        assert run.ids == other.ids == ["i0", "i1", "i2", "i3"] and not run.complete
        assert run.file.filename == str(out)  # quoted by error messages, as for any other run file
        np.testing.assert_array_equal(run.array("v")[:, 0], [0, 0, 1, 1])
    assert (sha(out), os.stat(out).st_mtime_ns) == found  # not even rewritten as found
    with RunWriter(out, mode="resume") as w:
        assert w.committed == 4
        w.write_batch(["i4"], {"v": np.full((1, 3), 2, np.float32)})
    with open_run(out) as run:
        assert run.complete and run.ids == ["i0", "i1", "i2", "i3", "i4"]


def test_an_object_half_written_by_a_dying_writer_is_skipped_by_readers_and_dropped_by_resume(tmp_path):
    out = tmp_path / "run.h5"
    w = RunWriter(out)
    w.write_batch(["a", "b"], {"v": np.ones((2, 3), np.float32)})
    w.write_state("reducers/r", {"_images": 2, "s": np.arange(3.0)})
    w.close(complete=False)
    with h5py.File(out, "r+", libver="latest") as f:  # the writer's last layout change, as a kill mid-flush leaves
        late = f.create_group("reducers/late")  # it: linked from its parent, its own header never reaching disk
        late.create_dataset("x", data=np.arange(5.0))
        cut = h5py.h5o.get_info(late.id).addr
    with open(out, "r+b") as fh:  # superblock v3: flags byte at 11, end-of-file address at 28, checksum at 44
        block = bytearray(fh.read(48))
        block[11] = 1  # still "open for write"
        block[28:36] = cut.to_bytes(8, "little")
        block[44:48] = lookup3(bytes(block[:44])).to_bytes(4, "little")
        fh.seek(0)
        fh.write(block)
        fh.truncate(cut)
    before = sha(out)
    with pytest.warns(UserWarning, match="half-written and skipped: reducers/late"):
        run = open_run(out)
    with run:
        assert run.ids == ["a", "b"] and run.state("r")["s"].tolist() == [0.0, 1.0, 2.0]
        assert run.arrays() == ["v"] and not run.complete
    assert sha(out) == before  # reading changed nothing: the next reader is warned too
    with pytest.warns(UserWarning, match="copying the rest into a fresh file"):
        w = RunWriter(out, mode="resume")
    with w:
        assert w.committed == 2 and w.read_state("reducers/r")["s"].tolist() == [0.0, 1.0, 2.0]
        w.write_batch(["c"], {"v": np.zeros((1, 3), np.float32)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_run(out) as run:
            assert run.complete and run.ids == ["a", "b", "c"] and run.states() == ["r"]
            np.testing.assert_array_equal(run.array("v")[:, 0], [1, 1, 0])
    assert not list(tmp_path.glob("*.salvaging"))


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

