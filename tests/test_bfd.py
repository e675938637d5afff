"""Bi-orthogonal Factor Decomposition (METHODS B): planted operators, exact energy bookkeeping, position probes,
two-pass streaming against a direct numpy computation, merging, run files, resume and the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json

import numpy as np
import pytest
import torch

from qkhooks.analysis.bfd import (
    BFDEnergies,
    PositionDecoding,
    PositionMeans,
    paper_claims,
    pass1_path,
    position_factors,
    read_bfd,
    run_bfd,
    summarize,
)
from qkhooks.analysis.bfd_summary import CLAIMS, TERMS
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError
from qkhooks.spectrum import LayerSpectrum, factored_svd
from conftest import TINY_MODELS

RTOL = 1e-8


# ------------------------------------------------------------------------------ independent references
def ridge_r2(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, alpha: float) -> np.ndarray:
    """sklearn's Ridge (unpenalised intercept) with lambda = alpha * trace(centred F^T F) / d; held-out R^2."""
    from sklearn.linear_model import Ridge

    centred = f_train - f_train.mean(0)
    lam = alpha * np.trace(centred.T @ centred) / f_train.shape[1]
    pred = Ridge(alpha=lam, fit_intercept=True, solver="svd").fit(f_train, y_train).predict(f_test)
    return 1 - ((y_test - pred) ** 2).sum(0) / ((y_test - y_test.mean(0)) ** 2).sum(0)


def kfold_position_r2(p: np.ndarray, y: np.ndarray, alpha: float, folds: int = 5) -> np.ndarray:
    """sklearn ridge from P's rows to the coordinates, position i held out in fold i % folds; R^2 over all."""
    fold = np.arange(len(y)) % folds
    pred = np.empty_like(y)
    for f in range(folds):
        train = fold != f
        centred = p[train] - p[train].mean(0)
        lam = alpha * np.trace(centred.T @ centred) / p.shape[1]
        model = __import__("sklearn.linear_model", fromlist=["Ridge"]).Ridge(alpha=lam, fit_intercept=True, solver="svd")
        pred[~train] = model.fit(p[train], y[train]).predict(p[~train])
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def held_out_ids(ids, holdout_every: int) -> np.ndarray:
    """The documented split (DEFINITIONS['decoding']): held out where the first 16 hex digits of sha256(id) are 0
    modulo holdout_every."""
    return np.array([int(hashlib.sha256(str(i).encode()).hexdigest()[:16], 16) % holdout_every == 0 for i in ids])


def numpy_bfd(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, grid=None, prefix: int = 0, holdout_every: int = 5,
              alpha: float = 1e-3, ids=None) -> dict:
    """Everything of METHODS B computed the slow, obvious way: explicit N x N logits of every term, per image.

    ``ids``: the images' ids, which choose the probes' held-out images (default "0", "1", ... as a recording of
    tensors numbers them)."""
    x = np.asarray(x, np.float64)
    n, tokens, d = x.shape
    p = x.mean(0)
    c = x - p
    mu = p.mean(0)
    g, pt = np.broadcast_to(mu, p.shape), p - mu
    side = {"P": lambda i: p, "C": lambda i: c[i], "G": lambda i: g, "T": lambda i: pt}  # T = P - mu
    heads = []
    for wq_h, wk_h in zip(wq, wk):
        m = wq_h.T @ wk_h
        energy = lambda a, b: np.mean([np.sum((side[a](i) @ m @ side[b](i).T) ** 2) for i in range(n)])  # noqa: E731
        total = np.mean([np.sum((x[i] @ m @ x[i].T) ** 2) for i in range(n)])
        frob = {t: energy(t[0], t[1]) for t in TERMS}
        cells = {a + b: energy(a.replace("P", "T"), b.replace("P", "T")) for a in "GPC" for b in "GPC"}
        u_full, s_full, vt_full = np.linalg.svd(m)
        k = wq_h.shape[0]
        u, s, v = u_full[:, :k], s_full[:k], vt_full[:k].T
        mode_frob = {t: np.array([s[j] ** 2 * np.mean([np.sum((side[t[0]](i) @ u[:, j]) ** 2) *
                                                        np.sum((side[t[1]](i) @ v[:, j]) ** 2) for i in range(n)])
                                  for j in range(k)]) for t in TERMS}
        mode_total = s**2 * np.mean([np.sum((x[i] @ u) ** 2, 0) * np.sum((x[i] @ v) ** 2, 0) for i in range(n)], 0)
        q = {"P": ((pt @ u) ** 2).mean(0), "C": ((c @ u) ** 2).mean((0, 1)), "G": (mu @ u) ** 2}
        kk = {"P": ((pt @ v) ** 2).mean(0), "C": ((c @ v) ** 2).mean((0, 1)), "G": (mu @ v) ** 2}
        mode_add = {t: s**2 * q[t[0]] * kk[t[1]] for t in TERMS}
        heads.append({"frob": frob, "total": total, "cells": cells, "mode_frob": mode_frob, "mode_total": mode_total,
                      "mode_add": mode_add, "sigma": s,
                      "add_full": s**2 * ((x @ u) ** 2).mean((0, 1)) * ((x @ v) ** 2).mean((0, 1))})
    out = {"P": p, "heads": heads,
           "position_variance_share": n * np.sum(pt**2) / np.sum((x - mu) ** 2),
           "global_moment_share": tokens * mu @ mu / np.mean(np.sum(x**2, (1, 2)))}
    if grid is not None:
        y = np.stack(np.divmod(np.arange(grid[0] * grid[1]), grid[1]), 1).astype(np.float64)
        held = held_out_ids([str(i) for i in range(n)] if ids is None else ids, holdout_every)
        xp, cp = x[:, prefix:], c[:, prefix:]
        flat = lambda a: a.reshape(-1, d)  # noqa: E731
        ytr, yte = np.tile(y, (int((~held).sum()), 1)), np.tile(y, (int(held.sum()), 1))
        out["r2"] = {"X": ridge_r2(flat(xp[~held]), ytr, flat(xp[held]), yte, alpha),
                     "C": ridge_r2(flat(cp[~held]), ytr, flat(cp[held]), yte, alpha),
                     "P": kfold_position_r2(p[prefix:], y, alpha)}
    return out


