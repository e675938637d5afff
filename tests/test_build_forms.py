"""zoo11-build: models the zoo could not build or refused for reasons not about their attention form, checked against
references taken in the test (the model's eager attention weights, q·k written out here), never qkhooks' own rebuild."""

from __future__ import annotations

import torch

import qkhooks
from test_zoo import FAST_CASES, _call, eager_maps, perturb


def _case(name: str):
    case = next(c for c in FAST_CASES if c.name == name)
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _rms(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)


def test_sapiens2_maps_are_its_eager_weights_and_the_normalised_form_rebuilds_q_hat_k_hat_on_grouped_keys():
    """Sapiens2: per-head RMSNorm on q and k (written out here), grouped-query keys in the middle layer; the full maps
    are the model's eager attention, the exact normalised form rebuilds q̂·k̂ before the rotation."""
    from qkhooks.models.qknorm import normalised_form

    model, inputs = _case("Sapiens2Backbone")
    sites = qkhooks.sites(model)
    assert [s.module.k_proj.out_features for s in sites] == [32, 16, 32]  # the middle layer: 2 key heads of 8
    seen: dict[int, torch.Tensor] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, kw, i=s.layer: seen.__setitem__(i, kw.get(
        "hidden_states", a[0] if a else None)), with_kwargs=True) for s in sites]
    _call(model, inputs)
    for h in handles:
        h.remove()
    want = eager_maps(model, sites, inputs, "hf")
    with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
        run(**inputs)
    for site, eager in zip(sites, want):
        got = run.attention_maps("full")[site.layer]
        assert got.shape == eager.shape and float((got - eager).abs().max()) < 1e-5, site.path
        m, x = site.module, seen[site.layer].detach().double()
        q = torch.nn.functional.linear(x, m.q_proj.weight.detach().double(), m.q_proj.bias.detach().double()).unflatten(-1, (4, 8))
        k = torch.nn.functional.linear(x, m.k_proj.weight.detach().double(), m.k_proj.bias.detach().double()).unflatten(-1, (-1, 8))
        q_hat = _rms(q, m.q_norm.weight.detach().double(), m.q_norm.variance_epsilon).transpose(1, 2)
        k_hat = _rms(k, m.k_norm.weight.detach().double(), m.k_norm.variance_epsilon).transpose(1, 2)
        k_hat = k_hat.repeat_interleave(4 // k_hat.shape[1], dim=1)  # key head g serves query heads 2g, 2g + 1
        direct = q_hat @ k_hat.transpose(-1, -2)
        rebuilt = normalised_form(site).logits(seen[site.layer])
        assert float((rebuilt - direct).abs().max() / direct.abs().max()) < 1e-6, site.path


def test_vlm_towers_are_recorded_and_their_language_models_left_out_by_design_named():
    """AyaVision / Cohere2Vision / Granite4Vision: the sites are the vision tower's, the output of the whole model is
    unchanged under record(), and the language model (Granite4Vision: also its Q-Formers) is named as left out."""
    from qkhooks.models.unsupported import left_out_by_design

    for name, aside in (("AyaVisionModel", {"language_model"}), ("Cohere2VisionModel", {"language_model"}),
                        ("Granite4VisionModel", {"language_model", "layerwise_projectors.0.qformer"})):
        model, inputs = _case(name)
        sites = qkhooks.sites(model)
        assert sites and all(s.path.startswith("vision_tower.") for s in sites), name
        named = left_out_by_design(model)
        assert aside <= set(named) and all("left out by design" in why for why in named.values()), (name, named)
        plain = _call(model, inputs).last_hidden_state
        with qkhooks.record(model, modes=None, attention="full") as run:
            out = _call(model, inputs).last_hidden_state
        assert torch.equal(out, plain) and len(run.attention_maps("full")) == len(sites)


def test_volo_plain_and_class_attention_are_softmax_q_k_written_out_and_the_outlooker_is_named():
    """VOLO, partially: the transformer blocks' maps on their NHWC grid and the class blocks' (B, H, 1, N) maps equal
    softmax(scale · q·k) from the modules' own qkv / q + kv weights on the tokens each module received; the outlook
    attention is left out, named with its reason."""
    model, inputs = _case("volo_d1_224-partial")
    sites = qkhooks.sites(model, skip_unmodelled=True)
    seen: dict[int, torch.Tensor] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, i=s.layer: seen.__setitem__(i, a[0])) for s in sites]
    _call(model, inputs)
    for h in handles:
        h.remove()
    with qkhooks.record(model, modes=None, attention="full", skip_unmodelled=True) as run, torch.no_grad():
        run(**inputs)
    assert list(run.left_out) == ["network.0.0.attn"] and "outlook attention" in run.left_out["network.0.0.attn"]
    assert [type(s.module).__name__ for s in sites] == ["Attention"] * 3 + ["ClassAttention"] * 2
    with torch.no_grad():
        for site in sites:
            m, x = site.module, seen[site.layer].flatten(1, -2)  # (B, h, w, C) grids row by row
            if hasattr(m, "qkv"):
                q, k = m.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)[:2]
            else:
                q = m.q(x[:, :1]).unflatten(-1, (2, -1)).transpose(1, 2)
                k = m.kv(x).unflatten(-1, (2, 2, -1)).permute(2, 0, 3, 1, 4)[0]
            want = (q @ k.transpose(-1, -2) * m.scale).softmax(-1)
            got = run.attention(site.layer, "full")
            assert got.shape == want.shape and float((got - want).abs().max()) < 1e-5, site.path


