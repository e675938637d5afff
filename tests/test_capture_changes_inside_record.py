"""Round 37's review of capture (scales, modules and head counts changed inside record(), partial calls, hooks on the
q/k norms): each test seen to fail on the code before its fix, each number compared with the model's own eager
attention (timm with ``fused_attn=False``, Hugging Face's ``output_attentions`` under ``attn_implementation="eager"``).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import transformers as T

import qkhooks
from qkhooks.errors import QKHooksError

_HF = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)


def _timm(depth: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, embed_dim=32, depth=depth, num_heads=2,
                              img_size=16, patch_size=8, num_classes=0, **kw).eval()
    with torch.no_grad():  # non-trivial maps: the default init gives near-uniform ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _eager_probs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The softmax each attention module of a timm model computes (its eager path, on a copy): attn_drop's input."""
    ref = copy.deepcopy(model)
    probs: dict[str, torch.Tensor] = {}
    for name, module in ref.named_modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, a, name=name: probs.__setitem__(name, a[0].clone()))
    with torch.no_grad():
        ref(x)
    return probs


def _assert_maps_are_the_models(run, probs: dict[str, torch.Tensor]) -> None:
    for layer in run.layers:
        got, want = run.attention(layer, "full"), probs[run.module_paths[layer]]
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-5, layer


def _hf(cls, config_cls, impl: str = "eager") -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_cls(**_HF)
    config._attn_implementation = impl
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


_HF_FAMILIES = [(T.ViTModel, T.ViTConfig, "scaling"), (T.Dinov2Model, T.Dinov2Config, "scaling"),
                (T.BeitModel, T.BeitConfig, "scaling"), (T.CLIPVisionModel, T.CLIPVisionConfig, "scale"),
                (T.SiglipVisionModel, T.SiglipVisionConfig, "scale")]


# ------------------------------------------------------------- 1. a Hugging Face attention scale changed inside
@pytest.mark.parametrize("cls, config_cls, attr", _HF_FAMILIES, ids=[c[0].__name__ for c in _HF_FAMILIES])
def test_a_hugging_face_scale_changed_inside_record_is_refused_as_timms_is_and_set_before_entry_is_exact(
        cls, config_cls, attr):
    """Before: ``attn.scaling`` (ViT, DINOv2, BEiT) or ``attn.scale`` (CLIP, SigLIP) set to 0.3x after the first batch
    was taken, and the full maps were off the model's own output_attentions by ~0.6 without a word (only timm's
    scale was checked per batch). Now refused naming the attribute, the earlier batch kept. Set before entering
    record() (the fix named), the SDPA model's maps are those of the same weights and scale under eager attention."""
    model, eager, pixels = _hf(cls, config_cls, "sdpa"), _hf(cls, config_cls, "eager"), _images()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        before = eager(pixel_values=pixels, output_attentions=True).attentions
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full") as run:
        model(pixel_values=pixels)
        for twin in (model, eager):
            for module in [mod for mod in twin.modules() if isinstance(getattr(mod, attr, None), float)]:
                setattr(module, attr, getattr(module, attr) * 0.3)
        with pytest.raises(QKHooksError, match=rf"its {attr} changed from 0\.25 to 0\.075 inside this "
                                               r"record\(\) context.*set it before entering record\(\)"):
            model(pixel_values=pixels)
        assert float((run.attention(0, "full") - before[0]).abs().max()) < 1e-5  # the earlier batch, kept
    with torch.no_grad():
        want = eager(pixel_values=pixels, output_attentions=True).attentions
        with qkhooks.record(model, modes=2, attention="full") as run:
            model(pixel_values=pixels)
    assert float((want[0] - before[0]).abs().max()) > 0.05  # the scale matters to these maps
    for layer in run.layers:
        assert float((run.attention(layer, "full") - want[layer]).abs().max()) < 1e-5


# ------------------------------------------------------ 2. modules and head counts on the q/k path changed inside
def _new_linear(old: torch.nn.Linear) -> torch.nn.Linear:
    new = torch.nn.Linear(old.in_features, old.out_features)
    with torch.no_grad():
        new.weight.copy_(old.weight * 2)
        new.bias.copy_(old.bias)
    return new


