"""Attention maps that are not one softmax(scale·q·k + bias): differential attention and ConViT's GPSA
(:mod:`qkhooks.models.two_softmax`). Every reference is computed here from the model's own parameters and the tokens
its attention module receives (a plain forward pre-hook), or read off the model's own eager softmax, never from
qkhooks' own rebuild."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from conftest import forward_with_hooks, timm_module_eager_maps
from test_zoo import perturb


def _inputs_of(model: torch.nn.Module, modules: dict[str, torch.nn.Module], images: torch.Tensor):
    """The model's output and the tokens each named module receives."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
               for n, m in modules.items()]
    out = forward_with_hooks(model, handles, images)
    return out, seen


def _mode_logits(rec, layer: int) -> torch.Tensor:
    """Σ_n σ_n (x·u_n)(x·v_n) · scale per head, from the recorded projections (augmented: biases folded in)."""
    spec, site = rec.spectrum(layer), next(s for s in rec.sites if s.layer == layer)
    return torch.einsum("bhkn,hk,bhkm->bhnm", rec.query(layer).double(), spec.S.double(), rec.key(layer).double()) * site.scale


# ------------------------------------------------------------------------------------------ differential attention
def _dwee(**kw) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, embed_dim=32, depth=2,
                                     num_heads=4, img_size=32, patch_size=8, **kw)).eval()


