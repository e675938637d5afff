"""Review of the command line, round 38: refusals before any work or file, no fake numbers, no stale or mixed
outputs, messages that say what is true. CLI tests call :func:`qkhooks.cli.main` in-process."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from qkhooks.errors import QKHooksError


# ------------------------------------------------------------------------------------------------ helpers
def _photos(folder, n: int = 5, size: int = 32):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def bfd_run(tmp_path_factory):
    """A complete BFD run file of timm:test_vit (random weights) over 5 noise photos, layers 0 and 1."""
    from qkhooks.cli import main

    tmp = tmp_path_factory.mktemp("bfd")
    folder = _photos(tmp / "images")
    out = tmp / "run.h5"
    assert main(["bfd", "timm:test_vit", str(folder), "--random-init", "--out", str(out), "--layers", "0,1",
                 "--batch-size", "5", "--holdout-every", "2"]) == 0
    return out


def _held(ids, every: int) -> np.ndarray:
    return np.array([int(hashlib.sha256(str(i).encode()).hexdigest()[:16], 16) % every == 0 for i in ids])


def _numpy_ridge_r2(f_train, y_train, f_test, y_test, alpha):
    """Ridge with an unpenalised intercept, lambda = alpha * trace(centred F^T F) / d, solved directly; held-out R^2."""
    fm, ym = f_train.mean(0), y_train.mean(0)
    fc = f_train - fm
    lam = alpha * np.trace(fc.T @ fc) / f_train.shape[1]
    w = np.linalg.solve(fc.T @ fc + lam * np.eye(f_train.shape[1]), fc.T @ (y_train - ym))
    pred = (f_test - fm) @ w + ym
    return 1 - ((y_test - pred) ** 2).sum(0) / ((y_test - y_test.mean(0)) ** 2).sum(0)


def bfd_summary_of(x: np.ndarray, grid, alpha: float, holdout_every: int = 5) -> dict:
    """Both BFD passes over synthetic tokens x (n, N, d) through the reducers: the whole ``summarize`` result."""
    from qkhooks.analysis.bfd import BFDEnergies, PositionDecoding, PositionMeans, summarize
    from qkhooks.capture import BatchCapture, LayerCapture
    from qkhooks.spectrum import LayerSpectrum, factored_svd

    rng = np.random.default_rng(1)
    d = x.shape[-1]
    u, s, v = factored_svd(torch.as_tensor(rng.normal(size=(1, 2, d))), torch.as_tensor(rng.normal(size=(1, 2, d))))
    batch = BatchCapture(ids=[str(i) for i in range(len(x))], meta={},
                         layers={0: LayerCapture(0, len(x), inputs=torch.as_tensor(x))}, offset=0)
    means = PositionMeans()
    means.update(batch)
    reducers = [BFDEnergies([LayerSpectrum(0, u, s, v)], means, 0, False), PositionDecoding(means, grid, 0, holdout_every)]
    for r in reducers:
        r.update(batch)
    return summarize(reducers[0].state_dict(), reducers[1].state_dict(), alpha=alpha)


def _decode(x: np.ndarray, grid, alpha: float, holdout_every: int = 5):
    """The layer's decoding entry of :func:`bfd_summary_of`."""
    return bfd_summary_of(x, grid, alpha, holdout_every)["layers"][0]["decoding"]


# ----------------------------------------------------------------------------------- 1. ridge alpha
BAD_ALPHAS = [0.0, -1e-3, math.nan, math.inf]


