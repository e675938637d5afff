"""r21: q/k layers that compute more than their weights say are refused (a LoRA layer wrapped around ``qkv`` or ``query``
exposes the base weight and adds B·A·x), and maps of half-precision models come from float32 logits (as the fused
kernels accumulate), checked against the float64 softmax of the model's own half-precision q and k."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import timm
import torch
import transformers
from torch import nn

import qkhooks
from qkhooks.errors import QKHooksError
from qkhooks.models.base import find_sites

from conftest import timm_module_eager_maps


class PeftLoraLinear(nn.Module):
    """peft's ``lora.Linear`` as it is laid out (peft is not installed here): the base layer kept as ``base_layer``, its
    ``weight`` / ``bias`` / ``in_features`` / ``out_features`` exposed (peft's BaseTunerLayer), B·A·x added."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.3)  # a trained adapter

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class LoralibLinear(nn.Linear):
    """loralib's layout: an nn.Linear subclass holding its own A and B and overriding forward."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_A.T @ self.lora_B.T


class TaggedLinear(nn.Linear):
    """An nn.Linear subclass that only tags the layer: its forward is nn.Linear's, so it computes W x + b."""


def _timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2,
                             num_heads=3, qkv_bias=True).eval()


def _hf_vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                                    image_size=32, patch_size=8, qkv_bias=True)
    return transformers.ViTModel._from_config(config, attn_implementation="sdpa").eval()


def _hf_attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ("ViTAttention", "ViTSelfAttention")
            and (hasattr(m, "q_proj") or hasattr(m, "query"))]


def _hf_qk_names(attn: nn.Module) -> tuple[str, str]:
    return ("q_proj", "k_proj") if hasattr(attn, "q_proj") else ("query", "key")  # transformers 5.x / 4.x


def _path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


# ------------------------------------------------------------------ q/k layers that compute more than their weights
@pytest.mark.parametrize("wrap", [PeftLoraLinear, LoralibLinear])
def test_lora_around_timm_qkv_is_refused_naming_the_layer_and_the_fix(wrap):
    model = _timm_vit()
    model.blocks[1].attn.qkv = wrap(model.blocks[1].attn.qkv)
    with pytest.raises(QKHooksError) as err:
        find_sites(model)
    message = str(err.value)
    assert "'blocks.1.attn.qkv" in message and wrap.__name__ in message and "merge_and_unload()" in message, message
    with pytest.raises(QKHooksError, match="merge_and_unload"):  # what a user calls meets the same refusal
        qkhooks.spectrum(model)


@pytest.mark.parametrize("wrap", [PeftLoraLinear, LoralibLinear])
@pytest.mark.parametrize("side", [0, 1], ids=["query", "key"])
def test_lora_around_hf_query_or_key_is_refused_naming_the_layer(wrap, side):
    model = _hf_vit()
    attn = _hf_attentions(model)[1]
    name = _hf_qk_names(attn)[side]
    wrapper = wrap(getattr(attn, name))
    setattr(attn, name, wrapper)
    with pytest.raises(QKHooksError) as err:
        find_sites(model)
    message = str(err.value)
    assert f"'{_path(model, wrapper)}" in message and wrap.__name__ in message and "merge_and_unload()" in message, message


def test_linear_subclass_with_linears_forward_is_taken_and_exact():
    """A subclass that keeps nn.Linear's forward computes what its weights say: taken, maps = the eager ones."""
    model = _timm_vit()
    for block in model.blocks:
        plain = block.attn.qkv
        block.attn.qkv = TaggedLinear(plain.in_features, plain.out_features)
        block.attn.qkv.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
        model(images)
    for layer, block in enumerate(model.blocks):
        (eager,) = timm_module_eager_maps(model, block.attn, images)
        torch.testing.assert_close(run.attention(layer, "full"), eager, atol=1e-5, rtol=0)


def test_weights_recomputed_by_a_hook_are_refused_those_computed_on_reading_taken():
    """``weight_norm`` (a pre-hook recomputes ``weight`` from g and v before each forward, so the attribute read
    between forwards lags an update of g, v) is refused naming g; the parametrized form computes ``weight`` from
    ``original0``, ``original1`` whenever it is read: taken, its maps the eager ones."""
    model = _timm_vit()
    with warnings.catch_warnings():  # deprecated in favour of the parametrized form
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(model.blocks[1].attn.qkv)
    with pytest.raises(QKHooksError, match=r"'blocks\.1\.attn\.qkv' .*'weight_g', 'weight_v'.*remove_weight_norm\(model\.blocks\.1\.attn\.qkv\)"):
        find_sites(model)
    model = _timm_vit()
    torch.nn.utils.parametrizations.weight_norm(model.blocks[1].attn.qkv)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
        model(images)
    (eager,) = timm_module_eager_maps(model, model.blocks[1].attn, images)
    torch.testing.assert_close(run.attention(1, "full"), eager, atol=1e-5, rtol=0)


def test_a_peft_model_is_refused_with_merge_and_unload():
    class PeftModelLike(nn.Module):  # peft's PeftModel: base_model.model is the wrapped model
        def __init__(self, model: nn.Module):
            super().__init__()
            self.base_model = nn.Module()
            self.base_model.model = model

        def merge_and_unload(self) -> nn.Module:
            return self.base_model.model

    with pytest.raises(QKHooksError, match=r"PeftModelLike holds adapter layers .*merge_and_unload\(\)"):
        find_sites(PeftModelLike(_timm_vit()))


