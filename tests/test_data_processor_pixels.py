"""Round 32's review of the data path: each test reproduces pixels qkhooks fed a model that differed from the model's
own preprocessing without a word (the reference: the checkpoint's Hugging Face image processor, PIL backend, or a
direct numpy computation), and checks the fix: the same pixels, or a refusal naming the cause and the fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageFile

import qkhooks
from qkhooks.data import ImageConfig, open_dataset
from qkhooks.data.display import to_rgb
from qkhooks.errors import QKHooksError


def _photo(folder, shape=(427, 640), seed=0, name="photo.png"):
    """A smooth random photo (so that a one-pixel shift shows) in ``folder``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((shape[1], shape[0]), Image.BICUBIC)
    folder.mkdir(exist_ok=True)
    image.save(folder / name)
    return folder / name


def _hf_pixels(processor, path) -> torch.Tensor:
    with Image.open(path) as image:
        return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


# ------------------------------------------------------------------ HF centre crops start where HF's do
@pytest.mark.parametrize("shape", [(427, 640), (300, 451), (224, 330)])
def test_an_hf_centre_crop_starts_where_the_processor_starts_it_and_its_masks_follow(tmp_path, shape):
    """CLIP: shortest edge 224, crop 224. HF starts the crop at (W' - 224) // 2; torchvision rounds half to even, one
    column later where the margin is 3 mod 4 (the 427x640 photo: 335 wide, margin 111)."""
    processor = transformers.CLIPImageProcessorPil()
    config = ImageConfig.from_hf(processor.to_dict())
    assert config.crop == "hf"
    path = _photo(tmp_path / "photos", shape)
    got = open_dataset(str(tmp_path / "photos"), config)[0]["pixel_values"]
    assert torch.equal(got, _hf_pixels(processor, path))
    geometry = config.geometry(shape)
    assert geometry.left == (geometry.resized_hw[1] - 224) // 2 and geometry.top == (geometry.resized_hw[0] - 224) // 2
    labels = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape) % 251  # a mask follows the same window
    np.testing.assert_array_equal(config.mask(labels, "labels").numpy(),
                                  np.asarray(Image.fromarray(labels.astype(np.int32)).resize(
                                      geometry.resized_hw[::-1], Image.NEAREST))[geometry.top:geometry.top + 224,
                                                                                 geometry.left:geometry.left + 224])


# ------------------------------------------------------------------ processor rules ImageConfig did not read
def test_levits_processor_resizes_the_short_side_to_256_224_of_its_shortest_edge(tmp_path):
    processor = transformers.LevitImageProcessorPil()
    config = ImageConfig.from_hf(processor.to_dict())
    assert config.resize == 256 and config.size == (224, 224)
    path = _photo(tmp_path / "photos")
    assert torch.equal(open_dataset(str(tmp_path / "photos"), config)[0]["pixel_values"], _hf_pixels(processor, path))


@pytest.mark.parametrize("processor, setting", [
    (lambda: transformers.MobileViTImageProcessorPil(), r"do_flip_channel_order=True"),
    (lambda: transformers.PoolFormerImageProcessorPil(), r"crop_pct=0\.9"),
    (lambda: transformers.DPTImageProcessorPil(keep_aspect_ratio=True, ensure_multiple_of=32),
     r"keep_aspect_ratio=True, ensure_multiple_of=32"),
])
def test_processor_settings_imageconfig_does_not_model_are_refused(processor, setting):
    with pytest.raises(QKHooksError, match=rf"^the processor config sets {setting}, which ImageConfig does not model"):
        ImageConfig.from_hf(processor().to_dict())


def test_a_processor_that_does_not_rescale_by_1_255_is_refused():
    config = transformers.ViTImageProcessorPil(do_rescale=False).to_dict()
    with pytest.raises(QKHooksError, match=r"^processor do_rescale=False, rescale_factor=.*: qkhooks scales pixels by "
                                           r"1/255 before normalising"):
        ImageConfig.from_hf(config)


