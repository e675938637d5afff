"""Round 51, helper DATA: a run from before the file stamps whose kept images, read again for its resume (a torch
Dataset's, an iterable's), are named by their position alone is refused a resume, as a list's is."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from test_file_stamps import _kept, as_before_the_stamps
from test_resume_held_images_check_progress import _Held
from test_resume_in_memory_images import _arrays
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _tiny_loaded


class _Stream(torch.utils.data.IterableDataset):
    """An iterable of in-memory images without ids (named by position)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("source", ["torch Dataset", "iterable"])
def test_a_run_from_before_the_stamps_of_items_read_again_named_by_position_is_refused_a_resume(tmp_path, source):
    """Before: a run recorded before the file stamps, of a torch Dataset or an iterable whose items have no id of their
    own, resumed with round 49's warning that it
    checked the kept ids in order, though those ids were positions, which cannot differ: nothing was checked, and two
    kept images swapped went on without a refusal. A list's or a map-style dataset's such run is refused (round 50,
    c1d16f5): these are too, the data changed or not, naming how many are named by position and the fix; the file is
    left as it was."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    arrays = _arrays(0)
    swapped = [arrays[1], arrays[0], *arrays[2:]]
    if source == "torch Dataset":
        make = _Held
    else:
        make = _Stream
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
