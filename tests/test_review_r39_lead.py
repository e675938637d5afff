"""Round 39, lead: demo's own option words and its models checked before the first report."""

from __future__ import annotations

from qkhooks.cli import main


def test_demo_refuses_a_bad_second_model_before_writing_the_first_models_report(tmp_path, capsys):
    """`demo --model A --model BAD` wrote A's whole report, then refused BAD (round 39 review): every model loads first."""
    out = tmp_path / "report"
    assert main(["demo", "--model", "timm:test_vit@random", "--model", "timm:no_such_vit@random",
                 "--out", str(out), "--images", "2"]) == 2
    assert "no_such_vit" in capsys.readouterr().err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_demo_names_its_own_images_option_when_refusing_zero(tmp_path, capsys):
    """`demo --images 0` named the API's `limit`, an option demo does not have."""
    assert main(["demo", "--model", "timm:test_vit@random", "--out", str(tmp_path / "r"), "--images", "0"]) == 2
    err = capsys.readouterr().err
    assert "--images" in err and "limit" not in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*"))
