"""The benchmark model sizes (no torch import: ``qkhooks bench --help`` lists them)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """One benchmark size: the timm architecture and the HF ViT config of the same shape."""

    key: str
    label: str
    timm_name: str
    hidden: int
    heads: int
    layers: int
    mlp: int
    image: int
    patch: int
    timm_kwargs: tuple[tuple[str, Any], ...] = ()


SIZES: dict[str, ModelSize] = {
    "vit_ti": ModelSize("vit_ti", "ViT-Ti/16 (timm vit_tiny_patch16_224, random init)", "vit_tiny_patch16_224",
                        192, 3, 12, 768, 224, 16),
    "vit_s": ModelSize("vit_s", "ViT-S/16 (timm vit_small_patch16_224, random init)", "vit_small_patch16_224",
                       384, 6, 12, 1536, 224, 16),
    "vit_b": ModelSize("vit_b", "ViT-B/16 (timm vit_base_patch16_224, random init)", "vit_base_patch16_224",
                       768, 12, 12, 3072, 224, 16),
    "tiny": ModelSize("tiny", "tiny ViT (2 blocks, d=32, for tests)", "vit_tiny_patch16_224", 32, 4, 2, 128, 32, 8,
                      (("img_size", 32), ("patch_size", 8), ("embed_dim", 32), ("depth", 2), ("num_heads", 4))),
}
