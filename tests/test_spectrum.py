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