def _diff_reference(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(component logits (B, 2H, N, N) scaled, softmax1, softmax2 (B, H, N, N), λ), written out from the parameters."""
    heads, dk = 2 * attn.num_heads, attn.head_dim
    width = heads * dk
    w, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    qkv = x.double() @ w.T + b
    q = qkv[..., :width].unflatten(-1, (heads, dk)).transpose(1, 2)
    k = qkv[..., width:2 * width].unflatten(-1, (heads, dk)).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * dk**-0.5
    maps = logits.softmax(-1)
    lam = (torch.exp((attn.lambda_q1 * attn.lambda_k1).sum().double()) - torch.exp((attn.lambda_q2 * attn.lambda_k2).sum().double())
           + attn.lambda_init).detach()
    return logits, maps[:, 0::2], maps[:, 1::2], lam


def test_differential_maps_terms_and_component_modes_are_exact():
    """Full maps = softmax1 − λ·softmax2 (H heads, the model's shape), each term on its own, and the modes of the 2H
    component forms W_q,j^T W_k,j rebuild each component's own logits q_j·k_j; outputs unchanged (fused attention)."""
    model = _dwee(qkv_bias=True)
    attns = {f"blocks.{i}.attn": b.attn for i, b in enumerate(model.blocks)}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, xs = _inputs_of(model, attns, images)
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as rec:
        with torch.no_grad():
            out = model(images)
    assert torch.equal(out, plain)
    for layer, (path, attn) in enumerate(attns.items()):
        site = rec.sites[layer]
        assert site.path == path and site.num_heads == 8 and site.head_dim == 4 and not site.modes_rebuild_logits()
        logits, s1, s2, lam = _diff_reference(attn, xs[path])
        terms = rec.terms(layer)
        torch.testing.assert_close(terms["softmax1"].double(), s1, atol=1e-6, rtol=0)
        torch.testing.assert_close(terms["softmax2"].double(), s2, atol=1e-6, rtol=0)
        assert abs(float(terms["lambda"]) - float(lam)) < 1e-6 and abs(float(lam)) > 1e-3
        full = rec.attention(layer, "full")
        assert full.shape == (2, 4, 17, 17)  # 1 register + 4x4 patches, 4 heads (the model's combined map)
        torch.testing.assert_close(full.double(), s1 - lam * s2, atol=1e-6, rtol=0)
        # a difference of maps, no softmax of one form: every row sums to 1 − λ
        torch.testing.assert_close(full.double().sum(-1), (1 - lam).expand(2, 4, 17), atol=1e-6, rtol=0)
        torch.testing.assert_close(_mode_logits(rec, layer), logits, atol=1e-5, rtol=1e-5)
        assert "differential attention" in site.content_only()


@pytest.mark.parametrize("build", [_dwee, lambda: _convit()], ids=["differential", "gpsa"])
def test_two_softmax_maps_and_terms_come_from_one_product_of_q_and_k(build, monkeypatch):
    """A two-softmax layer recording full maps computes scale·q·kᵀ once (its maps are combined from the terms it
    keeps), not once for the maps and again for the terms; the maps still equal the terms combined by hand."""
    from qkhooks import sdpa

    model = build()
    calls: list[tuple[int, ...]] = []
    product = sdpa._scaled_logits  # every product of q and k at these token counts (below the per-image path's)
    monkeypatch.setattr(sdpa, "_scaled_logits", lambda q, k, scale: calls.append(tuple(q.shape)) or product(q, k, scale))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with qkhooks.record(model, modes="all", attention="full") as rec:
        with torch.no_grad():
            model(images)
    assert len(calls) == len(rec.layers)  # one product per layer
    for layer in rec.layers:
        if not hasattr(rec.sites[layer], "map_terms"):  # ConViT's last block: plain attention
            continue
        terms, full = rec.terms(layer), rec.attention(layer, "full").double()
        if "softmax1" in terms:
            want = terms["softmax1"].double() - terms["lambda"].double() * terms["softmax2"].double()
        else:
            gate = terms["gate"].double().view(1, -1, 1, 1)
            mix = (1 - gate) * terms["content"].double() + gate * terms["position"].double()
            want = mix / mix.sum(-1, keepdim=True)
        torch.testing.assert_close(full, want, atol=1e-6, rtol=0)


def test_differential_rows_are_the_rows_of_the_combined_maps():
    model = _dwee()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    attn = model.blocks[1].attn
    _, xs = _inputs_of(model, {"a": attn}, images)
    tokens = torch.tensor([[0, 3], [2, 4]])
    with qkhooks.record(model, modes=None, attention="rows", layers=[1]) as rec:
        rec.set_batch(query_tokens=tokens)
        with torch.no_grad():
            model(images)
    _, s1, s2, lam = _diff_reference(attn, xs["a"])
    want = torch.stack([(s1 - lam * s2)[b, :, tokens[b]] for b in range(2)])
    torch.testing.assert_close(rec.attention(1, "rows").double(), want, atol=1e-6, rtol=0)


def test_differential_attention_with_qk_norm_rebuilds_the_models_eager_maps():
    """q/k RMSNorm per component head: maps from the normalised q, k equal the model's own eager softmaxes combined."""
    model = _dwee(qk_norm=True)
    attn = model.blocks[0].attn
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = _eager_differential_maps(model, attn, images)
    with qkhooks.record(model, modes=2, attention="full", layers=[0]) as rec:
        with torch.no_grad():
            model(images)
    assert rec.sites[0].qk_norm is not None
    torch.testing.assert_close(rec.attention(0, "full"), want, atol=1e-6, rtol=0)


def _eager_differential_maps(model: torch.nn.Module, attn: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's own non-fused softmaxes of ``attn`` (its attn_drop input, 2H component heads) combined as its
    forward combines them: softmax1 − λ·softmax2 with its own λ."""
    eager = timm_module_eager_maps(model, attn, images)
    return eager[0][:, 0::2] - attn._compute_lambda().detach() * eager[0][:, 1::2]


def test_differential_attention_inside_parallel_blocks_reads_the_blocks_own_norm_and_projection():
    """vit_dpwee: the block normalises its input and projects [MLP | q | k | v] in one Linear; maps = the model's eager
    softmaxes combined with its λ, modes rebuild q_j·k_j of the component heads from in_norm(x), written out here."""
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("vit_dpwee_patch16_reg1_gap_256", pretrained=False, embed_dim=32, depth=2,
                                      num_heads=4, img_size=32, patch_size=8, qkv_bias=True)).eval()
    block = model.blocks[1]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    _, xs = _inputs_of(model, {"b": block}, images)
    want = _eager_differential_maps(model, block, images)
    with qkhooks.record(model, modes="all", augmented=True, attention="full", layers=[1]) as rec:
        with torch.no_grad():
            model(images)
    assert rec.module_paths == {1: "blocks.1"}
    torch.testing.assert_close(rec.attention(1, "full"), want, atol=1e-6, rtol=0)
    with torch.no_grad():
        y = block.in_norm(xs["b"]).double()
        w, b = block.in_proj.weight.double(), block.in_proj.bias.double()
        rows = slice(block.in_split[0], block.in_split[0] + 64)
        qk = y @ w[rows].T + b[rows]
    q, k = (t.unflatten(-1, (8, 4)).transpose(1, 2) for t in qk.chunk(2, -1))
    torch.testing.assert_close(_mode_logits(rec, 1), (q @ k.transpose(-1, -2)) * 0.5, atol=1e-5, rtol=1e-5)


def test_differential_geometry_names_its_component_heads_and_terms_need_full_maps():
    """zoo13: run files take differential layers (tests/test_differential_runs.py); their geometry tells the 4 map
    heads from the 8 component heads the modes have."""
    from qkhooks.stream import probe_geometry

    model = _dwee()
    sites = qkhooks.sites(model)
    geometry = probe_geometry(model, sites, (32, 32))
    assert [(g.heads, g.component_heads) for g in geometry.values()] == [(4, 8), (4, 8)]
    with qkhooks.record(model, modes=2, attention="full:1") as rec:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    with pytest.raises(QKHooksError, match="full"):
        rec.terms(0)
    assert set(rec.terms(1)) == {"softmax1", "softmax2", "lambda"}


# ------------------------------------------------------------------------------------------------- ConViT GPSA
def _convit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model("convit_tiny", pretrained=False, depth=3, local_up_to_layer=2, embed_dim=32,
                                     num_heads=4, img_size=32, patch_size=8, qkv_bias=True)).eval()


def _relative_indices(side: int) -> torch.Tensor:
    """(N, N, 3): (Δcol, Δrow, Δcol² + Δrow²) of key minus query on a side x side grid, row by row."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    r, c = rows.flatten().double(), cols.flatten().double()
    dc, dr = c[None, :] - c[:, None], r[None, :] - r[:, None]
    return torch.stack([dc, dr, dc**2 + dr**2], -1)


def test_gpsa_maps_terms_and_content_modes_are_exact_and_every_convit_block_is_recorded():
    """GPSA map = renormalised (1 − σ(g))·softmax(scale·q·k) + σ(g)·softmax(pos_proj(r)), written out here (r from the
    grid, not the module's buffer) and equal to the model's eager map; the modes rebuild the content logits q·k; the
    MHSA block after it stays plain. No skip_unmodelled needed."""
    model = _convit()
    gpsa = {f"blocks.{i}.attn": model.blocks[i].attn for i in range(2)}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    eager: dict[str, torch.Tensor] = {}
    handles = [m.attn_drop.register_forward_hook(lambda mod, a, o, n=n: eager.__setitem__(n, o.detach().clone()))
               for n, m in gpsa.items()]
    try:
        plain, xs = _inputs_of(model, gpsa, images)
    finally:
        for h in handles:
            h.remove()
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as rec:
        with torch.no_grad():
            out = model(images)
    assert torch.equal(out, plain)
    assert rec.module_paths == {0: "blocks.0.attn", 1: "blocks.1.attn", 2: "blocks.2.attn"} and not rec.left_out
    for layer, (path, attn) in enumerate(gpsa.items()):
        x = xs[path].double()
        qk = x @ attn.qk.weight.double().T + attn.qk.bias.double()
        dk = attn.dim // 4  # ConViT multiplies embed_dim by the heads: 4 heads of 32
        q, k = (t.unflatten(-1, (4, dk)).transpose(1, 2) for t in qk.chunk(2, -1))
        logits = (q @ k.transpose(-1, -2)) * dk**-0.5
        content = logits.softmax(-1)
        pos = (_relative_indices(4) @ attn.pos_proj.weight.double().T + attn.pos_proj.bias.double()).permute(2, 0, 1).softmax(-1)
        gate = torch.sigmoid(attn.gating_param.double())
        mix = (1 - gate[None, :, None, None]) * content + gate[None, :, None, None] * pos
        want = mix / mix.sum(-1, keepdim=True)
        terms = rec.terms(layer)
        torch.testing.assert_close(terms["content"].double(), content, atol=1e-6, rtol=0)
        torch.testing.assert_close(terms["position"].double(), pos, atol=1e-6, rtol=0)
        torch.testing.assert_close(terms["gate"].double(), gate, atol=1e-7, rtol=0)
        got = rec.attention(layer, "full")
        assert got.shape == eager[path].shape == (2, 4, 16, 16) and rec.sites[layer].num_prefix_tokens == 0
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, eager[path], atol=1e-6, rtol=0)
        torch.testing.assert_close(_mode_logits(rec, layer), logits, atol=1e-5, rtol=1e-5)
    assert rec.sites[2].num_prefix_tokens == 1 and not hasattr(rec.sites[2], "map_terms")
    with pytest.raises(QKHooksError, match="one softmax per map"):
        rec.terms(2)


def test_gpsa_rows_carry_the_position_term_of_their_own_query_rows():
    model = _convit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tokens = torch.tensor([[0, 5], [15, 6]])
    with qkhooks.record(model, modes=None, attention="rows+full", layers=[0]) as rec:
        rec.set_batch(query_tokens=tokens)
        with torch.no_grad():
            model(images)
    full = rec.attention(0, "full")
    want = torch.stack([full[b, :, tokens[b]] for b in range(2)])
    torch.testing.assert_close(rec.attention(0, "rows"), want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- Llama 4 vision RoPE
def _llama4() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.Llama4VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, image_size=32, patch_size=8, vision_output_dim=32,
                                             projector_input_dim=32, projector_output_dim=32)
    return perturb(transformers.Llama4VisionModel(config)).eval()


def _turn_pairs(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d_k) turned pair by pair: (t_2i, t_2i+1) by the angle of freqs[n, i], written as a real rotation."""
    cos, sin = freqs.real.double(), freqs.imag.double()
    a, b = t[..., 0::2], t[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def test_llama4_vision_maps_are_the_softmax_of_pairwise_rotated_q_k_and_modes_the_content_form():
    """Maps = softmax(scale · R(q)·R(k)) with R the rotation of interleaved pairs by the call's own freqs_ci (written
    here as a real rotation, not the model's complex product), equal to the model's eager weights; modes rebuild the
    unrotated content logits q·k; no grid is claimed (class token last)."""
    model = _llama4()
    layers = model.model.layers
    attns = {f"model.layers.{i}.self_attn": layer.self_attn for i, layer in enumerate(layers)}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    freqs: list[torch.Tensor] = []
    handle = layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: freqs.append(kw["freqs_ci"].detach().clone().reshape(17, -1)), with_kwargs=True)
    xs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, n=n: xs.__setitem__(n, (a[0] if a else kw["hidden_states"]).detach().clone()),
                                         with_kwargs=True) for n, m in attns.items()]
    try:
        with torch.no_grad():
            plain = model(images).last_hidden_state
    finally:
        for h in [handle, *hooks]:
            h.remove()
    eager: dict[str, torch.Tensor] = {}
    model.set_attn_implementation("eager")
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: eager.__setitem__(n, o[1].detach().clone()))
             for n, m in attns.items()]
    try:
        forward_with_hooks(model, hooks, images)
    finally:
        model.set_attn_implementation("sdpa")
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as rec:
        with torch.no_grad():
            out = model(images).last_hidden_state
    assert torch.equal(out, plain)
    assert freqs[0].shape == (17, 4) and bool((freqs[0][:-1].imag != 0).any())  # 16 patches + the class token, d_k/2
    for layer, (path, attn) in enumerate(attns.items()):
        x = xs[path].double()
        q = (x @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()).unflatten(-1, (4, 8)).transpose(1, 2)
        k = (x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()).unflatten(-1, (4, 8)).transpose(1, 2)
        want = ((_turn_pairs(q, freqs[0]) @ _turn_pairs(k, freqs[0]).transpose(-1, -2)) * 8**-0.5).softmax(-1)
        got = rec.attention(layer, "full")
        assert got.shape == eager[path].shape == (2, 4, 17, 17)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, eager[path], atol=1e-6, rtol=0)
        torch.testing.assert_close(_mode_logits(rec, layer), (q @ k.transpose(-1, -2)) * 8**-0.5, atol=1e-5, rtol=1e-5)
        assert rec.sites[layer].rope_layout == "interleaved" and rec.sites[layer].num_prefix_tokens == 0
    with pytest.raises(QKHooksError, match="class token after the patches"):
        rec.sites[0].grid_for(17)


def test_llama4_vision_refuses_an_attention_mask_its_attention_ignores():
    """Llama4VisionAttention takes ``attention_mask`` but hands its attention function None: the model's maps are
    unmasked. A mask given to the encoder is refused by name, never added to the rebuilt maps (it was, silently)."""
    model = _llama4()
    seen: dict = {}
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"], freqs=kw["freqs_ci"]), with_kwargs=True)
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    hook.remove()
    n = seen["x"].shape[1]
    mask = torch.zeros(2, 1, n, n)
    mask[..., :3] = float("-inf")
    with torch.no_grad():
        eager = _with_eager(model, lambda: model.model(seen["x"], freqs_ci=seen["freqs"], attention_mask=mask,
                                                       output_attentions=True).attentions[0])
    assert float(eager[..., :3].sum()) > 1.0  # the masked keys keep their weight: the model ignores the mask
    with pytest.raises(QKHooksError, match=r"passes 'attention_mask' \(a \(2, 1, \d+, \d+\) tensor\)"):
        with torch.no_grad(), qkhooks.record(model, modes=0, attention="full"):
            model.model(seen["x"], freqs_ci=seen["freqs"], attention_mask=mask)


def _with_eager(model: torch.nn.Module, call):
    """``call()`` with the model's attention set to eager (output_attentions needs it), then set back."""
    before = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        return call()
    finally:
        model.config._attn_implementation = before


def test_llama4_vision_rows_of_chosen_tokens_use_the_rotated_keys():
    model = _llama4()
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    tokens = torch.tensor([[16, 5]])  # the class token (last) and a patch
    with qkhooks.record(model, modes=None, attention="rows+full") as rec:
        rec.set_batch(query_tokens=tokens)
        with torch.no_grad():
            model(images)
    torch.testing.assert_close(rec.attention(1, "rows"), rec.attention(1, "full")[:, :, [16, 5]], atol=1e-6, rtol=0)


def test_llama4_vision_rope_bands_read_the_pairs_off_its_complex_tables_and_refuse_run_files():
    """The band summary runs on the model's own freqs_ci: its 4 interleaved pairs, two with the column and two with the
    row (the same step along the grid: a frequency 1 and θ^(-1/2) apart); run files are refused with the reason."""
    from qkhooks.models.rope import rope_band_summary
    from qkhooks.stream import probe_geometry

    model = _llama4()
    sites = qkhooks.sites(model)
    summary = rope_band_summary(model, sites, 2)
    assert sorted(summary) == [0, 1]
    high, low = summary[0]
    assert sorted(high["pairs"] + low["pairs"]) == [0, 1, 2, 3] and sorted(high["pairs"]) == [0, 2]  # pair 0: x, 2: y
    assert high["frequency"][0] == pytest.approx(1.0, abs=1e-6) and low["frequency"][1] < 1.0
    with pytest.raises(QKHooksError, match="class token after the patches"):
        probe_geometry(model, sites, (32, 32))


# --------------------------------------------------------------------------------------- VideoPrism soft-capped logits
def _videoprism(cap: float | None = 0.5) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.VideoPrismVisionConfig(hidden_size=32, num_spatial_layers=2, num_temporal_layers=2,
                                                 num_attention_heads=4, intermediate_size=64, image_size=32, num_frames=4,
                                                 tubelet_size=[1, 8, 8], attn_logit_softcapping=cap or 0.5, qkv_bias=True)
    model = perturb(transformers.VideoPrismVisionModel(config)).eval()
    for module in model.modules():  # the config takes a float only; a module without a cap skips it (None)
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = cap
    return model


def test_videoprism_maps_are_the_softmax_of_capped_logits_in_forward_order_and_modes_the_logits_before_the_cap():
    """Spatial layers: each frame's 16 patches (batch axis clips x frames); temporal layers: each patch's 4 frames (clips
    x patches). Maps = softmax(c·tanh(scale·q·k / c)), q, k written out here from the tokens each module receives, and
    the cap matters (without it the maps differ); the modes rebuild scale·q·k before the cap."""
    model = _videoprism()
    attns = {f"{stage}.{i}.attention": getattr(model, stage)[i].attention
             for stage in ("spatial_layers", "temporal_layers") for i in range(2)}
    clips = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    xs: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def keep(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            xs[name] = args[0].detach().clone()
            order.append(name)

        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in attns.items()]
    plain = forward_with_hooks(model, hooks, pixel_values_videos=clips).last_hidden_state
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as rec:
        with torch.no_grad():
            out = model(pixel_values_videos=clips).last_hidden_state
    assert torch.equal(out, plain)
    assert [rec.module_paths[l] for l in rec.layers] == order == list(attns)
    for layer, (path, attn) in enumerate(attns.items()):
        x = xs[path].double()
        with torch.no_grad():
            q = (x @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()).unflatten(-1, (4, 8)).transpose(1, 2)
            k = (x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()).unflatten(-1, (4, 8)).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * 8**-0.5
        want = (0.5 * torch.tanh(logits / 0.5)).softmax(-1)
        got = rec.attention(layer, "full")
        rows, tokens = (8, 16) if layer < 2 else (32, 4)  # 2 clips x 4 frames of 4x4 patches, 2 clips x 16 patches of 4 frames
        assert got.shape == (rows, 4, tokens, tokens)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
        assert float((got.double() - logits.softmax(-1)).abs().max()) > 1e-3  # the cap is not a no-op here
        torch.testing.assert_close(_mode_logits(rec, layer), logits, atol=1e-5, rtol=1e-5)
        site = rec.sites[layer]
        assert "soft-capped" in site.content_only() and not site.modes_rebuild_logits()
        assert site.grid_for(tokens) == ((4, 4) if layer < 2 else (1, 4))


def test_videoprism_rows_compute_every_key_under_the_cap_and_run_files_are_refused():
    """Rows of chosen tokens equal the full maps' rows (the q·b_k term shared by a row's keys does not cancel under the
    cap); a model without a cap has plain maps; run files are refused with the reason."""
    from qkhooks.stream import probe_geometry

    clips = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    for cap in (0.5, None):
        model = _videoprism(cap)
        # query tokens per row of the layer's batch axis: spatial layer 0 has the 4 frames of the one clip
        with qkhooks.record(model, modes=None, attention="rows+full", layers=[0]) as rec:
            rec.set_batch(query_tokens=torch.tensor([[0, 5]]).expand(4, -1))
            with torch.no_grad():
                model(pixel_values_videos=clips)
        torch.testing.assert_close(rec.attention(0, "rows"), rec.attention(0, "full")[:, :, [0, 5]], atol=1e-6, rtol=0)
        assert rec.sites[0].keys_shape_logits() == (cap is not None)
    with pytest.raises(QKHooksError, match="clips x frames"):
        probe_geometry(model, qkhooks.sites(model), (32, 32))


# ------------------------------------------------------------------------------------------ ImageGPT causal tokens
def _imagegpt(**kw) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.ImageGPTConfig(n_embd=32, n_layer=2, n_head=4, n_positions=16, **kw)
    return perturb(transformers.ImageGPTModel(config)).eval()


@pytest.mark.parametrize("kw", [{}, {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}],
                         ids=["plain", "inverse-layer-scale"])
def test_imagegpt_maps_are_causal_softmax_of_its_conv1d_q_k_and_modes_rebuild_the_allowed_logits(kw):
    """Maps = softmax over keys j ≤ i of q_i·k_j / √d_k (/ (layer + 1) where the config says so), q, k written out here
    from c_attn's (d, 3d) weight, equal to the model's eager weights; the modes rebuild those logits below the diagonal;
    the grid is the 4x4 image only when all 16 tokens are there."""
    model = _imagegpt(**kw)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(10))
    attns = {f"h.{i}.attn": block.attn for i, block in enumerate(model.h)}
    xs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw_, n=n: xs.__setitem__(n, (a[0] if a else kw_["hidden_states"]).detach().clone()),
                                         with_kwargs=True) for n, m in attns.items()]
    try:
        with torch.no_grad():
            plain = model(input_ids=ids).last_hidden_state
            eager = model(input_ids=ids, output_attentions=True).attentions
    finally:
        for h in hooks:
            h.remove()
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as rec:
        with torch.no_grad():
            out = model(input_ids=ids).last_hidden_state
    assert torch.equal(out, plain)
    below = torch.ones(16, 16, dtype=torch.bool).tril()
    for layer, (path, attn) in enumerate(attns.items()):
        x = xs[path].double()
        w, b = attn.c_attn.weight.detach().double(), attn.c_attn.bias.detach().double()
        q = (x @ w[:, :32] + b[:32]).unflatten(-1, (4, 8)).transpose(1, 2)
        k = (x @ w[:, 32:64] + b[32:64]).unflatten(-1, (4, 8)).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * 8**-0.5 / ((layer + 1) if kw else 1)
        want = logits.masked_fill(~below, float("-inf")).softmax(-1)
        got = rec.attention(layer, "full")
        assert got.shape == eager[layer].shape == (2, 4, 16, 16)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, eager[layer], atol=1e-6, rtol=0)
        modes = _mode_logits(rec, layer)
        torch.testing.assert_close(modes.where(below, 0), logits.where(below, 0), atol=1e-5, rtol=1e-5)
    site = rec.sites[0]
    assert site.grid_for(16) == (4, 4) and site.modes_rebuild_logits()
    with pytest.raises(QKHooksError, match="not the whole image"):
        site.grid_for(8)
    with pytest.raises(QKHooksError, match="a mask"):
        rec.bias(0)


