"""A --checksum run written before format 4 may hold a true all-zero mode projection row (a layer whose q/k input is
zero, its norm's weight and bias zero) as zero bytes: writers before round 50 stored it as +0.0, and its Fletcher-32
of zero bytes is zero, so nothing in the file tells it from a disk page zeroed over it. Every reader still refuses to
read it (no number without a word), but says it may be that true row, how to check, and does not call the run damaged;
in a run of format 4 (whose writers store such a row as -0.0) the same bytes are damage."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.store import format as fmt
from qkhooks.store import open_run, repair, verify_run
from qkhooks.stream import record_dataset


def _zero_layer_run(path: Path, **kw) -> None:
    torch.manual_seed(0)
    loaded = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                  embed_dim=32, depth=1, num_heads=2).eval())
    norm = loaded.model.blocks[0].norm1
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
    record_dataset(loaded, "samples", path, modes=2, layers="0", batch_size=2, limit=4, progress=False, reducers=[],
                   checksum=True, **kw)


def _as_an_older_writer_stored_it(path: Path, number: int | None) -> None:
    """Every chunk of the zero layer's projections as zero bytes (+0.0, its checksum 0), as writers before round 50
    stored them, and the file stamped ``number`` (None: no number, a file from before format numbers)."""
    with h5py.File(path, "r+") as f:
        places = []
        for name in ("modes/L0/query", "modes/L0/key"):
            ds = f[name]
            assert not ds[()].any() and np.signbit(ds[()]).all()  # the true zeros, stored as -0.0 now
            places += [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
        del f.attrs[fmt.FORMAT_ATTR]
        if number is not None:
            f.attrs[fmt.FORMAT_ATTR] = np.int64(number)
    with open(path, "r+b") as fh:
        for info in places:
            fh.seek(info.byte_offset)
            fh.write(bytes(info.size))


@pytest.mark.parametrize("number", [3, None])
def test_a_zero_chunk_of_projections_in_a_run_before_format_4_may_be_true_zeros_and_is_said_so(tmp_path, number):
    run = tmp_path / "run.h5"
    _zero_layer_run(run)
    _as_an_older_writer_stored_it(run, number)
    with open_run(run) as reader:
        with pytest.raises(QKHooksError) as refused:
            reader.array("modes/L0/query")[1]
    words = str(refused.value)
    assert "is damaged" not in words and "image 1's chunk" in words and "modes/L0/query" in words
    assert "before format 4" in words and "may be" in words and "q/k input is zero" in words
    assert "qkhooks info --verify" in words  # how to check: every image's rows of the layer listed
    report = verify_run(run)
    spans = report.damaged.get("/modes/L0/query", report.damaged.get("modes/L0/query"))
    assert sorted(row for lo, hi in spans for row in range(lo, hi)) == [0, 1, 2, 3], report.problems
    line = next(p for p in report.problems if p.startswith("/modes/L0/query"))
    assert "may be" in line and "before format 4" in line
    printed = report.summary().splitlines()
    assert any(row.startswith("unsure   /modes/L0/query") for row in printed)
    assert not any(row.startswith("damaged") for row in printed) and "DAMAGED" not in printed[-1]
    assert printed[-1].startswith("result   NOT VOUCHED FOR")


def test_the_same_zero_chunk_in_a_run_of_format_4_is_damage(tmp_path):
    run = tmp_path / "run.h5"
    _zero_layer_run(run)
    with h5py.File(run, "r") as f:
        assert int(f.attrs[fmt.FORMAT_ATTR]) == fmt.FORMAT == 4
    _as_an_older_writer_stored_it(run, fmt.FORMAT)
    with open_run(run) as reader, pytest.raises(QKHooksError, match="is damaged .*image 1's chunk.*qkhooks repair"):
        reader.array("modes/L0/query")[1]
    report = verify_run(run)
    assert "may be" not in " ".join(report.problems) and "DAMAGED" in report.summary().splitlines()[-1]
    assert repair(run, tmp_path / "fixed.h5").lost == [0, 1, 2, 3]


def test_a_merged_copy_of_shards_before_format_4_keeps_their_format_and_says_may_be(tmp_path):
    """merge --copy writes the shards' rows as they are into a new file: it says the oldest format of its shards, so
    such a chunk stays "may be true zeros" there, not damage (before, a merge was stamped with the current format)."""
    from qkhooks.distributed import merge_shards, shard_path

    out = tmp_path / "run.h5"
    for rank in range(2):
        _zero_layer_run(shard_path(out, rank, 2), shard=(rank, 2))
        _as_an_older_writer_stored_it(shard_path(out, rank, 2), 3 if rank else fmt.FORMAT)
    merge_shards(out, copy=True)
    with h5py.File(out, "r") as f:
        assert int(f.attrs[fmt.FORMAT_ATTR]) == 3
    with open_run(out) as reader, pytest.raises(QKHooksError) as refused:
        reader.array("modes/L0/key")[3]
    assert "is damaged" not in str(refused.value) and "may be" in str(refused.value)
