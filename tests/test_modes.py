"""Semantic modes (Pan et al. Fig. 4, 5, S3): top-k reducer, anisotropy, same object, figures, run analysis, CLI."""

from __future__ import annotations

import csv
import math
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import qkhooks
from qkhooks.analysis.modes import (
    AnisotropyReducer,
    Panel,
    TopKModes,
    analyze_modes,
    format_summary,
    anisotropy_from_state,
    anisotropy_table,
    grid_layout,
    infer_prefix_tokens,
    layer_state,
    load_images,
    optimal_objects,
    overlay,
    plot_overlay_grid,
    relative_cosine,
    same_object_probability,
    same_object_table,
    signed_scores,
    top_images,
)
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError
from conftest import TINY_MODELS


# ------------------------------------------------------------------------------------------ references
def brute_force(query: np.ndarray, key: np.ndarray, prefix: int, k: int):
    """Every image scored by plain loops, sorted by (score desc, index asc); per (h, m, sign) the first k."""
    n, heads, modes, _ = query.shape
    out = {}
    for h in range(heads):
        for m in range(modes):
            for sign in (1, -1):
                scored = []
                for i in range(n):
                    q = [sign * float(v) for v in query[i, h, m, prefix:]]
                    kk = [sign * float(v) for v in key[i, h, m, prefix:]]
                    scored.append((max(0.0, max(q)) * max(0.0, max(kk)), i))
                scored.sort(key=lambda t: (-t[0], t[1]))
                out[h, m, sign] = scored[:k]
    return out


def fake_batch(layers: dict[int, tuple[torch.Tensor, torch.Tensor]], offset: int, **meta) -> BatchCapture:
    caps = {l: LayerCapture(l, q.shape[0], query=q, key=k) for l, (q, k) in layers.items()}
    return BatchCapture(ids=[], meta=meta, layers=caps, offset=offset)


def feed(reducer, query: torch.Tensor, key: torch.Tensor, sizes, start: int = 0, layer: int = 0, **meta):
    lo = start
    for size in sizes:
        reducer.update(fake_batch({layer: (query[lo:lo + size], key[lo:lo + size])}, lo, **meta))
        lo += size
    return reducer


def tied_maps(n: int = 12, heads: int = 2, modes: int = 3, tokens: int = 10, prefix: int = 1, seed: int = 0):
    """Maps drawn from a few integer patterns, so many images tie; the prefix token is huge (must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-3, 4, (4, heads, modes, tokens), generator=g).float()
    pick = torch.randint(0, 4, (n,), generator=g)
    q = patterns[pick].clone()
    k = patterns[torch.randint(0, 4, (n,), generator=g)].clone()
    q[..., :prefix] = 100.0
    k[..., :prefix] = -100.0
    return q, k


def assert_matches_brute(reducer: TopKModes, query: np.ndarray, key: np.ndarray, prefix: int, layer: int = 0, map_tol: float = 0.0):
    ref = brute_force(query, key, prefix, reducer.k)
    for (h, m, sign), expected in ref.items():
        got = reducer.top(layer, h, m, sign)
        assert got["index"].tolist() == [i for _, i in expected], (h, m, sign)
        np.testing.assert_allclose(got["score"], [s for s, _ in expected], rtol=1e-5, atol=1e-6)
        for rank, i in enumerate(got["index"]):
            np.testing.assert_allclose(got["query"][rank], sign * query[i, h, m], rtol=map_tol, atol=map_tol)
            np.testing.assert_allclose(got["key"][rank], sign * key[i, h, m], rtol=map_tol, atol=map_tol)


# ------------------------------------------------------------------------------------------ top-k
@pytest.fixture(params=["entering rows", "every candidate's rows"])
def fold_path(request, monkeypatch):
    """Both ways a fold copies maps: the entering images' rows only (the CPU's) and every candidate's rows (an
    accelerator's, fixed shapes); a test that takes this fixture runs each, with the same expectations."""
    from qkhooks.analysis import topk

    monkeypatch.setattr(topk, "_entrants_only", lambda device: request.param == "entering rows")
    return request.param


def test_a_fold_copies_only_entering_rows_on_the_cpu_and_every_candidate_elsewhere():
    from qkhooks.analysis.topk import _entrants_only

    assert _entrants_only(torch.device("cpu")) and not _entrants_only(torch.device("cuda"))
    assert not _entrants_only(torch.device("meta"))


@pytest.mark.parametrize("tiny", [TINY_MODELS[0], TINY_MODELS[3]], ids=lambda t: t.name)
def test_topk_on_a_real_recording_equals_brute_force(tiny, fold_path):
    """Tiny ViT (1 prefix token) and DINOv2 with registers (5): streamed top-k == sorting all images."""
    model = tiny.model()
    reducer = TopKModes(k=3, map_dtype="float32")  # prefix inferred from the token count
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}
    with qkhooks.record(model, modes=4, sinks=[reducer]) as run:
        for b, seed in ((3, 1), (2, 2), (4, 3)):
            run(tiny.images(b, seed))
            for l in seen:
                seen[l].append((run.query[l].clone(), run.key[l].clone()))
    assert reducer.num_prefix_tokens == tiny.prefix and reducer.images == 9
    for l, parts in seen.items():
        q = torch.cat([p[0] for p in parts]).double().numpy()
        k = torch.cat([p[1] for p in parts]).double().numpy()
        assert_matches_brute(reducer, q, k, tiny.prefix, layer=l, map_tol=1e-6)


def test_topk_ties_signs_and_prefix_on_constructed_maps(fold_path):
    q, k = tied_maps()
    # image 5: both maxima negative for sign +1: the product would be positive, the score must be 0
    q[5, 0, 0, 1:], k[5, 0, 0, 1:] = -torch.arange(1, 10).float(), -2 * torch.arange(1, 10).float()
    reducer = feed(TopKModes(k=4, num_prefix_tokens=1, map_dtype="float32"), q, k, [5, 1, 6])
    assert_matches_brute(reducer, q.numpy(), k.numpy(), prefix=1)
    score = signed_scores(q[5:6], k[5:6], 1)[0, 0, 0]
    assert score.tolist() == [0.0, 9.0 * 18.0]  # max(0, -1) * max(0, -2) = 0, not (-1) * (-2)
    minus = reducer.top(0, 0, 0, -1)
    assert minus["index"][0] == 5 and minus["score"][0] == 162.0
    # ties are really present and resolved by the lower index
    ref = brute_force(q.numpy(), k.numpy(), 1, 12)
    assert any(len({s for s, _ in v}) < len(v) for v in ref.values())


