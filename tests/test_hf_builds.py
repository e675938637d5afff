"""HF vision models the zoo could not build small before (EoMT-DINOv3, *Backbone wrappers, DepthPro, video ViTs):
recorded exactly against references taken in the test, never qkhooks' own rebuild: the models' eager attention
weights, and softmax(scale · q·k + mask) with q, k from the modules' own Linear layers on the tokens a plain forward
hook saw, RoPE through the model's own rotation function."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from test_zoo import FAST_CASES, HF_SMALL, _call, _first_tensor, eager_maps, perturb


def _case(name: str):
    case = next(c for c in FAST_CASES if c.name == name)
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _calls(model: torch.nn.Module, sites: list, inputs: dict) -> dict[int, tuple[tuple, dict]]:
    """Each site module's call (args, kwargs) in a plain forward, taken with plain hooks."""
    seen: dict[int, tuple[tuple, dict]] = {}

    def keep(layer: int):
        return lambda module, args, kwargs: seen.__setitem__(layer, (args, dict(kwargs)))

    handles = [s.module.register_forward_pre_hook(keep(s.layer), with_kwargs=True) for s in sites]
    _call(model, inputs)  # the model is the test's own: a failing call fails the test, hooks and all
    list(map(torch.utils.hooks.RemovableHandle.remove, handles))
    return seen