def _norms(attn) -> None:
    attn.q_norm, attn.k_norm = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
    with torch.no_grad():
        attn.k_norm.weight.mul_(3.0)


_TIMM_EDITS = {
    "q_norm": (lambda attn: setattr(attn, "q_norm", torch.nn.LayerNorm(16)), r"'blocks\.0\.attn\.q_norm', a module on its "
               r"q/k path, is no longer the module qkhooks found \(Identity then, LayerNorm now\)"),
    "k_norm": (lambda attn: setattr(attn, "k_norm", torch.nn.LayerNorm(16)), r"'blocks.0.attn.k_norm', a module on its "
               r"q/k path, is no longer the module qkhooks found \(Identity then, LayerNorm now\)"),
    "qkv": (lambda attn: setattr(attn, "qkv", _new_linear(attn.qkv)), r"'blocks.0.attn.qkv', a module on its q/k path, "
            r"is no longer the module qkhooks found \(Linear then, Linear now\)"),
    "num_heads": (lambda attn: (setattr(attn, "num_heads", 4), setattr(attn, "head_dim", 8)),
                  r"its num_heads changed from 2 to 4 inside this record\(\) context"),
}


@pytest.mark.parametrize("qk_path", [True, False])
@pytest.mark.parametrize("edit", sorted(_TIMM_EDITS))
def test_a_module_or_head_count_on_the_qk_path_changed_inside_record_is_refused_naming_it(edit, qk_path):
    """Before: ``q_norm`` / ``k_norm`` replaced (Identity -> LayerNorm) and ``num_heads`` / ``head_dim`` changed
    after the first batch were taken (maps off the model's eager probabilities by 0.5-0.9, or of the old head
    count); a new ``qkv`` Linear was refused advising qk_path=False, which then gave maps off by ~0.6 without a word.
    Now each is refused at the next forward naming what changed and the fix, and the batch before it stays readable,
    equal to the model's own maps."""
    model, x = _timm(), _images()
    probs = _eager_probs(model, x)
    change, named = _TIMM_EDITS[edit]
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full", qk_path=qk_path) as run:
        model(x)
        for block in model.blocks:
            change(block.attn)
        with pytest.raises(QKHooksError, match=named + r".*before entering record\(\)") as refused:
            model(x)
        assert "qk_path=False to use the tokens" not in str(refused.value)
        _assert_maps_are_the_models(run, probs)  # the first batch, kept: refused before the next began
    # the fix named: the change made before entering record() is found by a new search (a one-sided norm is refused
    # there, as ever; on both sides it is modelled), and the maps are the model's own eager maps
    if edit in ("q_norm", "k_norm"):
        with pytest.raises(QKHooksError, match=r"its q/k normalisation is (LayerNorm on q and Identity|Identity on q "
                                               r"and LayerNorm) on k"):
            qkhooks.record(model, modes=2, attention="full", qk_path=qk_path)
        for block in model.blocks:
            _norms(block.attn)
    if edit == "num_heads":  # its fused path computes with 1/sqrt(d_k) of the new heads (refused otherwise, as ever)
        for block in model.blocks:
            block.attn.scale = 8 ** -0.5
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full", qk_path=qk_path) as run:
        model(x)
    _assert_maps_are_the_models(run, _eager_probs(model, x))


def test_a_hugging_face_q_proj_replaced_inside_record_is_refused_also_with_qk_path_false():
    """Before: ``q_proj`` replaced after the first batch was refused advising qk_path=False, and with it the maps were
    off output_attentions by ~0.4 without a word. Now refused naming the module, on either path."""
    for qk_path in (True, False):
        model, pixels = _hf(T.ViTModel, T.ViTConfig), _images()
        with torch.no_grad(), qkhooks.record(model, modes=2, attention="full", qk_path=qk_path) as run:
            want = model(pixel_values=pixels, output_attentions=True).attentions
            attention = model.layers[0].attention
            attention.q_proj = _new_linear(attention.q_proj)
            with pytest.raises(QKHooksError, match=r"'layers\.0\.attention\.q_proj', a module on its q/k path, is no "
                                                   r"longer the module qkhooks found.*qk_path=False would not help"):
                model(pixel_values=pixels)
            assert float((run.attention(0, "full") - want[0]).abs().max()) < 1e-5