def brute_force_best_sign(query: np.ndarray, key: np.ndarray, prefix: int):
    """Per (h, m): every image once, scored by its better sign (ties: +1), sorted by (score desc, index asc)."""
    n, heads, modes, _ = query.shape
    out = {}
    for h in range(heads):
        for m in range(modes):
            scored = []
            for i in range(n):
                q, kk = query[i, h, m, prefix:].astype(np.float64), key[i, h, m, prefix:].astype(np.float64)
                plus = max(0.0, q.max()) * max(0.0, kk.max())
                minus = max(0.0, -q.min()) * max(0.0, -kk.min())
                scored.append((max(plus, minus), i, 1 if plus >= minus else -1))
            scored.sort(key=lambda t: (-t[0], t[1]))
            out[h, m] = scored
    return out


def test_topk_fewer_images_than_k_and_both_signs_union(fold_path):
    q, k = tied_maps(n=3)
    reducer = feed(TopKModes(k=5, num_prefix_tokens=1), q, k, [2, 1])
    for sign in (1, -1):
        assert len(reducer.top(0, 1, 2, sign)["index"]) == 3  # empty slots are not reported
    both = reducer.top(0, 1, 2, "both")
    expected = brute_force_best_sign(q.numpy(), k.numpy(), 1)[1, 2]
    assert list(zip(both["index"].tolist(), both["sign"].tolist())) == [(i, sg) for _, i, sg in expected]
    assert reducer.top(0, 1, 2, "both", k=2)["index"].tolist() == both["index"][:2].tolist()


@pytest.mark.parametrize("maps", ["tied", "gaussian"])
def test_both_signs_lists_each_image_once_with_its_better_sign(maps, fold_path):
    """METHODS A.6/A.7: 'both' ranks images (not (image, sign) pairs) by their better sign; the first k
    distinct images are exact although the state keeps only k per sign."""
    if maps == "tied":
        q, k = tied_maps(n=15, seed=3)
    else:
        g = torch.Generator().manual_seed(4)
        q, k = torch.randn(15, 2, 3, 10, generator=g), torch.randn(15, 2, 3, 10, generator=g)
    reducer = feed(TopKModes(k=4, num_prefix_tokens=1, map_dtype="float32"), q, k, [6, 2, 7])
    ref = brute_force_best_sign(q.numpy(), k.numpy(), 1)
    duplicated = False
    for (h, m), expected in ref.items():
        got = reducer.top(0, h, m, "both")
        assert len(set(got["index"].tolist())) == len(got["index"]) == 4
        assert list(zip(got["index"].tolist(), got["sign"].tolist())) == [(i, sg) for _, i, sg in expected[:4]]
        np.testing.assert_allclose(got["score"], [s for s, _, _ in expected[:4]], rtol=1e-6)
        for rank, (_, i, sg) in enumerate(expected[:4]):
            np.testing.assert_array_equal(got["query"][rank], sg * q[i, h, m].numpy())
            np.testing.assert_array_equal(got["key"][rank], sg * k[i, h, m].numpy())
        assert reducer.top(0, h, m, "both", k=2)["index"].tolist() == got["index"][:2].tolist()
        plus, minus = (set(reducer.top(0, h, m, s)["index"].tolist()) for s in (1, -1))
        duplicated |= bool(plus & minus)  # the per-sign lists do share images: the union would list them twice
    assert duplicated


def test_merge_of_two_halves_equals_one_pass_exactly():
    q, k = tied_maps(n=20, seed=3)
    one = feed(TopKModes(k=4, num_prefix_tokens=1), q, k, [7, 6, 7])
    a = feed(TopKModes(k=4, num_prefix_tokens=1), q[:9], k[:9], [4, 5])
    b = feed(TopKModes(k=4, num_prefix_tokens=1), q, k, [6, 5], start=9)
    b2 = TopKModes(k=4)
    b2.load_state_dict(b.state_dict())
    a.merge(b2)  # through a saved state, in either order
    b.merge(feed(TopKModes(k=4, num_prefix_tokens=1), q[:9], k[:9], [9]))
    for merged in (a, b):
        for key, value in one.state_dict().items():
            np.testing.assert_array_equal(np.asarray(merged.state_dict()[key]), np.asarray(value), err_msg=key)
    with pytest.raises(QKHooksError, match="k="):
        a.merge(TopKModes(k=3))


def test_state_dict_round_trip_and_resume():
    q, k = tied_maps(n=15, seed=5)
    full = feed(TopKModes(k=3, num_prefix_tokens=1), q, k, [5, 5, 5])
    part = feed(TopKModes(k=3, num_prefix_tokens=1), q, k, [5])
    state = part.state_dict()
    assert all(isinstance(v, (np.ndarray, int)) for v in state.values())
    assert state["query"].dtype == np.float16 and state["query"].shape == (1, 2, 3, 2, 3, 10)
    resumed = TopKModes(k=3)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.state_dict()["index"], state["index"])
    feed(resumed, q, k, [5, 5], start=5)
    for key, value in full.state_dict().items():
        np.testing.assert_array_equal(np.asarray(resumed.state_dict()[key]), np.asarray(value), err_msg=key)
    with pytest.raises(QKHooksError, match="k=3"):
        TopKModes(k=8).load_state_dict(state)


def test_prefix_inference_and_errors():
    assert [infer_prefix_tokens(n) for n in (197, 198, 201, 261, 16, 20)] == [1, 2, 5, 5, 0, 4]
    with pytest.raises(QKHooksError, match="num_prefix_tokens"):
        infer_prefix_tokens(1 + 14 * 20)
    with pytest.raises(QKHooksError, match="modes=K"):
        TopKModes().update(BatchCapture(ids=[], meta={}, layers={0: LayerCapture(0, 1)}))
    with pytest.raises(QKHooksError, match="keep_inputs"):
        AnisotropyReducer().update(BatchCapture(ids=[], meta={}, layers={0: LayerCapture(0, 1)}))


# ------------------------------------------------------------------------------------------ anisotropy
def numpy_mean_pairwise_cosine(z: np.ndarray) -> float:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    return float(np.mean([z[i] @ z[j] for i in range(n) for j in range(n) if i != j]))


