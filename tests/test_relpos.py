"""Relative positions (qkhooks/models/relpos.py), each against the model's own computation: timm's additive tables as
the layer's position-only term (BEiT, vit_relpos: stored once, scale·content + bias = the model's logits), and the
query-dependent decomposed term of SAM/ViTDet (scale·content + relative term = the model's eager logits, the term
itself against a direct indexing of the model's tables), with SAM/ViTDet windows."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from test_zoo import FAST_CASES, eager_maps, perturb


def _case(name: str):
    case = next(c for c in FAST_CASES if c.name == name)
    torch.manual_seed(0)
    return perturb(case.build()), case.inputs(), case.kind


def _eager_logits(model, inputs, kind) -> dict[int, torch.Tensor]:
    """log of the model's own eager attention (its logits up to a constant per row), (B', H, N, N) per site."""
    sites = qkhooks.sites(model)
    maps = eager_maps(model, sites, inputs, kind)
    return {s.layer: (m.unflatten(0, (-1, s.num_heads)) if m.dim() == 3 else m).double().log() for s, m in zip(sites, maps)}


def _row_centred_error(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got - got[..., :1]) - (want - want[..., :1])
    return float(diff.abs().max() / (1 + want.abs().max()))


# ------------------------------------------------------------------------------------- timm additive tables
TIMM_TABLES = ["beit_base_patch16_224", "beit_base_patch16_224-shared", "test_vit_relpos",
               "vit_relpos_small_patch16_224-bias-cls", "vit_srelpos_small_patch16_224"]


@pytest.mark.parametrize("name", TIMM_TABLES)
def test_timm_relative_tables_are_the_layers_position_term_stored_once_and_rebuild_the_models_logits(tmp_path, name):
    from qkhooks.store.reader import open_run
    from qkhooks.store.writer import RunWriter
    from qkhooks.stream import WriterSink

    model, inputs, kind = _case(name)
    images = inputs["x"]
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": name, "config": "{}"}, dtype="float32") as writer:
        with qkhooks.record(model, modes="all", augmented=True, sinks=[WriterSink(writer)]) as rec, torch.no_grad():
            for half in (images[:1], images[1:]):  # two batches: the term is stored once
                rec(half)
    want = _eager_logits(model, {"x": images}, kind)
    tables = [rec.bias(site.layer) for site in rec.sites]
    if "shared" in name or "srelpos" in name:
        assert torch.equal(tables[0], tables[1])
    with open_run(path) as run:
        for site, table in zip(rec.sites, tables):
            stored = torch.from_numpy(run.bias(site.layer)).double()
            n = want[site.layer].shape[-1]
            assert stored.shape == (site.num_heads, n, n) and torch.equal(stored, table.double())
            q, k = (torch.from_numpy(run.array(f"modes/L{site.layer}/{s}")[:]).double() for s in ("query", "key"))
            sigma = rec.spectrum[site.layer].S.double()
            logits = site.scale * torch.einsum("bhkn,hk,bhkm->bhnm", q, sigma, k) + stored
            err = _row_centred_error(logits, want[site.layer])
            assert err < 1e-5, f"{name} layer {site.layer}: scale·content + stored bias misses the logits by {err:.1e}"
            assert _row_centred_error(logits - stored, want[site.layer]) > 1e-3  # the table really matters


def test_a_timm_beit_argument_the_adapter_does_not_model_is_refused_naming_it():
    model, inputs, _ = _case("beit_base_patch16_224")
    x = torch.randn(2, 17, 32)
    with qkhooks.record(model, modes=2, attention="full"), torch.no_grad():
        model.blocks[0].attn(x)  # the table alone: recorded
        with pytest.raises(QKHooksError, match=r"'blocks.0.attn'.*\['argument 2'\]"):
            model.blocks[0].attn(x, None, torch.zeros(1))


# ------------------------------------------------------------------------------ decomposed relative term
DECOMPOSED = ["samvit_base_patch16_224", "SamVisionModel", "SamHQVisionModel", "VitDetModel-relpos-windows"]


@pytest.mark.parametrize("name", DECOMPOSED)
def test_scale_content_plus_the_relative_term_is_the_models_eager_logits(name):
    """Per layer (windowed and global): the modes of W_q^T W_k (augmented: biases folded in) rebuild the content
    q·k, and scale·content + rec.relative_term(l) equals the log of the model's eager attention to 1e-5, while
    the content alone does not (the term is real)."""
    model, inputs, kind = _case(name)
    want = _eager_logits(model, inputs, kind)
    with qkhooks.record(model, modes="all", augmented=True, attention="full", qk_path=False) as rec, torch.no_grad():
        rec(**inputs)
        windows = {s.layer: s.window_index() for s in rec.sites if hasattr(s, "window_index")}
    windowed = 0
    for site in rec.sites:
        spec = rec.spectrum(site.layer)
        q, k = rec.query(site.layer).double(), rec.key(site.layer).double()
        term = rec.relative_term(site.layer).double()
        ref = want[site.layer]
        if site.layer in windows:  # grid maps read back per window; padding tokens are zeros, [0; 1] in the form
            windowed += 1
            index = windows[site.layer]
            q, k = (_per_window(t, index, pad.double()) for t, pad in ((q, spec.U[:, -1]), (k, spec.V[:, -1])))
            content = torch.einsum("bwhkn,hk,bwhkm->bwhnm", q, spec.S.double(), k)
            ref = ref.unflatten(0, (-1, index.shape[0]))
            assert term.shape == ref.shape == rec.attention(site.layer, "full").shape
        else:
            content = torch.einsum("bhkn,hk,bhkm->bhnm", q, spec.S.double(), k)
        logits = site.scale * content + term
        err = _row_centred_error(logits, ref)
        assert err < 1e-5, f"{name} layer {site.layer}: scale·content + relative term misses the logits by {err:.1e}"
        assert _row_centred_error(site.scale * content, ref) > 1e-3, "the relative term does not matter here"
        assert "relative-position term" in site.content_only() and not site.modes_rebuild_logits()
        assert rec.bias(site.layer) is None  # it is no position-only term
    assert windowed >= 2


def _per_window(maps: torch.Tensor, index: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    out = maps[..., index.clamp_min(0)].permute(0, 3, 1, 2, 4)  # (B, nW, H, K, Nw)
    return torch.where(index[:, None, None, :] >= 0, out, padding[None, None, :, :, None])


@pytest.mark.parametrize("name", ["samvit_base_patch16_224", "SamVisionModel", "VitDetModel-relpos-windows"])
def test_the_relative_term_is_q_dot_the_tables_at_the_offsets(name):
    """Independent of the models' helpers: term[i, j] = q_i·R_h[h_i − h_j + h − 1] + q_i·R_w[w_i − w_j + w − 1], q the
    layer's own query (tokens entering W_q, the model's bias), R the model's tables indexed directly (their sizes
    match the grids here, so no interpolation)."""
    model, inputs, _ = _case(name)
    tokens: dict[int, torch.Tensor] = {}
    sites = qkhooks.sites(model)
    handles = [s.module.register_forward_pre_hook(
        lambda m, a, kw, s=s: tokens.__setitem__(s.layer, (a[0] if a else kw[s.input_name]).detach()), with_kwargs=True)
        for s in sites]
    try:
        with qkhooks.record(model, modes=None, attention="full") as rec, torch.no_grad():
            rec(**inputs)
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        x = tokens[site.layer].double()  # (B', h, w, d)
        _, h, w, _ = x.shape
        qkv = site.module.qkv
        rows = site.num_heads * site.head_dim
        q = (x @ qkv.weight[:rows].double().T + qkv.bias[:rows].double()).unflatten(-1, (site.num_heads, -1))
        r_h, r_w = site.module.rel_pos_h.double(), site.module.rel_pos_w.double()
        assert r_h.shape[0] == 2 * h - 1 and r_w.shape[0] == 2 * w - 1
        ii, jj = torch.arange(h)[:, None], torch.arange(w)[:, None]
        by_h = torch.einsum("bywhc,yzc->bhywz", q, r_h[ii - ii.T + h - 1])  # (B', H, h, w, h_k)
        by_w = torch.einsum("bywhc,wzc->bhywz", q, r_w[jj - jj.T + w - 1])  # (B', H, h, w, w_k)
        want = (by_h[..., :, None] + by_w[..., None, :]).flatten(2, 3).flatten(-2)  # (B', H, N, N)
        got = rec.relative_term(site.layer).double()
        if got.dim() == 5:
            got = got.flatten(0, 1)
        assert torch.allclose(got, want, atol=1e-5), f"{name} layer {site.layer}"


def test_relative_term_asks_for_full_maps_and_a_layer_without_one_says_so():
    model, inputs, _ = _case("samvit_base_patch16_224")
    with qkhooks.record(model, modes=2) as rec, torch.no_grad():
        rec(**inputs)
    with pytest.raises(QKHooksError, match="kept with the full maps: record the layer with attention='full'"):
        rec.relative_term(1)
    plain, plain_inputs, _ = _case("beit_base_patch16_224")
    with qkhooks.record(plain, modes=2, attention="full") as rec, torch.no_grad():
        rec(**plain_inputs)
    with pytest.raises(QKHooksError, match="adds no query-dependent relative-position term.*rec.bias"):
        rec.relative_term(0)


def test_samvit_with_rotary_tables_built_inside_the_module_is_refused_naming_it():
    import timm

    model = timm.create_model("samvit_base_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=2,
                              num_heads=4, patch_size=8, window_size=0, global_attn_indexes=[], use_rel_pos=False,
                              use_rope=True)
    with pytest.raises(QKHooksError, match=r"unsupported attention in '\S+' \(\w+\): (it rotates q and k|rotary)"):
        qkhooks.sites(model)


def test_a_finished_recording_holds_neither_the_calls_tokens_nor_its_relative_term():
    model, inputs, _ = _case("SamVisionModel")
    with qkhooks.record(model, modes=None, attention="full") as rec, torch.no_grad():
        rec(**inputs)
        live = list(rec.sites)
        refs = [weakref.ref(s._call_tokens) for s in live]
        assert all(s.relative_term() is not None for s in live)  # set during the call
    gc.collect()
    assert all(s._call_tokens is None and s._term is None and s._call_hw is None for s in live + rec.sites)
    assert all(r() is None for r in refs), "a finished recording still holds the last call's tokens"


def test_rows_of_a_global_sam_layer_are_its_full_maps_rows():
    """Rows take the relative term of their own query rows (gathered), as the full maps do (checked against eager)."""
    model, inputs, _ = _case("SamVisionModel")
    tokens = torch.tensor([[0, 7], [35, 20]])
    with qkhooks.record(model, modes=None, layers=[1], attention=["rows", "full"]) as rec, torch.no_grad():
        rec(**inputs, meta={"query_tokens": tokens})
    full, rows = rec.attention(1, "full"), rec.attention(1, "rows")
    want = torch.stack([full[b][:, tokens[b]] for b in range(2)])
    assert torch.allclose(rows, want, atol=1e-6)


def test_pooled_query_key_forms_are_refused_naming_the_module_and_the_pooling():
    """MViTv2's pool-first variant pools the tokens entering W_q and W_k inside the module: refused before any forward
    (built on the meta device), naming the first attention module and what it pools. (SAM2's Hiera-det, refused here
    until round 10, is exact since zoo-sam2: tests/test_sam2_forms.py; Hiera, MViTv2: test_pooled_forms.py.)"""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    with torch.device("meta"):
        model = MultiScaleVit(cfg=MultiScaleVitCfg(pool_first=True))
    with pytest.raises(QKHooksError, match=r"unsupported attention in '[\w.]+attn' \(\w+\): .*pools the tokens entering W_q"):
        qkhooks.sites(model)


def test_hf_sam2_hiera_det_default_config_is_taken_pooling_where_its_blocks_pool():
    """HF SAM2 at its default (checkpoint) config, on the meta device: every block's attention is a site, q pooled
    exactly in the blocks with a query stride, windowed exactly where the block has a window."""
    import transformers

    with torch.device("meta"):
        model = transformers.Sam2VisionModel._from_config(transformers.Sam2VisionConfig())
    sites = qkhooks.sites(model)
    blocks = model.backbone.blocks
    assert len(sites) == len(blocks)
    assert [s.pools_queries for s in sites] == [bool(b.query_stride) for b in blocks]
    assert [hasattr(s, "window_index") for s in sites] == [b.window_size > 0 for b in blocks]


@pytest.mark.parametrize("name", ["samvit_base_patch16_224", "SamVisionModel", "VitDetModel-relpos-windows"])
def test_a_finished_recording_of_relative_or_windowed_sam_attention_keeps_no_model_alive(name):
    model, inputs, _ = _case(name)
    with qkhooks.record(model, modes=4, attention="full") as rec, torch.no_grad():
        rec(**inputs)
    refs = [weakref.ref(m) for m in model.modules()]
    del model
    gc.collect()
    assert all(ref() is None for ref in refs), [type(ref()).__name__ for ref in refs if ref() is not None]
