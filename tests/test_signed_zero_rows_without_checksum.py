"""Why a run without --checksum also stores an all-zero projection row as -0.0 (``format.signed_zero_rows``), though
no zeroed-chunk check looks at its unchecksummed arrays: the shards of one torchrun run need not share --checksum
(it is a layout option, not part of the run's config, which the merge compares), and ``merge --copy`` gives every
merged array the first shard's layout, copying the rows through numpy. An unchecksummed shard's zero rows stored as
+0.0 would land in a Fletcher-32 chunk of zero bytes, which every reader then refuses as a zeroed disk page."""

from __future__ import annotations

import h5py
import numpy as np
import timm
import torch

import qkhooks
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import open_run, repair, verify_run
from qkhooks.stream import record_dataset


def test_a_merged_copy_of_a_checksummed_and_a_plain_shard_reads_a_zero_layers_rows_as_zeros(tmp_path):
    torch.manual_seed(0)
    loaded = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                  embed_dim=32, depth=1, num_heads=2).eval())
    norm = loaded.model.blocks[0].norm1
    with torch.no_grad():  # the layer's q/k input is zero: every projection row is a true zero
        norm.weight.zero_()
        norm.bias.zero_()
    out = tmp_path / "run.h5"
    for rank in range(2):
        record_dataset(loaded, "samples", shard_path(out, rank, 2), shard=(rank, 2), modes=2, layers="0",
                       batch_size=2, limit=6, progress=False, reducers=[], checksum=rank == 0)
    with h5py.File(shard_path(out, 1, 2), "r") as f:
        assert not f["modes/L0/query"].fletcher32  # rank 1 has no checksum
        plain = f["modes/L0/query"][()]
    assert not plain.any() and np.signbit(plain).all()  # zeros, stored as -0.0 without a checksum too
    merge_shards(out, copy=True)
    with h5py.File(out, "r") as f:
        assert f["modes/L0/query"].fletcher32  # the first shard's layout, rank 1's rows included
    with open_run(out) as run:
        for name in ("modes/L0/query", "modes/L0/key"):
            values = run.array(name)[:]
            assert values.shape[0] == 6 and not values.any()
    assert verify_run(out).ok
    assert repair(out, tmp_path / "fixed.h5").lost == []