def test_imagegpt_refuses_a_call_that_continues_a_cache_and_run_files():
    from qkhooks.stream import probe_geometry

    model = _imagegpt()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :8], use_cache=True).past_key_values
    with pytest.raises(QKHooksError, match="continues a cache"):
        with qkhooks.record(model, modes=2, attention="full"), torch.no_grad():
            model(input_ids=ids[:, 8:], cache=cache, use_cache=True)
    with pytest.raises(QKHooksError, match="token ids"):
        probe_geometry(model, qkhooks.sites(model), (32, 32))


def test_convit_run_file_stores_the_gpsa_maps_and_modes_of_the_live_recording(tmp_path):
    """A run file of ConViT keeps every block: the GPSA layer's stored full maps and query maps are the live
    recording's (the terms stay live-only: rec.terms(l))."""
    from qkhooks.models.load import load_model
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset

    model = _convit()
    live: list[tuple[torch.Tensor, torch.Tensor]] = []
    record_dataset(load_model(model), "samples", tmp_path / "convit.h5", limit=2, batch_size=2, progress=False,
                   dtype="float32", modes=2, attention="full:0", reducers=[],
                   on_batch=lambda b: live.append((b.attention(0, "full").clone(), b.query(0).clone())))
    with open_run(tmp_path / "convit.h5") as run:
        assert run.layers == [0, 1, 2]
        torch.testing.assert_close(torch.as_tensor(run.attention(0, "full")[:]), live[0][0], atol=0, rtol=0)
        torch.testing.assert_close(torch.as_tensor(run.query(0)[:]), live[0][1], atol=0, rtol=0)