def test_alpha_must_be_positive_and_finite_everywhere(tmp_path, bfd_run, capsys):
    """alpha <= 0 or nan fitted no probe and reported R^2 0.000 / -0.068 as if fitted (round 38): refused by the
    API (summarize, read_bfd, run_bfd before any pass) and by argparse for both commands, nothing written."""
    from qkhooks.analysis.bfd import read_bfd, run_bfd
    from qkhooks.cli import main
    from conftest import TINY_MODELS

    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 16, 6))
    grid = (4, 4)
    y = np.stack(np.divmod(np.arange(16), 4), 1).astype(float)
    held = _held(range(10), 5)
    assert 0 < held.sum() < 10
    dec = _decode(x, grid, 0.01)  # a positive alpha: the probe is the direct ridge
    want = _numpy_ridge_r2(x[~held].reshape(-1, 6), np.tile(y, (int((~held).sum()), 1)), x[held].reshape(-1, 6),
                           np.tile(y, (int(held.sum()), 1)), 0.01)
    np.testing.assert_allclose([dec["X"]["row"], dec["X"]["col"]], want, rtol=1e-8)
    for alpha in BAD_ALPHAS:
        with pytest.raises(QKHooksError, match=r"alpha.*finite number > 0"):
            _decode(x, grid, alpha)
        with pytest.raises(QKHooksError, match=r"alpha.*finite number > 0.*1e-3"):
            read_bfd(bfd_run, alpha=alpha)
    model = next(t for t in TINY_MODELS if t.name == "timm-vit").model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(QKHooksError, match="alpha"):
        run_bfd(model, torch.zeros(3, 3, 32, 32), alpha=0.0)
    assert calls == []  # refused before any forward
    for argv in (["bfd", "timm:test_vit", "samples", "--random-init", "--out", str(tmp_path / "b.h5")],
                 ["analyze", "bfd", str(bfd_run), "--out", str(tmp_path / "ab")]):
        for bad in ("0", "-1", "nan", "inf", "x"):
            with pytest.raises(SystemExit) as exit:
                main([*argv, "--alpha", bad])
            assert exit.value.code == 2
            assert "--alpha" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_probe_of_constant_features_says_so_instead_of_an_r2():
    """Training images identical and held-out ones shifted by one vector: C of the training images is constant
    (trace(S_xx) = 0), so no probe can be fitted; the result says so and gives no R^2 (it gave ~0 as if fitted).
    X still decodes and equals the direct ridge."""
    rng = np.random.default_rng(3)
    n, grid = 10, (4, 4)
    held = _held(range(n), 5)
    table = rng.normal(size=(16, 6))
    x = np.repeat(table[None], n, 0)
    x[held] += rng.normal(size=6)
    dec = _decode(x, grid, 1e-3)
    assert dec["C"] == {"row": None, "col": None, "mean": None}
    assert "C" in dec["note"] and "constant features" in dec["note"]
    y = np.stack(np.divmod(np.arange(16), 4), 1).astype(float)
    want = _numpy_ridge_r2(x[~held].reshape(-1, 6), np.tile(y, (int((~held).sum()), 1)), x[held].reshape(-1, 6),
                           np.tile(y, (int(held.sum()), 1)), 1e-3)
    np.testing.assert_allclose([dec["X"]["row"], dec["X"]["col"]], want, rtol=1e-6)


# ---------------------------------------------------------------------------- 2. demo into a report
def _tree(folder):
    """Every file under ``folder`` -> the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_report(folder):
    """A previous report's files (what `qkhooks demo` writes at the top and in the spectrum section)."""
    (folder / "spectrum").mkdir(parents=True)
    (folder / "summary.json").write_text('{"model": "old"}')
    (folder / "index.html").write_text("<html>old</html>")
    (folder / "spectrum" / "spectrum.json").write_text('{"model": "old"}')
    return _tree(folder)


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--batch-size", "-3"], ["--images", "0"]])
def test_demo_refusing_a_record_option_leaves_an_existing_report_untouched(bad, tmp_path, capsys):
    """demo --batch-size 0 into an existing report wrote the new model's spectrum section beside the old summary,
    then refused (round 38): every option is checked before the first section writes."""
    from qkhooks.cli import main

    out = tmp_path / "report"
    before = _old_report(out)
    assert main(["demo", "--model", "timm:test_vit@random", "--out", str(out), *bad]) == 2
    assert _tree(out) == before
    err = capsys.readouterr().err
    assert ("batch size" in err and "--batch-size" in err) if bad[0] == "--batch-size" else "--images" in err


