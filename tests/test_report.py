"""The demo report: every section present, figures inlined byte for byte, numbers traceable to the run
files, and the page renders in headless Chromium with every image loaded."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.report import make_report

SECTIONS = ["modes", "same_object", "anisotropy", "spectrum", "preference", "bfd"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=3,
                              num_heads=4).eval()
    loaded = qkhooks.load_model(model)
    loaded.note = "A test model: <random> weights & a note that must be escaped."
    out = tmp_path_factory.mktemp("report")
    summary = make_report(out, loaded, photos=4, o3=6, objects=3, batch_size=4, progress=False)
    return out, summary, loaded


def test_summary_has_every_section_with_numbers_from_the_runs(report):
    out, summary, loaded = report
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(summary["sections"]) == set(SECTIONS)
    spec = qkhooks.spectrum(loaded.model)
    np.testing.assert_allclose(summary["sections"]["spectrum"]["cosine_weighted_by_layer"],
                               spec.cosine_weighted_by_layer(), atol=1e-6)
    with qkhooks.open_run(out / "runs" / "odd_one_out.h5") as run:
        assert run.complete and run.n == summary["sections"]["preference"]["images"] == 6
    with qkhooks.open_run(out / "runs" / "photos.h5") as run:
        assert run.n == summary["sections"]["modes"]["images"] == 4
        assert run.state("topk_modes") is not None
    with qkhooks.open_run(out / "runs" / "objects.h5") as run:
        assert run.n == summary["sections"]["same_object"]["images"] == 2 + 3  # voc, arc2017, 3 displays
    assert summary["model"] == loaded.spec and summary["seconds"] > 0
    # without --keep-runs the BFD runs go, sidecar checkpoints included (bfd.json keeps every number)
    assert not list((out / "runs").glob("bfd*")), sorted(p.name for p in (out / "runs").iterdir())


def _figures(page: str) -> list[tuple[str, str, str, str]]:
    """(mime, base64 data, alt, caption) of every figure in the page."""
    return re.findall(r"<figure><img src='data:image/(png|jpeg);base64,([^']+)' alt='([^']+)'><figcaption>(.*?)</figcaption>",
                      page, flags=re.S)


def test_html_inlines_every_figure_once_with_counts_and_escapes_text(report):
    out, summary, _ = report
    page = (out / "index.html").read_text()
    for key in SECTIONS:
        assert f"id='{key}'" in page
    figures = _figures(page)
    assert len(figures) == len(re.findall(r"<img ", page)) >= 12  # Fig. 2, 3, 4 (x3), 5, S1, S2, S3, BFD (x5)
    for mime, data, rel, caption in figures:
        assert base64.b64decode(data) == (out / rel).read_bytes()  # the figure on disk, byte for byte
        assert rel.endswith(".jpg" if mime == "jpeg" else ".png")
        assert re.search(r"\b\d+ (images|photos)\b|no images", caption), caption  # every caption states its count
        for band in re.findall(r"CI[^;)]*", caption):  # and what each interval is over: images or heads
            assert re.search(r"over (images|heads)", band), caption
    digests = [hashlib.sha256(base64.b64decode(data)).hexdigest() for _, data, _, _ in figures]
    assert len(set(digests)) == len(digests)  # no figure shown twice
    assert [rel for _, _, rel, _ in figures if "overview" in rel] == [f"modes/figures/L{l}_overview.jpg" for l in (0, 1, 2)]
    assert "&lt;random&gt; weights &amp; a note" in page and "<random>" not in page
    for trend in re.findall(r"<li class='trend'>(.*?)</li>", page, flags=re.S):  # every trend sentence has its CI
        assert re.search(r"\d+(\.\d+)?% CI [-+]\d\.\d{3} to [-+]\d\.\d{3}", trend) or "too few" in trend, trend
    assert len(re.findall(r"<li class='trend'>", page)) >= 8
    for section in ("modes", "anisotropy", "same_object", "bfd"):  # each says how it departs from the paper
        block = page.split(f"id='{section}'")[1].split("<h2")[0]
        assert "class='departs'" in block
    assert "--input residual" in page and "--display percentile" in page
    assert "fewer than 30" in page and "qkhooks demo --data DIR" in page  # 4 photos: warned, with the command
    assert "so their R² is not read here" in page and "Held-out position decoding" not in page  # 1 held-out photo
    assert not any("Held-out position decoding" in s for s in summary["sections"]["bfd"]["sentences"])  # nor the JSON
    assert summary["sections"]["bfd"]["split_isolates_position"] is None


def test_readings_state_the_effects_of_the_numbers_in_the_summary(report):
    """The trend reading of the preference section is the late-third minus early-third difference of the
    per-layer means that preference.json holds (3 layers: thirds are L0 and L2)."""
    out, summary, _ = report
    table = json.loads((out / "preference" / "preference.json").read_text())
    same = table["same_object"]["mean"]
    reading = summary["sections"]["preference"]["readings"][0]
    assert reading["estimates"]["late_minus_early"]["value"] == pytest.approx(same[-1] - same[0], abs=1e-6)  # summary: 6 digits
    for g in ("same_object", "background"):  # the figure's CI bands hold the means they surround
        low, high, mean = (np.asarray(table[g][k]) for k in ("ci_low", "ci_high", "mean"))
        assert (low <= mean + 1e-12).all() and (mean <= high + 1e-12).all()
    cos = summary["sections"]["spectrum"]["readings"][0]
    spec_cos = summary["sections"]["spectrum"]["cosine_weighted_by_layer"]
    assert cos["estimates"]["late_minus_early"]["value"] == pytest.approx(spec_cos[-1] - spec_cos[0], abs=3e-6)


def test_run_files_keep_reducer_states_not_per_image_maps(report):
    out, summary, _ = report
    with qkhooks.open_run(out / "runs" / "photos.h5") as run:
        assert not run.has("modes/L0/query") and run.state("topk_modes") is not None
        vectors = run.state("anisotropy_images")["vectors"]
        assert vectors.shape[:2] == (4, 3)
    z = np.asarray(vectors[:, 1], dtype=np.float64)
    G = z @ z.T
    direct = (G.sum() - np.trace(G)) / (len(z) * (len(z) - 1))  # mean cosine over pairs of different images
    aniso = json.loads((out / "modes" / "modes.json").read_text())["anisotropy"]["1"]
    assert direct == pytest.approx(aniso["baseline"], abs=1e-5) and aniso["baseline_images"] == 4
    assert aniso["baseline_low"] is None  # 4 images: fewer than 6, no interval (round 23's bootstrap-t)
    reading = summary["sections"]["anisotropy"]["readings"][0]  # compare_reading over the layers
    assert reading["verdict"] == "too_few" and "too few images (4)" in reading["text"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_with_all_images(report, tmp_path):
    out, _, _ = report
    page = out / "index.html"
    n_images = len(re.findall(r"<img ", page.read_text()))
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]
    dom = subprocess.run(cmd + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-images-loaded="{n_images}/{n_images}"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(cmd + ["--window-size=1100,1600", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1100) and pixels.std() > 20  # text and figures, not a blank page


@pytest.mark.slow  # loads two real ViT-S models (a few seconds each at load 1)
def test_compare_draws_a_trained_and_a_random_model_on_one_fig3(monkeypatch, tmp_path):
    """`qkhooks compare offline:dinov2-s14 timm:vit_small_patch14_dinov2@random`: both cosine curves on one axis,
    each equal to the model's own spectrum; the random one stays near 0, the trained one does not."""
    import qkhooks.plots as plots
    from qkhooks.cli import main

    drawn = {}
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.setdefault(Path(path).name, fig) and real_save(fig, path))
    assert main(["compare", "offline:dinov2-s14", "timm:vit_small_patch14_dinov2@random", "--out", str(tmp_path)]) == 0
    lines = {line.get_label(): line.get_ydata() for line in drawn["cosine.png"].axes[0].get_lines()}
    assert set(lines) == {"offline:dinov2-s14", "timm:vit_small_patch14_dinov2@random"}
    trained = qkhooks.spectrum(qkhooks.load_model("offline:dinov2-s14").model).cosine_weighted_by_layer()
    np.testing.assert_allclose(lines["offline:dinov2-s14"], trained, atol=1e-6)
    assert np.abs(lines["timm:vit_small_patch14_dinov2@random"]).max() < 0.02 < np.min(trained)
    assert "cosine.png" in (tmp_path / "index.html").read_text() and (tmp_path / "compare.json").exists()


