"""Refuse, with a reason, attention that qkhooks does not model exactly, naming the module.

q/k normalisation makes the logit a non-linear function of x; rotary embeddings make the form depend on
the relative position; windowed attention splits tokens into windows; relative-position bias adds a
position-only term. qkhooks says which module is the problem instead of producing wrong numbers. Beyond
those named forms, any attention-like module an adapter does not take (see :func:`refuse_uncovered`) makes
the model refused: a model is recorded whole or not at all.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from torch import nn

from qkhooks.errors import QKHooksError

if TYPE_CHECKING:
    from qkhooks.models.base import AttentionSite

_RELATIVE_BIAS = ("relative_position_bias", "relpos", "rel_pos")
_ROTARY = ("rope", "rotary")
_ROPE_MODELLED = ("EvaAttention", "AttentionRope", "DINOv3ViTAttention")
_REASONS = (
    (_ROTARY, "rotary position embeddings make the query-key form depend on the relative position"),
    (("window", "swin"), "windowed attention splits the tokens into windows with their own masks and shifts"),
    (_RELATIVE_BIAS, "a relative-position bias adds a position-only term to the logits"),
    (("spatial_reduction", ".sr", "sr_ratio"), "keys and values come from spatially reduced tokens, not the queries' tokens"),
)
_QK_CHILDREN = ("qkv", "q_proj", "k_proj", "query", "key", "q", "k", "in_proj", "to_qkv", "qk")
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)
# Left out by design (README says so): cross-attention of learned queries over the tokens (pooling heads,
# GroupViT's grouping) is not self-attention of the image tokens; text towers of dual-tower models are not
# the vision stack.
# Attention classes whose windows, reductions or tables an adapter models (windows.py, reduced_keys.py), by name
# or, where the name is generic, by module and name (``timm.models.pvt_v2.Attention``): the named parts inside
# them are not refused by name.
MODELLED_FORMS: set[str] = set()
# Attention classes whose form is known and not modelled (yet), by module and name -> the precise reason the refusal
# gives (filled by the adapters' files, e.g. relpos.py for the pooled MViTv2 / Hiera forms).
UNMODELLED_FORMS: dict[str, str] = {}


def _modelled(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in MODELLED_FORMS or f"{cls.__module__}.{cls.__qualname__}" in MODELLED_FORMS
_NOT_RECORDED_PATHS = re.compile(r"(^|\.)(head|attn_pool|pooler|assign|pre_assign_attn|text_model|text_encoder)(\.|$)")


def _has_qk_norm(module: nn.Module) -> bool:
    for name in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and not isinstance(child, nn.Identity):
            return True
    return False


def diagnose(model: nn.Module) -> None:
    """Raise :class:`QKHooksError` naming the first module whose attention breaks the bilinear form."""
    # transformers hands relative-position tables to the attention as its attention_mask, which the sites add
    # back exactly (AttentionSite.bias_input); elsewhere a table is an unmodelled term
    hf = type(model).__module__.startswith("transformers.")
    # attention classes whose rotary tables the adapters take from the call (AttentionSite.rope_input)
    from qkhooks.models.qknorm import qk_norm_modelled

    rope_modelled = any(type(m).__name__ in _ROPE_MODELLED for m in model.modules())
    modelled = [n + "." for n, m in model.named_modules() if _modelled(m)]
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in modelled):
            continue
        if _has_qk_norm(module) and not qk_norm_modelled(module):
            raise QKHooksError(
                f"unsupported attention in {name!r} ({type(module).__name__}): q/k normalisation makes the "
                "logit a non-linear function of the tokens, so W_q^T W_k has no exact meaning there."
            )
        if _modelled(module):
            continue
        known = UNMODELLED_FORMS.get(f"{type(module).__module__}.{type(module).__qualname__}")
        if known:
            raise QKHooksError(f"unsupported attention in {name!r} ({type(module).__name__}): {known}.")
        label = f"{name} {type(module).__name__}".lower()
        for keys, reason in _REASONS:
            if (hf and keys is _RELATIVE_BIAS) or (rope_modelled and keys is _ROTARY):
                continue
            if any(key in label for key in keys) and _owns_parameters_or_attention(module):
                raise QKHooksError(f"unsupported attention in {name!r} ({type(module).__name__}): {reason}.")


def _owns_parameters_or_attention(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or "attention" in type(module).__name__.lower() or (
        any(True for _ in module.buffers(recurse=False))
    )


def attention_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that compute attention logits themselves: they own a q/k (or fused qkv) projection, or an
    attention-named module owns parameters directly (e.g. a fused ``in_proj_weight``)."""
    found = []
    for name, module in model.named_modules():
        if _NOT_RECORDED_PATHS.search(name):
            continue
        children = dict(module.named_children())
        # a q/k projection is a Linear/Conv child, or any child so named of an attention-named module or named qkv
        # (a conv + norm block: MobileNetV5's multi-query attention, EfficientViT's qkv)
        projections = [children[c] for c in _QK_CHILDREN if c in children]
        owns_qk = any(isinstance(p, nn.Linear | nn.Conv2d | nn.Conv1d) for p in projections) or (bool(projections) and (
            _ATTENTION_NAME.search(type(module).__name__) is not None or "qkv" in children))
        owns_fused = _ATTENTION_NAME.search(type(module).__name__) is not None and any(
            "proj_weight" in n or n in ("qkv_weight",) for n, _ in module.named_parameters(recurse=False)
        )
        if owns_qk or owns_fused:
            found.append((name, module))
    return found


