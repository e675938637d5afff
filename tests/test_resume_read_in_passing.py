"""Round 51, helper DATA: the resumes whose items before the resume point are read anyway as they are skipped (a
streamed Hugging Face dataset, whose skip() reads them; an iterable) check them there, and a run from before the file
stamps whose kept images, read again, are named by their position alone is refused a resume, as a list's is."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from test_file_stamps import _NAMES, _kept, _pngs, as_before_the_stamps
from test_resume_held_images_check_progress import _Held
from test_resume_in_memory_images import _arrays
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded


def _table(pngs: dict[str, bytes], order=range(8)):
    """A map-style Hugging Face dataset of the images' bytes with an id column, its rows in ``order`` of _NAMES."""
    datasets = pytest.importorskip("datasets")
    names = [_NAMES[k] for k in order]
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": pngs[n], "path": None} for n in names], "id": names},
        features=datasets.Features({"image": datasets.Image(), "id": datasets.Value("string")}))


def _same_run(run, whole) -> None:
    with qkhooks.open_run(run) as resumed, qkhooks.open_run(whole) as reference:
        assert list(resumed.ids) == list(reference.ids) == _NAMES
        for name in reference.arrays():
            np.testing.assert_array_equal(resumed.array(name)[:], reference.array(name)[:], err_msg=name)


def test_a_streamed_hugging_face_resume_checks_the_rows_it_skips_in_passing(tmp_path):
    """Before: a streamed Hugging Face dataset's resume read its rows before the resume point (datasets' skip() reads
    them) but checked nothing of them: it warned that it did not check, and rows swapped before that point, or a kept
    image's bytes replaced under its id, went on into the run without a refusal. Now those rows are read once, in
    passing, and checked as an iterable's are: their ids in order, their bytes' hashes against those recorded; put
    back, it resumes without a warning that it does not check, and ends equal to an uninterrupted run."""
    pngs, other = _pngs(0), _pngs(1)
    loaded, run, whole = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "whole.h5"
    _interrupted(loaded, run, batches=3, data=_table(pngs).to_iterable_dataset())
    kept = _kept(run)
    assert kept == 6
    with pytest.raises(QKHooksError, match=r"image 0 of the file is 'a0\.png', the data's is 'a1\.png'"):
        qkhooks.record_dataset(loaded, _table(pngs, [1, 0, *range(2, 8)]).to_iterable_dataset(), run, resume=True,
                               **_KW)
    replaced = {**pngs, "a1.png": other["a1.png"]}  # the same id, other bytes
    with pytest.raises(QKHooksError, match=r"cannot resume .*run\.h5.*'a1\.png'"):
        qkhooks.record_dataset(loaded, _table(replaced).to_iterable_dataset(), run, resume=True, **_KW)
    assert _kept(run) == kept  # the refused resumes left the file as it was
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = qkhooks.record_dataset(loaded, _table(pngs).to_iterable_dataset(), run, resume=True, **_KW)
    assert [str(w.message) for w in caught if "does not check" in str(w.message)] == []
    assert result.images == 8 and result.resumed_from == 4
    qkhooks.record_dataset(loaded, _table(pngs).to_iterable_dataset(), whole, **_KW)
    _same_run(run, whole)


def test_a_streamed_hugging_face_resume_checks_the_kept_files_of_a_path_column(tmp_path):
    """Before: a streamed dataset of file paths resumed over a kept photo replaced since (another of the same size,
    its time moved on) with a warning that its kept files were not checked. Now refused naming the file."""
    datasets = pytest.importorskip("datasets")
    from test_file_stamps import _replace_with_same_size

    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]

    def streamed():
        return datasets.Dataset.from_dict({"image": paths}).to_iterable_dataset()

    _interrupted(loaded, run, batches=3, data=streamed())
    _replace_with_same_size(folder / "a1.png", seed=5)
    with pytest.raises(QKHooksError, match=r"cannot resume .*a1\.png"):
        qkhooks.record_dataset(loaded, streamed(), run, resume=True, **_KW)


class _Stream(torch.utils.data.IterableDataset):
    """An iterable of in-memory images without ids (named by position)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("source", ["torch Dataset", "iterable", "streamed hf"])
def test_a_run_from_before_the_stamps_of_items_read_again_named_by_position_is_refused_a_resume(tmp_path, source):
    """Before: a run recorded before the file stamps, of a torch Dataset or an iterable (or, since the change above, a
    streamed Hugging Face dataset) whose items have no id of their own, resumed with round 49's warning that it
    checked the kept ids in order, though those ids were positions, which cannot differ: nothing was checked, and two
    kept images swapped went on without a refusal. A list's or a map-style dataset's such run is refused (round 50,
    c1d16f5): these are too, the data changed or not, naming how many are named by position and the fix; the file is
    left as it was."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    arrays = _arrays(0)
    swapped = [arrays[1], arrays[0], *arrays[2:]]
    if source == "torch Dataset":
        make = _Held
    elif source == "iterable":
        make = _Stream
    else:
        datasets = pytest.importorskip("datasets")
        from test_resume_in_memory_images import _png

        def make(items):
            return datasets.Dataset.from_dict(
                {"image": [{"bytes": _png(a), "path": None} for a in items]},
                features=datasets.Features({"image": datasets.Image()})).to_iterable_dataset()
    _interrupted(loaded, run, batches=3, data=make(arrays))
    kept = _kept(run)
    as_before_the_stamps(run)
    for items in (arrays, swapped):
        with pytest.raises(QKHooksError, match=r"cannot resume .*run\.h5: it keeps 4 images, was recorded before "
                                               r"qkhooks stored each image's stamps .*and 4 of them are named by their "
                                               r"position in .* alone .*Record it afresh into a new --out"):
            qkhooks.record_dataset(loaded, make(items), run, resume=True, **_KW)
        with qkhooks.open_run(run) as after:
            assert list(after.ids) == [str(i) for i in range(kept)] and not after.complete
