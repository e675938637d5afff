"""Tests written to kill mutants of models (``models/base.py``, ``timm.py``, ``hf.py``) that survived the rest of the
models selection (tests/MUTATION.md, rounds 11-12): branches only families outside the plain ViTs reach (reduced
keys, q/k-norm, RoPE, logit biases, class attention, PiT stages, grouped-query keys, HF families). Each asserts a
value against an independent reference: the model's own eager attention, its own tensors, or a value written by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qkhooks
from qkhooks import QKHooksError
from qkhooks.models import base
from qkhooks.models.base import AttentionSite, number_in_forward_order, parse_layers, register_adapter
from test_zoo import FAST_CASES, SMALL_VIT, _run_case, check, perturb

_CASES = {c.name: c for c in FAST_CASES}
# One small model per form the three adapter files read (the zoo harness' check: maps against the model's eager
# attention to 1e-5, modes against its logits or its own q·k): PiT stages, EVA / RoPE / AttentionRope (fused and
# grouped-query readers), q/k-norm, CaiT, HF DINOv3 (RoPE), reduced keys (timm and HF PVT-v2), Data2Vec's own and
# shared tables, BEiT's layer table, EoMT's object queries, BLIP's fused qkv with ``scale``, GroupViT.
FORMS = ["pit_ti_224", "eva02_tiny_patch14_224", "vit_base_patch16_rope_reg1_gap_256", "vit_small_patch16_224",
         "cait_xxs24_224", "vit_pe_core_tiny_patch16_384-grouped-query", "DINOv3ViTModel", "PvtV2Model", "pvt_v2_b0",
         "Data2VecVisionModel", "Data2VecVisionModel-shared-bias", "BeitModel-layer-bias", "EomtForUniversalSegmentation",
         "BlipVisionModel", "GroupViTVisionModel", "vit_small_patch16_dinov3", "VitDetModel", "Sapiens2Backbone",
         "visformer_tiny"]


@pytest.mark.parametrize("name", FORMS)
def test_each_form_the_adapters_read_rebuilds_the_models_eager_maps_and_logits(name):
    outcome = _run_case(_CASES[name])
    assert outcome.status == "exact", outcome.detail


def _pit(size: tuple[int, int]):
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model("pit_ti_224", pretrained=False, img_size=size, depth=(1, 1, 1), heads=(2, 2, 2),
                                     base_dims=(8, 8, 8)))


def test_pit_stage_grids_are_the_grids_each_stage_reshapes_its_tokens_to_on_a_non_square_odd_input():
    model = _pit((64, 96))  # conv embedding 7 x 11 patches, then ceil halving: 4 x 6, 2 x 3
    seen = []
    handles = [stage.register_forward_hook(lambda m, a, out: seen.append(tuple(out[0].shape[2:])))
               for stage in model.transformers]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 96))
    finally:
        for h in handles:
            h.remove()
    assert seen == [(7, 11), (4, 6), (2, 3)]
    sites = qkhooks.sites(model)
    assert [s.grid for s in sites] == seen
    assert [s.grid_for(1 + h * w) for s, (h, w) in zip(sites, seen)] == seen
    outcome = check(model, {"x": torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))}, "timm")
    assert outcome.status == "exact", outcome.detail
    model.patch_embed.grid_size = None  # an older timm's ConvEmbedding: only its height and width
    assert [(s.grid, s.patch_size, s.num_prefix_tokens) for s in qkhooks.sites(model)] == [(g, None, 1) for g in seen]


def test_layer_selections_parse_ranges_negative_ends_and_lists_as_written():
    assert parse_layers("0,3,5-7,-1") == [0, 3, 5, 6, 7, -1]
    assert parse_layers(" 2 - 4 , 9") == [2, 3, 4, 9]
    assert parse_layers("-3--1") == [-3, -2, -1]
    assert parse_layers(" ALL ") is None and parse_layers(None) is None
    for empty in ("", "  "):  # an unset shell variable (--layers "$LAYERS") is refused, not read as every layer
        with pytest.raises(QKHooksError, match="is empty: give block indices"):
            parse_layers(empty)
    assert parse_layers((4, "2")) == [4, 2]
    with pytest.raises(QKHooksError) as err:
        parse_layers("5-3")
    assert str(err.value) == "bad layer range '5-3' in '5-3': write it low to high, e.g. '3-5'."
    with pytest.raises(QKHooksError) as err:
        parse_layers("1,x")
    assert str(err.value) == ("bad layer selection '1,x': use block indices ('0,3,5-7,-1', 2, [0, 5]), the attention "
                              "modules' paths (['blocks.5.attn']) with a model, or 'all'.")
    assert parse_layers(3) == [3] and parse_layers(np.int64(2)) == [2] and parse_layers(torch.tensor(1)) == [1]
    for bad in ([1.0], [True], 2.5, object()):
        with pytest.raises(QKHooksError, match="bad layer selection"):
            parse_layers(bad)


def test_an_adapter_registered_last_is_tried_after_the_built_in_ones_and_first_before_them():
    before = list(base._ADAPTERS)
    try:
        register_adapter("kills-last", lambda m: True, lambda m: [], families="last", first=False)
        register_adapter("kills-first", lambda m: True, lambda m: [], families="first")
        names = [name for name, _ in base.adapters()]
        assert names[0] == "kills-first" and names[-1] == "kills-last"
        assert names[1:-1] == [a.name for a in before]
        register_adapter("kills-last", lambda m: True, lambda m: [], families="again", first=False)  # replaced, not added
        assert [n for n, _ in base.adapters()].count("kills-last") == 1 and base.adapters()[-1] == ("kills-last", "again")
    finally:
        base._ADAPTERS[:] = before


# ---------------------------------------------------------------------------------------------- hand-made sites
def _hand_site(**fields) -> AttentionSite:
    """A site of a stand-in module (2 heads of 2 dims on 3 tokens: one prefix + a 1 x 2 grid), for the per-call terms."""
    module = nn.Linear(4, 4)
    return AttentionSite(**{**dict(layer=0, path="attn", module=module, block_path="block", block=module, num_heads=2,
                                   head_dim=2, dim=4, scale=0.5, num_prefix_tokens=1, grid=(1, 2), family="hand",
                                   input_name="x", qk_linear=lambda: (module.weight.repeat(2, 1), None)), **fields})


def test_a_boolean_mask_becomes_zero_where_attended_and_the_float32_minimum_elsewhere():
    site = _hand_site()
    mask = np.array([[[[True, False, True], [True, True, False], [False, True, True]]]])
    site._call_bias = torch.from_numpy(mask)
    want = np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32)
    got = site.logit_bias()
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    table = torch.randn(1, 2, 3, 3, requires_grad=True)
    site._call_bias = table
    assert not site.logit_bias().requires_grad and torch.equal(site.logit_bias(), table.detach())


def test_rows_of_logits_get_the_bias_rows_of_their_own_query_tokens_on_every_head_in_the_logits_dtype():
    g = torch.Generator().manual_seed(3)
    site = _hand_site()
    table = torch.randn(1, 2, 3, 3, generator=g)  # one batch entry, two heads: expanded over the batch, per head
    site._call_bias = table
    logits = torch.randn(2, 2, 2, 3, generator=g).to(torch.bfloat16)
    queries = torch.tensor([[2, 0], [1, 1]])
    got = site.add_logit_bias(logits, queries)
    assert got.dtype == torch.bfloat16
    want = logits.float().numpy().copy()
    for b in range(2):
        for h in range(2):
            for t in range(2):
                want[b, h, t] += table[0, h, int(queries[b, t])].to(torch.bfloat16).float().numpy()
    assert np.allclose(got.float().numpy(), want, atol=0.05)
    full = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(site.add_logit_bias(full), full + table.double())
    site._call_bias = None
    assert site.add_logit_bias(full) is full


def test_a_position_only_term_is_the_calls_table_per_head_and_a_mask_or_per_image_term_is_none():
    site = _hand_site()
    table = torch.randn(1, 1, 3, 3)
    site._call_bias = table
    got = site.position_bias()
    assert got.shape == (2, 3, 3) and torch.equal(got[0], table[0, 0]) and torch.equal(got[1], table[0, 0])
    site._call_bias = table.expand(2, 2, 3, 3).clone()  # the same for both images: still position-only
    assert torch.equal(site.position_bias(), table[0, 0].expand(2, 3, 3))
    per_image = table.expand(2, 2, 3, 3).clone()
    per_image[1] += 1
    masked = table.clone()
    masked[..., 0, 1] = torch.finfo(torch.float32).min
    for call in (per_image, masked, table.clone().fill_(float("-inf")), table[0], None):
        site._call_bias = call
        assert site.position_bias() is None


def test_forward_order_numbers_sites_by_registration_puts_a_late_runner_after_its_module_and_names_a_stage():
    model = nn.Module()
    model.first, model.merger, model.second = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    sites = [_hand_site(module=m, path=p, block_path=b, stage=st) for m, p, b, st in (
        (model.merger, "merger", "stages.1.blocks.0", ""), (model.second, "second", "blocks.1", "mine"),
        (model.first, "first", "blocks.0", ""))]
    sites[0].runs_after = model.second  # registered between them, run after the second
    ordered = number_in_forward_order(model, sites)
    assert [(s.path, s.layer, s.stage) for s in ordered] == [("first", 0, "blocks"), ("second", 1, "mine"),
                                                             ("merger", 2, "stages.1.blocks")]
    with pytest.raises(QKHooksError) as err:
        number_in_forward_order(model, [sites[1], _hand_site(path="stray"), _hand_site(path="gone")])
    assert str(err.value) == "the adapter returned attention modules that are not part of the model: ['stray', 'gone']."
    twice = _hand_site(module=model.first, path="first")
    with pytest.raises(QKHooksError) as err:
        number_in_forward_order(model, [twice, sites[1], _hand_site(module=model.first, path="first")])
    assert str(err.value) == "the adapter returned an attention module twice: ['first', 'first']."


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**SMALL_VIT, "depth": 3}))


def test_layer_selection_keeps_block_order_and_refuses_empty_and_missing_layers_with_the_whole_message():
    model = _tiny_vit()
    assert [s.layer for s in qkhooks.sites(model, layers="-1,0,-3")] == [0, 2]
    assert [s.path for s in qkhooks.sites(model, layers=[1])] == ["blocks.1.attn"]
    for layers, message in (([], "the layer selection is empty: give at least one block index, or 'all'."),
                            ([3], "layer 3 does not exist: this model has blocks 0..2."),
                            ("-4", "layer -4 does not exist: this model has blocks 0..2.")):
        with pytest.raises(QKHooksError) as err:
            qkhooks.sites(model, layers=layers)
        assert str(err.value) == message


def test_a_non_native_image_size_gives_its_own_grid_and_tokens_arrive_by_position_or_keyword():
    model = _tiny_vit()
    site = qkhooks.sites(model)[0]
    assert site.grid_for_image(48, 24) == (6, 3) and site.grid_for_image(32, 32) == (4, 4)
    x = torch.randn(2, 17, 32)
    assert site.hidden_states((x,), {}) is x and site.hidden_states((), {"x": x}) is x
    cases = (((), {}, "blocks.0.attn: could not find the hidden states in the call (no positional argument and no keyword "
                      "'x'); fix the adapter's input_name."),
             ((torch.randn(2, 17),), {}, "blocks.0.attn: expected a (batch, tokens, 32) tensor entering the layer, got "
                                         "Tensor (2, 17); the adapter points at the wrong argument."),
             (("x",), {}, "blocks.0.attn: expected a (batch, tokens, 32) tensor entering the layer, got str (); the adapter "
                          "points at the wrong argument."))
    for args, kwargs, message in cases:
        with pytest.raises(QKHooksError) as err:
            site.hidden_states(args, kwargs)
        assert str(err.value) == message


def test_a_mask_handed_to_a_plain_timm_attention_is_refused_with_the_whole_message():
    model = _tiny_vit()
    x = torch.randn(2, 17, 32)
    with qkhooks.record(model, modes=2, attention="full"), torch.no_grad():
        model.blocks[0](x)
        for extra, described in (({"attn_mask": torch.zeros(2, 1, 17, 17)}, "'attn_mask' (a (2, 1, 17, 17) tensor)"),):
            with pytest.raises(QKHooksError) as err:
                model.blocks[0](x, **extra)
            assert str(err.value) == (
                f"unsupported attention in 'blocks.0.attn' (Attention): the model passes {described} to it, an extra "
                "term (mask, position bias, rotary tables) that qkhooks does not model for this family, so rebuilt maps "
                "and modes would not be the model's. Record a model or input without it, or teach the adapter that term "
                "(see README, 'Supported models').")


def test_an_unknown_model_is_refused_listing_every_adapter_and_what_it_saw():
    from qkhooks.models.unsupported import describe_attention_like

    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model)
    listing = "".join(f"\n  - {name}: {families}" for name, families in base.adapters())
    assert str(err.value) == (
        f"qkhooks does not know how to find the attention layers of Sequential.\n{describe_attention_like(model)}\n"
        f"Supported families:{listing}\nAdd your own in a few lines with qkhooks.register_adapter(name, matches, find) "
        "(see README, 'Your own architecture').")
    assert "  - timm-vit: timm VisionTransformer" in listing and "  - hf-vit: Hugging Face ViT" in listing


def _xcit(class_attention_layers: int):
    import timm

    return timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=5, embed_dim=32, num_heads=4, img_size=32,
                             cls_attn_layers=class_attention_layers)


def test_a_refusal_offers_skip_unmodelled_only_where_it_would_record_something():
    from qkhooks.models.unsupported import SKIP_HINT

    reason = ("unsupported attention in 'blocks.0.attn' (XCA): cross-covariance attention: the softmax runs over channels "
              "(a d_k x d_k map per head from L2-normalised q and k with a learned temperature), not over tokens; there is "
              "no softmax of q·k over the image tokens, so no W_q^T W_k form governs its maps.")
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(_xcit(1))  # its class attention is modelled: a partial recording would hold it
    assert str(err.value) == reason + " " + SKIP_HINT
    assert [s.path for s in qkhooks.sites(_xcit(1), skip_unmodelled=True)] == ["cls_attn_blocks.0.attn"]
    only_channels = _xcit(0)
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(only_channels)
    assert str(err.value) == reason
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(only_channels, skip_unmodelled=True)
    assert str(err.value) == (reason + " skip_unmodelled=True leaves nothing to record: no attention of Xcit is one "
                              "qkhooks models exactly (left out with it: 'blocks.1.attn', 'blocks.2.attn', 'blocks.3.attn' ...).")


# ---------------------------------------------------------------------------------------------- timm readers
def test_content_only_names_each_term_beyond_the_bilinear_form_and_only_plain_sites_rebuild_logits():
    import timm

    torch.manual_seed(0)
    cait = timm.create_model("cait_xxs24_224", pretrained=False, depth_token_only=1, **{**SMALL_VIT, "depth": 1})
    talking, cls = qkhooks.sites(cait)
    assert (talking.family, cls.family) == ("timm-cait", "timm-cait")
    assert talking.content_only() == "the heads are mixed around the softmax (talking heads)"
    assert cls.content_only() == "only the class token queries (class attention)"
    assert not talking.modes_rebuild_logits() and not cls.modes_rebuild_logits()
    eva = qkhooks.sites(timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28, patch_size=7,
                                          qk_norm=True))[0]
    assert eva.family == "timm-eva"
    assert eva.content_only() == ("RoPE turns q and k by their positions (the form is the zero-offset content term); q and "
                                  "k are normalised per token (the form is the pre-norm one)")
    plain = qkhooks.sites(_tiny_vit())[0]
    assert plain.family == "timm-vit" and plain.content_only() == "" and plain.modes_rebuild_logits()


@pytest.mark.parametrize("missing", ["k_proj", "q_proj"])
def test_separate_query_and_key_projections_with_one_bias_left_out_rebuild_the_models_maps(missing):
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, depth=2, img_size=32,
                                      qkv_fused=False))
    for block in model.blocks:
        getattr(block.attn, missing).bias = None
    outcome = check(model, {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}, "timm")
    assert outcome.status == "exact", outcome.detail


def _own_rotation_keeps_each_pairs_length(site: AttentionSite, tables) -> None:
    """The model's own rotation (the site's rope_apply) turns each pair rope_pairs names in its plane: the pair's length
    is kept for every token and head, which the pairs of the other layout do not satisfy."""
    from qkhooks.models.rope import rope_pairs

    g = torch.Generator().manual_seed(4)
    n = (tables[0].shape[-2] if isinstance(tables, tuple) else tables.shape[-2]) + site.num_prefix_tokens
    q, k = (torch.randn(1, site.num_heads, n, site.head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    tables = tuple(t.double() for t in tables) if isinstance(tables, tuple) else tables.double()
    rq, rk = site.rope_apply(q, k, tables)
    a, b = rope_pairs(site)
    for before, after in ((q, rq), (k, rk)):
        length = before[..., a] ** 2 + before[..., b] ** 2
        assert torch.allclose(after[..., a] ** 2 + after[..., b] ** 2, length, atol=1e-9)
    assert not torch.allclose(rq, q)  # the tables turn something


def _per_site_calls(model, inputs: dict, read) -> list:
    """(site, read(site, args, kwargs)) for every site of ``model``, read off its module's call in one forward."""
    sites = qkhooks.sites(model)
    seen = {}
    handles = [s.module.register_forward_pre_hook(
        lambda m, a, kw, s=s: seen.__setitem__(s.layer, read(s, a, kw)), with_kwargs=True) for s in sites]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return [(s, seen[s.layer]) for s in sites]


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224", "DINOv3ViTModel"])
def test_the_rope_layout_read_off_each_family_is_the_pairs_its_own_rotation_turns(name):
    case = _CASES[name]
    torch.manual_seed(0)
    site, tables = _per_site_calls(perturb(case.build()), case.inputs(), lambda s, a, kw: kw[s.rope_input])[0]
    assert site.rope_layout == {"eva02_tiny_patch14_224": "interleaved"}.get(name, "half")
    _own_rotation_keeps_each_pairs_length(site, tables)