def _direct_maps(module: torch.nn.Module, x: torch.Tensor, heads: int, mask=None, rotate=None) -> torch.Tensor:
    """softmax(scale · q·k + mask) from the module's own q_proj / k_proj (or query / key) weights, written out here."""
    q_lin = getattr(module, "q_proj", None) or module.query
    k_lin = getattr(module, "k_proj", None) or module.key
    q = torch.nn.functional.linear(x, q_lin.weight, q_lin.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
    k = torch.nn.functional.linear(x, k_lin.weight, k_lin.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
    if rotate is not None:
        q, k = rotate(q, k)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + mask
    return logits.softmax(-1)


def test_eomt_dinov3_maps_are_the_models_own_with_rope_and_the_query_mask():
    """EoMT-DINOv3: the last block prepends object queries and masks each to its predicted mask; RoPE turns the patch
    tokens only. Maps equal softmax of the rotated q·k plus the very mask the model builds, and its eager weights."""
    from transformers.models.eomt_dinov3 import modeling_eomt_dinov3 as eomt

    model, inputs = _case("EomtDinov3ForUniversalSegmentation")
    sites = qkhooks.sites(model)
    calls = _calls(model, sites, inputs)
    eager = eager_maps(model, sites, inputs, "hf")
    with qkhooks.record(model, attention="full") as rec:
        out = _first_tensor(_call(model, inputs))
    assert torch.equal(out, _first_tensor(_call(model, inputs)))
    last = sites[-1].layer
    kwargs = calls[last][1]
    x = calls[last][0][0] if calls[last][0] else kwargs["hidden_states"]
    mask = kwargs["attention_mask"]
    assert mask is not None and bool((mask < -1e30).any()), "the small model's last block must mask some query rows"
    assert x.shape[1] == 5 + 1 + 4 + 16  # 5 object queries, CLS, 4 registers, 4x4 patches
    assert [s.num_prefix_tokens for s in sites] == [5, 10]  # the queries are prefix tokens where they are joined
    cos, sin = kwargs["position_embeddings"]
    direct = _direct_maps(sites[-1].module, x, 4, mask, lambda q, k: eomt.apply_rotary_pos_emb(q, k, cos, sin))
    got = rec.attention(last, "full")
    assert got.shape == direct.shape == eager[-1].shape
    assert float((got - direct).abs().max().detach()) < 1e-5
    assert float((got - eager[-1]).abs().max().detach()) < 1e-5
    assert float(got[:, :, :5, 10:].eq(0).float().mean()) > 0  # masked patches get no attention from their query
    with pytest.raises(QKHooksError, match="it is a mask"):  # a mask is no position-only term (it depends on the image)
        rec.bias(last)


def test_a_backbone_wrapper_records_every_stage_it_returns_unchanged():
    """Dinov2Backbone returns a BackboneOutput: every feature map is bit-identical under record(), maps are the
    model's eager ones and equal softmax(q·k) written out here."""
    model, inputs = _case("Dinov2Backbone")
    sites = qkhooks.sites(model)
    with torch.no_grad():
        plain = model(**inputs).feature_maps
    calls = _calls(model, sites, inputs)
    eager = eager_maps(model, sites, inputs, "hf")
    with qkhooks.record(model, modes="all", attention="full") as rec:
        with torch.no_grad():
            recorded = model(**inputs).feature_maps
        maps = [rec.attention(s.layer, "full") for s in sites]
    assert len(recorded) == len(plain) == 2 and all(torch.equal(a, b) for a, b in zip(recorded, plain))
    for site, got, want in zip(sites, maps, eager):
        x = calls[site.layer][0][0] if calls[site.layer][0] else calls[site.layer][1]["hidden_states"]
        assert float((got - want).abs().max()) < 1e-5
        assert float((got - _direct_maps(site.module, x, 4)).abs().max()) < 1e-5


def test_depth_pro_records_both_dinov2_encoders_in_forward_order_patches_along_the_batch():
    """DepthPro runs its patch encoder on the overlapping patches of every scale (batch axis: images x patches), then
    its image encoder on the downscaled image: four sites, each with the model's own maps and batch axis."""
    model, inputs = _case("DepthProModel")
    sites = qkhooks.sites(model)
    assert [s.path.split(".")[1] for s in sites] == ["patch_encoder"] * 2 + ["image_encoder"] * 2
    calls = _calls(model, sites, inputs)
    eager = eager_maps(model, sites, inputs, "hf")
    with qkhooks.record(model, attention="full") as rec:
        _call(model, inputs)
        maps = [rec.attention(s.layer, "full") for s in sites]
    # 128 px at scales 1/4, 1/2, 1 cut into 32 px patches with overlaps 0, 1/2, 1/4: 1 + 9 + 25 patches per image
    assert maps[0].shape[0] == 2 * 35 and maps[2].shape[0] == 2
    for site, got, want in zip(sites, maps, eager):
        x = calls[site.layer][0][0] if calls[site.layer][0] else calls[site.layer][1]["hidden_states"]
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-5
        assert float((got - _direct_maps(site.module, x, 4)).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["VideoMAEModel", "VivitModel"])
def test_joint_space_time_attention_is_exact_and_its_grid_is_the_frames_stacked(name):
    """Joint space-time attention: one softmax over every tubelet of the clip (2 frames x 4 x 4 here); maps equal the
    direct q·k over the t·h·w tokens; the grid is (t·h, w), read off the model's own Conv3d in the call."""
    model, inputs = _case(name)
    sites = qkhooks.sites(model)
    calls = _calls(model, sites, inputs)
    with qkhooks.record(model, modes=8, attention="full") as rec:
        _call(model, inputs)
        geometry = [rec.geometry(s.layer) for s in sites]
        maps = [rec.attention(s.layer, "full") for s in sites]
    prefix = 1 if name == "VivitModel" else 0
    for site, g, got in zip(sites, geometry, maps):
        x = calls[site.layer][0][0] if calls[site.layer][0] else calls[site.layer][1]["hidden_states"]
        assert x.shape[1] == prefix + 2 * 4 * 4
        assert (g.grid, g.num_prefix_tokens, g.query_tokens) == ((8, 4), prefix, prefix + 32)
        assert float((got - _direct_maps(site.module, x, 4)).abs().max()) < 1e-5


def test_videomae_pretraining_decoder_is_refused_naming_it():
    """VideoMAE's pre-training decoder sees [visible; mask tokens], not tubelet order, so no grid (t·h, w) may be claimed
    for it: the model is refused naming the decoder's attention (no adapter takes it), never recorded on a wrong grid."""
    import transformers

    config = transformers.VideoMAEConfig(num_frames=4, tubelet_size=2, decoder_num_hidden_layers=1, decoder_hidden_size=32,
                                         decoder_num_attention_heads=4, decoder_intermediate_size=64, **HF_SMALL)
    model = transformers.VideoMAEForPreTraining(config).eval()
    with pytest.raises(QKHooksError, match=r"'decoder\.decoder_layers\.0\.attention\.attention' \(VideoMAESelfAttention\)"):
        qkhooks.sites(model)


def test_a_masked_clip_has_no_grid_rather_than_a_guessed_one():
    """VideoMAE with half its tubelets masked: 16 visible tokens, a square count a guess would read as a 4x4 image,
    but they do not fill the 2 x 4 x 4 tubelets the Conv3d saw, so the layer has no grid (analyses refuse it)."""
    model, inputs = _case("VideoMAEModel")
    masked = torch.zeros(2, 32, dtype=torch.bool)
    masked[:, ::2] = True
    with qkhooks.record(model, modes=8, attention="full") as rec:
        _call(model, dict(inputs, bool_masked_pos=masked))
        geometry = rec.geometry(0)
        with pytest.raises(QKHooksError, match=r"16 tokens do not fill the clip's 2 x 4 x 4 tubelets"):
            rec.sites[0].grid_for(16)
    assert geometry.query_tokens == 16 and geometry.grid is None


def test_timesformer_layouts_other_than_divided_space_time_are_refused_naming_the_module_and_the_layout():
    """Divided space-time is exact since zoo11-inside (tests/test_inside_forms.py); the joint layout is refused."""
    import transformers

    model = transformers.TimesformerModel(transformers.TimesformerConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        num_frames=4, attention_type="joint_space_time"))
    with pytest.raises(QKHooksError, match=r"encoder\.layer\.0\.attention\.attention.*'joint_space_time' layout"):
        qkhooks.sites(model)


def _levit_direct(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF LeViT's attention written out with its own modules (Linear + BatchNorm1d as called, not folded)."""
    heads, kd = module.num_attention_heads, module.key_dim
    b, n, _ = x.shape
    if hasattr(module, "queries_keys_values"):
        q, k, _ = module.queries_keys_values(x).view(b, n, heads, -1).split([kd, kd, module.attention_ratio * kd], dim=3)
    else:
        k, _ = module.keys_values(x).view(b, n, heads, -1).split([kd, module.attention_ratio * kd], dim=3)
        q = module.queries(module.queries_subsample(x)).view(b, -1, heads, kd)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    bias = module.attention_biases[:, module.attention_bias_idxs]
    return (q @ k.transpose(-1, -2) * module.scale + bias).softmax(-1)


def test_hf_levit_maps_are_its_own_attention_with_batchnorm_biases_and_subsampled_queries():
    """transformers' LeViT: 3 attention layers and 2 subsampling ones; maps equal the module's own computation (its
    BatchNorm as called, its bias table), position-only biases as run.bias(l); BatchNorm in training mode refused."""
    model, inputs = _case("LevitModel")
    sites = qkhooks.sites(model)
    assert [type(s.module).__name__ for s in sites] == ["LevitAttention", "LevitAttentionSubsample", "LevitAttention",
                                                        "LevitAttentionSubsample", "LevitAttention"]
    calls = _calls(model, sites, inputs)
    with qkhooks.record(model, modes="all", attention="full") as rec, torch.no_grad():
        out = model(**inputs).last_hidden_state
        maps = [rec.attention(s.layer, "full") for s in sites]
        biases = [rec.bias(s.layer) for s in sites]
    with torch.no_grad():
        assert torch.equal(out, model(**inputs).last_hidden_state)
        for site, got, bias in zip(sites, maps, biases):
            want = _levit_direct(site.module, calls[site.layer][0][0])
            assert got.shape == want.shape
            assert float((got - want).abs().max()) < 1e-5, site.path
            assert torch.allclose(bias, site.module.attention_biases[:, site.module.attention_bias_idxs])
    assert maps[1].shape[-2:] == (4, 16)  # 4x4 tokens, queries every 2nd row and column: 2x2
    model.train()
    with pytest.raises(QKHooksError, match="training mode"):
        with qkhooks.record(model, attention="full"), torch.no_grad():
            model(**inputs)


def test_swin2sr_windows_are_recorded_as_swin_v2s():
    """Swin2SR's blocks are Swin-v2's (cosine attention, log-CPB bias, shift mask): full maps per window equal the
    model's eager weights, the shifted block included."""
    model, inputs = _case("Swin2SRModel-v2-blocks")
    sites = qkhooks.sites(model)
    eager = eager_maps(model, sites, inputs, "hf")
    with qkhooks.record(model, attention="full") as rec, torch.no_grad():
        model(**inputs)
        maps = [rec.attention(s.layer, "full") for s in sites]
    assert [s.block.shift_size for s in sites] == [0, 2]
    for got, want in zip(maps, eager):  # ours (B, nW, H, Nw, Nw); the model's (B·nW, H, Nw, Nw)
        assert got.shape == (2, 16, 2, 16, 16)
        assert float((got.flatten(0, 1) - want).abs().max()) < 1e-5


def test_a_timm_model_inside_timm_backbone_is_recorded_by_the_timm_adapter_and_as_itself():
    """TimmBackbone wraps a whole timm ViT: qkhooks records it with the timm adapter under the wrapper's own paths
    (zoo11-build; it was refused before), and recording the timm model itself while calling the wrapper gives the
    same maps: the timm ViT's own softmax(q·k), written out here."""
    model, inputs = _case("TimmBackbone")
    inner = model._backbone.model
    sites = qkhooks.sites(inner)
    assert sites[0].family == "timm-vit"
    assert [s.path for s in qkhooks.sites(model)] == [f"_backbone.model.{s.path}" for s in sites]
    calls = _calls(model, sites, inputs)
    with qkhooks.record(inner, attention="full") as rec:
        _call(model, inputs)
        got = rec.attention(0, "full")
    with qkhooks.record(model, attention="full") as wrapped:
        _call(model, inputs)
        assert torch.equal(wrapped.attention(0, "full"), got)
    attn, x = sites[0].module, calls[0][0][0]
    q, k, _ = attn.qkv(x).unflatten(-1, (3, 4, -1)).permute(2, 0, 3, 1, 4)
    want = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    assert float((got - want).abs().max().detach()) < 1e-5