def test_anisotropy_equals_pairwise_cosines_and_merges():
    g = torch.Generator().manual_seed(0)
    n, tokens, d, prefix = 11, 2 + 16, 6, 2
    x = torch.randn(n, tokens, d, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0, 0, 0, 0, 1.0], dtype=torch.float64)
    centre = prefix + 2 * 4 + 2  # row 2, col 2 of the 4x4 grid
    caps = lambda lo, hi: BatchCapture(ids=[], meta={"num_prefix_tokens": prefix, "grid": (4, 4)}, offset=lo,
                                      layers={3: LayerCapture(3, hi - lo, inputs=x[lo:hi])})
    one, a, b = AnisotropyReducer(), AnisotropyReducer(), AnisotropyReducer()
    for lo, hi in ((0, 4), (4, 11)):
        one.update(caps(lo, hi))
    a.update(caps(0, 4))
    b.update(caps(4, 11))
    a.merge(b)
    expected = numpy_mean_pairwise_cosine(x[:, centre].numpy())
    assert one.centre_token(tokens, {"num_prefix_tokens": prefix, "grid": (4, 4)}) == centre
    assert one.baselines()[3] == pytest.approx(expected, abs=1e-12)
    assert a.baselines()[3] == pytest.approx(expected, abs=1e-12)
    restored = AnisotropyReducer()
    restored.load_state_dict(one.state_dict())
    assert anisotropy_from_state(restored.state_dict())[3] == pytest.approx(expected, abs=1e-12)
    # relative cosine of modes, and the per-layer table (sigma-weighted sum per head, mean over heads)
    cos = np.array([[0.5, 0.1], [0.2, -0.3]])
    S = np.array([[3.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(relative_cosine(cos, 0.25), cos - 0.25)
    table = anisotropy_table({3: {"S": S, "cos": cos}}, {3: 0.25})
    assert table["rows"][0]["cos_weighted"] == pytest.approx(((3 * 0.5 + 0.1) / 4 + (0.2 - 0.3) / 2) / 2)
    assert table["rows"][0]["relative_cos_weighted"] == pytest.approx(table["rows"][0]["cos_weighted"] - 0.25)


def test_anisotropy_on_a_real_recording():
    tiny = TINY_MODELS[1]  # DeiT distilled: 2 prefix tokens, 4x4 grid
    model = tiny.model()
    reducer = AnisotropyReducer()
    inputs = []
    with qkhooks.record(model, modes=None, keep_inputs=True, sinks=[reducer]) as run:
        for seed in (1, 2):
            run(tiny.images(3, seed))
            inputs.append(run.inputs[1].clone())
    z = torch.cat(inputs)[:, 2 + 2 * 4 + 2].double().numpy()
    assert reducer.baselines()[1] == pytest.approx(numpy_mean_pairwise_cosine(z), abs=1e-6)


# ------------------------------------------------------------------------------------------ same object
def test_optimal_object_is_mean_per_area_not_the_peak():
    objects = np.zeros((4, 4), dtype=np.int16)
    objects[:2, :2] = 1  # 4 patches
    objects[0, 2:] = 2  # 2 patches
    objects[3, :] = 3  # 4 patches
    m = np.zeros((4, 4))
    m[0, 0] = 10.0  # object 1: peak 10, sum 10, mean 2.5
    m[0, 2:] = 3.0  # object 2: sum 6, mean 3 -> wins per area
    m[2, :] = 50.0  # background: ignored
    assert optimal_objects(m[None], objects[None]).tolist() == [2]
    assert optimal_objects(-m[None], objects[None]).tolist() == [3]  # all others negative, object 3 is 0
    assert optimal_objects(np.zeros((1, 16)), np.zeros((1, 4, 4), np.int16)).tolist() == [0]
    tie = np.zeros((1, 4, 4))
    assert optimal_objects(tie, objects[None]).tolist() == [1]  # ties: the lowest label


def test_same_object_probability_on_constructed_masks():
    prefix, grid = 2, (4, 4)
    objects = np.zeros((5, *grid), dtype=np.int16)
    objects[:, :2, :2], objects[:, 2:, 2:] = 1, 2  # two objects in every image but the last
    objects[4] = 0
    q = np.zeros((5, prefix + 16))
    k = np.zeros((5, prefix + 16))
    q[:, :prefix] = k[:, :prefix] = 1e3  # prefix tokens never count
    on = lambda label: (objects[0] == label).reshape(-1).astype(float)
    # image 0: both sides pick object 1; image 1: q -> 1, k -> 2; image 2: both 2; image 3: q -> 2, k -> 1
    for i, (a, b) in enumerate(((1, 1), (1, 2), (2, 2), (2, 1), (1, 1))):
        q[i, prefix:], k[i, prefix:] = on(a), on(b)
    p, used = same_object_probability(q, k, objects, prefix)
    assert (p, used) == (0.5, 4)  # image 4 has no object and is left out
    with pytest.raises(QKHooksError, match="patch tokens"):
        same_object_probability(q, k, objects[:, :3], prefix)


def test_same_object_table_weights_by_sigma():
    """Two heads x two modes with known per-mode probabilities; layer value = mean over heads of sigma-weighted."""
    prefix = 1
    objects = np.array([[[1, 1], [2, 2]]] * 4, dtype=np.int16)  # 4 images, objects 1 (top) and 2 (bottom)
    top, bottom = np.array([0, 1, 1, 0, 0.0]), np.array([0, 0, 0, 1, 1.0])
    q = np.zeros((4, 2, 2, 5))
    k = np.zeros((4, 2, 2, 5))
    # p(mode) = fraction of images whose key side is on the same object as the query side (query always top)
    same_count = {(0, 0): 4, (0, 1): 2, (1, 0): 0, (1, 1): 1}
    for (h, m), c in same_count.items():
        for i in range(4):
            q[i, h, m] = top * (1 + i)  # distinct scores, no negative side
            k[i, h, m] = top if i < c else bottom
    reducer = feed(TopKModes(k=4, num_prefix_tokens=prefix), torch.tensor(q), torch.tensor(k), [4], layer=2)
    S = np.array([[3.0, 1.0], [1.0, 1.0]])
    table = same_object_table(reducer.state_dict(), objects, {2: {"S": S}}, prefix, top=4, sign=1)
    row = table["rows"][0]
    np.testing.assert_allclose(row["per_mode"], [[1.0, 0.5], [0.0, 0.25]])
    assert row["p_same"] == pytest.approx(((3 * 1.0 + 0.5) / 4 + (0.0 + 0.25) / 2) / 2)
    assert row["p_same_pooled"] == pytest.approx((3 + 0.5 + 0 + 0.25) / 6)
    assert row["p_same_unweighted"] == pytest.approx(1.75 / 4)


def numpy_optimal_object(m: np.ndarray, labels: np.ndarray) -> int:
    """Object (label > 0) with the largest mean map value; lowest label on ties; 0 if none."""
    best, best_val = 0, -np.inf
    for lab in sorted(set(labels.tolist()) - {0}):
        val = m[labels == lab].mean()
        if val > best_val:
            best, best_val = lab, val
    return best


def test_same_object_table_counts_each_image_once():
    """Gaussian maps score high for both signs, so the per-sign lists share images; each image must count once,
    with the maps of its better sign (reference: plain numpy over all images, no reducer)."""
    prefix, n, heads, modes, top = 1, 14, 2, 3, 5
    rng = np.random.default_rng(7)
    q = rng.standard_normal((n, heads, modes, prefix + 9)).astype(np.float32)
    k = rng.standard_normal((n, heads, modes, prefix + 9)).astype(np.float32)
    q[[2, 6, 9]] *= 4  # strong in both signs: each of them tops both per-sign lists
    k[[2, 6, 9]] *= 4
    objects = rng.integers(0, 4, (n, 3, 3)).astype(np.int16)
    objects[:, 0, 0] = 1  # every image has an object
    S = np.sort(rng.uniform(0.5, 3.0, (heads, modes)), axis=1)[:, ::-1]
    reducer = feed(TopKModes(k=8, num_prefix_tokens=prefix, map_dtype="float32"), torch.tensor(q), torch.tensor(k),
                   [5, 9], layer=4)
    table = same_object_table(reducer.state_dict(), objects, {4: {"S": S}}, prefix, top=top)

    ref = brute_force_best_sign(q, k, prefix)
    labels = objects.reshape(n, -1)
    p = np.zeros((heads, modes))
    p_pairs = np.zeros((heads, modes))  # what listing (image, sign) pairs would give
    for (h, m), ranked in ref.items():
        hits = [numpy_optimal_object(sg * q[i, h, m, prefix:], labels[i]) == numpy_optimal_object(sg * k[i, h, m, prefix:], labels[i])
                for _, i, sg in ranked[:top]]
        p[h, m] = np.mean(hits)
        pairs = sorted(((s, i, -sg) for sg in (1, -1) for s, i in brute_force(q, k, prefix, 8)[h, m, sg]),
                       key=lambda t: (-t[0], t[1], t[2]))[:top]
        p_pairs[h, m] = np.mean([numpy_optimal_object(-nsg * q[i, h, m, prefix:], labels[i])
                                 == numpy_optimal_object(-nsg * k[i, h, m, prefix:], labels[i]) for _, i, nsg in pairs])
    assert not np.allclose(p, p_pairs)  # the data really tells the two apart
    row = table["rows"][0]
    np.testing.assert_allclose(row["per_mode"], p)
    assert np.array_equal(row["images_used"], np.full((heads, modes), top))
    w = S / S.sum(1, keepdims=True)
    assert row["p_same"] == pytest.approx(float(np.mean((w * p).sum(1))))
    assert row["p_same_unweighted"] == pytest.approx(float(p.mean()))


# ------------------------------------------------------------------------------------------ figures
def test_overlay_puts_query_in_red_and_key_in_cyan():
    qg = np.array([[1.0, 0], [0, 0]])  # top-left
    kg = np.array([[0, 0], [0, 1.0]])  # bottom-right
    img = np.full((40, 40, 3), 0.5, np.float32)
    rgb = overlay(img, qg, kg)
    assert rgb.shape == (40, 40, 3)
    r, c = rgb[2, 2], rgb[37, 37]
    assert r[0] > 0.95 and r[1] < 0.3 and r[2] < 0.3
    assert c[0] < 0.3 and c[1] > 0.95 and c[2] > 0.95
    both = overlay(img, np.ones((2, 2)), np.ones((2, 2)))
    assert both.min() > 0.99  # overlap is white
    assert np.allclose(overlay(img, -qg, -kg), 0.35 * 0.5, atol=1e-6)  # negative parts are not drawn


def test_grid_figure_png_has_expected_size_and_colours(tmp_path):
    grid = (4, 4)
    qg = np.zeros(grid)
    qg[:, 0] = 1.0  # left column
    kg = np.zeros(grid)
    kg[:, 3] = 1.0  # right column
    img = np.full((64, 64, 3), 0.4, np.float32)
    panels = [[Panel(img, qg, kg, "a"), Panel(None, kg, qg, "b")]]
    path = plot_overlay_grid(panels, tmp_path / "g.png", "L6 H4 M1", ["sign +"], panel_px=100)
    width, height, box = grid_layout(1, 2, 100, labels=True)
    png = np.asarray(Image.open(path).convert("RGB")).astype(float) / 255
    assert png.shape == (height, width, 3)
    for col, (red_left, cyan_left) in enumerate(((True, False), (False, True))):
        x, y, w, h = box(0, col)
        cell = png[y + 5:y + h - 5, x + 5:x + w - 5]
        red = (cell[..., 0] > 0.8) & (cell[..., 1] < 0.5) & (cell[..., 2] < 0.5)
        cyan = (cell[..., 0] < 0.5) & (cell[..., 1] > 0.8) & (cell[..., 2] > 0.8)
        assert red.sum() > 200 and cyan.sum() > 200
        xs_red, xs_cyan = np.nonzero(red)[1].mean(), np.nonzero(cyan)[1].mean()
        assert (xs_red < xs_cyan) == red_left and (xs_cyan < xs_red) == cyan_left


def test_load_images_reopens_the_dataset_with_the_stored_preprocessing():
    from qkhooks.data import ImageConfig, open_dataset

    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), resize=32)
    attrs = {"image_config": json.dumps(dataclasses.asdict(cfg)), "data": "samples", "model": "nope:unloadable"}
    dataset = open_dataset("samples", cfg, limit=3)
    ids = dataset.ids[:2] + ["not/in/the/dataset"]
    photos, note = load_images(attrs, ids, [2, 1, 1])
    assert set(photos) == {1, 2} and photos[2] is None and "1 image(s) not found" in note
    pixels = dataset[1]["pixel_values"].numpy() * np.array(cfg.std)[:, None, None] + np.array(cfg.mean)[:, None, None]
    np.testing.assert_allclose(photos[1], np.clip(pixels.transpose(1, 2, 0), 0, 1), atol=1e-6)
    assert load_images({"data": "samples", "model": "nope:unloadable"}, ids, [0])[1].startswith("no photos")


# ------------------------------------------------------------------------------------------ run files
@pytest.fixture(scope="module")
def samples_run(tmp_path_factory):
    """A tiny ViT recorded on the first 5 bundled sample photos (no masks)."""
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset

    tiny = TINY_MODELS[0]
    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=32)
    loaded = LoadedModel(tiny.model(), "tiny-test-vit", cfg)
    path = tmp_path_factory.mktemp("modes") / "run.h5"
    result = record_dataset(loaded, "samples", path, modes=3, batch_size=3, limit=5, progress=False)
    return path, result, cfg


