"""Round 45: a resume with a lower ``--limit`` is judged by the images the resume keeps (those its last checkpoint
counts), not by the images committed: those past the checkpoint are recorded again by any resume. Before, a run
holding 6 images of which its checkpoint counted 4 was refused --limit 5 ("holds 6 images, more than 5"), although
the resume would keep 4 and record the 5th."""

from __future__ import annotations

import qkhooks
from test_review_symlinks_repair_messages import _assert_same_states, _states
from test_spectrum_edits_and_dataparallel import _tiny_loaded
from test_limit_extension_and_stamps import _PHOTOS, _as_found, assert_same_per_image, photos  # noqa: F401  (a fixture)
from test_lower_limit_after_extension import _KW, _stopped_extension


def test_a_lower_limit_between_the_checkpoint_and_the_committed_images_resumes_to_it(tmp_path, photos):  # noqa: F811
    loaded, out, once = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "once.h5"
    _stopped_extension(loaded, photos, out)  # 6 committed, 4 checkpointed, recorded with --limit 8
    result = qkhooks.record_dataset(loaded, str(photos), out=out, limit=5, resume=True, **_KW)
    qkhooks.record_dataset(loaded, str(photos), out=once, limit=5, **_KW)
    assert result.resumed_from == 4 and result.images == 5
    assert_same_per_image(out, once, _PHOTOS[:5])  # the 5th recorded again: no row of the killed run's kept
    with qkhooks.open_run(out) as run, qkhooks.open_run(once) as ref:
        assert run.ids == _PHOTOS[:5] and run.config == ref.config and run.config["limit"] == 5 and run.complete
    _assert_same_states(_states(out), _states(once))


def test_a_lower_limit_at_the_checkpoint_finishes_the_run_there(tmp_path, photos):  # noqa: F811
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    _stopped_extension(loaded, photos, out)
    result = qkhooks.record_dataset(loaded, str(photos), out=out, limit=4, resume=True, **_KW)
    assert result.resumed_from == 4 and result.images == 4
    with qkhooks.open_run(out) as run:
        assert run.ids == _PHOTOS[:4] and run.config["limit"] == 4 and run.complete