def test_compare_puts_models_of_different_depth_on_relative_depth(report, tmp_path):
    from qkhooks.compare import compare

    out, summary, _ = report
    compare([str(out), "offline:dinov2-s14"], tmp_path)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["relative_depth"] and saved["depths"] == {"VisionTransformer": 3, "offline:dinov2-s14": 12}
    assert set(saved["models"]["VisionTransformer"]) >= {"cosine", "preference_same_object", "same_object", "bfd_CC"}
    captions = dict((rel, caption) for _, _, rel, caption in _figures((tmp_path / "index.html").read_text()))
    assert "from the weights (no images)" in captions["cosine.png"]  # both cosine curves come from weights alone
    counts = {"preference_same_object.png": "preference", "same_object.png": "same_object", "bfd_CC.png": "bfd"}
    for rel, section in counts.items():  # every other caption states the images each model's curve rests on
        assert f"over {summary['sections'][section]['images']} images (VisionTransformer)" in captions[rel], captions[rel]
    page = (tmp_path / "index.html").read_text()
    assert "VisionTransformer: This rests on 6 displays (fewer than 30); more displays: `qkhooks demo --o3 N`" in page
    with pytest.raises(qkhooks.QKHooksError, match="neither a report folder nor a model spec"):
        compare([str(out), "nonsense"], tmp_path)


