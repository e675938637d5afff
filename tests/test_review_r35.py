"""Round 35's review findings, each a test that fails on the code before its fix."""

from __future__ import annotations

import pytest
import timm
import torch

import qkhooks
from test_zoo import SMALL_VIT, _call, eager_maps, perturb


def test_parallel_things_blocks_are_one_stage_and_record_rows_with_the_default_query_tokens():
    """timm's 18x2 ViTs run two attentions side by side in each block (``blocks.1.attns.0.attn``). Each block's branch
    list was taken for a stage of its own, so rows with the default query tokens were refused as if the blocks had
    different grids (review r35 A). They are one stage, ``blocks``, and the rows equal the eager maps' rows."""
    model = perturb(timm.create_model("vit_small_patch16_18x2_224", pretrained=False, **{**SMALL_VIT, "img_size": 48}))
    inputs = {"x": torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))}
    sites = qkhooks.sites(model)
    assert [s.path for s in sites] == [f"blocks.{b}.attns.{a}.attn" for b in range(2) for a in range(2)]
    assert {s.stage for s in sites} == {"blocks"}
    want = eager_maps(model, sites, inputs, "timm")
    with qkhooks.record(model, modes=None, attention="rows") as run:
        _call(model, inputs)
    tokens = run.last.meta["query_tokens"]
    assert tokens.tolist() == [[0, 1 + 3 * 6 + 3]] * 2  # the class token and the centre of the 6x6 grid
    for layer, maps in enumerate(want):
        picked = torch.stack([maps[b][:, tokens[b]] for b in range(2)])
        assert float((run.attention(layer, "rows") - picked).abs().max()) < 1e-5


def test_stages_of_a_multi_stage_model_stay_apart():
    """The parallel-block rule does not merge real stages: PiT's transformers keep a stage each."""
    model = timm.create_model("pit_ti_224", pretrained=False, img_size=64)
    stages = [s.stage for s in qkhooks.sites(model)]
    assert len(set(stages)) == 3 and stages == sorted(stages)


@pytest.mark.parametrize("name, size", [("vit_tiny_patch16_224", 32), ("vit_tiny_patch16_224", 96),
                                        ("beitv2_base_patch16_224", 32)])
def test_a_float64_models_rebuilt_maps_and_rows_are_float64_like_its_eager_attention(name, size):
    """A float64 model's full maps and rows rebuilt beside its fused kernel (the default outputs) were a float32
    softmax, ~2e-9 from its own float64 eager maps, while ``outputs="eager"`` kept float64 (review r35 A). They now
    stay float64: at 17 and at 145 tokens (the per-image pass), and with a relative position bias (BEiT)."""
    model = perturb(timm.create_model(name, pretrained=False, **{**SMALL_VIT, "img_size": size})).double()
    inputs = {"x": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)}
    sites = qkhooks.sites(model)
    want = eager_maps(model, sites, inputs, "timm")
    with qkhooks.record(model, modes=None, attention="rows+full") as run:
        _call(model, inputs)
    tokens = run.last.meta["query_tokens"]
    for layer, maps in enumerate(want):
        assert maps.dtype == torch.float64
        full, rows = run.attention(layer, "full"), run.attention(layer, "rows")
        assert full.dtype == rows.dtype == torch.float64
        assert float((full - maps).abs().max()) < 1e-12
        picked = torch.stack([maps[b][:, tokens[b]] for b in range(2)])
        assert float((rows - picked).abs().max()) < 1e-12
