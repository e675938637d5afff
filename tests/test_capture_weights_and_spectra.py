"""Round 32's review of the capture layer: each test reproduces a wrong number the reviewer found given without a
word (against the model's own eager attention, or x·u_n of the modes the recording reports), and checks the fix:
the exact value, or a refusal that names the cause and the fix."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from conftest import forward_with_hooks


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=4, num_classes=0, **kw).eval()


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens(model, x) -> list[torch.Tensor]:
    """The tokens entering each block's attention (its norm1 output), as the model computes them."""
    seen = []
    forward_with_hooks(model, [b.norm1.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
                               for b in model.blocks], x)
    return seen


def _x_maps(spectrum, x):
    u, v = torch.as_tensor(spectrum.U).double(), torch.as_tensor(spectrum.V).double()
    return torch.einsum("bnd,hdk->bhkn", x.double(), u), torch.einsum("bnd,hdk->bhkn", x.double(), v)


# ------------------------------------------------------------------ weights edited through .data inside the context
@pytest.mark.parametrize("what", ["weight", "bias"])
def test_an_edit_through_param_data_inside_record_is_refused_at_the_next_batch(what):
    """``.data`` edits keep ``_version``: the per-batch check compared only identity and version, so the second batch
    was recorded with the first batch's modes (maps off by O(10) on the q/k path). Now every batch compares the
    weights' bits with the spectrum cache's copy."""
    model = _vit()
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        run(_images())
        getattr(model.blocks[0].attn.qkv, what).data.add_(0.5)
        with pytest.raises(QKHooksError, match=r"^layer 0 \(blocks\.0\.attn\): its weights changed inside this "
                                               r"record\(\) context"):
            run(_images(seed=1))
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:  # a new context: the new weights' modes
        run(_images(seed=1))
        q, _ = _x_maps(run.spectrum(0), _tokens(model, _images(seed=1))[0])
        assert torch.allclose(run.query(0).double(), q, atol=1e-4)


def test_the_per_batch_weights_check_on_a_device_compares_every_layer_in_one_read_and_sees_a_data_edit(monkeypatch):
    """The GPU path (opened on CPU copies): every layer's copy against its live views in one fused difference and one
    read; an unchanged model records batch after batch, a ``.data`` edit of one layer is refused naming it. A fused
    qkv's W_q/W_k are views of its weight (read in place each batch); computed ones would be read anew."""
    import importlib

    from qkhooks.spectrum import live_qk_tensors

    spectrum_module = importlib.import_module("qkhooks.spectrum")  # the module (qkhooks.spectrum is also a function)

    monkeypatch.setattr(spectrum_module, "_compared_on_device", lambda t: True)
    model = _vit()
    reads = []
    real = spectrum_module._qk_tensors
    monkeypatch.setattr(spectrum_module, "_qk_tensors", lambda site: reads.append(site.layer) or real(site))
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        assert all(live_qk_tensors(site) is not None for site in run.sites)  # timm's fused qkv: views
        run(_images())
        reads.clear()
        run(_images(seed=1))
        assert reads == []  # the views taken at entry, not sliced again
        model.blocks[1].attn.qkv.weight.data[3, 5] += 1e-3
        with pytest.raises(QKHooksError, match=r"^layer 1 \(blocks\.1\.attn\): its weights changed"):
            run(_images(seed=2))


# ------------------------------------------------------------------ a given spectrum of other weights
def test_a_spectrum_of_other_weights_given_to_record_is_refused_and_its_own_or_a_run_files_is_taken(tmp_path):
    model = _vit()
    before = qkhooks.spectrum(model)
    with torch.no_grad():
        for p in model.blocks[1].attn.qkv.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a training step
    with pytest.raises(QKHooksError, match=r"^layer 1 \(blocks\.1\.attn\): the spectrum given \(spectrum=\) is not that "
                                           r"of this layer's weights: U\^T \(W_q\^T W_k\) V differs from diag\(S\) by "):
        qkhooks.record(model, modes=4, spectrum=before)
    now = qkhooks.spectrum(model)
    stored = qkhooks.spectrum(_vit())  # the same weights' spectrum, computed apart: not the cache's object
    for given in (now, now.top(4)):
        with torch.no_grad(), qkhooks.record(model, modes=4, spectrum=given) as run:
            run(_images())
            q, k = _x_maps(run.spectrum(1), _tokens(model, _images())[1])
            assert torch.allclose(run.query(1).double(), q, atol=1e-4) and torch.allclose(run.key(1).double(), k, atol=1e-4)
    with pytest.raises(QKHooksError, match=r"^layer 1 .* is not that of this layer's weights"):  # other weights
        qkhooks.record(model, modes=4, spectrum=stored)
    qkhooks.record(_vit(), modes=4, spectrum=stored)  # its own weights, computed apart: taken
    # on purpose: the tokens of the trained model on the modes of the weights before the step
    with torch.no_grad(), qkhooks.record(model, modes=4, spectrum=before, spectrum_of_other_weights=True) as run:
        run(_images())
        q, _ = _x_maps(before.layers[1].top(4), _tokens(model, _images())[1])
        assert torch.allclose(run.query(1).double(), q, atol=1e-4) and torch.equal(run.spectrum(1).S, before[1].S[:, :4])


