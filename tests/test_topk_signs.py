"""Round 26: TopKModes makes its (+1, -1) sign tensor once per device and map dtype, held by the reducer, instead of
copying it to the maps' device every fold. The state after several batches equals, bit for bit, that of a reducer
building the signs fresh each fold (the code before), on both fold paths and in both map dtypes, and equals the
brute-force numpy ranking; the signs are built once per reducer, however many batches, layer shapes, merges and
restores."""

from __future__ import annotations

import pytest
import torch

from qkhooks.analysis import topk
from qkhooks.analysis.topk import SIGNS, TopKModes

from test_modes import assert_matches_brute, fake_batch, fold_path, tied_maps  # noqa: F401 (fold_path: a fixture)

SHAPES = {0: 10, 1: 10, 3: 7}  # two layers of one shape folded together, one of another
SIZES, STARTS = [3, 5, 2, 4], [0, 3, 8, 10]


def maps_of(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tied_maps(n=14, tokens=SHAPES[layer], seed=layer)


def fed(reducer: TopKModes) -> TopKModes:
    for lo, size in zip(STARTS, SIZES):
        reducer.update(fake_batch({l: (maps_of(l)[0][lo:lo + size], maps_of(l)[1][lo:lo + size]) for l in SHAPES}, lo))
    return reducer


@pytest.mark.parametrize("map_dtype", ["float32", "float16"])
def test_cached_signs_give_the_state_of_signs_built_fresh_every_fold_bit_for_bit(fold_path, monkeypatch, map_dtype):
    cached = fed(TopKModes(k=3, num_prefix_tokens=1, map_dtype=map_dtype))
    fresh = TopKModes(k=3, num_prefix_tokens=1, map_dtype=map_dtype)
    monkeypatch.setattr(fresh, "_signs_on",
                        lambda device: topk.to_device(torch.tensor(SIGNS, dtype=fresh.map_dtype), device))
    fed(fresh)
    assert sorted(cached.layers) == sorted(fresh.layers) == sorted(SHAPES)
    for l in SHAPES:
        for name in ("score", "index", "query", "key"):
            mine, theirs = cached.layers[l][name], fresh.layers[l][name]
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), (l, name)
        assert (cached.layers[l]["index"][:, :, 1] >= 0).any()  # the sign -1 slots hold images: the signs were used
        if map_dtype == "float32":
            q, k = maps_of(l)
            assert_matches_brute(cached, q.double().numpy(), k.double().numpy(), 1, layer=l)


def test_the_signs_are_built_once_per_reducer_however_many_folds_merges_and_restores(fold_path, monkeypatch):
    built: list[tuple[torch.dtype, torch.device]] = []
    real = topk.to_device

    def counting(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        built.append((t.dtype, torch.device(device)))
        return real(t, device)

    monkeypatch.setattr(topk, "to_device", counting)
    reducer = fed(TopKModes(k=3, num_prefix_tokens=1))
    assert built == [(torch.float16, torch.device("cpu"))]  # 4 batches x 2 shapes folded, one build
    other = TopKModes(k=3, num_prefix_tokens=1)
    other.update(fake_batch({0: maps_of(0)}, 20))
    assert len(built) == 2  # the reducer's own, not a global one
    reducer.merge(other)
    restored = TopKModes(k=3, num_prefix_tokens=1)
    restored.load_state_dict(reducer.state_dict())
    reducer.update(fake_batch({0: maps_of(0)}, 40))
    restored.update(fake_batch({0: maps_of(0)}, 40))
    assert len(built) == 3  # the merged reducer kept its signs; the restored one made its own once
    assert torch.equal(reducer.layers[0]["query"], restored.layers[0]["query"])
