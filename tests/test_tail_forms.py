"""zoo-tail forms: grouped-query attention, the reasons table of known unmodelled attention classes."""

from __future__ import annotations

import importlib

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.models.unsupported import UNMODELLED_FORMS
from conftest import forward_with_hooks

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("qualified", sorted(UNMODELLED_FORMS))
def test_every_known_form_names_a_class_of_the_installed_library(qualified: str):
    """A reason keyed by a class that no longer exists would never be given: the table must not rot."""
    module, _, name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip(f"{module} is not in this timm")
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def test_a_known_unmodelled_class_is_refused_with_its_reason_not_the_generic_words():
    model = timm.create_model("coat_lite_tiny", pretrained=False)  # zoo11-maps: ConViT's GPSA is modelled now
    with pytest.raises(QKHooksError) as info:
        qkhooks.sites(model)
    msg = str(info.value)
    assert "'serial_blocks1.0.factoratt_crpe' (FactorAttnConvRelPosEnc)" in msg and "factorised attention" in msg
    assert "no registered adapter models this class" not in msg


def test_grouped_query_content_form_is_the_query_head_against_its_groups_key_head():
    """Site weights of a grouped-query AttentionRope: query head h pairs with key head h // (H / H_kv), read directly
    off the model's own q_proj / k_proj rows."""
    model = timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, depth=1, img_size=32, num_kv_heads=1,
                              qkv_fused=False)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    (site,) = qkhooks.sites(model)
    w = site.weights()
    heads, kv, dk = attn.num_heads, attn.num_kv_heads, attn.head_dim
    assert w.w_q.shape == w.w_k.shape == (heads, dk, attn.q_proj.in_features)
    k_rows = attn.k_proj.weight.reshape(kv, dk, -1)
    for h in range(heads):
        assert torch.equal(w.w_q[h], attn.q_proj.weight[h * dk:(h + 1) * dk])
        assert torch.equal(w.w_k[h], k_rows[h // (heads // kv)])
        assert torch.equal(w.b_k[h], attn.k_proj.bias.reshape(kv, dk)[h // (heads // kv)])


@pytest.mark.parametrize("name", ["gemma4_vit_167m", "PixtralVisionModel", "MLCDVisionModel", "DINOv3ViTModel"])
def test_rope_pairs_and_angles_rebuild_the_models_own_rotation(name: str):
    """The pairs and angles --rope-bands reads off the tables (rope_pairs, rope_angles) rebuild the model's own rotation:
    for any q, k, (R_i q_i)·(R_j k_j) = Σ_f cos Δφ_f q_i^T P_f k_j + sin Δφ_f q_i^T J_f k_j, with the site's
    rope_apply (the model's own function) on the left."""
    from test_zoo import FAST_CASES, perturb

    from qkhooks.models.rope import rope_angles, rope_pairs

    case = next(c for c in FAST_CASES if c.name == name)
    torch.manual_seed(0)
    model = perturb(case.build())
    sites = qkhooks.sites(model)
    tables: dict[int, object] = {}

    def grab(site):
        def hook(module, args, kwargs):
            site.refuse_unmodelled_inputs(args, kwargs)
            tables[site.layer] = site._call_rope
            site.forget_call()

        return hook

    handles = [s.module.register_forward_pre_hook(grab(s), with_kwargs=True) for s in sites]
    forward_with_hooks(model, handles, **case.inputs())
    site = sites[0]
    cos = tables[site.layer][0]
    n = cos.shape[-2] if cos.dim() >= 2 else cos.shape[0]
    n += site.num_prefix_tokens if name == "DINOv3ViTModel" else 0  # DINOv3 leaves its prefix tokens unrotated
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, site.num_heads, n, site.head_dim, generator=g)
    k = torch.randn(1, site.num_heads, n, site.head_dim, generator=g)
    rq, rk = site.rope_apply(q, k, tables[site.layer])
    want = (rq @ rk.transpose(-1, -2)).double()
    a, b = rope_pairs(site)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(site.head_dim))  # every dimension in exactly one pair
    phi = rope_angles(site, tables[site.layer], n)
    q, k = q.double(), k.double()
    got = 0
    for f in range(len(a)):
        delta = phi[None, :, f] - phi[:, None, f]
        same = q[..., a[f], None] * k[..., None, :, a[f]] + q[..., b[f], None] * k[..., None, :, b[f]]  # q^T P_f k
        turned = -q[..., a[f], None] * k[..., None, :, b[f]] + q[..., b[f], None] * k[..., None, :, a[f]]  # q^T J_f k
        got = got + torch.cos(delta) * same + torch.sin(delta) * turned
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_efficientformer_bias_is_the_modules_own_table_read_at_each_token_pair():
    """run.bias(l) is attention_biases[h, idx(i, j)], indexed here directly from the module's parameters (the zoo case
    checks the maps rebuilt with it against the model's own softmax)."""
    from test_zoo import FAST_CASES, perturb

    case = next(c for c in FAST_CASES if c.name == "efficientformer_l1")
    torch.manual_seed(0)
    model = perturb(case.build())
    with qkhooks.record(model, modes=None, attention="full") as run, torch.no_grad():
        run(**case.inputs())
    attns = [m for m in model.modules() if type(m).__name__ == "Attention"]
    assert len(attns) == len(run.layers) == 2
    for layer, attn in zip(run.layers, attns):
        table = attn.attention_biases.detach()
        n = attn.attention_bias_idxs.shape[0]
        want = torch.stack([torch.stack([table[:, int(attn.attention_bias_idxs[i, j])] for j in range(n)], -1)
                            for i in range(n)], -2)  # (H, N, N)
        assert torch.equal(run.bias(layer), want)


def test_detr_site_takes_tokens_plus_position_and_refuses_the_residual_input():
    """The tokens handed on are x + p, p the position embedding the layer passes (read here from the call), and
    input='residual' (x alone) is refused with the reason."""
    from test_zoo import FAST_CASES, perturb

    case = next(c for c in FAST_CASES if c.name == "DetrModel")
    torch.manual_seed(0)
    model = perturb(case.build())
    (site, *_) = qkhooks.sites(model)
    assert site.path == "encoder.layers.0.self_attn" and "x + p" in site.tokens_entering_qk
    seen = {}
    handle = site.module.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**case.inputs())
    finally:
        handle.remove()
    got = site.hidden_states((), dict(seen))
    assert torch.equal(got, seen["hidden_states"] + seen["position_embeddings"])
    with pytest.raises(QKHooksError, match="position embedding is added inside the attention"):
        with qkhooks.record(model, modes=4, input="residual"), torch.no_grad():
            model(**case.inputs())


def test_mobilevit_query_maps_are_the_blocks_own_pixels_projected_on_the_pixel_grid():
    """MobileViT's attention sees each image as P sequences of patches; its query maps are put back on the block's
    pixel grid. Reference: the block's own (B, C, H, W) map entering the transformer, normalised per pixel by the
    first block's norm1 and projected on u_n directly, pixel by pixel in row-major order."""
    from test_zoo import perturb

    torch.manual_seed(0)
    model = perturb(timm.create_model("mobilevit_xxs", pretrained=False))
    unfolding = next(m for m in model.modules() if type(m).__name__ == "MobileVitBlock")
    maps = {}
    handle = unfolding.conv_1x1.register_forward_hook(lambda m, a, o: maps.setdefault("x", o.detach()))
    path = next(n for n, m in model.named_modules() if m is unfolding.transformer[0].attn)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    try:
        with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
            run(x)
    finally:
        handle.remove()
    layer = next(s.layer for s in run.sites if s.path == path)
    fmap = maps["x"]
    with torch.no_grad():
        tokens = unfolding.transformer[0].norm1(fmap.permute(0, 2, 3, 1)).flatten(1, 2)  # (B, H·W, C), row-major
    want = torch.einsum("bnd,hdk->bhkn", tokens, run.spectrum[layer].U)
    assert run.query[layer].shape == want.shape == (2, run.sites[layer].num_heads, 4, fmap.shape[2] * fmap.shape[3])
    assert torch.allclose(run.query[layer], want, atol=1e-4 * float(want.abs().max()))
    p = unfolding.patch_area
    assert run.attention_maps("full")[layer].shape[:2] == (2, p)  # (B, P, H, N, N): one map per (image, offset)
    with pytest.raises(QKHooksError, match="per pixel offset"):
        qkhooks.record(model, modes=None, attention="rows")
