"""r21: q/k layers that compute more than their weights say are refused (a LoRA layer wrapped around ``qkv`` or ``query``
exposes the base weight and adds B·A·x), and maps of half-precision models come from float32 logits (as the fused
kernels accumulate), checked against the float64 softmax of the model's own half-precision q and k."""

from __future__ import annotations

import warnings

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
    with pytest.raises(QKHooksError, match=r"'blocks\.1\.attn\.qkv' .*'weight_g', 'weight_v'.*merge_and_unload"):
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
