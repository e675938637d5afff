"""r22: what makes a q/k layer (or the attention module) compute other than the weights qkhooks reads, while its class
and weights look plain, is refused at ``record()`` entry naming the module, what is on it and the fix: a forward replaced
on the instance, a hook someone else registered (the layer's own, torch's global ones), a weight that is a tensor
subclass, a wrapper class defined beside the attention class. Taken, with maps equal to the model's own: a plain model,
nested recordings, hooks off the q/k layers (the MLP; pre-hooks on the attention module, whose tokens qkhooks reads
after them), accelerate's device-placement wrapper (a stand-in with its names, and accelerate itself where installed)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import qkhooks
from qkhooks import capture
from qkhooks.errors import QKHooksError
from qkhooks.models import base
from qkhooks.models.base import find_sites

from conftest import LayerStack, eager_attention
from test_wrapped_qk_layers_and_half_precision import _hf_attentions, _hf_qk_names, _hf_vit, _path, _timm_vit

KINDS = ["timm", "hf"]


def _model(kind: str) -> nn.Module:
    return _timm_vit() if kind == "timm" else _hf_vit()


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _qk_layer(model: nn.Module, kind: str, side: int = 0) -> nn.Module:
    """Layer 1's fused qkv (timm) or its query (side 0) / key (side 1) projection (HF)."""
    if kind == "timm":
        return model.blocks[1].attn.qkv
    attn = _hf_attentions(model)[1]
    return getattr(attn, _hf_qk_names(attn)[side])


def _attention(model: nn.Module, kind: str) -> nn.Module:
    return model.blocks[1].attn if kind == "timm" else _hf_attentions(model)[1]


def _eager(model: nn.Module, kind: str, images: torch.Tensor) -> list[torch.Tensor]:
    """The model's own eager maps per layer, with whatever hooks it carries: the independent reference."""
    return eager_attention(types.SimpleNamespace(kind=kind), model, images)  # type: ignore[arg-type]


def _assert_exact(model: nn.Module, kind: str, **options) -> None:
    """Recorded full maps of every layer = the model's own eager maps (modes from the q/k outputs or from x)."""
    images = _images()
    with qkhooks.record(model, modes=4, attention="full", **options) as run, torch.no_grad():
        model(images) if kind == "timm" else model(pixel_values=images)
    for layer, eager in enumerate(_eager(model, kind, images)):
        torch.testing.assert_close(run.attention(layer, "full"), eager, atol=1e-5, rtol=0)


def _entered_once(model: nn.Module) -> None:
    """A recording entered and left, so the search is cached and the next entry must check by itself."""
    with qkhooks.record(model, modes=2):
        pass


# ------------------------------------------------------------------ hooks someone else registered
def steer_output(module, args, output):
    return output * 1.5


def steer_input(module, args):
    return (args[0] * 1.5,)


def steer_output_kw(module, args, kwargs, output):
    return output * 1.5


def steer_input_kw(module, args, kwargs):
    return (args[0] * 1.5,), kwargs


HOOKS = {  # name -> (how it is registered, the hook, its options)
    "forward": ("register_forward_hook", steer_output, {}),
    "pre": ("register_forward_pre_hook", steer_input, {}),
    "forward-kwargs-always": ("register_forward_hook", steer_output_kw, dict(with_kwargs=True, always_call=True)),
    "pre-kwargs-prepend": ("register_forward_pre_hook", steer_input_kw, dict(with_kwargs=True, prepend=True)),
}


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_hook_on_a_q_or_k_layer_is_refused_at_entry_naming_layer_hook_and_fix(kind, hook):
    """Any kind of hook, on the fused qkv, on HF's query (forward hooks) or key (pre-hooks), after the search was
    cached: refused by record() and the spectrum; taken again, exact, once the handle is removed."""
    model = _model(kind)
    _entered_once(model)
    layer = _qk_layer(model, kind, side=int(hook.startswith("pre")))
    method, steer, options = HOOKS[hook]
    handle = getattr(layer, method)(steer, **options)
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=4, attention="full")
    message = str(err.value)
    assert f"'{_path(model, layer)}'" in message and ("pre-hook" in message) == hook.startswith("pre"), message
    assert steer.__qualname__ in message and "handle.remove()" in message, message
    with pytest.raises(QKHooksError, match="someone else registered"):
        qkhooks.spectrum(model)
    handle.remove()
    _assert_exact(model, kind)