def test_the_attention_module_replaced_inside_record_is_refused_and_the_batch_before_stays():
    """Before: a new attention module inside the context ran unrecorded and reading said "nothing recorded yet" though
    a batch had been. Now the forward is refused naming the module, and the batch before it is still the one read."""
    model, x = _timm(), _images()
    probs = _eager_probs(model, x)
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full") as run:
        model(x)
        old = model.blocks[1].attn
        model.blocks[1].attn = copy.deepcopy(old)
        with pytest.raises(QKHooksError, match=r"'blocks\.1\.attn', the attention module, is no longer the module "
                                               r"qkhooks found \(Attention then, Attention now\)"):
            model(x)
        assert run.n == 2
        _assert_maps_are_the_models(run, probs)


# ------------------------------------------------------------------- 3. a call that runs only some recorded layers
def test_a_call_that_stops_before_the_last_recorded_layer_names_the_layers_it_ran_and_the_layers_to_record():
    """Before: after ``forward_intermediates(x, indices=[1], stop_early=True)`` reading said "the last forward did not
    complete (it raised, or it is still running)" and ``run.n`` was 0. Now both name the layers that ran and those that
    did not, and the ``layers=`` to record; recording those, the call's maps are the model's own."""
    model, x, y = _timm(), _images(2), _images(3, seed=1)
    partial = (r"^the last call ran the recorded layers \[0, 1\] but not \[2\], so it completed no batch.*"
               r"qkhooks\.record\(model, layers=\[0, 1\], \.\.\.\)")
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full") as run:
        model(x)
        model.forward_intermediates(y, indices=[1], stop_early=True)
        with pytest.raises(QKHooksError, match=partial):
            run.query(0)
        with pytest.raises(QKHooksError, match=partial):
            run.n
    with pytest.raises(QKHooksError, match=partial):  # and after the context
        run.attention(1, "full")
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full", layers=[0, 1]) as run:
        model.forward_intermediates(y, indices=[1], stop_early=True)
    assert run.n == 3
    _assert_maps_are_the_models(run, _eager_probs(model, y))


def test_a_block_called_on_its_own_names_the_layer_it_ran():
    model, x = _timm(), _images()
    with torch.no_grad(), qkhooks.record(model, modes=2) as run:
        model(x)
        model.blocks[2](model._pos_embed(model.patch_embed(x)))
    with pytest.raises(QKHooksError, match=r"^the last call ran the recorded layers \[2\] but not \[0, 1\].*"
                                           r"layers=\[2\]"):
        run.query(2)


# ------------------------------------------------------------------------------- 4. hooks on the q/k norms
@pytest.mark.parametrize("qk_norm, side", [(True, "q_norm"), (False, "k_norm")])
def test_a_hook_on_a_qk_norm_is_refused_as_a_hook_on_qkv_is(qk_norm, side):
    """Before: a forward hook on ``attn.q_norm`` (a LayerNorm) or ``attn.k_norm`` (an Identity) was taken, while one
    on ``qkv`` is refused as a steering hook: the modes describe the unhooked q/k path while the model's logits carry
    the hook's change (and with an Identity norm the rebuilt maps miss it too). Now refused the same way, before entry
    and inside the context; removed, the maps are the model's own."""
    model, x = _timm(qk_norm=qk_norm), _images()
    norm = getattr(model.blocks[1].attn, side)
    steering = (r"q or k is normalised by 'blocks\.1\.attn\.%s' \(.*\), which carries a forward hook someone else "
                r"registered.*handle\.remove\(\)" % side)
    handle = norm.register_forward_hook(lambda module, args, out: out * 3 + 0.5)
    try:
        with pytest.raises(QKHooksError, match=steering):
            qkhooks.record(model, modes=2, attention="full")
    finally:
        handle.remove()
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full") as run:
        model(x)
        handle = norm.register_forward_hook(lambda module, args, out: out * 3 + 0.5)
        try:
            with pytest.raises(QKHooksError, match=steering):
                model(x)
        finally:
            handle.remove()
        model(x)
    _assert_maps_are_the_models(run, _eager_probs(model, x))
