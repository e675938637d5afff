"""Tests written to kill the survivors of the round-13 mutation run of the attention module (``attention.py`` and
``sdpa.py``: the products, ``sdpa_maps``, and ``AttentionCallMode`` with its two recorders, ``OneAttention`` and
``InsideCall``; tests/MUTATION.md). Each compares against an independent reference: float64 numpy, torch's own
``scaled_dot_product_attention`` kernel, or the model's own eager attention; never the implementation's output."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.attention import OneAttention
from qkhooks.models.inside import InsideCall
from test_mutation_kills_core import _numpy_sdpa_maps as _numpy_maps, _numpy_softmax

_SDPA = torch.nn.functional.scaled_dot_product_attention


def _site(heads: int = 3, head_dim: int = 4) -> types.SimpleNamespace:
    return types.SimpleNamespace(num_heads=heads, head_dim=head_dim, path="blocks.0.attn", module=torch.nn.Identity(),
                                 layer=0)


def _qkv(heads: int = 3, kv_heads: int = 3, n: int = 5, s: int = 6, d: int = 4, seed: int = 40):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, n, d, generator=g), torch.randn(2, kv_heads, s, d, generator=g),
            torch.randn(2, kv_heads, s, d, generator=g))


# every argument of the call, by position and by keyword (torch's own names), shapes the maps kept
_CALLS = {
    "positional-float-mask-scale": lambda q, k, v, m: ((q, k, v, m, 0.0, False), {"scale": 0.3}),
    "keyword-names": lambda q, k, v, m: ((), {"query": q, "key": k, "value": v, "attn_mask": m, "scale": 0.3}),
    "positional-causal": lambda q, k, v, m: ((q, k, v, None, 0.0, True), {}),
    "bool-mask-keyword": lambda q, k, v, m: ((q, k, v), {"attn_mask": m > -0.5}),
    "grouped-query-keyword": lambda q, k, v, m: ((q, k[:, :1], v[:, :1]), {"enable_gqa": True, "scale": 0.7}),
}


@pytest.mark.parametrize("form", list(_CALLS))
def test_attention_one_attention_binds_the_sdpa_call_as_torch_does_and_returns_torchs_output(form):
    """OneAttention reads q, k, v, mask, dropout, causal flag, scale and grouped-query flag where torch does (by
    position or by torch's own keyword names): the output is torch's kernel's for the same call, the maps kept are
    float64 numpy's."""
    q, k, v = _qkv()
    mask = torch.randn(5, 6, generator=torch.Generator().manual_seed(41))
    args, kwargs = _CALLS[form](q, k, v, mask)
    want = _SDPA(*args, **kwargs)
    call = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
    mode = OneAttention(_site())  # type: ignore[arg-type]
    mode.enter()
    assert mode.entered
    try:
        out = _SDPA(*args, **kwargs)
    finally:
        mode.leave()
    assert not mode.entered and not torch.overrides._get_current_function_mode_stack()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(mode.take().double().numpy(),
                               _numpy_maps(call["query"], call["key"], call.get("attn_mask"), call.get("is_causal", False),
                                           call.get("scale")), atol=1e-6)


@pytest.mark.parametrize("form", list(_CALLS))
def test_attention_inside_call_keeps_the_sdpa_calls_maps_and_hands_back_torchs_own_output_unchanged(form):
    """InsideCall observes: the module gets torch's kernel output bit for bit, the maps kept are numpy's, made
    without autograd even from q and k that require grad; leave() hands them over once."""
    q, k, v = _qkv(seed=42)
    q.requires_grad_(True)
    mask = torch.randn(5, 6, generator=torch.Generator().manual_seed(43))
    args, kwargs = _CALLS[form](q, k, v, mask)
    want = _SDPA(*args, **kwargs)
    call = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
    watch = InsideCall(_site())  # type: ignore[arg-type]
    watch.enter()
    assert watch.entered
    try:
        out = _SDPA(*args, **kwargs)
    finally:
        seen = watch.leave()
    assert not watch.entered and not torch.overrides._get_current_function_mode_stack()
    assert torch.equal(out, want) and out.requires_grad
    assert len(seen) == 1 and not seen[0].requires_grad
    np.testing.assert_allclose(seen[0].double().numpy(),
                               _numpy_maps(call["query"], call["key"], call.get("attn_mask"), call.get("is_causal", False),
                                           call.get("scale")), atol=1e-6)


def test_attention_inside_call_keeps_softmaxes_over_the_last_axis_of_three_or_more_dims_in_order():
    """Softmaxes over the last axis (given as -1 or as its index, by position or keyword, in every spelling) of
    3-d and 4-d tensors are kept, in the order computed; over another axis, or of a 2-d tensor, not."""
    g = torch.Generator().manual_seed(44)
    three, four, two = torch.randn(2, 5, 5, generator=g), torch.randn(2, 3, 5, 6, generator=g), torch.randn(5, 5, generator=g)
    watch = InsideCall(_site())  # type: ignore[arg-type]
    watch.enter()
    try:
        torch.softmax(three, 2)
        torch.softmax(three, 1)  # over queries: not a map
        torch.nn.functional.softmax(four, dim=-1)
        four.softmax(3)
        torch.softmax(four, dim=2)
        two.softmax(-1)  # 2-d: no map of (batch, queries, keys)
        torch.nn.functional.softmax(three, -1)
    finally:
        seen = watch.leave()
    want = [_numpy_softmax(t.double().numpy()) for t in (three, four, four, three)]
    assert len(seen) == len(want)
    for got, expected in zip(seen, want):
        np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6)


