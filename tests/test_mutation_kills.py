"""Tests written to kill mutants that survived the rest of the suite (see tests/MUTATION.md), each against an
independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_spectrum_summaries_agree_with_numpy():
    """table(), to_dict(), top(), bilinear(), lookup and layer selection, each against the arrays themselves."""
    from qkhooks.spectrum import head_weighted_cosines, random_cosine_band

    model = TINY_MODELS[0].model()
    spec = qkhooks.spectrum(model, name="tiny")
    assert len(spec) == 2 and [s.layer for s in spec] == [0, 1] and spec.dim == 32
    band = 1.96 / np.sqrt(32)
    assert spec.random_baseline_cos95 == pytest.approx(band) and random_cosine_band(32, z=1.0) == pytest.approx(32**-0.5)
    lines = spec.table().splitlines()
    assert lines[0] == f"QK spectrum of tiny: d=32, random 95% cosine band +-{band:.3f}"
    assert lines[1].split() == ["layer", "heads", "modes", "sigma_max", "cos_w", "cos>band", "cos<-band", "null"]
    js = spec.to_dict()
    assert js["model"] == "tiny" and js["dim"] == 32 and js["augmented"] is False
    for row, layer, entry in zip(lines[2:], spec, js["layers"]):
        s, cos = layer.S.double().numpy(), layer.cos.double().numpy()
        weighted = (s / s.sum(1, keepdims=True) * cos).sum(1)
        np.testing.assert_allclose(head_weighted_cosines(s, cos), weighted, rtol=1e-12)
        expected = [layer.layer, 4, 8, f"{s.max():.3f}", f"{weighted.mean():.3f}", f"{(cos > band).mean():.2f}",
                    f"{(cos < -band).mean():.2f}", 0]
        assert row.split() == [str(e) for e in expected]
        assert entry["layer"] == layer.layer and entry["cosine_weighted"] == pytest.approx(weighted.mean(), abs=1e-6)
        for h, head in enumerate(entry["heads"]):
            assert head["head"] == h
            np.testing.assert_allclose(head["singular_values"], s[h], rtol=1e-6)
            np.testing.assert_allclose(head["cosine"], cos[h], atol=1e-6)
    # a head without any weight has no weighted cosine (0/0): NaN, left out of layer means (review 18 F6)
    assert np.isnan(head_weighted_cosines(np.zeros((1, 3)), np.ones((1, 3)))).tolist() == [True]
    # the dense form of all modes is W_q^T W_k; the leading k modes are the first k columns
    w = qkhooks.sites(model)[0].weights()
    dense = (w.w_q.double().transpose(1, 2) @ w.w_k.double()).float()
    torch.testing.assert_close(spec[0].bilinear(), dense, atol=1e-5, rtol=1e-4)
    top = spec.top(3)
    assert top.model == "tiny" and len(top) == 2
    assert top[1].S.shape == (4, 3) and torch.equal(top[1].U, spec[1].U[..., :3]) and torch.equal(top[1].V, spec[1].V[..., :3])
    assert spec[0].top(None) is spec[0] and spec[0].top(8) is spec[0]
    with pytest.raises(qkhooks.QKHooksError, match="modes must be >= 1"):
        spec[0].top(0)
    with pytest.raises(qkhooks.QKHooksError, match=r"layer 5 is not in this spectrum; it has layers \[0, 1\]"):
        spec[5]
    only = qkhooks.spectrum(model, layers="1")
    assert [s.layer for s in only] == [1] and torch.equal(only[1].S, spec[1].S)
    assert only.model == type(model).__name__
    from_sites = qkhooks.spectrum(qkhooks.sites(model), layers=[0])
    assert [s.layer for s in from_sites] == [0] and torch.equal(from_sites[0].U, spec[0].U)


def test_attention_specs_parse_and_refuse_clearly():
    from qkhooks.attention import AttentionSpec, parse_attention

    assert parse_attention(None) == [] and parse_attention("none") == []
    assert parse_attention("rows+full:1,3") == [AttentionSpec("rows"), AttentionSpec("full", (1, 3))]
    assert parse_attention(AttentionSpec("pooled")) == [AttentionSpec("pooled")]
    assert parse_attention(["rows", AttentionSpec("full", (0,))]) == [AttentionSpec("rows"), AttentionSpec("full", (0,))]
    assert AttentionSpec("rows").covers(7) and AttentionSpec("full", (1, 3)).covers(3)
    assert not AttentionSpec("full", (1, 3)).covers(2)
    with pytest.raises(qkhooks.QKHooksError, match="attention kinds repeat"):
        parse_attention("rows+rows")
    with pytest.raises(qkhooks.QKHooksError, match=r"unknown attention kind 'maps'; use one of rows, pooled, full"):
        parse_attention("maps:1")
    with pytest.raises(qkhooks.QKHooksError, match="attention kind 'maps' is unknown"):
        AttentionSpec("maps")  # type: ignore[arg-type]
    for sites in (None, qkhooks.sites(TINY_MODELS[0].model())):  # "full:" is a typo, not every layer, with or without a model
        with pytest.raises(qkhooks.QKHooksError, match=r"'full:' names no layers after the colon: write full:LAYERS"):
            parse_attention("rows+full:", sites)


def _eager_and_tokens(tiny):
    from conftest import eager_attention

    model, images = tiny.model(), tiny.images()
    got: dict[int, torch.Tensor] = {}
    sites = qkhooks.sites(model)
    handles = [s.module.register_forward_pre_hook(
        lambda m, a, kw, layer=s.layer: got.__setitem__(layer, (a[0] if a else kw["hidden_states"]).detach()),
        with_kwargs=True) for s in sites]
    try:
        eager = eager_attention(tiny, model, images)
    finally:
        for h in handles:
            h.remove()
    return sites, got, eager


def test_attention_helpers_against_the_models_eager_attention():
    """rows for 1-D and per-image tokens, both code paths, pooling of patch-grid and all-token masks, refusals."""
    from qkhooks.attention import attention_full, attention_rows, pool_rows

    tiny = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6")
    sites, x, eager = _eager_and_tokens(tiny)
    site, ref = sites[1], eager[1]
    torch.testing.assert_close(attention_full(site, x[1]), ref, atol=1e-5, rtol=1e-4)
    shared = torch.tensor([0, 15])  # 1-D: the same tokens for every image
    torch.testing.assert_close(attention_rows(site, x[1], shared), ref[:, :, [0, 15]], atol=1e-5, rtol=1e-4)
    many = torch.arange(8).repeat(2, 1)  # heads x tokens >= d: the path that computes the keys
    torch.testing.assert_close(attention_rows(site, x[1], many), ref[:, :, :8], atol=1e-5, rtol=1e-4)
    with pytest.raises(qkhooks.QKHooksError, match="query_tokens has 3 rows for a batch of 2 images"):
        attention_rows(site, x[1], torch.zeros(3, 1, dtype=torch.long))
    for bad in (25, -1):
        with pytest.raises(qkhooks.QKHooksError, match=r"query_tokens must index tokens 0\.\.24"):
            attention_rows(site, x[1], torch.tensor([[0, bad], [0, 1]]))
    rows = ref[:, :, [0, 15]]
    grid_masks = torch.rand(2, 3, 4, 6)  # (B, M, rows, cols) on the patch grid; prefix tokens get no mass
    expected = torch.einsum("bhtn,bmn->bhtm", rows[..., 1:], grid_masks.flatten(2))
    torch.testing.assert_close(pool_rows(rows, grid_masks, 1), expected)
    all_tokens = torch.rand(2, 3, 25)
    torch.testing.assert_close(pool_rows(rows, all_tokens, 1), torch.einsum("bhtn,bmn->bhtm", rows, all_tokens))
    with pytest.raises(qkhooks.QKHooksError, match=r"pool_masks must be \(batch, masks, tokens\) with 25 tokens or 24"):
        pool_rows(rows, torch.rand(2, 3, 23), 1)
    with pytest.raises(qkhooks.QKHooksError, match="for a batch of 2"):
        pool_rows(rows, torch.rand(1, 3, 25), 1)


def test_a_model_without_prefix_tokens_gets_its_centre_patch_twice():
    from qkhooks.attention import default_query_tokens

    tiny = next(t for t in TINY_MODELS if t.prefix == 0)  # SigLIP: 4 x 4 patches, no CLS
    site = qkhooks.sites(tiny.model())[0]
    assert default_query_tokens(site, 16).tolist() == [[10, 10]]  # row 2, column 2 of a 4 x 4 grid


def test_default_query_tokens_are_integer_indices_on_odd_grids_too():
    from qkhooks.attention import default_query_tokens

    site = qkhooks.sites(next(t for t in TINY_MODELS if t.prefix == 0).model())[0]
    tokens = default_query_tokens(site, 16)  # the native 4 x 4, no prefix token: the centre patch twice
    assert tokens.dtype == torch.long and tokens.tolist() == [[10, 10]]
    with pytest.raises(qkhooks.QKHooksError, match="a square is never assumed"):  # 9 tokens: not its grid, never a guess
        default_query_tokens(site, 9)
    odd = qkhooks.sites(next(t for t in TINY_MODELS if t.grid == (4, 6)).model())[0]
    assert default_query_tokens(odd, 25).tolist() == [[0, 1 + 2 * 6 + 3]]  # CLS, then row 2, column 3 of 4 x 6


def test_mode_projector_follows_the_dtype_of_its_input():
    """Its cached weights are per (device, dtype): a float64 call after a float32 one stays float64 and exact."""
    from qkhooks.projector import ModeProjector

    model = TINY_MODELS[0].model()
    layer = qkhooks.spectrum(model)[0]
    projector = ModeProjector(layer)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    projector(x.float())
    query, key = projector(x)
    assert query.dtype == key.dtype == torch.float64
    torch.testing.assert_close(query, torch.einsum("bnd,hdk->bhkn", x, layer.U.double()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(key, torch.einsum("bnd,hdk->bhkn", x, layer.V.double()), rtol=1e-12, atol=1e-12)


def test_geometry_source_box_scales_the_window_back_to_source_pixels():
    from qkhooks.data import Geometry

    # resized 100 x 200 -> 50 x 80 (row scale 2, column scale 2.5); window 40 x 90 from row 5, column -4
    box = Geometry(source_hw=(100, 200), resized_hw=(50, 80), top=5, left=-4, output_hw=(40, 90)).source_box()
    assert box == pytest.approx((5 * 2, -4 * 2.5, (5 + 40) * 2, (-4 + 90) * 2.5))


def test_augmented_mode_projector_maps_equal_the_tokens_with_a_one_appended_for_every_image_on_their_device():
    """[x; 1]·u_n and [x; 1]·v_n computed directly, for a batch of three (a batch of one hides a reshape that mixes
    images), and the maps made on the tokens' device: the meta device stands in for a GPU (no values, but a
    weight left on the CPU is refused by the biased matmul)."""
    from qkhooks.projector import ModeProjector

    layer = qkhooks.spectrum(TINY_MODELS[0].model(), augmented=True)[0]
    assert layer.augmented
    projector = ModeProjector(layer)
    x = torch.randn(3, 5, layer.dim, dtype=torch.float64)
    x1 = torch.cat([x, torch.ones(3, 5, 1, dtype=torch.float64)], dim=-1)
    query, key = projector(x)
    torch.testing.assert_close(query, torch.einsum("bnd,hdk->bhkn", x1, layer.U.double()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(key, torch.einsum("bnd,hdk->bhkn", x1, layer.V.double()), rtol=1e-12, atol=1e-12)
    query_meta, key_meta = projector(x.to("meta"))
    assert query_meta.device.type == key_meta.device.type == "meta"
    assert query_meta.shape == key_meta.shape == query.shape


def _qk_of(x: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, H, N, d_k) as the model's Linear makes them, biases included where it has them."""
    q = torch.einsum("bnd,hed->bhne", x, weights.w_q.double())
    k = torch.einsum("bnd,hed->bhne", x, weights.w_k.double())
    if weights.b_q is not None:
        q = q + weights.b_q.double()[None, :, None, :]
    if weights.b_k is not None:
        k = k + weights.b_k.double()[None, :, None, :]
    return q, k


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["with-biases", "bias-free"])
def test_qk_outputs_path_equals_the_tokens_projected_on_the_modes_with_and_without_biases(qkv_bias):
    """QKPathProjector on q, k made from random tokens equals x·u_n and x·v_n formed directly, for a model with
    q/k biases and one without; a float64 call after a float32 one stays float64; an augmented spectrum is refused. (The spectrum is float32: agreement to 1e-5.)"""
    import timm

    from qkhooks.projector import QKPathProjector

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              qkv_bias=qkv_bias).eval()
    site = qkhooks.sites(model)[0]
    weights, layer = site.weights(), qkhooks.spectrum(model)[0]
    assert (weights.b_q is None) is (not qkv_bias)
    x = torch.randn(2, 5, site.dim, dtype=torch.float64)
    q, k = _qk_of(x, weights)
    projector = QKPathProjector(layer, weights)
    projector(q.float(), k.float())
    query, key = projector(q, k)
    assert query.dtype == key.dtype == torch.float64
    torch.testing.assert_close(query, torch.einsum("bnd,hdk->bhkn", x, layer.U.double()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(key, torch.einsum("bnd,hdk->bhkn", x, layer.V.double()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^the q/k path needs the bias-free spectrum$"):
        QKPathProjector(qkhooks.spectrum(model, augmented=True)[0], weights)


def test_qk_outputs_path_gives_zero_maps_for_a_layer_whose_modes_all_have_sigma_zero():
    """W_q = 0: every sigma_n is 0. The query maps from q are zero and finite (a_n is W_q^T a = u_n's least-squares
    solution, 0, not 0/0), and qk_path_check refuses the layer (u_n is not in W_q's row space: residual 1), so a
    recording takes its maps from x; the key maps from k are x·v_n (v_n is in W_k's row space, c_n exact)."""
    import timm

    from qkhooks.projector import QKPathProjector, qk_path_check

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1).eval()
    with torch.no_grad():
        qkv = model.blocks[0].attn.qkv
        qkv.weight[: qkv.in_features].zero_()
        qkv.bias[: qkv.in_features].zero_()
    site = qkhooks.sites(model)[0]
    weights, layer = site.weights(), qkhooks.spectrum(model)[0]
    assert float(layer.S.abs().max()) == 0.0
    x = torch.randn(2, 5, site.dim, dtype=torch.float64)
    q, k = _qk_of(x, weights)
    query, key = QKPathProjector(layer, weights)(q, k)
    assert torch.equal(query, torch.zeros_like(query))
    torch.testing.assert_close(key, torch.einsum("bnd,hdk->bhkn", x, layer.V.double()), rtol=1e-5, atol=1e-6)
    check = qk_path_check(layer, weights)
    assert not check.fits and float(check.residual[0].min()) > 0.99
    with qkhooks.record(model, modes=4) as run:
        pass
    assert run.mode_source == {0: "x"}


@pytest.mark.parametrize("name", ["timm-vit-4x6", "hf-vit-4x6-key-first"])
def test_attention_logits_of_every_key_are_the_models_eager_attention_before_its_softmax(name):
    """``_logits`` (the benchmarks' reference, every key computed) softmaxed equals the model's own eager maps, for
    all tokens and for a subset of query tokens; under RoPE a subset of queries is refused with the whole message."""
    from qkhooks.attention import _logits

    tiny = next(t for t in TINY_MODELS if t.name == name)
    sites, x, eager = _eager_and_tokens(tiny)
    for site in sites:
        tokens = x[site.layer]
        torch.testing.assert_close(torch.softmax(_logits(site, tokens, tokens), -1), eager[site.layer],
                                   atol=1e-5, rtol=1e-4)
        some = tokens[:, [0, 7, 13]]
        torch.testing.assert_close(torch.softmax(_logits(site, some, tokens), -1), eager[site.layer][:, :, [0, 7, 13]],
                                   atol=1e-5, rtol=1e-4)
    import timm

    bias_free = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                                  qkv_bias=False).eval()
    for site, tokens in [(s, x[s.layer]) for s in sites] + [(qkhooks.sites(bias_free)[0], torch.randn(2, 17, 192))]:
        q, k = _qk_of(tokens.double(), site.weights())  # the logits themselves: the key bias does not cancel here
        torch.testing.assert_close(_logits(site, tokens, tokens).double(), q @ k.transpose(-1, -2) * site.scale,
                                   atol=1e-5, rtol=1e-4)
    site, tokens = sites[0], x[0]
    site.rotates = lambda: True  # stands in for a RoPE site: each token is rotated by its own position
    message = (f"{site.path}: RoPE rotates each token by its own position, so q cannot come from a subset of the "
               "tokens; use rows_from_qk(site, *site.qk(x), query_tokens).")
    with pytest.raises(qkhooks.QKHooksError) as refused:
        _logits(site, tokens[:, :2], tokens)
    assert str(refused.value) == message


def test_pool_rows_takes_boolean_and_float32_masks_for_float64_rows():
    """Masks come as booleans (segmentations) or in another dtype than the rows: pooled in the rows' dtype."""
    from qkhooks.attention import pool_rows

    rows = torch.rand(2, 3, 2, 25, dtype=torch.float64)
    masks = torch.rand(2, 4, 25) > 0.5
    want = torch.einsum("bhtn,bmn->bhtm", rows, masks.double())
    for given in (masks, masks.float()):
        pooled = pool_rows(rows, given, 1)
        assert pooled.dtype == torch.float64
        torch.testing.assert_close(pooled, want, rtol=1e-12, atol=1e-12)


def test_attention_rows_of_a_class_attention_layer_refuse_tokens_other_than_the_class_token():
    """Only the class token queries in class attention (CaiT); a stand-in site marked so refuses token 3."""
    from qkhooks.attention import attention_rows, rows_from_qk

    tiny = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6")
    site = qkhooks.sites(tiny.model())[0]
    site.class_attention = True
    x = torch.randn(2, 25, site.dim)
    for rows in (lambda t: rows_from_qk(site, *site.qk(x), t), lambda t: attention_rows(site, x, t)):
        with pytest.raises(qkhooks.QKHooksError, match=r"class attention: only the class token .* the rows of tokens \[3\]"):
            rows(torch.tensor([[0, 3], [0, 3]]))


def test_attention_full_maps_of_a_class_attention_layer_are_the_class_tokens_row():
    """In class attention only the class token queries: the full maps are (B, H, 1, N), the first row of the
    model's own eager maps (a stand-in site marked so, on the timm 4 x 6 model)."""
    from qkhooks.attention import attention_full

    sites, x, eager = _eager_and_tokens(next(t for t in TINY_MODELS if t.name == "timm-vit-4x6"))
    site = sites[1]
    site.class_attention = True
    maps = attention_full(site, x[1])
    assert maps.shape == (2, site.num_heads, 1, 25)
    torch.testing.assert_close(maps, eager[1][:, :, :1], atol=1e-5, rtol=1e-4)


def test_one_attention_takes_the_maps_of_an_sdpa_call_that_leaves_every_default():
    """A module calling scaled_dot_product_attention(q, k, v) with no other argument: the maps kept are
    softmax(q kᵀ / sqrt(d_k)) formed directly, and the output is torch's own for the same call."""
    from qkhooks.attention import OneAttention

    site = qkhooks.sites(next(t for t in TINY_MODELS if t.name == "timm-vit-4x6").model())[0]
    q, k, v = (torch.randn(2, site.num_heads, 25, site.head_dim) for _ in range(3))
    want_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    mode = OneAttention(site)
    mode.enter()
    try:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    finally:
        mode.leave()
    maps = mode.take()
    torch.testing.assert_close(maps, torch.softmax(q @ k.transpose(-1, -2) / site.head_dim ** 0.5, -1),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("wrong", ["heads", "head_dim"])
def test_one_attention_refuses_an_sdpa_call_whose_q_is_not_the_sites_heads_by_head_dim(wrong):
    """Either the head count or the head width differing from the site's is refused, naming the shape."""
    from qkhooks.attention import OneAttention

    site = qkhooks.sites(next(t for t in TINY_MODELS if t.name == "timm-vit-4x6").model())[0]
    heads, width = (site.num_heads * 2, site.head_dim) if wrong == "heads" else (site.num_heads, site.head_dim * 2)
    q = k = v = torch.randn(2, heads, 25, width)
    mode = OneAttention(site)
    mode.enter()
    try:
        with pytest.raises(qkhooks.QKHooksError) as refused:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
    finally:
        mode.leave()
    assert (f"its attention call has q of shape (2, {heads}, 25, {width}), not the (batch, {site.num_heads} heads, "
            f"tokens, {site.head_dim}) the adapter describes") in str(refused.value)


@pytest.mark.parametrize("form", ["float-mask", "bool-mask", "causal", "scale", "grouped-query"])
def test_one_attention_hands_every_argument_of_the_sdpa_call_on(form):
    """Mask, causal flag, scale and grouped-query heads of the model's call all shape the maps kept: the output
    returned (maps @ v) equals torch's own scaled_dot_product_attention for the same call."""
    from qkhooks.attention import OneAttention

    site = qkhooks.sites(next(t for t in TINY_MODELS if t.name == "timm-vit-4x6").model())[0]
    h, n, dk = site.num_heads, 25, site.head_dim
    kv_heads = h // 2 if form == "grouped-query" else h
    q = torch.randn(2, h, n, dk)
    k, v = torch.randn(2, kv_heads, n, dk), torch.randn(2, kv_heads, n, dk)
    kwargs = {"float-mask": {"attn_mask": torch.randn(n, n)}, "bool-mask": {"attn_mask": torch.rand(n, n) > 0.3},
              "causal": {"is_causal": True}, "scale": {"scale": 0.3}, "grouped-query": {"enable_gqa": True}}[form]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    mode = OneAttention(site)
    mode.enter()
    try:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    finally:
        mode.leave()
    assert mode.take().shape == (2, h, n, n)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_sdpa_maps_of_grouped_query_heads_as_wide_as_they_are_many():
    """Grouped-query heads where head width == head count (4 and 4), so no axis can stand in for another: the
    maps @ v equal torch's own scaled_dot_product_attention."""
    from qkhooks.attention import sdpa_maps

    q = torch.randn(2, 4, 9, 4)
    k, v = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(sdpa_maps(q, k, enable_gqa=True) @ v.repeat_interleave(2, dim=-3), want,
                               atol=1e-6, rtol=1e-5)
