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


def _restaged(folder, later_s: int = 10) -> None:
    """The data set copied again to where it was (a job staging it on a node's own disk): every file rewritten with
    the same bytes, its modification time ``later_s`` seconds on."""
    import os

    for path in sorted(folder.iterdir()):
        data, stat = path.read_bytes(), path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + later_s * 10**9))


def test_a_resume_over_a_data_set_copied_again_goes_on_and_equals_an_uninterrupted_run(tmp_path):
    """Round 39 (review): the new modification-time check refused every resume of a data set staged again (new times,
    the same bytes), the usual pattern of preempted cluster jobs. The bytes of the files whose time changed now
    decide (images/file_hashes): the resumed run equals an uninterrupted one, and its hashes are hashlib's BLAKE2b."""
    import hashlib

    import numpy as np

    import qkhooks
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    loaded, folder = _tiny_loaded(), tmp_path / "imgs"
    names = [f"a{i}.png" for i in range(8)]
    _same_size_photos(folder, names, seed=0)
    qkhooks.record_dataset(loaded, str(folder), tmp_path / "whole.h5", **_KW)
    _interrupted(loaded, tmp_path / "run.h5", batches=3, data=str(folder))
    _restaged(folder)
    assert qkhooks.record_dataset(loaded, str(folder), tmp_path / "run.h5", resume=True, **_KW).images == 8
    with qkhooks.open_run(tmp_path / "whole.h5") as whole, qkhooks.open_run(tmp_path / "run.h5") as resumed:
        assert resumed.complete and list(resumed.ids) == list(whole.ids) == names
        names_of = set(whole.file["images"].keys()) - {"file_mtimes"}
        for name in sorted(names_of):
            if hasattr(whole.file["images"][name], "shape"):
                np.testing.assert_array_equal(resumed.file["images"][name][()], whole.file["images"][name][()], name)
        hashes = resumed.array("images/file_hashes")[:].tolist()
    assert hashes == [int.from_bytes(hashlib.blake2b((folder / n).read_bytes(), digest_size=8).digest(), "little",
                                     signed=True) for n in names]


def test_a_resume_over_a_data_set_copied_again_with_one_picture_replaced_is_refused_naming_it(tmp_path):
    """The same, one kept photo replaced by another of the same file size before the copy: its bytes differ, so the
    resume is refused naming it (and only it), and the run file is left as it was."""
    import pytest

    import qkhooks
    from qkhooks import QKHooksError
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, [f"a{i}.png" for i in range(8)], seed=0)
    _interrupted(loaded, run, batches=3, data=str(folder))
    with qkhooks.open_run(run) as before:
        kept = before.n
    _same_size_photos(folder, ["a2.png"], seed=5)
    _restaged(folder)
    with pytest.raises(QKHooksError, match=r"1 of the 4 images it keeps were modified since it recorded them \(first: "
                                           r"'a2\.png'.*their bytes differ from those it recorded"):
        qkhooks.record_dataset(loaded, str(folder), run, resume=True, **_KW)
    with qkhooks.open_run(run) as after:
        assert after.n == kept == 6


def test_merge_into_a_folder_that_does_not_exist_names_the_folder_not_a_lock_and_writes_nothing(tmp_path):
    """Round 39 (review): a merge into new/merged.h5 said it could not take the writer lock and advised removing it."""
    import pytest

    from qkhooks import QKHooksError
    from qkhooks.distributed import merge_shards
    from test_run_file_safety_adversarial import _loaded, _photos, _shard

    data, out = _photos(tmp_path / "data", 4), tmp_path / "run.h5"
    shards = [_shard(_loaded(0), data, out, rank) for rank in (0, 1)]
    for copy in (True, False):
        with pytest.raises(QKHooksError, match=r"the folder of the merged file, .*new, does not exist: make it first"):
            merge_shards(tmp_path / "new" / "merged.h5", shard_paths=shards, copy=copy)
    assert not (tmp_path / "new").exists()