@pytest.mark.parametrize("bias", [False, True])
def test_reduced_keys_without_projection_biases_rebuild_the_models_maps(bias):
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("pvt_v2_b0", pretrained=False, embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2),
                                      depths=(1, 1, 1, 1), sr_ratios=(4, 2, 1, 1), qkv_bias=bias))
    assert all((s.module.q.bias is not None) == bias for s in qkhooks.sites(model))
    outcome = check(model, {"x": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))}, "timm")
    assert outcome.status == "exact", outcome.detail


# ---------------------------------------------------------------------------------------------- HF readers
def _hf_vit(**kw):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, image_size=32, patch_size=8, qkv_bias=True), **kw})
    return perturb(transformers.ViTModel._from_config(config, attn_implementation="sdpa"))


def _pixels(h: int = 32, w: int = 32) -> dict:
    return {"pixel_values": torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("scaling", [0.3, None])
def test_an_hf_scale_is_the_modules_own_scaling_or_without_one_head_dim_to_the_minus_half(scaling):
    model = _hf_vit()
    attentions = [s.module for s in qkhooks.sites(model)]
    for module in attentions:
        module.scaling = scaling  # a temperature of its own; None: the attention function's 1 / sqrt(d_k)
    assert not any(hasattr(m, "scale") for m in attentions)
    assert [s.scale for s in qkhooks.sites(model)] == [0.3 if scaling else 8 ** -0.5] * 2
    outcome = check(model, _pixels(), "hf")
    assert outcome.status == "exact", outcome.detail


def test_an_hf_non_square_patch_gives_the_grid_its_patch_embedding_makes():
    model = _hf_vit(image_size=(32, 48), patch_size=(8, 4))
    seen = []
    handle = model.embeddings.patch_embeddings.projection.register_forward_hook(
        lambda m, a, out: seen.append(tuple(out.shape[2:])))
    try:
        with torch.no_grad():
            model(**_pixels(32, 48))
    finally:
        handle.remove()
    site = qkhooks.sites(model)[0]
    assert seen == [(4, 12)] and site.grid == (4, 12) and site.patch_size == (8, 4)
    assert site.grid_for_image(64, 48) == (8, 12)
    outcome = check(model, _pixels(32, 48), "hf")
    assert outcome.status == "exact", outcome.detail


def test_eomt_object_queries_count_as_prefix_tokens_in_the_layers_that_see_them():
    model = perturb(_CASES["EomtForUniversalSegmentation"].build())
    calls = _per_site_calls(model, _pixels(), lambda s, a, kw: (a[0] if a else kw["hidden_states"]).shape[1])
    patches = 4 * 4  # 32 px in patches of 8
    assert [s.num_prefix_tokens for s, _ in calls] == [tokens - patches for _, tokens in calls]
    assert calls[-1][0].num_prefix_tokens - calls[0][0].num_prefix_tokens == 5  # num_queries


def test_an_hf_attention_owning_a_table_or_scale_or_sitting_in_a_windowed_block_is_refused_naming_it():
    model = _hf_vit()
    path = qkhooks.sites(model)[0].path
    name = type(qkhooks.sites(model)[0].module).__name__
    attention = model.get_submodule(path)
    attention.position_table, attention.dropout = nn.Linear(2, 2), nn.Identity()  # an Identity is harmless
    attention.temperature = nn.Parameter(torch.ones(1))
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model)
    assert str(err.value).startswith(f"unsupported attention in {path!r} ({name}): it owns 'position_table', 'temperature' "
                                     "besides its q/k/v projections (a position table")
    model = _hf_vit()
    model.get_submodule(path).q_norm = nn.LayerNorm(8)  # refused before the adapter runs (unsupported.diagnose)
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model)
    assert str(err.value) == (f"unsupported attention in {path!r} ({name}): it normalises q and k (q_norm, k_norm) in a "
                              "form qkhooks does not model (q/k-norm is modelled in the attention modules README lists, "
                              "where the exact normalised form is rebuilt); its logits are a non-linear function of the "
                              "tokens, so W_q^T W_k alone would not describe them.")
    model = _hf_vit()
    model.get_submodule(qkhooks.sites(model)[1].block_path).window_size = 2
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model)
    assert str(err.value).startswith(f"unsupported attention in {qkhooks.sites(_hf_vit())[1].path!r} ({name}): its block "
                                     "partitions the tokens into windows of 2 (one attention call per window")


