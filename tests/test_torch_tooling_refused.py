"""r23: what torch's own tooling does to a model, against the promise (never a wrong number without a word, no refusal
of a model that computes what its weights say). Refused, naming the module and the fix: a model compiled whole or in
part (its hooks ran only while traced: a compiled timm ViT recorded nothing, record_dataset wrote a run of 0 images),
TorchScript, torch.fx GraphModules and torch's quantised layers (they crashed the search or were refused for an
unrelated reason), a hook put on a q/k layer or a late pre-hook on the attention module inside the context (maps
silently of unsteered q/k or of other tokens), and torch.nn.utils' reparametrisations with torch's own fix. Taken,
with maps equal to the model's own eager maps: deterministic parametrizations, hooks put on inside the context
before qkhooks' reading (on the block's norm, a prepended pre-hook)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import spectral_norm
from torch.nn.utils.parametrizations import weight_norm as parametrized_weight_norm

import qkhooks
from qkhooks.errors import QKHooksError

from test_wrapped_qk_layers_and_half_precision import _path
from test_foreign_hooks_refused import KINDS, _assert_exact, _attention, _eager, _images, _model, _qk_layer, steer_output


def _call(model: nn.Module, kind: str, images: torch.Tensor):
    return model(images) if kind == "timm" else model(pixel_values=images)


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("how", ["model.compile", "attention.compile", "wrapper in place"])
def test_a_compiled_model_is_refused_at_entry_and_before_any_file(tmp_path, how):
    """Before: record() took it and recorded nothing (the hooks ran only while Dynamo traced), record_dataset wrote a
    run of 0 images. Refusing needs no compilation: nothing here runs the model."""
    model = _model("timm")
    if how == "model.compile":
        model.compile(backend="eager")
        named = "the model (VisionTransformer)"
    elif how == "attention.compile":
        model.blocks[1].attn.compile(backend="eager")
        named = "'blocks.1.attn' (Attention)"
    else:
        model.blocks[1].attn = torch.compile(model.blocks[1].attn, backend="eager")
        named = "'blocks.1.attn' (OptimizedModule)"
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=4, layers=[0])  # a compiled module outside the recorded layers still runs the hooks
    message = str(err.value)
    assert named in message and "torch.compile" in message and "empty or stale" in message, message
    assert ("model.blocks.1.attn._orig_mod" if how == "wrapper in place" else "uncompiled") in message, message
    out = tmp_path / "compiled.h5"
    with pytest.raises(QKHooksError, match="torch.compile"):
        qkhooks.record_dataset(qkhooks.load_model(model), "samples", out, limit=2, batch_size=2, progress=False, modes=2)
    assert not out.exists()


# ------------------------------------------------------------------ TorchScript, torch.fx, quantised layers
def _scripted(kind: str) -> nn.Module:
    return torch.jit.script(_model(kind))


def _traced(kind: str) -> nn.Module:
    return torch.jit.trace(_model(kind), _images())


def _fx(kind: str) -> nn.Module:
    return torch.fx.symbolic_trace(_model(kind))


def _quantised(kind: str) -> nn.Module:
    with warnings.catch_warnings():  # torch's deprecation notice for torch.ao.quantization
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(_model(kind), {nn.Linear}, dtype=torch.qint8)


OPAQUE = {  # name -> (build, kind, what the refusal must say). Before: AttributeError, TypeError or another reason
    "jit.script": (_scripted, "timm", ["the model (RecursiveScriptModule) is TorchScript", "Record the nn.Module you scripted"]),
    "jit.trace": (_traced, "timm", ["the model (TopLevelTracedModule) is TorchScript", "Record the nn.Module you scripted"]),
    "fx": (_fx, "timm", ["is a torch.fx GraphModule", "no attention module left", "Record the nn.Module you traced"]),
    "quantize_dynamic-timm": (_quantised, "timm", ["'blocks.0.attn.qkv' (Linear) is a quantised layer", "Record the float"]),
    "quantize_dynamic-hf": (_quantised, "hf", ["'layers.0.attention.q_proj' (Linear) is a quantised layer", "quantize_dynamic"]),
}


@pytest.mark.parametrize("name", list(OPAQUE))
def test_torchscript_fx_and_quantised_models_are_refused_naming_what_and_the_fix(name):
    build, kind, says = OPAQUE[name]
    model = build(kind)
    for call in (lambda: qkhooks.record(model, modes=4), lambda: qkhooks.spectrum(model), lambda: qkhooks.sites(model)):
        with pytest.raises(QKHooksError) as err:
            call()
        assert all(part in str(err.value) for part in says), str(err.value)


# ------------------------------------------------------------------ hooks put on inside the context
def _steer_tokens(module, args, kwargs):
    """Scales the tokens an attention module is handed (positionally in timm, as hidden_states in HF)."""
    if args:
        return (args[0] * 1.5, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 1.5}


@pytest.mark.parametrize("where", ["q/k layer", "attention pre-hook"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_hook_put_on_inside_the_context_refuses_the_next_batch(kind, where):
    """Before: taken, maps off the steered model's eager maps by ~5e-3 without a word (q/k read before the steering
    hook, or the tokens before the late pre-hook). The batch is refused before the forward; with the hook removed the
    recording goes on, exact."""
    model, images = _model(kind), _images()
    with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
        _call(model, kind, images)
        if where == "q/k layer":
            module = _qk_layer(model, kind)
            handle = module.register_forward_hook(steer_output)
            says = [f"'{_path(model, module)}'", "steer_output", "someone else registered"]
        else:
            module = _attention(model, kind)
            handle = module.register_forward_pre_hook(_steer_tokens, with_kwargs=True)
            says = [f"{_path(model, module)!r} carries a forward pre-hook", "_steer_tokens", "registered after qkhooks' own"]
        with pytest.raises(QKHooksError) as err:
            _call(model, kind, images)
        assert all(part in str(err.value) for part in says), str(err.value)
        assert run.images_seen == 2  # the refused batch reached no sink
        handle.remove()
        _call(model, kind, images)
    for layer, eager in enumerate(_eager(model, kind, images)):
        torch.testing.assert_close(run.attention(layer, "full"), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_put_on_inside_the_context_before_qkhooks_reads_are_taken_and_exact(kind):
    """No false refusal: a hook on layer 1's norm and a prepended pre-hook on its attention module (both run before
    qkhooks reads the tokens) change what the layer sees, and the maps are the hooked model's own eager maps."""
    model, images = _model(kind), _images()
    attention = _attention(model, kind)
    block = model.blocks[1] if kind == "timm" else next(m for m in model.modules() if type(m).__name__ == "ViTLayer"
                                                        and attention in list(m.modules()))
    norm = next(m for m in block.modules() if isinstance(m, nn.LayerNorm))
    with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
        handles = [norm.register_forward_hook(steer_output),
                   attention.register_forward_pre_hook(_steer_tokens, with_kwargs=True, prepend=True)]
        _call(model, kind, images)
    try:
        eager = _eager(model, kind, images)
    finally:
        for handle in handles:
            handle.remove()
    plain = _eager(model, kind, images)
    assert (eager[1] - plain[1]).abs().max() > 1e-3  # the hooks do change layer 1's maps
    for layer in (0, 1):
        torch.testing.assert_close(run.attention(layer, "full"), eager[layer], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ torch.nn.utils reparametrisations
def _old_weight_norm(layer: nn.Module) -> None:
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated for the parametrization
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(layer)


REPARAMETRISED = {  # name -> (applied to layer 1's q/k module, the fix the refusal must name)
    "prune": (lambda layer: prune.l1_unstructured(layer, "weight", amount=0.3), "torch.nn.utils.prune.remove({}, 'weight')"),
    "prune-bias": (lambda layer: prune.random_unstructured(layer, "bias", amount=0.5), "torch.nn.utils.prune.remove({}, 'bias')"),
    "weight_norm": (_old_weight_norm, "torch.nn.utils.remove_weight_norm({})"),
    "spectral_norm-parametrization": (
        spectral_norm, "torch.nn.utils.parametrize.remove_parametrizations({}, 'weight')"),
}


@pytest.mark.parametrize("name", list(REPARAMETRISED))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_reparametrisations_are_refused_with_torchs_own_fix(kind, name):
    """Before: the refusal told the user to merge a peft adapter. Once folded in with the fix named, taken and exact."""
    model = _model(kind)
    layer = _qk_layer(model, kind)
    apply, fix = REPARAMETRISED[name]
    apply(layer)
    target = f"model.{_path(model, layer)}"
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=4)
    message = str(err.value)
    assert fix.format(target) in message and "merge_and_unload" not in message, message
    exec(fix.format("layer"), {"torch": torch, "layer": layer})  # the fix as named, on the same module
    _assert_exact(model, kind)


class Doubled(nn.Module):
    """A deterministic parametrization: the weight read is the weight the forward uses."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_parametrizations_are_taken_and_exact(kind):
    model = _model(kind)
    parametrize.register_parametrization(_qk_layer(model, kind), "weight", Doubled())
    parametrized_weight_norm(model.blocks[0].attn.qkv if kind == "timm" else _qk_layer(model, kind, side=1))
    _assert_exact(model, kind)
