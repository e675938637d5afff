"""Windowed attention forms beyond Swin v1, each against the model's own computation: Swin-v2's cosine attention
(timm ``swinv2_*``, ``swinv2_cr_*``, HF ``Swinv2Model``) with its exact normalised form (models/cosine.py); MaxViT's
block and grid partitions, Twins' locally grouped attention (models/windows.py). The maps of every form are checked against eager in test_zoo."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from test_zoo import FAST_CASES, Case, _call, assert_maps_project_tokens, eager_maps, module_calls, perturb

SWIN_V2 = [c for c in FAST_CASES if c.name in ("swinv2_tiny_window8_256", "swinv2_tiny_window8_256-padded",
                                               "swinv2_cr_tiny_224", "Swinv2Model", "Swinv2Model-padded")]


def _build(case: Case):
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs()


def _seen_tokens(model, inputs, modules: dict[int, torch.nn.Module]) -> dict[int, torch.Tensor]:
    """The first argument of each module's call, (B, ..., d) flattened to (B, N, d)."""
    return module_calls(model, modules, inputs,
                        lambda layer, a, kw: (a[0] if a else next(iter(kw.values()))).detach().flatten(1, -2))


@pytest.mark.parametrize("case", SWIN_V2, ids=lambda c: c.name)
def test_cosine_form_rebuilds_the_models_own_logits_from_modes_divided_by_the_token_norms(case: Case):
    """τ_h/d_k · x̃_i^T W̃_q^T W̃_k x̃_j / (s_q,i s_k,j), s = |q|/√d_k (the RMS form with γ_q = τ_h/d_k, ε = 0), plus the
    model's own log-CPB bias and shift mask, equals the model's eager logits (log A, up to a constant per row); its
    middle form is τ_h/d_k times the augmented content form, read off the weights here."""
    from qkhooks.models.qknorm import normalised_form

    model, inputs = _build(case)
    sites = qkhooks.sites(model)
    tokens = _seen_tokens(model, inputs, {s.layer: s.module for s in sites})  # (B·nW, Nw, d) per window
    eager = eager_maps(model, sites, inputs, case.kind)
    with qkhooks.record(model, modes=None, attention="full") as run:
        _call(model, inputs)
        bias = {s.layer: s.logit_bias() for s in run.sites}  # log-CPB + shift mask of this call, (B·nW or 1, H, Nw, Nw)
    for site, want in zip(sites, eager):
        form = normalised_form(site)
        logits = form.logits(tokens[site.layer]) + bias[site.layer].double()
        own = want.double().clamp_min(1e-30).log()
        diff = (logits - logits[..., :1]) - (own - own[..., :1])
        keep = (want.double() > 1e-12) & (want[..., :1].double() > 1e-12)  # masked keys carry no logit
        err = float(diff.abs().where(keep, 0).max())
        assert err < 1e-5 * (1 + float(own.abs().max())), f"{site.path}: the cosine form misses the model's logits by {err:.1e}"
        w = site.weights()
        zeros = torch.zeros(w.w_k.shape[:2])
        wq = torch.cat([w.w_q, (zeros if w.b_q is None else w.b_q)[..., None]], -1).double()
        wk = torch.cat([w.w_k, (zeros if w.b_k is None else w.b_k)[..., None]], -1).double()
        tau = torch.clamp(site.module.logit_scale.detach().double().reshape(-1), max=torch.log(torch.tensor(100.0))).exp()
        middle = tau[:, None, None] / site.head_dim * (wq.transpose(1, 2) @ wk)
        dense = torch.einsum("hdr,hr,her->hde", form.U, form.S, form.V)
        assert torch.allclose(dense, middle, atol=1e-10 * float(middle.abs().max()))


TWINS_LSA = [c for c in FAST_CASES if c.name.startswith("twins_svt_small")]


@pytest.mark.parametrize("case", SWIN_V2 + TWINS_LSA, ids=lambda c: c.name)
def test_windowed_modes_are_the_image_grid_tokens_projected(case: Case):
    """The query and key maps of a windowed layer are the image-grid tokens entering W_q/W_k projected onto u_n and
    v_n, in grid order: Swin-v2 is post-norm, so those are its block's input (timm (B, H, W, C), transformers
    (B, H·W, C)); Twins' locally grouped attention takes them itself and cuts the windows inside."""
    model, inputs = _build(case)
    sites = [s for s in qkhooks.sites(model) if s.family != "timm-twins" or s.key_tokens is None]  # Twins: its windows
    source = {s.layer: s.module if s.family == "timm-twins" else s.block for s in sites}
    grid_tokens = _seen_tokens(model, inputs, source)
    assert_maps_project_tokens(model, inputs, sites, grid_tokens)


def test_cosine_attention_names_its_content_term_and_its_temperature_is_the_models():
    """Analyses of W_q^T W_k say it is the pre-normalisation form; τ_h is the clamped exp of the model's logit_scale
    (a scale past log 100 is clamped, as the model does)."""
    case = next(c for c in SWIN_V2 if c.name == "swinv2_tiny_window8_256")
    model, _ = _build(case)
    site = qkhooks.sites(model)[0]
    assert site.scale == 1.0 and "normalised per token" in site.content_only() and not site.modes_rebuild_logits()
    with torch.no_grad():
        site.module.logit_scale[0] = 10.0  # past the clamp
        site.module.logit_scale[1] = 1.5
    assert torch.allclose(site.qk_norm.temperature(), torch.tensor([100.0, torch.e ** 1.5]))