# ------------------------------------------------------------------ half precision: float32 logits
def _sharpened(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Logits of order 10-20, as in trained ViTs, where half-precision logits lose up to 1/16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(14)
    return model.to(dtype)


def _model_qk(model: nn.Module, kind: str, layer: int, run_model: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """The q and k (B, H, N, d_k) the model computes in ``layer`` in a forward ``run_model()`` makes outside any
    recording, whose hooks keep them: record() refuses a hook on a q/k layer, put on before entry or inside (it cannot
    tell an observer from a steering hook). The forward is deterministic, so they are the recorded forward's."""
    seen: dict[str, torch.Tensor] = {}
    if kind == "timm":
        attn = model.blocks[layer].attn

        def split(o: torch.Tensor) -> None:
            b, n, _ = o.shape
            q, k, _ = o.detach().reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            seen["q"], seen["k"] = q, k

        handles = [attn.qkv.register_forward_hook(lambda m, a, o: split(o))]
    else:
        attn = _hf_attentions(model)[layer]
        heads = 3
        handles = []
        for key, name in zip("qk", _hf_qk_names(attn)):
            def keep(m, a, o, key=key):
                seen[key] = o.detach().unflatten(-1, (heads, -1)).transpose(1, 2)

            handles.append(getattr(attn, name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            run_model()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _exact_maps(seen: dict[str, torch.Tensor]) -> torch.Tensor:
    """float64 softmax of the model's own half-precision q and k: what fused SDPA computes, up to float32 sums."""
    q, k = seen["q"].double(), seen["k"].double()
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)


@pytest.mark.parametrize("qk_path", [True, False], ids=["from-q-k", "from-x"])
@pytest.mark.parametrize("kind", ["timm", "hf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_maps_and_rows_are_the_softmax_of_the_models_own_q_k(kind, dtype, qk_path):
    """From the model's q/k outputs or from the tokens x (rows then from every key: the few-query shortcut's keys are
    not rounded as the model's are)."""
    model = _sharpened(_timm_vit() if kind == "timm" else _hf_vit(), dtype)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with qkhooks.record(model, modes=None, attention="full+rows", qk_path=qk_path) as run, torch.no_grad():
        model(images)
    exact = _exact_maps(_model_qk(model, kind, 1, lambda: model(images)))
    assert float(exact.amax()) > 0.5  # sharp maps: half-precision logits would move them by ~1e-2
    tokens = torch.as_tensor(run.last.meta["query_tokens"])
    full, rows = run.attention(1, "full").double(), run.attention(1, "rows").double()
    assert float((full - exact).abs().max()) < 1e-4
    assert float((rows - exact[torch.arange(2)[:, None], :, tokens].transpose(1, 2)).abs().max()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_eager_outputs_are_as_close_as_the_models_sdpa(dtype):
    """outputs='eager': maps @ v from float32 maps, rounded once, is as close to float64 attention as the model's own
    SDPA kernel (both compared on layer 0, whose input the two forwards share); the kept maps are rounded once."""
    model = _sharpened(_timm_vit(), dtype)
    attn = model.blocks[0].attn
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    got: dict[str, torch.Tensor] = {}

    def observe(qkv: bool = True) -> list:  # qkv in a forward outside record() only (record() refuses a hook on a q/k
        # layer); layer 0's q, k, v are the same in every forward, as its input is the images
        handles = [attn.proj.register_forward_pre_hook(lambda m, a: got.__setitem__("attended", a[0].detach()))]
        if qkv:
            handles.append(attn.qkv.register_forward_hook(lambda m, a, o: got.__setitem__("qkv", o.detach())))
        return handles

    def error() -> float:
        b, n, _ = got["qkv"].shape
        q, k, v = got["qkv"].double().reshape(b, n, 3, 3, -1).permute(2, 0, 3, 1, 4)
        exact = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v
        return float((got["attended"].double() - exact.transpose(1, 2).flatten(2)).abs().max())

    handles = observe()
    with torch.no_grad():
        model(images)
    kernel = error()
    for handle in handles:
        handle.remove()
    with qkhooks.record(model, modes=None, attention="full", outputs="eager") as run, torch.no_grad():
        handles = observe(qkv=False)
        model(images)
    eager = error()
    for handle in handles:
        handle.remove()
    assert eager <= 1.25 * kernel, (eager, kernel)
    maps = run.attention(0, "full")
    b, n, _ = got["qkv"].shape
    q, k, _ = got["qkv"].reshape(b, n, 3, 3, -1).permute(2, 0, 3, 1, 4)
    assert maps.dtype == dtype
    assert float((maps.double() - _exact_maps({"q": q, "k": k})).abs().max()) <= torch.finfo(dtype).eps / 2 + 1e-6


def test_autocast_maps_are_the_softmax_of_the_models_own_q_k():
    """Under autocast the model's q and k are bfloat16; the rebuilt logits are float32 all the same (autocast would run
    the product of 17 tokens, below the in-place CPU path, in bfloat16 again)."""
    model = _sharpened(_timm_vit(), torch.float32)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with qkhooks.record(model, modes=None, attention="full") as run, torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = _model_qk(model, "timm", 1, lambda: model(images))
    assert seen["q"].dtype == torch.bfloat16
    assert float((run.attention(1, "full").double() - _exact_maps(seen)).abs().max()) < 1e-4
