"""Round 47, helper DATA: what round 46 left open in the resume's check of images held in memory.

A resume of a list of in-memory images (or of a map-style Hugging Face dataset's bytes) hashes every kept image
again before it goes on: a list of 100,000 224x224 arrays took about 25 s (20,000 in 5 s measured) without a word.
It now shows a progress bar, as the recording does, where that takes over two seconds (a quick check says nothing)."""

from __future__ import annotations

import pytest

import qkhooks
from qkhooks.data import readers
from test_review_r36 import _KW, _interrupted
from test_review_r39_fixb import _tiny_loaded
from test_review_r46_data import _hf, _pngs
from test_review_r46_list import _arrays, _reference

datasets = pytest.importorskip("datasets")


def test_the_kept_images_hashes_are_those_of_their_content_and_their_check_shows_a_bar(capsys, monkeypatch):
    """held_hashes with progress: the same hashes (hashlib's), and a bar counting every kept item where the check
    runs past the bar's delay (here 0 s); with the default delay, a quick check says nothing, nor without progress."""
    arrays = _arrays(0, n=6)
    reader = readers.MapReader(arrays)
    expected = [(str(i), _reference(a)) for i, a in enumerate(arrays[:5])]
    assert reader.held_hashes(5, progress=True) == expected  # quick: under the default 2 s
    assert reader.held_hashes(5) == expected
    assert "check kept images" not in capsys.readouterr().err
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert reader.held_hashes(5, progress=True) == expected
    err = capsys.readouterr().err
    assert "check kept images" in err and "5/5" in err
    assert reader.held_hashes(5, progress=False) == expected
    assert capsys.readouterr().err == ""


def test_a_hugging_face_datasets_held_bytes_check_shows_a_bar_too(capsys, monkeypatch):
    pngs = _pngs(0)
    reader = readers.hf_reader(_hf(pngs), None, None)
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert reader.held_hashes(7, progress=True) == [(str(i), _reference(b)) for i, b in enumerate(pngs[:7])]
    err = capsys.readouterr().err
    assert "check kept images" in err and "7/7" in err


def test_a_resume_of_a_list_shows_its_check_only_where_it_takes_a_while(tmp_path, capsys, monkeypatch):
    """The resume of record_dataset(progress=True): quick, no bar for the check; past the delay, one that counts the
    kept images, which the resume then keeps (the run completes as a whole recording does)."""
    loaded, run, other = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "other.h5"
    for path in (run, other):
        _interrupted(loaded, path, batches=3, data=_arrays(0))
    capsys.readouterr()
    shown = {**_KW, "progress": True}
    assert qkhooks.record_dataset(loaded, _arrays(0), run, resume=True, **shown).images == 8
    assert "check kept images" not in capsys.readouterr().err
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert qkhooks.record_dataset(loaded, _arrays(0), other, resume=True, **shown).images == 8
    err = capsys.readouterr().err
    resumed = int(err.split("resuming the stream at item ")[1].split(":")[0])
    assert resumed > 0 and "check kept images: 100%" in err and f"{resumed}/{resumed}" in err
