"""Segmentation models on a supported ViT encoder (Mask2Former, MaskFormer), SAM's relative term in run files, and
one geometry probe per model and input shape. References are the models' own eager attention weights and tensors
taken with plain forward hooks, never qkhooks' own rebuild."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkhooks
from qkhooks.models.load import load_model
from qkhooks.models.unsupported import left_out_by_design
from qkhooks.store import open_run
from qkhooks.stream import record_dataset
from test_zoo import FAST_CASES, _ask_for_weights, perturb


def _case(name: str):
    case = next(c for c in FAST_CASES if c.name == name)
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _own_eager_weights(model: torch.nn.Module, sites: list, inputs: dict) -> list[torch.Tensor]:
    """Each site module's own eager attention weights, (B·nW, H, Nw, Nw), asked of the module itself (MaskFormer's
    wrapper does not pass output_attentions down, and its Swin model fails when asked for them)."""
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "_attn_implementation"):
            module.config._attn_implementation = "eager"
    seen: dict[int, torch.Tensor] = {}
    handles = [s.module.register_forward_pre_hook(_ask_for_weights, with_kwargs=True) for s in sites]
    handles += [s.module.register_forward_hook(lambda m, a, out, l=s.layer: seen.__setitem__(l, out[1].detach()))
                for s in sites]
    with torch.no_grad():
        try:
            model(**inputs)
        finally:
            list(map(torch.utils.hooks.RemovableHandle.remove, handles))
    return [seen[s.layer] for s in sites]


def test_mask2former_and_maskformer_record_their_swin_encoder_exactly_and_name_the_decoders_left_out():
    """Sites are the image encoder's windowed attentions only (the Swin patch-embedding conv, under an encoder named
    'swin', is no longer taken by the name guess); the full maps equal the backbone's own eager attention weights,
    window by window; the object-query decoders are named as left out by design; the outputs stay bit-identical."""
    for name, backbone_path in (("Mask2FormerForUniversalSegmentation", "model.pixel_level_module.encoder"),
                                ("MaskFormerForInstanceSegmentation", "model.pixel_level_module.encoder.model")):
        model, inputs = _case(name)
        sites = qkhooks.sites(model)
        assert [s.path.startswith(backbone_path + ".") for s in sites] == [True] * 4, [s.path for s in sites]
        aside = left_out_by_design(model)
        assert "model.transformer_module" in aside and "object queries" in aside["model.transformer_module"]
        with torch.no_grad():
            plain = model(**inputs).class_queries_logits
            with qkhooks.record(model, modes=None, attention="full") as rec:
                recorded = model(**inputs).class_queries_logits
        assert torch.equal(plain, recorded)
        want = _own_eager_weights(model, sites, inputs)
        for site, weights in zip(sites, want):
            got = rec.attention(site.layer, "full")  # (B, nW, H, Nw, Nw) in the model's window order
            assert got.shape[0] * got.shape[1] == weights.shape[0]
            torch.testing.assert_close(got.reshape(weights.shape), weights, atol=1e-5, rtol=0)


def test_sam_relative_term_is_stored_per_layer_as_the_live_recording_has_it(tmp_path):
    """record_dataset stores each SAM layer's query-dependent term (windowed and global blocks) next to its full maps;
    run.relative_term(l) equals the live recording's on the same images, and scale·q·k + the stored term, softmaxed,
    gives the stored maps (q, k from the model's own qkv output)."""
    model, _ = _case("samvit_base_patch16_224")
    loaded = load_model(model)
    qkv: list[torch.Tensor] = []
    attn = model.blocks[1].attn  # its qkv output computed from its input: record() refuses hooks on a q/k layer
    handle = attn.register_forward_pre_hook(lambda m, a: qkv.append(F.linear(a[0], attn.qkv.weight, attn.qkv.bias).detach()))
    live: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    try:
        record_dataset(loaded, "samples", tmp_path / "sam.h5", limit=4, batch_size=2, progress=False, dtype="float32",
                       modes=2, attention="full", reducers=[],
                       on_batch=lambda b: [live[l].append(b.relative_term(l).clone()) for l in live])
    finally:
        handle.remove()
    with open_run(tmp_path / "sam.h5") as run:
        assert run.relative_layers == [0, 1, 2] and "relative/L1" in run.arrays()
        for layer in live:
            stored = torch.as_tensor(run.relative_term(layer)[:])
            assert stored.shape == tuple(run.attention(layer, "full").shape)
            torch.testing.assert_close(stored, torch.cat(live[layer]), atol=0, rtol=0)
        # the global block 1: softmax(scale · q·kᵀ + term) from the model's own q and k is the stored full map
        attn = model.blocks[1].attn
        q, k = (torch.cat(qkv[-2:]).reshape(4, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[:2])
        logits = attn.scale * q @ k.transpose(-1, -2) + torch.as_tensor(run.relative_term(1)[:])
        torch.testing.assert_close(logits.softmax(-1), torch.as_tensor(run.attention(1, "full")[:]), atol=1e-5, rtol=0)
    with qkhooks.record(model, modes=None, attention="full") as rec, torch.no_grad():
        rec(torch.zeros(1, 3, 48, 48))
    assert rec.relative_layers == [0, 1, 2]


def _count_probes(monkeypatch) -> list[int]:
    """Counts the geometry probe's forwards (one blank image through the model)."""
    import qkhooks.stream as stream

    calls: list[int] = []
    real = stream._probe_forward
    monkeypatch.setattr(stream, "_probe_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.slow
def test_the_demo_probes_a_windowed_models_geometry_once_and_a_plain_vits_never(tmp_path, monkeypatch):
    """`make_report` asks for the geometry three times (rows layers, record_dataset, BFD): a Swin's is probed with one
    forward and reused; a plain ViT's comes from its patch embedding, and equals what a probe forward reads."""
    import timm

    from qkhooks.report import make_report
    from qkhooks.stream import _probe_forward, probe_geometry

    calls = _count_probes(monkeypatch)
    torch.manual_seed(0)
    swin = perturb(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, embed_dim=16,
                                     depths=(2, 2), num_heads=(2, 4), window_size=4))
    make_report(tmp_path / "swin", load_model(swin), photos=2, o3=3, objects=2, batch_size=4, progress=False)
    assert len(calls) == 1
    vit = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16, depth=2,
                                    embed_dim=32, num_heads=4))
    make_report(tmp_path / "vit", load_model(vit), photos=2, o3=3, objects=2, batch_size=4, progress=False)
    assert len(calls) == 1
    sites = qkhooks.sites(vit)
    assert probe_geometry(vit, sites, (64, 64)) == _probe_forward(vit, sites, (64, 64), "cpu", torch.float32)  # a real forward
