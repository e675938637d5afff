"""Round 46: HDF5 places an array's chunk index when its first chunk is written. With its default 2 KiB metadata
blocks the index went into a new block right after that chunk, in the room a chunk of many images
(``masks/objects``) had not yet filled: a cut there took the index, and with it every image that array held (16 of
234 cuts, every 4 KiB of this run, lost 20 images each). The writer's SWMR session now asks for 16 KiB blocks
(``_hdf5.META_BLOCK_BYTES``): the block opened before the first batch holds every array's index."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

import h5py
import pytest
import timm
import torch

import qkhooks
from qkhooks.store import format as fmt
from qkhooks.stream import record_dataset
from test_repair_cut_files import _row_ends


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """A finished run of 24 images of the tiny ViT (rows, modes, masks; chunks of several images), as round 44's."""
    path = tmp_path_factory.mktemp("meta") / "whole.h5"
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    record_dataset(qkhooks.load_model(model), "o3:24:1", path, modes=8, attention="rows", batch_size=2,
                   checkpoint_every=3, progress=False)
    return path


def test_a_cut_where_any_image_ends_loses_no_image_whose_rows_lie_before_it(whole, tmp_path):
    """Cut where each image's rows end: repair recovers every image whose rows all lie before the cut. Before, the
    cuts inside ``masks/objects``' first chunk took its index: none of 7, then of 20, images recovered."""
    short = [(at, len(report.recovered), len(before)) for at, report, before in _repaired_at_row_ends(whole, tmp_path)
             if len(report.recovered) < len(before)]
    assert short == []


def _repaired_at_row_ends(path: Path, tmp_path: Path) -> Iterator[tuple[int, Any, list[int]]]:
    """``path`` cut where each image's rows end (raw chunks, no filter: each row at a known place), each cut through
    ``repair``: (the cut's offset, repair's report, the images whose rows all lie before the cut)."""
    ends = _row_ends(path)[0]
    data = path.read_bytes()
    for at in sorted(set(ends.tolist())):
        cut, fixed = tmp_path / f"cut{at}.h5", tmp_path / f"fixed{at}.h5"
        cut.write_bytes(data[:at])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reducer checkpoint counts images past the cut
            report = qkhooks.store.repair(cut, fixed)
        yield at, report, [i for i, end in enumerate(ends.tolist()) if end <= at]


def test_every_per_image_arrays_chunk_index_lies_before_its_first_chunk(whole):
    """What the fix does, read off the file: each per-image array's chunk index (its extensible array header,
    "EAHD") lies before the array's first chunk, so no cut that leaves a chunk can take its index."""
    data = whole.read_bytes()
    with h5py.File(whole, "r") as f:
        arrays = fmt.per_image_datasets(f)
        first_chunk = min(ds.id.get_chunk_info(0).byte_offset for ds in arrays.values())
    headers, at = [], data.find(b"EAHD")
    while at >= 0:
        headers.append(at)
        at = data.find(b"EAHD", at + 1)
    assert len(headers) >= len(arrays)
    assert max(headers) < first_chunk


def test_a_run_of_more_arrays_than_16_kib_holds_gets_a_block_for_every_index(tmp_path):
    """A 24-layer run has 76 per-image arrays, whose indexes (~420 bytes each) overflow one 16 KiB block: 32 of
    them went after the first chunk. The first block is sized for every array (``meta_block_bytes``)."""
    from qkhooks.store._hdf5 import META_BLOCK_BYTES, meta_block_bytes

    assert meta_block_bytes(10) == META_BLOCK_BYTES and meta_block_bytes(76) == 40 * 1024
    path = tmp_path / "deep.h5"
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=24,
                              num_heads=4).eval()
    record_dataset(qkhooks.load_model(model), "o3:2:1", path, modes=8, attention="rows", batch_size=2,
                   progress=False, reducers=[])
    test_every_per_image_arrays_chunk_index_lies_before_its_first_chunk(path)
