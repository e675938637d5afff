"""Round 47: a merged copy (``merge --copy``) cut short lost, in ``repair``, images whose rows were all in the file.
The merge wrote each per-image array's attributes after its rows and the merged reducer states after every array, so
the file's last object headers lay past the images' data: a cut before them left ``/reducers`` with a header that
does not read, the walk that lists the per-image arrays failed on it, and no image was recovered (a 12-image merge
of two shards, cut every 4 KiB: 18 of 226 cuts lost 161 images; cut where each image's rows end: 24 of 24 cuts, 156
images; one cut made repair raise AttributeError in the states). The merge now writes every object first (the
arrays, empty, with their attributes; the states), then the arrays' rows, in a session whose first metadata block
holds every array's chunk index (with HDF5's 2 KiB blocks the index of the array copied last went after its first
chunk: a --checksum copy of 24 images cut where its first image ends lost it). Repair, for merges made before, lists
the per-image arrays without walking the reducer states. Now 0 cuts lose an image (merged copies of 12 and 24 images,
and a --checksum one of 24: every 4 KiB, and where each image's rows end)."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import format as fmt
from qkhooks.stream import record_dataset
from test_repair_cut_files import _row_ends
from test_run_file_metadata_blocks import _repaired_at_row_ends


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """Two shards of 8 images of the tiny ViT (rows, modes, masks, the default reducers) merged as a copy."""
    return _merged_copy(tmp_path_factory.mktemp("mergecut") / "run.h5", "o3:8:1")


@pytest.fixture(scope="module")
def checksummed(tmp_path_factory) -> Path:
    """As ``merged``, recorded with --checksum: one image a chunk, so each array's index has data blocks."""
    return _merged_copy(tmp_path_factory.mktemp("mergecutck") / "run.h5", "o3:24:1", checksum=True)


def _merged_copy(out: Path, data: str, **options) -> Path:
    """``data`` recorded by the tiny ViT in two shards of ``out`` (``options`` added to each), merged as a copy."""
    for rank in range(2):
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                                  num_heads=4).eval()
        record_dataset(qkhooks.load_model(model), data, shard_path(out, rank, 2), shard=(rank, 2), modes=8,
                       attention="rows", batch_size=2, checkpoint_every=3, progress=False, **options)
    merge_shards(out, copy=True)
    return out

def _signatures(data: bytes, signature: bytes) -> list[int]:
    found, at = [], data.find(signature)
    while at >= 0:
        found.append(at)
        at = data.find(signature, at + 1)
    return found


@pytest.mark.parametrize("which", ["merged", "checksummed"])
def test_every_object_of_a_merged_copy_lies_before_its_first_image_row(which, request):
    """What the fix does, read off the file: every object header (the per-image arrays', with their attributes, and
    the reducer states'), every header continuation and every piece of every chunk index lies before the first chunk
    of any per-image array. Before, the states' headers (and their continuations) came after every array's rows, and
    each array's index block and data blocks went into a 2 KiB block opened after one of its chunks (the merge now
    asks for one block that holds them all, ``_hdf5.merged_meta_block_bytes``)."""
    merged = request.getfixturevalue(which)
    data = merged.read_bytes()
    with h5py.File(merged, "r") as f:
        arrays = fmt.per_image_datasets(f)
        first_chunk = min(ds.id.get_chunk_info(0).byte_offset for ds in arrays.values())
        headers = {"/": h5py.h5o.get_info(f.id).addr}
        f.visititems(lambda name, obj: headers.__setitem__(name, h5py.h5o.get_info(obj.id).addr))
        assert any(name.startswith(fmt.REDUCERS + "/") for name in headers)  # the states are in the file
    late = {name: at for name, at in headers.items() if at > first_chunk}
    assert late == {}
    # a header's continuation; a chunk index's (extensible array's) header, index block and data blocks
    for signature in (b"OCHK", b"EAHD", b"EAIB", b"EADB"):
        assert max(_signatures(data, signature), default=0) < first_chunk, signature


@pytest.mark.parametrize("which", ["merged", "checksummed"])
def test_a_merged_copy_cut_where_any_image_ends_loses_no_image_whose_rows_lie_before_it(which, request, tmp_path):
    """Cut where each image's rows end: repair recovers every image whose rows of every array lie before the cut.
    Before, every such cut lost them all (the walk listing the arrays failed on a state's header past the cut); then,
    in a --checksum copy, the cut where the first image's last chunk ends lost it (the index of the array copied last
    went into a block opened after that chunk, HDF5's 2 KiB)."""
    merged = request.getfixturevalue(which)
    images = len(_row_ends(merged)[0])
    short = [(at, len(report.recovered), len(before)) for at, report, before in _repaired_at_row_ends(merged, tmp_path)
             if sorted(set(range(images)) - set(report.lost)) != before]
    assert short == []


def test_a_whole_merged_copy_reads_its_rows_and_states_as_the_shards_hold_them(merged):
    """The reordered merge writes the same file: every row equal to its shard's, the states there, nothing lost."""
    with h5py.File(merged, "r") as f, h5py.File(shard_path(merged, 0, 2), "r") as s0, \
            h5py.File(shard_path(merged, 1, 2), "r") as s1:
        n0 = fmt.committed(s0)
        for name, ds in fmt.per_image_datasets(f).items():
            np.testing.assert_array_equal(ds[:n0], s0[name][:n0], err_msg=name)
            np.testing.assert_array_equal(ds[n0:], s1[name][:fmt.committed(s1)], err_msg=name)
            assert ds.attrs["per_image"]
        images, states = fmt.read_states(f, merged)
        assert images == fmt.committed(f) == n0 + fmt.committed(s1) and states


def test_repair_of_a_merge_whose_states_lie_after_its_rows_recovers_every_image_of_a_cut_before_them(merged, tmp_path):
    """A merge made before this round wrote its states after every array's rows: here a state added to the merged
    copy after the fact, its header past the file's old end, and the file cut there. The walk that lists the per-image
    arrays no longer goes through the reducer states (never per-image), so every image is recovered and the state is
    not copied (the damage named); before, the walk failed on the state's header and no image was recovered (and a state whose link
    outlived its header raised AttributeError out of repair)."""
    old = tmp_path / "old.h5"
    old.write_bytes(merged.read_bytes())
    end = old.stat().st_size
    with h5py.File(old, "r+") as f:
        n = fmt.committed(f)
        ids = [fmt.as_str(s) for s in f[fmt.IDS][:n]]
        fmt.write_states_into(f, {"late": {"values": np.arange(600.0)}}, n)
        assert h5py.h5o.get_info(f[f"{fmt.REDUCERS}/late/a"].id).addr >= end  # the case: its header past the cut
    cut = tmp_path / "cut.h5"
    cut.write_bytes(old.read_bytes()[:end])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qkhooks.store.repair(cut, tmp_path / "fixed.h5")
    assert report.recovered == ids and report.lost == []
    assert report.states == [] and any("unreadable" in line for line in report.problems), report.problems
