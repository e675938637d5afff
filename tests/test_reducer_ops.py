"""Round 27 (issue 20, GPU): the default reducers fold a batch with a number of tensor operations that does not grow with
the layers. On a GPU each operation costs the host a kernel launch (~5-10 us) whatever its size, and next to a fast GPU
the host sets the pace: per-layer loops in TopKModes and AnisotropyReducer were ~600 operations a 12-layer batch.
Counted with a dispatch mode (no timing); the results are checked against each layer folded on its own."""

from __future__ import annotations

import weakref

import pytest
import torch

from qkhooks.analysis import topk
from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
from qkhooks.capture import BatchCapture, LayerCapture
from conftest import CountOps


def _maps(layers: int, batch: int, seed: int, heads: int = 2, modes: int = 3, tokens: int = 7):
    g = torch.Generator().manual_seed(seed)
    return {l: (torch.randn(batch, heads, modes, tokens, generator=g), torch.randn(batch, heads, modes, tokens, generator=g))
            for l in range(layers)}


def _map_batch(maps, offset: int) -> BatchCapture:
    size = next(iter(maps.values()))[0].shape[0]
    caps = {l: LayerCapture(l, size, query=q, key=k) for l, (q, k) in maps.items()}
    return BatchCapture(ids=[], meta={"num_prefix_tokens": 1}, layers=caps, offset=offset)


def _token_batch(layers: int, batch: int, seed: int, tokens: int = 10, dim: int = 6) -> BatchCapture:
    g = torch.Generator().manual_seed(seed)
    caps = {}
    for l in range(layers):
        x = torch.randn(batch, tokens, dim, generator=g)
        x[0, 5] = 0.0  # a zero centre token (prefix 1, grid 3x3: token 1 + 4) is not counted
        caps[l] = LayerCapture(l, batch, inputs=x)
    return BatchCapture(ids=[], meta={"num_prefix_tokens": 1, "grid": (3, 3)}, layers=caps, offset=0)


def _ops_of_second_batch(reducer, first: BatchCapture, second: BatchCapture) -> int:
    reducer.update(first)  # the state exists from here on
    with CountOps() as ops:
        reducer.update(second)
    return ops.total


@pytest.fixture
def accelerator_fold(monkeypatch):
    """The fold a GPU takes (every candidate's rows, from the stacked maps), run on the CPU."""
    monkeypatch.setattr(topk, "_entrants_only", lambda device: False)


def test_an_accelerator_topk_fold_costs_the_same_operations_for_2_and_12_layers(accelerator_fold):
    counts = {layers: _ops_of_second_batch(TopKModes(k=2), _map_batch(_maps(layers, 4, 0), 0),
                                           _map_batch(_maps(layers, 4, 1), 4))
              for layers in (2, 12)}
    assert counts[2] == counts[12], counts
    assert counts[12] < 150, counts  # round 26: ~420 for 12 layers


def test_the_stacked_accelerator_fold_keeps_what_each_layer_folded_alone_keeps(accelerator_fold):
    """Rows picked from the stack (one index for all layers) are each layer's own: the stacked fold of 5 layers
    equals 5 reducers each folding one layer, bit for bit, over batches that replace kept images."""
    batches = [_maps(5, size, seed) for seed, size in enumerate((3, 4, 2))]
    together = TopKModes(k=2, map_dtype="float32")
    alone = {l: TopKModes(k=2, map_dtype="float32") for l in range(5)}
    offset = 0
    for maps in batches:
        together.update(_map_batch(maps, offset))
        for l, reducer in alone.items():
            reducer.update(_map_batch({l: maps[l]}, offset))
        offset += next(iter(maps.values()))[0].shape[0]
    for l, reducer in alone.items():
        for name, value in reducer.layers[l].items():
            assert torch.equal(together.layers[l][name], value), (l, name)
    # and the kept maps are the images' own rows (layer 3, head 1, mode 2, sign +1, best image)
    best = int(together.layers[3]["index"][1, 2, 0, 0])
    image = torch.cat([m[3][0] for m in batches])[best]
    assert torch.equal(together.layers[3]["query"][1, 2, 0, 0], image[1, 2])


