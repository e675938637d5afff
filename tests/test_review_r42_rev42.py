"""Review rev42 (round 42): the library changes of round 42 other than the torchvision adapter."""

from __future__ import annotations

import pytest

import qkhooks
from test_review_r39_fixb import _tiny_loaded
from test_review_r41 import _EXT_KW, _PHOTOS, _as_found, photos  # noqa: F401  (photos: a fixture)


def _items(folder):
    """The photos as a generator of items (a stream that names no items before decoding), p02 unreadable."""
    from PIL import Image

    for name in _PHOTOS:
        yield {"image": b"not an image" if name == "p02.png" else Image.open(folder / name).convert("RGB"), "id": name}


def test_a_stream_read_past_a_lower_limit_is_refused_though_it_holds_no_more_images(tmp_path, photos):  # noqa: F811
    """A stream's limit counts items: a run of --limit 6 with one unreadable item holds 5 images and has read 6 items.
    Before: --limit 5 was taken (5 images held), and the run finished as a --limit 5 run holding p05.png, the 6th item,
    which one run of --limit 5 never reads."""
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    with pytest.warns(UserWarning):
        qkhooks.record_dataset(loaded, _items(photos), out=out, limit=6, **_EXT_KW)
    with qkhooks.open_run(out) as run:
        assert run.ids == ["p00.png", "p01.png", "p03.png", "p04.png", "p05.png"]
    before, raw = _as_found(out), out.read_bytes()
    with pytest.raises(qkhooks.QKHooksError, match=r"--limit 5: it was recorded with --limit 6 and has read 6 items "
                                                   r"of the data \(5 images and 1 unreadable item skipped\).*"
                                                   r"--limit 6 or more"):
        qkhooks.record_dataset(loaded, _items(photos), out=out, limit=5, resume=True, **_EXT_KW)
    assert _as_found(out) == before and out.read_bytes() == raw
    # the limit it has read to is still taken: the same run
    qkhooks.record_dataset(loaded, _items(photos), out=out, limit=6, resume=True, **_EXT_KW)
    with qkhooks.open_run(out) as run:
        assert run.config["limit"] == 6 and len(run.ids) == 5 and run.complete
