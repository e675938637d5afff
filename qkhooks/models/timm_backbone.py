"""transformers' ``TimmBackbone``: a whole timm model inside a transformers wrapper, recorded by the timm adapter.

The wrapper holds the timm model (``_backbone``, a timm feature wrapper around the network: in ``.model`` for the
getter net, in ``.body`` for the hook net, PiT's default) and calls it on the pixels; the timm adapter finds the sites of that network exactly as for the bare timm
model. Only their paths change: each is prefixed with where the network sits in the wrapper, so layer names are the
ones the user sees in ``model.named_modules()``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, register_adapter


def _network(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of the timm network a TimmBackbone wraps, when the timm adapter takes it. The network itself,
    not a feature net around it: its class token and patch embedding give the sites' prefix count and grid."""
    if type(model).__name__ != "TimmBackbone" or not type(model).__module__.startswith("transformers."):
        return None
    backbone = getattr(model, "_backbone", None)
    for path, inner in (("_backbone.model", getattr(backbone, "model", None)),
                        ("_backbone.body", getattr(backbone, "body", None)), ("_backbone", backbone)):
        if isinstance(inner, nn.Module) and timm_adapter.matches(inner):
            return path, inner
    return None


def matches(model: nn.Module) -> bool:
    return _network(model) is not None


def find(model: nn.Module) -> list[AttentionSite]:
    """The timm adapter's sites of the wrapped network, their paths prefixed with the network's path in the wrapper."""
    prefix, network = _network(model)  # type: ignore[misc]
    return [dataclasses.replace(site, path=f"{prefix}.{site.path}", block_path=f"{prefix}.{site.block_path}",
                                stage=f"{prefix}.{site.stage}" if site.stage else prefix,
                                pixel_route=tuple((f"{prefix}.{path}", module) for path, module in site.pixel_route))
            for site in timm_adapter.find(network)]


register_adapter("hf-timm-backbone", matches, find,
                 families="transformers TimmBackbone: the wrapped timm model, by the timm adapter", first=False)
