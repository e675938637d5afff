"""A merged view (``qkhooks merge`` without ``--copy``: virtual datasets over the shards) of ``--checksum`` shards
reads each image from its shard, whose Fletcher-32 passes a chunk a zeroed disk page covered (the checksum of zero
bytes is zero). The shard itself refuses such a chunk (``format.zeroed_chunks``), but the view has no checksum of its
own and read the image as zeros without a word, and ``verify`` called the merged run intact (round 51's review)."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import open_run, verify_run
from qkhooks.stream import record_dataset

NAME = "attention/L0/rows"


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                embed_dim=32, depth=1, num_heads=2).eval())


def merged_view_of_checksum_shards(tmp_path):
    """A merged view (merge without --copy) of two --checksum shards of 4 images each: its path."""
    out = tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rank in range(2):
            record_dataset(tiny_vit(), "samples", shard_path(out, rank, 2), modes=2, layers="0", batch_size=4,
                           limit=8, attention="rows", progress=False, reducers=[], shard=(rank, 2), checksum=True)
    merge_shards(out)
    return out


def test_a_zeroed_chunk_in_a_shard_is_refused_through_the_merged_view_never_read_as_zeros(tmp_path):
    out = merged_view_of_checksum_shards(tmp_path)
    with open_run(out) as view:
        assert view.array(NAME).dataset.is_virtual
        want = view.array(NAME)[:]
    assert want.reshape(len(want), -1).any(axis=1).all()  # every image's maps: softmax rows, never zero
    shard = shard_path(out, 1, 2)
    with h5py.File(shard, "r") as f:  # image 1 of shard 1 is image 5 of the run
        info = f[NAME].id.get_chunk_info_by_coord((1,) + (0,) * (f[NAME].ndim - 1))
    with open(shard, "r+b") as fh:  # its chunk's stored bytes, data and checksum, zeroed as a zeroed page leaves it
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))
    with open_run(out) as view:
        for key in (5, slice(None), [4, 5], slice(3, 7)):
            with pytest.raises(QKHooksError, match=f"image 5 of this merged view is image 1 of shard {shard.name}.*"
                                                   f"{NAME} holds only zero bytes"):
                view.array(NAME)[key]
            with pytest.raises(QKHooksError) as err:
                view.array(NAME)[key]
            # the fix names the shard (repair refuses a merged view itself) and the merge after it
            assert f"qkhooks repair {shard} --out" in str(err.value) and "merge again" in str(err.value)
        keep = [0, 1, 2, 3, 4, 6, 7]
        np.testing.assert_array_equal(view.array(NAME)[keep], want[keep])  # the others read as before
    report = verify_run(out)
    assert not report.ok and report.damaged.get(NAME) == [(5, 6)], report.problems


def test_a_flipped_byte_in_a_shard_read_through_the_merged_view_names_the_shards_and_the_merge_after_repair(tmp_path):
    """A chunk of a --checksum shard that fails its checksum (a flipped byte) fails the view's read too; the refusal
    said "run qkhooks repair VIEW", which repair refuses (a merged view is repaired shard by shard): it names the view's
    shards, how to find the damaged one, and the merge again after repairing it."""
    out = merged_view_of_checksum_shards(tmp_path)
    shard = shard_path(out, 1, 2)
    with h5py.File(shard, "r") as f:  # image 1 of shard 1 is image 5 of the run
        info = f[NAME].id.get_chunk_info_by_coord((1,) + (0,) * (f[NAME].ndim - 1))
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset + 3)
        byte = fh.read(1)[0]
        fh.seek(info.byte_offset + 3)
        fh.write(bytes([byte ^ 0x10]))
    with open_run(out) as view, pytest.raises(QKHooksError) as err:
        view.array(NAME)[5]
    said = str(err.value)
    assert f"{out} is a merged view" in said and NAME in said, said
    assert shard.name in said and shard_path(out, 0, 2).name in said, said
    assert "qkhooks repair SHARD --out FIXED.h5" in said and "merge again" in said, said
    assert f"qkhooks repair {out}" not in said, said  # repair refuses a merged view itself
