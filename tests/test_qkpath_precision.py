"""The q/k path's precision rule (review F3): ``qkhooks.projector.qk_path_check`` takes a layer's maps from the
model's own q and k only where every kept mode's error amplification kappa is small, and the maps equal float64
x·U then; an ill-conditioned W_q goes to the x path (the old rule, sigma_n > 1e-7 · sigma_max, kept it on the q/k path
with maps off by O(1)). References are numpy float64 on the model's weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.models.base import QKWeights
from qkhooks.projector import (QK_PATH_MAX_AMPLIFICATION, ModeProjector, QKPathProjector, QKPathSolution,
                               qk_path_amplification,
                               qk_path_check, qk_path_fits)
from qkhooks.spectrum import LayerSpectrum

D, HEADS, DK = 24, 3, 8


def _tiny(seed: int = 0, bias_std: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=D,
                              depth=1, num_heads=HEADS).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, bias_std)
    return model


def _ill_conditioned(model: torch.nn.Module, decades: float = 6.0) -> None:
    """Head 0's W_q rows given singular values from its largest down to 10^-decades of it (same singular vectors)."""
    with torch.no_grad():
        w = model.blocks[0].attn.qkv.weight
        u, s, vh = torch.linalg.svd(w[:DK].double(), full_matrices=False)
        s = s.max() * torch.logspace(0, -decades, DK, dtype=torch.float64)
        w[:DK] = (u @ torch.diag(s) @ vh).float()


def _maps_and_reference(model: torch.nn.Module, modes="all"):
    """The recording's query and key maps (float64) and float64 x·U, x·V on its own spectrum, and the recording."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    site = qkhooks.sites(model)[0]
    tokens = {}
    hook = site.module.register_forward_pre_hook(lambda m, a: tokens.__setitem__("x", a[0].detach().double()))
    with qkhooks.record(model, modes=modes) as run, torch.no_grad():
        model(images)
    hook.remove()
    spec = run.spectrum(0)
    ref_q = torch.einsum("bnd,hdk->bhkn", tokens["x"], spec.U.double())
    ref_k = torch.einsum("bnd,hdk->bhkn", tokens["x"], spec.V.double())
    return run, (run.query(0).double(), ref_q), (run.key(0).double(), ref_k)


def _worst_relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Per mode, max |error| / max |reference| over images and tokens; the largest over heads and modes."""
    return float(((got - ref).abs().amax(dim=(0, 3)) / ref.abs().amax(dim=(0, 3))).max())


def test_an_ill_conditioned_w_q_takes_the_x_path_and_its_maps_equal_float64_x_u():
    """Head 0's W_q spans 1e0..1e-6 (the layer's sigma_min / sigma_max ~ 5e-7 passed the old 1e-7 rule, and the q/k
    path's maps were off by ~10-100 %): its kappa is far above the bound, so the layer's maps come from x and every
    mode's map is within 1e-5 (float32 rounding, ~3e-7 measured) of float64 x·u_n and x·v_n."""
    model = _tiny()
    _ill_conditioned(model)
    site = qkhooks.sites(model)[0]
    spec = qkhooks.spectrum(model)[0]
    assert float(spec.S.min() / spec.S.max()) > 1e-7  # the old rule's gate lets this layer through
    assert float(qk_path_amplification(spec, site.weights()).max()) > 1e4
    run, (query, ref_q), (key, ref_k) = _maps_and_reference(model)
    assert run.mode_source == {0: "x"}
    assert isinstance(run._projectors[0], ModeProjector) and 0 not in run._from_qk
    assert _worst_relative_error(query, ref_q) < 1e-5
    assert _worst_relative_error(key, ref_k) < 1e-5