def test_data2vec_tables_interpolated_to_another_resolution_rebuild_the_models_maps():
    case = _CASES["Data2VecVisionModel"]
    torch.manual_seed(0)
    model = perturb(case.build())
    outcome = check(model, {**_pixels(48, 48), "interpolate_pos_encoding": True}, "hf")
    assert outcome.status == "exact", outcome.detail


def _sapiens2_uneven_groups():
    from test_zoo import HF_SMALL, _hf

    torch.manual_seed(0)  # 4 query heads of 12 dims over 3 key heads in the middle layer
    return _hf("Sapiens2Backbone", "Sapiens2Config", num_register_tokens=2, num_first_full_attention_layers=1,
               num_last_full_attention_layers=1, num_key_value_attention_heads=3, out_features=["stage1", "stage3"],
               **dict(HF_SMALL, num_hidden_layers=3, hidden_size=48))()


def test_hf_grouped_query_heads_that_do_not_split_evenly_are_refused_naming_the_layer():
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(_sapiens2_uneven_groups())
    message = str(err.value)
    assert message.startswith("unsupported attention in 'model.layer.1.attention' (")
    assert message.endswith("): 4 query heads do not split evenly over 3 key heads.")


def test_hf_grouped_query_refusal_names_the_attention_class():
    """Before: hf.find handed grouped_query_reader a SimpleNamespace of the head counts, and the refusal named it."""
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(_sapiens2_uneven_groups())
    assert "(Sapiens2Attention)" in str(err.value)


