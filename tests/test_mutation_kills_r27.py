"""Kill tests for the mutants of round 27's code that its tests let survive (module "round27" of tests/mutation.py,
``--only ROUND27``; tests/MUTATION.md's round-27 section names each): top-k over reduced keys with their own prefix,
the one-layer fold on an accelerator's path, what an accelerator's fold copies, reduces and reads back; the anisotropy
baseline of stages of two widths in one batch and after a merge that brought some of the layers; the q/k path of a
bias-free layer with q and k held apart. The last test keeps the harness's round27 module consistent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.access import LayerGeometry
from qkhooks.analysis import topk
from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError
from qkhooks.projector import QKPathProjector

from test_modes import brute_force, fake_batch, fold_path  # noqa: F401 (fold_path: a fixture)
from test_mutation_kills_r25 import _harness
from test_mutation_kills_r26 import commits_in, library_files_changed, module_files
from conftest import CountOps
from test_reducer_ops import _maps
from test_speed_round9 import _dense_maps, _vit

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ analysis/topk.py
def assert_ranked_as_brute_force(reducer: TopKModes, layer: int, query: torch.Tensor, key: torch.Tensor, prefix: int,
                                 key_prefix: int) -> None:
    """Per (head, mode, sign): the kept images, scores and maps are brute force's, each side scored past its own
    prefix tokens (brute force of the maps with those tokens cut off)."""
    q, k = query.double().numpy(), key.double().numpy()
    ref = brute_force(q[..., prefix:], k[..., key_prefix:], 0, reducer.k)
    for (h, m, sign), expected in ref.items():
        got = reducer.top(layer, h, m, sign)
        assert got["index"].tolist() == [i for _, i in expected], (layer, h, m, sign)
        np.testing.assert_allclose(got["score"], [s for s, _ in expected], rtol=1e-6)
        for rank, i in enumerate(got["index"]):
            np.testing.assert_array_equal(got["query"][rank], sign * q[i, h, m])
            np.testing.assert_array_equal(got["key"][rank], sign * k[i, h, m])


def _reduced_key_maps(layer: int, n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of a layer whose 4 keys (a 2 x 2 pooled grid, no prefix) are fewer than its 10 queries (CLS + 3 x 3): the
    query's prefix token is huge (it must be skipped), the key's first token often holds its side's maximum (it must
    be kept)."""
    g = torch.Generator().manual_seed(40 + layer)
    q, k = torch.randn(n, 2, 3, 10, generator=g), torch.randn(n, 2, 3, 4, generator=g)
    q[..., 0] = 50.0
    k[::2, :, :, 0] = k[::2].abs().amax(-1) + 1.0
    return q, k


def test_topk_ranks_reduced_keys_past_their_own_prefix_on_either_path(fold_path):
    """Spatially reduced keys carry their own prefix count in the recording's geometry (here 0 key prefix tokens
    beside the queries' CLS): every layer of the group ranks each side past its own prefix, as brute force does."""
    geometry = {l: LayerGeometry(layer=l, grid=(3, 3), num_prefix_tokens=1, query_tokens=10, key_tokens=4,
                                 key_grid=(2, 2), key_prefix_tokens=0) for l in (0, 1)}
    maps = {l: _reduced_key_maps(l) for l in (0, 1)}
    reducer = TopKModes(k=3, map_dtype="float32")
    for lo, size in ((0, 4), (4, 3), (7, 2)):
        reducer.update(fake_batch({l: (q[lo:lo + size], k[lo:lo + size]) for l, (q, k) in maps.items()}, lo,
                                  num_prefix_tokens=1, grid=(3, 3), geometry=geometry))
    for layer, (q, k) in maps.items():
        assert_ranked_as_brute_force(reducer, layer, q, k, prefix=1, key_prefix=0)


def test_one_layer_folded_alone_on_either_path_skips_each_sides_prefix_as_brute_force(fold_path):
    """``_fold`` (one layer, no extremes or stacks handed in: the fold takes them itself) keeps what brute force
    keeps, each side past its own prefix."""
    q, k = _reduced_key_maps(0)
    reducer = TopKModes(k=3, map_dtype="float32")
    for lo, size in ((0, 4), (4, 5)):
        reducer._fold(0, q[lo:lo + size], k[lo:lo + size], lo, 1, 0)
    assert_ranked_as_brute_force(reducer, 0, q, k, prefix=1, key_prefix=0)