def spectra_of(wq: np.ndarray, wk: np.ndarray, layer: int = 0) -> list[LayerSpectrum]:
    u, s, v = factored_svd(torch.as_tensor(wq, dtype=torch.float64), torch.as_tensor(wk, dtype=torch.float64))
    return [LayerSpectrum(layer, u, s, v)]


def batches_of(x: np.ndarray, sizes, layer: int = 0):
    """BatchCaptures over x (n, N, d) in the given batch sizes, with global offsets as a recording gives them."""
    start = 0
    for size in sizes:
        part = torch.as_tensor(x[start : start + size])
        yield BatchCapture(ids=[str(i) for i in range(start, start + size)], meta={},
                           layers={layer: LayerCapture(layer, size, inputs=part)}, offset=start)
        start += size


def stream(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, sizes, *, prefix: int = 0, drop_prefix: bool = False,
           grid=None, holdout_every: int = 5, **summary) -> tuple[dict, list]:
    """Both passes over synthetic tokens through the reducers; returns (result, pass-2 reducers)."""
    means = PositionMeans()
    for b in batches_of(x, sizes):
        means.update(b)
    reducers = [BFDEnergies(spectra_of(wq, wk), means, prefix, drop_prefix)]
    if grid is not None:
        reducers.append(PositionDecoding(means, grid, prefix, holdout_every))
    for b in batches_of(x, sizes):
        for r in reducers:
            r.update(b)
    dec = reducers[1].state_dict() if grid is not None else None
    return summarize(reducers[0].state_dict(), dec, **summary), reducers


