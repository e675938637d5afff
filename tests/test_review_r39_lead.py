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


def _constant_rows(rng, rows: int, d: int, wobble: float = 0.0):
    """``rows`` copies of one ordinary-float vector (their mean rounds: not exactly the vector), each moved by
    ``wobble`` of its size in a random direction."""
    import numpy as np

    v = rng.normal(size=(1, d)) * np.pi
    return np.repeat(v, rows, 0) + wobble * np.abs(v).max() * rng.normal(size=(rows, d))


def test_bfd_probes_on_features_constant_up_to_rounding_give_no_r2_and_varying_ones_do():
    """Round 39 (mut): the probes tested trace(S_xx) == 0 exactly, so a P equal at every position but whose mean
    rounds got a probe fitted on rounding noise and an R^2 (~0) with no note. Features that vary (by 1e-4 of their
    size) are still probed, and their R^2 is numpy's least squares on the same folds."""
    import numpy as np

    from qkhooks.analysis.bfd_summary import _position_folds_r2, _ridge_r2, patch_targets

    rng = np.random.default_rng(7)
    y = patch_targets((5, 4))
    assert np.isnan(_position_folds_r2(_constant_rows(rng, len(y), 6), y, 1e-3)).all()
    p = _constant_rows(rng, len(y), 6, wobble=1e-4)
    r2 = _position_folds_r2(p, y, 1e-12)
    fold = np.arange(len(y)) % 5
    sse = np.zeros(2)
    for f in range(5):  # the same folds by numpy's least squares (alpha 1e-12: ridge ~ none)
        a = np.c_[p[fold != f], np.ones((fold != f).sum())]
        w = np.linalg.lstsq(a, y[fold != f], rcond=None)[0]
        sse += ((np.c_[p[fold == f], np.ones((fold == f).sum())] @ w - y[fold == f]) ** 2).sum(0)
    np.testing.assert_allclose(r2, 1 - sse / ((y - y.mean(0)) ** 2).sum(0), rtol=1e-6, atol=1e-6)

    images, tokens = 3, len(y)
    f = _constant_rows(rng, tokens, 6)  # every image's features the same constant rows
    stats = (images * f.T @ f, images * f, images)
    assert _ridge_r2(stats, stats, y, 1e-3) is None
    f = _constant_rows(rng, tokens, 6, wobble=1e-4)
    stats = (images * f.T @ f, images * f, images)
    assert _ridge_r2(stats, stats, y, 1e-3) is not None
