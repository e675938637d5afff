"""Tests written to kill the survivors of the round-10 mutation runs of projector.py, attention.py and spectrum.py
(tests/MUTATION.md). Each compares against an independent reference: numpy, a dense SVD, the per-head weights
applied by hand, or the model's own eager attention; never the implementation's own output.

Names carry the module they target (``spectrum``, ``projector``, ``attention``) so each module's mutation
selection in ``tests/mutation.py`` picks them up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkhooks.spectrum import LayerSpectrum

_OLD_DICT_MESSAGE = ("RunReader.spectrum(l) now returns a LayerSpectrum (.U, .S, .V, .cos); for the stored arrays as a "
                     "dict use RunReader.spectrum_arrays(l).")


def test_spectrum_live_dict_view_keys_values_and_items_are_its_arrays_and_the_numpy_cosine():
    """The deprecated dict view of a computed ``LayerSpectrum``, every accessor (the mutation copy's selection leaves
    out test_spectrum.py's version, whose warning-line check cannot hold under mutmut's trampoline frames)."""
    rng = np.random.default_rng(10)
    U, V = rng.standard_normal((2, 2, 4, 3))
    S = np.sort(rng.random((2, 3)))[:, ::-1].copy()
    layer = LayerSpectrum(0, torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(V))
    cos = (U * V).sum(1) / (np.linalg.norm(U, axis=1) * np.linalg.norm(V, axis=1))
    expected = {"U": U, "S": S, "V": V, "cos": cos}
    with pytest.warns(DeprecationWarning) as caught:
        keys = list(layer.keys())
        values = list(layer.values())
        items = list(layer.items())
        iterated = list(layer)
        inside = ["U" in layer, "cos" in layer, "S_all" in layer]
        by_name = {name: layer[name] for name in expected}
    assert len(caught) == 11 and all(str(w.message) == _OLD_DICT_MESSAGE for w in caught)
    assert all(w.category is DeprecationWarning for w in caught)
    assert keys == iterated == [name for name, _ in items] == ["U", "S", "V", "cos"]
    assert inside == [True, True, False]
    for got in (dict(zip(keys, values)), dict(items), by_name):
        for name, want in expected.items():
            assert isinstance(got[name], np.ndarray)
            np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=0)
