"""Round 46, helper DATA: transformers' image processors run a torchvision backend (transformers 5's default,
``CLIPImageProcessor``; 4's ``...Fast``) or a PIL one (5's ``CLIPImageProcessorPil``); their resized pixels differ by
up to one 8-bit level. ImageConfig.from_hf makes the PIL backend's pixels (README); a processor object handed in was
refused, and its to_dict() gave other pixels than it without a word. Now the object is read, and a torchvision one
is taken with a warning naming the pixels made."""

from __future__ import annotations

import warnings

import pytest
from PIL import Image

# ---------------------------------------------------------------------------------------------- HF processor backends


def _processors():
    """transformers' CLIP processor on its torchvision backend and on its PIL backend (5: CLIPImageProcessor and
    CLIPImageProcessorPil; 4: CLIPImageProcessorFast and CLIPImageProcessor)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    if hasattr(transformers, "CLIPImageProcessorPil"):
        fast, pil = transformers.CLIPImageProcessor(), transformers.CLIPImageProcessorPil()
    else:
        fast, pil = transformers.CLIPImageProcessorFast(), transformers.CLIPImageProcessor()
    if getattr(fast, "backend", "torchvision") != "torchvision":
        pytest.skip("no torchvision backend here")
    return fast, pil


def _astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def test_a_pil_backend_processor_object_is_read_as_its_config_and_gives_its_pixels():
    """Before: a processor object was refused ("pass processor.to_dict()")."""
    from qkhooks.data import ImageConfig

    _, pil = _processors()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ImageConfig.from_hf(pil)
    assert config == ImageConfig.from_hf(pil.to_dict())
    theirs = pil(images=_astronaut(), return_tensors="pt")["pixel_values"][0]
    assert (config(_astronaut()) - theirs).abs().max().item() <= 1e-6


def test_a_torchvision_backend_processor_is_taken_with_a_warning_that_the_pils_pixels_are_made():
    """The torchvision backend's pixels differ from the PIL backend's (one 8-bit level, 0.015 after CLIP's
    normalisation, on skimage's astronaut); qkhooks makes the PIL backend's, as README says, and says so when handed
    a torchvision processor (before: refused as an object, and its to_dict() gave other pixels without a word)."""
    from qkhooks.data import ImageConfig

    fast, pil = _processors()
    with pytest.warns(UserWarning, match=r"(?s)runs transformers' torchvision backend.*makes the pixels of the PIL "
                                         r"backend \(CLIPImageProcessor(Pil)?\).*0\.015"):
        config = ImageConfig.from_hf(fast)
    photo = _astronaut()
    ours = config(photo)
    theirs_pil = pil(images=photo, return_tensors="pt")["pixel_values"][0]
    theirs_fast = fast(images=photo, return_tensors="pt")["pixel_values"][0]
    assert (ours - theirs_pil).abs().max().item() <= 1e-6  # the PIL backend's pixels
    gap = (ours - theirs_fast).abs().max().item()
    assert 0 < gap <= 1 / 255 / min(pil.image_std) + 1e-6  # the difference the warning names: one 8-bit level
