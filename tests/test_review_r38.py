"""Round 38's lead fixes, each checked against an independent reference (torch's own modules, numpy)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("padding", [0, (1, 0, 2), "valid", "same"])
def test_the_video_tubelets_grid_is_what_the_conv3d_itself_gives(padding):
    """The Conv3d tubelet embedding's (frames, rows, cols) came from a third copy of the conv formula, which took a
    string padding apart letter by letter (TypeError on 'same'); it is the shared helper now, checked against the conv."""
    from qkhooks.models.video import SpaceTimeSite

    stride = 1 if padding == "same" else (2, 3, 2)
    conv = torch.nn.Conv3d(3, 4, kernel_size=(2, 3, 3), stride=stride, padding=padding)
    site = SpaceTimeSite.__new__(SpaceTimeSite)
    site._thw_of_call, site.tubelets = None, conv
    (module, hook), = site.context_hooks()
    clip = torch.zeros(1, 3, 7, 17, 12)
    hook(module, (clip,), {})
    assert site._thw_of_call == tuple(conv(clip).shape[2:])


def test_every_old_spelling_names_the_release_that_removes_it():
    """Review C (round 37): the compatibility shims warned with no removal version, so a user could not plan the
    change. Each names the release now, from one constant."""
    import warnings

    import qkhooks
    from qkhooks._version import REMOVED_IN
    from qkhooks.results import BatchCapture

    assert REMOVED_IN.split(".") > qkhooks.__version__.split(".")  # a release still to come
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BatchCapture(ids=[], meta={}, layers={})
    (warning,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert f"removed in qkhooks {REMOVED_IN}" in str(warning.message)
    assert "BatchCapture(captures=...)" in str(warning.message)
