"""CUDA paths, against the same independent references as on the CPU: the model's own eager attention and q·kᵀ on the
same device, float64 softmax of the model's own half-precision q and k, dense SVD in float64, and the CPU recording
of the same images. Skipped where torch sees no GPU (CI has none); run on a lent GPU with
``pytest tests/test_cuda_paths.py``. ``QKHOOKS_TEST_DEVICE=cpu`` runs the same checks on the CPU (to check the tests)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import qkhooks
from conftest import TINY_MODELS, Tiny, eager_attention
from test_wrapped_qk_layers_and_half_precision import _exact_maps, _hf_vit, _model_qk, _sharpened, _timm_vit
from test_core import capture_inputs, model_qk, run_model
from test_store import in_memory_maps, tiny_vit

CUDA = torch.device(os.environ.get("QKHOOKS_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="torch sees no GPU")


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 products in float32, not TF32 (cuDNN's convolutions use TF32 by default): the references are float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("tiny", TINY_MODELS, ids=lambda t: t.name)
def test_a_cuda_recording_keeps_the_outputs_and_equals_the_models_eager_attention_and_logits(tiny: Tiny):
    model, images = tiny.model().to(CUDA), tiny.images().to(CUDA)
    with torch.no_grad():
        plain = run_model(tiny, model, images)
    eager = eager_attention(tiny, model, images)
    inputs = capture_inputs(tiny, model, images)
    with qkhooks.record(model, modes="all", attention=["rows", "full"]) as run, torch.no_grad():
        out = run_model(tiny, run, images)
    as_tensor = lambda o: o if isinstance(o, torch.Tensor) else o.last_hidden_state  # noqa: E731
    assert torch.equal(as_tensor(plain), as_tensor(out))  # the fused kernel kept, bit for bit
    tokens = torch.as_tensor(run.last.meta["query_tokens"]).to(CUDA)
    for site in qkhooks.sites(model):
        layer = site.layer
        full = run.attention(layer, "full").to(CUDA)
        assert full.shape == eager[layer].shape and float((full - eager[layer]).abs().max()) < 1e-5
        rows = run.attention(layer, "rows").to(CUDA)
        ref_rows = torch.stack([eager[layer][b][:, tokens[b]] for b in range(images.shape[0])])
        assert float((rows - ref_rows).abs().max()) < 1e-5
        with torch.no_grad():
            q, k, b_q, b_k = model_qk(site.module, inputs[layer], site.num_heads)
            logits = (q - b_q[None, :, None]) @ (k - b_k[None, :, None]).transpose(-1, -2)
        s = run.qk_spectrum[layer].S.to(CUDA)
        mine = torch.einsum("bhkn,hk,bhkm->bhnm", run.query(layer).to(CUDA), s, run.key(layer).to(CUDA))
        assert float((mine - logits).norm() / logits.norm()) < 1e-4


def test_the_spectrum_of_a_cuda_model_is_the_dense_svd():
    model = TINY_MODELS[0].model().to(CUDA)
    spec = qkhooks.spectrum(model)
    for site in qkhooks.sites(model):
        w = site.weights()
        dense = (w.w_q.double().transpose(1, 2) @ w.w_k.double()).cpu()
        ref = torch.linalg.svdvals(dense)[:, : site.head_dim]
        layer = spec[site.layer]
        assert torch.allclose(layer.S.double().cpu(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))
        recon = torch.einsum("hdk,hk,hek->hde", *(t.double().cpu() for t in (layer.U, layer.S, layer.V)))
        assert float((recon - dense).norm() / dense.norm()) < 1e-5


@pytest.mark.parametrize("qk_path", [True, False], ids=["from-q-k", "from-x"])
@pytest.mark.parametrize("kind", ["timm", "hf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_cuda_maps_are_the_softmax_of_the_models_own_q_k(kind, dtype, qk_path):
    model = _sharpened(_timm_vit() if kind == "timm" else _hf_vit(), dtype).to(CUDA)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(CUDA, dtype)
    with qkhooks.record(model, modes=None, attention="full+rows", qk_path=qk_path) as run, torch.no_grad():
        model(images)
    exact = _exact_maps(_model_qk(model, kind, 1, lambda: model(images)))
    assert float(exact.amax()) > 0.5  # sharp maps: half-precision logits would move them by ~1e-2
    tokens = torch.as_tensor(run.last.meta["query_tokens"]).to(CUDA)
    full, rows = run.attention(1, "full").to(CUDA).double(), run.attention(1, "rows").to(CUDA).double()
    assert float((full - exact).abs().max()) < 1e-4
    assert float((rows - exact[torch.arange(2, device=CUDA)[:, None], :, tokens].transpose(1, 2)).abs().max()) < 1e-4


def test_cuda_autocast_maps_are_the_softmax_of_the_models_own_q_k():
    model = _sharpened(_timm_vit(), torch.float32).to(CUDA)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(CUDA)
    with qkhooks.record(model, modes=None, attention="full") as run, torch.no_grad(), \
            torch.autocast(CUDA.type, dtype=torch.float16 if CUDA.type == "cuda" else torch.bfloat16):
        model(images)
    with torch.autocast(CUDA.type, dtype=torch.float16 if CUDA.type == "cuda" else torch.bfloat16):
        seen = _model_qk(model, "timm", 1, lambda: model(images))
    assert seen["q"].dtype in (torch.float16, torch.bfloat16)
    assert float((run.attention(1, "full").to(CUDA).double() - _exact_maps(seen)).abs().max()) < 1e-4


def test_a_dataset_recorded_on_cuda_holds_what_the_cpu_records(tmp_path):
    loaded = tiny_vit()
    ids, ref = in_memory_maps(loaded, "samples", limit=5)  # on the CPU, no store
    out = tmp_path / "cuda.h5"
    qkhooks.record_dataset(loaded, "samples", out, modes=8, layers="0,1", dtype="float32", limit=5, batch_size=2,
                           reducers=[], progress=False, device=CUDA)
    with qkhooks.open_run(out) as run:
        assert run.complete and run.ids == ids
        for name in ("modes/L0/query", "modes/L1/key"):
            stored = run.array(name)[:]
            assert np.isfinite(stored).all()
            np.testing.assert_allclose(stored, ref[name], rtol=0, atol=1e-4 * float(np.abs(ref[name]).max()))


@pytest.mark.skipif(CUDA.type != "cuda", reason="host-device synchronisation exists on a GPU only")
@pytest.mark.parametrize("attention", [["rows", "full"], ["rows", "pooled"], "full"], ids=str)
def test_a_recording_queues_its_work_without_waiting_for_the_gpu(attention):
    """After the first batch (spectrum, probes), a batch of modes and maps never makes the host wait for the GPU: torch's
    sync debug mode raises at any synchronisation (a plain .to("cuda") of a host index in a hook did, once per layer)."""
    tiny = TINY_MODELS[0]
    model, images = tiny.model().to(CUDA), tiny.images().to(CUDA)
    n = tiny.grid[0] * tiny.grid[1] + tiny.prefix
    meta = {"query_tokens": torch.tensor([[0, 3], [1, 2]]), "pool_masks": torch.rand(2, 3, n)}
    with qkhooks.record(model, modes=8, attention=attention) as run, torch.no_grad():
        run(images, meta=meta)
        first = run.last
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(images, meta=meta)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert run.last is not first and set(run.last.captures) == {0, 1}
    for name, value in run.last.arrays().items():  # the same batch twice: the same numbers
        torch.testing.assert_close(value, first.arrays()[name], rtol=0, atol=0)


@pytest.mark.skipif(CUDA.type != "cuda", reason="host-device synchronisation exists on a GPU only")
def test_entering_record_per_batch_reads_the_device_once_and_still_sees_an_edit_through_data():
    """The spectrum cache's bit-for-bit check of GPU weights reads the device once for every layer (not once per
    layer, each a wait for the queued forward), and still catches an edit that keeps ``_version`` (``.data``)."""
    import warnings

    tiny = TINY_MODELS[0]
    model, images = tiny.model().to(CUDA), tiny.images().to(CUDA)
    with qkhooks.record(model, modes=4) as run, torch.no_grad():
        run(images)
    first = run.qk_spectrum[1]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with qkhooks.record(model, modes=4) as again:
                pass
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    assert again.qk_spectrum[1] is first  # reused: no SVD
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.data[0, 0] += 1.0  # no _version bump
    with qkhooks.record(model, modes=4) as edited:
        pass
    assert edited.qk_spectrum[1] is not first and edited.qk_spectrum[0] is again.qk_spectrum[0]
    w = qkhooks.sites(model)[1].weights()
    dense = (w.w_q.double().transpose(1, 2) @ w.w_k.double()).cpu()
    ref = torch.linalg.svdvals(dense)[:, :4]
    assert torch.allclose(edited.qk_spectrum[1].S.double().cpu(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))
