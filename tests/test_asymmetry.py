"""Checks run on the fixtures built to expose asymmetry (see conftest): a rows x cols patch grid with rows != cols,
a timm data config with mean != std. Each reference is computed here from the image geometry or by timm itself,
so swapping height and width, or mean and std, anywhere in qkhooks fails a test. (The key-before-query model
runs through every exactness check of test_core via the ``tiny`` fixture.)"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

import qkhooks
from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
from qkhooks.data import ImageConfig
from conftest import ASYMMETRIC, ASYMMETRIC_DATA_CONFIG, Tiny, eager_attention

asymmetric = pytest.mark.parametrize("tiny", ASYMMETRIC, ids=lambda t: t.name)


def centre_patch_token(tiny: Tiny) -> int:
    """The token of the patch that holds the image's centre pixel, from pixel geometry alone."""
    (height, width), (rows, cols) = tiny.hw, tiny.grid
    patch_h, patch_w = height // rows, width // cols
    return tiny.prefix + (height // 2 // patch_h) * cols + (width // 2 // patch_w)


def run(tiny: Tiny, recording, images: torch.Tensor, **meta):
    return recording(images, meta=meta) if tiny.kind == "timm" else recording(pixel_values=images, meta=meta)


def test_the_fixtures_are_asymmetric():
    """The premise of this file: the grids are not square and the timm model's mean is not its std."""
    assert {t.kind for t in ASYMMETRIC} == {"timm", "hf"}
    assert all(t.grid[0] != t.grid[1] and t.hw[0] != t.hw[1] for t in ASYMMETRIC)
    model = next(t for t in ASYMMETRIC if t.kind == "timm").model()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert all(m != s for m, s in zip(cfg["mean"], cfg["std"])) and len(set(cfg["mean"])) == 3


@asymmetric
def test_default_query_tokens_are_cls_and_the_centre_patch_of_a_rows_by_cols_grid(tiny: Tiny):
    model, images = tiny.model(), tiny.images()
    assert [s.grid for s in qkhooks.sites(model)] == [tiny.grid, tiny.grid]
    centre = centre_patch_token(tiny)
    with qkhooks.record(model, modes=None, attention="rows") as recording, torch.no_grad():
        run(tiny, recording, images)
    assert recording.last.arrays()["attention/query_tokens"].tolist() == [[0, centre]] * len(images)
    eager = eager_attention(tiny, model, images)
    for layer, ref in enumerate(eager):
        torch.testing.assert_close(recording.attention_maps("rows")[layer], ref[:, :, [0, centre]], atol=1e-5, rtol=1e-4)


@asymmetric
@pytest.mark.parametrize("grid_from", ["argument", "batch meta"])
def test_anisotropy_takes_the_centre_patch_of_a_rows_by_cols_grid(tiny: Tiny, grid_from: str):
    model = tiny.model()
    reducer = AnisotropyReducer(grid=tiny.grid) if grid_from == "argument" else AnisotropyReducer()
    meta = {"grid": tiny.grid} if grid_from == "batch meta" else {}
    tokens = []
    with qkhooks.record(model, modes=None, keep_inputs=True, sinks=[reducer]) as recording, torch.no_grad():
        for seed in (1, 2):
            run(tiny, recording, tiny.images(3, seed), **meta)
            tokens.append(recording.inputs[1].clone())
    centre = centre_patch_token(tiny)
    assert reducer.centre_token(tiny.prefix + tiny.grid[0] * tiny.grid[1], meta) == centre
    z = torch.cat(tokens)[:, centre].double().numpy()
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    pairs = z @ z.T
    expected = (pairs.sum() - np.trace(pairs)) / (len(z) * (len(z) - 1))
    assert reducer.baselines()[1] == pytest.approx(expected, abs=1e-9)


def test_timm_preprocessing_with_mean_not_std_is_bit_identical_to_timm():
    tiny = next(t for t in ASYMMETRIC if t.kind == "timm")
    model = tiny.model()
    ours = ImageConfig.from_timm(model)
    assert ours.size == tiny.hw
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    photos = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.astronaut()[:301, :457])]
    for photo in photos:
        mine, reference = ours(photo), theirs(photo.convert("RGB"))
        assert mine.shape == (3, *tiny.hw)
        assert torch.equal(mine, reference)
    # the same pixels normalised by hand: (x - mean) / std per channel, so the check does not rest on timm alone
    flat = Image.new("RGB", tiny.hw[::-1], (51, 102, 204))
    x = ours.normalize(flat)
    for channel, value in enumerate((51, 102, 204)):
        expected = (value / 255 - ASYMMETRIC_DATA_CONFIG["mean"][channel]) / ASYMMETRIC_DATA_CONFIG["std"][channel]
        assert float(x[channel].mean()) == pytest.approx(expected, rel=1e-6)


@asymmetric
def test_sinks_of_a_plain_recording_learn_the_prefix_and_grid_of_a_rows_by_cols_grid(tiny: Tiny):
    """1 CLS + 4 x 6 patches is 25 tokens, which a reducer left to guess would take for a 5 x 5 grid without CLS."""
    model = tiny.model()
    topk = TopKModes(k=2)
    with qkhooks.record(model, modes=4, sinks=[topk]) as recording, torch.no_grad():
        run(tiny, recording, tiny.images(3))
    assert recording.last.meta["num_prefix_tokens"] == tiny.prefix and tuple(recording.last.meta["grid"]) == tiny.grid
    assert topk.num_prefix_tokens == tiny.prefix
