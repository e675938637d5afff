"""Round 40, helper FIX2: items found by review USER (a first-time researcher's run through README).

Each test here failed on the code before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import qkhooks
from qkhooks import QKHooksError
from qkhooks.store import format as fmt
from test_review_r36 import _KW, _interrupted
from test_review_r39_fixb import _same_size_photos, _tiny_loaded
from test_review_r40_stamp import _reference, _replace_with_same_size, _stored

# ---------------------------------------------------------------------------------------------- 1. ImageFolder ids


def _image_folder(tmp_path, transform=None):
    torchvision = pytest.importorskip("torchvision")
    root = tmp_path / "ifold"
    root.mkdir()
    _same_size_photos(root / "cat", ["c0.png", "c1.png"], seed=0)
    _same_size_photos(root / "dog", ["d0.png", "d1.png", "d2.png"], seed=1)
    return root, torchvision.datasets.ImageFolder(str(root), transform=transform)


def test_an_image_folder_is_recorded_by_its_files_relative_paths_with_their_stamps(tmp_path):
    """Before: a torchvision ImageFolder's images were recorded as '0', '1', ... and stored no file stamps."""
    root, ds = _image_folder(tmp_path)
    qkhooks.record_dataset(_tiny_loaded(), ds, tmp_path / "run.h5", **_KW)
    names = ["cat/c0.png", "cat/c1.png", "dog/d0.png", "dog/d1.png", "dog/d2.png"]
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        assert list(run.ids) == names
    assert _stored(tmp_path / "run.h5") == _reference([root / n for n in names])


def test_an_image_folder_with_its_own_transform_keeps_its_pixels_and_gets_the_ids(tmp_path):
    """The dataset's own transform still makes the pixels (as before); only the ids and stamps are new. The
    reference: the same images given as a list of the transform's outputs (which has position ids)."""
    import numpy as np
    from PIL import ImageOps

    root, ds = _image_folder(tmp_path, transform=ImageOps.mirror)
    loaded = _tiny_loaded()
    qkhooks.record_dataset(loaded, ds, tmp_path / "run.h5", **_KW)
    qkhooks.record_dataset(loaded, [ds[i][0] for i in range(len(ds))], tmp_path / "ref.h5", **_KW)
    with qkhooks.open_run(tmp_path / "run.h5") as run, qkhooks.open_run(tmp_path / "ref.h5") as ref:
        assert list(run.ids)[0] == "cat/c0.png" and list(ref.ids)[0] == "0"
        maps = [name for name in run.arrays() if name.startswith("modes/")]
        assert maps
        for name in maps:
            assert np.array_equal(np.asarray(run.array(name)[:]), np.asarray(ref.array(name)[:])), name


def test_an_image_folder_resume_over_a_replaced_kept_photo_is_refused_naming_it(tmp_path):
    """Before: an ImageFolder resumed with a warning that its kept files were not checked."""
    root, ds = _image_folder(tmp_path)
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=2, data=ds)
    _replace_with_same_size(root / "cat" / "c1.png", seed=7)
    with pytest.raises(QKHooksError, match=r"modified since it recorded them \(first: 'cat/c1\.png'"):
        qkhooks.record_dataset(loaded, ds, run, resume=True, **_KW)