def test_run_state_matches_stored_maps_and_analysis_files(samples_run, tmp_path):
    from qkhooks.store import open_run

    path, result, cfg = samples_run
    with open_run(path) as run:
        state = run.state("topk_modes")
        n, prefix = run.n, run.info["num_prefix_tokens"]
        maps = {l: (run.query(l)[:].astype(np.float64), run.key(l)[:].astype(np.float64)) for l in run.layers}
        assert run.state("anisotropy") is not None
    assert int(state["images"]) == n == 5 and int(state["num_prefix_tokens"]) == prefix == 1
    for l, (q, k) in maps.items():
        st = layer_state(state, l)
        ref = brute_force(q, k, prefix, 8)
        for (h, m, sign), expected in ref.items():
            got = top_images(st, h, m, sign)
            assert got["index"].tolist() == [i for _, i in expected]
            np.testing.assert_allclose(got["score"], [s for s, _ in expected], rtol=2e-3, atol=1e-3)  # float16 maps
    summary = analyze_modes(path, tmp_path / "out", figure_modes=1, image_config=cfg)
    assert summary["topk_source"] == "reducer state saved with the run" and summary["photos"].startswith("photos from")
    saved = json.loads((tmp_path / "out" / "modes.json").read_text())
    assert saved["layers"][0]["heads"][0]["modes"][0]["name"] == "L0 H0 M0"
    for mode in saved["layers"][0]["heads"][0]["modes"]:  # 5 images, each listed once with its better sign
        assert sorted(t["index"] for t in mode["top"]) == list(range(5))
    rows = list(csv.DictReader(open(tmp_path / "out" / "anisotropy.csv")))
    assert {r["layer"] for r in rows} == {"0", "1"} and len(rows) == 2 * (1 + 4 * 3)
    figs = sorted(p.name for p in (tmp_path / "out" / "figures").rglob("*.png"))
    assert figs == sorted(["L0_overview.png", "L1_overview.png"] + [f"L{l}_H{h}_M0.png" for l in (0, 1) for h in range(4)])
    assert "same_object_note" in saved and saved["same_object"] is None  # samples have no object masks
    # a larger k than saved is recomputed from the stored maps, and must agree on the first 8
    again = analyze_modes(path, tmp_path / "k10", k=10, figure_modes=0, overview=False, images=False)
    assert "recomputed" in again["topk_source"]
    first = lambda s: [t["index"] for t in s["layers"][1]["heads"][2]["modes"][1]["top"]]
    assert first(again)[:8] == first(summary)


