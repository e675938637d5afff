"""Review r36 (hand mutation testing): tests for mutants that the suite let through.

Each test names the mutant it kills (file, line, the change). Every expected value is computed here independently of
the code under test (plain numpy loops, a one-pass reducer, the array handed in), never copied from a run.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from qkhooks.analysis.same_object import same_object_table
from qkhooks.analysis.topk import TopKModes, layer_prefix
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.store.writer import RunWriter
from test_modes import numpy_optimal_object


def _batch(layers: dict[int, tuple[torch.Tensor, torch.Tensor]], offset: int, **meta) -> BatchCapture:
    caps = {l: LayerCapture(l, q.shape[0], query=q, key=k) for l, (q, k) in layers.items()}
    return BatchCapture(ids=[str(offset + i) for i in range(next(iter(layers.values()))[0].shape[0])], meta=meta,
                        layers=caps, offset=offset)


# ------------------------------------------------------------------------------------------- same object, pooled
def test_pooled_same_object_probability_weighs_only_the_modes_that_have_a_value():
    """``p_same_pooled`` is sum sigma p / sum sigma over the modes with a value. A mode whose top images hold no object
    has none; its sigma must not enter the denominator (mutant: same_object.py ``/ w.sum()`` -> ``/ S[:, :modes].sum()``,
    which every existing test missed since all their modes had a value)."""
    prefix, n, heads, modes, top = 1, 8, 2, 2, 4
    objects = np.zeros((n, 2, 2), dtype=np.int16)
    objects[:4] = [[1, 1], [2, 2]]  # images 0-3: object 1 on top, 2 below; images 4-7: background only
    upper, lower = np.array([0, 1, 1, 0, 0.0]), np.array([0, 0, 0, 1, 1.0])
    q, k = np.zeros((n, heads, modes, 5)), np.zeros((n, heads, modes, 5))
    same_count = {(0, 0): 4, (0, 1): 2, (1, 0): 0}
    for (h, m), c in same_count.items():
        for i in range(n):
            q[i, h, m] = upper * ((1 + i) if i < 4 else 0.1)  # images 0-3 rank first
            k[i, h, m] = upper if (i < c or i >= 4) else lower
    for i in range(n):  # mode (1, 1): its best images are 4-7, which hold no object
        q[i, 1, 1] = upper * ((10 + i) if i >= 4 else 0.1)
        k[i, 1, 1] = upper
    reducer = TopKModes(k=top, num_prefix_tokens=prefix, map_dtype="float32")
    reducer.update(_batch({3: (torch.tensor(q), torch.tensor(k))}, 0, num_prefix_tokens=prefix))
    S = np.array([[3.0, 1.0], [1.0, 2.0]])
    row = same_object_table(reducer.state_dict(), objects, {3: {"S": S}}, prefix, top=top, sign=1)["rows"][0]

    # reference: rank the images by the paper's score with plain loops, then optimal objects by numpy
    labels = objects.reshape(n, -1)
    p = np.full((heads, modes), np.nan)
    for h in range(heads):
        for m in range(modes):
            score = [max(0.0, q[i, h, m, prefix:].max()) * max(0.0, k[i, h, m, prefix:].max()) for i in range(n)]
            best = sorted(range(n), key=lambda i: (-score[i], i))[:top]
            pairs = [(numpy_optimal_object(q[i, h, m, prefix:], labels[i]),
                      numpy_optimal_object(k[i, h, m, prefix:], labels[i]))
                     for i in best]
            pairs = [(a, b) for a, b in pairs if a > 0 and b > 0]
            if pairs:
                p[h, m] = np.mean([a == b for a, b in pairs])
    assert np.isnan(p[1, 1]) and np.isfinite(p[[0, 0, 1], [0, 1, 0]]).all()
    np.testing.assert_allclose(np.asarray(row["per_mode"], dtype=float), p, equal_nan=True)
    has = np.isfinite(p)
    assert row["p_same_pooled"] == pytest.approx(float((S * np.nan_to_num(p))[has].sum() / S[has].sum()))
    assert row["modes_with_value"] == int(has.sum())


# -------------------------------------------------------------------------------------- top-k per-layer prefixes
def _two_layer_maps(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # layer 0: one prefix token + 9 patches; layer 1: no prefix token, 10 patches (TimeSformer's time attention,
    # a layer whose own geometry says 0 while the run's first layer has a class token)
    return {l: (torch.randn(n, 2, 3, 10, generator=g), torch.randn(n, 2, 3, 10, generator=g)) for l in (0, 1)}


META = {"num_prefix_tokens": 1, "prefix_tokens": {0: 1, 1: 0}}


def test_merged_topk_keeps_the_prefix_of_a_layer_only_the_other_part_saw():
    """A merge equals the one pass, including each layer's prefix count (``layer_prefix``), which the analyses read to
    cut the prefix tokens off the kept maps (mutant: topk.py ``self.prefixes.update(other.prefixes)`` in ``merge``
    dropped: the merged state said -1 for layer 1, and readers fell back to the run's 1)."""
    maps = _two_layer_maps(6, 0)
    one_pass = TopKModes(k=3, map_dtype="float32")
    one_pass.update(_batch({0: (maps[0][0][:3], maps[0][1][:3])}, 0, **META))
    one_pass.update(_batch({l: (q[3:], k[3:]) for l, (q, k) in maps.items()}, 3, **META))

    first, second = TopKModes(k=3, map_dtype="float32"), TopKModes(k=3, map_dtype="float32")
    first.update(_batch({0: (maps[0][0][:3], maps[0][1][:3])}, 0, **META))
    second.update(_batch({l: (q[3:], k[3:]) for l, (q, k) in maps.items()}, 3, **META))
    first.merge(second)

    want, got = one_pass.state_dict(), first.state_dict()
    assert got["layer_prefix"].tolist() == want["layer_prefix"].tolist() == [1, 0]
    assert layer_prefix(got, 1, default=int(got["num_prefix_tokens"])) == 0
    for name in ("score", "index", "query", "key"):
        np.testing.assert_array_equal(got[name], want[name])


def test_a_loaded_topk_state_keeps_a_layer_whose_prefix_is_zero():
    """Loading a state and saving it again (a resume that checkpoints before its next batch, ``from_state``) keeps
    every layer's prefix, 0 included (mutant: topk.py ``load_state_dict`` ``if p >= 0`` -> ``if p > 0``)."""
    maps = _two_layer_maps(4, 1)
    reducer = TopKModes(k=2, map_dtype="float32")
    reducer.update(_batch(maps, 0, **META))
    saved = reducer.state_dict()
    assert saved["layer_prefix"].tolist() == [1, 0]
    again = TopKModes.from_state(reducer.saved_state()).state_dict()
    assert again["layer_prefix"].tolist() == [1, 0]
    assert layer_prefix(again, 1, default=int(again["num_prefix_tokens"])) == 0


# ------------------------------------------------------------------------------------------ writer checkpoints
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_checkpoint_holds_the_state_as_it_was_when_queued(tmp_path, monkeypatch, kind):
    """``write_checkpoint`` copies the arrays when it is called: a reducer keeps updating its buffers in place while the
    writer thread is behind, and the checkpoint claims the images committed when it was queued (mutants: writer.py
    ``np.array(v, copy=True)`` -> ``v`` and ``v.detach().cpu().clone()`` -> ``v.detach().cpu()``). The writer thread is
    held before it writes the checkpoint, so the in-place update surely comes first."""
    gate = threading.Event()
    original = RunWriter._do_checkpoint

    def held(self, states):
        assert gate.wait(30)
        original(self, states)

    monkeypatch.setattr(RunWriter, "_do_checkpoint", held)
    buffer = np.arange(4.0) if kind == "numpy" else torch.arange(4.0, dtype=torch.float64)
    queued = np.array(buffer, copy=True)
    with RunWriter(tmp_path / "c.h5", attrs={"model": "m", "config": "{}"}, dtype="float32") as w:
        w.write_batch(["a", "b"], {"v": torch.zeros(2, 3)})
        w.write_checkpoint({"r": {"sums": buffer}})
        buffer += 100.0  # the reducer's next batch, folded in place
        gate.set()
        images, states = w.checkpoint()
    assert images == 2
    np.testing.assert_array_equal(states["r"]["sums"], queued)


# ------------------------------------------------------------------------------------ centre embeddings' limit
def test_centre_embeddings_keep_exactly_the_first_max_images_when_a_batch_crosses_the_limit():
    """``CentreEmbeddings(max_images=m)`` keeps the first m images' unit centre embeddings, also when the limit falls
    inside a batch (mutant: anisotropy.py ``z = z[:room].double()`` -> ``z = z.double()``: the batch that crosses the
    limit was kept whole; the suite's batches of 3, 2, 4 met its limit of 9 exactly at a batch's end)."""
    from qkhooks.analysis.anisotropy import CentreEmbeddings

    grid, prefix, width, limit = (3, 3), 1, 5, 4
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(9, prefix + grid[0] * grid[1], width, generator=g, dtype=torch.float64)
    reducer = CentreEmbeddings(grid=grid, max_images=limit)
    for lo in (0, 3, 6):  # batches of 3: the limit of 4 falls inside the second one
        batch = BatchCapture(ids=[str(lo + i) for i in range(3)], meta={"num_prefix_tokens": prefix, "grid": grid},
                             layers={2: LayerCapture(layer=2, batch_size=3, inputs=tokens[lo:lo + 3])}, offset=lo)
        reducer.update(batch)
    centre = prefix + (grid[0] // 2) * grid[1] + grid[1] // 2  # the centre patch of a 3 x 3 grid, after the CLS token
    want = tokens[:limit, centre].numpy()
    want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    vectors = reducer.state_dict()["vectors"]
    assert vectors.shape == (limit, 1, width)
    np.testing.assert_allclose(vectors[:, 0], want, rtol=1e-6)


# -------------------------------------------------------------------------------------------- repair's checkpoint
def test_a_repair_drops_a_checkpoint_whose_images_lost_one_even_when_enough_images_are_left(tmp_path):
    """A checkpoint of the first 2B images is kept by a repair only when those very images are the copy's first 2B.
    Here one of them is lost while more than 2B images survive (the checkpoint is older than the last batch), so the
    copy's first 2B images are not the ones the reducers saw: the checkpoint must go (mutant: repair.py
    ``_copy_states`` without ``not np.array_equal(keep[:images], np.arange(images))``, which then copied it)."""
    from test_checksum import batches
    from test_verify_run import flip_in_chunk

    from qkhooks.store.format import read_checkpoint
    from qkhooks.store.repair import repair

    run, fixed = tmp_path / "run.h5", tmp_path / "fixed.h5"
    written = batches(3)
    with RunWriter(run, checksum=True) as writer:
        for ids, arrays in written[:2]:
            writer.write_batch(ids, arrays)
        writer.write_checkpoint({"r": {"s": np.ones(2)}})
        per_batch = len(written[0][0])
        checkpointed = 2 * per_batch
        assert writer.checkpoint()[0] == checkpointed
        writer.write_batch(*written[2])
    lo, hi = flip_in_chunk(run, "labels", chunk=0)
    assert lo < checkpointed and 3 * per_batch - (hi - lo) >= checkpointed  # enough images left, one of the 2B lost
    report = repair(run, fixed)
    assert report.lost == list(range(lo, hi))
    assert report.states == []
    assert read_checkpoint(fixed, None) is None


# ------------------------------------------------------------------------------- a top-k state naming row n
class _MapsRun:
    """The parts of a RunReader that the modes analysis reads to pick its top-k state: a saved state, the stored
    maps (numpy arrays index like RunArrays) and the image count."""

    def __init__(self, query: np.ndarray, key: np.ndarray, saved: dict, layer: int, prefix: int = 1):
        self._maps, self._saved, self.n, self.mode_layers = {layer: (query, key)}, saved, len(query), [layer]
        self._prefix = prefix

    def geometry(self, layer):
        from qkhooks.access import LayerGeometry

        tokens = self._maps[layer][0].shape[-1]
        return LayerGeometry(layer, None, self._prefix, tokens, tokens, None, self._prefix, 2, 6)

    def state(self, name, default=None):
        return self._saved if name == "topk_modes" else default

    def query(self, layer):
        return self._maps[layer][0]

    def key(self, layer):
        return self._maps[layer][1]


def test_the_modes_analysis_does_not_trust_a_top_k_state_that_names_the_row_just_past_the_run():
    """A saved top-k state whose largest image index equals the run's image count names a row the run does not have
    (indices 0 .. n - 1): its indices are not the file's rows, so the state is recomputed from the stored maps
    (mutant: modes.py ``if past >= int(run.n)`` -> ``if past > int(run.n)``, which took such a state as it was; the
    suite's broken merge named rows far past the end)."""
    from qkhooks.analysis.modes import _topk_state

    prefix, n, layer = 1, 4, 0
    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(2, n, 2, 3, 6, generator=g).unbind(0)
    shifted = TopKModes(k=2)  # the same images numbered from 1: the last one is row n, one past the run's rows
    shifted.update(_batch({layer: (query, key)}, 1, num_prefix_tokens=prefix))
    saved = shifted.state_dict()
    assert int(saved["index"].max()) == n and int(saved["images"]) == n
    run = _MapsRun(query.numpy(), key.numpy(), saved, layer, prefix)
    state, source = _topk_state(run, None, None, prefix)
    assert source.endswith("recomputed from the stored maps")
    assert 0 <= int(state["index"].max()) < n
    # the recomputed ranking is the paper's score over the patch tokens, lowest index first on ties
    q, k = query.numpy()[..., prefix:], key.numpy()[..., prefix:]
    for h in range(2):
        for m in range(3):
            score = np.maximum(q[:, h, m].max(-1), 0) * np.maximum(k[:, h, m].max(-1), 0)
            want = sorted(range(n), key=lambda i: (-float(score[i]), i))  # k=8 slots hold all n images
            got = layer_state_index(state, layer, h, m)
            assert got[got >= 0].tolist() == want


def layer_state_index(state, layer, head, mode):
    from qkhooks.analysis.topk import layer_state

    return layer_state(state, layer)["index"][head, mode, 0]


# ------------------------------------------------------------------------------ BFD position means, merged
def test_position_means_merged_into_an_empty_reducer_leave_the_part_unchanged_and_keep_adding():
    """``merge`` folds another part into this reducer and leaves that part as it was: a reducer that had no sum for a
    layer must take a copy of the part's, not the part's own tensor, which its next update adds to in place
    (mutant: bfd_reducers.py ``_add`` ``total.clone()`` -> ``total``: the part's means then changed with the merged
    reducer's later batches). Reference: per-position means over the images in numpy."""
    from qkhooks.analysis.bfd_reducers import PositionMeans

    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(7, 5, 3, generator=g, dtype=torch.float64)  # 7 images, CLS + 2 x 2 patches, width 3

    def batch(lo, hi):
        return BatchCapture(ids=[str(i) for i in range(lo, hi)], meta={"num_prefix_tokens": 1, "grid": (2, 2)},
                            layers={0: LayerCapture(layer=0, batch_size=hi - lo, inputs=tokens[lo:hi])}, offset=lo)

    part = PositionMeans()
    part.update(batch(0, 3))
    merged = PositionMeans()
    merged.merge(part)
    merged.update(batch(3, 7))
    np.testing.assert_allclose(part.means()[0].numpy(), tokens[:3].numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.means()[0].numpy(), tokens.numpy().mean(0), rtol=1e-12)
