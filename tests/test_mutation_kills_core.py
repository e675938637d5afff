"""Tests written to kill the survivors of the round-10 mutation runs of projector.py, attention.py and spectrum.py
(tests/MUTATION.md). Each compares against an independent reference: numpy, a dense SVD, the per-head weights
applied by hand, or the model's own eager attention; never the implementation's own output.

Names carry the module they target (``spectrum``, ``projector``, ``attention``) so each module's mutation
selection in ``tests/mutation.py`` picks them up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkhooks._version import REMOVED_IN
from qkhooks.spectrum import LayerSpectrum

_OLD_DICT_MESSAGE = ("RunReader.spectrum(l) now returns a LayerSpectrum (.U, .S, .V, .cos); for the stored arrays as a "
                     f"dict use RunReader.spectrum_arrays(l). The dict use is removed in qkhooks {REMOVED_IN}.")


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


# ---------------------------------------------------------------------------------------------------- projector.py

def _random_layer(heads: int, head_dim: int, dim: int, modes: int, q_bias: bool, k_bias: bool, seed: int):
    """Random per-head weights and the top ``modes`` singular triplets of each head's dense W_q^T W_k (numpy SVD)."""
    from qkhooks.models.base import QKWeights

    rng = np.random.default_rng(seed)
    w_q, w_k = rng.standard_normal((2, heads, head_dim, dim))
    b_q, b_k = rng.standard_normal((2, heads, head_dim)) * 3.0
    u, s, vt = np.linalg.svd(np.einsum("hed,hef->hdf", w_q, w_k))  # (H, d, d) dense forms
    spectrum = LayerSpectrum(0, torch.from_numpy(u[..., :modes].copy()), torch.from_numpy(s[:, :modes].copy()),
                             torch.from_numpy(vt.transpose(0, 2, 1)[..., :modes].copy()))
    weights = QKWeights(torch.from_numpy(w_q), torch.from_numpy(w_k), torch.from_numpy(b_q) if q_bias else None,
                        torch.from_numpy(b_k) if k_bias else None)
    return weights, spectrum


@pytest.mark.parametrize("layout", ["tokens", "images", "batched"])
@pytest.mark.parametrize("q_bias, k_bias", [(True, False), (False, True), (True, True), (False, False)],
                         ids=["query-bias-only", "key-bias-only", "both-biases", "no-bias"])
def test_qk_path_projector_with_one_side_biased_and_truncated_modes_equals_the_tokens_on_the_modes(
        monkeypatch, q_bias, k_bias, layout):
    """QKPathProjector on a layer with a bias on one side only (the other side's offset is a zero block), H = 2 heads
    of d_k = 3 (H != d_k), K = 2 < d_k modes: from q, k heads, from the q and k Linear outputs and from a fused
    q|k|v output, the maps equal x·u_n and x·v_n of a numpy SVD of the dense form, in float64 and float32, with
    each shape of product the projector chooses from (forced here)."""
    import qkhooks.projector
    from qkhooks.projector import QKPathProjector

    monkeypatch.setattr(qkhooks.projector, "_product_layout", lambda heads, k: layout)

    heads, head_dim, dim, modes = 2, 3, 7, 2
    weights, spectrum = _random_layer(heads, head_dim, dim, modes, q_bias, k_bias, seed=11)
    x = torch.from_numpy(np.random.default_rng(12).standard_normal((2, 5, dim)))
    q = torch.einsum("bnd,hed->bnhe", x, weights.w_q) + (0 if weights.b_q is None else weights.b_q)
    k = torch.einsum("bnd,hed->bnhe", x, weights.w_k) + (0 if weights.b_k is None else weights.b_k)
    v = torch.randn(2, 5, heads * head_dim, dtype=torch.float64)
    ref_q = np.einsum("bnd,hdk->bhkn", x.numpy(), spectrum.U.numpy())
    ref_k = np.einsum("bnd,hdk->bhkn", x.numpy(), spectrum.V.numpy())
    projector = QKPathProjector(spectrum, weights)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        got = {
            "heads": projector(qd.transpose(1, 2), kd.transpose(1, 2)),
            "linear": projector.from_linear(qd.flatten(2), kd.flatten(2)),
            "fused": projector.from_fused(torch.cat([qd.flatten(2), kd.flatten(2), vd], -1)),
        }
        for name, (query, key) in got.items():
            assert query.dtype == key.dtype == dtype, name
            assert query.shape == key.shape == (2, heads, modes, 5), name
            np.testing.assert_allclose(query.detach().double().numpy(), ref_q, rtol=0, atol=tol * np.abs(ref_q).max(), err_msg=name)
            np.testing.assert_allclose(key.detach().double().numpy(), ref_k, rtol=0, atol=tol * np.abs(ref_k).max(), err_msg=name)


