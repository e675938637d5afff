"""Round 51, helper DATA: an image folder read as a Hugging Face dataset (``hfds:DIR``, datasets' imagefolder) names
its rows by their files' paths relative to the folder, in every place that names them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qkhooks
from qkhooks import QKHooksError
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _tiny_loaded

datasets = pytest.importorskip("datasets")

_ORDER = ["c.png", "a.png", "sub/e.png", "b.png", "d.png", "sub/f.png"]  # the rows' order: not the files' sorted one


def _masked_folder(folder: Path) -> None:
    """An image folder whose metadata.jsonl lists the photos in :data:`_ORDER` with an ``objects`` mask each (datasets'
    ``objects_file_name`` column): the rows are in that order, not in the files' sorted order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in _ORDER:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
        mask = folder / "masks" / name
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 3, (16, 16), dtype=np.uint8)).save(mask)
    with open(folder / "metadata.jsonl", "w") as f:
        for name in _ORDER:
            f.write(json.dumps({"file_name": name, "objects_file_name": f"masks/{name}"}) + "\n")


def test_an_image_folder_with_masks_names_its_rows_by_path_where_it_checks_them(tmp_path):
    """Before: with masks, ``_HFReader.mask_layouts`` named an image folder's rows by their positions while
    ``row_id`` named them by their paths, so a resume compared the run's ids (paths) with positions and was refused
    over data that had not changed ("image 0 of the file is 'c.png', the data's is '0'"), and a row without its mask
    was named by its position. Now both name the rows by path: the ids read without decoding equal those recorded
    (the listing of the folder, in the rows' order: the reference), and the resume goes on to the run an uninterrupted
    recording makes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    _masked_folder(folder)
    spec, loaded = f"hfds:{folder}", _tiny_loaded()
    stream = qkhooks.data.sources.open_source(spec, loaded.image_config)
    assert stream.has_masks
    assert stream.ids_before(len(_ORDER)) == _ORDER
    run, whole = tmp_path / "run.h5", tmp_path / "whole.h5"
    _interrupted(loaded, run, batches=2, data=spec)
    with qkhooks.open_run(run) as before:
        assert list(before.ids) == _ORDER[:before.n]
    assert qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW).images == len(_ORDER)
    qkhooks.record_dataset(loaded, spec, whole, **_KW)
    with qkhooks.open_run(run) as resumed, qkhooks.open_run(whole) as reference:
        assert list(resumed.ids) == list(reference.ids) == _ORDER
        for name in reference.arrays():
            if not name.startswith("images/file_"):
                np.testing.assert_array_equal(resumed.array(name)[:], reference.array(name)[:], err_msg=name)
    # rows reordered before the resume point are refused, named by path
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    _interrupted(loaded, tmp_path / "again.h5", batches=2, data=f"hfds:{folder}")
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(QKHooksError, match=r"image 0 of the file is 'a\.png', the data's is 'c\.png'"):
        qkhooks.record_dataset(loaded, spec, tmp_path / "again.h5", resume=True, **_KW)


def test_an_image_folder_read_as_a_hugging_face_dataset_leaves_out_nas_thumbnails_as_a_folder_does(tmp_path):
    """Before: ``hfds:DIR`` (datasets' imagefolder) recorded a Synology NAS's ``@eaDir/<photo>/SYNOFILE_THUMB_*.jpg``
    thumbnails as photos, where the folder spec of the same folder leaves them out with a warning (round 50). Now both
    leave them out with the same warning (one helper), hfds:'s pointing at record_dataset's caller: the ids are the
    photos laid out by hand, the same both ways."""
    from PIL import Image

    folder = tmp_path / "nas"
    rng = np.random.default_rng(1)
    for name in ("a.png", "sub/b.png", "@eaDir/a.png/SYNOFILE_THUMB_M.jpg", "@eaDir/a.png/SYNOFILE_THUMB_XL.jpg",
                 "sub/@eaDir/b.png/SYNOFILE_THUMB_S.jpg"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    loaded, said = _tiny_loaded(), {}
    for spec in (str(folder), f"hfds:{folder}"):
        with pytest.warns(UserWarning, match=r"^3 image files in 2 Synology thumbnail folders \(@eaDir\) under "
                                             rf"{folder} are not recorded: @eaDir/, sub/@eaDir/; ") as warned:
            qkhooks.record_dataset(loaded, spec, tmp_path / f"{len(said)}.h5", **_KW)
        said[spec] = [str(w.message) for w in warned if "Synology" in str(w.message)]
        if spec.startswith("hfds:"):  # record_dataset's caller (a folder's points at open_dataset's caller)
            assert [Path(w.filename).name for w in warned if "Synology" in str(w.message)] == [Path(__file__).name]
        with qkhooks.open_run(tmp_path / f"{len(said) - 1}.h5") as run:
            assert list(run.ids) == ["a.png", "sub/b.png"]
    assert said[str(folder)] == said[f"hfds:{folder}"]