@pytest.mark.parametrize("modes", [2, "all"])
def test_a_well_conditioned_layer_keeps_the_qk_path_and_its_biased_maps_equal_float64_x_u(modes):
    """Random weights (kappa <= cond W_q ~ 3 here) with biases: the layer keeps the q/k path (a QKPathProjector, the
    offsets b_q·a_n and b_k·c_n subtracted) and its maps equal float64 x·U to 1e-5."""
    model = _tiny()
    site = qkhooks.sites(model)[0]
    assert site.weights().b_q is not None and float(site.weights().b_q.abs().max()) > 0.1
    run, (query, ref_q), (key, ref_k) = _maps_and_reference(model, modes)
    assert run.mode_source == {0: "qk"}
    assert isinstance(run._from_qk[0], QKPathProjector) and 0 not in run._projectors
    assert float(qk_path_amplification(run.spectrum(0), site.weights()).max()) < QK_PATH_MAX_AMPLIFICATION
    assert _worst_relative_error(query, ref_q) < 1e-5
    assert _worst_relative_error(key, ref_k) < 1e-5


def _diagonal_layer(s: np.ndarray, bias: np.ndarray | None):
    """Hand-made layer: head h's W_q = [diag(s[h]) | 0] (d_k x d), W_k = [I | 0], so W_q^T W_k = diag(s[h]) padded:
    u_n = v_n = e_n, sigma_n = s[h, n], a_n = e_n / s[h, n], c_n = e_n. Biases ``bias`` (H, d_k) on the query side."""
    heads, dk = s.shape
    d = dk + 2
    w_q, w_k = np.zeros((heads, dk, d)), np.zeros((heads, dk, d))
    for h in range(heads):
        w_q[h, :, :dk], w_k[h, :, :dk] = np.diag(s[h]), np.eye(dk)
    e = np.broadcast_to(np.eye(d)[:, :dk], (heads, d, dk)).copy()
    weights = QKWeights(torch.from_numpy(w_q), torch.from_numpy(w_k), None if bias is None else torch.from_numpy(bias),
                        None)
    return LayerSpectrum(0, torch.from_numpy(e), torch.from_numpy(s.copy()), torch.from_numpy(e)), weights, w_q, w_k


@pytest.mark.parametrize("with_bias", [False, True], ids=["bias-free", "query-bias"])
def test_amplification_of_hand_made_heads_equals_numpy_and_the_rule_cuts_at_the_bound(with_bias):
    """kappa of hand-made heads against numpy: lstsq(W^T, u_n), ||a_n|| (||W||_2 + ||b|| / sqrt(d)); analytically
    max(s) / s_n for the query side of a bias-free head and 1 for the key side. qk_path_fits cuts between the largest
    kappa and just above it; a spectrum whose u_n is not in W_q's row space, a sigma_n = 0 and an augmented spectrum
    fail at any bound."""
    s = np.array([[2.0, 1.0, 0.5, 0.25], [3.0, 3.0, 1.5, 1e-3]])
    bias = np.array([[0.3, -0.4, 0.0, 1.2], [0.0, 0.0, 0.0, 0.0]]) if with_bias else None
    spec, weights, w_q, w_k = _diagonal_layer(s, bias)
    d = w_q.shape[2]
    want = np.zeros((2, *s.shape))
    for side, (w, b) in enumerate(((w_q, bias), (w_k, None))):
        for h in range(s.shape[0]):
            a = np.linalg.lstsq(w[h].T, np.eye(d)[:, : s.shape[1]], rcond=None)[0]
            extra = 0.0 if b is None else np.linalg.norm(b[h]) / math.sqrt(d)
            want[side, h] = np.linalg.norm(a, axis=0) * (np.linalg.norm(w[h], 2) + extra)
    got = qk_path_amplification(spec, weights)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(want[1], 1.0, rtol=1e-12)
    if not with_bias:
        np.testing.assert_allclose(want[0], s.max(1, keepdims=True) / s, rtol=1e-12)
    top = float(want.max())  # 3e3: head 1's last mode
    check = qk_path_check(spec, weights, bound=top * 1.001)
    assert check.fits and qk_path_fits(spec, weights, bound=top * 1.001)
    np.testing.assert_allclose(check.a.numpy()[0], np.eye(d)[: s.shape[1], : s.shape[1]] / s[0], atol=1e-12)
    assert not qk_path_fits(spec, weights, bound=top * 0.999)
    assert not qk_path_fits(spec, weights)  # the default bound: 3e3 > 32
    assert qk_path_fits(spec.top(3), weights)  # the three leading modes: kappa <= 4 (5 with the bias term)
    # u_n rotated out of W_q's row space (a spectrum of other weights): the q/k path would give another vector's maps
    other = LayerSpectrum(0, torch.roll(spec.U, 1, dims=1), spec.S, spec.V)
    assert not qk_path_check(other, weights, bound=math.inf).fits
    assert float(qk_path_check(other, weights, bound=math.inf).residual.max()) > 0.5
    zero = LayerSpectrum(0, spec.U, torch.where(spec.S < 0.3, 0.0, spec.S), spec.V)
    assert not qk_path_fits(zero, weights, bound=math.inf)
    assert not qk_path_fits(LayerSpectrum(0, spec.U, spec.S, spec.V, augmented=True), weights, bound=math.inf)


