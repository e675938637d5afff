"""Round 39 fixes of round 38's open CLI and data items: compare of one report twice, refusals that leave no folder
behind, Hugging Face path-dict image ids, a webdataset sample's unreadable .json, the preference table's ± legend,
SIGTERM in bfd and demo. CLI tests call :func:`qkhooks.cli.main` in-process unless a signal needs a child."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from qkhooks.cli import main


# ------------------------------------------------------------------------------------------------ helpers
def _report(folder, model: str = "m", values=(0.1, 0.2)):
    """A report folder as `qkhooks demo` leaves it, as far as compare reads it: summary.json with one curve."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"model": model, "curves": {
        "cosine": {"layers": list(range(len(values))), "values": list(values), "images": 0, "few": None}}}))
    return folder


# ------------------------------------------------------------------------------------------------ 1. compare X X
@pytest.mark.parametrize("spelling", ["same", "summary", "dotted", "symlink"])
def test_compare_refuses_one_report_named_twice(tmp_path, capsys, monkeypatch, spelling):
    rep = _report(tmp_path / "rep")
    monkeypatch.chdir(tmp_path)
    other = {"same": str(rep), "summary": str(rep / "summary.json"), "dotted": "./rep/../rep",
             "symlink": str(tmp_path / "link")}[spelling]
    if spelling == "symlink":
        os.symlink(rep, tmp_path / "link")
    out = tmp_path / "new" / "cmp"
    assert main(["compare", str(rep), other, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "name one report" in err and "arguments 1 and 2" in err and "Pass each report folder or model spec once" in err
    assert not (tmp_path / "new").exists()


def test_compare_refuses_one_model_spec_twice_and_takes_two_reports(tmp_path, capsys):
    assert main(["compare", "timm:test_vit@random", "timm:test_vit@random", "--out", str(tmp_path / "c")]) == 2
    assert "name one model spec" in capsys.readouterr().err and not (tmp_path / "c").exists()
    a, b = _report(tmp_path / "a", "A"), _report(tmp_path / "b", "B", (0.3, 0.4))  # two reports: drawn, both
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 0
    saved = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert {k: v["cosine"]["values"] for k, v in saved["models"].items()} == {"A": [0.1, 0.2], "B": [0.3, 0.4]}


# ------------------------------------------------------------------------------------------------ 2. no folder left
def _photos(folder, n: int = 4, size: int = 32):
    """Round 38's noise photos (``img00.png`` ...), 4 by default."""
    from test_cli_refusals_before_work import _photos as photos

    return photos(folder, n, size)


TINY = ["timm:test_vit", "--random-init"]


@pytest.mark.parametrize("command, bad, words", [
    ("record", ["--limit", "0"], "limit must be a positive integer"),
    ("record", ["--batch-size", "0"], "--batch-size"),
    ("record", ["--workers", "-1"], "--workers"),
    ("record", ["--modes", "abc"], "modes must be"),
    ("record", ["--layers", "99"], "layer 99 does not exist"),  # found with the model: its folder taken away
    ("bfd", ["--limit", "0"], "limit must be a positive integer"),
    ("bfd", ["--holdout-every", "1"], "holdout_every must be >= 2"),
    ("bfd", ["--batch-size", "0"], "--batch-size"),
    ("bfd", ["--layers", "99"], "layer 99 does not exist"),
])
def test_a_refused_record_or_bfd_leaves_no_folder_behind(tmp_path, capsys, command, bad, words):
    photos = _photos(tmp_path / "photos")
    assert main([command, *TINY, str(photos), "--out", str(tmp_path / "new" / "dir" / "r.h5"), *bad]) == 2
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_a_refusal_keeps_a_folder_that_was_there_and_a_run_keeps_the_folder_it_made(tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    (tmp_path / "there").mkdir()
    assert main(["record", *TINY, str(photos), "--out", str(tmp_path / "there" / "r.h5"), "--layers", "99"]) == 2
    assert (tmp_path / "there").is_dir() and not list((tmp_path / "there").iterdir())
    out = tmp_path / "made" / "r.h5"
    assert main(["record", *TINY, str(photos), "--out", str(out), "--layers", "1", "--modes", "2", "--limit", "2"]) == 0
    from qkhooks.store import open_run

    with open_run(out) as run:
        assert run.complete and run.n == 2


# ------------------------------------------------------------------------------------------------ 3. HF path dicts
def _stream_ids_pixels(stream):
    ids, pixels = [], []
    for batch in stream.batches(2):
        ids += [item["id"] for item in batch.items]
        pixels += [item["pixel_values"] for item in batch.items]
    return ids, pixels


@pytest.mark.parametrize("decode", [False, True])
def test_a_hugging_face_image_column_read_from_files_names_rows_by_path(tmp_path, decode):
    """Image(decode=False) cells {"path": P, "bytes": None} (what datasets keeps for a path, or an image opened from a
    file) were named 0, 1, 2 where a column of the same path strings is named by the paths; now alike, and the same
    pixels as a list of the paths."""
    datasets = pytest.importorskip("datasets")
    import torch

    from qkhooks.data import ImageConfig, open_source

    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    paths = [str(p) for p in sorted(_photos(tmp_path / "a", 3).iterdir())]
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image(decode=decode))
    assert ds.cast_column("image", datasets.Image(decode=False))[0]["image"] == {"bytes": None, "path": paths[0]}
    ids, pixels = _stream_ids_pixels(open_source(ds, cfg))
    list_ids, list_pixels = _stream_ids_pixels(open_source(list(paths), cfg))
    assert ids == list_ids == paths
    assert all(torch.equal(a, b) for a, b in zip(pixels, list_pixels))
    assert _stream_ids_pixels(open_source(ds.to_iterable_dataset(), cfg))[0] == paths  # streamed: named alike
    assert open_source(ds, cfg).ids_before(2) == paths[:2]  # what a resume compares, read without decoding
    twice = datasets.Dataset.from_dict({"image": [paths[1], paths[0], paths[1]]}).cast_column(
        "image", datasets.Image(decode=decode))
    with pytest.raises(Exception, match=rf"items 0 and 2 have the same id {paths[1]!r}"):
        open_source(twice, cfg)


def test_a_hugging_face_image_column_holding_bytes_keeps_positions(tmp_path):
    """Cells that hold their image's bytes name no file to read (a path beside the bytes is a label, often the bare
    file name, which two rows may share): their rows keep their positions."""
    datasets = pytest.importorskip("datasets")
    from qkhooks.data import ImageConfig, open_source

    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    paths = sorted(_photos(tmp_path / "a", 3).iterdir())
    cells = [{"bytes": p.read_bytes(), "path": "same.png"} for p in paths]
    ds = datasets.Dataset.from_dict({"image": cells}).cast_column("image", datasets.Image(decode=False))
    assert _stream_ids_pixels(open_source(ds, cfg))[0] == ["0", "1", "2"]
    assert open_source(ds, cfg).ids_before(3) == ["0", "1", "2"]


# ------------------------------------------------------------------------------------------------ 4. wds .json
def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _shard(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


BAD_JSON = [(b'{"id": ', "is not valid JSON (JSONDecodeError"), (b"[1, 2]", "holds a JSON list, not an object"),
            ('{"id": "caf\xe9"}'.encode("latin-1"), "is not valid JSON (UnicodeDecodeError")]


@pytest.mark.parametrize("text, problem", BAD_JSON)
def test_a_webdataset_sample_whose_json_does_not_parse_is_refused_naming_shard_sample_and_member(tmp_path, capsys,
                                                                                                 text, problem):
    """A bad NAME.json raised a bare JSONDecodeError (or AttributeError, UnicodeDecodeError) from the reader: now the
    item-located refusal of a bad member (shard, sample key, member, fix), through the command line as one line."""
    shard = _shard(tmp_path / "s.tar", [("p0.png", _png()), ("P1.png", _png()), ("P1.JSON", text), ("p2.png", _png())])
    out = tmp_path / "r.h5"
    assert main(["record", *TINY, f"wds:{shard}", "--out", str(out), "--layers", "0", "--modes", "2",
                 "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert f"qkhooks: error: sample 'P1' of {shard}: its member 'P1.JSON' {problem}" in err, err
    assert "write the shard again" in err and "stay committed" in err  # and where the run file stands


@pytest.mark.parametrize("text, problem", BAD_JSON)
def test_a_webdataset_sample_dict_whose_json_does_not_parse_is_refused_alike(text, problem):
    """The samples of a webdataset.WebDataset (dicts keyed by extension) read through _own_id: the same refusal."""
    from qkhooks.data import ImageConfig, open_source
    from qkhooks.errors import DataRefusal

    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    samples = [{"__key__": "p0", "png": _png(), "json": b'{"id": "zero"}'}, {"__key__": "p1", "png": _png(), "json": text}]
    with pytest.raises(DataRefusal, match=rf"sample 'p1': its member 'p1.json' {problem[:12]}.*write the shard again"):
        [item["id"] for batch in open_source(iter(samples), cfg).batches(2) for item in batch.items]
    good = [{"__key__": "p0", "png": _png(), "json": b'{"id": "zero"}'}, {"__key__": "p1", "png": _png()}]
    assert [item["id"] for batch in open_source(good, cfg).batches(2) for item in batch.items] == ["zero", "p1.png"]


# ------------------------------------------------------------------------------------------------ 5. the ± legend
def test_the_preference_table_says_what_its_plus_minus_is_and_the_number_is_that():
    """analyze preference printed 'mean ± x' with no word of what x is: now the line under the table says it (std
    across images of each image's head-averaged share, ddof=0), and x is that, computed here with numpy."""
    import numpy as np

    from qkhooks.analysis.preference import GROUPS, format_table, preference_table

    rng = np.random.default_rng(3)
    values = {0: rng.dirichlet(np.ones(3), size=(7, 4, 2)).reshape(7, 4, 6), 2: rng.random((7, 4, 6))}
    text = format_table(preference_table(values))
    lines = text.splitlines()
    assert "same_object (mean ± std)" in lines[0]
    for row, layer in zip(lines[1:3], (0, 2)):
        v = values[layer]
        for cell, (i, j) in zip(row.split()[1::3], GROUPS.values()):  # "mean ± std" cells
            per_image = ((v[..., i] + v[..., j]) / 2).mean(1)  # each image's head-averaged group share
            assert float(cell) == pytest.approx(per_image.mean(), abs=5e-4)
        stds = [float(c) for c in row.split()[3::3]]
        assert stds == pytest.approx([((v[..., i] + v[..., j]) / 2).mean(1).std(ddof=0) for i, j in GROUPS.values()],
                                     abs=5e-4)
    assert lines[-1].startswith("mean ± std: the share averaged over the 7 images and the heads ± its standard "
                                "deviation across the 7 images (of each image's head-averaged share, ddof=0)")
    assert "not the uncertainty of the mean" in lines[-1]
    assert "95% CI" not in lines[-1]  # this table has no interval: none is pointed to
    table = preference_table(values)
    for g in GROUPS:  # analyze_preference's table carries the 95% CI of the mean: the legend says where it is
        table[g]["ci_low"], table[g]["ci_high"] = [0.0, 0.0], [1.0, 1.0]
    assert "the 95% CI of the mean is preference.png's bands" in format_table(table).splitlines()[-1]


# ------------------------------------------------------------------------------------------------ 6. SIGTERM
def _terminate_when(args, ready, tmp_path, timeout: float = 120.0):
    """Run `qkhooks ARGS` in a child, send it SIGTERM once ``ready()`` holds, and return (status, stderr)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "qkhooks", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and child.poll() is None and not ready():
            time.sleep(0.05)
        assert child.poll() is None, "the command ended before it could be stopped: give it more work"
        child.send_signal(signal.SIGTERM)
        status = child.wait(timeout=60)
        return status, child.stderr.read().decode()
    finally:
        child.kill()


def _committed(path) -> int:
    from qkhooks.errors import QKHooksError
    from qkhooks.store import open_run

    if not path.exists():
        return 0
    try:
        with open_run(path) as run:
            return run.n
    except (QKHooksError, OSError):
        return 0


def _tiny_hf(folder):
    """hf:DIR@random of a 2-block ViT at 48 x 48 (36 tokens): a child process runs it in milliseconds a batch."""
    import transformers

    transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=48, patch_size=8).save_pretrained(folder)
    return f"hf:{folder}@random"


def _close(a, b) -> bool:
    """Two JSON results equal: the same keys and strings, numbers within float rounding."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return b == pytest.approx(a, rel=1e-6, abs=1e-9)
    return a == b


def test_sigterm_stops_bfd_cleanly_saying_how_to_resume_and_the_resume_equals_one_pass(tmp_path):
    """qkhooks bfd was killed by SIGTERM mid-write (no handler): now it stops as record does, the pass file closed with
    its committed images, exit 128 + 15 and a message naming the file and --resume; the resume gives the numbers of an
    uninterrupted run."""
    import signal

    import h5py

    model, photos = _tiny_hf(tmp_path / "vit"), _photos(tmp_path / "photos", 150)
    out, pass1 = tmp_path / "r.h5", tmp_path / "r.pass1.h5"
    args = ["bfd", model, str(photos), "--out", str(out), "--holdout-every", "2", "--json", str(tmp_path / "resumed.json")]
    status, err = _terminate_when([*args, "--batch-size", "1"], lambda: _committed(pass1) >= 3, tmp_path)
    assert status == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert (f"qkhooks: stopped by SIGTERM: BFD stopped during pass 1 of 2 (the position means), recorded into {pass1}: "
            f"{pass1} keeps " in err and "the same command with --resume" in err), err[-2000:]  # round 40: the pass named
    with h5py.File(pass1, "r") as f:  # closed by its writer: plain HDF5 opens it
        assert not f.attrs["complete"] and 3 <= int(f["images"].attrs["committed"]) < 150
    assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "there is no run at r.h5 to continue" for pass 2: pass 1 was stopped
        warnings.filterwarnings("ignore", "ImageConfig.from_hf_model guessed")
        assert main([*args, "--resume", "--batch-size", "75"]) == 0
    assert main(["bfd", model, str(photos), "--out", str(tmp_path / "once.h5"), "--holdout-every", "2",
                 "--batch-size", "75", "--json", str(tmp_path / "once.json")]) == 0
    resumed, once = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "once"))
    assert resumed["images"] == once["images"] == 150
    assert _close(resumed["layers"], once["layers"])


def test_sigterm_stops_demo_cleanly_with_its_run_file_closed_and_says_to_run_it_again(tmp_path):
    """qkhooks demo was killed by SIGTERM mid-write: now the run file it was writing is closed (plain HDF5 opens it),
    it exits 128 + 15, and says the report is unfinished and to run the command again (demo has no --resume, which
    the run file's own message would have advised)."""
    import signal

    import h5py

    model, photos = _tiny_hf(tmp_path / "vit"), _photos(tmp_path / "photos", 2, size=48)
    report = tmp_path / "report"
    run = report / "runs" / "odd_one_out.h5"
    args = ["demo", "--model", model, "--data", str(photos), "--o3", "400", "--objects", "2", "--batch-size", "1",
            "--out", str(report)]
    status, err = _terminate_when(args, lambda: _committed(run) >= 2, tmp_path)
    assert status == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert (f"qkhooks: stopped by SIGTERM: the report in {report} is unfinished (no index.html or summary.json was "
            "written; its run files under") in err, err[-2000:]
    assert "demo has no --resume: run the same command again" in err and "--resume in place" not in err
    with h5py.File(run, "r") as f:  # closed by its writer
        assert not f.attrs["complete"] and 2 <= int(f["images"].attrs["committed"]) < 400
    assert not (report / "index.html").exists() and not (report / "summary.json").exists()


def test_resuming_a_position_named_run_of_an_image_column_read_from_files_is_refused_with_the_reason(tmp_path,
                                                                                                       monkeypatch):
    """Such a run of an earlier qkhooks named its rows 0, 1, ...; resumed now it would go on under path ids: refused,
    saying an earlier qkhooks named them by position (as for a column of path strings, round 38)."""
    datasets = pytest.importorskip("datasets")
    import timm
    import torch

    import qkhooks
    from qkhooks.data import ImageConfig, readers
    from qkhooks.errors import QKHooksError
    from qkhooks.models.load import LoadedModel

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1,
                            num_heads=4, num_classes=0).eval()
    loaded = LoadedModel(model=net, spec="tiny", image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))
    paths = [str(p) for p in sorted(_photos(tmp_path / "many", 6).iterdir())]
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image(decode=False))
    out, kw, calls = tmp_path / "hf.h5", dict(layers="0", modes=2, batch_size=2, progress=False, checkpoint_every=1), []

    def stop(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as old:  # the earlier naming: positions, and no ids listed without decoding
        old.setattr(readers._HFReader, "row_id", lambda self, row, position: str(position))
        old.setattr(readers._HFReader, "mask_layouts", lambda self, stop: None)
        with pytest.raises(KeyboardInterrupt):
            qkhooks.record_dataset(loaded, ds, out, on_batch=stop, **kw)
    with pytest.raises(QKHooksError, match=r"image 0 of the file is '0', the data's is .*img00\.png'.*recorded by an "
                                           r"earlier qkhooks, which named items given as file paths by their position"):
        qkhooks.record_dataset(loaded, ds, out, resume=True, **kw)
    qkhooks.record_dataset(loaded, ds, tmp_path / "new.h5", **kw)  # a new run names them by path
    with qkhooks.open_run(tmp_path / "new.h5") as run:
        assert list(run.ids) == paths
