"""Round 28 (issue 20, GPU host): a batch's GPU arrays leave the device in one copy. ``_packed`` lays them, cast to the
storage dtype, end to end in one byte buffer on their device; ``_unpacked`` reads them back from (a copy of) it. The
packing is device-agnostic and tested here on the CPU against each array cast alone (the per-array path it replaces);
the CUDA hand-off around it runs in the last test where torch sees a GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qkhooks.store import RunWriter, RunReader
from qkhooks.store.writer import _PACK_ALIGN, _packed, _to_host, _to_host_all, _unpacked

GPU = torch.device(os.environ.get("QKHOOKS_TEST_DEVICE", "cuda"))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 65504.0, 1e-8])
    return {
        "maps": torch.randn(3, 2, 5, 7, generator=g),
        "strided": torch.randn(3, 4, 6, generator=g)[:, :, ::2],  # a view, not contiguous
        "indices": torch.randint(0, 1000, (3, 5), generator=g),
        "odd_bytes": torch.randn(3, 1, generator=g, dtype=torch.float64),  # 6 bytes in float16: the next is realigned
        "flags": torch.tensor([True, False, True]),
        "special": special.expand(3, -1).clone(),
        "empty": torch.zeros(3, 0),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (NaN equal to itself)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(ints) if t.dtype != torch.bool else t


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, None], ids=str)
def test_packed_arrays_read_back_as_each_array_cast_alone(dtype):
    batch = _batch()
    buffer, layout = _packed(batch, dtype)
    back = _unpacked(buffer.clone(), layout)  # the host's copy of the buffer
    assert list(back) == list(batch)
    for name, t in batch.items():
        want = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        assert back[name].dtype == want.dtype and back[name].shape == want.shape, name
        assert torch.equal(_bits(back[name]), _bits(want)), name


def test_packed_arrays_are_aligned_and_do_not_overlap():
    batch = _batch()
    buffer, layout = _packed(batch, torch.float16)
    spans = [(offset, offset + int(np.prod(shape)) * torch.empty(0, dtype=target).element_size())
             for _, offset, target, shape in layout]
    assert all(start % _PACK_ALIGN == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= buffer.numel() < spans[-1][1] + _PACK_ALIGN
    assert buffer.dtype == torch.uint8 and buffer.device == batch["maps"].device


def test_the_batch_hand_off_on_the_cpu_is_each_arrays_own():
    """Off the GPU nothing is packed: every array is handed over as :func:`_to_host` hands it, in the batch's order."""
    batch = {**_batch(), "numpy": np.arange(6).reshape(3, 2)}
    handed = _to_host_all(batch, torch.float16)
    assert list(handed) == list(batch)
    for name, value in batch.items():
        (got, event), (want, _) = handed[name], _to_host(value, torch.float16)
        assert event is None
        assert (torch.equal(_bits(got), _bits(want)) if isinstance(want, torch.Tensor) else np.array_equal(got, want))


@pytest.mark.skipif(GPU.type == "cuda" and not torch.cuda.is_available(), reason="the packed hand-off runs on CUDA "
                    "arrays only (QKHOOKS_TEST_DEVICE=cpu runs this test's other half on the CPU)")
def test_a_gpu_batch_is_written_as_the_same_batch_from_the_cpu(tmp_path):
    batch = {k: v for k, v in _batch().items() if k not in ("flags", "empty")}
    ids = ["a", "b", "c"]
    for name, device in (("cpu", torch.device("cpu")), ("gpu", GPU)):
        on_device = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            events = {id(event) for _, event in _to_host_all(on_device, torch.float16).values()}
            assert len(events) == 1  # one copy and one event a batch
        with RunWriter(tmp_path / f"{name}.h5", attrs={"model": "test"}) as writer:
            writer.write_batch(ids, on_device)
    with RunReader(tmp_path / "cpu.h5") as cpu, RunReader(tmp_path / "gpu.h5") as gpu:
        for name in batch:
            np.testing.assert_array_equal(gpu.array(name)[:], cpu.array(name)[:])


def test_a_torch_without_foreach_copy_packs_the_same_bytes(monkeypatch):
    """torch 2.1 (the oldest setup.cfg allows) may lack ``_foreach_copy_``: the array-by-array copies give the same buffer."""
    batch = _batch()
    with_foreach, layout = _packed(batch, torch.float16)
    monkeypatch.delattr(torch, "_foreach_copy_", raising=False)
    one_by_one, layout_again = _packed(batch, torch.float16)
    assert layout_again == layout
    parts, again = _unpacked(with_foreach, layout), _unpacked(one_by_one, layout)
    assert all(torch.equal(_bits(parts[name]), _bits(again[name])) for name in batch)  # the padding bytes are never read
