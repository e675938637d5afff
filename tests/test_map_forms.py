"""Attention maps that are not one softmax(scale·q·k + bias): differential attention and ConViT's GPSA
(:mod:`qkhooks.models.two_softmax`). Every reference is computed here from the model's own parameters and the tokens
its attention module receives (a plain forward pre-hook), or read off the model's own eager softmax, never from
qkhooks' own rebuild."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_zoo import perturb


def _inputs_of(model: torch.nn.Module, modules: dict[str, torch.nn.Module], images: torch.Tensor):
    """The model's output and the tokens each named module receives."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
               for n, m in modules.items()]
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        for h in handles:
            h.remove()
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
    eager: list[torch.Tensor] = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, a, o: eager.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
        attn.fused_attn = True
    with qkhooks.record(model, modes=2, attention="full", layers=[0]) as rec:
        with torch.no_grad():
            model(images)
    assert rec.sites[0].qk_norm is not None
    lam = attn._compute_lambda().detach()
    want = eager[0][:, 0::2] - lam * eager[0][:, 1::2]
    torch.testing.assert_close(rec.attention(0, "full"), want, atol=1e-6, rtol=0)


def test_differential_layers_are_refused_for_run_files_and_terms_need_full_maps():
    from qkhooks.stream import probe_geometry

    model = _dwee()
    sites = qkhooks.sites(model)
    with pytest.raises(QKHooksError, match=r"differential attention: its modes have 2H component heads"):
        probe_geometry(model, sites, (32, 32))
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
