"""Refuse, with a reason, attention that has no single bilinear form x_i^T W_q^T W_k x_j.

q/k normalisation makes the logit a non-linear function of x; rotary embeddings make the form depend on
the relative position; windowed attention splits tokens into windows; relative-position bias adds a
position-only term. qkhooks says which module is the problem instead of producing wrong numbers.
"""

from __future__ import annotations

from torch import nn

from qkhooks.errors import QKHooksError

_REASONS = (
    (("rope", "rotary"), "rotary position embeddings make the query-key form depend on the relative position"),
    (("window", "swin"), "windowed attention splits the tokens into windows with their own masks and shifts"),
    (("relative_position_bias", "relpos", "rel_pos"), "a relative-position bias adds a position-only term to the logits"),
)


def _has_qk_norm(module: nn.Module) -> bool:
    for name in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and not isinstance(child, nn.Identity):
            return True
    return False


def diagnose(model: nn.Module) -> None:
    """Raise :class:`QKHooksError` naming the first module whose attention breaks the bilinear form."""
    for name, module in model.named_modules():
        if _has_qk_norm(module):
            raise QKHooksError(
                f"unsupported attention in {name!r} ({type(module).__name__}): q/k normalisation makes the "
                "logit a non-linear function of the tokens, so W_q^T W_k has no exact meaning there."
            )
        label = f"{name} {type(module).__name__}".lower()
        for keys, reason in _REASONS:
            if any(key in label for key in keys) and _owns_parameters_or_attention(module):
                raise QKHooksError(f"unsupported attention in {name!r} ({type(module).__name__}): {reason}.")


def _owns_parameters_or_attention(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or "attention" in type(module).__name__.lower() or (
        any(True for _ in module.buffers(recurse=False))
    )