def test_the_hf_adapter_refuses_a_timm_attention_inside_a_transformers_wrapper_pointing_at_the_timm_model():
    from qkhooks.models import hf
    from test_zoo import _small_timm_backbone

    torch.manual_seed(0)
    with pytest.raises(QKHooksError) as err:
        hf.find(_small_timm_backbone())  # what the HF adapter would see of a wrapper the timm-backbone adapter missed
    assert str(err.value).startswith("unsupported attention in '_backbone.model.blocks.0.attn' (Attention): a timm attention "
                                     "inside a transformers wrapper (TimmBackbone)")
    assert "qkhooks.record(model._backbone.model)" in str(err.value)


def test_an_hf_attention_that_does_not_hold_the_config_still_gets_the_configs_native_grid():
    """Round 13 (``hf.find`` _7): the native grid is read off the model's (vision) config, image_size // patch_size,
    written out here (48 x 32 px, 8 px patches: 6 x 4), not off the attention module: VitDet's attention holds no
    config, so a site built from the module alone would know no grid and refuse a plain token count."""
    import transformers

    config = transformers.VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       image_size=(48, 32), patch_size=8, pretrain_image_size=48)
    model = transformers.VitDetModel(config).eval()
    sites = base.find_sites(model)
    assert not any(hasattr(s.module, "config") for s in sites)
    assert [(s.grid, s.patch_size, s.grid_for(24)) for s in sites] == [((6, 4), (8, 8), (6, 4))] * 2