@pytest.mark.parametrize("which", ["forward", "pre"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_global_hook_is_refused_naming_it(kind, which):
    """torch's global hooks run on every module, the q/k layers too."""
    model = _model(kind)
    _entered_once(model)
    register = (torch.nn.modules.module.register_module_forward_hook if which == "forward" else
                torch.nn.modules.module.register_module_forward_pre_hook)
    handle = register(steer_output if which == "forward" else steer_input)
    try:
        with pytest.raises(QKHooksError) as err:
            qkhooks.record(model, modes=4)
    finally:
        handle.remove()
    message = str(err.value)
    assert f"register_module_forward_{'hook' if which == 'forward' else 'pre_hook'}" in message, message
    assert ("steer_output" if which == "forward" else "steer_input") in message and "handle.remove()" in message, message
    _assert_exact(model, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_a_hook_on_a_layer_not_recorded_is_taken_and_the_recorded_layers_exact(kind):
    """Steering one layer's q/k while recording the others (a common experiment): only the recorded layers' q/k
    modules are checked, and their maps are the steered model's own eager maps; recording the steered layer is
    refused. The search finds the sites whatever the hooks."""
    model = _model(kind)
    first = _hf_attentions(model)[0] if kind == "hf" else None
    layer = model.blocks[0].attn.qkv if kind == "timm" else getattr(first, _hf_qk_names(first)[0])  # layer 0's q
    handle = layer.register_forward_hook(steer_output)
    try:
        assert [s.layer for s in find_sites(model)] == [0, 1]
        images = _images()
        with qkhooks.record(model, modes=4, attention="full", layers=[1]) as run, torch.no_grad():
            model(images) if kind == "timm" else model(pixel_values=images)
        steered = _eager(model, kind, images)[1]  # layer 1 sees the residual stream layer 0's steering changed
        torch.testing.assert_close(run.attention(1, "full"), steered, atol=1e-5, rtol=0)
        with pytest.raises(QKHooksError, match="someone else registered"):
            qkhooks.record(model, modes=4, layers=[0])
        with pytest.raises(QKHooksError, match="someone else registered"):
            qkhooks.spectrum(model, layers=[0])
        assert [s.layer for s in qkhooks.spectrum(model, layers=[1]).layers] == [1]
    finally:
        handle.remove()


def test_a_steering_hook_refuses_record_dataset_before_any_file_is_written(tmp_path):
    model = _model("timm")
    _entered_once(model)
    handle = model.blocks[0].attn.qkv.register_forward_hook(steer_output)
    out = tmp_path / "steered.h5"
    with pytest.raises(QKHooksError, match=r"'blocks\.0\.attn\.qkv'.*steer_output"):
        qkhooks.record_dataset(qkhooks.load_model(model), "samples", out, limit=2, batch_size=2, progress=False, modes=2)
    handle.remove()
    assert not out.exists()


# ------------------------------------------------------------------ forwards replaced on the instance
@pytest.mark.parametrize("target", ["qk-layer", "attention"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_forward_replaced_on_the_instance_is_refused_naming_it(kind, target):
    """baukit / nnsight-style patching: ``module.forward = ...`` on the q/k layer, or on the attention module whose
    class forward qkhooks rebuilds. Taken again once the patch is undone."""
    model = _model(kind)
    _entered_once(model)
    module = _qk_layer(model, kind) if target == "qk-layer" else _attention(model, kind)
    original = module.forward

    def patched(*args, **kwargs):
        return original(*args, **kwargs)

    module.forward = patched
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=4)
    message = str(err.value)
    assert f"'{_path(model, module)}'" in message and "replaced on the instance" in message, message
    assert "patched" in message and "del module.forward" in message, message
    del module.forward
    _assert_exact(model, kind)


# ------------------------------------------------------------------ weights that are tensor subclasses
class Quantised(torch.Tensor):
    """A tensor subclass with its own arithmetic, as torchao's quantised weights are (here it does nothing more)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("kind", KINDS)
def test_a_weight_that_is_a_tensor_subclass_is_refused_naming_its_type(kind):
    model = _model(kind)
    _entered_once(model)
    layer = _qk_layer(model, kind, side=1)
    plain = layer.weight
    layer.weight = nn.Parameter(plain.detach().as_subclass(Quantised), requires_grad=False)
    assert type(layer.weight) is Quantised  # what the reader is handed: the subclass, under a Parameter's name
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=4)
    message = str(err.value)
    assert f"'{_path(model, layer)}'" in message and "'weight'" in message and "Quantised" in message, message
    assert "float model" in message, message
    layer.weight = plain
    _assert_exact(model, kind)


# ------------------------------------------------------------------ wrappers defined beside the attention class
_MYPKG = '''
import torch
from torch import nn


class MyAttention(nn.Module):
    """A user's own attention of plain nn.Linear layers; keeps its softmax for the test."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, tokens):
        b, n, d = tokens.shape
        q, k, v = (p(tokens).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        self.maps = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return tokens + (self.maps @ v).transpose(1, 2).reshape(b, n, d)


class LoRALinear(nn.Module):
    """peft's layout: the base layer's weight and bias exposed, B·A·x added."""

    def __init__(self, base, r=2):
        super().__init__()
        self.base = base
        self.a, self.b = nn.Linear(base.in_features, r, bias=False), nn.Linear(r, base.out_features, bias=False)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))
'''


def _package(name: str) -> types.ModuleType:
    """Module ``name`` made of ``_MYPKG`` (its classes and functions say they come from ``name``)."""
    module = types.ModuleType(name)
    exec(compile(_MYPKG, f"{name.replace('.', '/')}.py", "exec"), module.__dict__)
    return module


def test_a_users_own_vit_of_plain_linears_is_taken_a_wrapper_from_its_own_package_refused():
    """The rule is the forms qkhooks models, not the attention class's package: mypkg.LoRALinear around mypkg's q is
    refused, mypkg's plain nn.Linear layers are taken, maps = the module's own softmax."""
    mypkg = _package("mypkg")

    def find(model):
        return [qkhooks.AttentionSite(
            layer=i, path=f"layers.{i}", module=m, block_path=f"layers.{i}", block=m, num_heads=2, head_dim=8, dim=16,
            scale=8 ** -0.5, num_prefix_tokens=0, grid=(2, 2), family="mypkg", input_name="tokens",
            qk_linear=lambda m=m: (torch.cat([m.q.weight, m.k.weight]), torch.cat([m.q.bias, m.k.bias])))
            for i, m in enumerate(model.layers)]

    qkhooks.register_adapter("mypkg-r22", lambda model: isinstance(model, LayerStack) and isinstance(
        model.layers[0], mypkg.MyAttention), find, families="MyNet")
    try:
        torch.manual_seed(0)
        model = LayerStack(mypkg.MyAttention(), mypkg.MyAttention()).eval()
        tokens = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
        with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
            model(tokens)
        for layer, attn in enumerate(model.layers):
            torch.testing.assert_close(run.attention(layer, "full"), attn.maps, atol=1e-6, rtol=0)
        model.layers[0].q = mypkg.LoRALinear(model.layers[0].q)
        with pytest.raises(QKHooksError, match=r"'layers\.0\.q' \(mypkg\.LoRALinear\).*not one qkhooks knows.*merge_and_unl"):
            qkhooks.record(model, modes=4)
    finally:
        base._ADAPTERS[:] = [a for a in base._ADAPTERS if a.name != "mypkg-r22"]


def test_a_wrapper_from_the_model_librarys_own_package_is_refused():
    """A LoRA class that says it comes from timm (timm.layers.*) around timm's qkv: refused, as peft's is."""
    lora = _package("timm.layers.lora_r22").LoRALinear
    model = _timm_vit()
    model.blocks[1].attn.qkv = lora(model.blocks[1].attn.qkv)
    with pytest.raises(QKHooksError, match=r"'blocks\.1\.attn\.qkv' \(timm\.layers\.lora_r22\.LoRALinear\), whose forward is not"):
        find_sites(model)


# ------------------------------------------------------------------ taken
@pytest.mark.parametrize("kind", KINDS)
def test_nested_recordings_are_taken_and_both_exact(kind):
    """The outer recording's hooks on the q/k layers are qkhooks' own: an inner recording is entered (searching afresh,
    or from the cache), and both hold the model's own maps."""
    model, images = _model(kind), _images()
    call = (lambda: model(images)) if kind == "timm" else (lambda: model(pixel_values=images))
    with qkhooks.record(model, modes=4, attention="full") as outer, torch.no_grad():
        assert _qk_layer(model, kind)._forward_hooks  # the outer recording's own, reading q and k
        capture._SITES.clear()
        with qkhooks.record(model, modes=4, attention="full") as inner:  # searched afresh
            call()
        with qkhooks.record(model, modes=2, attention="full", layers=[1]) as cached:
            call()
    assert not _qk_layer(model, kind)._forward_hooks  # all removed on exit
    for layer, eager in enumerate(_eager(model, kind, images)):
        for run in (outer, inner) + ((cached,) if layer == 1 else ()):
            torch.testing.assert_close(run.attention(layer, "full"), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_off_the_q_k_layers_are_taken_and_exact(kind):
    """A read-only hook on the MLP, and a pre-hook on the attention module that changes its tokens: qkhooks reads the
    tokens in its own pre-hook, after the ones already there, so its maps are those the hooked model computes."""
    model = _model(kind)
    _entered_once(model)
    mlp = model.blocks[1].mlp.fc1 if kind == "timm" else next(
        m for n, m in model.named_modules() if n.endswith("1.intermediate.dense") or n.endswith("1.mlp.fc1"))
    seen: list[torch.Tensor] = []
    handles = [mlp.register_forward_hook(lambda m, a, o: seen.append(o.detach()))]

    def scale_tokens(module, args, kwargs):
        if args:
            return (args[0] * 1.5, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 1.5}

    unhooked = _eager(model, kind, _images())
    attn = qkhooks.sites(model)[1].module
    handles.append(attn.register_forward_pre_hook(scale_tokens, with_kwargs=True))
    hooked = _eager(model, kind, _images())
    assert float((hooked[1] - unhooked[1]).abs().max()) > 1e-3  # the pre-hook changes layer 1's maps
    _assert_exact(model, kind)
    _assert_exact(model, kind, qk_path=False)  # modes and maps from the tokens x
    assert seen
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------------ accelerate's device placement
_ACCELERATE_STAND_IN = '''
import functools


class ModelHook:
    no_grad = False

    def init_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output


class SequentialHook(ModelHook):
    def __init__(self, *hooks):
        self.hooks = hooks

    def pre_forward(self, module, *args, **kwargs):
        for hook in self.hooks:
            args, kwargs = hook.pre_forward(module, *args, **kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        for hook in self.hooks:
            output = hook.post_forward(module, output)
        return output


class AlignDevicesHook(ModelHook):
    def __init__(self, execution_device=None, offload=False, io_same_device=False, weights_map=None):
        self.execution_device, self.offload, self.io_same_device = execution_device, offload, io_same_device

    def __repr__(self):
        return (f"AlignDevicesHook(execution_device={self.execution_device}, offload={self.offload}, "
                f"io_same_device={self.io_same_device})")

    def pre_forward(self, module, *args, **kwargs):
        move = lambda t: t.to(self.execution_device) if hasattr(t, "to") else t
        return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}


def add_hook_to_module(module, hook, append=False):
    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):  # a hook there already: replaced
        old_forward = module._old_forward
    else:
        old_forward = module.forward
        module._old_forward = old_forward
    module = hook.init_hook(module)
    module._hf_hook = hook

    def new_forward(module, *args, **kwargs):
        args, kwargs = module._hf_hook.pre_forward(module, *args, **kwargs)
        output = module._old_forward(*args, **kwargs)
        return module._hf_hook.post_forward(module, output)

    module.forward = functools.update_wrapper(functools.partial(new_forward, module), old_forward)
    return module
'''


def _accelerate(which: str) -> types.ModuleType:
    """accelerate.hooks itself, or a stand-in with its names and its wrapper (accelerate is not a dependency)."""
    if which == "accelerate":
        return pytest.importorskip("accelerate.hooks")
    module = types.ModuleType("accelerate.hooks")
    exec(compile(_ACCELERATE_STAND_IN, "accelerate/hooks.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("which", ["stand-in", "accelerate"])
@pytest.mark.parametrize("kind", KINDS)
def test_accelerate_device_hooks_are_taken_offloading_and_other_hooks_refused(kind, which):
    """``device_map=...`` leaves AlignDevicesHook wrappers on the q/k layers and the attention modules (one device
    here): taken, maps exact. One that offloads the weights, or a hook of another kind, is refused naming the layer.
    Run against accelerate itself where it is installed (it is not a dependency; checked with accelerate 1.15)."""
    hooks = _accelerate(which)
    model = _model(kind)
    site_modules = [s.module for s in qkhooks.sites(model)]
    for module in [*site_modules, _qk_layer(model, kind, 0), _qk_layer(model, kind, 1)]:
        hooks.add_hook_to_module(module, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    hooks.add_hook_to_module(site_modules[0], hooks.SequentialHook(
        hooks.AlignDevicesHook(execution_device="cpu"), hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True)))
    assert "forward" in vars(_qk_layer(model, kind))  # the wrapper qkhooks must recognise
    _assert_exact(model, kind)

    class Scale(hooks.ModelHook):
        def post_forward(self, module, output):
            return output * 1.5

    layer = _qk_layer(model, kind, 1)
    hooks.add_hook_to_module(layer, Scale())
    with pytest.raises(QKHooksError, match=rf"'{_path(model, layer)}'.*replaced on the instance.*accelerate's wrapper"):
        qkhooks.record(model, modes=4)
    weights = {name: t.clone() for name, t in layer.named_parameters(recurse=False)}
    hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights))
    with pytest.raises(QKHooksError, match=rf"'{_path(model, layer)}'.*offload=True.*without offloading"):
        qkhooks.record(model, modes=4)  # accelerate's moves the weights to the meta device: refused as no weights