def test_attention_one_attention_starts_each_call_afresh():
    """A call whose maps were never taken does not leak into the next: the next call's map is kept (not refused as
    a second map of one call)."""
    g = torch.Generator().manual_seed(45)
    first, second = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    mode = OneAttention(_site())  # type: ignore[arg-type]
    for scores in (first, second):
        mode.enter()
        try:
            torch.softmax(scores, -1)
        finally:
            mode.leave()
    np.testing.assert_allclose(mode.take().double().numpy(), _numpy_softmax(second.double().numpy()), atol=1e-6)


def test_attention_dropout_is_refused_by_both_recorders_with_their_whole_messages_and_no_dropout_is_not():
    """A call that drops weights at random (dropout_p > 0) is refused with each recorder's whole message; an
    explicit dropout_p of 0 is an ordinary call."""
    q, k, v = _qkv(seed=46)
    one = ("blocks.0.attn (Identity): outputs='eager' cannot compute this layer's attention once: it drops attention "
           "weights at random (dropout_p=0.25, the module is in training mode), so its outputs cannot be the recorded "
           "maps @ v; call model.eval(). Record with outputs='unchanged' (the default: the maps are rebuilt beside the "
           "model's own attention).")
    inside = ("blocks.0.attn: its attention drops weights at random (dropout_p=0.25, training mode), so no map is the "
              "one its output used; call model.eval().")
    for recorder, message in ((OneAttention(_site()), one), (InsideCall(_site()), inside)):  # type: ignore[arg-type]
        recorder.enter()
        try:
            with pytest.raises(qkhooks.QKHooksError) as refused:
                _SDPA(q, k, v, dropout_p=0.25)
            out = _SDPA(q, k, v, None, 0.0)
        finally:
            recorder.leave()
        assert str(refused.value) == message
        torch.testing.assert_close(out, _SDPA(q, k, v), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["no-mask", "causal"])
def test_attention_sdpa_maps_of_three_dimensional_q_and_k_with_many_tokens_equal_numpy(causal):
    """(H, L, d_k) q and k without a batch axis and 130 tokens, the size at which 4-d (B, H, ·, ·) products are read
    in place per image: a 3-d call stays on the plain product (its first axis is heads, not images)."""
    from qkhooks.sdpa import maps_times_values, sdpa_maps

    g = torch.Generator().manual_seed(47)
    q, k, v = torch.randn(3, 130, 4, generator=g), torch.randn(3, 131, 4, generator=g), torch.randn(3, 131, 5, generator=g)
    maps = sdpa_maps(q, k, is_causal=causal)
    np.testing.assert_allclose(maps.double().numpy(), _numpy_maps(q[None], k[None], causal=causal)[0], atol=1e-6)
    np.testing.assert_allclose(maps_times_values(maps, v).double().numpy(),
                               maps.double().numpy() @ v.double().numpy(), atol=1e-5)


def test_attention_pool_rows_pads_patch_masks_and_refuses_masks_of_another_batch_with_the_whole_message():
    """Rows of 2 images and 3 heads (batch != heads): patch-token masks are padded with zeros for the prefix and
    pooled as numpy does; masks for 3 images are refused naming the shape and the batch of 2."""
    from qkhooks.attention import pool_rows

    g = torch.Generator().manual_seed(48)
    rows = torch.rand(2, 3, 4, 11, generator=g)
    masks = (torch.rand(2, 5, 10, generator=g) > 0.5).float()
    want = np.einsum("bhtn,bmn->bhtm", rows.double().numpy()[..., 1:], masks.double().numpy())
    np.testing.assert_allclose(pool_rows(rows, masks, 1).double().numpy(), want, atol=1e-6)
    with pytest.raises(qkhooks.QKHooksError) as refused:
        pool_rows(rows, torch.ones(3, 5, 11), 1)
    assert str(refused.value) == ("pool_masks must be (batch, masks, tokens) with 11 tokens or 10 patch tokens; got "
                                  "(3, 5, 11) for a batch of 2.")


def test_attention_logits_of_every_token_of_a_rotating_site_are_computed_not_refused():
    """Under RoPE only a subset of query tokens is refused: q and k from the same N tokens (N != d) give the
    model's own eager maps."""
    from conftest import TINY_MODELS
    from test_mutation_kills import _eager_and_tokens

    from qkhooks.attention import _logits

    sites, x, eager = _eager_and_tokens(next(t for t in TINY_MODELS if t.name == "timm-vit-4x6"))
    site, tokens = sites[0], x[0]
    assert tokens.shape[1] != tokens.shape[2]
    site.rotates = lambda: True  # stands in for a RoPE site whose rotation is the identity
    torch.testing.assert_close(torch.softmax(_logits(site, tokens, tokens), -1), eager[0], atol=1e-5, rtol=1e-4)


def test_attention_query_tokens_are_placed_on_the_device_asked_for():
    """Query token indices come back as long on the device of the q they index (the meta device stands in for an
    accelerator on a CPU-only machine), one row per image from a 1-D list."""
    from qkhooks.attention import check_tokens

    idx = check_tokens(torch.tensor([0, 3], dtype=torch.int32), 2, 10, torch.device("meta"))
    assert idx.device.type == "meta" and idx.dtype == torch.long and idx.shape == (2, 2)
