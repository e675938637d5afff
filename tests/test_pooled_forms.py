"""Keys (and queries) from other tokens than the ones entering the module: NextViT's average-pooled, batch-normalised
keys, MobileNetV4/V5's multi-query attention on NCHW maps (one key head shared by every query head, keys from a
strided depthwise conv and a norm). Each is checked against q·k written out here from the module's parameters
(pooling, conv and BatchNorm computed directly, not through the model's modules); test_zoo checks the maps
against the model's own eager attention."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import qkhooks
from qkhooks import QKHooksError
from test_zoo import FAST_CASES, Case, _call, perturb

CASES = {c.name: c for c in FAST_CASES if c.name in ("nextvit_small", "mobilenetv4-multi-query")}


def _build(name: str):
    case: Case = CASES[name]
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


@contextlib.contextmanager
def _calls(modules: dict[int, torch.nn.Module]):
    """The positional arguments of each module's call made inside the block, by layer."""
    args: dict[int, tuple] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, layer=layer: args.__setitem__(layer, a)) for layer, m in modules.items()]
    try:
        yield args
    finally:
        for h in handles:
            h.remove()


def _inputs_of(model, inputs, modules: dict[int, torch.nn.Module]) -> dict[int, torch.Tensor]:
    """The tensor each module was called with (as the module received it)."""
    with _calls(modules) as args:
        _call(model, inputs)
    return {layer: a[0].detach() for layer, a in args.items()}


