"""Inputs as a user meets them: images recorded as a viewer shows them, honest random weights, every
user-caused error a QKHooksError with the fix.

Image references are computed here independently of :func:`qkhooks.data.preprocess.to_rgb` (numpy lookups,
``np.rot90``, PIL's own ``alpha_composite``), and compared with what the dataset feeds the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qkhooks import QKHooksError
from qkhooks.data import ImageConfig, open_dataset, to_rgb

CFG = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=None, interpolation="bilinear")
RNG = np.random.default_rng(0)


def _recorded(folder: Path) -> dict[str, torch.Tensor]:
    """What the model is fed for each file of a folder dataset, by id."""
    ds = open_dataset(str(folder), CFG)
    return {ds.ids[i]: ds[i]["pixel_values"] for i in range(len(ds))}


def _fed(reference_rgb: np.ndarray) -> torch.Tensor:
    """What the model must be fed for an image that displays as ``reference_rgb`` (H, W, 3) uint8."""
    assert reference_rgb.dtype == np.uint8 and reference_rgb.shape[2] == 3
    return CFG(Image.fromarray(reference_rgb, "RGB"))


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------- images as shown


def test_16_bit_png_is_scaled_by_its_range_not_clipped(tmp_path):
    grey = RNG.integers(0, 65536, (24, 40), dtype=np.uint16)
    grey[0, :3] = (0, 257 * 100, 65535)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit image, as written
        shown = np.asarray(to_rgb(im))
    reference = _round_half_up(grey / 257.0)
    assert np.array_equal(shown, np.repeat(reference[:, :, None], 3, axis=2))
    assert tuple(shown[0, :3, 0]) == (0, 100, 255)
    assert (shown == 255).mean() < 0.05  # the old convert("RGB") clipped ~100% to white
    recorded = _recorded(tmp_path)["deep.png"]
    assert torch.equal(recorded, _fed(np.repeat(reference[:, :, None], 3, axis=2)))


def test_exif_rotated_jpeg_is_recorded_as_shown(tmp_path):
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)  # a red corner at the stored top-left
    stored[:, 24:, 2] = 200
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "photo.jpg", quality=100, exif=exif.tobytes())
    with Image.open(tmp_path / "photo.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))  # the stored pixels, as JPEG-decoded
        shown = np.asarray(to_rgb(im))
    reference = np.rot90(decoded, k=-1)  # clockwise
    assert shown.shape == (48, 32, 3) and np.array_equal(shown, reference)
    assert shown[0, -1, 0] > 200 and shown[0, 0, 0] < 50  # the red corner is now top-right
    assert torch.equal(_recorded(tmp_path)["photo.jpg"], _fed(np.ascontiguousarray(reference)))


def test_cmyk_is_converted_without_colour_management(tmp_path):
    cmyk = RNG.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "print.tif")
    c, m, y, k = (cmyk[:, :, i].astype(np.float64) for i in range(4))
    reference = np.stack([_round_half_up((255 - ch) * (255 - k) / 255) for ch in (c, m, y)], axis=2)
    with Image.open(tmp_path / "print.tif") as im:
        assert im.mode == "CMYK"
        assert np.array_equal(np.asarray(to_rgb(im)), reference)


@pytest.mark.parametrize("transparent", [False, True], ids=["opaque", "transparent-index"])
def test_palette_images_look_up_colours_and_composite_transparency(tmp_path, transparent):
    palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    index = RNG.integers(0, 16, (18, 26), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.reshape(-1).tolist())
    image.save(tmp_path / "pal.png", **({"transparency": 5} if transparent else {}))
    reference = palette[index]
    if transparent:
        reference[index == 5] = 255  # transparent pixels show the white background
    with Image.open(tmp_path / "pal.png") as im:
        assert im.mode == "P"
        shown = np.asarray(to_rgb(im))
    assert np.array_equal(shown, reference)
    assert torch.equal(_recorded(tmp_path)["pal.png"], _fed(reference))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white_as_displayed(tmp_path, mode):
    bands = 4 if mode == "RGBA" else 2
    pixels = RNG.integers(0, 256, (22, 28, bands), dtype=np.uint8)
    pixels[0, 0, -1], pixels[0, 1, -1] = 0, 255
    Image.fromarray(pixels, mode).save(tmp_path / "alpha.png")
    with Image.open(tmp_path / "alpha.png") as im:
        assert im.mode == mode
        reference = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        shown = np.asarray(to_rgb(im)).astype(int)
    reference = np.asarray(reference.convert("RGB")).astype(int)
    assert np.abs(shown - reference).max() <= 1  # PIL's compositing rounds its own way
    assert tuple(shown[0, 0]) == (255, 255, 255)  # fully transparent: the background
    colour = pixels[0, 1, :3] if mode == "RGBA" else pixels[0, 1, :1].repeat(3)
    assert tuple(shown[0, 1]) == tuple(colour)  # opaque: the pixel itself


def test_float_images_in_0_1_are_scaled_and_others_refused(tmp_path):
    values = RNG.random((12, 16)).astype(np.float32)
    Image.fromarray(values, "F").save(tmp_path / "unit.tif")
    with Image.open(tmp_path / "unit.tif") as im:
        assert im.mode == "F"
        shown = np.asarray(to_rgb(im))
    assert np.array_equal(shown[:, :, 0], _round_half_up(values.astype(np.float64) * 255))
    with pytest.raises(QKHooksError, match=r"values in \[0, 3\].*does not clip"):
        to_rgb(Image.fromarray(values * 0 + np.float32(3) * (np.arange(16) > 0), "F"))
    with pytest.raises(QKHooksError, match="NaN"):
        to_rgb(np.full((4, 4, 3), np.nan, dtype=np.float32))


def test_arrays_use_the_same_rules_and_undefined_ranges_are_refused():
    deep = RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    assert np.array_equal(np.asarray(to_rgb(deep)), _round_half_up(deep / 257.0))
    rgba = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    a = rgba[:, :, 3:].astype(np.float64)
    expected = _round_half_up((rgba[:, :, :3] * a + 255 * (255 - a)) / 255)
    assert np.array_equal(np.asarray(to_rgb(rgba)), expected)
    with pytest.raises(QKHooksError, match="dtype int64"):
        to_rgb(np.zeros((4, 4, 3), dtype=np.int64))
    with pytest.raises(QKHooksError, match=r"\(C, H, W\)"):
        to_rgb(np.zeros((3, 4, 2), dtype=np.uint8))
    wide = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), "I")
    with pytest.raises(QKHooksError, match="mode 'I'"):
        to_rgb(wide)  # a 32-bit integer image not read from a 16-bit PNG: no defined display range


def test_image_config_applies_the_same_conversion_to_an_opened_file(tmp_path):
    """Any source handing PIL images to ImageConfig gets the displayed image too (one conversion)."""
    grey = RNG.integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        fed = CFG(im)
    reference = np.repeat(_round_half_up(grey / 257.0)[:, :, None], 3, axis=2)
    assert torch.equal(fed, _fed(reference))


# ------------------------------------------------------------------------------------------- honest random weights

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8)


@pytest.fixture
def hf_config_dir(tmp_path):
    """A folder with only a tiny ViT config.json (no weights), as save_pretrained writes it."""
    import transformers

    folder = tmp_path / "tiny-vit"
    transformers.ViTConfig(**TINY_VIT).save_pretrained(folder)
    return folder


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_random_init_builds_from_the_config(hf_config_dir):
    import transformers

    from qkhooks import load_model

    loaded = load_model(f"hf:{hf_config_dir}@random")
    assert (loaded.weights, loaded.random_init, loaded.spec) == ("random", True, f"hf:{hf_config_dir}@random")
    assert type(loaded.model) is transformers.ViTModel and loaded.model.config.hidden_size == 32
    torch.manual_seed(0)
    reference = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT))  # transformers' own init, seed 0
    assert _same(_state(loaded.model), _state(reference))
    same_flag = load_model(f"hf:{hf_config_dir}", random_init=True)
    assert same_flag.weights == "random" and _same(_state(same_flag.model), _state(loaded.model))


def test_hf_random_init_of_a_clip_folder_is_its_vision_tower(tmp_path):
    import transformers

    from qkhooks import load_model

    vision = {k: v for k, v in TINY_VIT.items()}
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    transformers.CLIPConfig(vision_config=vision, text_config=text).save_pretrained(tmp_path / "clip")
    loaded = load_model(f"hf:{tmp_path / 'clip'}@random")
    assert type(loaded.model) is transformers.CLIPVisionModel and loaded.weights == "random"


def test_timm_random_init_is_timm_without_weights():
    import timm

    from qkhooks import load_model

    loaded = load_model("timm:vit_tiny_patch16_224@random")
    assert (loaded.weights, loaded.random_init) == ("random", True)
    torch.manual_seed(0)
    assert _same(_state(loaded.model), _state(timm.create_model("vit_tiny_patch16_224", pretrained=False)))


def test_offline_random_init_is_the_same_architecture_with_new_weights(monkeypatch):
    from transformers import Dinov2Model

    from qkhooks import load_model
    from qkhooks.models import offline
    from qkhooks.models.offline import source

    def no_onnx():
        raise AssertionError("random weights must not need the ONNX file")

    pretrained = _state(load_model("offline:dinov2-s14").model) if offline.offline_dinov2_available() else None
    monkeypatch.setattr(source, "require_sources", no_onnx)
    loaded = load_model("offline:dinov2-s14@random")
    assert type(loaded.model) is Dinov2Model and (loaded.weights, loaded.note) == ("random", "")
    assert {k: getattr(loaded.model.config, k) for k in offline.OFFLINE_DINOV2_CONFIG} == offline.OFFLINE_DINOV2_CONFIG
    assert loaded.model.config._attn_implementation == "sdpa"
    random = _state(loaded.model)
    assert _same(random, _state(load_model("offline:dinov2-s14", random_init=True).model))  # seeded
    if pretrained is not None:
        assert random.keys() == pretrained.keys()
        changed = [k for k in random if not torch.equal(random[k], pretrained[k])]
        assert "embeddings.cls_token" in changed and len(changed) > len(random) // 2


def test_random_init_is_refused_where_it_cannot_apply(tmp_path):
    import timm

    from qkhooks import load_model

    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(QKHooksError, match="not to the VisionTransformer you built"):
        load_model(module, random_init=True)
    with pytest.raises(QKHooksError, match="not to the VisionTransformer you built"):
        load_model(module, checkpoint=tmp_path / "w.safetensors")
    with pytest.raises(QKHooksError, match="exclude each other"):
        load_model("timm:vit_tiny_patch16_224@random", checkpoint=tmp_path / "w.safetensors")
    assert load_model(module).weights == "as given"


def test_checkpoint_weights_are_named_and_the_run_config_says_what_was_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    from qkhooks import load_model, open_run, record_dataset

    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model("timm:vit_tiny_patch16_224", checkpoint=tmp_path / "w.safetensors")
    assert loaded.weights == f"checkpoint:{tmp_path / 'w.safetensors'}"
    assert _same(_state(loaded.model), _state(source))
    for model, expected in ((loaded, loaded.weights), ("timm:vit_tiny_patch16_224@random", "random")):
        out = tmp_path / f"{expected[:6]}.h5"
        record_dataset(model, "o3:1", out, modes="0", layers="0", progress=False)
        with open_run(out) as run:
            assert run.config["weights"] == expected
            assert run.config["random_init"] is (expected == "random")


# ------------------------------------------------------------------------------------------- user errors, with the fix

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The console command in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qkhooks", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _main(capsys, *args: str) -> tuple[int, str]:
    """The same command in this process (cheaper where only the message matters)."""
    from qkhooks.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


class _Payload:
    """Pickles as a call that would write ``marker``: proof of whether unpickling ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the checkpoint ran"))


