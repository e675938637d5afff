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
    for site in sites:
        module, read = reference(model, site)
        handles.append(module.register_forward_hook(
            lambda m, a, o, layer=site.layer, read=read: seen.setdefault(layer, read(m, a, o)) and None))
    image = torch.randn(2, 3, h, w)
    try:
        with qkhooks.record(model, modes=2, attention=None) as run:
            model(image) if name != "DetrModel" else model(pixel_values=image)
    finally:
        for handle in handles:
            handle.remove()
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
    with pytest.raises(QKHooksError, match=r"16 patch tokens .* never assumed"):
        run.sites[0].grid_for(16)


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
