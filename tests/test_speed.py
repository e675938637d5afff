"""Speed paths that must not change a number: the spectrum cache and the rebuilt full maps."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import sys

import qkhooks
import qkhooks.spectrum  # noqa: F401  (qkhooks.spectrum, the attribute, is the function)
from conftest import TINY_MODELS, Tiny

spectrum_module = sys.modules["qkhooks.spectrum"]


@pytest.fixture
def svd_calls(monkeypatch) -> list[int]:
    """Counts the factored SVDs (one per layer spectrum computed) by wrapping the library's own function."""
    calls: list[int] = []
    real = spectrum_module.factored_svd

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(spectrum_module, "factored_svd", counting)
    return calls


def dense_check(site, layer) -> None:
    """The cached spectrum against a dense SVD of W_q^T W_k of the site's current weights."""
    w = site.weights()
    dense = w.w_q.double().transpose(1, 2) @ w.w_k.double()
    ref = torch.linalg.svdvals(dense)[:, : site.head_dim]
    assert torch.allclose(layer.S.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))
    recon = torch.einsum("hdk,hk,hek->hde", layer.U.double(), layer.S.double(), layer.V.double())
    assert float((recon - dense).norm() / dense.norm()) < 1e-5


@pytest.mark.parametrize("tiny", [TINY_MODELS[0], TINY_MODELS[4]], ids=lambda t: t.name)  # fused qkv; separate q, k
def test_record_per_batch_reuses_the_spectrum_without_svd(tiny: Tiny, svd_calls):
    model, images = tiny.model(), tiny.images()
    call = (lambda m: m(images)) if tiny.kind == "timm" else (lambda m: m(pixel_values=images))
    with qkhooks.record(model, modes=4) as first, torch.no_grad():
        call(model)
    assert len(svd_calls) == 2  # one per layer
    with qkhooks.record(model, modes=4) as second, torch.no_grad():
        call(model)
    assert len(svd_calls) == 2  # the second entry did no SVD
    # the recordings hand out their own copies (round 39): equal values, the cache's arrays not shared
    cached = qkhooks.spectrum(model)[0].S
    assert torch.equal(cached[:, :4], first.spectrum[0].S) and torch.equal(first.spectrum[0].S, second.spectrum[0].S)
    assert cached.data_ptr() != first.spectrum[0].S.data_ptr()
    assert len(svd_calls) == 2
    for layer in (0, 1):
        assert torch.equal(first.query[layer], second.query[layer])


def test_in_place_weight_update_invalidates_the_cached_spectrum(svd_calls):
    model = TINY_MODELS[0].model()
    before = qkhooks.spectrum(model)
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.weight[:32].mul_(torch.linspace(0.5, 2.0, 32)[:, None])  # W_q of layer 0, in place
    after = qkhooks.spectrum(model)
    assert len(svd_calls) == 3  # two layers, then layer 0 again; layer 1 reused
    assert not torch.allclose(before[0].S, after[0].S)
    assert after[1].S.data_ptr() == before[1].S.data_ptr()
    dense_check(qkhooks.sites(model)[0], after[0])


@pytest.mark.parametrize("edit", ["data", "replace", "state_dict"])
def test_weight_edits_that_bypass_the_version_counter_still_invalidate(edit, svd_calls):
    """``param.data`` edits keep ``_version``; a replaced tensor or a loaded state dict changes identity."""
    model = TINY_MODELS[4].model()  # Hugging Face: separate query/key Linear modules
    before = qkhooks.spectrum(model)[0]
    query = qkhooks.sites(model)[0].qk_modules[0]
    name = next(n for n, p in model.named_parameters() if p is query.weight)
    if edit == "data":
        query.weight.data.mul_(torch.linspace(0.5, 2.0, 32)[:, None])
    elif edit == "replace":
        query.weight = torch.nn.Parameter(query.weight.detach() * torch.linspace(0.5, 2.0, 32)[:, None])
    else:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[name] *= torch.linspace(0.5, 2.0, 32)[:, None]
        model.load_state_dict(state)
    after = qkhooks.spectrum(model)[0]
    assert len(svd_calls) == (4 if edit == "state_dict" else 3)  # loading writes (and re-versions) every weight
    assert not torch.allclose(before.S, after.S)
    dense_check(qkhooks.sites(model)[0], after)


def test_augmented_and_plain_spectra_are_cached_apart(svd_calls):
    model = TINY_MODELS[0].model()
    plain, augmented = qkhooks.spectrum(model), qkhooks.spectrum(model, augmented=True)
    assert len(svd_calls) == 4 and augmented[0].augmented and not plain[0].augmented
    assert qkhooks.spectrum(model, augmented=True)[0].U.shape[1] == 33 and len(svd_calls) == 4


def test_a_deleted_model_frees_its_cached_spectra():
    model = TINY_MODELS[0].model()
    qkhooks.spectrum(model)
    attn = weakref.ref(model.blocks[0].attn)
    assert attn() in spectrum_module._SPECTRUM_CACHE
    del model
    gc.collect()
    assert attn() is None


@pytest.mark.parametrize("tiny", [TINY_MODELS[0], TINY_MODELS[4]], ids=lambda t: t.name)
@pytest.mark.parametrize("qk_path", [True, False], ids=["from-model-qk", "from-tokens"])
def test_full_maps_and_rows_equal_eager_attention_on_both_paths(tiny: Tiny, qk_path: bool):
    """Maps rebuilt from the model's own q/k Linear outputs, or from the tokens x, equal its eager softmax."""
    from conftest import eager_attention

    model, images = tiny.model(), tiny.images(batch=3)
    eager = eager_attention(tiny, model, images)
    tokens = torch.tensor([[0, 5, 7]] * 3)
    with qkhooks.record(model, modes=4, attention="rows+full", qk_path=qk_path) as run, torch.no_grad():
        run.set_batch(query_tokens=tokens)
        model(images) if tiny.kind == "timm" else model(pixel_values=images)
    assert run.mode_source == {0: "qk" if qk_path else "x", 1: "qk" if qk_path else "x"}
    for layer in (0, 1):
        full = run.attention_maps("full")[layer]
        assert full.dtype == torch.float32 and full.shape == eager[layer].shape
        torch.testing.assert_close(full, eager[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(run.attention_maps("rows")[layer], eager[layer][:, :, [0, 5, 7]], atol=1e-5, rtol=0)
