"""Query-dependent relative terms in run files beyond SAM/ViTDet (test_seg_runs.py): MViTv2's decomposed term on the
pooled grids, BoTNet's and HaloNet's PosEmbedRel. record_dataset stores each layer's term next to its full maps;
both read back equal to a live recording of the same images, and HaloNet's key grid (the call's own map, not its
strided query grid) is in the run's per-layer geometry. The grids asked of a site are the model's, never a square
guess (a non-square input)."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.data.preprocess import ImageConfig
from qkhooks.models.load import load_model
from qkhooks.store import open_run
from qkhooks.stream import record_dataset
from test_zoo import FAST_CASES, perturb
from conftest import forward_with_hooks, record_samples

RELATIVE = {"mvitv2-cls": 64, "eca_botnext26ts_256": 64, "halonet_h1-small": 64}


def _case(name: str):
    case = next(c for c in FAST_CASES if c.name == name)
    torch.manual_seed(0)
    return perturb(case.build())


@pytest.mark.parametrize("name", sorted(RELATIVE))
def test_relative_term_and_full_maps_in_the_run_file_equal_the_live_recording(name, tmp_path):
    model, side = _case(name), RELATIVE[name]
    live: dict[int, list[torch.Tensor]] = {}
    maps: dict[int, list[torch.Tensor]] = {}

    def keep(batch) -> None:
        for layer in batch.relative_layers:
            live.setdefault(layer, []).append(batch.relative_term(layer).clone())
            maps.setdefault(layer, []).append(batch.attention(layer, "full").clone())

    record_samples(model, (side, side), tmp_path / "run.h5", keep)
    layers = [s.layer for s in qkhooks.sites(model)]
    with open_run(tmp_path / "run.h5") as run:
        assert run.relative_layers == sorted(live) == layers, "every layer of these models has a relative term"
        for layer in layers:
            stored = torch.as_tensor(run.relative_term(layer)[:])
            assert stored.shape == tuple(run.attention(layer, "full").shape)
            torch.testing.assert_close(stored, torch.cat(live[layer]), atol=0, rtol=0)
            torch.testing.assert_close(torch.as_tensor(run.attention(layer, "full")[:]), torch.cat(maps[layer]),
                                       atol=0, rtol=0)
            assert float(stored.abs().max()) > 0  # the perturbed tables make the term matter


def test_halonet_run_file_stores_each_layers_key_grid_the_calls_own_map(tmp_path):
    """A strided HaloNet block (block_stride 2) has its queries on the (H/2, W/2) grid and its keys on the (H, W) map
    of its call; the run file's geometry says both (the key grid was None before)."""
    model = _case("halonet_h1-small")
    sites = qkhooks.sites(model)
    seen: dict[int, tuple[int, int]] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, layer=s.layer: seen.__setitem__(layer, tuple(a[0].shape[2:])))
               for s in sites]
    forward_with_hooks(model, handles, torch.zeros(1, 3, 64, 64))
    config = ImageConfig(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    record_dataset(load_model(model, image_config=config), "samples", tmp_path / "halo.h5", limit=2, batch_size=2,
                   progress=False, dtype="float32", modes=2)
    strided = 0
    with open_run(tmp_path / "halo.h5") as run:
        for site in sites:
            geometry, stride = run.geometry(site.layer), int(site.module.block_stride)
            assert tuple(geometry.key_grid) == seen[site.layer], site.path
            assert tuple(geometry.grid) == (seen[site.layer][0] // stride, seen[site.layer][1] // stride), site.path
            assert geometry.key_tokens == seen[site.layer][0] * seen[site.layer][1]
            strided += stride > 1
    assert strided, "the case must hold a strided block"


def test_mvitv2_grid_of_a_non_square_input_is_the_feat_size_the_model_hands_its_attention():
    """An 8x32 token grid has 256 tokens, which the old square fallback read as 16x16; the grid is now the call's own
    feat_size at every stage (the queries of a pooling layer are read on the grid entering W_q, as the modes)."""
    from test_zoo import _small_mvitv2

    torch.manual_seed(0)
    model = perturb(_small_mvitv2(rel_pos_type=""))  # its relative tables are sized for square grids only
    sizes: dict[int, tuple[int, int]] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, layer=s.layer: sizes.__setitem__(layer, tuple(a[1])))
               for s in qkhooks.sites(model)]
    try:
        with qkhooks.record(model, modes=2, attention="full") as rec, torch.no_grad():
            rec(torch.randn(1, 3, 32, 128))
    finally:
        for h in handles:
            h.remove()
    assert sizes[0] == (8, 32)
    assert {layer: tuple(rec.geometry(layer).grid) for layer in rec.layers} == sizes


def test_rope_bands_refuse_tables_off_the_native_grid_rather_than_guess_one():
    """Frequencies are angle steps along the grid's rows and columns: tables of 12 tokens on a 4x4 site are refused
    (the old fallback read them as 3x4, whatever the model's grid)."""
    from qkhooks.models.rope import rope_bands

    case = next(c for c in FAST_CASES if c.name == "vit_small_patch16_dinov3")
    torch.manual_seed(0)
    site = qkhooks.sites(case.build())[0]
    assert site.grid[0] * site.grid[1] != 12
    dk = site.head_dim
    tables = torch.cat([torch.zeros(12, dk), torch.ones(12, dk)], -1)  # timm's [sin | cos] on 12 tokens
    with pytest.raises(QKHooksError, match=r"12 rotated tokens are not the native .* grid"):
        rope_bands(site, tables, 2)