def test_make_report_refuses_an_unknown_device_before_any_section(tmp_path):
    from qkhooks.models.load import load_model
    from qkhooks.report import make_report

    out = tmp_path / "report"
    before = _old_report(out)
    loaded = load_model("timm:test_vit", random_init=True)
    for device, words in (("bogus", "unknown device"), ("cuda:99", "cuda:99")):
        with pytest.raises(QKHooksError, match=words):
            make_report(out, loaded, device=device, progress=False)
    with pytest.raises(QKHooksError, match="batch size"):
        make_report(out, loaded, batch_size=0, progress=False)
    assert _tree(out) == before


# ------------------------------------------------------------------------ 3. bfd's two files
def _copy_run(src, dst_dir):
    import shutil

    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in src.parent.iterdir():
        if path.name.startswith(src.stem):
            shutil.copy(path, dst_dir / path.name)
    return dst_dir / src.name


def test_bfd_overwrite_with_one_image_is_refused_before_pass_1_is_replaced(tmp_path, bfd_run, capsys):
    """--overwrite --limit 1 replaced pass 1 with a 1-image file and then refused, beside the old pass 2 (round 38)."""
    from qkhooks.cli import main

    out = _copy_run(bfd_run, tmp_path / "run")
    before = _tree(out.parent)
    assert len(before) >= 2 and any(".pass1." in name for name in before)
    folder = _photos(tmp_path / "images", n=3)
    assert main(["bfd", "timm:test_vit", str(folder), "--random-init", "--out", str(out), "--layers", "0,1",
                 "--overwrite", "--limit", "1"]) == 2
    assert "at least 2 images" in capsys.readouterr().err
    assert _tree(out.parent) == before
    one = _photos(tmp_path / "one", n=1)
    assert main(["bfd", "timm:test_vit", str(one), "--random-init", "--out", str(out), "--layers", "0,1",
                 "--overwrite"]) == 2
    assert _tree(out.parent) == before


