"""Review rev42 (round 42): the library changes of round 42 other than the torchvision adapter."""

from __future__ import annotations

import pytest

import qkhooks
from test_spectrum_edits_and_dataparallel import _tiny_loaded
from test_limit_extension_and_stamps import _EXT_KW, _PHOTOS, _as_found, photos  # noqa: F401  (photos: a fixture)
from test_torchvision_vit import hub  # noqa: F401  (a fixture)


def _items(folder):
    """The photos as a generator of items (a stream that names no items before decoding), p02 unreadable."""
    from PIL import Image

    for name in _PHOTOS:
        yield {"image": b"not an image" if name == "p02.png" else Image.open(folder / name).convert("RGB"), "id": name}


def test_a_stream_read_past_a_lower_limit_is_refused_though_it_holds_no_more_images(tmp_path, photos):  # noqa: F811
    """A stream's limit counts items: a run of --limit 6 with one unreadable item holds 5 images and has read 6 items.
    Before: --limit 5 was taken (5 images held), and the run finished as a --limit 5 run holding p05.png, the 6th item,
    which one run of --limit 5 never reads."""
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    with pytest.warns(UserWarning):
        qkhooks.record_dataset(loaded, _items(photos), out=out, limit=6, **_EXT_KW)
    with qkhooks.open_run(out) as run:
        assert run.ids == ["p00.png", "p01.png", "p03.png", "p04.png", "p05.png"]
    before, raw = _as_found(out), out.read_bytes()
    with pytest.raises(qkhooks.QKHooksError, match=r"--limit 5: it was recorded with --limit 6 and has read 6 items "
                                                   r"of the data \(5 images and 1 unreadable item skipped\).*"
                                                   r"--limit 6 or more"):
        qkhooks.record_dataset(loaded, _items(photos), out=out, limit=5, resume=True, **_EXT_KW)
    assert _as_found(out) == before and out.read_bytes() == raw
    # the limit it has read to is still taken: the same run
    qkhooks.record_dataset(loaded, _items(photos), out=out, limit=6, resume=True, **_EXT_KW)
    with qkhooks.open_run(out) as run:
        assert run.config["limit"] == 6 and len(run.ids) == 5 and run.complete


# ------------------------------------------------------------------ a weights file that is no torch checkpoint
def test_a_refused_unpickle_names_torchs_own_reason_not_its_documentation_link(tmp_path):
    """Before: the detail was torch's last line, since torch 2.6 "Check the documentation of torch.load ...", in both
    the damaged and the foreign case; the line that says what was refused is the one with "Unsupported"."""
    import timm

    from qkhooks.models.load import load_checkpoint

    path = tmp_path / "w.pth"
    path.write_text("<html><body>404 Not Found</body></html>\n")
    with pytest.raises(qkhooks.QKHooksError) as err:
        load_checkpoint(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1), path)
    assert "(Unsupported operand 60)" in str(err.value) and "Check the documentation" not in str(err.value)


@pytest.mark.parametrize("kind", ["cut", "html"])
def test_a_damaged_torchvision_cache_file_is_named_with_torchvisions_fix(hub, monkeypatch, kind):  # noqa: F811
    """Before: a cut copy in the torch hub cache (the README's own example) was told to "give a .safetensors file or a
    state_dict saved with torch.save", which a torchvision: spec cannot take; an HTML page to convert it to safetensors.
    The fix is to delete the file (it is downloaded again) or to put torchvision's file there."""
    import torch

    from test_torchvision_vit import _tiny_builder, tiny

    _tiny_builder(monkeypatch)
    hub.mkdir(parents=True)
    path = hub / "vit_b_16-c867db91.pth"
    if kind == "cut":
        torch.save(tiny(num_classes=1000).state_dict(), path)
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_text("<html><body>404 Not Found</body></html>\n")
    with pytest.raises(qkhooks.QKHooksError) as err:
        qkhooks.load_model("torchvision:vit_b_16")
    msg = str(err.value)
    assert f"the weights of torchvision:vit_b_16 in the torch hub cache ({path})" in msg and "Delete it" in msg
    assert "https://download.pytorch.org/models/vit_b_16-c867db91.pth" in msg and "safetensors" not in msg
    assert ("PytorchStreamReader" if kind == "cut" else "UnpicklingError: Unsupported operand 60") in msg