def test_anisotropy_costs_the_same_operations_for_2_and_12_layers_past_the_centre_tokens():
    # one select a layer (its centre token) is left; everything else runs once on the stack
    counts = {layers: _ops_of_second_batch(AnisotropyReducer(), _token_batch(layers, 3, 0), _token_batch(layers, 3, 1))
              for layers in (2, 12)}
    assert counts[12] - counts[2] <= 2 * (12 - 2), counts
    assert counts[12] <= 33, counts  # round 26: ~180 for 12 layers; round 27: 34 (the centres stacked twice)


def test_stacked_anisotropy_sums_equal_each_layer_on_its_own_and_a_direct_computation():
    together = AnisotropyReducer()
    alone = {l: AnisotropyReducer() for l in range(4)}
    batches = [_token_batch(4, size, seed) for seed, size in enumerate((3, 5))]
    for batch in batches:
        together.update(batch)
        for l, reducer in alone.items():
            reducer.update(BatchCapture(ids=[], meta=batch.meta, layers={l: batch.captures[l]}, offset=0))
    for l, reducer in alone.items():
        assert torch.equal(together.sums[l], reducer.sums[l]) and together.count[l] == reducer.count[l] == 6  # 8 images, 2 zero centres
        centres = torch.cat([b.captures[l].inputs[:, 5] for b in batches]).double()
        norms = centres.norm(dim=-1, keepdim=True)
        expected = (centres[norms[:, 0] > 0] / norms[norms[:, 0] > 0]).sum(0)
        torch.testing.assert_close(together.sums[l], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layers_a_part, parts", [(2, [[0, 1], [2, 3], [4]]), (1, [[0], [1], [2], [3], [4]])])
def test_an_accelerator_stacks_at_most_stack_bytes_of_maps_at_once_and_keeps_what_each_layer_keeps(accelerator_fold,
                                                                                                   monkeypatch,
                                                                                                   layers_a_part, parts):
    """A group of layers whose maps pass ``STACK_BYTES`` is folded in parts, with the result of each layer folded
    alone; when a stack is made, those still alive take ``STACK_BYTES`` at most (the parts are not all held at once)."""
    batches = [_maps(5, size, seed) for seed, size in enumerate((3, 4))]
    per_layer = sum(t.numel() * t.element_size() for t in batches[1][0])  # the larger batch's query and key maps
    monkeypatch.setattr(topk, "STACK_BYTES", layers_a_part * per_layer + per_layer // 2)
    stacked, alive, most_alive = [], [], [0]
    real = topk._stacked_maps

    def tracked(maps):
        most_alive[0] = max(most_alive[0], sum(t.numel() * t.element_size() for ref in alive if (t := ref()) is not None))
        stacked.append([l for l, _, _ in maps])
        made = real(maps)
        alive.extend(weakref.ref(t) for t in made)
        return made

    monkeypatch.setattr(topk, "_stacked_maps", tracked)
    together = TopKModes(k=2, map_dtype="float32")
    alone = {l: TopKModes(k=2, map_dtype="float32") for l in range(5)}
    offset = 0
    for maps in batches:
        stacked.clear()
        together.update(_map_batch(maps, offset))
        for l, reducer in alone.items():
            reducer.update(_map_batch({l: maps[l]}, offset))
        offset += maps[0][0].shape[0]
    assert stacked[:len(parts)] == parts  # the batch's parts, then those not kept made again, then each layer alone
    assert 0 < most_alive[0] <= topk.STACK_BYTES
    for l, reducer in alone.items():
        for name, value in reducer.layers[l].items():
            assert torch.equal(together.layers[l][name], value), (l, name)
