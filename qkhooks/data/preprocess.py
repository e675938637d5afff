"""Model-input preprocessing that images and their masks share (:class:`ImageConfig`).

Every analysis that relates attention to objects needs the object masks in the
exact pixel geometry the model saw. The safest way to guarantee that is to
compute the geometry (resize size, crop offsets) once and apply it to both the
image and the masks, so *where pixels go* (:class:`~qkhooks.data.geometry.Geometry`)
is kept apart from *how they are resampled* (bicubic for photos, nearest for
label maps, exact area averaging for fractional masks). Every image first becomes
the RGB image a viewer shows (:func:`~qkhooks.data.display.to_rgb`).

The image path reproduces timm's / torchvision's evaluation transform
(``Resize`` on the shorter side, ``CenterCrop``, ``ToTensor``, ``Normalize``)
bit for bit on PIL images, so pixel values match what the checkpoint was
evaluated with.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from qkhooks.data.display import to_rgb
from qkhooks.data.geometry import CROP_RULES, Geometry, crop_offset
from qkhooks.errors import DataRefusal, QKHooksError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Geometry",
    "ImageConfig",
    "to_rgb",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)

_PIL_FILTERS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# "area" is exact pixel-area averaging (cv2.INTER_AREA when shrinking), done by Geometry.apply_area:
# Pillow's BOX filter only counts source pixels whose *centres* fall in the window, so it is not exact.
_INTERPOLATIONS: tuple[str, ...] = ("area", "bicubic", "bilinear", "nearest")
# Pillow's integer resample codes, as stored in HF preprocessor_config.json ("resample": 3).
_PIL_CODES: dict[int, str] = {0: "nearest", 2: "bilinear", 3: "bicubic"}

MaskKind = Literal["labels", "fraction"]


def _pair(value: Any, what: str) -> tuple[int, int]:
    """Coerce an int or a 2-sequence into a validated ``(H, W)`` pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = (int(value[0]), int(value[1]))
        if pair != (value[0], value[1]):
            raise QKHooksError(f"{what} must hold integers, got {value!r}; pass e.g. (224, 224).")
    else:
        raise QKHooksError(f"{what} must be an int or an (H, W) pair, got {value!r}; pass e.g. (224, 224).")
    if min(pair) <= 0:
        raise QKHooksError(f"{what} must be positive, got {value!r}.")
    return pair


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    """Coerce a per-channel statistic into a 3-tuple of floats (RGB order)."""
    try:
        triple = tuple(float(v) for v in value)
    except TypeError:
        raise QKHooksError(f"{what} must be three numbers (R, G, B), got {value!r}.") from None
    if len(triple) != 3:
        raise QKHooksError(f"{what} must be three numbers (R, G, B), got {value!r}.")
    return triple  # type: ignore[return-value]


_UNMODELLED_HF_KEYS = {"do_flip_channel_order": (False,), "keep_aspect_ratio": (False,), "ensure_multiple_of": (1,),
                       "crop_pct": (), "do_pad": (False,), "size_divisor": (), "pad_size": (),
                       "include_top": (False,), "rescale_offset": (False,), "crop_to_patches": (False,),
                       "tile_size": (), "do_affine_transform": (False,)}
"""Image processor keys ImageConfig does not model, with their neutral values (None is neutral for each): a config
that sets one otherwise (MobileViT's BGR channels, DPT's aspect-keeping resize, ConvNeXt's crop_pct, EfficientNet's
second division by the std and its offset, DeepSeek-OCR 2's tiles, VitPose's crop by boxes) is refused (review r45:
the last four were read as if absent, VitPose's as a bare KeyError)."""

_HF_KEYS_NEEDED = ("size", "resample", "do_normalize", "image_mean", "image_std")
"""What a processor config that names no class must say: a class's own defaults are not known without it."""


def _is_hf_image_processor(value: Any) -> bool:
    """Whether ``value`` is a transformers image processor object (its class derives from transformers' image
    processing mixin), whose ``to_dict()`` is its config."""
    return callable(getattr(value, "to_dict", None)) and any(
        c.__module__.startswith("transformers.") and c.__name__ in ("ImageProcessingMixin", "BaseImageProcessor")
        for c in type(value).__mro__)