def assert_matches_reference(result: dict, ref: dict, layer: int = 0) -> None:
    """Every energy of the streamed result equals the direct numpy computation."""
    entry = next(l for l in result["layers"] if l["layer"] == layer)
    np.testing.assert_allclose(entry["position_variance_share"], ref["position_variance_share"], rtol=RTOL)
    np.testing.assert_allclose(entry["second_moment_shares"]["global_mean"], ref["global_moment_share"], rtol=RTOL)
    for head, want in zip(entry["heads"], ref["heads"]):
        fro = head["frobenius"]
        got = [fro["energy_abs"][t] for t in TERMS] + [fro["energy_abs"]["total"]]
        np.testing.assert_allclose(got, [want["frob"][t] for t in TERMS] + [want["total"]], rtol=RTOL)
        summed = sum(want["frob"].values())
        np.testing.assert_allclose(fro["interference"], (want["total"] - summed) / want["total"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose([fro["energy"][t] for t in TERMS], [want["frob"][t] / summed for t in TERMS], rtol=RTOL)
        cell_sum = sum(want["cells"].values())
        np.testing.assert_allclose([head["three_way"]["cells"][c] for c in want["cells"]],
                                   [v / cell_sum for v in want["cells"].values()], rtol=RTOL)
        modes = head["modes"]
        np.testing.assert_allclose([m["sigma"] for m in modes], want["sigma"], rtol=1e-10)
        me = want["mode_total"]
        np.testing.assert_allclose([m["frobenius"]["share_of_head"] for m in modes], me / me.sum(), rtol=1e-7)
        np.testing.assert_allclose(fro["participation_ratio"], me.sum() ** 2 / (me**2).sum(), rtol=1e-7)
        msum = sum(want["mode_frob"][s] for s in TERMS)
        np.testing.assert_allclose([m["frobenius"]["interference"] for m in modes], (me - msum) / me, rtol=1e-6, atol=1e-9)
        for t in TERMS:
            np.testing.assert_allclose([m["frobenius"]["energy"][t] for m in modes], want["mode_frob"][t] / msum, rtol=1e-7)
            asum = sum(want["mode_add"][s] for s in TERMS)
            np.testing.assert_allclose([m["additive"]["energy"][t] for m in modes], want["mode_add"][t] / asum, rtol=1e-7)
            np.testing.assert_allclose(head["additive"]["energy_abs"][t], want["mode_add"][t].sum(), rtol=1e-7)
        np.testing.assert_allclose([m["additive"]["global_mean_share"] for m in modes],
                                   1 - sum(want["mode_add"].values()) / want["add_full"], rtol=1e-7, atol=1e-12)
        assert head["frobenius"]["mode_ranking"] == list(np.argsort(-me, kind="stable"))
    if "r2" in ref:
        for f in "XPC":
            got = [entry["decoding"][f]["row"], entry["decoding"][f]["col"]]
            np.testing.assert_allclose(got, ref["r2"][f], rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------- constructed data
D, POS, CON, GLOB = 8, [0, 1, 2], [3, 4, 5], 6


def planted(n: int = 12, grid=(3, 4), seed: int = 0, position_scale: float = 1.0, pairs: bool = False) -> tuple:
    """Tokens = positional table T (dims POS, centred over positions) + content Z (dims CON, exactly mean zero
    over images at every position) + a global vector (dim GLOB). Returns x, T, Z."""
    rng = np.random.default_rng(seed)
    tokens = grid[0] * grid[1]
    table = np.zeros((tokens, D))
    table[:, POS] = position_scale * rng.normal(size=(tokens, len(POS)))
    table -= table.mean(0)
    content = np.zeros((n, tokens, D))
    if pairs:  # C_i = +-Z0: every image has the same content energy
        z0 = rng.normal(size=(tokens, len(CON)))
        content[:, :, CON] = np.where(np.arange(n)[:, None, None] % 2 == 0, z0, -z0)
    else:
        content[:, :, CON] = rng.normal(size=(n, tokens, len(CON)))
        content -= content.mean(0)
    x = table + content
    x[:, :, GLOB] += 1.5
    return x, table, content


def reader(dims, seed: int, k: int = 2) -> np.ndarray:
    """A (k, D) projection that reads only the given dims."""
    w = np.zeros((k, D))
    w[:, dims] = np.random.default_rng(seed).normal(size=(k, len(dims)))
    return w


def test_planted_operators_are_recovered_exactly():
    """Heads that read only position or only content on each side are pure CC/CP/PC/PP operators; a head that
    reads only the global direction is PP in the two-way view and pure global mean in the three-way view."""
    x, table, content = planted()
    wq = np.stack([reader(POS, 1), reader(CON, 2), reader(POS, 3), reader(CON, 4), reader([GLOB], 5, 1).repeat(2, 0)])
    wk = np.stack([reader(POS, 6), reader(POS, 7), reader(CON, 8), reader(CON, 9), reader([GLOB], 10, 1).repeat(2, 0)])
    result, _ = stream(x, wq, wk, [5, 4, 3])
    layer = result["layers"][0]
    for head, want in zip(layer["heads"], ["PP", "CP", "PC", "CC", "PP"]):
        for kind in ("frobenius", "additive") if head["head"] < 4 else ("frobenius",):
            shares = head[kind]["energy"]
            np.testing.assert_allclose([shares[t] for t in TERMS], [float(t == want) for t in TERMS], atol=1e-12)
            assert head[kind]["label"] == want
            assert abs(head[kind]["interference"]) < 1e-12
            assert all(m[kind]["label"] == want for m in head["modes"] if m["sigma"] > 1e-9)
    glob = layer["heads"][4]
    assert glob["three_way"]["cells"]["GG"] == pytest.approx(1.0, abs=1e-12)
    assert glob["three_way"]["global_mean_share"] == pytest.approx(1.0, abs=1e-12)
    assert glob["additive"]["energy"]["CC"] is None  # additive leaves mu out: nothing left to share
    assert glob["additive"]["global_mean_share"] == pytest.approx(1.0, abs=1e-12)
    for head in layer["heads"][:4]:
        assert head["three_way"]["global_mean_share"] == pytest.approx(0.0, abs=1e-12)
    assert layer["labels"] == {"CC": 1, "CP": 1, "PC": 1, "PP": 2}
    # the positional share of variance is the table's share, exactly (content is mean zero per position)
    want = len(x) * np.sum(table**2) / (len(x) * np.sum(table**2) + np.sum(content**2))
    assert layer["position_variance_share"] == pytest.approx(want, rel=1e-12)
    assert layer["checks"]["content_mean"] < 1e-14


@pytest.mark.parametrize("planted_pp", [0.7, 0.2])
def test_planted_mixture_share_is_recovered(planted_pp):
    """A head reading position->position and content->content, scaled so that PP carries a chosen share."""
    x, table, content = planted(n=8, pairs=True)
    a, b = reader(POS, 11), reader(CON, 12)
    pp = np.sum((table @ a.T @ a @ table.T) ** 2)
    cc = np.sum((content[0] @ b.T @ b @ content[0].T) ** 2)  # the same for every image (C_i = +-Z0)
    beta = (pp * (1 - planted_pp) / (planted_pp * cc)) ** 0.25  # CC scales as beta^4
    w = np.concatenate([a, beta * b])
    result, _ = stream(x, w[None], w[None], [3, 5])
    head = result["layers"][0]["heads"][0]
    assert head["frobenius"]["energy"]["PP"] == pytest.approx(planted_pp, rel=1e-10)
    assert head["frobenius"]["energy"]["CC"] == pytest.approx(1 - planted_pp, rel=1e-10)
    assert head["frobenius"]["coupling"] == pytest.approx(0.0, abs=1e-12)
    assert head["label"] == ("PP" if planted_pp > 0.5 else "CC")
    labels = sorted(m["frobenius"]["label"] for m in head["modes"])
    assert labels == ["CC", "CC", "PP", "PP"]  # modes separate the two subspaces


@pytest.mark.parametrize("drop_prefix", [False, True])
def test_streamed_energies_equal_direct_numpy_and_add_up(drop_prefix):
    """Random anisotropic tokens, random weights, uneven batches: every number equals the explicit computation,
    and the four shares plus interference reproduce the total logit energy."""
    rng = np.random.default_rng(3)
    n, tokens, d, heads, k, prefix = 11, 7, 6, 3, 2, 2
    x = rng.normal(size=(n, tokens, d)) + rng.normal(size=(tokens, d)) + 0.8
    wq, wk = rng.normal(size=(heads, k, d)), rng.normal(size=(heads, k, d))
    result, _ = stream(x, wq, wk, [4, 1, 6], prefix=prefix, drop_prefix=drop_prefix)
    ref = numpy_bfd(x[:, prefix:] if drop_prefix else x, wq, wk)
    assert_matches_reference(result, ref)
    for head in result["layers"][0]["heads"]:
        fro = head["frobenius"]
        parts = sum(fro["energy_abs"][t] for t in TERMS) + fro["interference"] * fro["energy_abs"]["total"]
        assert parts == pytest.approx(fro["energy_abs"]["total"], rel=1e-10)
        assert sum(head["additive"]["energy"].values()) == pytest.approx(1.0, rel=1e-12)
        assert abs(fro["interference"]) > 1e-4  # not zero in general (METHODS B.2)
    assert result["prefix_tokens"] == ("dropped" if drop_prefix else "included as positions")


def test_decoding_separates_position_from_content():
    """A positional table that encodes where each patch is, plus image noise: position decodes from X and P, not
    from C; pure noise: from nothing. Each R^2 equals sklearn's ridge on the explicit token matrices."""
    rng = np.random.default_rng(5)
    grid, n, d = (4, 4), 40, 24
    coords = np.stack(np.divmod(np.arange(16), 4), 1).astype(float)
    table = coords @ rng.normal(size=(2, d)) + 0.1 * rng.normal(size=(16, d))
    noise = rng.normal(size=(n, 16, d))
    lookup = 1.5 * rng.normal(size=(16, d))  # tells positions apart without encoding where they are
    for x, positional in ((table + noise, True), (noise, False), (lookup + noise, "lookup")):
        result, _ = stream(x, rng.normal(size=(1, 2, d)), rng.normal(size=(1, 2, d)), [7] * 5 + [5], grid=grid)
        dec = result["layers"][0]["decoding"]
        ref = numpy_bfd(x, np.zeros((0, 2, d)), np.zeros((0, 2, d)), grid=grid)["r2"]
        for f in "XPC":
            np.testing.assert_allclose([dec[f]["row"], dec[f]["col"]], ref[f], rtol=1e-6, atol=1e-8)
        held = int(held_out_ids(map(str, range(n)), 5).sum())
        assert 0 < held < n and (dec["train_images"], dec["holdout_images"]) == (n - held, held)
        assert dec["C"]["mean"] < 0.1
        if positional is True:
            assert dec["P"]["mean"] > 0.8 and dec["X"]["mean"] > 0.5
        elif positional == "lookup":  # unseen images at seen positions decode; unseen positions from P do not
            assert dec["P"]["mean"] < 0.3 and dec["X"]["mean"] > 0.5
        else:
            assert dec["P"]["mean"] < 0.3 and dec["X"]["mean"] < 0.1


def test_position_probe_needs_enough_positions_and_says_so():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 9, 6))  # a 3 x 3 grid: fewer than 10 positions for 5 folds
    result, _ = stream(x, rng.normal(size=(1, 2, 6)), rng.normal(size=(1, 2, 6)), [5, 5], grid=(3, 3))
    dec = result["layers"][0]["decoding"]
    assert dec["P"]["mean"] is None and dec["X"]["mean"] is not None
    claims = paper_claims(result)
    assert claims["split_isolates_position"] is None
    assert "Not enough data" in claims["sentences"][CLAIMS.index("split_isolates_position")]


# ------------------------------------------------------------------------------------------- tiny models
def timm_reference_inputs(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> tuple[list[np.ndarray], list, list]:
    """X per layer from a plain pre-hook on each timm block's attention, and W_q, W_k from its qkv weight.

    Same batch size as the run under test: float32 kernels round differently for other batch shapes."""
    depth = len(model.blocks)
    xs: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    handles = [b.attn.register_forward_pre_hook(lambda m, args, l=l: xs[l].append(args[0].detach().clone()))
               for l, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                model(chunk)
    finally:
        for h in handles:
            h.remove()
    wqs, wks = [], []
    for b in model.blocks:
        w = b.attn.qkv.weight.detach().double().numpy()
        dim, heads = w.shape[1], b.attn.num_heads
        wqs.append(w[:dim].reshape(heads, dim // heads, dim))
        wks.append(w[dim : 2 * dim].reshape(heads, dim // heads, dim))
    return [torch.cat(x).double().numpy() for x in xs], wqs, wks


@pytest.mark.parametrize("name", ["timm-vit", "timm-dinov2-reg"])
def test_two_pass_streaming_equals_direct_numpy_on_a_tiny_model(name):
    tiny = next(t for t in TINY_MODELS if t.name == name)
    model = tiny.model()
    images = tiny.images(10, seed=2)
    result = run_bfd(model, images, batch_size=3, holdout_every=4)
    xs, wqs, wks = timm_reference_inputs(model, images, 3)
    grid = (tiny.image_size // model.patch_embed.patch_size[0],) * 2
    assert result["num_prefix_tokens"] == tiny.prefix and result["images"] == 10
    for layer, (x, wq, wk) in enumerate(zip(xs, wqs, wks)):
        ref = numpy_bfd(x, wq, wk, grid=grid, prefix=tiny.prefix, holdout_every=4)
        assert_matches_reference(result, ref, layer)


def test_merge_and_state_round_trip_equal_one_pass():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 5, 4)) + rng.normal(size=(5, 4))
    wq, wk = rng.normal(size=(2, 2, 4)), rng.normal(size=(2, 2, 4))
    whole, (energies, decoding) = stream(x, wq, wk, [3, 3, 3], prefix=1, grid=(2, 2), holdout_every=3)
    means_a, means_b = PositionMeans(), PositionMeans()
    batches = list(batches_of(x, [3, 3, 3]))
    means_a.update(batches[0])
    for b in batches[1:]:
        means_b.update(b)
    means_a.merge(means_b)
    np.testing.assert_allclose(means_a.means()[0].numpy(), x.mean(0), rtol=1e-14)
    parts = []
    for chunk in (batches[:1], batches[1:]):
        rs = [BFDEnergies(spectra_of(wq, wk), means_a, 1), PositionDecoding(means_a, (2, 2), 1, 3)]
        for b in chunk:
            for r in rs:
                r.update(b)
        parts.append(rs)
    for mine, theirs in zip(*parts):
        mine.merge(theirs)
    merged = summarize(parts[0][0].state_dict(), parts[0][1].state_dict())
    assert _close(merged, whole)
    # a state written and read back continues where it was
    fresh = BFDEnergies(spectra_of(wq, wk), means_a, 1)
    fresh.load_state_dict({k: np.asarray(v) for k, v in energies.state_dict().items()})
    assert _close(summarize(fresh.state_dict()), summarize(energies.state_dict()))
    # pieces over other position means do not combine
    other = PositionMeans()
    other.update(batches[0])
    with pytest.raises(QKHooksError, match="position means"):
        energies.merge(BFDEnergies(spectra_of(wq, wk), other, 1))
    with pytest.raises(QKHooksError, match="drop_prefix"):
        energies.merge(BFDEnergies(spectra_of(wq, wk), means_a, 1, drop_prefix=True))
    with pytest.raises(QKHooksError, match="position means"):
        decoding.load_state_dict(PositionDecoding(other, (2, 2), 1, 3).state_dict())


def _close(a, b, rtol: float = 1e-10) -> bool:
    """Nested results equal up to float rounding."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=rtol, atol=1e-13))
    return a == b


def test_reducer_errors_name_the_fix():
    x = np.random.default_rng(0).normal(size=(4, 5, 4))
    means = PositionMeans()
    batch = BatchCapture(ids=["a"], meta={}, layers={0: LayerCapture(0, 1)})
    with pytest.raises(QKHooksError, match="keep_inputs=True"):
        means.update(batch)
    with pytest.raises(QKHooksError, match="run pass 1"):
        means.means()
    for b in batches_of(x, [4]):
        means.update(b)
    with pytest.raises(QKHooksError, match="one input size"):
        means.update(next(batches_of(x[:, :3], [4])))
    energies = BFDEnergies(spectra_of(np.ones((1, 2, 4)), np.ones((1, 2, 4))), means)
    with pytest.raises(QKHooksError, match="same images at the same size"):
        energies.update(next(batches_of(x[:, :3], [4])))
    spec = spectra_of(np.ones((1, 2, 4)), np.ones((1, 2, 4)), layer=3)
    with pytest.raises(QKHooksError, match="layer 3"):
        BFDEnergies(spec, means)
    with pytest.raises(QKHooksError, match="grid"):
        PositionDecoding(means, (3, 3))
    with pytest.raises(QKHooksError, match="holdout_every"):
        PositionDecoding(means, (2, 2), 1, holdout_every=1)
    with pytest.raises(QKHooksError, match="definition"):
        summarize(energies.state_dict(), definition="cosine")
    with pytest.raises(QKHooksError, match="saw no images"):
        summarize(energies.state_dict())


# --------------------------------------------------------------------------------------------- claims
def _fake_result(shares: list[dict], labels: list[str], mode_labels=("CC", "CP", "PP"), r2=(1.0, 0.0)) -> dict:
    heads = [{"head": i, "frobenius": {"energy": s, "label": lab},
              "modes": [{"frobenius": {"label": m}} for m in mode_labels]} for i, (s, lab) in enumerate(zip(shares, labels))]
    dec = {"X": {"mean": 0.8}, "P": {"mean": r2[0]}, "C": {"mean": r2[1]}}
    return {"definition": "frobenius", "layers": [{"layer": 0, "heads": heads, "decoding": dec}]}


def test_paper_claims_on_constructed_results():
    cc_head = {"CC": 0.7, "CP": 0.2, "PC": 0.05, "PP": 0.05}
    cp_head = {"CC": 0.3, "CP": 0.5, "PC": 0.1, "PP": 0.1}
    good = paper_claims(_fake_result([cc_head, cc_head, cp_head], ["CC", "CC", "CP"]))
    claims = ("cc_dominant", "cp_second", "heads_specialise", "modes_specialise", "split_isolates_position")
    assert all(good[k] is True for k in claims)
    assert len(good["sentences"]) == len(claims)
    assert all(isinstance(s, str) and s and "\n" not in s for s in good["sentences"])
    pp_head = {"CC": 0.2, "CP": 0.1, "PC": 0.1, "PP": 0.6}
    bad = paper_claims(_fake_result([pp_head, pp_head], ["PP", "PP"], ("PP", "PP"), r2=(0.5, 0.4)))
    assert not any(bad[k] for k in ("cc_dominant", "cp_second", "heads_specialise", "modes_specialise",
                                    "split_isolates_position"))
    assert "PP does" in bad["sentences"][0]
    no_modes = _fake_result([cc_head], ["CC"])
    del no_modes["layers"][0]["heads"][0]["modes"], no_modes["layers"][0]["decoding"]
    claims = paper_claims(no_modes)
    assert claims["modes_specialise"] is None and claims["split_isolates_position"] is None


# ------------------------------------------------------------------------------ run files, resume, CLI
def _folder_dataset(tmp_path, n: int = 10, size: int = 32):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture
def tiny_run(tmp_path):
    from qkhooks.data import ImageConfig, open_dataset
    from qkhooks.models.load import LoadedModel

    tiny = next(t for t in TINY_MODELS if t.name == "timm-deit-distilled")
    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    loaded = LoadedModel(model=tiny.model(), spec="tiny-deit-distilled", image_config=cfg)
    folder = _folder_dataset(tmp_path)
    pixels = torch.stack([open_dataset(str(folder), cfg)[i]["pixel_values"] for i in range(10)])
    return loaded, folder, pixels, tmp_path


@contextlib.contextmanager
def _killed_on_update(monkeypatch, reducer_class, call: int):
    """Within the block, the ``call``-th ``reducer_class.update`` raises KeyboardInterrupt (a run killed mid-pass)."""
    original, calls = reducer_class.update, {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        original(self, batch)

    monkeypatch.setattr(reducer_class, "update", dying)
    try:
        yield
    finally:
        monkeypatch.setattr(reducer_class, "update", original)


def test_run_file_equals_in_memory_and_resumes(tiny_run, monkeypatch):
    loaded, folder, pixels, tmp = tiny_run
    out = tmp / "bfd.h5"
    result = run_bfd(loaded, str(folder), out, batch_size=1, holdout_every=3)
    direct = run_bfd(loaded.model, pixels, batch_size=4, holdout_every=3)
    # the tensors are numbered "0".."9", the files by name: other ids hold out other images for the X and C probes
    assert _close(_without_image_probes(result), _without_image_probes(direct), rtol=1e-9)
    assert _close(read_bfd(out), result)
    from qkhooks.store import open_run

    with open_run(pass1_path(out)) as run:
        assert run.complete and run.n == 10 and run.state("bfd_position_means") is not None
    with open_run(out) as run:
        ids = list(run.ids)
    xs, wqs, wks = timm_reference_inputs(loaded.model, pixels, 1)
    np.testing.assert_allclose(position_factors(out)[1], xs[1].mean(0), rtol=1e-9)
    held = held_out_ids(ids, 3)
    assert 0 < held.sum() < 10
    for layer in result["layers"]:
        dec, grid = layer["decoding"], (4, 4)
        ref = numpy_bfd(xs[layer["layer"]], wqs[0][:0], wks[0][:0], grid=grid, prefix=2, holdout_every=3, ids=ids)
        assert (dec["train_images"], dec["holdout_images"]) == (10 - held.sum(), held.sum())
        for f in "XC":
            np.testing.assert_allclose([dec[f]["row"], dec[f]["col"]], ref["r2"][f], rtol=1e-6, atol=1e-8)
    with pytest.raises(QKHooksError, match="resume"):
        run_bfd(loaded, str(folder), out)
    # interrupt pass 2 after 9 of 10 batches (a checkpoint is taken after batch 8), then resume
    out2 = tmp / "again.h5"
    with _killed_on_update(monkeypatch, BFDEnergies, 10), pytest.raises(KeyboardInterrupt):
        run_bfd(loaded, str(folder), out2, batch_size=1, holdout_every=3)
    with pytest.raises(QKHooksError, match="unfinished"):
        read_bfd(out2)
    resumed = run_bfd(loaded, str(folder), out2, batch_size=1, holdout_every=3, resume=True)
    assert _close(resumed, result)
    assert _close(run_bfd(loaded, str(folder), out2, batch_size=1, holdout_every=3, resume=True), result)
    with pytest.raises(QKHooksError, match="drop_prefix"):
        run_bfd(loaded, str(folder), tmp / "bfd.h5", batch_size=1, holdout_every=3, drop_prefix=True, resume=True)


def _without_image_probes(result: dict) -> dict:
    """The result less the X and C probes and their split (which depend on the images' ids) and the model label."""
    layers = [{**layer, "decoding": {k: v for k, v in layer["decoding"].items()
                                     if k not in ("X", "C", "train_images", "holdout_images")}}
              for layer in result["layers"]]
    return {**{k: v for k, v in result.items() if k != "model"}, "layers": layers}


def test_cli_writes_json_of_the_documented_shape(tmp_path, capsys):
    from qkhooks.cli import main

    folder = _folder_dataset(tmp_path, n=5)
    out, js = tmp_path / "run.h5", tmp_path / "bfd.json"
    code = main(["bfd", "timm:test_vit", str(folder), "--random-init", "--out", str(out), "--json", str(js),
                 "--layers", "0,5", "--batch-size", "3", "--holdout-every", "2"])
    assert code == 0
    payload = json.loads(js.read_text())
    assert isinstance(payload["model"], str) and [l["layer"] for l in payload["layers"]] == [0, 5]
    for layer in payload["layers"]:
        assert isinstance(layer["position_variance_share"], float)
        assert len(layer["heads"]) == 2
        for head in layer["heads"]:
            assert isinstance(head["head"], int) and set(head["energy"]) == set(TERMS)
            assert sum(head["energy"].values()) == pytest.approx(1.0)
            assert isinstance(head["interference"], float) and head["label"] in TERMS
            assert head["participation_ratio"] >= 1.0
            assert len(head["modes"]) == 32
            for mode in head["modes"]:
                assert isinstance(mode["mode"], int) and set(mode["energy"]) == set(TERMS) and mode["label"] in TERMS
        assert set(layer["decoding"]) >= {"X", "P", "C"}
    assert main(["analyze", "bfd", str(out), "--out", str(tmp_path / "fig"), "--head", "5,1"]) == 0
    again = json.loads((tmp_path / "fig" / "bfd.json").read_text())
    assert _close(again, payload)
    for name in ("bfd_heads.png", "bfd_layers.png", "bfd_modes_L5H1.png", "bfd_decoding.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", "bfd", str(out), "--out", str(tmp_path / "fig"), "--head", "7"]) == 2
    assert "LAYER,HEAD" in capsys.readouterr().err


def test_one_image_is_refused_because_its_content_factor_is_zero_by_construction():
    """METHODS B.1: P[p] = mean_i X[i, p], so with n = 1 the content factor C = X - P is identically zero (checked
    here in numpy on the recorded tokens) and every head would be 100 % PP, with paper_claims saying "Content-content
    does not dominate (PP does)" (review 18 F7). run_bfd refuses before its passes (tensors, also through limit),
    summarize refuses a one-image state, and paper_claims a one-image result; two images are accepted."""
    import qkhooks
    from qkhooks.analysis.bfd_reducers import full_modes

    tiny = TINY_MODELS[0]
    model = tiny.model()
    images = tiny.images(3, seed=4)
    for data, limit in ((images[:1], None), (images, 1), (list(images[:1].split(1)), None)):
        with pytest.raises(QKHooksError, match=r"at least 2 images; it got 1.*content factor C = X - P is zero"):
            run_bfd(model, data, limit=limit, decode=False)
    means = PositionMeans([0])
    with qkhooks.record(model, modes=None, layers=[0], keep_inputs=True, sinks=[means]) as run, torch.no_grad():
        run(images[:1])
        x = run.last.inputs(0).double().numpy()
    p = means.means()[0].numpy()
    assert np.abs(x[0] - x.mean(0)).max() == 0 and np.allclose(p, x[0])  # numpy: C = X - P = 0 with one image
    energies = BFDEnergies(full_modes(model, [0]), means, tiny.prefix)
    with qkhooks.record(model, modes=None, layers=[0], keep_inputs=True, sinks=[energies]) as run, torch.no_grad():
        run(images[:1])
    with pytest.raises(QKHooksError, match="at least 2 images"):
        summarize(energies.state_dict())
    one = {**_fake_result([{"CC": 0.0, "CP": 0.0, "PC": 0.0, "PP": 1.0}], ["PP"]), "images": 1}
    with pytest.raises(QKHooksError, match="at least 2 images"):
        paper_claims(one)
    assert paper_claims({**one, "images": 2})["cc_dominant"] is False
    assert run_bfd(model, images[:2], decode=False)["images"] == 2


# ----------------------------------------------------------------------------- probe split: the image's own
def _png_items(n: int, bad: int) -> list[dict]:
    """n noise PNGs as dataset items with ids, the one at ``bad`` unreadable (skipped by a recording)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    items = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        items.append({"image": b"not an image" if i == bad else buffer.getvalue(), "id": f"im{i}"})
    return items


def test_probe_split_is_the_same_for_shards_skipped_images_batch_sizes_and_resume(tiny_run, monkeypatch):
    """The held-out images are chosen by id: one process, two merged shards with an unreadable image in the first,
    batch sizes 1 and 3 and an interrupted-and-resumed run give the same split, and R^2 equals sklearn's ridge on
    it (a split by position in the run held out other images in the shards)."""
    import io
    import warnings

    from PIL import Image

    from qkhooks.analysis.bfd_summary import decoding_r2
    from qkhooks.analysis.bfd_reducers import layer_state
    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset

    loaded, _, _, tmp = tiny_run
    items, every, grid, prefix = _png_items(17, bad=2), 3, (4, 4), 2
    kw = dict(modes=None, layers=[0, 1], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable image is reported as skipped
        means = PositionMeans()
        record_dataset(loaded, items, None, reducers=[means], batch_size=4, **kw)
        probes = lambda: PositionDecoding(means, grid, prefix, every)  # noqa: E731
        states = {}
        for size in (1, 3, 4):
            reducer = probes()
            record_dataset(loaded, items, None, reducers=[reducer], batch_size=size, **kw)
            states[f"batch {size}"] = reducer.state_dict()
        shards = [shard_path(tmp / "s.h5", r, 2) for r in range(2)]
        for r, path in enumerate(shards):
            record_dataset(loaded, items, path, reducers=[probes()], batch_size=4, shard=(r, 2), **kw)
        merge_shards(tmp / "s.h5", [str(p) for p in shards])
        with open_run(tmp / "s.h5") as run:
            states["2 shards"], ids = run.state(PositionDecoding.name), list(run.ids)
        with _killed_on_update(monkeypatch, PositionDecoding, 7), pytest.raises(KeyboardInterrupt):
            record_dataset(loaded, items, tmp / "r.h5", reducers=[probes()], batch_size=2, **kw)
        record_dataset(loaded, items, tmp / "r.h5", reducers=[probes()], batch_size=2, resume=True, **kw)
        with open_run(tmp / "r.h5") as run:
            states["resumed"] = run.state(PositionDecoding.name)

    assert ids == [f"im{i}" for i in range(17) if i != 2]
    held = held_out_ids(ids, every)
    assert 0 < held.sum() < len(ids) and held[:3].any()  # the split is tested across the skipped image
    pixels = torch.stack([(torch.as_tensor(np.asarray(Image.open(io.BytesIO(it["image"])).convert("RGB"), np.float32))
                           / 255 - 0.5).permute(2, 0, 1) / 0.5 for i, it in enumerate(items) if i != 2])
    xs, _, _ = timm_reference_inputs(loaded.model, pixels, 1)
    y = np.stack(np.divmod(np.arange(16), 4), 1).astype(np.float64)
    for layer in (0, 1):
        one = decoding_r2(layer_state(states["batch 4"], layer), grid)
        for how, state in states.items():  # whatever the rule, every way of recording agrees with one process
            dec = decoding_r2(layer_state(state, layer), grid)
            assert (dec["train_images"], dec["holdout_images"]) == (one["train_images"], one["holdout_images"]), how
            for f in "XC":
                np.testing.assert_allclose(dec[f]["mean"], one[f]["mean"], rtol=1e-5, err_msg=f"{how} L{layer} {f}")
        x = xs[layer][:, prefix:].reshape(len(ids), 16, -1)
        ref = {"X": x, "C": x - xs[layer].mean(0)[prefix:]}
        for how, state in states.items():
            dec = decoding_r2(layer_state(state, layer), grid)
            assert (dec["train_images"], dec["holdout_images"]) == (len(ids) - held.sum(), held.sum()), how
            for f, feats in ref.items():
                want = ridge_r2(feats[~held].reshape(-1, x.shape[-1]), np.tile(y, ((~held).sum(), 1)),
                                feats[held].reshape(-1, x.shape[-1]), np.tile(y, (held.sum(), 1)), 1e-3)
                np.testing.assert_allclose([dec[f]["row"], dec[f]["col"]], want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{how} L{layer} {f}")


def test_a_probe_state_split_by_position_is_not_continued():
    """A state from before the id rule (no holdout_rule) would mix two splits on resume or merge: refused."""
    x = np.random.default_rng(0).normal(size=(4, 5, 4))
    means = PositionMeans()
    for b in batches_of(x, [4]):
        means.update(b)
    old = {k: v for k, v in PositionDecoding(means, (2, 2), 1, 3).state_dict().items() if k != "holdout_rule"}
    with pytest.raises(QKHooksError, match="position in the run.*overwrite"):
        PositionDecoding(means, (2, 2), 1, 3).load_state_dict(old)


# ------------------------------------------------------------------------------ no content, no decomposition
def test_identical_images_are_refused_and_barely_different_ones_decompose(tiny_run):
    """Two identical images have C = 0 like one image: refused by run_bfd, by the reducers' summary and by read_bfd
    of the run file. Two images one grey level apart in one pixel have content and match numpy."""
    import io

    from PIL import Image

    loaded, _, pixels, tmp = tiny_run
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    same = [{"image": buffer.getvalue(), "id": name} for name in ("a", "b")]
    out = tmp / "same.h5"
    with pytest.raises(QKHooksError, match="content factor is zero.*same tokens.*more, different images"):
        run_bfd(loaded, same, out, batch_size=2)
    with pytest.raises(QKHooksError, match="content factor is zero"):
        read_bfd(out)  # pass 2 is complete in the file: reading it back refuses too
    twins = pixels[:1].repeat(2, 1, 1, 1)
    with pytest.raises(QKHooksError, match="content factor is zero"):
        run_bfd(loaded.model, twins, batch_size=2, decode=False)
    rng = np.random.default_rng(4)
    x = np.broadcast_to(rng.normal(size=(5, 4)), (3, 5, 4)).copy()
    wq, wk = rng.normal(size=(2, 2, 4)), rng.normal(size=(2, 2, 4))
    with pytest.raises(QKHooksError, match="all 3 images give the same tokens"):
        stream(x, wq, wk, [2, 1])

    twins[1, 0, 3, 5] += 2 / 255  # one grey level (the images are normalised with std 0.5)
    result = run_bfd(loaded.model, twins, batch_size=2, decode=False)
    xs, wqs, wks = timm_reference_inputs(loaded.model, twins, 2)
    for layer, (x, wq, wk) in enumerate(zip(xs, wqs, wks)):
        ref = numpy_bfd(x, wq, wk)
        entry = result["layers"][layer]
        assert 0 < entry["content_variance_share"] < 1e-3  # barely different, yet not rounding
        np.testing.assert_allclose(entry["position_variance_share"], ref["position_variance_share"], rtol=1e-8)
        for head, want in zip(entry["heads"], ref["heads"]):
            summed = sum(want["frob"].values())
            np.testing.assert_allclose([head["frobenius"]["energy"][t] for t in TERMS],
                                       [want["frob"][t] / summed for t in TERMS], rtol=1e-6, atol=1e-15)


def test_an_image_with_nan_or_inf_pixels_is_refused_not_decomposed_into_nones(tiny_run):
    """A NaN or inf pixel makes every sum of the BFD non-finite: refused, naming the cause, where it returned every
    energy, label and R² as None without a word."""
    loaded, _, pixels, _ = tiny_run
    for bad in (float("nan"), float("inf")):
        broken = pixels[:4].clone()
        broken[2, 1, 5, 7] = bad
        with pytest.raises(QKHooksError, match="energies are not finite .*NaN or inf tokens"):
            run_bfd(loaded.model, broken, batch_size=2, decode=False)


def test_a_resume_to_another_limit_is_refused_saying_why_and_the_fix_it_names_gives_a_fresh_runs_result(tiny_run):
    """`record --resume` may raise --limit, BFD may not: pass 2's sums centre every image on pass 1's position means
    over the run's images, so more images change every kept image's share. The refusal said only "its options
    differ: limit: file 4, now 8"; it says why and what to do, leaves the run as it was, and its --overwrite gives
    what a fresh run to the new limit gives."""
    loaded, folder, _, tmp = tiny_run
    out = tmp / "bfd.h5"
    four = run_bfd(loaded, str(folder), out, batch_size=2, holdout_every=3, limit=4)
    with pytest.raises(QKHooksError) as err:
        run_bfd(loaded, str(folder), out, batch_size=2, holdout_every=3, limit=8, resume=True)
    said = str(err.value)
    assert "limit 4, now 8" in said and "position means" in said and "exactly" in said, said
    assert "limit=4 (--limit 4)" in said and "overwrite=True (--overwrite)" in said, said
    assert _close(read_bfd(out), four)
    eight = run_bfd(loaded, str(folder), out, batch_size=2, holdout_every=3, limit=8, overwrite=True)
    assert _close(eight, run_bfd(loaded, str(folder), tmp / "fresh.h5", batch_size=2, holdout_every=3, limit=8))
    assert not _close(eight, four)
