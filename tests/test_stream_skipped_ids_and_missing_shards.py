"""Round 31's second review (the streaming paths): each test reproduces a wrong or misleading value found there, which
nothing warned about, and checks the fix."""

from __future__ import annotations

import io
import warnings

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import qkhooks


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=4, num_classes=0).eval()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("container", ["list", "tuple", "torch Dataset"])
def test_an_unreadable_item_is_listed_as_skipped_under_its_own_id_not_its_position(tmp_path, container):
    """Dict items with their own ids, the first unreadable: it was listed under its position ("0"), which here is
    the id of the item recorded after it, so the skipped list named a recorded image and the lost one was named
    nowhere (a generator of the same items named it right)."""
    items = [{"image": b"not an image", "id": "photo-x"}, {"image": _png(90), "id": "0"}, {"image": _png(30), "id": "b"}]
    data = {"list": items, "tuple": tuple(items), "torch Dataset": _Items(items)}[container]
    out = tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = qkhooks.record_dataset(_tiny(), data, out, modes=2, layers="0", progress=False, batch_size=2)
    with h5py.File(out) as f:
        recorded = [x.decode() for x in f["images/ids"][()]]
        skipped = [x.decode() for x in f["images/skipped"][()][:, 0]]
    assert recorded == ["0", "b"] and skipped == ["photo-x"] and [s[0] for s in result.skipped] == ["photo-x"]


def test_a_merged_view_whose_shard_file_is_gone_refuses_its_reads_instead_of_reading_nan(tmp_path):
    """merge_shards' default file reads each shard's images from the shard file in place (HDF5 virtual datasets).
    With a shard moved away, HDF5 read its images as NaN maps without an error, and nothing but `info --verify` said so
    (found by review): a read now names the array, the missing images and the fixes; with the shard back, the same read
    equals the shards' own maps."""
    from qkhooks.distributed import merge_shards, shard_path

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(folder / f"img{i}.png")
    out, model = tmp_path / "run.h5", _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rank in range(2):
            qkhooks.record_dataset(model, str(folder), shard_path(out, rank, 2), shard=(rank, 2), modes=2, layers="0",
                                   batch_size=2, progress=False)
    merge_shards(out)
    with qkhooks.open_run(shard_path(out, 1, 2)) as shard:
        second = np.asarray(shard.query(0)[:])
    moved = tmp_path / "moved.h5"
    shard_path(out, 1, 2).rename(moved)
    with qkhooks.open_run(out) as run:
        with pytest.raises(qkhooks.QKHooksError, match=r"^/modes/L0/query of \S+run\.h5 is a merged view that reads its "
                                                       r"images from the shard files beside it, and the shard\(s\) "
                                                       r"holding images 3-5 are missing there, so HDF5 would read"):
            run.query(0)[:]
    moved.rename(shard_path(out, 1, 2))
    with qkhooks.open_run(out) as run:
        merged = np.asarray(run.query(0)[:])
    assert not np.isnan(merged).any() and np.array_equal(merged[3:], second)
