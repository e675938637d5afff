"""Round 39 fixes of round 38's open CLI and data items: compare of one report twice, refusals that leave no folder
behind, Hugging Face path-dict image ids, a webdataset sample's unreadable .json, the preference table's ± legend,
SIGTERM in bfd and demo. CLI tests call :func:`qkhooks.cli.main` in-process unless a signal needs a child."""

from __future__ import annotations

import json
import os

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
