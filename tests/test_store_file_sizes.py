"""Round 20 (store): each image file's size as a per-image array written with its batch (not one root attribute of
the whole dataset), read back only for the images checked; older runs' root attribute still read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

from conftest import noise_photos
import qkhooks
from qkhooks.data import open_dataset
from qkhooks.data_files import SIZES_ATTR, changed_files, recorded_sizes
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import open_run, repair
from qkhooks.store import format as fmt
from qkhooks.store.reader import _from_hdf5
from qkhooks.stream import record_dataset

NAMES = [f"im{i}.png" for i in range(5)]


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                embed_dim=32, depth=1, num_heads=2).eval())


def photos(folder: Path) -> Path:
    """Five photos whose files all have different sizes (so a size out of order or of another image shows)."""
    for i, name in enumerate(NAMES):
        noise_photos(folder, [name], size=(20 + 4 * i, 30), seed=i)
    assert len({(folder / n).stat().st_size for n in NAMES}) == len(NAMES)
    return folder


def on_disk(folder: Path, ids: list[str]) -> list[int]:
    return [os.stat(folder / i).st_size for i in ids]


def record(data: str, out: Path, **kw) -> None:
    record_dataset(tiny_vit(), data, out, modes=2, layers="0", batch_size=2, progress=False, reducers=[], **kw)


def test_a_run_stores_each_image_files_size_with_its_batch_in_the_runs_image_order(tmp_path):
    imgs = photos(tmp_path / "imgs")
    record(str(imgs), tmp_path / "run.h5")
    with open_run(tmp_path / "run.h5") as run:
        assert SIZES_ATTR not in run.attrs  # no root attribute of the whole dataset any more
        sizes = run.array(fmt.FILE_SIZES)
        assert sizes.dtype == np.int64 and sizes[:].tolist() == on_disk(imgs, run.ids) and run.n == 5
        assert recorded_sizes(run, run.ids, [3, 1, 3, 99]) == {i: os.stat(imgs / i).st_size for i in ("im1.png", "im3.png")}
    record("o3:2", tmp_path / "generated.h5")  # data not read from files: no sizes at all, as before
    with open_run(tmp_path / "generated.h5") as run:
        assert not run.has(fmt.FILE_SIZES) and SIZES_ATTR not in run.attrs
        assert recorded_sizes(run, run.ids, [0, 1]) is None
    record(f"{imgs}+o3:2", tmp_path / "joined.h5")  # images not read from a file: -1
    with open_run(tmp_path / "joined.h5") as run:
        assert run.array(fmt.FILE_SIZES)[:].tolist() == on_disk(imgs, run.ids[:5]) + [-1, -1]
        assert recorded_sizes(run, run.ids, [4, 5, 6]) == {"im4.png": os.stat(imgs / "im4.png").st_size}


def test_a_changed_file_is_found_from_the_array_reading_only_the_images_checked(tmp_path):
    imgs = photos(tmp_path / "imgs")
    record(str(imgs), tmp_path / "run.h5")
    noise_photos(imgs, ["im3.png"], size=(60, 30), seed=9)  # same name, another photo of another size
    dataset = open_dataset(str(imgs), tiny_vit().image_config)
    with open_run(tmp_path / "run.h5") as run:
        attrs, ids = run.attrs, run.ids
        said = changed_files(attrs, dataset, [ids[1], ids[3]], recorded_sizes(run, ids, [1, 3]))
        assert changed_files(attrs, dataset, [ids[0], ids[4]], recorded_sizes(run, ids, [0, 4])) == ""
    assert f"1 of the 2 images to draw in {str(imgs)!r} are not the files this run recorded (first: 'im3.png'" in said


def _as_round_19(run_path: Path, keep: int) -> dict[str, int]:
    """Make a run a round-19 file: its sizes a root attribute of the whole dataset, no array; cut to ``keep``
    images and marked incomplete (as a killed run). Returns the sizes."""
    with h5py.File(run_path, "r+") as f:
        ids = fmt.read_ids(f, fmt.committed(f))
        sizes = dict(zip(ids, (int(s) for s in f[fmt.FILE_SIZES][:])))
        del f[fmt.FILE_SIZES]
        if fmt.FILE_MTIMES in f:  # stored since round 39
            del f[fmt.FILE_MTIMES]
        f["images"].attrs[fmt.ARRAYS_ATTR] = json.dumps(sorted(fmt.per_image_datasets(f)))
        f.attrs[SIZES_ATTR] = json.dumps(sizes)
        fmt.set_committed(f, keep)
        for ds in [*fmt.per_image_datasets(f).values(), f[fmt.IDS]]:
            ds.resize(keep, axis=0)
        f.attrs["complete"] = False
    return sizes


def test_a_run_with_the_older_root_attribute_is_still_checked_and_resumes_without_an_array(tmp_path):
    imgs = photos(tmp_path / "imgs")
    record(str(imgs), tmp_path / "run.h5")
    sizes = _as_round_19(tmp_path / "run.h5", keep=2)
    noise_photos(imgs, ["im1.png"], size=(60, 30), seed=9)
    with open_run(tmp_path / "run.h5") as run:
        attrs, ids = run.attrs, run.ids
        assert recorded_sizes(run, ids, [0, 1]) is None and json.loads(attrs[SIZES_ATTR]) == sizes
    said = changed_files(attrs, open_dataset(str(imgs), tiny_vit().image_config), ids)
    assert "not the files this run recorded (first: 'im1.png'" in said
    record(str(imgs), tmp_path / "run.h5", resume=True)  # its layout has no array: the batches go without one
    with open_run(tmp_path / "run.h5") as run:
        assert run.complete and run.n == 5 and not run.has(fmt.FILE_SIZES)
        assert json.loads(run.attrs[SIZES_ATTR]) == sizes


def test_a_resumed_run_continues_the_array(tmp_path):
    imgs = photos(tmp_path / "imgs")

    def stop(batch):
        raise KeyboardInterrupt  # killed after its first batch

    with pytest.raises(KeyboardInterrupt):
        record(str(imgs), tmp_path / "run.h5", on_batch=stop)
    with open_run(tmp_path / "run.h5") as run:
        assert run.n == 2 and run.array(fmt.FILE_SIZES)[:].tolist() == on_disk(imgs, run.ids)
    record(str(imgs), tmp_path / "run.h5", resume=True)
    with open_run(tmp_path / "run.h5") as run:
        assert run.complete and run.ids == NAMES and run.array(fmt.FILE_SIZES)[:].tolist() == on_disk(imgs, NAMES)


@pytest.mark.parametrize("copy", [False, True])
def test_shards_hold_their_own_images_sizes_and_merged_and_repaired_files_carry_them(tmp_path, copy):
    imgs = photos(tmp_path / "imgs")
    out = tmp_path / "run.h5"
    for rank in range(2):
        record(str(imgs), shard_path(out, rank, 2), shard=(rank, 2))
        with open_run(shard_path(out, rank, 2)) as shard:
            assert SIZES_ATTR not in shard.attrs
            assert shard.array(fmt.FILE_SIZES)[:].tolist() == on_disk(imgs, shard.ids) and shard.n == (3, 2)[rank]
    merge_shards(out, copy=copy)
    if copy:
        repair(out, tmp_path / "fixed.h5")
    else:  # its arrays are views of the shards: repaired there (HDF5 crashed the process opening them through repair)
        with pytest.raises(qkhooks.QKHooksError, match="is a merge whose per-image arrays .* are views of its shard"):
            repair(out, tmp_path / "fixed.h5")
        assert not (tmp_path / "fixed.h5").exists()
    for path in (out, tmp_path / "fixed.h5") if copy else (out,):
        with open_run(path) as run:
            assert run.ids == NAMES and SIZES_ATTR not in run.attrs
            assert run.array(fmt.FILE_SIZES)[:].tolist() == on_disk(imgs, NAMES)


def test_a_dangling_link_in_a_run_is_damage_and_a_wrong_name_or_index_stays_the_callers_error(tmp_path):
    """The reader told HDF5's errors from the caller's by their text: an external link to an object that is gone
    says "doesn't exist", as a wrong name does, and escaped as a raw KeyError; now by where they were raised."""
    out = tmp_path / "run.h5"
    record("o3:2", out)
    h5py.File(tmp_path / "other.h5", "w").close()
    for link in (h5py.ExternalLink("other.h5", "/gone"), h5py.SoftLink("/modes/L0/gone")):
        with h5py.File(out, "r+") as f:
            f["modes/L0/extra"] = link
        with open_run(out) as run:
            for read in (run.arrays, run.summary):
                with pytest.raises(qkhooks.QKHooksError) as err:
                    read()
                assert "is damaged (HDF5 cannot read it:" in str(err.value) and "qkhooks repair" in str(err.value)
        with h5py.File(out, "r+") as f:
            del f["modes/L0/extra"]
    with open_run(out) as run:
        with pytest.raises(qkhooks.QKHooksError, match="has no per-image array 'modes/L0/nope'; it has: "):
            run.array("modes/L0/nope")
    with h5py.File(out, "r") as f:  # what the reader's guard lets through as the caller's own error
        assert not _from_hdf5(_raised(lambda: f[fmt.IDS][0, 0]))  # an index h5py refuses itself (ValueError)
        assert not _from_hdf5(_raised(lambda: {"a": 1}["b"]))  # Python's KeyError
        assert _from_hdf5(_raised(lambda: f["modes/L0/nope"]))  # HDF5's; the reader asks `in`/`get` first


def _raised(read) -> BaseException:
    try:
        read()
    except (KeyError, ValueError) as exc:
        return exc
    raise AssertionError("nothing raised")


def test_a_resume_needs_no_hdf5_flock_on_the_run_file(held_run):
    """HDF5 drops its flock once a file is open for SWMR writing, so where the lock is refused the writer opens
    without it: a program that holds the run open with HDF5's default locking (here h5py in another process), or, on
    NFS, the writer's own OFD lock seen through flock's emulation, must not stop a resume. Before, this failed with a
    raw lock error."""
    from qkhooks.store import RunWriter

    path = held_run
    with RunWriter(path, mode="resume", dtype="float32", chunk_images=2) as w:
        w.write_batch(["c", "d"], {"v": np.full((2, 4), 2, np.float32)})
    with open_run(path) as run:
        assert run.ids == ["a", "b", "c", "d"] and run.complete
        assert np.array_equal(run.array("v")[:], np.repeat([[1.0], [1.0], [2.0], [2.0]], 4, axis=1))
