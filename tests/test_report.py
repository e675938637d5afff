"""The demo report: every section present, figures inlined byte for byte, numbers traceable to the run
files, and the page renders in headless Chromium with every image loaded."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

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


def test_html_inlines_every_figure_and_escapes_text(report):
    out, _, _ = report
    page = (out / "index.html").read_text()
    for key in SECTIONS:
        assert f"id='{key}'" in page
    images = re.findall(r"<img src='data:image/png;base64,([^']+)' alt='([^']+)'>", page)
    assert len(images) >= len(SECTIONS)
    for data, rel in images:
        assert base64.b64decode(data) == (out / rel).read_bytes()  # the figure on disk, byte for byte
    assert "&lt;random&gt; weights &amp; a note" in page and "<random>" not in page
    aniso = json.loads((out / "modes" / "modes.json").read_text())["anisotropy"]
    first, last = min(aniso, key=int), max(aniso, key=int)  # the modes reading quotes this run's cosines
    assert f"L{first} {aniso[first]['cos_weighted']:+.2f}" in page and f"L{last} {aniso[last]['cos_weighted']:+.2f}" in page


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


def test_readings_follow_the_numbers_not_the_paper():
    from qkhooks.report import _overlap_reading

    falling = _overlap_reading({0: 0.6, 5: 0.2, 11: 0.1})
    rising = _overlap_reading({0: 0.1, 5: 0.2, 11: 0.6})
    assert "L0 +0.60, L5 +0.20, L11 +0.10" in falling and "as the paper finds" in falling
    assert "unlike the paper" in rising and "as the paper finds" not in rising
    assert _overlap_reading({0: None, 11: 0.3}).startswith("The paper (Fig. 4)")  # too little to read: says whose claim
