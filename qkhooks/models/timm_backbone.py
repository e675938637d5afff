"""transformers' ``TimmBackbone``: a whole timm model inside a transformers wrapper, recorded by the timm adapter.

The wrapper holds the timm model (``_backbone``, a timm feature net around the network: the getter net's
``.model``, the hook net's ``.body`` for PiT's default, a rewritten module list for Swin's) and calls it on the
pixels; the timm adapter finds the sites of that feature net exactly as for the same timm model built on its own.
Only their paths change: each is prefixed with ``_backbone``, so layer names are the ones the user sees in
``model.named_modules()``.
"""

from __future__ import annotations

from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, register_adapter


def _backbone(model: nn.Module) -> nn.Module | None:
    """The timm model a TimmBackbone wraps, when the timm adapter takes it."""
    if type(model).__name__ != "TimmBackbone" or not type(model).__module__.startswith("transformers."):
        return None
    backbone = getattr(model, "_backbone", None)
    return backbone if isinstance(backbone, nn.Module) and timm_adapter.matches(backbone) else None


def matches(model: nn.Module) -> bool:
    return _backbone(model) is not None


def find(model: nn.Module) -> list[AttentionSite]:
    """The timm adapter's sites of the wrapped timm model, their paths prefixed with ``_backbone``."""
    return timm_adapter.with_path_prefix(timm_adapter.find(_backbone(model)), "_backbone")  # type: ignore[arg-type]


register_adapter("hf-timm-backbone", matches, find,
                 families="transformers TimmBackbone: the wrapped timm model, by the timm adapter", first=False)