def test_bfd_resume_into_a_record_run_is_refused_before_pass_1(tmp_path, monkeypatch, capsys):
    """--resume --out RUN.h5 where RUN.h5 is a `record` run ran all of pass 1 (writing RUN.pass1.h5) before pass 2
    refused the file (round 38): refused first, no pass-1 file, the run untouched."""
    from qkhooks.analysis.bfd import PositionMeans
    from qkhooks.cli import main

    folder = _photos(tmp_path / "images", n=3)
    run = tmp_path / "rec" / "run.h5"
    run.parent.mkdir()
    assert main(["record", "timm:test_vit", str(folder), "--random-init", "--out", str(run), "--layers", "0,1"]) == 0
    before = _tree(run.parent)
    seen = []
    monkeypatch.setattr(PositionMeans, "update", lambda self, batch: seen.append(batch))
    capsys.readouterr()
    assert main(["bfd", "timm:test_vit", str(folder), "--random-init", "--out", str(run), "--layers", "0,1",
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "not a file of `qkhooks bfd`" in err and "--overwrite" in err
    assert seen == [] and _tree(run.parent) == before


# ------------------------------------------------------------------------ 4. outputs checked up front
def test_analyze_bfd_checks_the_head_before_writing_anything(tmp_path, bfd_run, capsys):
    """--head 99,0 wrote bfd.json and two figures, then refused (round 38)."""
    from qkhooks.analysis.bfd import plot_bfd, read_bfd
    from qkhooks.cli import main

    out = tmp_path / "fig"
    out.mkdir()
    assert main(["analyze", "bfd", str(bfd_run), "--out", str(out), "--head", "99,0"]) == 2
    assert "L99 H0 is not in this result" in capsys.readouterr().err
    with pytest.raises(QKHooksError, match="L1 H5 is not in this result"):
        plot_bfd(read_bfd(bfd_run), out, (1, 5))
    assert list(out.iterdir()) == []
    assert main(["analyze", "bfd", str(bfd_run), "--out", str(out), "--head", "1,1"]) == 0
    assert (out / "bfd_modes_L1H1.png").is_file() and (out / "bfd.json").is_file()


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """spectrum --plot out.txt, spectrum/bfd --json DIR, bfd --out DIR and compare --out FILE gave raw tracebacks
    (after the work: bfd's came after both passes); each is now refused first with a message, nothing written."""
    import qkhooks.models.load as load
    from qkhooks.cli import main

    loads = []
    real = load.load_model
    monkeypatch.setattr(load, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    folder = tmp_path / "d"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cases = [
        (["spectrum", "timm:test_vit", "--random-init", "--plot", str(tmp_path / "out.txt")], "figure format"),
        (["spectrum", "timm:test_vit", "--random-init", "--plot", str(folder)], "is a folder"),
        (["spectrum", "timm:test_vit", "--random-init", "--json", str(folder)], "is a folder"),
        (["bfd", "timm:test_vit", "samples", "--random-init", "--out", str(tmp_path / "b.h5"), "--json", str(folder)],
         "is a folder"),
        (["bfd", "timm:test_vit", "samples", "--random-init", "--out", str(folder)], "is a folder"),
        (["compare", "timm:test_vit@random", "timm:test_vit2@random", "--out", str(afile)], "is a file"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("qkhooks: error:") and words in err and "Traceback" not in err, (argv, err)
    assert loads == []  # refused before any model was loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d"] and list(folder.iterdir()) == []
    assert afile.read_text() == "mine"


# ------------------------------------------------------------------- 5. analyze into a used --out
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A modes run of timm:test_vit over 3 noise photos and an odd-one-out run with attention rows."""
    from qkhooks.cli import main

    tmp = tmp_path_factory.mktemp("runs")
    folder = _photos(tmp / "images", n=3)
    modes, o3 = tmp / "modes.h5", tmp / "o3.h5"
    assert main(["record", "timm:test_vit", str(folder), "--random-init", "--out", str(modes), "--layers", "0,1"]) == 0
    assert main(["record", "timm:test_vit", "o3:4", "--random-init", "--out", str(o3), "--layers", "0,1",
                 "--attention", "rows"]) == 0
    return {"modes": modes, "o3": o3}


def _stale(out, names):
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("from an earlier run")
    (out / "notes.txt").write_text("mine")


@pytest.mark.parametrize("command, stale, fresh", [
    ("modes", ["same_object.csv", "same_object.png", "figures/L7/L7_H0_M0.png"], "modes.json"),
    ("bfd", ["bfd_modes_L9H9.png", "bfd.json"], "bfd.json"),
    ("preference", ["preference.png"], "preference.csv"),
])
def test_analyze_into_a_folder_with_earlier_outputs_needs_overwrite_which_removes_them(
        command, stale, fresh, tmp_path, runs, bfd_run, capsys):
    """analyze modes into a folder of another run's outputs left its same_object.csv/png and figures beside the
    new modes.json (round 38): refused without --overwrite (nothing touched); with it the command's own earlier
    outputs are removed first, other files kept."""
    from qkhooks.cli import main

    run = {"modes": runs["modes"], "bfd": bfd_run, "preference": runs["o3"]}[command]
    out = tmp_path / "out"
    _stale(out, stale)
    before = _tree(out)
    argv = ["analyze", command, str(run), "--out", str(out)] + (["--figure-modes", "0", "--no-images"]
                                                                 if command == "modes" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"already holds the outputs of `qkhooks analyze {command}`" in err and "--overwrite" in err
    assert _tree(out) == before
    assert main([*argv, "--overwrite"]) == 0
    assert (out / fresh).is_file() and (out / "notes.txt").read_text() == "mine"
    left = [p for p in out.rglob("*") if p.is_file() and p.read_bytes() == b"from an earlier run"]
    assert left == []  # each earlier output removed, or written anew
    assert not (out / "figures" / "L7").exists()
    assert main([*argv, "--overwrite"]) == 0  # and again: the same outputs, replaced


# ------------------------------------------------------------------------------- 6. raw tracebacks
def test_a_closed_pipe_stops_the_command_quietly(runs):
    """`qkhooks info RUN | head` printed a BrokenPipeError traceback (round 38). Here stdout is a pipe whose reader
    has already gone, so the first write fails, every time."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "qkhooks", "info", str(runs["modes"])], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 141


@pytest.mark.parametrize("option, least", [("--threads", 1), ("--rounds", 1), ("--batch", 1), ("--warmup", 0)])
def test_bench_counts_are_range_checked(option, least, capsys):
    """bench --threads 0 / --rounds 0 ended in a raw traceback deep in torch or the harness (round 38)."""
    from qkhooks.cli import main
    from qkhooks.cli.bench import harness_available

    if not harness_available():
        pytest.skip("the benchmark harness lives in the source checkout")
    for bad in (str(least - 1), "x"):
        with pytest.raises(SystemExit) as exit:
            main(["bench", option, bad])
        assert exit.value.code == 2
        assert f"argument {option}: must be a whole number >= {least}, got '{bad}'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- 7. messages
def test_analyze_without_a_subcommand_names_the_choices(capsys):
    from qkhooks.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["analyze"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "choose one of: preference, modes, bfd" in err and "analyze_command" not in err


def test_help_of_k_and_modes_says_what_they_do(capsys):
    from qkhooks.cli import main

    for argv, words in ((["analyze", "modes", "--help"], "k distinct images per mode (either sign"),
                        (["record", "--help"], "0 / none for no modes")):
        with pytest.raises(SystemExit):
            main(argv)
        assert words in " ".join(capsys.readouterr().out.split())


def test_modes_of_a_bfd_pass_1_file_points_to_its_pass_2_file(bfd_run, tmp_path, capsys):
    from qkhooks.analysis.bfd import pass1_path
    from qkhooks.cli import main

    assert main(["analyze", "modes", str(pass1_path(bfd_run)), "--out", str(tmp_path / "m")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"`qkhooks analyze bfd {bfd_run}`" in err and "pass 1" in err
    assert main(["analyze", "bfd", str(bfd_run), "--out", str(tmp_path / "b")]) == 0  # the file it names reads


def test_a_checkpoint_of_another_run_is_named_as_such_not_missing(runs, tmp_path, capsys):
    """RUN.h5.reducers of another run (run_id mismatch) was reported as missing by info and analyze modes."""
    import shutil

    from qkhooks.cli import main
    from qkhooks.store import open_run

    run = tmp_path / "a.h5"
    shutil.copy(runs["modes"], run)
    shutil.copy(str(runs["o3"]) + ".reducers", str(run) + ".reducers")
    with open_run(run) as r:
        note = r.missing_states()
    assert "a.h5.reducers belongs to another run" in note and "is missing" not in note
    assert main(["info", str(run)]) == 0
    assert "belongs to another run" in capsys.readouterr().out
    shutil.copy(str(runs["modes"]) + ".reducers", str(run) + ".reducers")  # its own: no note
    with open_run(run) as r:
        assert r.missing_states() == ""


def test_a_stopped_run_says_what_the_baseline_covers(runs, tmp_path, monkeypatch, capsys):
    """A stopped run's note said every number covers its 36 committed images while the anisotropy baseline covers
    the 32 of the checkpoint: the note gives the baseline's own count (summary['baseline_images'], the anisotropy
    state's count, which equals the run's images for a complete run)."""
    import qkhooks.analysis.modes as modes
    from qkhooks.cli import main

    real = modes.analyze_modes
    seen = {}

    def stopped(*a, **k):
        summary = real(*a, **k)
        seen.update(summary)
        return {**summary, "complete": False, "images": summary["images"] + 4}

    monkeypatch.setattr(modes, "analyze_modes", stopped)
    assert main(["analyze", "modes", str(runs["modes"]), "--out", str(tmp_path / "m"), "--figure-modes", "0",
                 "--no-images", "--no-overview"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert seen["baseline_images"] == seen["images"] == 3
    assert "cover its 7 committed images, the anisotropy baseline the 3 of its reducer checkpoint" in out
    assert "every number covers" not in out
