"""Round 45's review of the user's own data path, from a researcher's seat: each test reproduces a result that was
wrong without a word (pixels other than the model's own processor gives, checked against that processor's PIL
backend) or an error that did not name the problem and the fix, and checks the fix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qkhooks.data import ImageConfig
from qkhooks.errors import QKHooksError


def _wide_photo() -> Image.Image:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (13, 51, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((400, 100), Image.BICUBIC)


# ------------------------------------------------------------------ processor settings from_hf did not read
# Each processor gave other pixels (or another input size) than ImageConfig.from_hf of its own config, without a
# word: a long side capped by longest_edge (the crop then pads), EfficientNet's second division by the std
# (include_top), Perceiver's crop before its resize, DeepSeek-OCR 2's tiles; VitPose's affine crop by boxes was a
# bare KeyError('resample').
REFUSED = [
    (lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 100},
                                                crop_size={"height": 64, "width": 64}), r"longest_edge"),
    (lambda: transformers.EfficientNetImageProcessorPil(size={"height": 64, "width": 64}), r"include_top=True"),
    (lambda: transformers.EfficientNetImageProcessorPil(size={"height": 64, "width": 64}, include_top=False,
                                                        rescale_offset=True), r"rescale_offset=True"),
    (lambda: transformers.PerceiverImageProcessorPil(size={"height": 48, "width": 48},
                                                     crop_size={"height": 64, "width": 64}), r"Perceiver"),
    (lambda: transformers.DeepseekOcr2ImageProcessorPil(size={"height": 64, "width": 64}), r"crop_to_patches=True"),
    (lambda: transformers.DeepseekOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=False,
                                                        tile_size=48), r"tile_size=48"),
    (lambda: transformers.VitPoseImageProcessorPil(), r"do_affine_transform=True"),
]


@pytest.mark.parametrize("build, setting", REFUSED, ids=["longest_edge", "include_top", "rescale_offset",
                                                         "perceiver", "crop_to_patches", "tile_size",
                                                         "affine"])
def test_processor_settings_that_change_the_pixels_are_refused_not_dropped(build, setting):
    processor = build()
    config = processor.to_dict()
    try:
        ours = ImageConfig.from_hf(config)
    except QKHooksError as exc:
        assert re.search(setting, str(exc)), str(exc)
        assert "ImageConfig(" in str(exc)  # the fix: build it by hand
        return
    # accepted: then it must give the processor's own pixels (it did not: the reason for this test)
    photo = _wide_photo()
    theirs = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    mine = ours(photo)
    assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-6, rtol=0), (
        f"{type(processor).__name__}: from_hf accepted {config} but gave other pixels")
    pytest.fail(f"{type(processor).__name__}'s {setting} was neither read nor refused")


def test_a_shortest_edge_without_a_long_side_cap_still_gives_the_processors_pixels():
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    photo = _wide_photo()
    theirs = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(ImageConfig.from_hf(processor.to_dict())(photo), theirs, atol=1e-6, rtol=0)