def test_chance_of_the_same_object_is_the_mean_inverse_object_count():
    from qkhooks.analysis.modes import chance_same_object

    labels = np.zeros((4, 3, 3), dtype=np.int64)
    labels[0, 0, 0] = 1  # one object
    labels[1, 0, :2] = [1, 2]  # two
    labels[2, 1, :] = [3, 5, 7]
    labels[2, 2, 0] = 9  # four
    # image 3 has no object: not counted
    assert chance_same_object(labels) == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)


@pytest.mark.slow  # two real ViT-S reports on 4 images each (about 1.5 minutes on 2 busy cores)
def test_demo_of_two_models_writes_a_report_each_and_their_comparison(monkeypatch, tmp_path):
    """`qkhooks demo --model offline:dinov2-s14 --model offline:dinov2-s14@random`: a report per model in its own
    folder, and DIR/compare overlays what each report measured; its Fig. 3 holds both models' cosine curves, each
    equal to the model's own spectrum, and every caption counts its images."""
    import qkhooks.plots as plots
    from qkhooks.cli import main

    drawn = {}
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.setdefault(Path(path).name, fig) and real_save(fig, path))
    specs = {"offline:dinov2-s14": "offline_dinov2-s14", "offline:dinov2-s14@random": "offline_dinov2-s14_random"}
    args = ["demo", *(a for spec in specs for a in ("--model", spec)), "--images", "4", "--o3", "4", "--objects", "2",
            "--batch-size", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    saved = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert set(saved["models"]) == set(specs) and not saved["relative_depth"]
    for spec, folder in specs.items():
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        assert summary["model"] == spec and summary["random_init"] == spec.endswith("@random")
        images = {key: summary["sections"][key]["images"] for key in ("preference", "modes", "same_object", "bfd")}
        assert images == {"preference": 4, "modes": 4, "same_object": 2 + 2, "bfd": 4}
        assert saved["models"][spec] == summary["curves"]  # the comparison draws what the report measured
        for _, _, rel, caption in _figures((tmp_path / folder / "index.html").read_text()):
            assert re.search(r"\b\d+ (images|photos)\b|no images", caption), (folder, rel, caption)
    lines = {line.get_label(): line.get_ydata() for line in drawn["cosine.png"].axes[0].get_lines()}
    assert set(lines) == set(specs)
    for spec in specs:  # each curve is the model's own spectrum, computed here independently of the demo
        own = qkhooks.spectrum(qkhooks.load_model(spec).model).cosine_weighted_by_layer()
        np.testing.assert_allclose(lines[spec], own, atol=1e-6)
    assert np.abs(lines["offline:dinov2-s14@random"]).max() < 0.02 < np.min(lines["offline:dinov2-s14"])
    page = (tmp_path / "compare" / "index.html").read_text()
    captions = dict((rel, caption) for _, _, rel, caption in _figures(page))
    assert set(captions) == {f"{name}.png" for name in saved["models"]["offline:dinov2-s14"] if name != "preference_background"}
    assert "from the weights (no images)" in captions["cosine.png"]
    for rel in set(captions) - {"cosine.png"}:
        assert all(f"over 4 images ({spec})" in captions[rel] or f"4 images ({spec})" in captions[rel] for spec in specs), captions[rel]
    assert "offline:dinov2-s14@random: This rests on 4 photos (fewer than 30)" in page  # BFD on 4 photos: warned


@pytest.mark.parametrize("extra, reason", [(["--model", "offline:dinov2-s14"], "same model twice"),
                                           (["--model", "timm:vit_tiny_patch16_224", "--checkpoint", "w.pth"],
                                            "one file into every --model")])
def test_demo_of_several_models_refuses_what_it_cannot_split_before_any_work(extra, reason, tmp_path, capsys):
    from qkhooks.cli import main

    assert main(["demo", "--model", "offline:dinov2-s14", *extra, "--out", str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err
    assert not any((tmp_path / "out").rglob("*.html"))  # refused before any report was written


def test_readme_shows_a_screenshot_of_the_report_that_is_a_small_valid_image():
    """README's screenshot link points at a committed image that opens, is a real page (not blank) and is small."""
    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (root / "README.md").read_text())
    shots = [link for link in links if re.fullmatch(r"docs/report\.(png|jpe?g)", link)]
    assert len(shots) == 1, links
    path = root / shots[0]
    assert path.stat().st_size < 300_000
    with Image.open(path) as im:
        im.verify()  # a complete, valid image file
    with Image.open(path) as im:
        assert im.format in ("PNG", "JPEG") and im.width >= 800
        assert np.asarray(im.convert("L"), dtype=float).std() > 20  # text and figures, not a blank page