def _unsafe_checkpoint(path: Path, marker: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({**state, "payload": _Payload(marker)}, path)


def test_hf_folder_without_weights_is_refused_with_the_fix(hf_config_dir):
    result = _cli("spectrum", f"hf:{hf_config_dir}")
    assert result.returncode == 2, result.stderr
    assert "has a config but no weights" in result.stderr and "--random-init" in result.stderr
    assert "Traceback" not in result.stderr


def test_remote_code_folder_is_refused_and_its_code_never_runs(tmp_path, capsys):
    folder, marker = tmp_path / "custom", tmp_path / "ran.txt"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "qkhooks_test_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", '
        '"AutoModel": "modeling_custom.CustomModel"}}'
    )
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    status, err = _main(capsys, "spectrum", f"hf:{folder}")
    assert status == 2 and "this folder's model needs its own code, which qkhooks never runs" in err
    assert not marker.exists()


def test_unsafe_pickles_are_refused_unopened(tmp_path, capsys):
    import timm
    import transformers

    marker = tmp_path / "ran.txt"
    folder = tmp_path / "hf-bin"
    config = transformers.ViTConfig(**TINY_VIT)
    config.save_pretrained(folder)
    _unsafe_checkpoint(folder / "pytorch_model.bin", marker, transformers.ViTModel(config).state_dict())
    status, err = _main(capsys, "spectrum", f"hf:{folder}")
    assert status == 2 and "refused to unpickle" in err and "pytorch_model.bin" in err and "safetensors" in err
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    _unsafe_checkpoint(tmp_path / "w.pth", marker, timm_model.state_dict())
    status, err = _main(capsys, "spectrum", "timm:vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "w.pth"))
    assert status == 2 and "refused to unpickle" in err and "w.pth" in err
    assert not marker.exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write to: chmod 555, or (root ignores permission bits) a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root ignores permission bits and no read-only tmpfs could be mounted: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_outputs_that_cannot_be_created_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = _cli("record", "timm:vit_tiny_patch16_224@random", "o3:2", "--out", str(blocker / "runs" / "r.h5"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot create the folder of --out {str(blocker / 'runs')!r}" in result.stderr


def test_writable_dir_checks_without_leaving_folders_unless_asked(tmp_path):
    from qkhooks.errors import writable_dir

    assert writable_dir(tmp_path / "a" / "b", "--out folder") == tmp_path / "a" / "b"
    assert os.listdir(tmp_path) == []  # checked through the nearest existing folder, nothing created
    writable_dir(tmp_path / "a" / "b", "--out folder", create=True)
    assert (tmp_path / "a" / "b").is_dir() and os.listdir(tmp_path / "a" / "b") == []  # no probe left either
    (tmp_path / "f").write_text("x")
    with pytest.raises(QKHooksError, match=r"cannot create the --out folder .*f/g.*is a file"):
        writable_dir(tmp_path / "f" / "g", "--out folder")


def test_every_writing_command_refuses_a_read_only_output(read_only_dir, hf_config_dir, capsys):
    model = f"hf:{hf_config_dir}@random"
    run = str(read_only_dir.parent / "missing.h5")  # never reached: the output folder is checked first
    commands = [
        ("record", model, "o3:2", "--out", f"{read_only_dir}/r.h5"),
        ("bfd", model, "o3:2", "--out", f"{read_only_dir}/b.h5"),
        ("analyze", "modes", run, "--out", str(read_only_dir)),
        ("analyze", "preference", run, "--out", str(read_only_dir)),
        ("analyze", "bfd", run, "--out", f"{read_only_dir}/sub"),
        ("demo", "--model", model, "--out", f"{read_only_dir}/report"),
        ("spectrum", model, "--json", f"{read_only_dir}/s.json"),
        ("spectrum", model, "--plot", f"{read_only_dir}/s.png"),
    ]
    for args in commands:
        status, err = _main(capsys, *args)
        assert status == 2 and str(read_only_dir) in err and "choose a folder you can write to" in err, (args, err)
    assert sorted(os.listdir(read_only_dir)) == []


# ------------------------------------------------------------------------------------------- skip reasons by id


def test_every_skip_in_the_run_file_is_named_by_its_relative_id(tmp_path):
    import timm

    from qkhooks import open_run, record_dataset

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # refused when opened
    late = folder / "sub" / "late.jpg"  # a valid header, the body cut: found only when decoded
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(late, quality=95)
    late.write_bytes(late.read_bytes()[:400])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.warns(UserWarning, match="skipping"):
        record_dataset(model, str(folder), tmp_path / "r.h5", layers="0", batch_size=2, reducers=[], progress=False)
    with open_run(tmp_path / "r.h5") as run:
        skipped = dict(run.skipped)
        assert run.ids == ["a.png", "sub/b.png"]
    assert sorted(skipped) == ["sub/broken.png", "sub/late.jpg"]
    assert "truncated" in skipped["sub/late.jpg"].lower()  # the decoder's own reason, matched by id


def test_ade20k_skips_are_named_like_ids(tmp_path):
    root = tmp_path / "ade"
    for split in ("training",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    for stem in ("ADE_1", "ADE_2"):
        Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "images/training" / f"{stem}.jpg")
    Image.fromarray(np.ones((20, 20), dtype=np.uint8)).save(root / "annotations/training/ADE_1.png")
    with pytest.warns(UserWarning, match="without a partner"):
        ds = open_dataset(f"ade20k:{root}", CFG)
    assert ds.ids == ["training/ADE_1.jpg"] and [i for i, _ in ds.skipped] == ["training/ADE_2.jpg"]


# ------------------------------------------------------------------------------ your own models (review 18)
def _dropout_vit(**kw) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=4, **kw)


SAME_THREE = [np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)] * 3


def test_record_dataset_records_in_eval_mode_and_hands_the_module_back_in_its_own_modes(tmp_path):
    """Review 18 (6, 7): a module in training mode came back in eval mode, and one put in training mode inside a
    LoadedModel recorded with dropout on (identical images, different maps). Now: eval for the recording, every
    submodule's own mode back afterwards, also when the recording fails."""
    from qkhooks import load_model, open_run, record_dataset

    model = _dropout_vit(drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3).train()
    model.blocks[0].norm1.eval()  # a caller's own mix (e.g. a frozen part) comes back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    record_dataset(model, SAME_THREE, tmp_path / "a.h5", modes=2, batch_size=3, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    loaded = load_model(_dropout_vit(attn_drop_rate=0.3, drop_path_rate=0.3))
    loaded.model.train()
    record_dataset(loaded, SAME_THREE, tmp_path / "b.h5", modes=2, attention="rows:1", batch_size=3, progress=False)
    assert loaded.model.training
    for name in ("a.h5", "b.h5"):
        with open_run(tmp_path / name) as run:
            q = np.asarray(run.query(1)[:], np.float32)
            assert np.array_equal(q[0], q[1]) and np.array_equal(q[1], q[2]), name
    with pytest.raises(QKHooksError, match="does not exist"):
        record_dataset(model, str(tmp_path / "no-such-folder"), tmp_path / "c.h5", progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_live_record_of_a_model_dropping_at_random_warns_naming_the_modules_and_the_fix():
    """Review 18 (6): qkhooks.record on a model in training mode with attention dropout said nothing."""
    import warnings

    import qkhooks

    model = _dropout_vit(attn_drop_rate=0.25, drop_path_rate=0.2).train()
    with pytest.warns(UserWarning, match=r"training mode with dropout .*blocks\.0\.attn\.attn_drop \(Dropout p=0\.25\)"
                                         r".*blocks\.1\.drop_path1 \(DropPath p=0\.2\).*model\.eval\(\)") as caught:
        with qkhooks.record(model, modes=2, attention="full"), torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert caught[0].filename == __file__  # names the caller's line
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with qkhooks.record(model, modes=2), torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    plain = _dropout_vit().train()  # training mode without any dropout: nothing random, nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with qkhooks.record(plain, modes=2), torch.no_grad():
            plain(torch.randn(1, 3, 32, 32))


def test_a_model_on_the_meta_device_is_refused_with_the_fix():
    """Review 18 (10): torch's raw 'Cannot copy out of meta tensor' from load_model and spectrum."""
    import qkhooks

    model = _dropout_vit().to("meta")  # built on the CPU: the oldest timm calls .item() while it builds
    for call in (lambda: qkhooks.load_model(model), lambda: qkhooks.spectrum(model), lambda: qkhooks.record(model)):
        with pytest.raises(QKHooksError, match=r"no weights: its tensors are on the 'meta' device .*to_empty"):
            call()
    buffered = _dropout_vit()  # real weights, one buffer on the meta device: refused, naming it
    buffered.blocks[1].register_buffer("table", torch.empty(3, device="meta"))
    with pytest.raises(QKHooksError, match=r"'meta' device \(e\.g\. blocks\.1\.table\)"):
        qkhooks.record(buffered)


def test_more_modes_than_a_head_has_are_recorded_as_all_and_the_config_says_how_many(tmp_path):
    """Review 18 (17): --modes 65 on 64-dim heads stored 64 modes under a config saying 65. The config now says
    what was kept (here 8 of 8-dim heads), with a warning; the same through record_dataset (which `qkhooks record`
    runs) and record()."""
    import qkhooks

    model = _dropout_vit().eval()
    with pytest.warns(UserWarning, match=r"modes=9 is more than this model has: its 8-dim heads have at most 8"):
        qkhooks.record_dataset(model, SAME_THREE, tmp_path / "m.h5", modes=9, progress=False)
    with qkhooks.open_run(tmp_path / "m.h5") as run:
        assert run.config["modes"] == 8 and run.array("modes/L0/query").shape[2] == 8
    with pytest.warns(UserWarning, match="modes=20 is more"):
        live = qkhooks.record(model, modes=20)
    assert live.config["modes"] == 8 and live.modes == 20
    assert qkhooks.record(model, modes=8).config["modes"] == 8  # as many as there are: nothing to say


def test_the_default_modes_are_cut_to_small_heads_silently_and_a_number_asked_for_with_a_warning(tmp_path):
    """Round 19: the default modes=16 on 8-dim heads (every tiny model) warned that 16 is more than the model has,
    though nobody asked for 16. The default is cut to the heads' 8 without a word, and the config says 8, through
    record(), record_dataset and the command line's parsed options; modes=16 asked for still warns."""
    import argparse
    import warnings

    import qkhooks
    from qkhooks.capture import modes_kept, parse_modes
    from qkhooks.options import RecordOptions

    model = _dropout_vit().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        live = qkhooks.record(model)
        qkhooks.record_dataset(model, SAME_THREE, tmp_path / "d.h5", progress=False)
    assert live.config["modes"] == 8 and live.qk_spectrum[0].num_modes == 8
    with qkhooks.open_run(tmp_path / "d.h5") as run:
        assert run.config["modes"] == 8 and run.array("modes/L0/query").shape[2] == 8
    with pytest.warns(UserWarning, match="modes=16 is more than this model has: its 8-dim heads have at most 8"):
        asked = qkhooks.record(model, modes=16)
    assert asked.config["modes"] == 8
    parser = argparse.ArgumentParser()
    RecordOptions.add_arguments(parser)
    for argv, warned in (((), False), (("--modes", "16"), True)):
        modes = parse_modes(RecordOptions.from_args(parser.parse_args(list(argv))).modes)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert modes_kept(modes, [8, 8], live.sites) == 8
        assert [str(w.message).startswith("modes=16 is more") for w in seen] == ([True] if warned else [])


def test_checkpoints_differing_only_in_the_head_or_a_wrapper_prefix_load(tmp_path):
    """Review 18 (14): a backbone checkpoint (no head), a 10-class fine-tune and a DDP 'module.' state dict were
    refused with 'Check the model name matches'. The head feeds no attention: they now load (said in a warning and in
    ``weights``); other mismatches name the keys by pattern."""
    import timm

    from qkhooks.models.load import load_checkpoint

    source = _dropout_vit(num_classes=10)
    state = source.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    torch.save(body, tmp_path / "headless.pth")
    torch.save(state, tmp_path / "ten.pth")
    torch.save({"module." + k: v for k, v in _dropout_vit().state_dict().items()}, tmp_path / "ddp.pth")
    for name, says in (("headless.pth", "has no classifier head"), ("ten.pth", r"another classifier head \(head.bias "
                                                                                r"\(10,\) vs \(1000,\)")):
        target = _dropout_vit(num_classes=1000)
        with pytest.warns(UserWarning, match=says + ".*the recorded maps are the checkpoint's"):
            load_checkpoint(target, tmp_path / name)
        mine = target.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in body.items())
    with pytest.warns(UserWarning, match="every key began with 'module.'"):
        load_checkpoint(_dropout_vit(), tmp_path / "ddp.pth")
    wider = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=64,
                              num_heads=4).state_dict()
    torch.save(wider, tmp_path / "wider.pth")
    with pytest.raises(QKHooksError, match=r"wrong shape: .*blocks\.N\.attn\.qkv\.weight \(x2\).*another width"):
        load_checkpoint(_dropout_vit(), tmp_path / "wider.pth")


def test_a_backbone_checkpoint_through_load_model_says_the_head_was_not_loaded(tmp_path):
    import timm

    from qkhooks import load_model

    shapes = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in shapes.items() if not k.startswith("head.")}
    torch.save(state, tmp_path / "headless.pth")
    with pytest.warns(UserWarning, match="has no classifier head"):
        loaded = load_model("timm:vit_tiny_patch16_224", checkpoint=tmp_path / "headless.pth")
    assert loaded.weights == f"checkpoint:{tmp_path / 'headless.pth'} (head not loaded)"
    assert torch.equal(loaded.model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])


def test_normalisation_statistics_on_the_0_255_scale_are_refused():
    """Review 18 (18): ImageConfig(mean=(123.7, ...)) was accepted, making every input about -2."""
    from qkhooks import load_model

    config = ImageConfig(size=(32, 32), mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))
    with pytest.raises(QKHooksError, match=r"0\.\.255 scale.*divide both by 255"):
        load_model(_dropout_vit(), image_config=config)
