"""Finding attention layers in real models (one file per family) and loading models from spec strings."""

from qkhooks.models.base import AttentionSite, QKWeights, adapters, find_sites, parse_layers, register_adapter
from qkhooks.models import timm as _timm  # noqa: F401  (registers the adapter)
from qkhooks.models import hf as _hf  # noqa: F401  (registers the adapter)
from qkhooks.models import reduced_keys as _reduced_keys  # noqa: F401  (teaches the adapters reduced keys)
from qkhooks.models import windows as _windows  # noqa: F401  (teaches the adapters windowed attention)
from qkhooks.models import relpos as _relpos  # noqa: F401  (teaches the adapters relative positions, SAM/ViTDet windows)

sites = find_sites

__all__ = ["AttentionSite", "QKWeights", "adapters", "sites", "find_sites", "parse_layers", "register_adapter"]
