"""zoo12: no square read anywhere. Sites that know no native grid of their own (LeViT, EfficientFormer-v2, NextViT,
SHViT, MetaFormer, Twins, DETR encoders) and the dynamic-size timm ViT read the grid of the call; on non-square inputs
each layer's recorded grid must equal the grid the model itself makes, read here off the model's own tensors (the map a
module is handed or returns), and a token count that fits no grid the site knows is refused, never read as a square."""

from __future__ import annotations

from typing import Callable

import pytest
import timm
import torch
from torch import nn

import qkhooks
from qkhooks import QKHooksError
from test_zoo import DETR_SMALL, SMALL_RESNET, _hf, _small_caformer, perturb

Reference = Callable[[nn.Module, object], tuple[nn.Module, Callable]]  # (model, site) -> (module, hook giving the grid)


def _nchw_input(site) -> tuple[nn.Module, Callable]:
    """The attention module itself is handed an NCHW map (SHViT, EfficientFormer-v2 with its own stride conv)."""
    return site.module, lambda m, a, o: tuple(a[0].shape[-2:])


def _levit(model, site) -> tuple[nn.Module, Callable]:
    """LeViT on 64x96 images: patches of 16 make a 4x6 grid, each stage's downsampling halves it rounding up; a
    downsampling attention's queries are on the next stage's grid (written out by hand here)."""
    stage = int(site.path.split(".")[1])
    return site.module, lambda m, a, o: (-(-4 // 2**stage), -(-6 // 2**stage))


def _efficientformer_v2(model, site) -> tuple[nn.Module, Callable]:
    """The map entering the module's q projection (after its stride conv or local-global query): the query grid."""
    q = site.module.q.proj if hasattr(site.module.q, "proj") else site.module.q
    return q, lambda m, a, o: tuple(a[0].shape[-2:])


def _nextvit(model, site) -> tuple[nn.Module, Callable]:
    return site.block.patch_embed, lambda m, a, o: tuple(o.shape[-2:])


def _metaformer(model, site) -> tuple[nn.Module, Callable]:
    stage = model.get_submodule(site.stage.rpartition(".")[0])
    return stage.downsample, lambda m, a, o: tuple(o.shape[-2:])


def _twins(model, site) -> tuple[nn.Module, Callable]:
    stage = int(site.path.split(".")[1])
    return model.patch_embeds[stage], lambda m, a, o: tuple(o[1])  # (tokens, (H, W)): the grid the patch embed made


def _detr(model, site) -> tuple[nn.Module, Callable]:
    projection = next(m for n, m in model.named_modules() if n.endswith("input_projection"))
    return projection, lambda m, a, o: tuple(o.shape[-2:])


CASES = {
    "levit_128s": (lambda: timm.create_model("levit_128s", img_size=(64, 96), embed_dim=(32, 48, 64), key_dim=8,
                                             num_heads=(2, 3, 4), depth=(1, 1, 1)), (64, 96), _levit),
    "levit_conv_128s": (lambda: timm.create_model("levit_conv_128s", img_size=(64, 96), embed_dim=(32, 48, 64), key_dim=8,
                                                  num_heads=(2, 3, 4), depth=(1, 1, 1)), (64, 96), _levit),
    "efficientformerv2_s0": (lambda: timm.create_model("efficientformerv2_s0", img_size=(64, 96), depths=(1, 1, 2, 2),
                                                       embed_dims=(16, 16, 32, 32), num_vit=2), (64, 96), _efficientformer_v2),
    "nextvit_small": (lambda: timm.create_model("nextvit_small", depths=(1, 1, 5, 1), stem_chs=(8, 8, 16)), (64, 96), _nextvit),
    "shvit_s1": (lambda: timm.create_model("shvit_s1", embed_dim=(32, 48, 64), partial_dim=(8, 12, 16), qk_dim=(8, 8, 8),
                                           depth=(1, 1, 1), types=("s", "s", "s")), (64, 96), lambda model, site: _nchw_input(site)),
    "caformer_s18": (_small_caformer, (64, 96), _metaformer),
    "twins_pcpvt_small": (lambda: timm.create_model("twins_pcpvt_small", embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2),
                                                    depths=(1, 1, 1, 1), img_size=(64, 96)), (64, 96), _twins),
    "DetrModel": (_hf("DetrModel", "DetrConfig", **DETR_SMALL, **SMALL_RESNET), (64, 160), _detr),
}


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_each_layer_reads_the_grid_of_the_call_on_a_non_square_input(name: str):
    build, (h, w), reference = CASES[name]
    torch.manual_seed(0)
    model = perturb(build()).eval()
    sites = qkhooks.sites(model)
    seen: dict[int, tuple[int, int]] = {}
    handles = []
    image = torch.randn(2, 3, h, w)
    forward = (lambda: model(image)) if name != "DetrModel" else (lambda: model(pixel_values=image))
    try:  # the model's own grids, read in a forward of their own (record() refuses others' hooks on q/k layers)
        for site in sites:
            module, read = reference(model, site)
            handles.append(module.register_forward_hook(
                lambda m, a, o, layer=site.layer, read=read: seen.setdefault(layer, read(m, a, o)) and None))
        forward()
    finally:
        for handle in handles:
            handle.remove()
    with qkhooks.record(model, modes=2, attention=None) as run:
        forward()
    checked = 0
    for site in sites:
        want = seen[site.layer]
        got = run.geometry(site.layer).grid
        assert got is not None and tuple(got) == tuple(want), f"{site.path}: {got} vs the model's {want}"
        assert want[0] != want[1], f"{site.path}: the case must be non-square"
        checked += 1
    assert checked == len(sites) and len(sites) >= 2


@torch.no_grad()
def test_a_token_count_that_fits_no_grid_the_site_knows_is_refused_never_read_as_square():
    model = perturb(CASES["levit_128s"][0]()).eval()
    with qkhooks.record(model, modes=2) as run:
        model(torch.randn(1, 3, 64, 96))
    site = run.sites[0]
    assert site.grid_for(24) == (4, 6)
    with pytest.raises(QKHooksError, match=r"16 patch tokens are not its native grid \(4, 6\).* never assumed"):
        site.grid_for(16)  # a square count: read as 4x4 before
    model = perturb(CASES["shvit_s1"][0]()).eval()
    with qkhooks.record(model, modes=2) as run:
        model(torch.randn(1, 3, 64, 96))
    assert run.sites[0].grid_for(24) == (4, 6)
    with pytest.raises(QKHooksError, match=r"grid is 4x6 \(24 patches\), but 16 tokens follow .* never assumed"):
        run.sites[0].grid_for(16)  # the call's own grid is known: no other grid of that count is read


@torch.no_grad()
def test_a_dynamic_size_vit_reads_the_grid_its_patch_embed_made_not_the_native_one():
    """Native 4x4 (32 px, patches of 8); a 64x16 image is 8x2 patches, the same 16 tokens: each call's own grid."""
    vit = perturb(timm.create_model("vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=4, img_size=32, patch_size=8,
                                    dynamic_img_size=True)).eval()
    with qkhooks.record(vit, modes=2) as run:
        vit(torch.randn(2, 3, 64, 16))
        assert [tuple(run.geometry(l).grid) for l in (0, 1)] == [(8, 2), (8, 2)]
        vit(torch.randn(2, 3, 16, 64))
        assert tuple(run.geometry(0).grid) == (2, 8)
        vit(torch.randn(2, 3, 32, 32))
        assert tuple(run.geometry(0).grid) == (4, 4)
    centre = qkhooks.attention.default_query_tokens(run.sites[0], 17)  # CLS + 4x4: the centre patch (2, 2)
    assert centre.tolist() == [[0, 1 + 2 * 4 + 2]]


# ---- review 18: Hugging Face ViTs on a non-square image of the native token count; token orders without a grid
_HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
HF_DYNAMIC = {  # model class -> (config class, extra config, call keywords): all take other image sizes than the config's
    "ViTModel": ("ViTConfig", {}, {"interpolate_pos_encoding": True}),
    "DeiTModel": ("DeiTConfig", {}, {"interpolate_pos_encoding": True}),
    "Dinov2Model": ("Dinov2Config", {}, {}),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", {"num_register_tokens": 2}, {}),
    "CLIPVisionModel": ("CLIPVisionConfig", {}, {"interpolate_pos_encoding": True}),
    "SiglipVisionModel": ("SiglipVisionConfig", {}, {"interpolate_pos_encoding": True}),
    "BeitModel": ("BeitConfig", {"use_relative_position_bias": True}, {"interpolate_pos_encoding": True}),
}


@pytest.mark.parametrize("name", list(HF_DYNAMIC))
@torch.no_grad()
def test_hf_vits_read_the_grid_of_the_call_when_it_has_the_native_token_count(name: str):
    """A 16x64 image makes a 2x8 grid, the native 4x4 grid's 16 tokens: the recorded grid is the one the model's patch
    projection made (read off its output here), and the centre-patch row is that grid's centre token's row of the full
    maps (before: the native 4x4 grid, the wrong token's row)."""
    config, extra, call = HF_DYNAMIC[name]
    torch.manual_seed(0)
    model = perturb(_hf(name, config, **_HF_SMALL, **extra)()).eval()
    made: list[tuple[int, int]] = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1
    handle = convs[0].register_forward_hook(lambda m, a, o: made.append(tuple(o.shape[-2:])))
    try:
        with qkhooks.record(model, modes=2, attention=["rows", "full"]) as run:
            model(pixel_values=torch.randn(2, 3, 16, 64), **call)
    finally:
        handle.remove()
    assert made == [(2, 8)]
    prefix = run.geometry(0).num_prefix_tokens
    for layer in run.layers:
        assert tuple(run.geometry(layer).grid) == (2, 8)
        rows, full = run.attention(layer, "rows"), run.attention(layer, "full")
        centre = prefix + (2 // 2) * 8 + 8 // 2
        torch.testing.assert_close(rows[:, :, 1], full[:, :, centre], rtol=0, atol=1e-6)


@torch.no_grad()
def test_vitmae_tokens_are_in_no_grid_order_so_grid_readings_are_refused_and_maps_stay_exact(tmp_path):
    """ViTMAE shuffles every image's patch tokens (random_masking, all kept at mask_ratio=0): its maps are the model's
    in its own token order (equal to its eager attention), and nothing reads a token as a grid position."""
    import transformers
    from qkhooks.stream import probe_geometry

    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(**_HF_SMALL, mask_ratio=0.0, attn_implementation="eager")
    model = perturb(transformers.ViTMAEModel(config)).eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    reference = model(pixel_values=images, noise=noise, output_attentions=True)
    assert not torch.equal(reference.ids_restore[0], torch.arange(16))  # the tokens really are shuffled
    with qkhooks.record(model, modes="all", attention="full") as run:
        model(pixel_values=images, noise=noise)
    for layer in run.layers:
        torch.testing.assert_close(run.attention(layer, "full"), reference.attentions[layer], rtol=0, atol=1e-6)
        assert run.geometry(layer).grid is None
    with pytest.raises(QKHooksError, match="random_masking.*ViTModel"):
        with qkhooks.record(model, modes=2, attention="rows"):
            model(pixel_values=images, noise=noise)
    with pytest.raises(QKHooksError, match="cannot be recorded into a run file.*random_masking"):
        probe_geometry(model, qkhooks.sites(model), (32, 32))


@torch.no_grad()
def test_crossvit_fusion_attention_is_refused_or_left_out_by_name_and_each_branch_has_its_class_token():
    model = timm.create_model("crossvit_tiny_240", depth=((1, 1, 1),), embed_dim=[16, 32], num_heads=[2, 2],
                              mlp_ratio=[2, 2, 1]).eval()
    fusion = [n for n, m in model.named_modules() if type(m).__name__ == "CrossAttention"]
    assert len(fusion) == 2
    with pytest.raises(QKHooksError, match=rf"'{fusion[0]}' \(CrossAttention\): CrossViT's cross-attention"):
        qkhooks.record(model, modes=2)
    with qkhooks.record(model, modes=2, skip_unmodelled=True) as run:
        model(torch.randn(1, 3, 240, 240))
    assert sorted(run.left_out) == sorted(fusion)
    assert [run.geometry(layer).num_prefix_tokens for layer in run.layers] == [1, 1]  # cls_token_0, cls_token_1


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_a_mask_handed_by_position_is_the_mask_the_maps_add(implementation: str):
    """HF ViT passes its attention mask to the attention module by position, DINOv2 by keyword: both are the same
    parameter, so both maps equal the model's eager attention, masked keys at 0 (before: refused as an unknown term)."""
    import transformers

    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 12:] = 0
    images = torch.randn(2, 3, 32, 32)
    for cls, config in (("ViTModel", "ViTConfig"), ("Dinov2Model", "Dinov2Config")):
        torch.manual_seed(0)
        model = perturb(getattr(transformers, cls)(getattr(transformers, config)(**_HF_SMALL, attn_implementation="eager")))
        reference = model(pixel_values=images, attention_mask=mask, output_attentions=True).attentions
        model.set_attn_implementation(implementation)
        with qkhooks.record(model, modes=2, attention="full") as run:
            model(pixel_values=images, attention_mask=mask)
        for layer in run.layers:
            full = run.attention(layer, "full")
            torch.testing.assert_close(full, reference[layer], rtol=0, atol=1e-6)
            assert float(full[1, :, :, 12:].max()) == 0.0


def test_a_wrapped_model_is_refused_naming_the_wrapped_model():
    vit = timm.create_model("vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8).eval()
    for wrapper, how in ((nn.Sequential(vit), r"model\[0\]"), (nn.DataParallel(vit), r"model\.module")):
        with pytest.raises(QKHooksError, match=rf"{type(wrapper).__name__} wraps a model qkhooks knows: record {how} "
                                               r"\(VisionTransformer\) itself"):
            qkhooks.record(wrapper, modes=2)


@pytest.mark.parametrize("part", ["blocks[0]", "blocks[0].attn", "blocks", "hf-layer", "hf-attention", "hf-layers"])
def test_a_part_of_a_timm_or_hf_model_handed_in_is_refused_saying_to_pass_the_whole_model(part):
    # Before: a timm block or attention was "unsupported attention ... teach qkhooks its form with register_adapter",
    # a Sequential of blocks was told to record its first block (refused in turn), an HF layer got the adapters' list
    import transformers

    vit = timm.create_model("vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8).eval()
    hf = transformers.ViTModel(transformers.ViTConfig(**_HF_SMALL))
    module, what = {"blocks[0]": (vit.blocks[0], r"Block \(timm\.models\.vision_transformer\)"),
                    "blocks[0].attn": (vit.blocks[0].attn, r"Attention \(timm\.layers\.attention\)"),
                    "blocks": (vit.blocks, "Sequential of Block"),
                    "hf-layer": (hf.layers[0], r"ViTLayer \(transformers\.models\.vit\.modeling_vit\)"),
                    "hf-attention": (hf.layers[0].attention, r"ViTAttention \(transformers\.models\.vit\.[a-z_]+\)"),
                    "hf-layers": (hf.layers, "ModuleList of ViTLayer")}[part]
    library = "Hugging Face transformers" if part.startswith("hf") else "timm"
    for call in (lambda: qkhooks.sites(module), lambda: qkhooks.record(module, modes=2).__enter__()):
        with pytest.raises(QKHooksError, match=rf"^{what} is a part of a {library} model, not the model: .*Pass the "
                                               r"whole model: record\(model\); for some layers only, record\(model, "
                                               r"layers=\[0, 5\]\)"):
            call()
    assert len(qkhooks.sites(vit)) == 2 and len(qkhooks.sites(hf)) == 2  # the whole models are taken


@pytest.mark.parametrize("part", ["cait-talking-heads", "cait-class-attention", "convit-gpsa"])
def test_a_part_whose_attention_is_not_named_attention_is_refused_saying_to_pass_the_whole_model(part):
    # Before: CaiT's TalkingHeadAttn / ClassAttn and ConViT's GPSA blocks (forms the whole model records) handed in
    # were "qkhooks does not model this attention form ... teach qkhooks its form with register_adapter"
    cait = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=1,
                             depth_token_only=1)
    convit = timm.create_model("convit_tiny", img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2,
                               local_up_to_layer=1)
    module, what = {"cait-talking-heads": (cait.blocks[0], "LayerScaleBlock"),
                    "cait-class-attention": (cait.blocks_token_only[0], "LayerScaleBlockClassAttn"),
                    "convit-gpsa": (convit.blocks[0], "Block")}[part]
    with pytest.raises(QKHooksError, match=rf"^{what} \(timm\.models\.[a-z]+\) is a part of a timm model, not the "
                                           r"model: .*Pass the whole model: record\(model\)"):
        qkhooks.sites(module)
    assert qkhooks.sites(cait if part.startswith("cait") else convit)  # the whole model is taken


def test_the_unknown_grid_refusal_offers_only_what_works():
    site = qkhooks.sites(timm.create_model("levit_128s", img_size=(64, 96), embed_dim=(32, 48, 64), key_dim=8,
                                           num_heads=(2, 3, 4), depth=(1, 1, 1)))[0]
    with pytest.raises(QKHooksError) as refused:
        site.grid_for(16)
    assert "grid=" not in str(refused.value) and "attention='full'" in str(refused.value)
