"""Tests of ``qkhooks/spectrum.py`` written to kill the survivors of its mutation run (tests/MUTATION.md), each
against an independent reference (numpy on the model's weights, or the arrays the object holds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks._version import REMOVED_IN
from qkhooks.spectrum import LayerSpectrum


_OLD_DICT_MESSAGE = ("RunReader.spectrum(l) now returns a LayerSpectrum (.U, .S, .V, .cos); for the stored arrays as a "
                     f"dict use RunReader.spectrum_arrays(l). The dict use is removed in qkhooks {REMOVED_IN}.")


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


# ------------------------------------------------------------------ review 18: all-mode statistics, null modes
def _numpy_modes(site):
    """Per head, a numpy float64 SVD of the dense W_q^T W_k (METHODS A.1): S (H, d_k), cos (H, d_k), the form."""
    w = site.weights()
    S, cos, forms = [], [], []
    for h in range(site.num_heads):
        m = w.w_q[h].double().numpy().T @ w.w_k[h].double().numpy()
        u, s, vt = np.linalg.svd(m)
        k = site.head_dim
        S.append(s[:k])
        cos.append((u[:, :k] * vt[:k].T).sum(0))  # unit columns; the joint sign flip leaves u_n·v_n unchanged
        forms.append(m)
    return np.array(S), np.array(cos), forms


def _numpy_weighted(S, cos):
    """METHODS A.2 per head: sum_n (sigma_n / sum_m sigma_m) cos_n over the modes given."""
    return (S / S.sum(1, keepdims=True) * cos).sum(1)


def test_a_recordings_truncated_spectrum_gives_the_all_mode_weighted_cosine_live_and_stored(tmp_path):
    """modes=2 of d_k=8: live ``run.spectrum(l)``/``run.qk_spectrum`` and the run file's ``RunReader.spectrum(l)``/
    ``.qk_spectrum`` give METHODS A.2's sum over all 8 modes (numpy SVD), not the 2 kept modes renormalised (review 18
    F1: 0.0597 instead of 0.0256 on the reviewer's model); the kept arrays stay (H, d, 2). A file without the every-mode
    S_all/cos_all refuses instead of renormalising."""
    import h5py

    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from qkhooks.spectrum import head_weighted_cosines

    from conftest import TINY_MODELS

    model = TINY_MODELS[0].model()
    ref = {site.layer: _numpy_modes(site)[:2] for site in qkhooks.sites(model)}
    with qkhooks.record(model, modes=2) as live, torch.no_grad():
        live(TINY_MODELS[0].images(1))
    rng = np.random.default_rng(0)
    items = [{"image": rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "id": f"im{i}"} for i in range(2)]
    path = tmp_path / "r.h5"
    qkhooks.record_dataset(LoadedModel(model, "tiny", ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)),
                           items, path, modes=2, progress=False, reducers=[])
    with qkhooks.open_run(path) as run:
        stored = {l: run.spectrum(l) for l in (0, 1)}
        stored_by_layer = run.qk_spectrum.cosine_weighted_by_layer()
        stored_table = run.qk_spectrum.table()
    for l, (S, cos) in ref.items():
        want = _numpy_weighted(S, cos)
        kept_only = _numpy_weighted(S[:, :2], cos[:, :2])
        assert np.abs(kept_only - want).max() > 1e-2  # the old, renormalised number is another one
        for spec in (live.spectrum(l), stored[l]):
            np.testing.assert_allclose(np.asarray(spec.cosine_weighted), want, atol=1e-5)
            assert spec.truncated and spec.num_modes == 2 and tuple(spec.S.shape) == (4, 2) and spec.U.shape[-1] == 2
        assert live.qk_spectrum.cosine_weighted_by_layer()[l] == pytest.approx(want.mean(), abs=1e-5)
        assert stored_by_layer[l] == pytest.approx(want.mean(), abs=1e-5)
        row = stored_table.splitlines()[2 + l].split()
        assert row[2] == "2/8" and row[4] == f"{want.mean():.3f}"
        np.testing.assert_allclose(head_weighted_cosines(S, cos), want, rtol=1e-12)
    with h5py.File(path, "r+") as f:  # a file from before runs stored every mode's sigma and cosine
        for l in (0, 1):
            del f[f"spectrum/L{l}/S_all"], f[f"spectrum/L{l}/cos_all"]
    with qkhooks.open_run(path) as run:
        old = run.spectrum(0)
        assert old.truncated and old.num_modes == 2
        with pytest.raises(qkhooks.QKHooksError, match=r"keeps only the top 2 modes .* cannot give the sigma-weighted"):
            old.cosine_weighted
        with pytest.raises(qkhooks.QKHooksError, match="S_all"):
            run.qk_spectrum.cosine_weighted_by_layer()


def test_top_of_a_spectrum_keeps_every_modes_statistics_and_a_truncated_one_without_them_refuses():
    """``top(k)`` (what a recording keeps) carries the whole spectrum's sigma and cosine, so cosine_weighted,
    cosine_weighted_by_layer, to_dict and table are the all-mode numbers; a spectrum marked truncated that does not
    know the other modes refuses every one of them rather than renormalising over its K modes."""
    rng = np.random.default_rng(5)
    U, V = rng.standard_normal((2, 2, 6, 4))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    S = np.array([[4.0, 3.0, 2.0, 1.0], [5.0, 1.0, 0.5, 0.25]])
    whole = LayerSpectrum(0, U, S, V)
    cos = (U * V).sum(1)
    want = _numpy_weighted(S, cos)
    for k in (1, 2, 3):
        top = whole.top(k)
        np.testing.assert_allclose(top.cosine_weighted, want, rtol=1e-12)
        np.testing.assert_allclose(top.top(1).cosine_weighted, want, rtol=1e-12)  # top of a top: still all modes
        assert top.truncated and top.S.shape == (2, k) and top.top(1).truncated
        summary = qkhooks.QKSpectrum([top]).to_dict()["layers"][0]
        assert summary["cosine_weighted"] == pytest.approx(want.mean(), rel=1e-12)
        assert [h["cosine_weighted"] for h in summary["heads"]] == pytest.approx(want.tolist(), rel=1e-12)
        assert len(summary["heads"][0]["singular_values"]) == k
    assert whole.top(None) is whole and not whole.truncated
    blind = LayerSpectrum(0, U[..., :2], S[:, :2], V[..., :2], truncated=True)
    for call in (lambda: blind.cosine_weighted, lambda: blind.top(1).cosine_weighted,
                 lambda: qkhooks.QKSpectrum([blind]).cosine_weighted_by_layer(),
                 lambda: qkhooks.QKSpectrum([blind]).table(), lambda: qkhooks.QKSpectrum([blind]).to_dict()):
        with pytest.raises(qkhooks.QKHooksError, match="keeps only the top"):
            call()


def test_a_head_without_weights_has_no_weighted_cosine_and_null_modes_are_left_out_of_the_band_fractions(tmp_path):
    """Head 2 of layer 0 with W_q = 0 (every sigma 0) and head 1 with 3 of its 8 query rows zero (3 null modes): the
    all-null head's weighted cosine is NaN and the layer mean is over the other heads; the table's cos>band /
    cos<-band fractions and Fig. S1's histogram count only the modes above numpy's matrix_rank tolerance (float32
    eps), which is the matrix rank of each head's dense form (review 18 F6)."""
    from conftest import TINY_MODELS

    model = TINY_MODELS[0].model()
    site = qkhooks.sites(model)[0]
    d, dk = site.dim, site.head_dim
    with torch.no_grad():
        w = model.blocks[0].attn.qkv.weight
        w[2 * dk:3 * dk] = 0  # head 2: W_q = 0
        w[dk:dk + 3] = 0  # head 1: 3 query rows zero, so W_q^T W_k has rank 5
    S, cos, forms = _numpy_modes(site)
    rank = np.array([np.linalg.matrix_rank(m, tol=np.linalg.svd(m, compute_uv=False)[0] * d
                                           * np.finfo(np.float32).eps) if np.any(m) else 0 for m in forms])
    assert rank.tolist() == [8, 5, 0, 8]
    layer = qkhooks.spectrum(model)[0]
    weighted = np.asarray(layer.cosine_weighted, np.float64)
    assert np.isnan(weighted[2]) and np.isfinite(weighted[[0, 1, 3]]).all()
    want = _numpy_weighted(S[[0, 1, 3]], cos[[0, 1, 3]])
    np.testing.assert_allclose(weighted[[0, 1, 3]], want, atol=1e-5)
    spec = qkhooks.spectrum(model, layers=[0])
    assert spec.cosine_weighted_by_layer()[0] == pytest.approx(want.mean(), abs=1e-5)  # not (sum + 0) / 4
    band = spec.random_baseline_cos95
    counted = np.concatenate([cos[h, :r] for h, r in enumerate(rank)])  # numpy sorts modes by sigma: nulls last
    row = spec.table().splitlines()[2].split()
    assert row[4] == f"{want.mean():.3f}" and row[7] == str(int(8 * 4 - rank.sum()))
    assert row[5] == f"{(counted > band).mean():.2f}" and row[6] == f"{(counted < -band).mean():.2f}"
    from qkhooks.spectrum import null_modes

    null = null_modes(layer.S, d)
    assert (~null).sum(1).tolist() == rank.tolist() and layer.null_modes.tolist() == null.tolist()
    assert sorted(layer.non_null_cosines()) == pytest.approx(sorted(counted), abs=1e-5)
    assert tuple(layer.S.shape) == tuple(layer.cos.shape) == (4, 8)  # the per-mode arrays keep every mode


