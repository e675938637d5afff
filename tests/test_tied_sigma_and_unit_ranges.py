"""Review round 45 (analysis numbers): each test computes a quantity independently and checks qkhooks against it."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.spectrum import null_modes


def _tied_vit(remix: torch.Tensor | None) -> torch.nn.Module:
    """A tiny timm ViT whose block 0, head 0 has W_q, W_k with orthonormal rows (float32): W_q^T W_k has all its
    sigma equal (1). ``remix`` (d_k x d_k orthogonal) re-mixes the head's query/key space, W_q -> R^T W_q,
    W_k -> R^T W_k, which leaves W_q^T W_k unchanged (METHODS A.1)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1,
                              num_heads=4).eval()
    dim, dk = 32, 8
    g = torch.Generator().manual_seed(3)
    a = torch.linalg.qr(torch.randn(dim, dk, generator=g, dtype=torch.float64))[0].T
    b = torch.linalg.qr(torch.randn(dim, dk, generator=g, dtype=torch.float64))[0].T
    if remix is not None:
        a, b = remix.T @ a, remix.T @ b
    with torch.no_grad():
        w = model.blocks[0].attn.qkv.weight
        w[:dk] = a.float()
        w[dim:dim + dk] = b.float()
    return model


def test_tied_singular_values_are_flagged_as_undetermined_and_left_out_of_the_cosine_counts():
    """Tied sigma fix only the subspace of their modes, not the modes: any rotation R of a tied block (u_n, v_n) ->
    (U R, V R) is an SVD of the same W_q^T W_k, and each mode's cosine u_n . v_n changes with it. Two factorisations
    of one W_q^T W_k (METHODS A.1: the modes are properties of the layer, not of a basis) gave different per-mode
    cosines (head 0's cosines in [-0.13, 0.23] against [-0.09, 0.35] here), which the Fig. S1 histograms and the
    table's cos>band fractions counted as the layer's. They must be flagged like null modes (their vectors are not
    determined by the weights) and left out; the sigma-weighted cosine, a trace over the tied block, stays."""
    remix = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    specs = [qkhooks.spectrum(_tied_vit(r))[0] for r in (None, remix)]
    bilinear = [np.asarray(s.bilinear()[0], np.float64) for s in specs]
    np.testing.assert_allclose(bilinear[0], bilinear[1], atol=1e-5)  # one form W_q^T W_k
    S = np.asarray(specs[0].S)
    np.testing.assert_allclose(S[0], 1.0, atol=1e-6)  # head 0: every sigma tied
    for spec in specs:
        flagged = spec.null_modes
        assert flagged[0].all(), "head 0's tied modes must be flagged: their vectors are not fixed by the weights"
        assert not flagged[1:].any(), "the other heads (random weights, distinct sigma) keep their modes"
    # what is counted is the same for both factorisations (the other heads' cosines; head 0's left out)
    counted = [np.sort(s.non_null_cosines()) for s in specs]
    np.testing.assert_allclose(counted[0], counted[1], atol=1e-6)
    # the weighted cosine is basis-free: sum_n sigma cos_n = trace over the tied block, the same for both
    weighted = [np.asarray(s.cosine_weighted, np.float64) for s in specs]
    np.testing.assert_allclose(weighted[0], weighted[1], atol=1e-6)
    np.testing.assert_allclose(weighted[0][0], np.trace(bilinear[0]) / 8, atol=1e-6)  # (1/d_k) tr(W_q^T W_k)


def test_distinct_sigma_are_not_flagged_as_tied():
    """The tie rule flags sigma within a few float32 ulps of the head's largest only: close but distinct sigma keep
    their modes (a real ViT's closest non-null pair differs by more than 8 ulps: DINOv2-S, 4608 modes)."""
    eps = float(np.finfo(np.float32).eps)
    S = np.array([[1.0, 1.0 - 64 * eps, 0.5, 0.5 - 64 * eps, 0.1]], np.float32)
    assert not null_modes(S, 32).any()
    S_tied = np.array([[1.0, 1.0 - eps, 0.5, 0.4, 0.1]], np.float32)
    np.testing.assert_array_equal(null_modes(S_tied, 32), [[True, True, False, False, False]])
    unsorted = np.array([[0.5, 1.0, 0.5 + eps / 2, 0.2]], np.float32)
    np.testing.assert_array_equal(null_modes(unsorted, 32), [[True, False, True, False]])


