"""Tests written to kill mutants that survived the rest of the suite (see tests/MUTATION.md), each against an
independent reference."""

from __future__ import annotations

import numpy as np
import pytest

import qkhooks
from conftest import TINY_MODELS

_WITH_BIASES = [t for t in TINY_MODELS if t.name in ("timm-vit", "hf-vit-4x6-key-first")]


@pytest.mark.parametrize("tiny", _WITH_BIASES, ids=lambda t: t.name)
def test_augmented_spectrum_and_cosines_match_a_dense_svd_of_the_augmented_form(tiny):
    """[W_q | b_q]^T [W_k | b_k] formed densely in numpy: its singular values, and the cosine of the token part
    (first d coordinates) of each pair of singular vectors, which is what ``cos`` reports for ``augmented``."""
    model = tiny.model()
    spec = qkhooks.spectrum(model, augmented=True)
    for site in qkhooks.sites(model):
        w = site.weights()
        w_q = np.concatenate([w.w_q.double().numpy(), w.b_q.double().numpy()[..., None]], axis=-1)  # (H, dk, d+1)
        w_k = np.concatenate([w.w_k.double().numpy(), w.b_k.double().numpy()[..., None]], axis=-1)
        layer = spec[site.layer]
        assert layer.augmented and layer.dim == site.dim and layer.U.shape[1] == site.dim + 1
        for h in range(site.num_heads):
            u, s, vt = np.linalg.svd(w_q[h].T @ w_k[h])
            k = site.head_dim
            np.testing.assert_allclose(layer.S[h].numpy(), s[:k], rtol=1e-5, atol=1e-6 * s[0])
            tu, tv = u[: site.dim, :k], vt[:k, : site.dim].T  # token part; the last coordinate multiplies 1
            cos = (tu * tv).sum(0) / (np.linalg.norm(tu, axis=0) * np.linalg.norm(tv, axis=0))
            np.testing.assert_allclose(layer.cos[h].numpy(), cos, atol=1e-5)
            weights = s[:k] / s[:k].sum()
            assert float(layer.cosine_weighted[h]) == pytest.approx(float((weights * cos).sum()), abs=1e-5)
