"""The per-image attention pass (:func:`qkhooks.sdpa.softmax_maps`, :func:`~qkhooks.sdpa.softmax_attention`): the
maps, and maps @ v, of layers with many tokens computed one image at a time on the CPU (logits in a scratch buffer,
their softmax into the kept maps, the product with v while the maps are in cache).

References: the whole-batch products it replaces (bit for bit), float64 numpy, torch's own
``scaled_dot_product_attention``, and the model's own eager attention and eager forward. Which path ran is counted
on ``sdpa._scaled_logits`` (the whole-batch product every other path calls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkhooks
from conftest import Tiny, _hf, _timm, eager_attention
from qkhooks import sdpa
from qkhooks.sdpa import SdpaCall, maps_times_values, scaled_logits, softmax_attention, softmax_maps
from test_full_once import _eager_forward, _tiny_call

# 12 x 12 patches + CLS = 145 tokens: above the per-image path's 128
MANY_TOKENS = [
    Tiny("timm-vit-145", _timm("vit_tiny_patch16_224", img_size=96, patch_size=8), 96, 1, "timm", (12, 12)),
    Tiny("hf-vit-145", _hf("ViTModel", "ViTConfig", qkv_bias=True, image_size=96), 96, 1, "hf", (12, 12)),
]


@pytest.fixture
def products(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of q in every whole-batch product of q and k (``sdpa._scaled_logits``) made meanwhile."""
    calls: list[tuple[int, ...]] = []
    product = sdpa._scaled_logits
    monkeypatch.setattr(sdpa, "_scaled_logits", lambda q, k, scale: calls.append(tuple(q.shape)) or product(q, k, scale))
    return calls


def _heads(tokens: int, dtype: torch.dtype = torch.float32, seed: int = 5) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, N, d): strided views of one fused (B, N, 3·H·d) output, as a fused qkv Linear gives them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(3, tokens, 3, 5, 8, generator=g, dtype=torch.float64).to(dtype).permute(2, 0, 3, 1, 4)
    return tuple(qkv.unbind(0))


def _numpy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[np.ndarray, np.ndarray]:
    logits = np.einsum("bhld,bhsd->bhls", q.double().numpy(), k.double().numpy()) * scale
    e = np.exp(logits - logits.max(-1, keepdims=True))
    maps = e / e.sum(-1, keepdims=True)
    return maps, np.einsum("bhls,bhsd->bhld", maps, v.double().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_values", [True, False])
def test_per_image_pass_equals_the_whole_batch_products_bit_for_bit_and_a_float64_reference(dtype, with_values, products):
    q, k, v = _heads(130, dtype)
    maps, out = softmax_attention(q, k, v, 0.3) if with_values else (softmax_maps(q, k, 0.3), None)
    assert products == []  # the per-image pass ran, not the whole-batch product
    want_maps = torch.softmax(scaled_logits(q, k, 0.3), dim=-1)
    assert maps.dtype == dtype and torch.equal(maps, want_maps)
    ref_maps, ref_out = _numpy_attention(q, k, v, 0.3)
    np.testing.assert_allclose(maps.double().numpy(), ref_maps, atol=1e-6 if dtype == torch.float32 else 1e-13)
    if not with_values:
        assert out is None
        return
    assert torch.equal(out, maps_times_values(want_maps, v))
    np.testing.assert_allclose(out.double().numpy(), ref_out, atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert out.transpose(1, 2).is_contiguous()  # (B, L, H, d): the model's transpose(1, 2).reshape is a view


@pytest.mark.parametrize("case", ["few tokens", "float16", "autograd", "autograd through v", "tensor scale"])
def test_where_the_per_image_pass_does_not_apply_the_whole_batch_products_give_the_same_values(case, products):
    q, k, v = _heads(7 if case == "few tokens" else 130)
    scale: float | torch.Tensor = torch.tensor(0.3) if case == "tensor scale" else 0.3
    if case == "float16":
        q, k = q.half(), k.half()
    if case == "autograd":
        q = q.clone().requires_grad_(True)
    if case == "autograd through v":
        v = v.clone().requires_grad_(True)
    maps, out = (softmax_maps(q, k, scale), None) if case == "float16" else softmax_attention(q, k, v, scale)
    assert len(products) == 1
    assert maps.dtype == torch.float32  # float16 q, k: float32 logits and softmax
    assert (maps.grad_fn is not None) == (case == "autograd")
    assert out is None or (out.grad_fn is not None) == case.startswith("autograd")
    ref_maps, ref_out = _numpy_attention(q.detach().float(), k.float(), v.detach(), 0.3)
    np.testing.assert_allclose(maps.detach().double().numpy(), ref_maps, atol=1e-6)
    if out is not None:
        np.testing.assert_allclose(out.detach().double().numpy(), ref_out, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "scale given", "grouped-query", "boolean mask", "causal", "float16"])
def test_an_sdpa_call_computed_once_returns_torchs_output_and_its_maps(case, products):
    q, k, v = _heads(130)
    kwargs: dict = {}
    if case == "grouped-query":  # 5 query heads, one key/value head
        k, v = k[:, :1], v[:, :1]
        kwargs["enable_gqa"] = True
    if case == "boolean mask":
        kwargs["attn_mask"] = torch.rand(130, 130, generator=torch.Generator().manual_seed(1)) > 0.3
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "scale given":
        kwargs["scale"] = 0.3
    if case == "float16":
        q, k, v = q.half(), k.half(), v.half()
    maps, out = SdpaCall(q, k, v, **kwargs).attend()
    assert (len(products) == 0) == (case in ("plain", "scale given", "grouped-query"))  # the per-image pass where it applies
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    assert out.dtype == v.dtype and maps.dtype == q.dtype
    torch.testing.assert_close(out.float(), want, atol=2e-3 if case == "float16" else 1e-5, rtol=0)
    logits = (q.double() @ k.double().expand(-1, 5, -1, -1).transpose(-1, -2)) * kwargs.get("scale", 8 ** -0.5)
    keep = kwargs.get("attn_mask", torch.ones(130, 130).tril().bool() if case == "causal" else None)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(maps.double(), torch.softmax(logits, -1), atol=1e-3 if case == "float16" else 1e-6, rtol=0)


@pytest.mark.parametrize("outputs", ["unchanged", "eager"])
@pytest.mark.parametrize("tiny", MANY_TOKENS, ids=lambda t: t.name)
def test_full_maps_of_many_token_layers_equal_eager_attention_through_the_per_image_pass(tiny: Tiny, outputs, products):
    model, images = tiny.model(), tiny.images(batch=3)
    call = _tiny_call(tiny, model, images)
    plain, want_out, want_maps = call(), _eager_forward(model, tiny.kind, call), eager_attention(tiny, model, images)
    assert want_maps[0].shape[-1] == 145
    products.clear()
    with qkhooks.record(model, modes=None, attention="full", outputs=outputs) as run:
        out = call()
    assert products == []  # every layer's maps from the per-image pass
    if outputs == "unchanged":
        assert torch.equal(out, plain)
    else:
        assert float((out - want_out).abs().max()) < 1e-5
    for layer, want in enumerate(want_maps):
        assert float((run.attention(layer, "full") - want).abs().max()) < 1e-5
