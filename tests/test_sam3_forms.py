"""SAM3's ViT (HF ``Sam3VisionModel``): 2-D axial RoPE on interleaved pairs, handed by position, on NHWC windows folded
into the batch axis (:mod:`qkhooks.models.sam3`). Each claim is checked against q·k written out here from the modules'
own Linear layers: the zero padding and the windows cut by hand, the rotation of the pairs (2i, 2i + 1) by hand with
the frequencies of the config; test_zoo checks the same maps against the model's own eager attention."""

from __future__ import annotations

import torch

import qkhooks
from test_sam2_forms import _windows
from test_zoo import FAST_CASES, Case, _call, module_calls, perturb, rope_band_logits
from conftest import record_live_full_maps

CASE = next(c for c in FAST_CASES if c.name == "Sam3VisionModel-padded")  # 5x3 patches, windows of 2 padded to 6x4


def _build(case: Case = CASE):
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _recorded(model, inputs, **options):
    """A recording of one call, with each layer's normalised (B, H, W, d) grid (its windows are cut from it)."""
    sites = qkhooks.sites(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [s.block.layer_norm1.register_forward_hook(lambda m, a, o, layer=s.layer: seen.__setitem__(layer, o.detach()))
               for s in sites]
    try:
        with qkhooks.record(model, **options) as run, torch.no_grad():
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return run, sites, seen


def _q_k(module, tokens: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (..., H, N, d_k) from the module's q_proj / k_proj, biases included, in float64."""
    def project(linear):
        out = tokens @ linear.weight.double().T + linear.bias.double()
        return out.unflatten(-1, (heads, -1)).transpose(-2, -3)

    return project(module.q_proj), project(module.k_proj)


def _rotated(t: torch.Tensor, positions: torch.Tensor, theta: float, halves: bool = False) -> torch.Tensor:
    """t (..., N, d_k) turned pair by pair: pair i = dims (2i, 2i + 1) (``halves``: (i, i + d_k / 2)), its angle
    positions[:, 0]·f_i for the first d_k / 4 pairs and positions[:, 1]·f_i for the last d_k / 4, f_i = theta^(-4i / d_k)
    (axial 2-D RoPE)."""
    dk = t.shape[-1]
    freq = theta ** (-torch.arange(0, dk // 2, 2, dtype=torch.float64) / (dk // 2))  # d_k / 4 frequencies
    angle = torch.cat([positions[:, :1].double() * freq, positions[:, 1:].double() * freq], -1)  # (N, d_k / 2)
    a, b = (torch.arange(dk // 2), torch.arange(dk // 2, dk)) if halves else (torch.arange(0, dk, 2), torch.arange(1, dk, 2))
    out = torch.empty_like(t)
    out[..., a] = t[..., a] * angle.cos() - t[..., b] * angle.sin()
    out[..., b] = t[..., b] * angle.cos() + t[..., a] * angle.sin()
    return out


def _reference(site, grid: torch.Tensor) -> torch.Tensor:
    """The layer's maps from its block's normalised grid: (B, nW, H, Nw, Nw) per window, or (B, H, N, N) global."""
    window = int(site.block.window_size)
    tokens = _windows(grid.double(), window)[0] if window else grid.double().flatten(1, 2)
    q, k = _q_k(site.module, tokens, site.num_heads)
    theta = float(site.block.config.rope_parameters["rope_theta"])
    positions = site.block.position_ids  # the layer's (N, 2) positions, the rotation written out here
    q, k = _rotated(q, positions, theta), _rotated(k, positions, theta)
    return torch.softmax(q @ k.transpose(-1, -2) * site.module.head_dim**-0.5, -1)


@torch.no_grad()
def test_maps_are_softmax_of_pairwise_rotated_q_k_in_each_zero_padded_window():
    model, inputs = _build()
    run, sites, seen = _recorded(model, inputs, modes=None, attention="full")
    assert [int(s.block.window_size) for s in sites] == [2, 0, 2]
    for site in sites:
        want = _reference(site, seen[site.layer])
        got = run.attention(site.layer, "full")
        assert got.shape == want.shape, f"{site.path}: {tuple(got.shape)} vs {tuple(want.shape)}"
        assert float((got.double() - want).abs().max()) < 1e-5, site.path
    assert tuple(run.attention(0, "full").shape) == (2, 6, 4, 4, 4)  # 5x3 padded to 6x4: six windows of 2x2
    assert tuple(run.attention(1, "full").shape) == (2, 4, 15, 15)


@torch.no_grad()
def test_rotating_halves_instead_of_interleaved_pairs_would_differ():
    """The reference is not blind to the pairing: rotating halves (i, i + d_k/2), as HF's other RoPE models do, gives
    other maps from the same q, k and angles."""
    model, inputs = _build()
    run, sites, seen = _recorded(model, inputs, modes=None, attention="full")
    site = sites[1]
    q, k = _q_k(site.module, seen[1].double().flatten(1, 2), site.num_heads)
    theta = float(site.block.config.rope_parameters["rope_theta"])
    q, k = (_rotated(t, site.block.position_ids, theta, halves=True) for t in (q, k))
    wrong = torch.softmax(q @ k.transpose(-1, -2) * site.module.head_dim**-0.5, -1)
    assert float((run.attention(1, "full").double() - wrong).abs().max()) > 1e-3


@torch.no_grad()
def test_token_modes_on_the_image_grid_rebuild_the_content_logits_before_the_rotation():
    """Query and key maps lie on the (unpadded) 5x3 image grid, row-major: Σ_n σ_n (x_i·u_n)(x_j·v_n) over the augmented
    spectrum is q_i·k_j before the rotation, for every pair of grid tokens (windowed layers included)."""
    model, inputs = _build()
    run, sites, seen = _recorded(model, inputs, modes="all", augmented=True, attention=None)
    for site in sites:
        grid = seen[site.layer].double()
        q, k = _q_k(site.module, grid.flatten(1, 2), site.num_heads)
        want = q @ k.transpose(-1, -2)
        query, key = run.query(site.layer).double(), run.key(site.layer).double()
        assert query.shape[-1] == 15, site.path
        got = torch.einsum("bhkn,hk,bhkm->bhnm", query, torch.as_tensor(run.spectrum(site.layer).S).double(), key)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, site.path
        assert "RoPE turns q and k" in site.content_only()  # analyses of the one form say they are content-only


@torch.no_grad()
def test_each_layer_says_the_image_grid_and_its_windows():
    model, inputs = _build()
    run, sites, _ = _recorded(model, inputs, modes=2, attention="full")
    for site in sites:
        geometry = run.geometry(site.layer)
        assert tuple(geometry.grid) == (5, 3), site.path
        windowed = bool(site.block.window_size)
        assert (geometry.window is None) is (not windowed), site.path
        assert not windowed or geometry.window["size"] == [2, 2], site.path


@torch.no_grad()
def test_rope_bands_of_windowed_and_global_layers_rebuild_the_rotated_logits():
    """One band per pair, biases folded in (x̃ = [x; 1]): Σ_f cos Δφ_f x̃^T W_q^T P_f W_k x̃ + sin Δφ_f x̃^T W_q^T J_f W_k x̃,
    the angles read off the call's tables, equals the rotated q·k written out here, per window and globally."""
    from qkhooks.models.rope import rope_band_summary

    model, inputs = _build()
    sites = qkhooks.sites(model)
    calls = module_calls(model, {s.layer: s.module for s in sites}, inputs, lambda l, a, kw: (a[0].flatten(1, 2), a[1]))
    theta = float(sites[0].block.config.rope_parameters["rope_theta"])
    for site in sites:
        x, tables = calls[site.layer]  # (B·nW or B, N, d): the tokens the module is handed, zero padding included
        logits = rope_band_logits(site, x, tables)
        q, k = _q_k(site.module, x.double(), site.num_heads)
        want = _rotated(q, site.block.position_ids, theta) @ _rotated(k, site.block.position_ids, theta).transpose(-1, -2)
        assert float((logits - want).abs().max() / want.abs().max()) < 1e-6, site.path
    summary = rope_band_summary(model, sites, 2)  # every layer, its tables read on its window or on the native grid
    assert sorted(summary) == [0, 1, 2]
    assert all(sorted(p for b in summary[l] for p in b["pairs"]) == [0, 1, 2, 3] for l in summary)  # d_k 8: 4 pairs


def test_a_dataset_run_stores_each_layers_window_maps_and_grid_as_the_live_recording(tmp_path):
    from qkhooks.store import open_run

    model, _ = _build()
    maps = record_live_full_maps(model, (70, 42), tmp_path / "sam3.h5")
    with open_run(tmp_path / "sam3.h5") as run:
        assert sorted(maps) == [0, 1, 2]
        for layer, live in maps.items():
            torch.testing.assert_close(torch.as_tensor(run.attention(layer, "full")[:]), torch.cat(live), atol=0, rtol=0)
        assert all(tuple(run.geometry(l).grid) == (5, 3) for l in range(3))
        assert run.geometry(0).window["windows"] == 6