def test_a_layer_recorded_with_several_k_solves_its_qk_path_vectors_once(monkeypatch):
    """record() with modes=1, 2, 'all', then 2 again, on unchanged weights: each layer's a_n and c_n are solved once
    (one Cholesky per side and layer, counted at torch.linalg.cholesky_ex), not once per k; every k takes the q/k
    path and its maps equal float64 x·U to 1e-5."""
    model = _tiny()
    calls = [0]
    inner = torch.linalg.cholesky_ex

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counted)
    for modes in (1, 2, "all", 2):
        run, (query, ref_q), (key, ref_k) = _maps_and_reference(model, modes)
        assert run.mode_source == {0: "qk"}
        assert _worst_relative_error(query, ref_q) < 1e-5 and _worst_relative_error(key, ref_k) < 1e-5
    assert calls[0] == 2  # one layer, two sides


def test_the_leading_k_of_one_solution_are_the_solution_of_the_leading_k_modes():
    """QKPathSolution(full).check(k) equals qk_path_check(full.top(k)) (the solve of the k modes alone), on a random
    layer and on a hand-made one whose last u_n leaves W_q's row space: there the whole solution falls back to least
    squares and does not fit, while its leading modes keep the normal equations' a_n (e_n / s_n) and fit, as a solve
    of those modes alone does. Equal to float64 rounding, not bit for bit: BLAS takes other kernels for products one
    or two columns wide (~1e-15 apart here), far below the float32 the projector's weights are cast to."""
    model = _tiny()
    site = qkhooks.sites(model)[0]
    s = np.array([[2.0, 1.0, 0.5, 0.25], [3.0, 3.0, 1.5, 1.0]])
    hand, weights, _, _ = _diagonal_layer(s, None)
    u = hand.U.clone()
    u[:, :, -1] = 0.0
    u[:, -1, -1] = 1.0  # e_{d-1}: W_q's rows are zero there
    escaped = LayerSpectrum(0, u, hand.S, hand.V)
    for full, w in ((qkhooks.spectrum(model)[0], site.weights()), (escaped, weights)):
        solution = QKPathSolution(full, w)
        for k in (1, 2, 3, full.num_modes, None):
            sliced, alone = solution.check(k), qk_path_check(full.top(k), w)
            assert sliced.fits == alone.fits
            for name in ("amplification", "residual", "a", "c"):
                torch.testing.assert_close(getattr(sliced, name), getattr(alone, name), rtol=1e-12, atol=1e-14)
    assert not solution.check().fits and float(solution.check().residual.max()) > 0.5 and solution.check(3).fits
    np.testing.assert_allclose(solution.check(3).a.numpy()[0], np.eye(4)[:, :3] / s[0, :3], atol=1e-15)
