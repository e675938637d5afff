"""Round 39, review REV: the round's changes probed for regressions (format 2's file times, the merge's checks).

Each test here failed on the code before its fix."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import qkhooks
import qkhooks.stream as stream
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.errors import QKHooksError
from qkhooks.store import format as fmt
from qkhooks.store import open_run
from qkhooks.store.repair import verify_run
from qkhooks.stream import record_dataset
from test_run_file_safety_adversarial import KW, _loaded, _photos


def _format_1_shard(loaded, data: Path, out: Path, rank: int, monkeypatch) -> Path:
    """A shard as a qkhooks of format 1 wrote it (no images/file_mtimes; the format number 1)."""
    path = shard_path(out, rank, 2)
    with monkeypatch.context() as older:
        older.setattr(stream, "file_mtime_column", lambda dataset: None)
        record_dataset(loaded, str(data), path, shard=(rank, 2), **KW)
    with h5py.File(path, "r+", locking=False) as f:
        f.attrs[fmt.FORMAT_ATTR] = 1
    return path


@pytest.mark.parametrize("copy", [False, True])
def test_shards_of_format_1_and_2_of_one_run_merge_into_the_single_process_run(tmp_path, monkeypatch, copy):
    """A torchrun resume after an upgrade: rank 0's shard, begun by a qkhooks of format 1, resumes in its own layout
    (no file times), while rank 1's, not yet there (or recorded again), is written in format 2. Before: the merge
    refused them as "not one run" (images/file_mtimes missing from rank 0's shard), leaving no way to merge but to
    record rank 0 again. The times serve only a resume of the shards; the merged file goes without them."""
    data, out = _photos(tmp_path / "data", 7), tmp_path / "run.h5"
    loaded = _loaded(0)
    _format_1_shard(loaded, data, out, 0, monkeypatch)
    record_dataset(loaded, str(data), shard_path(out, 1, 2), shard=(1, 2), **KW)
    with open_run(shard_path(out, 1, 2)) as one:
        assert one.has(fmt.FILE_MTIMES)  # the shards do differ in layout
    single = tmp_path / "single.h5"
    record_dataset(loaded, str(data), single, **KW)
    merge_shards(out, copy=copy)
    with open_run(out) as merged, open_run(single) as whole:
        assert merged.complete and merged.ids == whole.ids and not merged.has(fmt.FILE_MTIMES)
        for name in whole.arrays():
            if name != fmt.FILE_MTIMES:
                np.testing.assert_array_equal(merged.array(name)[:], whole.array(name)[:], err_msg=name)
    assert not verify_run(out).problems


def test_merge_still_refuses_shards_missing_another_per_image_array(tmp_path):
    """Only the file times may be missing from one shard: one without its file sizes is still refused."""
    import json

    data, out = _photos(tmp_path / "data", 6), tmp_path / "run.h5"
    loaded = _loaded(0)
    for rank in (0, 1):
        record_dataset(loaded, str(data), shard_path(out, rank, 2), shard=(rank, 2), **KW)
    with h5py.File(shard_path(out, 1, 2), "r+", locking=False) as f:
        del f[fmt.FILE_SIZES]
        listed = json.loads(fmt.as_str(f["images"].attrs[fmt.ARRAYS_ATTR]))
        f["images"].attrs[fmt.ARRAYS_ATTR] = json.dumps([a for a in listed if a != fmt.FILE_SIZES])
    with pytest.raises(QKHooksError, match=r"images/file_sizes is missing from shard\(s\) run\.rank1-of-2\.h5"):
        merge_shards(out)
    assert not out.exists()


def test_a_kept_file_dated_before_1970_replaced_by_one_of_the_same_size_is_refused(tmp_path):
    """A file's modification time before 1970 is negative (st_mtime_ns < 0: an archive's or a tool's date). Before:
    the resume skipped every negative time as "no file" (-1 marks that), so such a file replaced by another of the
    same size resumed without a word, the run mixing maps of two pictures."""
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    names = [f"a{i}.png" for i in range(8)]
    _same_size_photos(folder, names, seed=0)
    old = -86400 * 10**9 * 365  # 1969
    os.utime(folder / "a1.png", ns=(old, old))
    _interrupted(loaded, run, batches=3, data=str(folder))
    with open_run(run) as before:
        assert int(before.array(fmt.FILE_MTIMES)[1]) == old  # the time as stat gave it
    _same_size_photos(folder, ["a1.png"], seed=1)  # another picture, same name and size, dated now
    assert (folder / "a1.png").stat().st_size == (folder / "a0.png").stat().st_size
    with pytest.raises(QKHooksError, match=r"1 of the 4 images it keeps were modified since it recorded them "
                                           r"\(first: 'a1\.png', its file's modification time 1969-.* UTC then"):
        qkhooks.record_dataset(loaded, str(folder), run, resume=True, **_KW)
    _same_size_photos(folder, ["a1.png"], seed=0)  # put back, with its date: the resume goes on
    os.utime(folder / "a1.png", ns=(old, old))
    assert qkhooks.record_dataset(loaded, str(folder), run, resume=True, **_KW).images == 8
