"""The README's Python snippets run as written (in order, one namespace), so the quick start cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import qkhooks
from qkhooks.models.base import _ADAPTERS, adapters

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    setup = text.split("## Set-up on a fresh machine", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_readme_python_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the message points at the block
                pytest.fail(f"README python block {i} failed: {exc!r}\n{block}")
        assert "mynet" in {name for name, _ in adapters()}
    finally:
        _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != "mynet"]
    # The quick start's claims hold on what it produced.
    assert tuple(namespace["query"].shape) == (2, 6, 16, 197)
    assert tuple(namespace["rows"].shape) == (2, 6, 2, 197)
    assert namespace["result"].images == 4 and namespace["top"] is not None
    # The mode-over-a-photo snippet draws the mode's best image with that image's own stored maps (round 40).
    best, item = namespace["best"], namespace["item"]
    assert item["id"] == namespace["names"][0] and namespace["picture"].shape == (224, 224, 3)
    with qkhooks.open_run(tmp_path / "quickstart.h5") as run:
        i, sign = int(best["index"][0]), int(best["sign"][0])
        for side, stored in (("query", run.query(5)), ("key", run.key(5))):
            np.testing.assert_allclose(best[side][0], sign * np.asarray(stored[i, 0, 0], np.float32), rtol=1e-3, atol=1e-3)
    assert "layer" in capsys.readouterr().out.lower()


def _table_row(text: str, first_cell: str) -> list[str]:
    """The cells of README's table row that starts with ``first_cell`` (the first such row)."""
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [cell.strip() for cell in line.strip().strip("|").split("|")]
    raise AssertionError(f"README has no table row starting {first_cell!r}")


def test_readme_issue20_cells_are_the_stored_primary_metric():
    """Each per-batch / all-modes / full-maps cell of README's issue-20 table opens with the stored median [IQR] of the
    run it cites, in that run's primary metric (process CPU time with 1 thread, wall with 2): round 46's 1-thread
    ViT-S cells had been copied from the wall column."""
    import json

    entries = json.loads((README.parent / "benchmarks" / "results.json").read_text())["entries"]
    text = README.read_text()
    overhead_runs = ("methods/vit_s/cpu/t1/r46", "methods/vit_b/cpu/t1", "methods/vit_s/cpu/t2/r46", "methods/vit_b/cpu/t2")
    full_map_runs = ("methods/vit_s/cpu/t1", "methods/vit_b/cpu/t1/fullmaps", "methods/vit_s/cpu/t2/fullmaps",
                     "methods/vit_b/cpu/t2/fullmaps")
    rows = (("`with qkhooks.record(model, modes=16)` entered per batch", "modes16_per_batch", overhead_runs, "ratio_to_plain"),
            ("all modes + rows of 2 query tokens", "modes_all_rows2", overhead_runs, "ratio_to_plain"),
            ('full maps, `outputs="eager"`, vs `AttentionExtract`', "full_maps_eager", full_map_runs, "ratio_to_reference"),
            ("full maps, default `outputs` (bit-identical), vs `AttentionExtract`", "full_maps", full_map_runs,
             "ratio_to_reference"))
    for first_cell, method, runs, ratio in rows:
        cells = _table_row(text, first_cell)[1:5]
        for cell, run in zip(cells, runs):
            entry = entries[run]
            assert entry["data"]["metric"] == ("cpu" if entry["machine"]["torch_threads"] == 1 else "wall")
            s = entry["data"]["methods"][method][ratio]
            if ratio == "ratio_to_plain":
                stored = f"{100 * (s['median'] - 1):+.1f}% [{100 * (s['q1'] - 1):+.1f}, {100 * (s['q3'] - 1):+.1f}]"
            else:
                stored = f"{s['median']:.3f}x [{s['q1']:.3f}, {s['q3']:.3f}]"
            assert cell.startswith(stored), f"{first_cell} / {run}: README {cell[:40]!r}, stored {stored!r}"


def test_readme_documents_every_export_and_names_only_real_ones():
    """Every name ``qkhooks`` exports is named in README (a user meets ``LoadedModel`` and ``RecordResult`` as return
    values), and every dotted ``qkhooks.X.Y`` README names resolves (nothing documented that is not there)."""
    import importlib

    text = README.read_text()
    undocumented = [name for name in qkhooks.__all__ if f"`{name}" not in text and f"qkhooks.{name}" not in text]
    assert not undocumented, f"exported but not in README: {undocumented}"
    missing = []
    for dotted in sorted(set(re.findall(r"\bqkhooks(?:\.[A-Za-z_]\w*)+", text))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                missing.append(dotted)
                break
            obj = getattr(obj, attribute)
    assert not missing, f"README names what qkhooks does not have: {missing}"


def test_readme_shell_blocks_run_in_order_without_refused_outputs():
    """Read top to bottom, no ``qkhooks record`` / ``bfd`` command of a README shell block writes an ``--out`` an
    earlier line of the block wrote, unless it says ``--resume`` or ``--overwrite`` (else it is refused: the quick
    start's pilot run once reused photos.h5)."""
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        written: set[str] = set()
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if "qkhooks" not in words or "--out" not in words:
                continue
            command = words[words.index("qkhooks") + 1]
            out = words[words.index("--out") + 1]
            if command in ("record", "bfd"):
                assert out not in written or {"--resume", "--overwrite"} & set(words), f"refused as written: {line}"
            written.add(out)


def test_readme_names_the_test_files_make_test_oldest_runs():
    """README's CI paragraph lists the files ``make test-oldest`` runs (the Makefile's OLDEST_TESTS), no more, no fewer."""
    makefile = (README.parent / "Makefile").read_text()
    oldest = re.search(r"^OLDEST_TESTS \?= (.*)$", makefile, flags=re.M).group(1).split()
    setup = README.read_text().split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    paragraph = setup.split("make test-oldest", 1)[1].split("the newest", 1)[0]
    named = re.findall(r"`(?:tests/)?(test_\w+\.py)`", paragraph)
    assert sorted(named) == sorted(Path(f).name for f in oldest)


def test_readme_schema_names_every_layer_geometry_key_and_the_per_image_flag(tmp_path):
    """A run file's ``model/info`` ``layer_geometry`` entries hold only keys README's schema names, and its per-image
    arrays carry the ``per_image`` attribute README's schema describes (README left out ``layer`` and ``per_image``)."""
    import json

    import h5py
    import timm
    import torch

    from qkhooks.data import ImageConfig

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=16, embed_dim=32,
                              depth=1, num_heads=2, num_classes=0).eval()
    loaded = qkhooks.LoadedModel(model=model, spec="tiny", image_config=ImageConfig(size=(48, 48), mean=(0.5,) * 3,
                                                                                    std=(0.5,) * 3))
    path = tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, "o3:2", path, modes=2, attention="rows", batch_size=2, progress=False)
    schema = README.read_text().split("## Run file schema", 1)[1].split("\n## ", 1)[0]
    geometry_row = schema.split("`layer_geometry`: per layer", 1)[1].split("(`run.geometry(l)`", 1)[0]
    documented = set(re.findall(r"`(\w+)`", geometry_row))
    with h5py.File(path, "r") as f:
        geometry = json.loads(f["model"].attrs["info"])["layer_geometry"]["0"]
        flagged = [name for name in json.loads(f["images"].attrs["arrays"]) if f[name].attrs.get("per_image")]
    assert set(geometry) <= documented, f"layer_geometry keys README does not name: {set(geometry) - documented}"
    assert flagged and "attr `per_image`" in schema
