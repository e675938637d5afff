"""Round 34's fixes of round 33's open items and its reviews' findings: each test states the exact value or the
refusal, against an independent reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.errors import QKHooksError


def _sharded_run(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two shards of a 4-photo recording, merged into a view beside them."""
    from PIL import Image

    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    loaded = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                  embed_dim=32, depth=1, num_heads=2).eval())
    folder, rng = tmp_path / "photos", np.random.default_rng(0)
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    out = tmp_path / "m.h5"
    shards = [shard_path(out, r, 2) for r in range(2)]
    for r, p in enumerate(shards):
        record_dataset(loaded, str(folder), p, shard=(r, 2), modes=2, batch_size=2, reducers=[], progress=False)
    merge_shards(out)
    return out, shards


@torch.no_grad()
def test_a_shard_removed_between_the_look_and_the_stat_reads_as_missing_not_a_raw_error(tmp_path, monkeypatch):
    """``rewritten_shards`` looked for each shard (``exists``) and then stat-ed it: a shard removed in between raised
    a bare FileNotFoundError. Now a shard gone at any point reads as missing, which the read refuses by name."""
    import h5py

    from qkhooks.store import open_run, reader

    out, shards = _sharded_run(tmp_path)
    shards[1].unlink()
    monkeypatch.setattr(reader.Path, "exists", lambda self: True)  # the shard was there when looked for
    with h5py.File(out, "r") as f:
        views: list[str] = []
        f.visit(lambda n: views.append(n) if isinstance(f[n], h5py.Dataset) and f[n].is_virtual else None)
        assert views and all(reader.rewritten_shards(f[n], out.parent, 4) == [] for n in views)
    monkeypatch.undo()
    with pytest.raises(QKHooksError, match=r"holding images 2-3 are missing there"):
        with open_run(out) as run:
            run.query(0)[:]


@torch.no_grad()
def test_the_shard_run_id_cache_keeps_a_bounded_number_of_versions(tmp_path, monkeypatch):
    """One entry was kept for every shard version a process read, without bound."""
    from qkhooks.store import reader

    _, shards = _sharded_run(tmp_path)
    monkeypatch.setattr(reader, "_SHARD_RUN_IDS", type(reader._SHARD_RUN_IDS)())
    monkeypatch.setattr(reader, "_SHARD_RUN_IDS_KEPT", 1)
    ids = [reader._shard_run_id(p) for p in shards]
    assert len(reader._SHARD_RUN_IDS) == 1 and list(reader._SHARD_RUN_IDS)[0][0] == str(shards[1])  # the latest
    assert None not in ids and ids[0] != ids[1]  # each rank's own run id
    assert reader._shard_run_id(shards[0]) == ids[0] and list(reader._SHARD_RUN_IDS)[0][0] == str(shards[0])