def test_minicpm_merger_maps_are_each_2x2_windows_softmax_q_k_in_forward_order():
    """MiniCPM-V 4.7's window-attention merger runs between encoder layers 0 and 1: its site is layer 1, and its maps
    are one softmax(scale · q·k) per window of 4 tokens, q and k from its own q_proj / k_proj on the tokens it received
    (already in window order), written out here per window."""
    model, inputs = _case("MiniCPMV4_7VisionModel")
    sites = qkhooks.sites(model)
    assert [s.path for s in sites] == ["encoder.layers.0.self_attn", "vit_merger.self_attn", "encoder.layers.1.self_attn"]
    merger = sites[1].module
    seen = {}
    handle = merger.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    _call(model, inputs)
    handle.remove()
    with qkhooks.record(model, modes=None, attention="full") as run, torch.no_grad():
        run(**inputs)
    x, bounds = seen["hidden_states"][0], seen["cu_seqlens"].tolist()
    assert len(bounds) - 1 == (4 * 6 + 2 * 4) // 4  # the two images' 2x2 windows
    with torch.no_grad():
        q = merger.q_proj(x).unflatten(-1, (4, -1)).transpose(0, 1)  # (H, N, d_k)
        k = merger.k_proj(x).unflatten(-1, (4, -1)).transpose(0, 1)
        want = torch.stack([(q[:, a:b] @ k[:, a:b].transpose(-1, -2) * merger.scaling).softmax(-1)
                            for a, b in zip(bounds, bounds[1:])])
    got = run.attention(1, "full")
    assert got.shape == want.shape == (8, 4, 4, 4) and float((got - want).abs().max()) < 1e-5


def test_lfm3_vl_attention_layers_are_softmax_of_normed_rotated_grouped_q_k_and_its_short_convs_no_attention():
    """LFM3-VL: the two attention layers are sites, the gated short convolutions are neither sites nor left out (no
    attention: qkhooks.models.unsupported.NOT_ATTENTION); each map is, per image, softmax(scale · q̂·k̂) with q̂, k̂ the
    RMS-normed (written out here), model-rotated q and k, each key head serving two query heads."""
    from transformers.models.lfm3_vl.modeling_lfm3_vl import apply_rotary_pos_emb_vision

    from qkhooks.models.unsupported import attention_like

    model, inputs = _case("Lfm3VlVisionModel")
    sites = qkhooks.sites(model)
    assert [s.path for s in sites] == ["layers.1.self_attn", "layers.3.self_attn"]
    assert not [n for n, _ in attention_like(model) if n.endswith(".conv")]
    seen: dict[int, dict] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, kw, i=s.layer: seen.__setitem__(i, dict(kw)), with_kwargs=True)
               for s in sites]
    _call(model, inputs)
    for h in handles:
        h.remove()
    with qkhooks.record(model, modes=None, attention="full") as run, torch.no_grad():
        run(**inputs)
    with torch.no_grad():
        for site in sites:
            m, call = site.module, seen[site.layer]
            x, bounds = call["hidden_states"], call["cu_seqlens"].tolist()
            q = _rms(m.q_proj(x).unflatten(-1, (4, -1)), m.q_norm.weight, m.q_norm.variance_epsilon)
            k = _rms(m.k_proj(x).unflatten(-1, (2, -1)), m.k_norm.weight, m.k_norm.variance_epsilon)
            q, k = apply_rotary_pos_emb_vision(q, k, *call["position_embeddings"])  # (N, H, d_k), the model's rotation
            q, k = q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, dim=0)
            got = run.attention(site.layer, "full")
            for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
                want = (q[:, a:b] @ k[:, a:b].transpose(-1, -2) * m.scaling).softmax(-1)
                assert float((got[s, :, : b - a, : b - a] - want).abs().max()) < 1e-5, (site.path, s)


def test_no_site_or_analysis_guesses_a_square_grid_on_a_non_square_input():
    """64 patch tokens of a 128x32 image are 16x4, which the old square fallback read as 8x8: the dynamic-size ViT's
    site reads the 16x4 grid its patch embed made (zoo12) and refuses any other count naming its layer, a module handed
    an NHWC grid (VOLO) gives the call's own 4x6 grid, and analysis.geometry.grid_of takes only a grid that fits."""
    import pytest
    import timm
    from timm.models.volo import VOLO

    from qkhooks import QKHooksError
    from qkhooks.analysis.geometry import grid_of

    torch.manual_seed(0)
    vit = perturb(timm.create_model("vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=4, img_size=32, patch_size=8,
                                    dynamic_img_size=True))
    with qkhooks.record(vit, modes=2) as run, torch.no_grad():
        run(torch.randn(2, 3, 128, 32))
        assert run.sites[0].grid_for(65) == (16, 4)  # CLS + the 16x4 patches of the call
        with pytest.raises(QKHooksError, match=r"layer 0 \(blocks.0.attn\): this call's grid is 16x4 \(64 patches\), "
                                               r"but 63 tokens follow .* never assumed"):
            run.sites[0].grid_for(64)
    assert tuple(run.geometry(0).grid) == (16, 4)
    volo = perturb(VOLO(layers=(1, 1, 1, 1), img_size=(64, 96), embed_dims=(32, 64, 64, 64), num_heads=(2, 2, 2, 2),
                        num_classes=10))
    with qkhooks.record(volo, modes=2, skip_unmodelled=True) as run, torch.no_grad():
        run(torch.randn(2, 3, 64, 96))
        assert tuple(run.geometry(0).grid) == (4, 6)
    with pytest.raises(QKHooksError, match="layer 3: 16 patch tokens"):
        grid_of(16, None, layer=3)
    assert grid_of(16, (8, 2)) == (8, 2)