def test_a_given_spectrum_whose_sigmas_are_not_the_layers_is_refused():
    import dataclasses

    model = _vit()
    whole = qkhooks.spectrum(model)
    layer = whole.layers[0]
    wrong = dataclasses.replace(layer, S=layer.S * 1.01)
    with pytest.raises(QKHooksError, match=r"differs from diag\(S\)"):
        qkhooks.record(model, modes="all", spectrum=[wrong, whole.layers[1]])
    top = layer.top(4)
    inflated = dataclasses.replace(top, S_all=top.S_all * 1.01)
    with pytest.raises(QKHooksError, match=r"its sigmas \(S_all\) are not those of W_q\^T W_k"):
        qkhooks.record(model, modes=4, spectrum=[inflated, whole.layers[1].top(4)])


# ------------------------------------------------------------------ autocast
@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_maps_under_autocast_are_the_float32_projections_of_the_tokens(compute_dtype):
    """Under CPU autocast the tokens entering W_q/W_k are float32 (layer norm runs in float32), but qkhooks' own
    projection ran under the caller's autocast and came back bfloat16 (~1e-2 off), compute_dtype=float32 too."""
    model = _vit()
    x = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = _tokens(model, x)
        with torch.no_grad(), qkhooks.record(model, modes=4, compute_dtype=compute_dtype) as run:
            run(x)
    assert tokens[0].dtype == torch.float32 and run.query(0).dtype == torch.float32
    for layer in (0, 1):
        q, k = _x_maps(run.spectrum(layer), tokens[layer])
        assert (run.query(layer).double() - q).abs().max() < 1e-4
        assert (run.key(layer).double() - k).abs().max() < 1e-4


# ------------------------------------------------------------------ Hugging Face attention functions
def test_an_hf_model_dispatching_to_an_unknown_attention_function_is_refused_at_entry_and_per_batch():
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sharpened(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        return sdpa_attention_forward(module, q, k, v, mask, scaling=2.0 * scaling, dropout=dropout, **kw)

    AttentionInterface.register("qkhooks_test_sharpened", sharpened)
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, image_size=32, patch_size=8)).eval()
    model.set_attn_implementation("qkhooks_test_sharpened")
    refusal = (r"its config's _attn_implementation is 'qkhooks_test_sharpened', an attention function qkhooks does "
               r"not know .* Record with one of eager, flash_attention_2, flash_attention_3, flex_attention, sdpa")
    with pytest.raises(QKHooksError, match=refusal):
        qkhooks.record(model, modes=None, attention="full")
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as run:
        run(_images())
        model.set_attn_implementation("qkhooks_test_sharpened")  # changed inside the context
        with pytest.raises(QKHooksError, match=refusal):
            run(_images())
        model.set_attn_implementation("sdpa")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(_images(), output_attentions=True).attentions
    assert torch.allclose(run.attention(0, "full"), eager[0], atol=1e-5)  # the last batch: sdpa, the model's own maps


# ------------------------------------------------------------------ timm's attn.scale
def test_a_timm_scale_the_fused_path_ignores_or_one_changed_inside_the_context_is_refused():
    model = _vit()
    attn = model.blocks[0].attn
    attn.scale = 0.05
    assert attn.fused_attn  # SDPA without scale=: the model computes with 1/sqrt(d_k), not 0.05
    with pytest.raises(QKHooksError, match=r"its scale is 0\.05, but its fused path \(fused_attn=True\) calls "
                                           r"scaled_dot_product_attention without it"):
        qkhooks.record(model, modes=None, attention="full")
    attn.fused_attn = False  # the eager path uses attn.scale: recorded exactly
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, a, o: seen.__setitem__("maps", a[0].detach().clone()))
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as run:
        run(_images())
        assert torch.allclose(run.attention(0, "full"), seen["maps"], atol=1e-6)
        attn.scale = 0.1
        with pytest.raises(QKHooksError, match=r"its scale changed from 0\.05 to 0\.1 inside this record\(\) context"):
            run(_images())
    handle.remove()


# ------------------------------------------------------------------ model.train() inside the context
def test_model_train_inside_the_context_warns_once_as_entering_in_training_mode_does():
    model = _vit(attn_drop_rate=0.5)
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as run:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(_images())  # eval: no warning
        model.train()
        with pytest.warns(UserWarning, match=r"VisionTransformer is in training mode with dropout or stochastic depth "
                                             r"active \(blocks\.0\.attn\.attn_drop"):
            run(_images())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(_images())  # said once
