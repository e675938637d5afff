"""Attention rows of layers whose calls hold other tokens: one batch's query tokens must name the same tokens in every
layer whose rows are recorded (a pyramid's stages, a factorised video encoder's spatial and temporal layers)."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_zoo import FAST_CASES


def _case(name: str):
    case = next(c for c in FAST_CASES if c.name == name)
    return case.build().eval(), case.inputs()


def _rows_from_full(full: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) maps -> (B, H, T, N) rows of each image's tokens (B, T)."""
    return torch.stack([full[b][:, tokens[b]] for b in range(full.shape[0])])


def test_default_rows_across_a_pyramids_stages_are_refused_naming_both_layers_and_one_stage_is_exact():
    """PVT-v2: the default tokens (the centre patch of the first stage's 16x16 grid) index nothing of the next stage's
    8x8 grid; before, the second stage failed on the token's range, mid-forward, with no word of why. One stage's
    layers: the rows are the full maps' rows at the recorded default tokens."""
    model, inputs = _case("pvt_v2_b0")
    first_stage = [s.layer for s in qkhooks.sites(model) if s.stage == qkhooks.sites(model)[0].stage]
    with pytest.raises(QKHooksError, match=r"layer \d+ \(stages\.1\..*\) attends over \d+ images of \d+ tokens .* and "
                                           r"layer 0 \(stages\.0\..*\).*default query tokens .* first layer's grid"):
        with torch.no_grad(), qkhooks.record(model, modes=0, attention="rows") as rec:
            rec(**inputs)
    assert rec.images_seen == 0
    with torch.no_grad(), qkhooks.record(model, modes=0, layers=first_stage, attention=["rows", "full"]) as rec:
        rec(**inputs)
    tokens = rec.last.meta["query_tokens"]
    side = int(rec.attention(first_stage[0], "full").shape[-2] ** 0.5)  # queries (keys are spatially reduced)
    assert tokens[0].tolist() == [(side // 2) * side + side // 2] * 2  # no class token: the centre patch twice
    for layer in first_stage:
        torch.testing.assert_close(rec.attention(layer, "rows"), _rows_from_full(rec.attention(layer, "full"), tokens),
                                   atol=1e-6, rtol=0)


def test_chosen_tokens_valid_in_every_stage_are_kept_across_stages():
    """PiT keeps a class token in front of every stage: chosen token 0 names it in each, so rows of all stages are
    recorded, each the class token's row of that stage's full maps."""
    model, inputs = _case("pit_ti_224")
    batch = next(iter(inputs.values())).shape[0]
    tokens = torch.zeros(batch, 1, dtype=torch.long)
    with torch.no_grad(), qkhooks.record(model, modes=0, attention=["rows", "full"]) as rec:
        rec(**inputs, meta={"query_tokens": tokens})
    assert len({s.stage for s in rec.sites}) > 1
    for layer in rec.layers:
        torch.testing.assert_close(rec.attention(layer, "rows"), _rows_from_full(rec.attention(layer, "full"), tokens),
                                   atol=1e-6, rtol=0)


def test_default_rows_of_a_factorised_video_encoder_are_refused_across_its_spatial_and_temporal_layers():
    """VideoPrism: spatial layers attend over a frame's patches (clips x frames calls), temporal layers over a patch's
    frames (clips x patches calls): the default tokens of one cannot serve the other (before: a message about a
    'batch of 32 images' the user never gave, or, when the counts matched, the spatial centre used as a frame index
    without a word). The temporal layers alone are recorded."""
    model, inputs = _case("VideoPrismVisionModel")
    sites = qkhooks.sites(model)
    temporal = [s.layer for s in sites if getattr(s, "temporal", False)]
    assert temporal and len(temporal) < len(sites)
    with pytest.raises(QKHooksError, match=r"temporal_layers\.0\.attention\) attends over .* and layer 0 "
                                           r"\(spatial_layers\.0\.attention\)"):
        with torch.no_grad(), qkhooks.record(model, modes=0, attention="rows"):
            model(**inputs)
    with torch.no_grad(), qkhooks.record(model, modes=0, layers=temporal, attention=["rows", "full"]) as rec:
        model(**inputs)
    tokens = rec.last.meta["query_tokens"]
    for layer in temporal:
        full = rec.attention(layer, "full")
        assert full.shape[0] == tokens.shape[0]
        torch.testing.assert_close(rec.attention(layer, "rows"), _rows_from_full(full, tokens), atol=1e-6, rtol=0)


def test_default_rows_of_windowed_and_global_blocks_on_one_grid_are_kept_and_equal_the_full_maps_rows():
    """zoo13: the check compares the calls' query positions, not token counts. SAM's windowed block (4 windows of
    16 tokens) and its global block (64 tokens) both index the 8x8 grid; the old proxy (16 != 64 tokens) refused them.
    The centre patch's rows equal the full maps' rows: the global map's row 36, and the windowed map's row at the
    window written out here ((4, 4) is position 0 of window 3, whose keys are rows 4-7, columns 4-7 of the grid)."""
    import timm

    from test_zoo import perturb

    torch.manual_seed(0)
    model = perturb(timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, patch_size=8, embed_dim=32,
                                      depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                                      neck_chans=8)).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with qkhooks.record(model, modes=0, attention="rows") as rows, torch.no_grad():
        model(images)
    with qkhooks.record(model, modes=0, attention="full") as full, torch.no_grad():
        model(images)
    assert rows.last.meta["query_tokens"].tolist() == [[36, 36], [36, 36]]  # no prefix: the centre patch twice
    windowed = full.attention(0, "full")  # (B, nW, H, Nw, Nw)
    assert windowed.shape == (2, 4, 2, 16, 16)
    want = torch.zeros(2, 2, 8, 8)
    want[:, :, 4:, 4:] = windowed[:, 3, :, 0].reshape(2, 2, 4, 4)
    torch.testing.assert_close(rows.attention(0, "rows"), want.flatten(2)[:, :, None].expand(-1, -1, 2, -1), atol=0, rtol=0)
    torch.testing.assert_close(rows.attention(1, "rows"), _rows_from_full(full.attention(1, "full"), torch.tensor([[36, 36]] * 2)),
                               atol=1e-6, rtol=0)
