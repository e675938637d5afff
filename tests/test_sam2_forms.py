"""SAM2's Hiera-det (timm ``sam2_hiera_*``, HF ``Sam2VisionModel``): q max-pooled after W_q at stage transitions,
inside blocks that cut a zero-padded grid into windows. Each claim of :mod:`qkhooks.models.sam2` is checked against
q·k written out here from the module's own parameters (padding, windows and the 2x2 max pool done by hand, not by
the model's functions); test_zoo checks the same maps against the model's own eager attention."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from test_zoo import FAST_CASES, Case, _call, perturb
from conftest import record_live_full_maps

CASES = [c for c in FAST_CASES if c.name in ("sam2_hiera_tiny-padded", "Sam2VisionModel-padded")]


def _build(case: Case):
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _block_inputs(model, sites) -> dict[int, torch.Tensor]:
    """Each block's normalised (B, H, W, d) grid, as its attention's windows are cut from it."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for site in sites:
        norm = getattr(site.block, "norm1", None) or site.block.layer_norm1
        handles.append(norm.register_forward_hook(lambda m, a, o, layer=site.layer: seen.__setitem__(layer, o.detach())))
    return seen, handles


def _window_of(block) -> int:
    size = block.window_size
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def _windows(grid: torch.Tensor, w: int) -> tuple[torch.Tensor, int]:
    """(B, H, W, d) -> (B, nW, w·w, d): zero-padded at the bottom and right to whole windows, windows row-major."""
    b, h, wd, d = grid.shape
    ph, pw = -h % w, -wd % w
    padded = torch.cat([grid, grid.new_zeros(b, ph, wd, d)], 1)
    padded = torch.cat([padded, padded.new_zeros(b, h + ph, pw, d)], 2)
    hp, wp = h + ph, wd + pw
    out = padded.reshape(b, hp // w, w, wp // w, w, d).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, w * w, d)
    return out, ph + pw


def _q_k(module, tokens: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (..., H, N, d_k) from the module's qkv parameters (q rows, then k rows), in float64."""
    w, b = module.qkv.weight.double(), module.qkv.bias.double()
    rows = w.shape[0] // 3
    q = (tokens @ w[:rows].T + b[:rows]).unflatten(-1, (heads, -1)).transpose(-2, -3)
    k = (tokens @ w[rows: 2 * rows].T + b[rows: 2 * rows]).unflatten(-1, (heads, -1)).transpose(-2, -3)
    return q, k


def _max_pool_2x2(q: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """(..., N, d_k) on a (h, w) grid -> the max over each 2x2 group (rows and columns past an even size dropped)."""
    h, w = side
    g = q.unflatten(-2, (h, w))[..., : h // 2 * 2, : w // 2 * 2, :]
    g = g.unflatten(-3, (h // 2, 2)).unflatten(-2, (w // 2, 2))  # (..., h/2, 2, w/2, 2, d_k)
    return g.amax(dim=(-4, -2)).flatten(-3, -2)


def _reference(site, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps, pooled q, k) of one layer from its block's normalised grid: per window (B, nW, H, N_q, N_k) for a
    windowed block, (B, H, N_q, N_k) for a global one."""
    grid = grid.double()
    w = _window_of(site.block)
    tokens, side = (grid.flatten(1, 2), grid.shape[1:3]) if not w else (_windows(grid, w)[0], (w, w))
    q, k = _q_k(site.module, tokens, site.num_heads)
    if site.pools_queries:
        q = _max_pool_2x2(q, side)
    return torch.softmax(q @ k.transpose(-1, -2) * site.scale, -1), q, k


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@torch.no_grad()
def test_maps_are_softmax_of_max_pooled_queries_per_window_in_the_models_window_order(case: Case):
    model, inputs = _build(case)
    sites = qkhooks.sites(model)
    seen, handles = _block_inputs(model, sites)
    try:
        with qkhooks.record(model, modes=None, attention="full") as run:
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    pooled_padded = windowed_global = 0
    for site in sites:
        want, _, _ = _reference(site, seen[site.layer])
        got = run.attention(site.layer, "full")
        assert got.shape == want.shape, f"{site.path}: {tuple(got.shape)} vs {tuple(want.shape)}"
        assert float((got.double() - want).abs().max()) < 1e-5, site.path
        w = _window_of(site.block)
        pooled_padded += bool(site.pools_queries and w and _windows(seen[site.layer], w)[1])
        windowed_global += not w
    assert pooled_padded and windowed_global, "the case must hold a padded pooling block and a global block"
    assert [s.pools_queries for s in sites] == [False, True, False, True, False, True]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@torch.no_grad()
def test_token_modes_on_the_image_grid_rebuild_the_unpooled_content_logits(case: Case):
    """Query and key maps are on the (unpadded) image grid, row-major: Σ_n σ_n (x_i·u_n)(x_j·v_n) over the augmented
    spectrum is q_i·k_j of the block's normalised tokens, for pooling blocks too (the unpooled tokens' form)."""
    model, inputs = _build(case)
    sites = qkhooks.sites(model)
    seen, handles = _block_inputs(model, sites)
    try:
        with qkhooks.record(model, modes="all", augmented=True, attention=None) as run:
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        grid = seen[site.layer].double()
        q, k = _q_k(site.module, grid.flatten(1, 2), site.num_heads)
        want = q @ k.transpose(-1, -2)  # (B, H, HW, HW): every pair of grid tokens
        query, key = run.query[site.layer].double(), run.key[site.layer].double()
        assert query.shape[-1] == grid.shape[1] * grid.shape[2], site.path
        got = torch.einsum("bhkn,hk,bhkm->bhnm", query, torch.as_tensor(run.spectrum[site.layer].S).double(), key)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, site.path
        assert site.modes_rebuild_logits() is (not site.pools_queries)
        assert ("max-pooled after W_q" in site.content_only()) is site.pools_queries


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@torch.no_grad()
def test_q_path_projection_of_the_pooled_queries_rebuilds_the_pooled_content_logits(case: Case):
    """What the site claims for a pooling block: with the bias-free spectrum, query maps (q̂ - b_q)·a_n of the pooled q
    and key maps (k - b_k)·c_n give (q̂ - b_q)·(k - b_k) per window, where W_q and W_k have full rank d_k."""
    from qkhooks.models.pooled import pooled_qk
    from qkhooks.projector import QKPathProjector

    model, inputs = _build(case)
    sites = qkhooks.sites(model)
    seen, handles = _block_inputs(model, sites)
    calls: dict[int, tuple] = {}  # each attention's call as made (HF passes its grid by keyword)
    handles += [s.module.register_forward_pre_hook(lambda m, a, kw, layer=s.layer: calls.__setitem__(layer, (a, kw)),
                                                   with_kwargs=True) for s in sites]
    try:
        with qkhooks.record(model, modes=None, attention="full") as run:
            _call(model, inputs)
            pooled = {s.layer: pooled_qk(s, s.hidden_states(*calls[s.layer])) for s in run.sites}
    finally:
        for h in handles:
            h.remove()
    spec = qkhooks.spectrum(model)
    checked = 0
    for site in sites:
        w = site.weights()
        if not site.pools_queries or torch.linalg.matrix_rank(w.w_q.double()).min() < site.head_dim:
            continue
        _, q_ref, k_ref = _reference(site, seen[site.layer])  # the pooled q written out here
        q_hat, k = (t.double() for t in pooled[site.layer])  # (B·nW or B, H, N, d_k)
        assert float((q_hat.reshape(q_ref.shape) - q_ref).abs().max()) < 1e-5, site.path
        b_q, b_k = w.b_q.double()[None, :, None], w.b_k.double()[None, :, None]
        want = (q_hat - b_q) @ (k - b_k).transpose(-1, -2)
        qm, km = QKPathProjector(spec[site.layer], w)(q_hat, k)  # (B', H, K, N), the offsets remove b_q and b_k
        got = torch.einsum("bhkn,hk,bhkm->bhnm", qm.double(), torch.as_tensor(spec[site.layer].S).double(), km.double())
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, site.path
        checked += 1
    assert checked, "no pooling layer with full-rank W_q in the small model"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rows_of_a_pooling_block_are_refused_a_query_is_a_group_of_tokens(case: Case):
    model, inputs = _build(case)
    with pytest.raises(QKHooksError, match=r"layer 1 .*max-pooled after W_q .* record attention='full'"):
        with qkhooks.record(model, modes=None, attention="rows"):
            _call(model, inputs)


def test_sites_run_in_forward_order_and_name_their_hiera_stage():
    model, _ = _build(CASES[0])
    assert [(s.layer, s.stage) for s in qkhooks.sites(model)] == [
        (0, "blocks (stage 0)"), (1, "blocks (stage 1)"), (2, "blocks (stage 1)"), (3, "blocks (stage 2)"),
        (4, "blocks (stage 2)"), (5, "blocks (stage 3)")]


def test_a_q_pool_other_than_a_max_pool_is_refused_naming_it():
    model, _ = _build(CASES[0])
    model.blocks[1].attn.q_pool = torch.nn.AvgPool2d(2, 2)
    with pytest.raises(QKHooksError, match=r"unsupported attention in 'blocks\.1\.attn' .* AvgPool2d"):
        qkhooks.sites(model)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_layers_grid_is_its_blocks_own_non_square_grid(case: Case):
    """A 64x96 image: 16x24 tokens at stage 0 down to 2x3; each layer's recorded grid is its block's (B, H, W, d) input
    grid (the unpooled tokens its modes are on), never a square guess; windowed layers say their window."""
    model, inputs = _build(case)
    sites = qkhooks.sites(model)
    seen, handles = _block_inputs(model, sites)
    try:
        with qkhooks.record(model, modes=2, attention="full") as rec, torch.no_grad():
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    grids = {s.layer: tuple(seen[s.layer].shape[1:3]) for s in sites}
    assert grids[0] == (16, 24) and grids[4] == (4, 6)
    for site in sites:
        geometry = rec.geometry(site.layer)
        assert tuple(geometry.grid) == grids[site.layer], site.path
        w = _window_of(site.block)
        assert (geometry.window is None) is (not w) and (not w or geometry.window["size"] == [w, w]), site.path


@pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.name)
def test_a_dataset_run_stores_each_layers_pooled_maps_and_grid_as_the_live_recording(case: Case, tmp_path):
    from qkhooks.store import open_run

    model, _ = _build(case)
    maps = record_live_full_maps(model, (64, 96), tmp_path / "sam2.h5")
    with open_run(tmp_path / "sam2.h5") as run:
        assert sorted(maps) == list(range(6))
        for layer, live in maps.items():
            stored = torch.as_tensor(run.attention(layer, "full")[:])
            torch.testing.assert_close(stored, torch.cat(live), atol=0, rtol=0)
        assert tuple(run.geometry(0).grid) == (16, 24) and tuple(run.geometry(4).grid) == (4, 6)
        assert run.geometry(1).window["windows"] == 24  # the pooling block's 4x4 windows of the 16x24 grid
