"""Round 11 (issue 20): the attention products read q, k and v in place, and rows come from the q/k hook.

On the CPU, with 128 tokens or more, ``scale·q·kᵀ`` and ``maps @ v`` run one product per head on the strided views of
the model's own Linear output (no contiguous copies of q, k, v), and a layer whose q/k hook runs anyway (modes or
full maps from q and k) takes its rows from the same q and k. The tiny models of the other tests have 17 tokens and
never take these paths, so here the models have 193 (a 12 x 16 grid, not square) and the references are the model's
own: its eager attention weights, its plain (fused) output, its eager forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import qkhooks
import qkhooks.attention
from conftest import Tiny, _hf, _key_first, _timm, eager_attention
from test_full_once import _eager_forward, _tiny_call
from test_zoo import perturb

LONG = [
    Tiny("timm-vit-12x16", _timm("vit_tiny_patch16_224", img_size=(48, 64), patch_size=4), (48, 64), 1, "timm", (12, 16)),
    Tiny("hf-vit-12x16-key-first", _key_first(_hf("ViTModel", "ViTConfig", qkv_bias=True, image_size=(48, 64),
                                                  patch_size=4)), (48, 64), 1, "hf", (12, 16)),
    Tiny("hf-siglip-12x16", _hf("SiglipVisionModel", "SiglipVisionConfig", image_size=48, patch_size=4), 48, 0, "hf",
         (12, 12)),
]


def _built(tiny: Tiny) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny.model().eval()
    perturb(model)  # non-zero q/k/v biases everywhere
    return model, tiny.images()


def _picked_rows(maps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.stack([maps[b][:, tokens[b]] for b in range(len(tokens))])


@pytest.mark.parametrize("tiny", LONG, ids=lambda t: t.name)
def test_long_sequences_keep_bit_identical_outputs_and_full_maps_and_rows_equal_eager_attention(tiny: Tiny):
    model, images = _built(tiny)
    call = _tiny_call(tiny, model, images)
    plain, want_maps = call(), eager_attention(tiny, model, images)
    assert want_maps[0].shape[-1] >= 128  # the per-head products' path
    with qkhooks.record(model, modes="all", attention="rows+full") as run:
        out = call()
    assert torch.equal(out, plain)
    tokens = run.last.meta["query_tokens"]
    for layer, want in enumerate(want_maps):
        assert float((run.attention(layer, "full") - want).abs().max()) < 1e-5
        assert float((run.attention(layer, "rows") - _picked_rows(want, tokens)).abs().max()) < 1e-5


@pytest.mark.parametrize("tiny", LONG, ids=lambda t: t.name)
def test_long_sequences_attended_once_equal_the_eager_forward_and_its_maps(tiny: Tiny):
    model, images = _built(tiny)
    call = _tiny_call(tiny, model, images)
    want_out, want_maps = _eager_forward(model, tiny.kind, call), eager_attention(tiny, model, images)
    with qkhooks.record(model, modes=None, attention="full", outputs="eager") as run:
        out = call()
    assert float((out - want_out).abs().max()) < 1e-5
    for layer, want in enumerate(want_maps):
        assert float((run.attention(layer, "full") - want).abs().max()) < 1e-5


@pytest.mark.parametrize("tiny", LONG[:2], ids=lambda t: t.name)
def test_rows_come_from_the_qk_hook_when_it_runs_and_equal_the_rows_from_x(tiny: Tiny, monkeypatch: Any):
    """With modes from q and k the rows are read off the same q and k (no second q projection from x: the x path's
    row logits are never computed); without modes they come from x. Both equal the model's eager rows."""
    model, images = _built(tiny)
    call = _tiny_call(tiny, model, images)
    want_maps = eager_attention(tiny, model, images)
    calls = {"x": 0}
    row_logits = qkhooks.attention._row_logits

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["x"] += 1
        return row_logits(*args, **kwargs)

    monkeypatch.setattr(qkhooks.attention, "_row_logits", counted)
    for modes, x_calls in (("all", 0), (None, len(want_maps))):
        calls["x"] = 0
        with qkhooks.record(model, modes=modes, attention="rows") as run:
            call()
        assert calls["x"] == x_calls
        assert run.mode_source == ({layer: "qk" for layer in run.layers} if modes else {})
        tokens = run.last.meta["query_tokens"]
        for layer, want in enumerate(want_maps):
            assert float((run.attention(layer, "rows") - _picked_rows(want, tokens)).abs().max()) < 1e-5


def test_the_geometry_probe_of_a_partial_recording_covers_every_site_skip_unmodelled_finds():
    """One probe forward serves any selection: for a model recorded with ``skip_unmodelled`` (DaViT: channel blocks
    left out) the probe takes all the sites that search finds, not only the selection given."""
    from qkhooks.capture import model_sites
    from qkhooks.stream import _every_site
    from test_partial_forms import _davit

    model = _davit()
    every = model_sites(model, True)
    assert len(every) > 1
    assert [(s.layer, s.path) for s in _every_site(model, every[:1])] == [(s.layer, s.path) for s in every]
