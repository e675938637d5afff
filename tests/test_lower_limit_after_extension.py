"""Round 42 (lead): an extension stopped midway may go back to a lower limit it has not passed; a limit below the
images a run holds is still refused, the file left as it was."""

from __future__ import annotations

import numpy as np
import pytest

import qkhooks
from test_review_symlinks_repair_messages import _assert_same_states, _interrupted, _states
from test_spectrum_edits_and_dataparallel import _tiny_loaded
from test_limit_extension_and_stamps import _EXT_KW, _PHOTOS, _as_found, assert_same_per_image, photos  # noqa: F401  (a fixture)

_KW = dict(_EXT_KW, checkpoint_every=1)


def _stopped_extension(loaded, photos, out) -> None:  # noqa: F811
    """A finished run of --limit 4 resumed with --limit 8 and stopped by Ctrl-C after one batch: it holds 6 (its
    checkpoint 4)."""
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=4, **_KW)
    _interrupted(loaded, out, batches=1, data=str(photos), limit=8, resume=True, **_KW)
    with qkhooks.open_run(out) as run:
        assert len(run.ids) == 6 and run.config["limit"] == 8 and not run.complete


def test_an_extension_stopped_midway_resumes_with_a_lower_limit_it_has_not_passed(tmp_path, photos):  # noqa: F811
    """Before: the run could only be resumed with --limit 8 or more ("never lower it"), though it held only 6."""
    loaded, out, once = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "once.h5"
    _stopped_extension(loaded, photos, out)
    result = qkhooks.record_dataset(loaded, str(photos), out=out, limit=7, resume=True, **_KW)
    qkhooks.record_dataset(loaded, str(photos), out=once, limit=7, **_KW)
    # the stop came in the batch's on_batch, before its checkpoint: the resume goes on from the 4 checkpointed
    assert result.resumed_from == 4 and result.images == 7
    assert_same_per_image(out, once, _PHOTOS[:7])
    with qkhooks.open_run(out) as run, qkhooks.open_run(once) as ref:
        assert run.config == ref.config and run.config["limit"] == 7 and run.complete
    _assert_same_states(_states(out), _states(once))


def test_a_limit_equal_to_what_a_stopped_extension_holds_finishes_it_there(tmp_path, photos):  # noqa: F811
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    _stopped_extension(loaded, photos, out)
    result = qkhooks.record_dataset(loaded, str(photos), out=out, limit=6, resume=True, **_KW)
    assert result.images == 6
    with qkhooks.open_run(out) as run:
        assert run.ids == _PHOTOS[:6] and run.config["limit"] == 6 and run.complete


def test_a_limit_below_what_a_stopped_extension_keeps_is_refused_naming_both_and_leaves_it(tmp_path, photos):  # noqa: F811
    # round 45: judged by the 4 its checkpoint counts (a resume records the 2 committed past it again), not the 6
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    _stopped_extension(loaded, photos, out)
    before = _as_found(out)
    with pytest.raises(qkhooks.QKHooksError, match=r"--limit 3: it was recorded with --limit 8 and holds 6 images, of "
                                                   r"which a resume keeps 4 \(those its last checkpoint counts; .*"
                                                   r"more than 3\..*resume with --limit 4 or more"):
        qkhooks.record_dataset(loaded, str(photos), out=out, limit=3, resume=True, **_KW)
    assert _as_found(out) == before