# ---------------------------------------------------------------------------------------------------- attention.py

def _vit(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             **kwargs).eval()


@pytest.fixture(scope="module")
def plain_vits():
    """One-block timm ViTs (d = 192, 3 heads of 64): with q/k biases, and without."""
    return {True: _vit(), False: _vit(qkv_bias=False)}


def _numpy_logits(site, x: torch.Tensor) -> np.ndarray:
    """scale · q kᵀ of every head (B, H, N, N), with the qkv Linear's weights and biases applied in numpy."""
    qkv = site.module.qkv
    w = qkv.weight.detach().double().numpy()
    b = np.zeros(w.shape[0]) if qkv.bias is None else qkv.bias.detach().double().numpy()
    h, dk = site.num_heads, site.head_dim
    out = x.detach().double().numpy() @ w.T + b  # (B, N, 3 H dk)
    q, k = (out[..., i * h * dk:(i + 1) * h * dk].reshape(*x.shape[:2], h, dk).transpose(0, 2, 1, 3) for i in (0, 1))
    return q @ k.transpose(0, 1, 3, 2) * site.scale


def _numpy_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_attention_spec_of_an_unknown_kind_is_refused_with_the_whole_message():
    from qkhooks import QKHooksError
    from qkhooks.attention import AttentionSpec

    with pytest.raises(QKHooksError) as refused:
        AttentionSpec("maps")  # type: ignore[arg-type]
    assert str(refused.value) == "attention kind 'maps' is unknown; use one of rows, pooled, full (no attention: attention=None)."


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["with-biases", "bias-free"])
def test_attention_rows_and_logits_of_float64_tokens_on_a_float32_model_equal_numpy(plain_vits, qkv_bias):
    """float64 tokens into a float32 model (weights and biases cast to the tokens' dtype): the rows of few query
    tokens (the path that never computes the keys), the rows from q and k, and the every-key logits equal numpy."""
    import qkhooks
    from qkhooks.attention import _logits, attention_rows

    site = qkhooks.sites(plain_vits[qkv_bias])[0]
    x = torch.from_numpy(np.random.default_rng(20).standard_normal((2, 17, site.dim)))
    ref = _numpy_logits(site, x)
    tokens = torch.tensor([[0, 5], [16, 3]])
    assert site.num_heads * tokens.shape[1] < site.dim  # the key-free row path
    want = np.take_along_axis(_numpy_softmax(ref), tokens.numpy()[:, None, :, None], 2)
    np.testing.assert_allclose(attention_rows(site, x, tokens).detach().double().numpy(), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_logits(site, x, x).detach().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_attention_rows_of_a_qk_norm_model_equal_its_eager_attention_for_few_and_many_tokens():
    """q/k-norm scales each key by its own norm, so the key-free row path must not be taken: rows of two query
    tokens (heads x tokens < d) and of every token equal the model's own eager softmax (captured at attn_drop)."""
    import qkhooks
    from qkhooks.attention import attention_rows

    model = _vit(qk_norm=True)
    site = qkhooks.sites(model)[0]
    assert site.keys_shape_logits()
    x = torch.randn(2, 17, site.dim, generator=torch.Generator().manual_seed(21))
    seen = []
    site.module.fused_attn = False
    handle = site.module.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            site.module(x)
    finally:
        handle.remove()
    eager = seen[0]
    for tokens in (torch.tensor([0, 9]), torch.arange(17)):
        torch.testing.assert_close(attention_rows(site, x, tokens), eager[:, :, tokens], atol=1e-5, rtol=1e-4)


def test_attention_rows_with_the_models_additive_term_add_it_to_the_rows_of_their_own_query_tokens(plain_vits):
    """A stand-in site given an additive term (as a recording binds BEiT's position bias or a mask): rows of a few
    tokens, rows from q and k, and full maps all equal numpy's softmax(scale q kᵀ + bias) at the rows asked."""
    import qkhooks
    from qkhooks.attention import attention_full, attention_rows, rows_from_qk

    site = qkhooks.sites(plain_vits[True])[0]
    x = torch.randn(2, 17, site.dim, generator=torch.Generator().manual_seed(22))
    bias = torch.randn(1, site.num_heads, 17, 17, generator=torch.Generator().manual_seed(23)) * 4
    site._call_bias = bias
    try:
        full = _numpy_softmax(_numpy_logits(site, x) + bias.detach().double().numpy())
        tokens = torch.tensor([[1, 7], [12, 0]])
        want = np.take_along_axis(full, tokens.numpy()[:, None, :, None], 2)
        np.testing.assert_allclose(attention_rows(site, x, tokens).detach().double().numpy(), want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(rows_from_qk(site, *site.qk(x), tokens).detach().double().numpy(), want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(attention_full(site, x).detach().double().numpy(), full, rtol=0, atol=1e-5)
    finally:
        site._call_bias = None


def test_attention_full_maps_of_a_talking_heads_site_mix_heads_around_the_softmax(plain_vits):
    """A stand-in site with CaiT's talking heads (random head-mixing Linears): maps = mix_w(softmax(mix_l(logits)))
    formed in numpy."""
    import qkhooks
    from qkhooks.attention import attention_full
    from qkhooks.models.class_attention import TalkingHeads

    site = qkhooks.sites(plain_vits[True])[0]
    torch.manual_seed(24)
    mix_l, mix_w = torch.nn.Linear(site.num_heads, site.num_heads), torch.nn.Linear(site.num_heads, site.num_heads)
    x = torch.randn(2, 17, site.dim)
    site.head_mixing = TalkingHeads(mix_l, mix_w)
    try:
        got = attention_full(site, x)
    finally:
        site.head_mixing = None

    def mix(linear, t):  # over the head axis of (B, H, T, N)
        w, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
        return np.einsum("gh,bhtn->bgtn", w, t) + b[None, :, None, None]

    want = mix(mix_w, _numpy_softmax(mix(mix_l, _numpy_logits(site, x))))
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=0, atol=1e-5)


def test_attention_rows_of_a_class_attention_site_take_the_class_token_and_refuse_others_whole_message(plain_vits):
    """Class attention: token 0's rows equal numpy's first row; token 1 (and [0, 1]) are refused with the whole
    message naming the tokens that do not query."""
    import qkhooks
    from qkhooks.attention import attention_rows

    site = qkhooks.sites(plain_vits[True])[0]
    x = torch.randn(2, 17, site.dim, generator=torch.Generator().manual_seed(25))
    site.class_attention = True
    try:
        rows = attention_rows(site, x, torch.tensor([0]))
        np.testing.assert_allclose(rows.detach().double().numpy(), _numpy_softmax(_numpy_logits(site, x))[:, :, :1], atol=1e-5)
        for tokens in (torch.tensor([1]), torch.tensor([[0, 1], [0, 1]])):
            with pytest.raises(qkhooks.QKHooksError) as refused:
                attention_rows(site, x, tokens)
            assert str(refused.value) == (
                f"layer 0 ({site.path}) is class attention: only the class token (index 0) queries there, so the rows "
                "of tokens [1] do not exist in the model. Ask its rows with query_tokens 0, record its full maps "
                "(B, H, 1, N), or leave the layer out with layers=.")
    finally:
        site.class_attention = False


def _numpy_sdpa_maps(q, k, mask=None, causal=False, scale=None):
    """softmax(q kᵀ · scale + mask) per head in numpy (scale 1/sqrt(d_k) unless given), key heads shared by groups of
    query heads; masked-out rows as zeros."""
    q, k = q.detach().double().numpy(), k.detach().double().numpy()
    k = np.repeat(k, q.shape[-3] // k.shape[-3], axis=-3) if q.ndim > 2 else k
    logits = q @ np.swapaxes(k, -1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    keep = np.ones(logits.shape[-2:], bool)
    if causal:
        keep = np.tril(keep)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask.numpy()
    elif mask is not None:
        logits = logits + mask.detach().double().numpy()
    logits = np.where(keep, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        maps = _numpy_softmax(logits)
    return np.nan_to_num(maps, nan=0.0)


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim", [(4, 4, 2, 4), (1, 4, 2, 2)],
                         ids=["batch-as-many-as-heads", "key-heads-as-many-as-head-width"])
def test_attention_of_grouped_query_heads_whose_sizes_coincide_equals_numpy_and_torchs_sdpa(batch, heads, kv_heads,
                                                                                             head_dim):
    """Grouped-query calls whose batch equals the query heads, or whose key heads equal the head width, so an axis
    read off the wrong dimension changes the result: sdpa_maps equals numpy, and OneAttention's output equals torch's
    own scaled_dot_product_attention."""
    import types

    from qkhooks.attention import OneAttention, sdpa_maps

    g = torch.Generator().manual_seed(26)
    q = torch.randn(batch, heads, 6, head_dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, 6, head_dim, generator=g) for _ in range(2))
    np.testing.assert_allclose(sdpa_maps(q, k, enable_gqa=True).detach().double().numpy(), _numpy_sdpa_maps(q, k), atol=1e-6)
    site = types.SimpleNamespace(num_heads=heads, head_dim=head_dim, path="blocks.0.attn", module=torch.nn.Identity())
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    mode = OneAttention(site)  # type: ignore[arg-type]
    mode.enter()
    try:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    finally:
        mode.leave()
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(mode.take().detach().double().numpy(), _numpy_sdpa_maps(q, k), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["no-mask", "causal"])
def test_attention_sdpa_maps_of_three_dimensional_q_and_k_equal_numpy(causal):
    """(H, L, d_k) q and (H, S, d_k) k without a batch axis, L != S != d_k: the causal mask and the transpose
    taken from the last two axes."""
    from qkhooks.attention import sdpa_maps

    g = torch.Generator().manual_seed(27)
    q, k = torch.randn(2, 5, 3, generator=g), torch.randn(2, 7, 3, generator=g)
    np.testing.assert_allclose(sdpa_maps(q, k, is_causal=causal).detach().double().numpy(), _numpy_sdpa_maps(q, k, causal=causal),
                               atol=1e-6)


def test_attention_sdpa_maps_rows_with_every_key_masked_by_a_boolean_mask_are_zero_as_torchs():
    """A boolean mask that masks a whole row: that row is zero (not NaN, not one), as torch's own kernels return it;
    the other rows are numpy's."""
    from qkhooks.attention import sdpa_maps

    g = torch.Generator().manual_seed(28)
    q, k, v = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1] = False
    keep[2, :2] = False
    maps = sdpa_maps(q, k, keep)
    assert torch.equal(maps[:, :, 1], torch.zeros_like(maps[:, :, 1]))
    np.testing.assert_allclose(maps.detach().double().numpy(), _numpy_sdpa_maps(q, k, keep), atol=1e-6)
    torch.testing.assert_close(maps @ v, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep))


# was a real bug (found by mutation testing, round 10): a -inf float mask row gave NaN, torch's kernels give 0
def test_attention_sdpa_maps_rows_with_every_key_masked_by_a_float_mask_are_zero_as_torchs():
    from qkhooks.attention import sdpa_maps

    g = torch.Generator().manual_seed(29)
    q, k, v = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4)
    mask = torch.zeros(3, 5)
    mask[1] = float("-inf")
    maps = sdpa_maps(q, k, mask)
    torch.testing.assert_close(maps @ v, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("queries, keys", [(130, 130), (7, 7), (2, 130)])
@pytest.mark.parametrize("scale", [0.125, 0.3])
def test_attention_products_read_strided_heads_and_equal_a_float64_reference(queries: int, keys: int, scale: float):
    """scale·q kᵀ and maps @ v from heads split off one fused (B, N, 3·H·d) output (strided views, as every fused
    qkv gives them), on the per-image path (130 keys: all queries, or 2 query rows) and the matmul path (7): equal to
    float64 numpy products. On the per-image path maps @ v is laid out (B, L, H, d), so the model's
    transpose(1, 2).reshape is a view."""
    from qkhooks.sdpa import maps_times_values, scaled_logits

    g = torch.Generator().manual_seed(31)
    b, h, d = 3, 5, 8
    qkv = torch.randn(b, keys, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q[:, :, keys - queries:]  # the last query rows: a view whose rows do not start at the buffer's start
    logits = scaled_logits(q, k, scale)
    want = np.einsum("bhld,bhsd->bhls", q.double().numpy(), k.double().numpy()) * scale
    np.testing.assert_allclose(logits.double().numpy(), want, atol=1e-5)
    maps = logits.softmax(-1)
    out = maps_times_values(maps, v)
    np.testing.assert_allclose(out.double().numpy(), np.einsum("bhls,bhsd->bhld", maps.double().numpy(),
                                                               v.double().numpy()), atol=1e-5)
    assert out.shape == (b, h, queries, d)
    assert out.transpose(1, 2).is_contiguous() == (keys >= 128)  # 7 queries, 7 keys: the matmul path
    grad_q = q.clone().requires_grad_(True)  # autograd: the matmul path, with a graph
    assert scaled_logits(grad_q, k, scale).grad_fn is not None


class _EagerAttention(torch.nn.Module):
    """A module computing its own eager softmax over (B, H, N, N), in the spelling given."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def forward(self, scores):
        return self.spelling(scores)


_ONE_ATTENTION_PREFIX = ("blocks.0.attn (_EagerAttention): outputs='eager' cannot compute this layer's attention once: ")
_ONE_ATTENTION_SUFFIX = (". Record with outputs='unchanged' (the default: the maps are rebuilt beside the model's own "
                         "attention).")


@pytest.mark.parametrize("spelling", [lambda s: torch.softmax(s, -1), lambda s: torch.softmax(s, 3),
                                      lambda s: torch.nn.functional.softmax(s, dim=-1), lambda s: s.softmax(-1)],
                         ids=["softmax-minus-one", "softmax-three", "functional-dim-keyword", "tensor-method"])
def test_one_attention_keeps_a_modules_own_eager_softmax_over_keys_in_every_spelling(spelling):
    """The dim of the module's softmax given by position or by keyword, as -1 or 3: the map kept is numpy's
    softmax of the scores."""
    import types

    from qkhooks.attention import OneAttention

    module = _EagerAttention(spelling)
    site = types.SimpleNamespace(num_heads=3, head_dim=4, path="blocks.0.attn", module=module)
    scores = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(31))
    mode = OneAttention(site)  # type: ignore[arg-type]
    mode.enter()
    try:
        module(scores)
    finally:
        mode.leave()
    np.testing.assert_allclose(mode.take().detach().double().numpy(), _numpy_softmax(scores.detach().double().numpy()), atol=1e-6)


def test_one_attention_refuses_no_map_and_two_maps_with_the_whole_message():
    """No attention computed (never entered, or a softmax over queries only): refused; two softmaxes in one
    call: refused; each with the whole message."""
    import types

    import qkhooks
    from qkhooks.attention import OneAttention

    module = _EagerAttention(lambda s: torch.softmax(s, 2))
    site = types.SimpleNamespace(num_heads=3, head_dim=4, path="blocks.0.attn", module=module)
    no_map = (_ONE_ATTENTION_PREFIX + "it made no scaled_dot_product_attention call and no softmax over (batch, heads, "
              "tokens, keys) while it ran" + _ONE_ATTENTION_SUFFIX)
    scores = torch.randn(2, 3, 5, 5)
    mode = OneAttention(site)  # type: ignore[arg-type]
    with pytest.raises(qkhooks.QKHooksError) as refused:
        mode.take()
    assert str(refused.value) == no_map
    mode.enter()
    try:
        module(scores)  # a softmax over dim 2 is not a map over keys
    finally:
        mode.leave()
    with pytest.raises(qkhooks.QKHooksError) as refused:
        mode.take()
    assert str(refused.value) == no_map
    mode.enter()
    try:
        torch.softmax(scores, -1)
        with pytest.raises(qkhooks.QKHooksError) as refused:
            torch.softmax(scores, -1)
    finally:
        mode.leave()
    assert str(refused.value) == (_ONE_ATTENTION_PREFIX + "it computes attention more than once in one call, so which "
                                  "maps its output uses is not known" + _ONE_ATTENTION_SUFFIX)


# ----------------------------------------------------------------------------------------------------- spectrum.py

def test_spectrum_of_a_model_made_in_inference_mode_is_computed_uncached_and_equals_a_dense_svd():
    """Inference-mode parameters keep no version counter (the spectrum cache bypassed them until round 22; it now
    compares a copy bit for bit): the augmented spectrum of such a model still equals numpy's SVD of [W_q | b_q]^T [W_k | b_k] per head (singular values, and
    the rank-one sum rebuilding the dense form)."""
    from qkhooks.spectrum import layer_spectrum

    import qkhooks

    with torch.inference_mode():
        model = _vit()
    site = qkhooks.sites(model)[0]
    got = layer_spectrum(site, augmented=True)
    assert got.augmented
    qkv = site.module.qkv
    h, dk, d = site.num_heads, site.head_dim, site.dim
    w = np.concatenate([qkv.weight.detach().numpy().astype(np.float64), qkv.bias.detach().numpy().astype(np.float64)[:, None]], 1)
    w_q, w_k = w[: h * dk].reshape(h, dk, d + 1), w[h * dk: 2 * h * dk].reshape(h, dk, d + 1)
    dense = np.einsum("hed,hef->hdf", w_q, w_k)
    s = np.linalg.svd(dense, compute_uv=False)[:, :dk]
    np.testing.assert_allclose(np.asarray(got.S, np.float64), s, rtol=1e-5, atol=1e-6 * s.max())
    np.testing.assert_allclose(np.asarray(got.bilinear(), np.float64), dense, rtol=0, atol=1e-5 * np.abs(dense).max())