def _batch_norm(x: torch.Tensor, bn: torch.nn.Module, channel_axis: int) -> torch.Tensor:
    """Eval-mode BatchNorm written out: (x - mean) / sqrt(var + eps) · γ + β along ``channel_axis``."""
    shape = [1] * x.dim()
    shape[channel_axis] = -1
    weight, bias, mean, var = (t.detach().double() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    return (x - mean.reshape(shape)) * (weight / torch.sqrt(var + bn.eps)).reshape(shape) + bias.reshape(shape)


def _recorded(model, inputs):
    with qkhooks.record(model, modes="all", attention="full") as run:
        _call(model, inputs)
    return run


@torch.no_grad()
def test_nextvit_maps_are_softmax_of_queries_against_pooled_batch_normalised_keys():
    """Keys: runs of r² consecutive tokens averaged, BatchNorm'd, then W_k; maps (B, H, N, N / r²) = softmax(scale q·k)."""
    model, inputs = _build("nextvit_small")
    sites = qkhooks.sites(model)
    reduced = [s for s in sites if s.module.sr is not None]
    assert reduced, "the small NextViT must have a layer with reduced keys"
    tokens = _inputs_of(model, inputs, {s.layer: s.module for s in sites})
    run = _recorded(model, inputs)
    full = {s.layer: run.attention(s.layer, "full") for s in sites}
    for site in sites:
        attn, x = site.module, tokens[site.layer].double()
        b, n, c = x.shape
        if attn.sr is not None:
            r = attn.N_ratio
            pooled = x[:, : n // r * r].reshape(b, n // r, r, c).mean(2)  # AvgPool1d(kernel = stride = r²) over tokens
            keys = _batch_norm(pooled, attn.norm, channel_axis=2)
        else:
            keys = x
        heads, dk = attn.num_heads, attn.head_dim
        q = F.linear(x, attn.q.weight.double(), attn.q.bias.double()).reshape(b, n, heads, dk).transpose(1, 2)
        k = F.linear(keys, attn.k.weight.double(), attn.k.bias.double()).reshape(b, -1, heads, dk).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)
        got = full[site.layer]
        assert got.shape == want.shape
        assert float((got.double() - want).abs().max()) < 1e-5, site.path


def test_nextvit_key_grid_is_the_row_runs_the_pooling_averages_not_a_square_reduction():
    """AvgPool1d pools r² consecutive tokens of the row-major sequence: an 8x8 grid with r = 4 gives 8 rows of 4 runs
    (8 x 4 keys), not the 2x2-ratio grid (4 x 4) that has 16 keys too; runs that cross rows form no grid. The query
    grid is the call's (zoo12: the map the block's norm is handed, set here as a recording's hook sets it)."""
    from qkhooks.results import _reduced_grid
    from qkhooks.results import observe_geometry

    model, _ = _build("nextvit_small")
    site = next(s for s in qkhooks.sites(model) if s.module.sr is not None and s.module.N_ratio == 16)
    site._grid_of_source = (8, 8)
    geometry = observe_geometry(site, 64, 4)
    assert (geometry.grid, geometry.key_grid) == ((8, 8), None)  # runs of 16 tokens cross the rows of 8
    site._grid_of_source = (16, 16)
    geometry = observe_geometry(site, 256, 16)
    assert (geometry.grid, geometry.key_grid) == ((16, 16), (16, 1))
    assert _reduced_grid(site.module, (16, 16), 16) is None  # the generic rule reads no grid off a 1-D pooling
    site4 = next(s for s in qkhooks.sites(model) if s.module.sr is not None and s.module.N_ratio == 4)
    site4._grid_of_source = (8, 8)
    assert observe_geometry(site4, 64, 16).key_grid == (8, 2)
    site4._grid_of_source = None
    assert observe_geometry(site4, 64, 16).grid is None  # no call seen: 64 tokens are not read as 8x8


@torch.no_grad()
def test_multi_query_maps_use_the_one_shared_key_head_from_the_strided_depthwise_conv_and_batch_norm():
    """q_h = W_q,h x (1x1 conv), k = W_k BN(dwconv_stride(x)) (one head), maps = softmax(scale q_h·k) per query head."""
    model, inputs = _build("mobilenetv4-multi-query")
    sites = qkhooks.sites(model)
    assert {s.module.kv_stride for s in sites} == {1, 2}
    images = _inputs_of(model, inputs, {s.layer: s.module for s in sites})
    run = _recorded(model, inputs)
    full = {s.layer: run.attention(s.layer, "full") for s in sites}
    for site in sites:
        attn, x = site.module, images[site.layer].double()
        key_in = x
        if attn.kv_stride > 1:
            conv = attn.key.down_conv
            key_in = F.conv2d(x, conv.weight.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
            key_in = _batch_norm(key_in, attn.key.norm, channel_axis=1)
        q = torch.einsum("oc,bchw->bohw", attn.query.proj.weight.double().flatten(1), x).flatten(2)  # (B, H·dk, N)
        q = q.unflatten(1, (attn.num_heads, attn.key_dim)).transpose(-1, -2)  # (B, H, N, dk)
        k = torch.einsum("oc,bchw->bohw", attn.key.proj.weight.double().flatten(1), key_in).flatten(2)  # (B, dk, M)
        want = torch.softmax(torch.einsum("bhnd,bdm->bhnm", q, k) * attn.scale, -1)
        got = full[site.layer]
        assert got.shape == want.shape == (x.shape[0], attn.num_heads, x.shape[2] * x.shape[3], key_in.shape[2] * key_in.shape[3])
        assert float((got.double() - want).abs().max()) < 1e-5, site.path


@torch.no_grad()
def test_multi_query_modes_are_each_query_heads_form_with_the_shared_key_projection():
    """The spectrum of query head h is the SVD of W_q,h^T W_k with the one W_k every head shares (dense SVD here)."""
    model, _ = _build("mobilenetv4-multi-query")
    spec = qkhooks.spectrum(model)
    for site, layer in zip(qkhooks.sites(model), spec):
        attn = site.module
        w_q = attn.query.proj.weight.double().flatten(1).unflatten(0, (attn.num_heads, attn.key_dim))
        w_k = attn.key.proj.weight.double().flatten(1)
        for h in range(attn.num_heads):
            want = torch.linalg.svdvals(w_q[h].T @ w_k)[: attn.key_dim]
            got = torch.as_tensor(layer.S[h]).double()
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (site.path, h)


def test_batch_norm_in_training_mode_on_the_key_side_is_refused():
    """In training mode a BatchNorm normalises with the batch's statistics, so one image's keys depend on the others."""
    for name in CASES:
        model, inputs = _build(name)
        site = next(s for s in qkhooks.sites(model) if s.key_tokens is not None)
        site.module.train()
        with pytest.raises(QKHooksError, match=r"unsupported attention in .*training mode"):
            with qkhooks.record(model, modes=4, attention="full"):
                _call(model, inputs)


def test_multi_query_attention_with_pooled_queries_is_refused_naming_the_pooling():
    from timm.layers.attention2d import MultiQueryAttention2d

    model, _ = _build("mobilenetv4-multi-query")
    model.blocks[1][0].attn = MultiQueryAttention2d(16, num_heads=2, key_dim=8, query_strides=2, kv_stride=2)
    with pytest.raises(QKHooksError, match=r"unsupported attention in 'blocks\.1\.0\.attn' \(MultiQueryAttention2d\): "
                                           r"its queries are average-pooled"):
        qkhooks.sites(model)


# ------------------------------------------------------------------------------------- Hiera's pooled queries
HIERA = [c for c in FAST_CASES if c.name in ("hiera_tiny_224", "HieraModel")]


def _hiera(case: Case):
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _hiera_q_k(attn, x: torch.Tensor, heads: int, dk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (max-pooled over the query stride) and k per mask unit, written out from the Hiera paper's layout: the
    tokens are unrolled so that token n sits at position n // nW of mask unit n % nW, and the query-stride groups
    are the outermost blocks of each unit's positions."""
    b, n, _ = x.shape
    rows = heads * dk
    stride = int(getattr(attn, "q_stride", getattr(attn, "query_stride", 1)))
    units = n // (stride * attn.window_size) if attn.use_mask_unit_attn else 1
    w, bias = attn.qkv.weight.double(), attn.qkv.bias.double()
    q = (x @ w[:rows].T + bias[:rows]).reshape(b, n // units, units, heads, dk).permute(0, 3, 2, 1, 4)
    k = (x @ w[rows: 2 * rows].T + bias[rows: 2 * rows]).reshape(b, n // units, units, heads, dk).permute(0, 3, 2, 1, 4)
    if stride > 1:
        q = q.reshape(b, heads, units, stride, -1, dk).max(dim=3).values
    return q, k


@pytest.mark.parametrize("case", HIERA, ids=lambda c: c.name)
@torch.no_grad()
def test_hiera_maps_are_softmax_of_max_pooled_queries_against_keys_per_mask_unit(case: Case):
    model, inputs = _hiera(case)
    sites = qkhooks.sites(model)
    assert {s.query_stride for s in sites} == {1, 4} and {bool(s.mask_unit_size) for s in sites} == {True, False}
    tokens = _inputs_of(model, inputs, {s.layer: s.module for s in sites})
    run = _recorded(model, inputs)
    full = {s.layer: run.attention(s.layer, "full") for s in sites}
    for site in sites:
        q, k = _hiera_q_k(site.module, tokens[site.layer].double(), site.num_heads, site.head_dim)
        want = torch.softmax(q @ k.transpose(-1, -2) * site.scale, -1)  # (B, H, nW, N_q, N_k)
        if case.kind == "timm" and not site.module.use_mask_unit_attn:  # timm's global attention: (B, H, N_q, N_k)
            want = want[:, :, 0]
        got = full[site.layer]
        assert got.shape == want.shape, site.path
        assert float((got.double() - want).abs().max()) < 1e-5, site.path


@pytest.mark.parametrize("case", HIERA, ids=lambda c: c.name)
@torch.no_grad()
def test_hiera_q_k_path_modes_of_the_pooled_queries_rebuild_the_pooled_content_logits(case: Case):
    """What the site claims: with the bias-free spectrum, query maps (q̂ - b_q)·a_n of the pooled q and key maps
    (k - b_k)·c_n give Σ_n σ_n (q̂ - b_q)·a_n (k - b_k)·c_n = (q̂ - b_q)·(k - b_k) where W_q and W_k have full rank d_k.
    (The modes of the unpooled tokens, x·u_n, rebuild the unpooled content term: test_zoo checks that.)"""
    from qkhooks.models.pooled import pooled_qk
    from qkhooks.projector import QKPathProjector

    model, inputs = _hiera(case)
    sites = qkhooks.sites(model)
    tokens = _inputs_of(model, inputs, {s.layer: s.module for s in sites})
    spec = qkhooks.spectrum(model)
    checked = 0
    for site in sites:
        w = site.weights()
        if site.query_stride == 1 or torch.linalg.matrix_rank(w.w_q.double()).min() < site.head_dim:
            continue
        assert site.content_only() and not site.modes_rebuild_logits()
        q_hat, k = pooled_qk(site, tokens[site.layer])
        q_hat, k = q_hat.double(), k.double()
        if q_hat.dim() == 4:
            q_hat, k = q_hat[:, :, None], k[:, :, None]
        b_q, b_k = w.b_q.double()[None, :, None, None], w.b_k.double()[None, :, None, None]
        want = (q_hat - b_q) @ (k - b_k).transpose(-1, -2)  # (B, H, nW, N_q, N_k), written out
        path = QKPathProjector(spec[site.layer], w)
        s = torch.as_tensor(spec[site.layer].S).double()
        qm, km = path(q_hat.flatten(2, 3), k.flatten(2, 3))  # (B, H, K, nW·N), the offsets remove b_q and b_k
        qm, km = qm.unflatten(-1, q_hat.shape[2:4]), km.unflatten(-1, k.shape[2:4])  # (B, H, K, nW, N)
        got = torch.einsum("bhkwn,hk,bhkwm->bhwnm", qm, s, km)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-5, f"{site.path}: {err:.1e}"
        checked += 1
    assert checked, "no pooled layer with full-rank W_q in the small model"


@pytest.mark.parametrize("case", HIERA, ids=lambda c: c.name)
def test_hiera_rows_and_grids_are_refused_the_tokens_are_unrolled_and_the_queries_pooled(case: Case):
    from qkhooks.results import observe_geometry

    model, inputs = _hiera(case)
    with pytest.raises(QKHooksError, match=r"max-pooled inside the module .* record attention='full'"):
        with qkhooks.record(model, modes=None, attention="rows"):
            _call(model, inputs)
    site = qkhooks.sites(model)[0]
    assert observe_geometry(site, 256, 256).grid is None  # 16x16 tokens, but in the unrolled order: no grid claimed


def test_a_dataset_run_of_multi_query_layers_keeps_each_layers_own_key_grid(tmp_path):
    """Layers of one stage with and without kv stride (784 and 3136 keys on a 56x56 grid) are stored one per layer, each
    with its key grid from the conv's own arithmetic (stride 2, padding 1: 28x28)."""
    import numpy as np

    from qkhooks.store.reader import open_run

    model, _ = _build("mobilenetv4-multi-query")
    images = [((np.random.RandomState(i).rand(64, 64, 3) * 255).astype(np.uint8), 0) for i in range(2)]
    qkhooks.record_dataset(model, images, tmp_path / "run.h5", modes=4, batch_size=2)
    run = open_run(tmp_path / "run.h5")
    assert [(run.geometry(l).grid, run.geometry(l).key_grid) for l in (0, 1)] == [((56, 56), (28, 28)), ((56, 56), (56, 56))]


# -------------------------------------------------------------------------- MViTv2: conv + LayerNorm pooled q and k
def _mvit():
    case = next(c for c in FAST_CASES if c.name == "mvitv2-cls")
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _pooled_direct(t: torch.Tensor, conv, norm, feat: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, 1 + h·w, d_k) -> the class token kept apart, the grid pooled by the per-head conv (written as F.conv2d)
    and the LayerNorm over d_k (F.layer_norm), as MViTv2's paper pools."""
    b, heads, _, dk = t.shape
    cls_tok, grid = t[:, :, :1], t[:, :, 1:].reshape(b * heads, *feat, dk).permute(0, 3, 1, 2)
    if conv is not None:
        grid = F.conv2d(grid, conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                        conv.padding, conv.dilation, conv.groups)
    size = (grid.shape[2], grid.shape[3])
    t = torch.cat([cls_tok, grid.flatten(2).transpose(1, 2).reshape(b, heads, -1, dk)], 2)
    if norm is not None:
        t = F.layer_norm(t, (dk,), norm.weight.double(), norm.bias.double(), norm.eps)
    return t, size


@torch.no_grad()
def test_mvitv2_maps_are_pooled_q_k_plus_the_relative_term_on_the_pooled_grids_and_the_term_is_its_own():
    """softmax(scale · q̂·k̂ + q̂_i·R_h[Δh] + q̂_i·R_w[Δw]) with q̂, k̂ pooled and normalised and the term indexed here
    (distances scaled by the grids' ratio, as the MViTv2 paper defines them; the class token's row and column carry
    no term); the content term alone misses the maps."""
    model, inputs = _mvit()
    sites = qkhooks.sites(model)
    with _calls({s.layer: s.module for s in sites}) as args:
        _call(model, inputs)
    tokens = {layer: a[0].detach() for layer, a in args.items()}
    feats = {layer: tuple(a[1]) for layer, a in args.items()}  # the grid each call was handed
    with qkhooks.record(model, modes=None, attention="full") as run:
        _call(model, inputs)
        terms = {s.layer: s.relative_term() for s in run.sites}
    full = {s.layer: run.attention(s.layer, "full") for s in sites}
    assert any(s.module.pool_q is not None for s in sites) and sites[0].num_prefix_tokens == 1
    for site in sites:
        m, x = site.module, tokens[site.layer].double()
        b, n, _ = x.shape
        w, bias = m.qkv.weight.double(), m.qkv.bias.double()
        rows = w.shape[0] // 3
        q, k = ((x @ w[i * rows:(i + 1) * rows].T + bias[i * rows:(i + 1) * rows]).reshape(b, n, m.num_heads, -1)
                .transpose(1, 2) for i in (0, 1))
        q, (qh, qw) = _pooled_direct(q, m.pool_q, m.norm_q, feats[site.layer])
        k, (kh, kw) = _pooled_direct(k, m.pool_k, m.norm_k, feats[site.layer])
        ratio_h, ratio_w = (max(kh / qh, 1.0), max(qh / kh, 1.0)), (max(kw / qw, 1.0), max(qw / kw, 1.0))
        dist_h = (torch.arange(qh)[:, None] * ratio_h[0] - torch.arange(kh)[None] * ratio_h[1] + (kh - 1) * ratio_h[1]).long()
        dist_w = (torch.arange(qw)[:, None] * ratio_w[0] - torch.arange(kw)[None] * ratio_w[1] + (kw - 1) * ratio_w[1]).long()
        r_q = q[:, :, 1:].reshape(b, m.num_heads, qh, qw, -1)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, m.rel_pos_h.double()[dist_h])  # (B, H, qh, qw, kh)
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, m.rel_pos_w.double()[dist_w])  # (B, H, qh, qw, kw)
        term = torch.zeros(b, m.num_heads, q.shape[2], k.shape[2], dtype=torch.float64)
        term[:, :, 1:, 1:] = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, m.num_heads, qh * qw, kh * kw)
        assert float((terms[site.layer].double() - term).abs().max()) < 1e-5, site.path
        content = q @ k.transpose(-1, -2) * site.scale
        want = torch.softmax(content + term, -1)
        assert full[site.layer].shape == want.shape
        assert float((full[site.layer].double() - want).abs().max()) < 1e-5, site.path
        assert float((torch.softmax(content, -1) - want).abs().max()) > 1e-3, "the relative term must matter here"


def test_mvitv2_rows_are_refused_the_queries_are_pooled():
    model, inputs = _mvit()
    with pytest.raises(QKHooksError, match=r"queries are pooled inside the module .* record attention='full'"):
        with qkhooks.record(model, modes=None, attention="rows"):
            _call(model, inputs)
