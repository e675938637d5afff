"""Adapter for Hugging Face vision transformers: ViT, DeiT (incl. distilled), CLIP and SigLIP vision, DINOv2
(incl. registers), under transformers 4.x module names (``query``/``key``) and 5.x (``q_proj``/``k_proj``).

The hooked module is the one that owns the q and k Linear layers; its ``hidden_states`` argument is the
tensor entering W_q/W_k (after ``layernorm_before`` / ``layer_norm1``). Prefix tokens are read off the
embeddings module (a CLS token, a distillation token, register tokens), so new variants need no table.
"""

from __future__ import annotations

import re

from torch import nn

from qkhooks.models.base import AttentionSite, register_adapter

_LAYER = re.compile(r"^(?P<block>(?:.*\.)?layers?\.(?P<idx>\d+))\.")
_QK_NAMES = (("q_proj", "k_proj"), ("query", "key"))
_TEXT = re.compile(r"(^|\.)text_(model|encoder)(\.|$)")


def _qk_children(module: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    for q_name, k_name in _QK_NAMES:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q, k
    return None


def _is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if _TEXT.search(name) or _qk_children(module) is None:
            continue
        match = _LAYER.match(name)
        if match:
            yield name, module, match


def matches(model: nn.Module) -> bool:
    """A transformers model with per-layer attention modules owning q/k Linear layers."""
    return _is_transformers_model(model) and any(True for _ in _attention_modules(model))


def _vision_config(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) or config


def _embeddings(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if not _TEXT.search(name) and name.split(".")[-1] == "embeddings":
            return module
    return None


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS + distillation + register tokens, read off the embeddings module's parameters."""
    emb = _embeddings(model)
    if emb is None:
        return 0
    count = 0
    if getattr(emb, "cls_token", None) is not None or getattr(emb, "class_embedding", None) is not None:
        count += 1
    if getattr(emb, "distillation_token", None) is not None:
        count += 1
    registers = getattr(emb, "register_tokens", None)
    if registers is not None:
        count += int(registers.shape[1])
    return count


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return None
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _grid(config) -> tuple[int, int] | None:
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if size is None or patch is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return size[0] // patch[0], size[1] // patch[1]


def find(model: nn.Module) -> list[AttentionSite]:
    """Sites for every encoder layer of an HF vision transformer, in layer order."""
    config = _vision_config(model)
    modules = dict(model.named_modules())
    prefix = num_prefix_tokens(model)
    grid = _grid(config)
    family = f"hf-{getattr(config, 'model_type', 'vit')}"
    sites = []
    for name, module, match in _attention_modules(model):
        q, k = _qk_children(module)  # type: ignore[misc]
        heads = int(
            getattr(module, "num_attention_heads", None)
            or getattr(module, "num_heads", None)
            or getattr(config, "num_attention_heads")
        )
        head_dim = q.out_features // heads
        scale = getattr(module, "scaling", None) or getattr(module, "scale", None) or head_dim**-0.5

        def qk_linear(q: nn.Linear = q, k: nn.Linear = k):
            import torch

            w = torch.cat([q.weight, k.weight])
            if q.bias is None and k.bias is None:
                return w, None
            zeros = q.weight.new_zeros(q.out_features)
            return w, torch.cat([zeros if q.bias is None else q.bias, zeros if k.bias is None else k.bias])

        sites.append(
            AttentionSite(
                layer=int(match["idx"]),
                path=name,
                module=module,
                block_path=match["block"],
                block=modules[match["block"]],
                num_heads=heads,
                head_dim=head_dim,
                dim=q.in_features,
                scale=float(scale),
                num_prefix_tokens=prefix,
                grid=grid,
                family=family,
                input_name="hidden_states",
                block_input_name="hidden_states",
                qk_linear=qk_linear,
                patch_size=_pair(getattr(config, "patch_size", None)),
                qk_modules=(q, k),
            )
        )
    return sorted(sites, key=lambda s: s.layer)


register_adapter(
    "hf-vit",
    matches,
    find,
    families="Hugging Face ViT, DeiT (incl. distilled), CLIP vision, SigLIP vision, DINOv2 (incl. registers); "
    "transformers 4.x and 5.x module names",
    first=False,
)