def _two_squares(dtype: torch.dtype, on: float, off: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target (top-left 8 x 8) and distractor (centre 8 x 8) masks of a 32 x 32 input, ``on`` inside, ``off`` outside."""
    t = torch.full((1, 32, 32), off, dtype=dtype)
    d = t.clone()
    t[0, :8, :8] = on
    d[0, 16:24, 16:24] = on
    return t, d


def test_odd_one_out_masks_outside_0_1_are_refused_as_such():
    """A mask is a fraction of each pixel (METHODS A.7: background = 1 - target - distractor). 0/255 masks (8-bit PNGs)
    were refused as "overlapping", a wrong reason whose fix (distractor & ~target) does not help; a signed mask (-0.2
    outside the object, e.g. a normalised one) went through without a word, its shares outside [0, 1]: T->T -0.05,
    T->B 1.18 for a softmax row here. Both must be refused, saying the values and the fix."""
    from qkhooks.analysis.preference import odd_one_out_meta
    from qkhooks.errors import QKHooksError

    with pytest.raises(QKHooksError, match=r"outside \[0, 1\].*255") as err:
        odd_one_out_meta(*_two_squares(torch.uint8, 255, 0), (4, 4), 1)
    assert "overlap" not in str(err.value)
    with pytest.raises(QKHooksError, match=r"outside \[0, 1\].*-0.2"):
        odd_one_out_meta(*_two_squares(torch.float32, 1.0, -0.2), (4, 4), 1)
    meta = odd_one_out_meta(*_two_squares(torch.bool, True, False), (4, 4), 1)  # booleans and fractions pass
    np.testing.assert_allclose(meta["pool_masks"][0].sum(0).numpy(), 1.0)


def test_preference_rows_refuse_grids_outside_0_1():
    """The same for grids handed to preference_from_rows directly (a run file's masks/target, a user's grids): a
    negative fraction gave T->T = -0.05 of a softmax row, not a share."""
    from qkhooks.analysis.preference import preference_from_rows
    from qkhooks.errors import QKHooksError

    t = torch.zeros(1, 4, 4)
    d = torch.zeros(1, 4, 4)
    t[0, 0, 0], d[0, 2, 2] = 1.0, 1.0
    rows = torch.softmax(torch.randn(1, 2, 2, 17, generator=torch.Generator().manual_seed(0)), -1)
    v = preference_from_rows(rows, t, d, 1)
    np.testing.assert_allclose(v[..., :3].sum(-1).numpy(), 1.0, atol=1e-6)
    with pytest.raises(QKHooksError, match=r"outside \[0, 1\]"):
        preference_from_rows(rows, t - 0.2 * (t == 0), d, 1)
    with pytest.raises(QKHooksError, match=r"outside \[0, 1\]"):
        preference_from_rows(rows, t.masked_fill(t == 0, float("nan")), d, 1)


def test_preference_reducer_refuses_grids_outside_0_1_before_folding():
    """The streaming reducer checks the batch's grids once (preference_from_rows per layer leaves it to it)."""
    from types import SimpleNamespace

    from qkhooks.analysis.preference import PreferenceReducer
    from qkhooks.errors import QKHooksError

    t = torch.zeros(2, 4, 4)
    d = torch.zeros(2, 4, 4)
    t[:, 0, 0], d[:, 2, 2] = 1.0, 1.0
    rows = torch.softmax(torch.randn(2, 2, 2, 17, generator=torch.Generator().manual_seed(0)), -1)
    cap = SimpleNamespace(attention={"rows": rows})

    def batch(target: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(captures={0: cap}, meta={"target_grid": target, "distractor_grid": d}, ids=None)

    reducer = PreferenceReducer()
    reducer.update(batch(t))
    assert reducer.count == {0: 2}
    with pytest.raises(QKHooksError, match=r"target grid holds values outside \[0, 1\]"):
        reducer.update(batch(t * 255))
    assert reducer.count == {0: 2}  # nothing folded


def test_bfd_mode_level_numbers_of_a_head_with_tied_sigma_are_left_undetermined():
    """BFD's additive (mode-level) head shares sum sigma_n^2 q(n) k(n) over the modes, a sum of products that a
    rotation of a tied block changes: one W_q^T W_k, two factorisations, gave head 0's CP share 0.082 and 0.107 (and
    participation ratios 7.47 and 7.73). The head-level Frobenius shares are basis-free (the logits' own terms) and
    must agree; the mode-level ones must be None, never one basis's number, and left out of the layer's figures."""
    from qkhooks.analysis.bfd import run_bfd

    remix = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = [run_bfd(_tied_vit(r), images, batch_size=6, decode=False, definition="additive") for r in (None, remix)]
    layers = [r["layers"][0] if isinstance(r["layers"], list) else next(iter(r["layers"].values())) for r in results]
    heads = [layer["heads"][0] for layer in layers]
    for a, b in zip(heads[0]["frobenius"]["energy"].values(), heads[1]["frobenius"]["energy"].values()):
        assert a == pytest.approx(b, abs=1e-6)
    for head in heads:
        assert all(v is None for v in head["additive"]["energy"].values())
        assert head["additive"]["label"] == "undetermined" and head["energy"]["CC"] is None  # the chosen definition
        assert head["additive"]["participation_ratio"] is None and head["frobenius"]["participation_ratio"] is None
        assert "tied" in head["undetermined"]
    for other in (1, 2, 3):  # the other heads keep their numbers
        assert layers[0]["heads"][other]["additive"]["energy"]["CC"] is not None
    # the layer's additive figures leave head 0 out: the same for both factorisations
    for key in ("energy", "energy_pooled"):
        got = [layer["additive"][key] if "additive" in layer else layer["averages"]["additive"][key] for layer in layers]
        for t in ("CC", "CP", "PC", "PP"):
            assert got[0][t] == pytest.approx(got[1][t], abs=1e-6)


def test_preference_figure_does_not_claim_a_ci_it_cannot_draw(monkeypatch, tmp_path):
    """With fewer than readings.MIN_UNITS images every 95% CI is NaN (no interval), yet preference.png was titled
    "95% CI" and drew no band at all (the ±1 std spread was dropped for the bands). It must fall back to the ±1 std
    spread and say so; with enough images the CI bands stay."""
    import qkhooks.plots
    from qkhooks.analysis.preference import GROUPS, preference_table, write_preference

    drawn: list[dict] = []
    monkeypatch.setattr(qkhooks.plots, "plot_layer_curves", lambda *a, **k: drawn.append(k) or a[2])
    rng = np.random.default_rng(0)
    for n, has_ci in ((3, False), (8, True)):
        values = rng.dirichlet(np.ones(3), size=(n, 2, 2)).reshape(n, 2, 6) / 2 + 0.0
        table = preference_table({0: values, 1: values[::-1].copy()})
        for g in GROUPS:
            table[g]["ci_low"] = [0.1, 0.1] if has_ci else [float("nan")] * 2
            table[g]["ci_high"] = [0.5, 0.5] if has_ci else [float("nan")] * 2
        write_preference(table, tmp_path / str(n))
        k = drawn[-1]
        if has_ci:
            assert "95% CI" in k["title"] and k["bands"] is not None and k["spread"] is None
        else:
            assert "95% CI" not in k["title"] and "std" in k["title"]
            assert k["bands"] is None and k["spread"] is not None