def _hf_backend(processor: Any) -> str:
    """The backend a transformers image processor object runs: its ``backend`` (transformers 5: "torchvision" or
    "pil"), else by its class (transformers 4: a ``...Fast`` class runs torchvision, the others PIL)."""
    backend = getattr(processor, "backend", None)
    if isinstance(backend, str):
        return backend
    return "torchvision" if type(processor).__name__.endswith("Fast") else "pil"


def _processor_class(config: dict[str, Any]) -> str:
    """The image processor class a config names (a feature extractor by the name of its image processor)."""
    name = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
    return str(name).replace("FeatureExtractor", "ImageProcessor")


def _as_its_class_reads_it(config: dict[str, Any]) -> dict[str, Any]:
    """A processor config as its own class reads it: an int ``size`` by the class's rule (a square for DeiT, a
    shortest edge for CLIP), every key it leaves out at the class's default (MobileViT never normalises), through
    transformers where the config names its class; a config that names none must say what matters itself. Keys
    ImageConfig does not model are refused unless neutral."""
    name = _processor_class(config)
    if name:
        try:
            import transformers

            cls = getattr(transformers, name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unused keys of older files
                config = {**cls.from_dict(dict(config)).to_dict(), "image_processor_type": name}
        except (ImportError, AttributeError) as exc:
            raise QKHooksError(
                f"the processor config names the class {name!r}, which this transformers does not know "
                f"({type(exc).__name__}), so its defaults and rules cannot be read; upgrade transformers, or build "
                "ImageConfig(...) by hand.") from None
    else:
        missing = [k for k in _HF_KEYS_NEEDED if k not in config
                   and not (k in ("image_mean", "image_std") and config.get("do_normalize") is False)]
        if missing:
            raise QKHooksError(
                f"the processor config names no class (image_processor_type) and leaves out {', '.join(missing)}, "
                "whose defaults differ from class to class; pass processor.to_dict() of the loaded processor, add "
                "image_processor_type, or build ImageConfig(...) by hand.")
    unmodelled = {k: config[k] for k, neutral in _UNMODELLED_HF_KEYS.items()
                  if config.get(k) is not None and config[k] not in neutral}
    if unmodelled:
        raise QKHooksError(
            f"the processor config sets {', '.join(f'{k}={v!r}' for k, v in unmodelled.items())}, which ImageConfig "
            "does not model (channel order, aspect-keeping resizes, crop percentages, padding): the pixels would "
            "differ from the processor's; build ImageConfig(...) by hand where it can express them.")
    return config


def _refuse_oversized_resize(source_hw: tuple[int, int], resized_hw: tuple[int, int]) -> None:
    """The shorter-side resize runs on the whole image before the crop, so a thin strip (1 x 100,000 pixels, a few
    hundred KB on disk) would become a resized image of tens of GB and the process be killed without a word (review
    r35 B). Past PIL's own decompression-bomb limit it is refused, naming the sizes and the fix."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = resized_hw[0] * resized_hw[1]
    if limit is not None and pixels > limit:
        raise DataRefusal(
            f"an image of {source_hw[0]}x{source_hw[1]} pixels (height x width) would be resized to "
            f"{resized_hw[0]}x{resized_hw[1]} ({pixels:,} pixels, {3 * pixels / 2**30:.1f} GiB as RGB) before its crop, "
            f"past PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = {limit:,}). Crop it to a less extreme "
            "aspect ratio first, or raise that limit if the memory is there."
        )


@dataclass(frozen=True)
class ImageConfig:
    """How a checkpoint expects its images: size, normalisation and resize/crop policy.

    One object serves both images and masks so that masks can never drift from
    the pixels they annotate.

    Attributes:
        size: ``(H, W)`` fed to the model.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided out after subtracting ``mean``.
        resize: ``None``: resize straight to ``size`` (aspect ratio not kept).
            ``int``: resize the shorter side to this length (aspect kept, longer side
            ``int(resize * long / short)`` as torchvision does), then centre-crop ``size``.
            ``(H, W)``: resize to exactly this, then centre-crop ``size`` (timm's
            ``crop_mode="squash"``; an extension of the int form).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"`` for photos, or
            ``"area"`` (exact pixel-area averaging, like cv2 ``INTER_AREA`` when shrinking).
        letterbox: Instead of cropping, scale the longest side to fit ``size``
            (``round(side * scale)``, as albumentations ``LongestMaxSize``) and pad the
            rest centred (``(size - resized) // 2`` before), so nothing is cut off.
            Requires ``resize=None``.
        pad_value: Pixel value (0-255, all channels, before normalisation) of the
            letterbox padding. Masks are always padded with 0 (background).
        crop: where the centre crop starts: ``"torchvision"`` (timm's; rounds half to even) or ``"hf"`` (Hugging
            Face image processors': floor), one pixel apart where the margin is odd (:func:`crop_offset`).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | tuple[int, int] | None = None
    interpolation: str = "bicubic"
    letterbox: bool = False
    pad_value: int = 0
    crop: str = "torchvision"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _pair(self.size, "ImageConfig.size"))
        object.__setattr__(self, "mean", _triple(self.mean, "ImageConfig.mean"))
        std = _triple(self.std, "ImageConfig.std")
        if min(std) <= 0:
            raise QKHooksError(f"ImageConfig.std must be positive, got {std}.")
        object.__setattr__(self, "std", std)
        if self.resize is not None:
            if isinstance(self.resize, (tuple, list)):
                object.__setattr__(self, "resize", _pair(self.resize, "ImageConfig.resize"))
            else:
                object.__setattr__(self, "resize", _pair(self.resize, "ImageConfig.resize")[0])
        if self.interpolation not in _INTERPOLATIONS:
            raise QKHooksError(
                f"ImageConfig.interpolation {self.interpolation!r} is not supported; use one of {_INTERPOLATIONS}."
            )
        if self.letterbox and self.resize is not None:
            raise QKHooksError("ImageConfig(letterbox=True) scales to fit `size` itself; leave resize=None.")
        if not (isinstance(self.pad_value, (int, np.integer)) and 0 <= int(self.pad_value) <= 255):
            raise QKHooksError(f"ImageConfig.pad_value must be an int in 0..255, got {self.pad_value!r}.")
        object.__setattr__(self, "letterbox", bool(self.letterbox))
        object.__setattr__(self, "pad_value", int(self.pad_value))
        if self.crop not in CROP_RULES:
            raise QKHooksError(f"ImageConfig.crop must be one of {CROP_RULES}, got {self.crop!r}.")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> ImageConfig:
        """Read the evaluation preprocessing of a timm model.

        Uses ``timm.data.resolve_data_config({}, model=model)``, i.e. the model's
        ``pretrained_cfg``, and mirrors ``timm.data.create_transform`` for
        ``crop_mode`` ``"center"`` (``resize = floor(size / crop_pct)``) and
        ``"squash"``.

        Args:
            model: A timm model (``timm.create_model(...)``).

        Returns:
            The matching config.

        Raises:
            QKHooksError: if timm is missing, or the model uses a crop mode this
                class cannot express (``"border"``, or ``"center"`` with a
                non-square size, which timm implements with ``ResizeKeepRatio``).
        """
        try:
            from timm.data import resolve_data_config
        except ImportError:
            raise QKHooksError("ImageConfig.from_timm needs timm; pip install timm.") from None
        cfg = resolve_data_config({}, model=model)
        _, h, w = cfg["input_size"]
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if built is not None and tuple(built) != (h, w):  # created with img_size=...: its pretrained cfg is stale
            h, w = (int(v) for v in built)
        crop_pct = float(cfg.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT when unset
        crop_mode = cfg.get("crop_mode") or "center"
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in _PIL_FILTERS:
            raise QKHooksError(
                f"timm model asks for interpolation {interpolation!r}; qkhooks supports {sorted(_PIL_FILTERS)}. "
                "Build ImageConfig(...) by hand with the closest one."
            )
        scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        resize: int | tuple[int, int] | None
        if crop_mode == "center":
            if scale[0] != scale[1]:
                raise QKHooksError(
                    f"timm model has a non-square input {(h, w)} with crop_mode='center' (ResizeKeepRatio), "
                    "which ImageConfig cannot express; build ImageConfig(size=..., resize=(H, W)) by hand."
                )
            resize = scale[0]
        elif crop_mode == "squash":
            resize = None if scale == (h, w) else scale
        else:
            raise QKHooksError(
                f"timm crop_mode {crop_mode!r} is not supported (only 'center' and 'squash'); "
                "build ImageConfig(...) by hand."
            )
        return cls(
            size=(h, w),
            mean=tuple(cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(cfg["std"]),  # type: ignore[arg-type]
            resize=resize,
            interpolation=interpolation,
        )

    @classmethod
    def from_hf(cls, processor_config: dict[str, Any] | Any) -> ImageConfig:
        """Read a Hugging Face image processor config (``preprocessor_config.json``).

        Understood keys: ``size`` (``{"height", "width"}``, ``{"shortest_edge"}`` or a
        legacy int), ``crop_size``, ``do_center_crop``, ``do_resize``,
        ``image_mean``, ``image_std``, ``do_normalize``, ``resample``,
        ``do_rescale``/``rescale_factor``.

        The centre crop starts where HF's does (``crop="hf"``: ``(H - crop) // 2``, where torchvision rounds half
        to even); masks follow the same window. Keys ImageConfig does not model (channel order, aspect-keeping
        resizes, ``crop_pct``, padding, a scale other than 1/255) are refused; LeViT's 256/224 shortest edge is read.

        The pixels are those of transformers' PIL backend (``CLIPImageProcessorPil`` in transformers 5, the plain
        class in 4), whatever backend the class the config names runs: a config names no backend (transformers 5's
        ``AutoImageProcessor`` picks the torchvision one by default, whose resized pixels differ by up to one 8-bit
        level: 0.015 after CLIP's normalisation on skimage's astronaut). A processor object handed in is read through
        its ``to_dict()``; one that runs the torchvision backend (transformers 5's ``CLIPImageProcessor``, 4's
        ``...Fast``) is taken with a warning saying so (review r46: its pixels differed without a word).

        Args:
            processor_config: The parsed JSON dict (or ``processor.to_dict()``), or the processor object.

        Returns:
            The matching config.

        Raises:
            QKHooksError: for configs that cannot give a fixed-size input (shortest
                edge without a crop) or use unsupported resampling/rescaling.
        """
        processor = None
        if not isinstance(processor_config, dict):
            if not _is_hf_image_processor(processor_config):
                raise QKHooksError(
                    "ImageConfig.from_hf expects the preprocessor_config.json dict; "
                    "for a processor object pass processor.to_dict()."
                )
            processor, processor_config = processor_config, processor_config.to_dict()
        c = _as_its_class_reads_it(processor_config)
        do_resize = bool(c.get("do_resize", True))
        do_crop = bool(c.get("do_center_crop", False)) and c.get("crop_size") is not None
        size_cfg = c.get("size")

        def hw_of(value: Any, key: str) -> tuple[int, int]:
            if isinstance(value, dict) and "height" in value and "width" in value:
                return _pair((value["height"], value["width"]), key)
            if isinstance(value, (int, list, tuple)):
                return _pair(value, key)
            raise QKHooksError(f"cannot read {key}={value!r} from the processor config; expected {{height, width}}.")

        resize: int | tuple[int, int] | None
        if do_crop:
            size = hw_of(c["crop_size"], "crop_size")
            if not do_resize or size_cfg is None:
                raise QKHooksError(
                    "processor config centre-crops without resizing, so the model input depends on the photo size; "
                    "build ImageConfig(...) by hand."
                )
            if _processor_class(c).startswith("Perceiver"):
                raise QKHooksError(
                    "PerceiverImageProcessor crops a centre square of crop_size/size of the photo's shorter side "
                    "before it resizes to size, which ImageConfig does not model (it resizes, then crops): the pixels "
                    "and the input size would differ from the processor's; build ImageConfig(...) by hand.")
            if isinstance(size_cfg, dict) and "shortest_edge" in size_cfg:
                if size_cfg.get("longest_edge") is not None:  # review r45: read as if absent, the crop then pads
                    raise QKHooksError(
                        f"the processor config's size={size_cfg} caps the resized long side at longest_edge (a wide "
                        "photo's short side then ends below shortest_edge, and the centre crop pads it), which "
                        "ImageConfig does not model; build ImageConfig(size=..., resize=shortest_edge, ...) by hand "
                        "if the cap does not matter for your photos.")
                resize = _pair(size_cfg["shortest_edge"], "size.shortest_edge")[0]
                if _processor_class(c).startswith("Levit"):  # LeViT resizes the short side to 256/224 of it
                    resize = int((256 / 224) * resize)
            elif isinstance(size_cfg, int):
                raise QKHooksError(
                    f"the processor config's size={size_cfg} with a centre crop is a shortest edge for some processor "
                    "classes (CLIP) and a square for others (DeiT), and the config names no class "
                    "(image_processor_type); pass processor.to_dict() of the loaded processor, or build "
                    "ImageConfig(...) by hand.")
            else:
                resize = hw_of(size_cfg, "size")
                if resize == size:
                    resize = None
        else:
            if not do_resize or size_cfg is None:
                raise QKHooksError(
                    "processor config neither resizes nor crops to a fixed size; build ImageConfig(...) by hand."
                )
            if isinstance(size_cfg, dict) and "shortest_edge" in size_cfg and "height" not in size_cfg:
                raise QKHooksError(
                    "processor config resizes the shortest edge without a centre crop, so inputs vary in size; "
                    "build ImageConfig(size=(S, S), resize=S, ...) by hand to crop them."
                )
            size = hw_of(size_cfg, "size")
            resize = None

        if c.get("do_normalize", False):  # a class that never normalises (MobileViT) has no do_normalize
            mean = _triple(c.get("image_mean"), "image_mean")
            std = _triple(c.get("image_std"), "image_std")
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if not c.get("do_rescale", True) or not math.isclose(float(c.get("rescale_factor", 1 / 255)), 1 / 255):
            raise QKHooksError(
                f"processor do_rescale={c.get('do_rescale', True)}, rescale_factor={c.get('rescale_factor')}: qkhooks "
                "scales pixels by 1/255 before normalising; build ImageConfig(...) by hand for another scale."
            )

        resample = c.get("resample")
        if resample is None:  # a class that resamples otherwise (none of those from_hf reads lacks it)
            raise QKHooksError(
                f"the processor config ({_processor_class(c) or 'no class named'}) says no resample filter, so how it "
                "resizes is not known here; build ImageConfig(...) by hand.")
        if isinstance(resample, str):
            interpolation = resample.lower()
        else:
            interpolation = _PIL_CODES.get(int(resample), f"PIL code {resample}")
        if interpolation not in _PIL_FILTERS:
            raise QKHooksError(
                f"processor resample {resample!r} is not supported; qkhooks handles {sorted(_PIL_FILTERS)} "
                "(PIL codes 0, 2, 3)."
            )
        config = cls(size=size, mean=mean, std=std, resize=resize, interpolation=interpolation, crop="hf")
        if processor is not None and _hf_backend(processor) != "pil":
            name = type(processor).__name__
            pil = name[:-len("Fast")] if name.endswith("Fast") else f"{name}Pil"  # transformers 4, 5
            warnings.warn(
                f"ImageConfig.from_hf({name}): this processor runs transformers' {_hf_backend(processor)} backend, "
                f"but qkhooks makes the pixels of the PIL backend ({pil}), whatever the "
                "processor handed in: resized photos differ from this processor's by up to one 8-bit level (0.015 "
                "after CLIP's normalisation, on 0.3% of the values of skimage's astronaut; 0.008 on 20% with ViT's "
                f"bilinear resize of a 457x301 crop of it). To compare qkhooks' inputs with a processor's, use {pil} "
                "(AutoImageProcessor.from_pretrained(..., backend='pil')); pass processor.to_dict() to take the PIL "
                "backend's pixels without this warning.", stacklevel=2)
        return config

    @classmethod
    def from_hf_model(cls, model: Any) -> ImageConfig:
        """Guess the preprocessing of a Hugging Face vision model from ``model.config`` alone.

        Only a fallback for when no ``preprocessor_config.json`` is at hand (prefer
        :meth:`from_hf`): it takes ``image_size`` from the (vision) config and picks
        mean/std by ``model_type``: CLIP family -> CLIP statistics with a shorter
        side resize plus centre crop and bicubic; SigLIP family -> 0.5/0.5, squash,
        bilinear; ``vit`` -> 0.5/0.5 (Google checkpoints), squash, bilinear;
        anything else -> ImageNet statistics, squash, bicubic. A warning says so.

        Args:
            model: A ``transformers`` model (or anything with a ``.config``).

        Returns:
            The guessed config.

        Raises:
            QKHooksError: if the config has no ``image_size``.
        """
        config = getattr(model, "config", model)
        vision = getattr(config, "vision_config", None) or config
        image_size = getattr(vision, "image_size", None) or getattr(config, "image_size", None)
        if image_size is None:
            raise QKHooksError(
                "model.config has no image_size; use ImageConfig.from_hf(preprocessor_config_dict) "
                "or build ImageConfig(...) by hand."
            )
        size = _pair(image_size, "config.image_size")
        model_type = str(getattr(config, "model_type", "") or getattr(vision, "model_type", "")).lower()
        resize: int | None = None
        if "clip" in model_type:
            mean, std, interpolation = CLIP_MEAN, CLIP_STD, "bicubic"
            if size[0] == size[1]:
                resize = size[0]
        elif "siglip" in model_type:
            mean, std, interpolation = _HALF, _HALF, "bilinear"
        elif model_type == "vit":
            mean, std, interpolation = _HALF, _HALF, "bilinear"
        else:
            mean, std, interpolation = IMAGENET_MEAN, IMAGENET_STD, "bicubic"
        warnings.warn(
            f"ImageConfig.from_hf_model guessed preprocessing for model_type={model_type!r} "
            f"(size={size}, mean={mean}, std={std}); for the checkpoint's exact preprocessing put its "
            "preprocessor_config.json in the model's folder (hf:DIR reads it there), or pass it to "
            "ImageConfig.from_hf and load_model(..., image_config=...).",
            stacklevel=2,
        )
        return cls(size=size, mean=mean, std=std, resize=resize, interpolation=interpolation, crop="hf")

    # ------------------------------------------------------------------ geometry

    def geometry(self, image_hw: tuple[int, int]) -> Geometry:
        """Compute where an image of size ``image_hw`` lands in the model input.

        Args:
            image_hw: ``(H, W)`` of the source image (note: PIL's ``.size`` is ``(W, H)``).

        Returns:
            The :class:`Geometry` shared by the image and all its masks.
        """
        h, w = _pair(image_hw, "image_hw")
        if self.letterbox:
            scale = min(self.size[0] / h, self.size[1] / w)
            resized = (max(1, round(h * scale)), max(1, round(w * scale))) if scale != 1.0 else (h, w)
            resized = (min(resized[0], self.size[0]), min(resized[1], self.size[1]))
            top = -((self.size[0] - resized[0]) // 2)
            left = -((self.size[1] - resized[1]) // 2)
            return Geometry(source_hw=(h, w), resized_hw=resized, top=top, left=left, output_hw=self.size)
        if self.resize is None:
            resized = self.size
        elif isinstance(self.resize, tuple):
            resized = self.resize
        else:
            # torchvision's shorter-side rule: long side = int(resize * long / short).
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize, int(self.resize * long / short)
            resized = (new_long, new_short) if w <= h else (new_short, new_long)
            _refuse_oversized_resize((h, w), resized)
        top = crop_offset(resized[0], self.size[0], self.crop)
        left = crop_offset(resized[1], self.size[1], self.crop)
        return Geometry(source_hw=(h, w), resized_hw=resized, top=top, left=left, output_hw=self.size)

    # ------------------------------------------------------------------ transforms

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """Scale to [0, 1] and normalise an image that already has the model-input size.

        Used for stimuli rendered directly at ``size`` (no resampling blur, no
        crop that could cut items off).

        Args:
            image: PIL image of size ``size``; converted to RGB.

        Returns:
            ``(3, H, W)`` float32 tensor.
        """
        if not isinstance(image, Image.Image):
            raise QKHooksError(f"expected a PIL.Image.Image, got {type(image).__name__}; use PIL.Image.open(path).")
        if (image.height, image.width) != self.size:
            raise QKHooksError(
                f"normalize() needs an image of exactly {self.size} (H, W), got {(image.height, image.width)}; "
                "call the config itself to resize and crop."
            )
        return self._to_tensor(to_rgb(image))

    def _to_tensor(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        # Same op order as torchvision to_tensor + Normalize, so results are bit-identical.
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        x = x.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return x.sub(mean).div(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess a photo exactly like timm's evaluation transform.

        Resize (per :attr:`resize` / :attr:`letterbox`), centre crop or pad, scale to
        [0, 1], normalise. The image is first brought to what a viewer shows by
        :func:`to_rgb` (EXIF orientation applied, 16-bit and float scaled by their
        range, transparency composited on white).

        Args:
            image: Any PIL image.

        Returns:
            ``(3, H, W)`` float32 normalised tensor.
        """
        if not isinstance(image, Image.Image):
            raise QKHooksError(f"expected a PIL.Image.Image, got {type(image).__name__}; use PIL.Image.open(path).")
        image = to_rgb(image)
        geom = self.geometry((image.height, image.width))
        if self.interpolation == "area":
            arr = geom.apply_area(np.asarray(image), fill=float(self.pad_value))
            return self._to_tensor(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return self._to_tensor(geom.apply(image, _PIL_FILTERS[self.interpolation], fill=self.pad_value))

    def mask(self, mask: np.ndarray | torch.Tensor, kind: MaskKind) -> torch.Tensor:
        """Bring a full-resolution mask into model-input geometry, like its image.

        ``"labels"`` maps are resampled with nearest neighbour (Pillow's pixel-centre
        convention), so every output pixel carries a label that existed in the
        input. ``"fraction"`` masks are resampled by exact area averaging: each
        output pixel is the covered fraction of its footprint (partial source pixels
        weighted by overlap), for upsampling and downsampling alike. Padding is 0.

        Args:
            mask: ``(H, W)`` array with the *image's* ``(H, W)``; integer (or bool) for
                labels, values in [0, 1] (or bool) for fractions.
            kind: ``"labels"`` or ``"fraction"``.

        Returns:
            ``LongTensor (h, w)`` for labels, ``FloatTensor (h, w)`` in [0, 1] for fractions.
        """
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if arr.ndim != 2:
            raise QKHooksError(f"mask must be a 2-D (H, W) array, got shape {arr.shape}.")
        geom = self.geometry(arr.shape)
        if kind == "labels":
            if arr.dtype == bool:
                arr = arr.astype(np.int32)
            if not np.issubdtype(arr.dtype, np.integer):
                raise QKHooksError(f"labels mask must have an integer dtype, got {arr.dtype}; use kind='fraction'.")
            if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
                raise QKHooksError("labels mask values must fit in int32.")
            img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.int32))
            out = np.array(geom.apply(img, Image.Resampling.NEAREST), dtype=np.int64)
            return torch.from_numpy(out)
        if kind == "fraction":
            arr = arr.astype(np.float32)
            if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1 or np.isnan(arr).any()):
                raise QKHooksError("fraction mask values must lie in [0, 1]; threshold or rescale it first.")
            out = geom.apply_area(arr).astype(np.float32)
            return torch.from_numpy(np.clip(out, 0.0, 1.0))
        raise QKHooksError(f"mask kind must be 'labels' or 'fraction', got {kind!r}.")