class _Shapes(CountOps):
    """Counts operations as :class:`~conftest.CountOps` does, and keeps each one's name with its first input's and its output's
    shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.calls.append((str(func.overloadpacket.__name__), None if first is None else tuple(first.shape),
                           tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def test_an_accelerator_fold_copies_and_reduces_the_maps_once_and_reads_back_one_value(monkeypatch):
    """On an accelerator a batch's maps are stacked once (one copy of each side for all layers), reduced to their
    extremes once, and no count is read back (no nonzero or bincount: each would wait for the device); the one value
    read is the batch's finite check. A single layer folded alone takes the same path."""
    monkeypatch.setattr(topk, "_entrants_only", lambda device: False)
    layers, batch, heads, modes, tokens = 3, 4, 2, 3, 7
    reducer = TopKModes(k=2)
    reducer.update(fake_batch(_maps(layers, batch, 0), 0, num_prefix_tokens=1))
    second = fake_batch(_maps(layers, batch, 1), batch, num_prefix_tokens=1)
    with _Shapes() as ops:
        reducer.update(second)
    stacked = (layers, batch, heads, modes, tokens)
    assert sum(1 for name, _, out in ops.calls if name == "stack" and out == stacked) == 2
    patches = stacked[:-1] + (tokens - 1,)
    for reduction in ("amin", "amax"):  # over the patch tokens of the stacked query and key maps, once a side
        assert [first for name, first, _ in ops.calls if name == reduction and first == patches] == [patches] * 2
    # the float16 overflow check reduces the extremes (L, 2, B, H, K) and the prefix tokens (L, B, H·K·1) only
    assert sorted(first for name, first, _ in ops.calls if name in ("amin", "amax") and first != patches) == [
        (layers, 2, batch, heads, modes), (layers, batch, heads * modes), (layers, batch, heads * modes)]
    assert ops.count["nonzero"] == ops.count["bincount"] == 0 and ops.count["_local_scalar_dense"] == 1
    q, k = _maps(1, batch, 2)[0]
    with _Shapes() as alone:
        reducer._fold(0, q, k, 2 * batch, 1)
    assert alone.count["nonzero"] == alone.count["bincount"] == alone.count["_local_scalar_dense"] == 0


# ------------------------------------------------------------------------------------ analysis/anisotropy.py
def _stage_batch(seed: int, n: int, poison: tuple[int, int] | None = None) -> BatchCapture:
    """A two-stage model's batch (PiT-like): layers 0 and 1 of width 6 on a 3 x 3 grid, layer 2 of width 10 on a
    2 x 2 grid, each with a CLS token, in float32; embeddings of norm far below 1, image 1's centre zero at layers 0
    and 2. ``poison`` (layer, image): that centre token NaN."""
    g = torch.Generator().manual_seed(seed)
    shapes = {0: (10, 6), 1: (10, 6), 2: (5, 10)}
    caps = {}
    for layer, (tokens, width) in shapes.items():
        x = (torch.randn(n, tokens, width, generator=g) + 0.7) * 0.05
        centre = 5 if tokens == 10 else 1 + 3  # CLS + the centre of a 3 x 3 grid, of a 2 x 2 grid (row 1, col 1)
        if layer != 1:
            x[1, centre] = 0.0
        if poison is not None and poison[0] == layer:
            x[poison[1], centre] = float("nan")
        caps[layer] = LayerCapture(layer, n, inputs=x)
    geometry = {l: LayerGeometry(layer=l, grid=grid, num_prefix_tokens=1, query_tokens=tokens, key_tokens=tokens,
                                 key_grid=grid, key_prefix_tokens=1)
                for l, (grid, tokens) in {0: ((3, 3), 10), 1: ((3, 3), 10), 2: ((2, 2), 5)}.items()}
    return BatchCapture(ids=[f"s{seed}-{i}" for i in range(n)], meta={"num_prefix_tokens": 1, "grid": (3, 3),
                                                                     "geometry": geometry}, layers=caps, offset=0)


def _unit_sum(centres: np.ndarray) -> tuple[np.ndarray, int]:
    """The sum of the nonzero centre vectors made unit length, in float64, and their count (numpy)."""
    z = centres.astype(np.float64)
    norms = np.linalg.norm(z, axis=1)
    return (z[norms > 0] / norms[norms > 0, None]).sum(0), int((norms > 0).sum())