def refuse_uncovered(model: nn.Module, sites: Sequence["AttentionSite"]) -> None:
    """Refuse the model when it computes attention anywhere an adapter did not take a site.

    Recording the taken sites and leaving the others out would give a model with silently missing layers
    (or a site whose neighbour changes what it sees); the error names every module left out.
    """
    taken = [s.path for s in sites]
    left = [
        (name, module)
        for name, module in attention_like(model)
        if not any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in taken)
    ]
    if left:
        raise QKHooksError(
            "unsupported attention in "
            + ", ".join(f"{name!r} ({type(module).__name__})" for name, module in left[:6])
            + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            + ": qkhooks does not model this attention form (its forward is not one the adapter knows), and "
            "recording the other layers alone would leave these out without a word. " + _why(left[0][1])
        )


def _why(module: nn.Module) -> str:
    """The best reason we can give for one unmodelled attention module."""
    label = f"{type(module).__name__} " + " ".join(n for n, _ in module.named_children())
    for keys, reason in _REASONS:
        if any(key.strip(".") in label.lower() for key in keys):
            return f"Its structure suggests: {reason}."
    return "Teach qkhooks its form with qkhooks.register_adapter (README, 'Your own architecture')."


def describe_attention_like(model: nn.Module, limit: int = 12) -> str:
    """Lines naming the attention-like modules of a model no adapter took, and why (for the generic error)."""
    seen: dict[str, str] = {}
    for name, module in attention_like(model):
        cls = type(module).__name__
        if cls not in seen:
            children = ", ".join(n for n, _ in module.named_children()) or "no child modules"
            seen[cls] = f"  - {name!r} ({cls}; children: {children}): no registered adapter models this class. {_why(module)}"
    if not seen:  # name the attention-named modules it did see, and why none was taken
        for name, module in model.named_modules():
            cls = type(module).__name__
            if _ATTENTION_NAME.search(cls) and cls not in seen and not _NOT_RECORDED_PATHS.search(name):
                children = ", ".join(n for n, _ in module.named_children()) or "no child modules"
                seen[cls] = (f"  - {name!r} ({cls}; children: {children}): attention-named, but it owns no q/k or fused "
                             "qkv projection, so its logits are not a q·k form qkhooks can take.")
    if not seen:
        return "It saw no attention-like module (none owns a q/k or fused qkv projection)."
    lines = list(seen.values())[:limit]
    return "Attention-like modules it saw (one per class):\n" + "\n".join(lines)