def test_a_lower_limit_on_a_file_without_an_image_count_is_refused_as_no_run(tmp_path, photos):  # noqa: F811
    """Before: "it was recorded with --limit 6 and holds None images, more than 4 ... resume with --limit None or
    more"; a larger limit on the same file was refused as no qkhooks run, which it is."""
    import h5py

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=6, **_EXT_KW)
    with h5py.File(out, "a") as f:
        for holder in (f["images"], f["images/ids"]):
            del holder.attrs["committed"]
    raw = out.read_bytes()
    for limit in (4, 8):
        with pytest.raises(qkhooks.QKHooksError, match="it is not a qkhooks run file") as err:
            qkhooks.record_dataset(loaded, str(photos), out=out, limit=limit, resume=True, **_EXT_KW)
        assert "None" not in str(err.value) and out.read_bytes() == raw


# ------------------------------------------------------------------ a bend the curve never came to
def _curve(columns, seed=0, n=12):
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.column_stack([mean + sd * rng.standard_normal(n) for mean, sd in columns])


def test_no_bend_is_named_where_the_curve_never_came_down_to_the_inner_extreme():
    """Three layers whose means rise throughout (0.31, 0.35, 0.45), the first one noisy, so the trend's interval holds 0
    while the last layer is clearly above L1. Before: "Of the inner layers (L1–L1) it is lowest at L1 (0.347) and rises
    again to 0.449": a bend where the curve never fell (L0 is lower than L1)."""
    import numpy as np

    from qkhooks.readings import trend_reading

    x = _curve([(0.3, 0.3), (0.35, 0.01), (0.45, 0.01)])
    mean = np.nanmean(x, 0)
    assert mean[0] < mean[1] < mean[2]  # the means rise at every layer: no dip to name
    r = trend_reading(x, [0, 1, 2], "share", "images")
    assert r.verdict == "flat" and "lowest" not in r.text and "rises again" not in r.text
    assert "last_minus_minimum" not in r.estimates


def test_a_dip_after_a_lower_first_layer_is_still_named_as_the_inner_layers_minimum():
    """The round's case stays: L0 below everything, the curve up at L1-L2, down to L3 and up again at the last layer."""
    import numpy as np

    from qkhooks.readings import trend_reading

    x = _curve([(0.2, 0.4), (0.5, 0.01), (0.45, 0.01), (0.3, 0.01), (0.4, 0.01), (0.45, 0.01)])
    mean = np.nanmean(x, 0)
    assert mean[0] < mean[3] == mean[1:5].min()
    r = trend_reading(x, list(range(6)), "share", "images")
    assert r.verdict != "rises" and f"Of the inner layers (L1–L4) it is lowest at L3 ({mean[3]:.3f}) and rises again" in r.text


def test_only_torchvisions_vit_is_pointed_at_torchvision_specs():
    """Before: a torchvision ResNet without an image_config was told that load_model('torchvision:NAME[.WEIGHTS]')
    reads its preprocessing; that spec refuses every torchvision model but its ViTs."""
    import torchvision

    with pytest.raises(qkhooks.QKHooksError) as err:
        qkhooks.load_model(torchvision.models.resnet18())
    assert str(err.value).endswith("with your model's values.") and "torchvision:" not in str(err.value)
    with pytest.raises(qkhooks.QKHooksError, match="torchvision:NAME"):
        qkhooks.load_model(torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                                hidden_dim=8, mlp_dim=16))