@pytest.mark.parametrize("partition", ["window", "grid"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_maxvit_window_order_is_the_models_own_partition(partition: str, layout: str):
    """window_index reads the windows in the order timm's own partition functions lay them along the batch axis."""
    from timm.models import maxxvit

    from qkhooks.models.windows import window_index

    h, w, size = 8, 12, (2, 4)
    ids = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1)
    if layout == "nhwc":
        cut = maxxvit.window_partition if partition == "window" else maxxvit.grid_partition
        want = cut(ids, list(size)).flatten(1)
    else:
        cut = maxxvit.window_partition_nchw if partition == "window" else maxxvit.grid_partition_nchw
        want = cut(ids.permute(0, 3, 1, 2), list(size)).flatten(1)
    assert torch.equal(window_index((h, w), size, (0, 0), False, partition), want.long())


@pytest.mark.parametrize("size", [64, 48], ids=["whole-windows", "padded"])
def test_maskformer_swin_maps_are_its_own_eager_attention(size: int):
    """MaskFormer's Swin v1 backbone (HF ``MaskFormerSwinModel``, whose ``output_attentions`` path fails in the model
    itself, so it is not in the zoo): the recorded maps equal the weights its own self-attention returns when called
    again, with output_attentions, on the very windows and shift mask of the recorded call."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MaskFormerSwinConfig(image_size=size, patch_size=4, embed_dim=16, depths=[2, 2],
                                               num_heads=[2, 2], window_size=4)
    model = perturb(transformers.MaskFormerSwinModel(config))
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    sites = qkhooks.sites(model)
    calls: dict[int, tuple] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, kw, s=s: calls.__setitem__(s.layer, (a, kw)), with_kwargs=True)
               for s in sites]
    try:
        ref = _call(model, {"pixel_values": pixels}).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as run:
        out = _call(model, {"pixel_values": pixels}).last_hidden_state
    assert torch.equal(out, ref)
    shifted = 0
    for site in sites:
        args, kwargs = calls[site.layer]
        with torch.no_grad():
            want = site.module(args[0], args[1], output_attentions=True)[1]  # (B·nW, H, Nw, Nw)
        got = run.attention(site.layer, "full")
        want = want.unflatten(0, (2, -1))
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-5, site.path
        shifted += args[1] is not None
    assert shifted >= 2  # the shift masks were applied


ROWS_CASES = [c for c in FAST_CASES if c.name in ("swin_tiny_patch4_window7_224", "SwinModel", "swinv2_tiny_window8_256",
                                                  "Swinv2Model", "test_maxvit", "test_maxvit-nchw-tf")]


@pytest.mark.parametrize("case", ROWS_CASES, ids=lambda c: c.name)
def test_windowed_rows_and_pooled_on_the_image_grid_are_the_full_maps_read_there(case: Case):
    """A token's row on the image grid is its window's row of the full maps, at its keys' grid positions: the dense
    (H·W) x (H·W) map is assembled here window by window from the recorded full maps and the window layout; pooled
    attention is that row's mass on each mask."""
    model, inputs = _build(case)
    tokens = torch.tensor([[0, 2], [3, 1]])  # within the 2x2 grid of MaxViT's last stage
    layouts: dict[int, torch.Tensor] = {}
    with qkhooks.record(model, modes=None, attention=["rows", "full"]) as run, torch.no_grad():
        run(**inputs, meta={"query_tokens": tokens})
        layouts = {s.layer: s.window_index() for s in run.sites if hasattr(s, "window_index")}
    checked = 0
    for layer, index in layouts.items():
        full, rows = run.attention(layer, "full"), run.attention(layer, "rows")  # (B, nW, H, Nw, Nw), (B, H, T, N)
        dense = torch.zeros(full.shape[0], full.shape[2], index.numel(), index.numel())
        for w, cells in enumerate(index):
            dense[:, :, cells[:, None], cells[None, :]] = full[:, w]
        want = torch.stack([dense[b][:, tokens[b]] for b in range(2)])
        assert torch.allclose(rows, want, atol=1e-6), layer
        assert torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-5)
        checked += 1
    assert checked >= 2
    first = min(layouts)
    grid_tokens = run.attention(first, "rows").shape[-1]
    masks = (torch.rand(2, 3, grid_tokens, generator=torch.Generator().manual_seed(2)) > 0.5).float()  # (B, M, H·W)
    with qkhooks.record(model, modes=None, layers=[first], attention="pooled") as run2, torch.no_grad():
        run2(**inputs, meta={"query_tokens": tokens, "pool_masks": masks})
    want = torch.einsum("bhtn,bmn->bhtm", run.attention(first, "rows"), masks)
    assert torch.allclose(run2.attention(first, "pooled"), want, atol=1e-6)


def test_coatnet_residual_input_is_refused_its_norm_downsamples():
    case = next(c for c in FAST_CASES if c.name == "test_coatnet")
    model, inputs = _build(case)
    with pytest.raises(qkhooks.QKHooksError, match="input='residual' is not modelled for CoAtNet"):
        with qkhooks.record(model, modes=4, input="residual") as run, torch.no_grad():
            run(**inputs)