# ------------------------------------------------------------------ a checkpoint that is not one (review REVTV r42)
@pytest.mark.parametrize("kind", ["html", "object"])
def test_a_checkpoint_that_is_no_torch_file_is_called_damaged_or_foreign_and_an_objects_pickle_foreign(tmp_path, capsys,
                                                                                                      kind):
    """Before: an HTML error page saved as the weights file (the README tells users to put files in the torch hub cache
    by hand) was said to hold "Python objects besides tensors" and to need converting to safetensors."""
    import timm

    from test_inputs import _main, _unsafe_checkpoint

    path = tmp_path / "w.pth"
    if kind == "html":
        path.write_text("<html><body>404 Not Found</body></html>\n")
    else:
        _unsafe_checkpoint(path, tmp_path / "ran.txt", timm.create_model("vit_tiny_patch16_224").state_dict())
    status, err = _main(capsys, "spectrum", "timm:vit_tiny_patch16_224", "--checkpoint", str(path))
    assert status == 2 and f"refused to unpickle {str(path)!r}" in err and "safetensors" in err
    damaged = "Either the file is damaged or is not a checkpoint (a cut download, an HTML page saved under its name"
    foreign = "it holds Python objects besides tensors, and unpickling them could run code"
    assert (damaged in err, foreign in err) == ((True, False) if kind == "html" else (False, True))
    assert not (tmp_path / "ran.txt").exists()


# ------------------------------------------------------------------ a run of all the data, stopped (review REV42 r42)
def test_a_run_of_all_the_data_stopped_midway_may_be_given_a_limit_it_has_not_passed(tmp_path, photos):  # noqa: F811
    """Before: a run recorded without --limit could not take one at all ("config differs (limit: file None, now 6)")."""
    loaded, out, once = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "once.h5"
    _interrupted(loaded, out, batches=2, data=str(photos), **_KW)
    with qkhooks.open_run(out) as run:
        assert run.config["limit"] is None and len(run.ids) == 4 and not run.complete
    before = _as_found(out)
    # round 45: judged by the 2 its checkpoint counts (the resume records the 2 committed past it again)
    with pytest.raises(qkhooks.QKHooksError, match=r"--limit 1: it was recorded with no --limit \(all the data\) and "
                                                   r"holds 4 images, of which a resume keeps 2 .*, more than 1\."):
        qkhooks.record_dataset(loaded, str(photos), out=out, limit=1, resume=True, **_KW)
    assert _as_found(out) == before
    result = qkhooks.record_dataset(loaded, str(photos), out=out, limit=6, resume=True, **_KW)
    qkhooks.record_dataset(loaded, str(photos), out=once, limit=6, **_KW)
    assert result.images == 6
    with qkhooks.open_run(out) as run, qkhooks.open_run(once) as ref:
        assert run.ids == ref.ids == _PHOTOS[:6] and run.config == ref.config and run.complete
    _assert_same_states(_states(out), _states(once))


# ------------------------------------------------------------------ the inner layers named as read (review REV42 r42)
@pytest.mark.parametrize("layers, inner", [
    ([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "L2–L11"),
    ([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12], "L1, L2, L3, L5, L6, L7, L8, L9, L10, L11"),
], ids=["contiguous", "a gap"])
def test_the_inner_layers_of_a_bend_are_a_range_only_where_every_layer_in_it_was_read(layers, inner):
    """Before: layers="0-3,5-12" read "Of the inner layers (L1–L11)", a range holding L4, which was not recorded."""
    from qkhooks.readings import trend_reading
    from test_readings_bend_sentences import SAME_OBJECT

    x = SAME_OBJECT + 0.05 * np.random.default_rng(42).standard_normal((48, 12))
    text = trend_reading(x, layers, "The same-object share", "images", limits=(0.0, 1.0)).text
    j = 1 + int(np.argmin(x.mean(0)[1:-1]))
    assert f"Of the inner layers ({inner}) it is lowest at L{layers[j]} (" in text, text


# ------------------------------------------------------------------ a safetensors file by another name (review REV42)
def test_a_safetensors_file_named_pth_is_read_as_safetensors_and_a_cut_one_is_called_cut(tmp_path):
    """Before: a safetensors file saved as w.pth was refused as "refused to unpickle ... (KeyError: 6)"."""
    import timm
    import torch
    from safetensors.torch import save_file

    from qkhooks.models.load import load_checkpoint

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    target = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    path = tmp_path / "w.pth"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    load_checkpoint(target, path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(qkhooks.QKHooksError, match=rf"could not read {str(cut)!r} as a safetensors file .*it may be "
                                                   r"cut or damaged: download or save it again\."):
        load_checkpoint(target, cut)
