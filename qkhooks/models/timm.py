"""Adapter for timm's VisionTransformer family (ViT, DeiT incl. distilled, DINO, CLIP, DINOv2 incl. registers).

Every such model keeps its blocks in ``model.blocks`` and its attention in ``blocks[i].attn``, a
``timm.layers.Attention`` whose fused ``qkv`` Linear holds W_q, W_k, W_v stacked row-wise. The tensor
entering ``attn`` is exactly what enters W_q/W_k (after ``norm1``), so the pre-hook sees the true input.
"""

from __future__ import annotations

import re

from torch import nn

from qkhooks.models.base import AttentionSite, register_adapter

_BLOCK_ATTN = re.compile(r"^(?P<block>(?:.*\.)?blocks\.(?P<idx>\d+))\.attn$")


def _timm_attention_class() -> type | None:
    try:
        from timm.layers import Attention
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return Attention


def _is_timm_vit_attention(module: nn.Module) -> bool:
    cls = _timm_attention_class()
    return cls is not None and isinstance(module, cls) and isinstance(getattr(module, "qkv", None), nn.Linear)


def matches(model: nn.Module) -> bool:
    """A model whose ``blocks.{i}.attn`` modules are timm ``Attention`` with a fused qkv Linear."""
    return any(_BLOCK_ATTN.match(name) and _is_timm_vit_attention(m) for name, m in model.named_modules())


def find(model: nn.Module) -> list[AttentionSite]:
    """Sites for every ``blocks.{i}.attn`` of a timm ViT, in block order."""
    modules = dict(model.named_modules())
    num_prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    patch_embed = getattr(model, "patch_embed", None)
    grid = tuple(int(g) for g in patch_embed.grid_size) if getattr(patch_embed, "grid_size", None) is not None else None
    patch = getattr(patch_embed, "patch_size", None)
    patch = (patch, patch) if isinstance(patch, int) else (tuple(int(p) for p in patch) if patch is not None else None)
    sites = []
    for name, attn in modules.items():
        match = _BLOCK_ATTN.match(name)
        if not match or not _is_timm_vit_attention(attn):
            continue
        heads, head_dim = int(attn.num_heads), int(attn.head_dim)
        qkv: nn.Linear = attn.qkv
        rows = heads * head_dim

        def qk_linear(qkv: nn.Linear = qkv, rows: int = rows):
            return qkv.weight[: 2 * rows], None if qkv.bias is None else qkv.bias[: 2 * rows]

        sites.append(
            AttentionSite(
                layer=int(match["idx"]),
                path=name,
                module=attn,
                block_path=match["block"],
                block=modules[match["block"]],
                num_heads=heads,
                head_dim=head_dim,
                dim=qkv.in_features,
                scale=float(attn.scale),
                num_prefix_tokens=num_prefix,
                grid=grid,  # type: ignore[arg-type]
                family="timm-vit",
                input_name="x",
                block_input_name="x",
                qk_linear=qk_linear,
                patch_size=patch,  # type: ignore[arg-type]
                qk_modules=(qkv,),
            )
        )
    return sorted(sites, key=lambda s: s.layer)


register_adapter(
    "timm-vit",
    matches,
    find,
    families="timm VisionTransformer and variants: ViT, DeiT (incl. distilled), DINO, CLIP, DINOv2 (incl. registers)",
    first=False,
)
