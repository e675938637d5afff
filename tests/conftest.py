"""Tiny models of every supported family, built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying the hub
os.environ.setdefault("MPLBACKEND", "Agg")

import dataclasses
from typing import Callable

import pytest
import timm
import torch
import transformers

torch.set_num_threads(2)

TINY = dict(embed_dim=32, depth=2, num_heads=4)


@dataclasses.dataclass
class Tiny:
    """A tiny model, its input shape, its prefix-token count and how to get its eager attention."""

    name: str
    build: Callable[[], torch.nn.Module]
    image_size: int
    prefix: int
    kind: str  # "timm" or "hf"

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        model = self.build().eval()
        with torch.no_grad():  # non-zero biases everywhere, so bias handling is really tested
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
                if "token" in name or "embedding" in name or "pos_embed" in name:
                    p.normal_(0, 0.5)
        return model

    def images(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=g)


def _timm(name: str, **kw) -> Callable[[], torch.nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **{**TINY, **kw})


def _hf(model_cls: str, config_cls: str, **kw) -> Callable[[], torch.nn.Module]:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)

    def build():
        config = getattr(transformers, config_cls)(**{**base, **kw})
        return getattr(transformers, model_cls)._from_config(config, attn_implementation="sdpa")

    return build


TINY_MODELS = [
    Tiny("timm-vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8), 32, 1, "timm"),
    Tiny("timm-deit-distilled", _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8), 32, 2, "timm"),
    Tiny("timm-clip", _timm("vit_base_patch16_clip_224", img_size=32, patch_size=8), 32, 1, "timm"),
    Tiny("timm-dinov2-reg", _timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7), 28, 5, "timm"),
    Tiny("hf-vit", _hf("ViTModel", "ViTConfig", qkv_bias=True), 32, 1, "hf"),
    Tiny("hf-deit", _hf("DeiTModel", "DeiTConfig"), 32, 2, "hf"),
    Tiny("hf-dinov2", _hf("Dinov2Model", "Dinov2Config"), 32, 1, "hf"),
    Tiny("hf-dinov2-reg", _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=3), 32, 4, "hf"),
    Tiny("hf-clip", _hf("CLIPVisionModel", "CLIPVisionConfig"), 32, 1, "hf"),
    Tiny("hf-siglip", _hf("SiglipVisionModel", "SiglipVisionConfig"), 32, 0, "hf"),
]


@pytest.fixture(params=TINY_MODELS, ids=lambda t: t.name)
def tiny(request) -> Tiny:
    return request.param


def eager_attention(tiny: Tiny, model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The model's own eager attention maps per layer (B, H, N, N): an independent reference."""
    if tiny.kind == "timm":
        maps: list[torch.Tensor] = []
        handles = []
        for block in model.blocks:
            block.attn.fused_attn = False
            handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach().clone())))
        try:
            with torch.no_grad():
                model(images)
        finally:
            for h in handles:
                h.remove()
            for block in model.blocks:
                block.attn.fused_attn = True
        return maps
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(pixel_values=images, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a.detach() for a in out.attentions]