def test_cli_on_a_masked_run(tmp_path, capsys):
    """`qkhooks analyze modes` on a run with object masks writes the same-object table."""
    from qkhooks.cli import main
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset

    tiny = TINY_MODELS[4]  # hf-vit
    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=32)
    run_path = tmp_path / "voc.h5"
    record_dataset(LoadedModel(tiny.model(), "tiny-hf", cfg), "voc", run_path, modes=2, progress=False)
    code = main(["analyze", "modes", str(run_path), "--out", str(tmp_path / "cli"), "--k", "4", "--layers", "-1",
                 "--figure-modes", "1", "--same-object-top", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "p_same" in text and "wrote" in text
    rows = list(csv.DictReader(open(tmp_path / "cli" / "same_object.csv")))
    assert {r["layer"] for r in rows} == {"1"}
    saved = json.loads((tmp_path / "cli" / "modes.json").read_text())
    assert saved["photos"] == "photos from 'voc', preprocessing stored in the run"  # no model rebuild needed
    assert set(saved["same_object"]["layers"]) == {"1"}
    assert main(["analyze", "modes", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x")]) == 2
    assert "no run file at" in capsys.readouterr().err


def test_cli_on_a_run_recorded_without_modes(tmp_path, capsys):
    """A run recorded with --modes none: a plain message, and no --out folder left behind."""
    from qkhooks.cli import main
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset

    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=32)
    run_path = tmp_path / "nomodes.h5"
    record_dataset(LoadedModel(TINY_MODELS[0].model(), "tiny-test-vit", cfg), "samples", run_path, modes=None,
                   limit=2, progress=False)
    for extra in ([], ["--layers", "-1"]):
        out = tmp_path / "never"
        assert main(["analyze", "modes", str(run_path), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "this run stored no modes (it was recorded with --modes 0/none); record with --modes K" in err
        assert not out.exists()


def test_negative_layers_count_from_the_models_last_block_as_record_does(capsys):
    """Round 38: -1 is the model's last block (model/info's model_layers), as in `qkhooks record`, not the highest
    recorded layer; a block the run did not record, and a run file without the model's blocks, are refused."""
    from qkhooks.analysis.modes import _choose_layers
    from qkhooks.cli import main

    blocks = list(range(6))
    assert _choose_layers([-1, 0], [0, 5], blocks) == [5, 0]
    with pytest.raises(QKHooksError, match=r"layer -2 is the model's block 4 .* did not record; it has layers \[0, 5\]"):
        _choose_layers([-2], [0, 5], blocks)  # block 4 was not recorded
    with pytest.raises(QKHooksError, match=r"layer -1 is the model's block 5 .* it has layers \[0, 3\]"):
        _choose_layers([-1], [0, 3], blocks)  # the highest recorded layer is not the model's last block
    with pytest.raises(QKHooksError, match=r"does not store how many blocks .* the run has layers \[0, 5\]"):
        _choose_layers([-1], [0, 5])  # a run file without model_layers
    with pytest.raises(SystemExit):
        main(["analyze", "modes", "--help"])
    assert "negative indices count from the model's last block" in " ".join(capsys.readouterr().out.split())


def test_anisotropy_weighted_cosine_covers_every_mode_like_the_spectrum(samples_run, tmp_path):
    """The run keeps 3 of 8 modes per head, yet its layer cosine is the model's full sigma-weighted cosine (what
    `qkhooks spectrum` and Fig. 3 show), recomputed here from the model's weights, and modes.json's note says so
    (review 18 F2: it said "over the recorded modes only"); without the full S and cos (older runs) it is NaN with a
    note, never the 3 stored modes renormalised (review 18 F1)."""
    import h5py

    from qkhooks.store import open_run

    path, _, _ = samples_run
    full = qkhooks.spectrum(TINY_MODELS[0].model())
    summary = analyze_modes(path, tmp_path / "a", figure_modes=0, overview=False, images=False)
    with open_run(path) as run:
        stored = {l: run.spectrum(l) for l in run.layers}
    for l, sp in stored.items():
        assert sp["S"].shape[1] == 3 and sp["S_all"].shape[1] == 8
        want = float(full[l].cosine_weighted.mean())
        assert summary["anisotropy"][l]["cos_weighted"] == pytest.approx(want, abs=1e-5)
        kept = float(np.mean((sp["S"] / sp["S"].sum(1, keepdims=True) * sp["cos"]).sum(1)))
        assert abs(kept - want) > 1e-3  # the 3-mode number the note used to describe is another one
    note = summary["anisotropy_note"]
    assert "over all 8 modes of each head" in note and "top 3 per head" in note and "recorded modes only" not in note
    assert json.loads((tmp_path / "a" / "modes.json").read_text())["anisotropy_note"] == note
    old = tmp_path / "old.h5"
    old.write_bytes(path.read_bytes())
    old.with_name(old.name + ".reducers").write_bytes(path.with_name(path.name + ".reducers").read_bytes())  # checkpoint
    with h5py.File(old, "r+") as f:
        for l in stored:
            del f[f"spectrum/L{l}/S_all"], f[f"spectrum/L{l}/cos_all"]
    summary = analyze_modes(old, tmp_path / "b", figure_modes=0, overview=False, images=False)
    for l, sp in stored.items():
        assert math.isnan(summary["anisotropy"][l]["cos_weighted"])
        assert "sigma-weighted cosine over all modes is unknown" in summary["anisotropy"][l]["cos_weighted_note"]
    assert "there it is NaN" in summary["anisotropy_note"]


def numpy_weighted_cosine(qkv: np.ndarray, heads: int) -> float:
    """METHODS A.2 from a timm block's qkv weight alone: per head the dense SVD of W_q^T W_k, the sigma-weighted
    sum of cos(u_n, v_n) over every mode, then the mean over heads."""
    dim = qkv.shape[1]
    w_q, w_k = qkv[:dim].astype(np.float64), qkv[dim:2 * dim].astype(np.float64)
    d_k = dim // heads
    per_head = []
    for h in range(heads):
        rows = slice(h * d_k, (h + 1) * d_k)
        U, S, Vt = np.linalg.svd(w_q[rows].T @ w_k[rows])
        per_head.append(float((S * np.einsum("dn,nd->n", U, Vt)).sum() / S.sum()))
    return float(np.mean(per_head))


def test_a_run_without_the_anisotropy_state_still_reports_each_layers_weighted_cosine(tmp_path):
    """A run without the anisotropy reducer's state (recorded with no reducers, as a run stopped before its first
    checkpoint has none) left out every layer's cos_weighted, which needs only the stored spectrum: it is there now,
    equal to a dense SVD of the model's weights and to the same run's value with the state; only the baseline and
    relative_cos_weighted are left out, and the note says why (review 49, a differential fuzz of the analysis)."""
    from qkhooks.analysis.recipes import default_reducers
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset

    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize=32)
    model = TINY_MODELS[0].model()
    want = {l: numpy_weighted_cosine(block.attn.qkv.weight.detach().numpy(), block.attn.num_heads)
            for l, block in enumerate(model.blocks)}
    summaries = {}
    for name, reducers in (("with", default_reducers(3, [], False)), ("without", [])):
        path = tmp_path / f"{name}.h5"
        record_dataset(LoadedModel(model, "tiny-test-vit", cfg), "samples", path, modes=3, batch_size=3, limit=3,
                       progress=False, reducers=reducers)
        summaries[name] = analyze_modes(path, tmp_path / name, figure_modes=0, overview=False, images=False)
    with_state, without = summaries["with"], summaries["without"]
    assert sorted(without["anisotropy"]) == sorted(with_state["anisotropy"]) == sorted(want)
    for l, cos_weighted in want.items():
        assert without["anisotropy"][l]["cos_weighted"] == pytest.approx(cos_weighted, abs=1e-5)
        assert without["anisotropy"][l]["cos_weighted"] == with_state["anisotropy"][l]["cos_weighted"]
        assert set(with_state["anisotropy"][l]) - set(without["anisotropy"][l]) == {"baseline", "relative_cos_weighted"}
        for head in without["layers"][l]["heads"]:  # no baseline: no mode's relative cosine either
            assert all("relative_cos" not in mode for mode in head["modes"])
    note = without["anisotropy_note"]
    assert note.startswith("the run has no anisotropy reducer state") and "over all 8 modes of each head" in note
    assert "so no baseline, relative_cos_weighted" in note and without["baseline_images"] is None
    assert "\nbaseline, rel_cos_w —: the run has no anisotropy reducer state (" in format_summary(without)
    saved = json.loads((tmp_path / "without" / "modes.json").read_text())
    assert {int(l): r for l, r in saved["anisotropy"].items()} == without["anisotropy"]
    rows = [r for r in csv.DictReader(open(tmp_path / "without" / "anisotropy.csv")) if r["head"] == "mean"]
    header = next(csv.reader(open(tmp_path / "with" / "anisotropy.csv")))
    assert next(csv.reader(open(tmp_path / "without" / "anisotropy.csv"))) == header
    assert [float(r["cos"]) for r in rows] == pytest.approx([want[l] for l in sorted(want)], abs=1e-5)
    assert all(r["baseline"] == r["relative_cos"] == "nan" for r in rows)


# ------------------------------------------------------------------------------------------ random bands (plots.py)
def test_weighted_cosine_null_sd_matches_monte_carlo():
    """Var(sum_n w_n cos_n) = sum w^2 / d per head, / H^2 summed over heads for the head mean: checked against
    random directions (independent per mode) and random orthonormal frames (the SVD's U, V)."""
    from qkhooks.plots import weighted_cosine_null_sd

    rng = np.random.default_rng(0)
    heads, modes, d, n = 3, 6, 24, 4000
    S = np.sort(rng.uniform(0.1, 3.0, (heads, modes)), axis=1)[:, ::-1]
    S[0] = [5.0, 1, 0.5, 0.2, 0.1, 0.05]  # one very uneven head
    w = S / S.sum(1, keepdims=True)
    sd_head, sd_mean = weighted_cosine_null_sd(S, d)
    unit = lambda x, axis: x / np.linalg.norm(x, axis=axis, keepdims=True)
    independent = (unit(rng.standard_normal((n, heads, modes, d)), -1) * unit(rng.standard_normal((n, heads, modes, d)), -1)).sum(-1)
    frames = (np.linalg.qr(rng.standard_normal((n, heads, d, modes)))[0]
              * np.linalg.qr(rng.standard_normal((n, heads, d, modes)))[0]).sum(-2)
    for cos in (independent, frames):
        head = (w * cos).sum(-1)  # (n, H)
        mean = head.mean(-1)
        np.testing.assert_allclose(head.std(0), sd_head, rtol=0.06)
        assert mean.std() == pytest.approx(sd_mean, rel=0.06)
        assert 0.93 < np.mean(np.abs(mean) <= 1.96 * sd_mean) < 0.97
        assert np.mean(np.abs(mean) <= 1.96 / np.sqrt(d)) > 0.999  # the single-mode band is far too wide here


def test_cosine_plot_draws_the_head_mean_band(monkeypatch, tmp_path):
    import qkhooks.plots as plots
    from qkhooks.spectrum import LayerSpectrum, QKSpectrum

    rng = np.random.default_rng(1)
    heads, modes, d = 3, 4, 16
    layers = []
    for l in (0, 2, 3):
        U = torch.as_tensor(np.linalg.qr(rng.standard_normal((heads, d, modes)))[0])
        V = torch.as_tensor(np.linalg.qr(rng.standard_normal((heads, d, modes)))[0])
        S = torch.as_tensor(np.sort(rng.uniform(0.1, 4.0, (heads, modes)), axis=1)[:, ::-1].copy())
        layers.append(LayerSpectrum(l, U, S, V))
    captured = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: captured.setdefault("fig", fig) and path)
    plots.plot_cosine_by_layer(QKSpectrum(layers, "random"), tmp_path / "c.png")
    ax = captured["fig"].axes[0]
    bars = ax.containers[0]
    for bar, spec in zip(bars, layers):
        S = spec.S.numpy()
        w = S / S.sum(1, keepdims=True)
        half = 1.96 * np.sqrt((w**2).sum() / d) / heads
        assert bar.get_x() + bar.get_width() / 2 == pytest.approx(spec.layer)
        assert bar.get_y() == pytest.approx(-half) and bar.get_height() == pytest.approx(2 * half)
    single = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert sorted(line.get_ydata()[0] for line in single) == pytest.approx([-1.96 / 4, 1.96 / 4])
    import matplotlib.pyplot as plt

    plt.close(captured["fig"])


@pytest.mark.parametrize("images", [1, 5])
def test_topk_keeps_the_same_images_and_maps_from_maps_that_share_one_block_per_image(images, fold_path):
    """The q/k path hands a fused qkv's query and key maps out as views of one (B, 2H, K, N) block per image; the
    top-k reducer reads their rows in place. Its state equals the one from contiguous copies of the same maps, bit
    for bit, and so does the state from maps whose image blocks are not contiguous (heads and modes swapped: read
    through a copy); both equal a direct numpy ranking by the paper's score."""
    from qkhooks.analysis.topk import TopKModes
    from qkhooks.results import BatchCapture, LayerCapture

    h, m, n, prefix = 3, 4, 9, 1
    block = torch.randn(images, 2 * h, m, n, generator=torch.Generator().manual_seed(images))
    query, key = block[:, :h], block[:, h:]
    swapped = block.transpose(1, 2).contiguous().transpose(1, 2)  # same values, image blocks strided inside

    def state(q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        reducer = TopKModes(k=2, num_prefix_tokens=prefix, map_dtype="float32")
        reducer.update(BatchCapture(ids=[str(i) for i in range(images)], meta={"num_prefix_tokens": prefix},
                                    captures={0: LayerCapture(layer=0, batch_size=images, query=q, key=k)}, offset=0))
        return reducer.layers[0]

    got = state(query, key)
    for other in (state(query.contiguous(), key.contiguous()), state(swapped[:, :h], swapped[:, h:])):
        assert all(torch.equal(got[name], other[name]) for name in got)
    q, k = query.double().numpy()[..., prefix:], key.double().numpy()[..., prefix:]
    plus = np.maximum(q.max(-1), 0) * np.maximum(k.max(-1), 0)  # (B, H, K)
    best = np.argsort(-plus, axis=0, kind="stable")[:min(2, images)]  # ties to the lower image
    np.testing.assert_array_equal(got["index"][:, :, 0, :min(2, images)].numpy(), best.transpose(1, 2, 0))
    picked = np.take_along_axis(query.numpy(), best[..., None], axis=0)  # (k, H, K, N)
    np.testing.assert_array_equal(got["query"][:, :, 0, :min(2, images)].numpy(), picked.transpose(1, 2, 0, 3))


def test_topk_reads_the_token_rows_of_maps_that_share_a_block_per_image_in_place():
    """The rows the top-k reducer picks from: a view of the maps (no copy) when each image's block is contiguous,
    the step between images read off their stride; a copy otherwise. Row b·step + h·K + m is map (b, h, m)."""
    from qkhooks.analysis.topk import _token_rows

    block = torch.randn(5, 6, 4, 9, generator=torch.Generator().manual_seed(0))
    swapped = block.transpose(1, 2).contiguous().transpose(1, 2)  # image blocks not contiguous
    odd = torch.randn(5 * 110).as_strided((5, 3, 4, 9), (110, 36, 9, 1))  # images 110 floats apart: not whole rows
    for maps, step, view in ((block[:, :3], 24, True), (block[:, 3:], 24, True), (block[:, :3].contiguous(), 12, True),
                             (block[2:3, 3:], 24, True), (block[:, :, 1:3], 12, False), (swapped[:, :3], 12, False),
                             (odd, 12, False)):
        rows, got = _token_rows(maps)
        b, h, m, n = maps.shape
        assert got == step and (rows.data_ptr() == maps.data_ptr()) == view
        assert rows.shape == ((b - 1) * step + h * m, n) if view else rows.shape == (b * h * m, n)
        for i, j, k in np.ndindex(b, h, m):
            assert torch.equal(rows[i * step + j * m + k], maps[i, j, k])



def test_topk_folds_the_layers_of_one_shape_together_exactly_as_each_layer_alone(fold_path):
    """update() ranks and merges all layers of one shape as one stacked tensor (here layers 0, 1, 2 of 10 tokens and
    layer 5 of 7). Its state equals, bit for bit, the one of folding every layer alone, also when a restored state
    and a merged reducer replace the layers' states between batches (the next batch stacks those anew), and
    equals the brute-force ranking of all images."""
    shapes = {0: 10, 1: 10, 2: 10, 5: 7}
    maps = {l: tied_maps(n=20, tokens=n, seed=l) for l, n in shapes.items()}
    sizes, starts = [3, 5, 2, 4], [0, 3, 8, 10]
    together = TopKModes(k=3, num_prefix_tokens=1, map_dtype="float32")
    alone = {l: TopKModes(k=3, num_prefix_tokens=1, map_dtype="float32") for l in shapes}

    def batch(layers, lo, size):
        return fake_batch({l: (maps[l][0][lo:lo + size], maps[l][1][lo:lo + size]) for l in layers}, lo)

    def seen_elsewhere(layers) -> TopKModes:
        other = TopKModes(k=3, num_prefix_tokens=1, map_dtype="float32")
        other.update(batch(layers, 14, 6))
        return other

    for step, (lo, size) in enumerate(zip(starts, sizes)):
        together.update(batch(shapes, lo, size))
        for l in shapes:
            alone[l].update(batch([l], lo, size))
        if step == 1:  # a restored state: plain CPU tensors, no longer the stack's views
            restored = TopKModes(k=3, num_prefix_tokens=1, map_dtype="float32")
            restored.load_state_dict(together.state_dict())
            together = restored
        if step == 2:  # images 14-19, seen elsewhere, merged in
            together.merge(seen_elsewhere(shapes))
            for l in shapes:
                alone[l].merge(seen_elsewhere([l]))
    for l in shapes:
        assert sorted(alone[l].layers) == [l]
        for name in ("score", "index", "query", "key"):
            assert torch.equal(together.layers[l][name], alone[l].layers[l][name]), (l, name)
    for l in shapes:
        assert_matches_brute(together, maps[l][0].double().numpy(), maps[l][1].double().numpy(), 1, layer=l)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_refuses_a_batch_with_a_nan_map_and_scores_half_maps_without_overflow(fold_path, dtype):
    """A batch holding an image whose maps hold NaN (image 0) is refused whole, naming it, never ranked around it
    without a word; the images after it, fed without it, are ranked as numpy ranks them (images 1 and 2 score 0: no
    positive token). Half-precision maps are scored in float32: maxima of 300 give 90000, beyond float16's range."""
    q = torch.full((5, 1, 1, 4), -1.0)
    k = torch.full((5, 1, 1, 4), -1.0)
    q[0, 0, 0, 2] = float("nan")
    q[3, 0, 0, 1:], k[3, 0, 0, 1:] = 300.0, 300.0  # the prefix token (index 0) is left out
    q[4, 0, 0, 1:], k[4, 0, 0, 1:] = 2.0, 3.0
    q, k = q.to(dtype), k.to(dtype)
    reducer = TopKModes(k=3, num_prefix_tokens=1, map_dtype="float32")
    with pytest.raises(QKHooksError, match=r"position\(s\) \[0\] of this batch \(image index \[0\]\) are not finite"):
        feed(reducer, q, k, [3, 2])
    assert reducer.layers == {} and reducer.images == 0
    feed(reducer, q, k, [2, 2], start=1)
    top = reducer.top(0, 0, 0, sign=1)
    qq, kk = q.double().numpy()[:, 0, 0, 1:], k.double().numpy()[:, 0, 0, 1:]
    expected = np.maximum(qq.max(1), 0) * np.maximum(kk.max(1), 0)
    assert top["index"].tolist() == [3, 4, 1]  # ties at 0: the lower index
    np.testing.assert_array_equal(top["score"], expected[[3, 4, 1]])
    assert reducer.layers[0]["score"][0, 0, 0].tolist() == [90000.0, 6.0, 0.0]


def test_topk_folds_the_layers_that_have_both_maps_and_refuses_a_batch_without_any():
    """A layer with query maps but no key maps (a hand-made batch) is left out, not folded half; a batch where no
    layer has both is refused with the fix."""
    q, k = tied_maps(n=4)
    batch = fake_batch({0: (q, k), 1: (q, k)}, 0)
    batch.captures[1].key = None
    reducer = TopKModes(k=2, num_prefix_tokens=1)
    reducer.update(batch)
    assert sorted(reducer.layers) == [0] and reducer.images == 4
    batch.captures[0].query = None
    with pytest.raises(QKHooksError, match="record with modes=K"):
        reducer.update(batch)


def test_topk_takes_each_layers_prefix_from_the_recording_geometry_and_refuses_reduced_keys_without_it():
    """A layer's prefix tokens come from the batch's per-layer geometry (each layer its own: CaiT, stages) over the
    reducer's one count; reduced keys (fewer key tokens) without that geometry are refused, naming both counts."""
    from qkhooks.access import LayerGeometry

    q, k = tied_maps(n=4, tokens=10)
    geometry = {0: LayerGeometry(layer=0, grid=(2, 4), num_prefix_tokens=2, query_tokens=10, key_tokens=10,
                                 key_grid=(2, 4), key_prefix_tokens=2)}
    reducer = TopKModes(k=2, num_prefix_tokens=1)
    reducer.update(fake_batch({0: (q, k), 1: (q, k)}, 0, num_prefix_tokens=1, geometry=geometry))
    assert reducer.prefixes == {0: 2, 1: 1}
    with pytest.raises(QKHooksError, match=r"^layer 0: 6 keys for 10 queries \(spatially reduced keys\) and no "
                                           r"geometry in the batch metadata to tell the key side's prefix tokens; "
                                           r"record with qkhooks.record_dataset, which gives it\.$"):
        TopKModes(k=2, num_prefix_tokens=1).update(fake_batch({0: (q, k[..., :6])}, 0))


def test_topk_reuses_its_stacked_state_while_every_layer_holds_its_view_and_stacks_anew_after_a_merge():
    """Each layer's state is a view of one stacked tensor; the next batch folds into that stack without copying it
    (the state's storage is the stack's), and stacks anew when a merge has replaced a layer's state."""
    q, k = tied_maps(n=6)
    reducer = TopKModes(k=2, num_prefix_tokens=1)
    reducer.update(fake_batch({0: (q[:3], k[:3]), 1: (q[:3], k[:3])}, 0))
    stack = reducer._stacked_state([0, 1], q, int(k.shape[-1]))
    for i, layer in enumerate((0, 1)):
        for name, value in stack.items():
            assert reducer.layers[layer][name].data_ptr() == value[i].data_ptr(), (layer, name)
    other = TopKModes(k=2, num_prefix_tokens=1)
    other.update(fake_batch({1: (q[3:], k[3:])}, 3))
    reducer.merge(other)
    fresh = reducer._stacked_state([0, 1], q, int(k.shape[-1]))
    assert fresh["score"].data_ptr() != stack["score"].data_ptr()
    assert torch.equal(fresh["score"][1], reducer.layers[1]["score"]) and torch.equal(fresh["index"][0], stack["index"][0])


def test_topk_refuses_maps_of_another_rank_or_shape_naming_both():
    """Query and key maps must both be (batch, heads, modes, tokens) with the same first three axes, and a layer's
    later batches must keep its heads, modes and token counts; each refusal names the shapes and changes nothing."""
    from qkhooks.analysis.topk import TopKModes

    reducer = TopKModes(k=2, num_prefix_tokens=1)
    maps = torch.randn(2, 3, 4, 9)
    with pytest.raises(QKHooksError, match=r"must both be .* got \(2, 3, 4\) and \(2, 3, 4, 9\)"):
        reducer._fold(0, maps[..., 0], maps, 0, 1)
    with pytest.raises(QKHooksError, match=r"got \(2, 3, 4, 9\) and \(2, 2, 4, 9\)"):
        reducer._fold(0, maps, maps[:, :2], 0, 1)
    assert reducer.layers == {}
    reducer._fold(0, maps, maps, 0, 1)
    before = {name: value.clone() for name, value in reducer.layers[0].items()}
    for query, key in ((maps[..., :7], maps), (maps, maps[..., :7]), (maps[:, :2], maps[:, :2])):
        with pytest.raises(QKHooksError, match=r"^layer 0: maps of shape .* do not match the earlier \(3, 4\) x 9 tokens; "
                                               r"keep one model, mode count and image size per reducer\.$"):
            reducer._fold(0, query, key, 2, 1)
    assert all(torch.equal(before[name], reducer.layers[0][name]) for name in before)
    restored = TopKModes(k=2, num_prefix_tokens=1)  # a restored state is checked as it is stacked
    restored.load_state_dict(reducer.state_dict())
    with pytest.raises(QKHooksError, match=r"^layer 0: maps of shape \(heads=3, modes=4, tokens=7\) do not match"):
        restored._fold(0, maps[..., :7], maps[..., :7], 2, 1)