def test_fig3_and_fig_s1_plot_every_modes_numbers_of_a_recordings_truncated_spectrum(monkeypatch, tmp_path):
    """The figures draw numpy's numbers from the weights: a recording with modes=2 of d_k=8 (its spectrum truncated,
    carrying every mode's sigma and cosine), layer 0 with an all-zero head and a rank-5 head. Fig. 3's head dots
    and mean line are each head's sigma-weighted cosine over all 8 modes (the zero head NaN, left out of the mean);
    Fig. S1's bars count the non-null modes' cosines in 40 bins over [-1, 1], its title the share outside the
    band."""
    import qkhooks.plots as plots
    from conftest import TINY_MODELS

    tiny = TINY_MODELS[0]
    model = tiny.model()
    sites = qkhooks.sites(model)
    d, dk = sites[0].dim, sites[0].head_dim
    with torch.no_grad():
        w = model.blocks[0].attn.qkv.weight
        w[2 * dk:3 * dk] = 0  # head 2: W_q = 0
        w[dk:dk + 3] = 0  # head 1: rank 5
    with qkhooks.record(model, modes=2) as run, torch.no_grad():
        model(tiny.images(2, 0))
    spec = run.qk_spectrum
    assert all(layer.truncated and layer.num_modes == 2 for layer in spec)
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.setdefault(Path(path).name, fig) and path)
    plots.plot_cosine_by_layer(spec, tmp_path / "fig3.png")
    plots.plot_cosine_histograms(spec, tmp_path / "figs1.png")
    fig3 = drawn["fig3.png"].axes[0]
    dots = np.concatenate([c.get_offsets() for c in fig3.collections if len(c.get_offsets()) and
                           type(c).__name__ == "PathCollection"])
    (mean_line,) = [line for line in fig3.get_lines() if line.get_marker() == "o"]
    band = 1.96 / np.sqrt(d)
    for i, site in enumerate(sites):
        S, cos, forms = _numpy_modes(site)
        rank = np.array([np.linalg.matrix_rank(m, tol=np.linalg.svd(m, compute_uv=False)[0] * d
                                               * np.finfo(np.float32).eps) if np.any(m) else 0 for m in forms])
        with np.errstate(invalid="ignore"):
            weighted = _numpy_weighted(S, cos)  # NaN for a head whose sigma are all 0
        if i == 0:
            assert rank.tolist() == [8, 5, 0, 8] and np.isnan(weighted[2])
        heads = dots[dots[:, 0] == site.layer][:, 1]
        np.testing.assert_allclose(heads, weighted, atol=1e-5)  # NaN where NaN
        assert mean_line.get_ydata()[i] == pytest.approx(np.nanmean(weighted), abs=1e-5)
        counted = np.concatenate([cos[h, :r] for h, r in enumerate(rank)])
        axis = drawn["figs1.png"].axes[i]
        heights = [bar.get_height() for bar in axis.patches if bar.get_width() < 0.1]  # the bins, not the band
        np.testing.assert_array_equal(heights, np.histogram(counted, bins=np.linspace(-1, 1, 41))[0])
        assert axis.get_title() == f"L{site.layer}: {np.mean(np.abs(counted) > band):.0%} outside"