def test_anisotropy_of_stages_of_two_widths_in_one_batch_equals_numpy_per_layer():
    """Layers of two widths in one batch (stages) are folded each on its own grid, the float32 tokens taken in
    float64, short vectors counted and zero ones not: every layer's sum and count are numpy's."""
    batches = [_stage_batch(seed, n) for seed, n in ((0, 4), (1, 3))]
    reducer = AnisotropyReducer()
    for batch in batches:
        reducer.update(batch)
    for layer, centre in {0: 5, 1: 5, 2: 4}.items():
        expected, count = _unit_sum(np.concatenate([b.captures[layer].inputs[:, centre].numpy() for b in batches]))
        assert reducer.sums[layer].dtype == torch.float64 and reducer.count[layer] == count == (7 if layer == 1 else 5)
        np.testing.assert_allclose(reducer.sums[layer].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_a_nan_centre_in_a_batch_of_two_widths_is_refused_naming_image_and_layer_and_changes_nothing():
    reducer = AnisotropyReducer()
    reducer.update(_stage_batch(0, 4))
    before = {l: (s.clone(), reducer.count[l]) for l, s in reducer.sums.items()}
    with pytest.raises(QKHooksError, match=r"image\(s\) \['s1-2'\] at position\(s\) \[2\] .* at layer\(s\) \[2\]"):
        reducer.update(_stage_batch(1, 3, poison=(2, 2)))
    assert all(torch.equal(reducer.sums[l], s) and reducer.count[l] == c for l, (s, c) in before.items())


def test_anisotropy_after_a_merge_that_brought_some_layers_folds_each_layer_as_numpy():
    """A reducer that merged another's layer 0 (a shard whose batches kept only that layer's tokens) and then folds
    layers 0 and 1 of one shape: layer 0 sums both parts, layer 1 starts from this batch (numpy)."""
    g = torch.Generator().manual_seed(5)
    first, second = torch.randn(3, 10, 6, generator=g, dtype=torch.float64), torch.randn(2, 2, 10, 6, generator=g,
                                                                                         dtype=torch.float64)
    meta = {"num_prefix_tokens": 1, "grid": (3, 3)}
    shard = AnisotropyReducer()
    shard.update(BatchCapture(ids=[], meta=meta, layers={0: LayerCapture(0, 3, inputs=first)}, offset=0))
    reducer = AnisotropyReducer()
    reducer.merge(shard)
    reducer.update(BatchCapture(ids=[], meta=meta, layers={l: LayerCapture(l, 2, inputs=second[l]) for l in (0, 1)},
                                offset=3))
    for layer, centres in {0: torch.cat([first[:, 5], second[0, :, 5]]), 1: second[1, :, 5]}.items():
        expected, count = _unit_sum(centres.numpy())
        assert reducer.count[layer] == count
        np.testing.assert_allclose(reducer.sums[layer].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_anisotropy_learns_its_prefix_from_the_first_batch_and_refuses_a_part_of_another_prefix():
    """A reducer made without a prefix count learns it from its first batch: its saved state says so, and a part
    that learnt another count (another model's centre tokens) is refused at the merge, the state left alone."""
    g = torch.Generator().manual_seed(6)
    parts = {}
    for prefix in (1, 5):
        parts[prefix] = AnisotropyReducer()
        x = torch.randn(3, prefix + 9, 6, generator=g, dtype=torch.float64)
        parts[prefix].update(BatchCapture(ids=[], meta={"num_prefix_tokens": prefix, "grid": (3, 3)},
                                          layers={0: LayerCapture(0, 3, inputs=x)}, offset=0))
    one, five = parts[1], parts[5]
    assert (one.num_prefix_tokens, int(one.state_dict()["num_prefix_tokens"])) == (1, 1)
    before = one.sums[0].clone()
    with pytest.raises(QKHooksError, match=r"num_prefix_tokens=5 \(here 1\)"):
        one.merge(five)
    assert torch.equal(one.sums[0], before) and one.count[0] == 3


# ------------------------------------------------------------------------------------ projector.py: _maps
def test_qk_path_maps_of_a_bias_free_layer_from_q_and_k_held_apart_equal_the_dense_x_path():
    """A bias-free layer whose q and k come apart (separate Linears, or a fused qkv's outputs split): each side's
    product takes its own half of the weights and has no offsets to subtract; the maps equal x·u and x·v."""
    model = _vit(seed=11, qkv_bias=False)
    site = qkhooks.sites(model)[1]
    spectrum = qkhooks.spectrum(model)[site.layer]
    projector = QKPathProjector(spectrum, site.weights())
    x = torch.randn(3, 25, 48, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        q, k, _ = site.module.qkv(x).chunk(3, dim=-1)
        query, key = projector.from_linear(q, k)
    ref_q, ref_k = _dense_maps(x, spectrum)
    scale = max(np.abs(ref_q).max(), np.abs(ref_k).max())
    np.testing.assert_allclose(query.double().numpy(), ref_q, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(key.double().numpy(), ref_k, atol=2e-5 * scale, rtol=0)


# ------------------------------------------------------------------------------------ tests/mutation.py: round27
def test_the_round27_module_names_files_and_tests_that_exist_and_round_27s_commit():
    """The harness's module "round27" and its named set ROUND27: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to round 27's one library
    commit (``git rev-list``), and every library file that commit changed is mutated."""
    mutation = _harness()
    files = module_files(mutation, "round27")
    assert mutation.NAMED_SETS["ROUND27"] == mutation.ROUND27 == ("commits:86943fe..bb42916",)
    assert len(commits_in("86943fe..bb42916")) == 1
    changed = library_files_changed("86943fe", "bb42916")
    assert set(changed) == set(files)
