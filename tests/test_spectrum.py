"""Tests of ``qkhooks/spectrum.py`` written to kill the survivors of its mutation run (tests/MUTATION.md), each
against an independent reference (numpy on the model's weights, or the arrays the object holds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.spectrum import LayerSpectrum


_OLD_DICT_MESSAGE = ("RunReader.spectrum(l) now returns a LayerSpectrum (.U, .S, .V, .cos); for the stored arrays as a "
                     "dict use RunReader.spectrum_arrays(l).")


def _numpy_cos(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))


def test_spectrum_of_a_live_layer_read_as_the_old_dict_gives_its_own_arrays_and_a_numpy_cosine():
    """The deprecated dict view of a computed ``LayerSpectrum`` (``RunReader.spectrum(l)`` used to return a dict):
    keys U, S, V, cos in that order, the values its own arrays, cos the numpy cosine of each (u_n, v_n) pair."""
    rng = np.random.default_rng(0)
    U, V = rng.standard_normal((2, 3, 5, 4))
    S = np.sort(rng.random((2, 4)))[:, ::-1].copy()
    layer = LayerSpectrum(1, torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(V))
    with pytest.warns(DeprecationWarning) as caught:
        assert list(layer) == ["U", "S", "V", "cos"]
    assert str(caught[0].message) == _OLD_DICT_MESSAGE
    assert caught[0].filename == __file__  # blamed on the caller's line, not on qkhooks
    with pytest.warns(DeprecationWarning):
        assert "cos" in layer and "S_all" not in layer
    with pytest.warns(DeprecationWarning):
        got = dict(layer.items())
    np.testing.assert_array_equal(got["U"], U)
    np.testing.assert_array_equal(got["S"], S)
    np.testing.assert_array_equal(got["V"], V)
    np.testing.assert_allclose(got["cos"], _numpy_cos(U, V), rtol=1e-12)


def test_spectrum_of_a_stored_layer_read_as_the_old_dict_gives_the_stored_arrays():
    """A ``LayerSpectrum`` read from a run file keeps the file's arrays (with ``S_all``, ``cos_all``) for the dict view."""
    stored = {"U": np.ones((1, 2, 1)), "S": np.ones((1, 1)), "V": np.ones((1, 2, 1)), "cos": np.ones((1, 1)),
              "S_all": np.arange(2.0)[None]}
    layer = LayerSpectrum(0, stored["U"], stored["S"], stored["V"], _stored=stored)
    with pytest.warns(DeprecationWarning):
        assert list(layer) == list(stored)
    with pytest.warns(DeprecationWarning):
        assert "S_all" in layer
    with pytest.warns(DeprecationWarning):
        assert layer["S_all"] is stored["S_all"]


def test_spectrum_bilinear_form_of_stored_numpy_modes_is_the_sum_of_rank_one_terms():
    """``bilinear()`` on numpy arrays (a spectrum read from a run file) against an explicit sum of sigma_n u_n v_n^T."""
    rng = np.random.default_rng(1)
    U, V = rng.standard_normal((2, 2, 5, 3))  # (H, d, K) with d != K
    S = rng.random((2, 3))
    dense = LayerSpectrum(0, U, S, V).bilinear()
    expected = np.stack([sum(S[h, n] * np.outer(U[h, :, n], V[h, :, n]) for n in range(3)) for h in range(2)])
    assert isinstance(dense, np.ndarray)
    np.testing.assert_allclose(dense, expected, rtol=1e-12)


def test_spectrum_head_weighted_cosines_of_float32_singular_values_are_computed_in_float64():
    """float32 sigmas (as stored) are weighted in float64: agrees with a float64 numpy sum to 1e-13."""
    from qkhooks.spectrum import head_weighted_cosines

    rng = np.random.default_rng(2)
    S = (rng.random((3, 7)) * 1e3).astype(np.float32)
    cos = rng.uniform(-1, 1, (3, 7))
    s64 = S.astype(np.float64)
    expected = [sum(s64[h, n] / s64[h].sum() * cos[h, n] for n in range(7)) for h in range(3)]
    np.testing.assert_allclose(head_weighted_cosines(S, cos), expected, rtol=1e-13)


def test_spectrum_augmented_without_biases_is_the_dense_svd_with_a_zero_bias_column():
    """A model without q/k biases: the augmented form is [W_q | 0]^T [W_k | 0], checked against numpy's SVD."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, qkv_bias=False).double()
    site = qkhooks.sites(model)[0]
    w = site.weights()
    assert w.b_q is None and w.b_k is None
    layer = qkhooks.spectrum(model, augmented=True)[0]
    assert layer.augmented and layer.U.shape[1] == 33
    zero = np.zeros((4, 8, 1))
    w_q = np.concatenate([w.w_q.numpy(), zero], -1)
    w_k = np.concatenate([w.w_k.numpy(), zero], -1)
    for h in range(4):
        s = np.linalg.svd(w_q[h].T @ w_k[h], compute_uv=False)[:8]
        np.testing.assert_allclose(np.asarray(layer.S[h]), s, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(layer.bilinear()[h]), w_q[h].T @ w_k[h], atol=1e-5)


def test_spectrum_top_one_keeps_the_leading_mode_and_to_dict_of_one_layer_names_its_form():
    """``top(1)`` is the largest mode (not a refusal); a one-layer spectrum's summary reads its own layer."""
    rng = np.random.default_rng(3)
    U, V = rng.standard_normal((2, 2, 6, 3))
    S = np.array([[3.0, 2.0, 1.0], [5.0, 4.0, 0.5]])
    layer = LayerSpectrum(4, U, S, V, augmented=False)
    first = layer.top(1)
    np.testing.assert_array_equal(first.S, S[:, :1])
    np.testing.assert_array_equal(first.U, U[..., :1])
    assert LayerSpectrum(4, U, S, V, augmented=True).top(2).augmented is True
    with pytest.raises(qkhooks.QKHooksError, match="modes must be >= 1"):
        layer.top(0)
    summary = qkhooks.QKSpectrum([LayerSpectrum(0, U[:, :5], S, V[:, :5], augmented=True)], model="m").to_dict()
    assert summary["augmented"] is True


def test_spectrum_table_names_an_unnamed_model_and_counts_a_single_mode_as_a_whole_fraction():
    """One head with one mode whose cosine (1.0) lies above the random band: fraction 1.00, not 0.50."""
    u = np.ones((1, 4, 1))
    table = qkhooks.QKSpectrum([LayerSpectrum(0, u, np.ones((1, 1)), u)]).table()
    assert table.splitlines()[0].startswith("QK spectrum of model: d=4,")
    assert "1.00" in table and "0.50" not in table


def test_spectrum_is_labelled_with_the_spec_the_model_was_loaded_from():
    from conftest import TINY_MODELS

    model = TINY_MODELS[0].model()
    model.qkhooks_spec = "timm:some_vit"
    assert qkhooks.spectrum(model).model == "timm:some_vit"
    assert qkhooks.spectrum(model, name="mine").model == "mine"