def test_a_config_file_is_read_as_its_own_class_reads_it_and_one_naming_no_class_must_say_what_matters(tmp_path):
    """DeiT's legacy file says size=256 with a crop: its class reads a 256 square (CLIP's would read a shortest
    edge), so the file read alone gave other pixels; a dict naming no class cannot be read by class defaults."""
    deit_file = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                 "feature_extractor_type": "DeiTFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 256}
    config = ImageConfig.from_hf(deit_file)
    assert config.resize == (256, 256) and config.size == (224, 224)
    path = _photo(tmp_path / "photos", (300, 451))
    reference = transformers.DeiTImageProcessorPil.from_dict(deit_file)
    assert torch.equal(open_dataset(str(tmp_path / "photos"), config)[0]["pixel_values"], _hf_pixels(reference, path))
    untyped = {k: v for k, v in deit_file.items() if k != "feature_extractor_type"}
    with pytest.raises(QKHooksError, match=r"size=256 with a centre crop is a shortest edge for some processor classes "
                                           r"\(CLIP\) and a square for others \(DeiT\)"):
        ImageConfig.from_hf(untyped)
    with pytest.raises(QKHooksError, match=r"names no class \(image_processor_type\) and leaves out resample, "
                                           r"do_normalize"):
        ImageConfig.from_hf({"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})


# ------------------------------------------------------------------ a dataset opened with another preprocessing
def test_record_dataset_refuses_a_dataset_opened_with_another_preprocessing_than_the_models(tmp_path):
    import timm

    from qkhooks.models.load import LoadedModel

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=0).eval()
    mine = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    loaded = LoadedModel(model=model, spec="tiny", image_config=mine)
    _photo(tmp_path / "photos", (40, 50))
    other = open_dataset(str(tmp_path / "photos"), ImageConfig(size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3))
    with pytest.raises(QKHooksError, match=r"^the dataset .* was opened with another preprocessing \(ImageConfig\(size="
                                           r"\(32, 32\), mean=\(0\.0, 0\.0, 0\.0\)"):
        qkhooks.record_dataset(loaded, other, None, modes=2, progress=False)
    same = open_dataset(str(tmp_path / "photos"), mine)
    assert qkhooks.record_dataset(loaded, same, None, modes=2, progress=False).images == 1


# ------------------------------------------------------------------ transparency and truncated files
@pytest.mark.parametrize("mode, level", [("L", 77), ("RGB", (10, 200, 30))])
def test_a_pngs_transparent_grey_level_or_colour_is_composited_on_white(mode, level):
    """tRNS of a grey or RGB PNG marks one value transparent: composited on white as palette and alpha images are
    (and as HF's convert_rgb does); it was taken as an opaque colour."""
    other = 150 if mode == "L" else (150, 20, 90)
    image = Image.new(mode, (3, 2), level)
    image.putpixel((1, 1), other)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=level)
    buffer.seek(0)
    got = np.asarray(to_rgb(Image.open(buffer)))
    expected = np.full((2, 3, 3), 255, np.uint8)  # white where transparent
    expected[1, 1] = other
    np.testing.assert_array_equal(got, expected)


def test_a_process_that_loads_truncated_images_is_refused_instead_of_recording_grey_rows(tmp_path, monkeypatch):
    path = _photo(tmp_path / "photos", (64, 64), name="photo.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(QKHooksError, match=r"^PIL\.ImageFile\.LOAD_TRUNCATED_IMAGES is True in this process"):
        open_dataset(str(tmp_path / "photos"), ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))[0]


def test_a_symlinked_subfolder_is_not_followed_and_a_warning_names_it(tmp_path):
    """Its images were left out with no word (the README says links to folders are not followed)."""
    _photo(tmp_path / "photos", (40, 50), name="a.png")
    _photo(tmp_path / "elsewhere", (40, 50), seed=1, name="b.png")
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.warns(UserWarning, match=r"^1 symlinked subfolder\(s\) of .*photos are not followed, so their images "
                                         r"are not recorded: linked/"):
        data = open_dataset(str(tmp_path / "photos"), config)
    assert data.ids == ["a.png"]


def test_an_animated_image_records_its_first_frame_and_says_so():
    frames = [Image.new("RGB", (4, 3), c) for c in ((200, 10, 10), (10, 200, 10))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    buffer.seek(0)
    with pytest.warns(UserWarning, match=r"has 2 frames; its first frame is recorded"):
        got = np.asarray(to_rgb(Image.open(buffer)))
    np.testing.assert_array_equal(got, np.asarray(frames[0]))
