"""Round 21: a chunk of a checksummed or compressed per-image array that holds a committed image is never written
again, whatever the sizes of later batches (a short batch: a photo that fails to decode late, a resume with another
batch size). A rewrite in place that a kill or a power loss cuts would leave committed images beside a stale
Fletcher-32 checksum (lost) or inside a torn compressed chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qkhooks.store import RunWriter
from qkhooks.store._hdf5 import open_reader


def chunks_holding_committed_rows(path: Path, name: str, committed: int) -> dict[tuple[int, ...], tuple[int, bytes]]:
    """(file offset, stored bytes) of every chunk of ``name`` that holds one of the first ``committed`` rows, read with
    h5py's chunk queries (``get_chunk_info``, ``read_direct_chunk``: the bytes as on disk, filtered)."""
    with open_reader(path) as f:
        ds = f[name]
        out = {}
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            if info.chunk_offset[0] < committed:
                out[info.chunk_offset] = (info.byte_offset, ds.id.read_direct_chunk(info.chunk_offset)[1])
        return out


@pytest.mark.parametrize("layout", [{"checksum": True}, {"compression": "gzip"}, {"compression": "lzf", "checksum": True}])
def test_no_chunk_holding_a_committed_image_is_rewritten_by_later_batches_of_other_sizes(tmp_path, layout):
    path = tmp_path / "run.h5"
    rng = np.random.default_rng(0)
    sizes = (2, 1, 2, 2, 3)  # a batch short by one image in the middle, then a longer one
    written = [rng.standard_normal((b, 16, 32)).astype(np.float32) for b in sizes]
    seen: dict[tuple[int, ...], tuple[int, bytes]] = {}
    with RunWriter(path, attrs={"model": "m", "config": "{}"}, dtype="float32", **layout) as w:
        for b, (size, values) in enumerate(zip(sizes, written)):
            w.write_batch([f"im{b}_{i}" for i in range(size)], {"maps": values})
            w.flush()
            now = chunks_holding_committed_rows(path, "maps", w.committed)
            rewritten = [at[0] for at, before in seen.items() if now[at] != before]  # offset or bytes changed
            assert not rewritten, f"batch {b} ({size} images) rewrote the chunks at rows {rewritten}"
            seen = now
    with open_reader(path) as f:
        assert f["images"].attrs["committed"] == sum(sizes)
        np.testing.assert_array_equal(f["maps"][()], np.concatenate(written))
