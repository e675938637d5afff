"""Output buffers reused from batch to batch (issue 20, round 14): maps written into memory that no holder can see
change, with the values of a fresh computation.

A recording writes each batch's query/key maps and full maps into buffers its attention modules keep
(:mod:`qkhooks.buffers`), reused only when nothing else holds them. The references are the pool's own bookkeeping
(data pointers), clones taken when the maps were made, the model's own eager attention, and the same batch recorded
on a copy of the model whose buffers are all new.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qkhooks
from conftest import Tiny, _timm, eager_attention
from qkhooks.buffers import OutputBuffers, output_buffers, release_buffers
from test_zoo import perturb

# 193 tokens: the full maps take the in-place products (128 tokens or more), which write into the buffers
LONG = Tiny("timm-vit-12x16", _timm("vit_tiny_patch16_224", img_size=(48, 64), patch_size=4), (48, 64), 1, "timm",
            (12, 16))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = LONG.model().eval()
    perturb(model)  # non-zero q/k biases: the modes' folded offsets are subtracted on the way into the buffer
    return model


def _images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, *LONG.hw, generator=torch.Generator().manual_seed(seed))


def _outputs(batch) -> dict[str, torch.Tensor]:
    """Every pooled output of a batch: each layer's query and key maps and full maps."""
    out = {}
    for layer, cap in batch.captures.items():
        out[f"query {layer}"], out[f"key {layer}"], out[f"full {layer}"] = cap.query, cap.key, cap.attention["full"]
    return out


def test_a_buffer_is_handed_out_again_only_when_nothing_holds_it():
    pool = OutputBuffers()
    assert pool.empty("maps", (3, 4), torch.float32, "cpu") is not None and pool.nbytes() == 0  # no recording: none kept
    pool.attach()
    first = pool.empty("maps", (3, 4), torch.float32, "cpu")
    first_ptr = first.data_ptr()
    second = pool.empty("maps", (3, 4), torch.float32, "cpu")
    assert second.data_ptr() != first_ptr  # first is held
    view = first[1:]
    del first
    assert pool.empty("maps", (3, 4), torch.float32, "cpu").data_ptr() != first_ptr  # a view of it still holds it
    del view
    third = pool.empty("maps", (3, 4), torch.float32, "cpu")
    assert third.data_ptr() == first_ptr  # released: reused
    array = third.numpy()
    del third
    fourth = pool.empty("maps", (3, 4), torch.float32, "cpu")
    assert fourth.data_ptr() != first_ptr  # a numpy array of it holds it as a tensor does
    del array, fourth, second
    base = pool.empty("maps", (3, 4), torch.float32, "cpu")._base
    assert pool.empty("maps", (3, 4), torch.float32, "cpu").data_ptr() != base.data_ptr()  # its _base holds it too
    del base
    shared = pool.empty("maps", (3, 4), torch.float32, "cpu")
    shared_ptr = shared.share_memory_().data_ptr()  # as a multiprocessing queue does: another process reads it
    del shared
    assert pool.empty("maps", (3, 4), torch.float32, "cpu").data_ptr() != shared_ptr
    # at most `keep` buffers per shape; other devices are never kept; inference mode makes buffers usable outside it
    pool.release()
    held = [pool.empty("maps", (3, 4), torch.float32, "cpu", keep=3) for _ in range(5)]
    assert len({t.data_ptr() for t in held}) == 5 and pool.nbytes() == 3 * 12 * 4
    pool.empty("meta maps", (2,), torch.float32, "meta")
    assert pool.nbytes() == 3 * 12 * 4
    del held
    with torch.inference_mode():
        pool.empty("other", (2,), torch.float32, "cpu")
    pool.empty("other", (2,), torch.float32, "cpu").fill_(1.0)
    # the last recording detaching lets go of every buffer nobody holds, and keeps those still held
    kept = pool.empty("maps", (3, 4), torch.float32, "cpu")
    pool.detach()
    assert pool.nbytes() == 12 * 4
    del kept
    pool.attach()
    assert pool.release() == 12 * 4 and pool.nbytes() == 0


@pytest.mark.parametrize("outputs", ["unchanged", "eager"])
def test_maps_kept_from_earlier_batches_are_never_overwritten(outputs: str):
    model = _model()
    with torch.no_grad(), qkhooks.record(model, modes=4, attention="full", outputs=outputs) as run:
        run(_images(1))
        kept = run.last  # the caller keeps the whole first batch
        want_kept = {name: t.clone() for name, t in _outputs(kept).items()}
        run(_images(2))
        arrays = {name: t.numpy() for name, t in _outputs(run.last).items()}  # only numpy arrays of the second
        want_arrays = {name: a.copy() for name, a in arrays.items()}
        for seed in (3, 4, 5, 6):
            run(_images(seed))
    assert run._from_qk  # the modes came from the q/k path's buffers
    for name, t in _outputs(kept).items():
        assert torch.equal(t, want_kept[name]), name
    for name, a in arrays.items():
        assert (a == want_arrays[name]).all(), name


@pytest.mark.parametrize("outputs", ["unchanged", "eager"])
def test_released_buffers_are_reused_and_hold_the_new_batch_exactly(outputs: str):
    model = _model()
    pointers = []
    with torch.no_grad(), qkhooks.record(model, modes=4, attention="full", outputs=outputs) as run:
        for seed in (1, 2, 3):
            run(_images(seed))
            pointers.append({name: t.data_ptr() for name, t in _outputs(run.last).items()})
        last = run.last
    # batch 2 ran while the recording held batch 1 (its `last`): new buffers; batch 3 reuses batch 1's
    assert all(pointers[1][name] != pointers[0][name] for name in pointers[0])
    assert pointers[2] == pointers[0]
    # ... and holds batch 3's values: the model's own eager attention, and modes recorded with buffers all new
    for layer, want in enumerate(eager_attention(LONG, model, _images(3))):
        assert float((last.captures[layer].attention["full"] - want).abs().max()) < 1e-5
    fresh = copy.deepcopy(model)
    with torch.no_grad(), qkhooks.record(fresh, modes=4, attention="full", outputs=outputs) as again:
        again(_images(3))
    for name, t in _outputs(again.last).items():
        assert torch.equal(_outputs(last)[name], t), name
    # the recording ended: its pools keep only the buffers of the batch still held (its `last`), none once let go
    pools = [output_buffers(block.attn) for block in model.blocks]
    assert 0 < sum(pool.nbytes() for pool in pools) <= sum(t.numel() * 4 for t in _outputs(last).values())
    del last, run
    assert release_buffers(model) > 0 and all(pool.nbytes() == 0 for pool in pools)