def test_a_timm_site_names_its_enclosing_block_by_the_models_own_module_path():
    """Round 13 (``timm.find`` _115): ``block_path`` is the dotted path of the block around the attention (documented
    on :class:`AttentionSite`), read back with the model's own ``get_submodule``; a refusal that names the block (its
    hidden states not found in the block's call) names it by that path."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL_VIT).eval()
    sites = base.find_sites(model)
    assert [(s.path, s.block_path) for s in sites] == [("blocks.0.attn", "blocks.0"), ("blocks.1.attn", "blocks.1")]
    assert all(model.get_submodule(s.block_path) is s.block for s in sites)
    with pytest.raises(QKHooksError) as err:
        sites[1].hidden_states((), {}, block=True)
    assert str(err.value).startswith("blocks.1: could not find the hidden states in the call")


def test_an_hf_sites_stage_is_the_container_that_holds_its_block():
    """Round 13 (``hf.find`` _253): ``stage`` is the container the block sits in (:class:`qkhooks.access.LayerGeometry`),
    read back with the model's own ``get_submodule``: CLIP's blocks sit two levels deep (``encoder.layers``), where the
    first dotted name alone would be the whole encoder."""
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, image_size=32, patch_size=8)
    model = transformers.CLIPVisionModel(config).eval()
    sites = base.find_sites(model)
    assert [s.stage for s in sites] == ["encoder.layers"] * 2
    assert [model.get_submodule(s.stage)[i] is s.block for i, s in enumerate(sites)] == [True, True]
