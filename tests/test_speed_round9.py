"""Issue 20, rounds 9 and 15: the q/k-path projection reads q and k in place from the Linear's output.

Round 9 made it one batched (K, d_k) @ (d_k, B·N) product for both sides of a fused qkv instead of one small product
per image and head; round 15 lets the projector choose, by device and number of modes, between that, tokens-major
products and one product per image (each forced in turn here). These tests check that nothing a user reads changed: the maps equal the x path's x·u_n computed densely in float64, the fused, separate and per-head
entries agree bit for bit, and an image's maps do not depend on the batch it came in (a sharded run writes what a
single process writes).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.projector import QKPathProjector


def _vit(seed: int = 0, qkv_bias: bool = True) -> torch.nn.Module:
    """A small timm ViT on a non-square grid (4 x 6 patches + CLS), 3 heads of 16 dims, every weight and bias random
    (timm's init leaves the qkv bias at zero, which would hide a wrong offset)."""
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=(32, 48), patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=qkv_bias, num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _dense_maps(x: torch.Tensor, spectrum) -> tuple[np.ndarray, np.ndarray]:
    """x·u_n and x·v_n of every head and mode in float64: (B, H, K, N) each, the x path's definition."""
    x64 = x.double().numpy()
    u, v = spectrum.U.double().numpy(), spectrum.V.double().numpy()  # (H, d, K)
    return np.einsum("bnd,hdk->bhkn", x64, u), np.einsum("bnd,hdk->bhkn", x64, v)


@pytest.mark.parametrize("layout, modes", [("tokens", 4), ("images", 16), ("batched", 16), ("images", 5)])
def test_fused_separate_and_per_head_projections_equal_the_dense_x_path(monkeypatch, layout, modes):
    """Each shape of product the projector chooses from (forced here; on the CPU it picks "tokens" for K <= d_k / 4,
    else "images"; "batched" on an accelerator) gives the dense maps."""
    import qkhooks.projector

    monkeypatch.setattr(qkhooks.projector, "_product_layout", lambda heads, k: layout)
    model = _vit()
    site = qkhooks.sites(model)[1]
    spectrum = qkhooks.spectrum(model)[site.layer].top(modes)
    projector = QKPathProjector(spectrum, site.weights())
    x = torch.randn(5, 25, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        qkv = site.module.qkv(x)
    width = site.num_heads * site.head_dim
    q, k = qkv[..., :width], qkv[..., width:2 * width]
    fused = projector.from_fused(qkv)
    separate = projector.from_linear(q, k)
    heads = projector(q.unflatten(-1, (3, 16)).transpose(1, 2), k.unflatten(-1, (3, 16)).transpose(1, 2))
    ref_q, ref_k = _dense_maps(x, spectrum)
    for got in (fused, separate, heads):
        # a side's maps: each image's (H, K, N) block contiguous (the fused "images" product keeps both sides of an
        # image in one block, so there the batch axis strides over both)
        assert all(t.shape == (5, 3, modes, 25) and all(image.is_contiguous() for image in t) for t in got)
        scale = max(np.abs(ref_q).max(), np.abs(ref_k).max())
        np.testing.assert_allclose(got[0].double().numpy(), ref_q, atol=2e-5 * scale, rtol=0)
        np.testing.assert_allclose(got[1].double().numpy(), ref_k, atol=2e-5 * scale, rtol=0)
    for got in (separate, heads):  # the same products in the same order: equal bit for bit
        assert torch.equal(got[0], fused[0]) and torch.equal(got[1], fused[1])
    # each image alone gives its slice of the batch exactly: the kernel's result does not depend on B
    for i in range(5):
        alone = projector.from_fused(qkv[i:i + 1])
        assert torch.equal(alone[0][0], fused[0][i]) and torch.equal(alone[1][0], fused[1][i])


@pytest.mark.parametrize("modes", [5, "all"])
def test_recorded_maps_from_the_fused_qkv_equal_the_x_path(modes):
    model = _vit(seed=2)
    images = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with qkhooks.record(model, modes=modes, attention="rows") as fast:
            fast(images)
        with qkhooks.record(model, modes=modes, attention="rows", qk_path=False) as slow:
            slow(images)
    assert fast.mode_source == {0: "qk", 1: "qk"} and slow.mode_source == {0: "x", 1: "x"}
    for layer in fast.layers:
        for a, b in ((fast.last.query(layer), slow.last.query(layer)), (fast.last.key(layer), slow.last.key(layer))):
            assert a.shape == b.shape == (3, 3, 16 if modes == "all" else 5, 25)
            torch.testing.assert_close(a, b, atol=2e-5 * float(b.abs().max()), rtol=0)


def _count_find_sites(monkeypatch) -> list[int]:
    from conftest import count_calls

    from qkhooks import capture

    return count_calls(monkeypatch, capture, "find_sites")


def test_record_entered_again_finds_no_sites_until_the_model_structure_changes(monkeypatch):
    """The per-batch entry reuses the model's sites (each recording its own copies); a module replaced in place
    (here a q/k norm put into layer 0) is seen, and the maps then equal the changed model's eager attention."""
    from conftest import TINY_MODELS, eager_attention

    tiny = TINY_MODELS[0]
    model, images = tiny.model(), tiny.images(batch=2)
    calls = _count_find_sites(monkeypatch)
    tokens = torch.tensor([[0, 3]] * 2)

    def rows_and_full() -> qkhooks.Recording:
        with qkhooks.record(model, modes=4, attention="rows+full") as run, torch.no_grad():
            run.set_batch(query_tokens=tokens)
            model(images)
        return run

    first = rows_and_full()
    again = rows_and_full()
    assert calls[0] == 1
    assert not set(map(id, first.sites)) & set(map(id, again.sites))  # copies: a recording's call state is its own
    eager = eager_attention(tiny, model, images)
    for run in (first, again):
        for layer in run.layers:
            torch.testing.assert_close(run.attention_maps("full")[layer], eager[layer], atol=1e-5, rtol=0)

    attn = model.blocks[0].attn
    torch.manual_seed(4)
    attn.q_norm, attn.k_norm = torch.nn.LayerNorm(attn.head_dim), torch.nn.LayerNorm(attn.head_dim)
    with torch.no_grad():
        for p in [*attn.q_norm.parameters(), *attn.k_norm.parameters()]:
            p.normal_(1, 0.5)
    changed = rows_and_full()
    assert calls[0] == 2
    eager = eager_attention(tiny, model, images)
    assert not torch.allclose(eager[0], first.attention_maps("full")[0], atol=1e-3)  # the norms change the maps
    for layer in changed.layers:
        torch.testing.assert_close(changed.attention_maps("full")[layer], eager[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(changed.attention_maps("rows")[layer], eager[layer][:, :, [0, 3]], atol=1e-5, rtol=0)
    model.blocks[1].attn.fused_attn = False  # a plain setting changed: searched again
    rows_and_full()
    assert calls[0] == 3


def test_a_deleted_model_frees_its_cached_sites():
    import gc
    import weakref

    from qkhooks import capture

    model = _vit()
    with qkhooks.record(model, modes=2):
        pass
    assert model in capture._SITES
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_workers_default_is_none_on_the_cpu_and_the_spare_cores_beside_an_accelerator(monkeypatch):
    import os

    from qkhooks.options import RecordOptions
    from qkhooks.stream import default_workers

    assert RecordOptions().num_workers is None  # resolved per device when the recording starts
    assert default_workers("cpu") == 0
    for cores, workers in ((1, 0), (2, 1), (8, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers("cuda") == workers


def test_the_projector_product_is_chosen_by_device_and_modes():
    """On the CPU tokens-major products up to K = d_k / 4 modes per head, one product per image above; one batched
    product on any other device (there a loop over images would cost a kernel launch each) and where autograd
    records a graph through q and k."""
    from qkhooks.projector import _product_layout

    def heads(head_dim: int, device: str = "cpu", requires_grad: bool = False) -> torch.Tensor:
        return torch.empty(2, 5, 3, head_dim, device=device, requires_grad=requires_grad)

    assert [_product_layout(heads(64), k) for k in (1, 16, 17, 64)] == ["tokens", "tokens", "images", "images"]
    assert [_product_layout(heads(16), k) for k in (4, 5)] == ["tokens", "images"]
    assert {_product_layout(heads(64, "meta"), k) for k in (1, 16, 64)} == {"batched"}
    # heads that autograd records a graph through take the batched product; without autograd they need not
    assert {_product_layout(heads(64, requires_grad=True), k) for k in (1, 16, 64)} == {"batched"}
    with torch.no_grad():
        assert _product_layout(heads(64, requires_grad=True), 16) == "tokens"


@pytest.mark.parametrize("layout", ["tokens", "images", "batched"])
def test_each_projector_layout_runs_its_own_products_and_hands_out_its_own_strides(monkeypatch, layout):
    """The products each layout runs (seen through a TorchFunctionMode) and the strides of the maps it returns: a
    fused qkv's sides share one (B, 2H, K, N) block only with one product per image."""
    import qkhooks.projector

    monkeypatch.setattr(qkhooks.projector, "_product_layout", lambda heads, k: layout)
    model = _vit()
    site = qkhooks.sites(model)[0]
    projector = QKPathProjector(qkhooks.spectrum(model)[site.layer].top(4), site.weights())
    b, n, h, k, dk = 5, 25, 3, 4, 16
    with torch.no_grad():
        qkv = site.module.qkv(torch.randn(b, n, 48, generator=torch.Generator().manual_seed(4)))
    products: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    class Products(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.bmm, torch.baddbmm):  # baddbmm(offsets, a, b): the product and the offsets in one
                products.append((func.__name__, *(tuple(t.shape) for t in args[-2:])))
            return func(*args, **(kwargs or {}))

    with Products():
        query, key = projector.from_fused(qkv)
    assert projector._weights(qkv.device, qkv.dtype)[1] is not None  # the qkv biases give offsets to subtract
    assert products == {"tokens": [("bmm", (2 * h, b * n, dk), (2 * h, dk, k))],
                        "images": [("baddbmm", (2 * h, k, dk), (2 * h, dk, n))] * b,
                        "batched": [("bmm", (2 * h, k, dk), (2 * h, dk, b * n))]}[layout]
    per_image = (2 if layout == "images" else 1) * h * k * n
    assert query.stride() == key.stride() == (per_image, k * n, n, 1)


@pytest.mark.parametrize("modes", [4, 16])
def test_projector_maps_of_tensors_that_need_gradients_carry_them(modes):
    """With autograd on and q/k that require gradients, the projector uses the batched product (the CPU layouts write
    with out=, which records no graph): the maps equal the dense x path and d(sum of query maps)/dx is the sum of
    the query singular vectors u_n over heads and modes, at every token."""
    model = _vit()
    site = qkhooks.sites(model)[0]
    spectrum = qkhooks.spectrum(model)[site.layer].top(modes)
    projector = QKPathProjector(spectrum, site.weights())
    x = torch.randn(2, 25, 48, generator=torch.Generator().manual_seed(9), requires_grad=True)
    query, key = projector.from_fused(site.module.qkv(x))
    ref_q, ref_k = _dense_maps(x.detach(), spectrum)
    np.testing.assert_allclose(query.detach().double().numpy(), ref_q, atol=2e-5 * np.abs(ref_q).max(), rtol=0)
    np.testing.assert_allclose(key.detach().double().numpy(), ref_k, atol=2e-5 * np.abs(ref_k).max(), rtol=0)
    query.sum().backward()
    want = spectrum.U.double().sum((0, 2))  # (d,)
    np.testing.assert_allclose(x.grad.double().numpy(), want.expand(2, 25, -1).numpy(), atol=1e-4 * want.abs().max().item())
