"""Tests written to kill mutants of capture (``capture.py``, ``results.py``, ``access.py``) that survived the rest of
capture's selection (tests/MUTATION.md, round 11), each against an independent reference: numpy, a direct
computation, the model's own eager attention, or a hand-written value."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from qkhooks import QKHooksError
from qkhooks.access import LayerGeometry, require_layer, resolve_layer
from qkhooks.results import observe_geometry
from conftest import TINY_MODELS, timm_module_eager_maps

ASYMMETRIC_TIMM = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6")  # 4 x 6 patches, mean != std


def _assert_refused(cases) -> None:
    """Each call raises a QKHooksError whose whole message is the one written down."""
    for call, message in cases:
        with pytest.raises(QKHooksError) as err:
            call()
        assert str(err.value) == message


def test_a_layer_geometry_describes_itself_in_one_line_naming_every_part_it_has():
    plain = LayerGeometry(3, (4, 6), 1, 25, 25, (4, 6), 1, heads=2, head_dim=8, stage="blocks")
    assert plain.describe() == "grid 4x6 + 1 prefix, 25 queries, 2 heads x 8, stage blocks"
    reduced = LayerGeometry(0, None, 0, 24, 6, (2, 3), 0, window={"size": [2, 3], "shift": [1, 0], "windows": 1,
                                                                 "pad_first": False}, class_attention=True)
    assert reduced.describe() == ("grid ? + 0 prefix, 24 queries, 6 keys (reduced grid 2x3), 1 window of 2x3 "
                                  "shifted by (1, 0), class attention")
    many = LayerGeometry(0, (4, 6), 0, 24, 24, (4, 6), 0, window={"size": [2, 2], "shift": [0, 0], "windows": 6,
                                                                 "pad_first": True})
    assert many.describe() == "grid 4x6 + 0 prefix, 24 queries, 6 windows of 2x2 shifted by (0, 0)"
    assert LayerGeometry(0, (4, 6), 0, 24, 4, None, 0).describe() == (
        "grid 4x6 + 0 prefix, 24 queries, 4 keys (reduced grid ?)")


def test_a_layer_geometry_round_trips_through_its_dict_dropping_unknown_keys_and_reading_grids_as_pairs():
    geometry = LayerGeometry(2, (4, 6), 1, 25, 7, (2, 3), 1, heads=4, head_dim=8, stage="stages.1",
                             window={"size": [2, 3], "shift": [0, 1], "windows": 4, "pad_first": True},
                             class_attention=True)
    stored = geometry.to_dict()
    assert stored == {"layer": 2, "grid": (4, 6), "num_prefix_tokens": 1, "query_tokens": 25, "key_tokens": 7,
                      "key_grid": (2, 3), "key_prefix_tokens": 1, "heads": 4, "head_dim": 8, "stage": "stages.1",
                      "window": {"size": [2, 3], "shift": [0, 1], "windows": 4, "pad_first": True},
                      "class_attention": True}
    as_json = {**stored, "grid": [4, 6], "key_grid": [2, 3], "written_by_a_later_version": 1}
    assert LayerGeometry.from_dict(as_json) == geometry
    bare = LayerGeometry.from_dict({"layer": 0, "grid": None, "num_prefix_tokens": 0, "query_tokens": 9,
                                    "key_tokens": 9, "key_grid": None, "key_prefix_tokens": 0})
    assert (bare.grid, bare.key_grid, bare.heads, bare.window, bare.windowed) == (None, None, 0, None, False)
    assert geometry.windowed and geometry.reduced_keys
    assert not LayerGeometry(0, (4, 6), 1, 25, 25, (4, 6), 1).reduced_keys
    assert LayerGeometry(0, (4, 6), 1, 25, 25, (6, 4), 1).reduced_keys  # same count, another grid


def test_layers_are_resolved_by_index_digits_or_path_and_refused_with_the_whole_reason():
    paths = {0: "blocks.0.attn", 3: "blocks.3.attn"}
    assert resolve_layer(3, [0, 3], paths, "here") == 3
    assert resolve_layer("3", [0, 3], paths, "here") == 3
    assert resolve_layer("blocks.0.attn", [0, 3], paths, "here") == 0
    assert resolve_layer("X3", [0, 3], {0: "X3"}, "here") == 0  # a path, though digits follow its first letter
    assert resolve_layer(np.int64(3), [0, 3], paths, "here") == 3
    cases = [
        ("-3", {}, "layer -3: recorded layers are read by their block index (or module path), not from the end; "
                   "here's layers are [0, 3] (the last: 3)."),
        (-1, paths, "layer -1: recorded layers are read by their block index (or module path), not from the end; "
                    "here's layers are [0, 3] (the last: 3)."),
        (1, paths, "here did not record layer 1; its layers are [0, 3]."),
        ("blocks.1.attn", {}, "here does not know its layers' module paths (a run file written before qkhooks stored "
                              "them); address the layer by block index: [0, 3]."),
        ("blocks.1.attn", paths, "here has no layer at module path 'blocks.1.attn'; its layers are the attention "
                                 "modules 'blocks.0.attn' (layer 0), 'blocks.3.attn' (layer 3) (give one of those "
                                 "paths or a block index)."),
        (True, paths, "a layer is a block index or a module path such as 'blocks.5.attn'; got True."),
        (3.0, paths, "a layer is a block index or a module path such as 'blocks.5.attn'; got 3.0."),
    ]
    _assert_refused([(lambda l=layer, k=known: resolve_layer(l, [0, 3], k, "here"), message)
                     for layer, known, message in cases])
    require_layer(3, [3], "maps", "here", "fix it.")
    for available, listed in (([0], "[0]"), ([], "none")):
        with pytest.raises(QKHooksError) as err:
            require_layer(3, available, "maps", "here", "fix it.")
        assert str(err.value) == f"here has no maps for layer 3 (layers with them: {listed}); fix it."


# ------------------------------------------------------------------------------------------------ results.py
@pytest.fixture(scope="module")
def site_4x6():
    """The first attention site of the tiny timm ViT with a 4 x 6 patch grid (8 px patches, one class token)."""
    import qkhooks

    return qkhooks.sites(ASYMMETRIC_TIMM.model())[0]


def test_the_observed_grid_is_the_images_patch_grid_else_the_sites_own_and_none_when_neither_fits(site_4x6):
    seen = observe_geometry(site_4x6, 25, 25, (32, 48))  # 32 x 48 px in 8 px patches: 4 x 6 = 24 + 1 class token
    assert seen == LayerGeometry(0, (4, 6), 1, 25, 25, (4, 6), 1, 4, 8, "blocks", None, False)
    assert observe_geometry(site_4x6, 31, 31, (40, 48)).grid == (5, 6)  # another image: its own patch grid
    assert observe_geometry(site_4x6, 25, 25, (40, 48)).grid == (4, 6)  # 5 x 6 != 24 tokens: the site's own grid
    assert observe_geometry(site_4x6, 17, 17).grid is None  # 16 patch tokens, not the native 24: a square never assumed
    assert observe_geometry(site_4x6, 20, 20).grid is None  # 19 patch tokens: no grid, not guessed
    assert observe_geometry(dataclasses.replace(site_4x6, patch_size=None), 25, 25, (40, 48)).grid == (4, 6)
    wrong = copy.copy(site_4x6)
    wrong.grid_for = lambda tokens: (3, 3)  # a site rule that does not fill the tokens
    assert observe_geometry(wrong, 17, 17).grid is None
    cait = copy.copy(site_4x6)
    cait.class_attention = True  # only the class token queries (CaiT's class-attention blocks)
    assert observe_geometry(cait, 25, 25).class_attention is True
    # keys other than the queries on a site without reduction: the generic rule finds no conv, so no key grid
    reduced = observe_geometry(dataclasses.replace(site_4x6, key_tokens=lambda *a: None), 25, 7)
    assert (reduced.grid, reduced.key_grid, reduced.key_prefix_tokens, reduced.key_tokens) == ((4, 6), None, 0, 7)
    same = observe_geometry(dataclasses.replace(site_4x6, key_tokens=lambda *a: None), 25, 25)
    assert (same.key_grid, same.key_prefix_tokens) == ((4, 6), 1)


class _Reducing(torch.nn.Module):
    """An attention module holding a key reduction under ``name`` (a conv inside a container, after an optional
    adaptive pool), as PVT, Twins, Segformer and GLPN hold theirs."""

    def __init__(self, name: str, conv: torch.nn.Conv2d, pool: torch.nn.Module | None = None):
        super().__init__()
        setattr(self, name, torch.nn.Sequential(torch.nn.Identity(), conv))
        if pool is not None:
            self.pool = pool

    def grid_of(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The reference: the spatial shape the module's own layers give a zero image of that grid."""
        x = torch.zeros(1, 3, *grid)
        if hasattr(self, "pool"):
            x = self.pool(x)
        for name in ("sr", "spatial_reduction", "sequence_reduction"):
            if hasattr(self, name):
                return tuple(getattr(self, name)(x).shape[-2:])


def test_a_reduced_key_grid_is_the_shape_the_modules_own_pool_and_conv_give_the_query_grid():
    from qkhooks.results import _reduced_grid

    grid = (9, 13)
    cases = [
        _Reducing("sr", torch.nn.Conv2d(3, 3, (2, 3), stride=(2, 3))),
        _Reducing("spatial_reduction", torch.nn.Conv2d(3, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))),
        _Reducing("sequence_reduction", torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)),
        _Reducing("sr", torch.nn.Conv2d(3, 3, 1), pool=torch.nn.AdaptiveAvgPool2d(5)),
        _Reducing("sr", torch.nn.Conv2d(3, 3, 1), pool=torch.nn.AdaptiveAvgPool2d((4, None))),
        _Reducing("sr", torch.nn.Conv2d(3, 3, 1), pool=torch.nn.AdaptiveAvgPool2d((None, 6))),
        _Reducing("sr", torch.nn.Conv2d(3, 3, 2, stride=2), pool=torch.nn.AdaptiveAvgPool2d((6, 4))),
    ]
    for module in cases:
        want = module.grid_of(grid)
        assert _reduced_grid(module, grid, want[0] * want[1]) == want, module
        assert _reduced_grid(module, grid, want[0] * want[1] + 1) is None
    assert _reduced_grid(cases[0], None, 12) is None
    # string paddings through the one conv formula (round 38; this read no grid off them before)
    assert _reduced_grid(_Reducing("sr", torch.nn.Conv2d(3, 3, 3, padding="same")), grid, 9 * 13) == grid
    assert _reduced_grid(_Reducing("sr", torch.nn.Conv2d(3, 3, 3, padding="valid")), grid, 7 * 11) == (7, 11)
    assert _reduced_grid(_Reducing("other", torch.nn.Conv2d(3, 3, 1)), grid, 9 * 13) is None
    no_conv = _Reducing("sr", torch.nn.Conv2d(3, 3, 1))
    no_conv.sr = torch.nn.Sequential(torch.nn.Identity())
    assert _reduced_grid(no_conv, grid, 9 * 13) is None


def _hand_made_batch():
    """A batch built by hand: layer 0 with modes, rows and a relative term, layer 2 with full maps only, three images."""
    from qkhooks.results import BatchCapture, LayerCapture

    g = torch.Generator().manual_seed(0)
    q0, k0 = torch.randn(3, 2, 4, 7, generator=g), torch.randn(3, 2, 4, 7, generator=g)
    rows0, rel0 = torch.rand(3, 2, 2, 7, generator=g), torch.randn(3, 2, 7, 7, generator=g)
    full2 = torch.rand(3, 2, 7, 7, generator=g)
    captures = {2: LayerCapture(2, 3, attention={"full": full2}),
                0: LayerCapture(0, 3, query=q0, key=k0, attention={"rows": rows0}, relative=rel0)}
    bias = torch.randn(2, 7, 7, generator=g)
    batch = BatchCapture(["a", "b", "c", "d"][:3], {"query_tokens": [[0, 5]] * 3}, captures, offset=6,
                         module_paths={0: "blocks.0.attn", 2: "blocks.2.attn"}, position_bias={2: bias})
    return batch, dict(q0=q0, k0=k0, rows0=rows0, rel0=rel0, full2=full2, bias=bias)


def test_a_hand_made_batch_answers_the_vocabulary_with_the_tensors_it_holds():
    batch, t = _hand_made_batch()
    assert (batch.n, batch.size, batch.offset, batch.ids) == (3, 3, 6, ["a", "b", "c"])
    assert list(batch.layers) == [0, 2] and batch.mode_layers == [0] and batch.relative_layers == [0]
    assert batch.layers[1] == 2 and batch.layers[-1] == 2 and batch.layers[:1] == [0]
    with pytest.raises(IndexError, match=r"list of recorded layers \[0, 2\] .*batch.captures\[2\]"):
        batch.layers[2]  # the old dict's key of layer 2 (past the list's end): says where its capture is now
    with pytest.raises(IndexError, match="list index out of range"):
        batch.layers[3]
    assert batch.attention_kinds == ["full", "rows"]
    assert (batch.attention_layers(), batch.attention_layers("full"), batch.attention_layers("pooled")) == ([0], [2], [])
    assert batch.query("blocks.0.attn") is t["q0"] and batch.key(0) is t["k0"]
    assert batch.attention(0) is t["rows0"] and batch.attention("blocks.2.attn", "full") is t["full2"]
    assert batch.relative_term(0) is t["rel0"]
    assert repr(batch) == "BatchCapture(n=3, layers=[0, 2], offset=6, ids=['a', 'b', 'c'])"
    from qkhooks.results import BatchCapture, LayerCapture

    four = BatchCapture(list("abcd"), {}, {1: LayerCapture(1, 4)})
    assert repr(four) == "BatchCapture(n=4, layers=[1], offset=0, ids=['a', 'b', 'c']...)"
    assert BatchCapture([], {}).n == 0 and BatchCapture([], {}).statics() == {}
    arrays = batch.arrays()
    assert sorted(arrays) == ["attention/L0/rows", "attention/L2/full", "attention/query_tokens", "modes/L0/key",
                              "modes/L0/query", "relative/L0"]
    assert arrays["modes/L0/query"] is t["q0"] and arrays["modes/L0/key"] is t["k0"]
    assert arrays["relative/L0"] is t["rel0"] and arrays["attention/L2/full"] is t["full2"]
    assert arrays["attention/query_tokens"].dtype == torch.int64
    np.testing.assert_array_equal(arrays["attention/query_tokens"].numpy(), [[0, 5]] * 3)
    no_attention = BatchCapture(["a"], {"query_tokens": [[0]]}, {0: LayerCapture(0, 1, query=t["q0"][:1], key=t["k0"][:1])})
    assert sorted(no_attention.arrays()) == ["modes/L0/key", "modes/L0/query"]
    statics = batch.statics()
    assert list(statics) == ["bias/L2"] and torch.equal(statics["bias/L2"], t["bias"])
    assert statics["bias/L2"] is not t["bias"]  # a copy: the model may reuse its tensor


def test_a_hand_made_batch_refuses_what_it_lacks_with_the_whole_reason():
    batch, _ = _hand_made_batch()
    cases = [
        (lambda: batch.query(2), "this batch has no query/key maps for layer 2 (layers with them: [0]); record with "
                                 "modes= to get them."),
        (lambda: batch.key(2), "this batch has no query/key maps for layer 2 (layers with them: [0]); record with "
                               "modes= to get them."),
        (lambda: batch.attention(2), "this batch has no 'rows' attention for layer 2 (layers with them: [0]); it has "
                                     "attention kinds ['full', 'rows'] (the attention= option of qkhooks.record)."),
        (lambda: batch.inputs(0), "this batch kept no input tokens for layer 0; record with keep_inputs=True."),
        (lambda: batch.spectrum(0), "this batch was recorded without modes, so it has no spectrum; record with modes=."),
        (lambda: batch.relative_term(2), "this batch has no query-dependent relative-position term for layer 2 (layers "
                                         "with them: [0]); only layers with one (SAM/ViTDet decomposed positions), "
                                         "recorded with attention='full', keep it."),
        (lambda: batch.geometry("blocks.2.attn"), "this batch carries no geometry for layer 2 (record_dataset puts "
                                                  "every layer's into meta['geometry'], a live recording each layer's "
                                                  "with modes; run.geometry(l) says why a layer has none)."),
        (lambda: batch.query(1), "this batch did not record layer 1; its layers are [0, 2]."),
    ]
    _assert_refused(cases)
    from qkhooks.results import BatchCapture, LayerCapture

    with pytest.raises(QKHooksError) as err:
        BatchCapture(["a"], {}, {0: LayerCapture(0, 1)}).attention(0)
    assert str(err.value) == ("this batch has no 'rows' attention for layer 0 (layers with them: none); it has "
                              "attention kinds none (the attention= option of qkhooks.record).")
    geometry = LayerGeometry(2, (2, 3), 1, 7, 7, (2, 3), 1)
    batch.meta["geometry"] = {2: geometry}
    assert batch.geometry(2) is geometry


# ------------------------------------------------------------------------------------------------ capture.py
def _zoo_case(name: str):
    from test_relpos import _case

    return _case(name)


def _sam_relative_term_of_its_calls(layer: int):
    """SAM recorded with full maps of ``layer``, and that layer's relative term written out from the tokens its module
    was called on, (calls, h, w, d): q_i·R_h[h_i − h_j + h − 1] + q_i·R_w[w_i − w_j + w − 1], q the layer's own query
    and R the module's tables indexed directly (as test_relpos.py), as (calls, H, h·w, h·w)."""
    import qkhooks

    model, inputs, _ = _zoo_case("samvit_base_patch16_224")
    site = qkhooks.sites(model)[layer]
    tokens = []
    handle = site.module.register_forward_pre_hook(lambda m, a: tokens.append(a[0].detach()))
    try:
        with qkhooks.record(model, modes=None, attention=f"full:{layer}") as rec, torch.no_grad():
            rec(**inputs)
    finally:
        handle.remove()
    x = tokens[0].double()
    _, h, w, _ = x.shape
    rows = site.num_heads * site.head_dim
    q = (x @ site.module.qkv.weight[:rows].double().T + site.module.qkv.bias[:rows].double()).unflatten(-1, (site.num_heads, -1))
    r_h, r_w = site.module.rel_pos_h.double(), site.module.rel_pos_w.double()
    ii, jj = torch.arange(h)[:, None], torch.arange(w)[:, None]
    by_h = torch.einsum("bywhc,yzc->bhywz", q, r_h[ii - ii.T + h - 1])
    by_w = torch.einsum("bywhc,wzc->bhywz", q, r_w[jj - jj.T + w - 1])
    return rec, (by_h[..., :, None] + by_w[..., None, :]).flatten(2, 3).flatten(-2).detach()


def test_the_relative_term_is_q_dot_the_tables_at_the_offsets_and_is_refused_without_full_maps():
    """SAM's global layer 1: the recorded term is q_i·R_h[h_i − h_j + h − 1] + q_i·R_w[w_i − w_j + w − 1], q the
    layer's own query and R the module's tables indexed directly (as test_relpos.py); its windowed layer 0 has a term
    too, but without full maps it is refused, naming the layers with them."""
    rec, want = _sam_relative_term_of_its_calls(1)  # (B, H, N, N): layer 1 is called on whole images
    torch.testing.assert_close(rec.relative_term("blocks.1.attn").double(), want, atol=1e-5, rtol=1e-5)
    assert float(want.abs().max()) > 1e-2 and rec.relative_layers == [1]
    with pytest.raises(QKHooksError) as err:
        rec.relative_term(0)
    assert str(err.value) == ("this recording has no full attention for layer 0 (layers with them: [1]); the relative "
                              "term is kept with the full maps: record the layer with attention='full'.")


def test_a_layers_position_bias_is_its_tables_entries_at_the_relative_index_and_other_layers_are_refused():
    """BEiT's per-layer table indexed by the model's own relative_position_index (a direct computation from the
    module's parameters); a layer outside the recording is refused, naming those recorded."""
    import qkhooks

    model, inputs, _ = _zoo_case("beit_base_patch16_224")
    with qkhooks.record(model, modes=2, layers=[1]) as rec, torch.no_grad():
        rec(**inputs)
    attn = model.blocks[1].attn
    n = attn.relative_position_index.shape[0]
    want = attn.relative_position_bias_table.detach()[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    torch.testing.assert_close(rec.bias(1), want, atol=0, rtol=0)
    assert float(want.abs().max()) > 0
    with pytest.raises(QKHooksError) as err:
        rec.bias(0)
    assert str(err.value) == "layer 0 is not recorded here; recorded layers: [1]."


def test_keys_of_spatially_reduced_tokens_are_refused_on_the_residual_stream_naming_the_module():
    import qkhooks

    model, inputs, _ = _zoo_case("pvt_v2_b0")
    site = next(s for s in qkhooks.sites(model) if s.key_tokens is not None)
    with qkhooks.record(model, modes=2, layers=[site.layer], input="residual") as rec, torch.no_grad():
        with pytest.raises(QKHooksError) as err:
            rec(**inputs)
    assert str(err.value) == (f"{site.path}: its keys are spatially reduced tokens, which have no residual-stream "
                              "counterpart; record it with input='normed'.")


def test_eager_outputs_hand_over_the_full_maps_the_layer_computed_equal_to_the_models_eager_attention():
    import qkhooks
    from conftest import eager_attention

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    want = eager_attention(ASYMMETRIC_TIMM, model, images)
    with qkhooks.record(model, modes=None, attention="full:1", outputs="eager") as rec, torch.no_grad():
        model(images)
    torch.testing.assert_close(rec.attention(1, "full"), want[1], atol=1e-6, rtol=1e-5)
    assert rec.attention_layers("full") == [1] and rec.last.attention_layers("full") == [1]


def test_default_attention_kind_is_rows_for_the_recording_and_its_old_maps_call():
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=None, attention=["rows:0", "full:1"]) as rec, torch.no_grad():
        model(images)
    assert rec.attention_layers() == [0] and rec.attention_layers("full") == [1]
    with pytest.warns(DeprecationWarning, match=r"use Recording.attention\(l, kind\)"):
        maps = rec.attention_maps()
    assert list(maps) == [0] and maps[0] is rec.attention(0)


def test_a_windowed_layers_eager_maps_are_its_windows_softmax_per_image():
    """Swin with outputs="eager": the maps the layer computed once, laid out per image (B, nW, H, Nw, Nw), equal the
    softmax timm's own eager window attention returns (read off its attn_drop)."""
    import qkhooks
    from test_multigrid_runs import _swin

    model, images = _swin(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    attn = model.layers[0].blocks[1].attn
    seen = timm_module_eager_maps(model, attn, images)
    with qkhooks.record(model, modes=None, attention="full:1", outputs="eager") as rec, torch.no_grad():
        model(images)
    got = rec.attention(1, "full")
    assert got.shape == (2, 16, 2, 16, 16)
    torch.testing.assert_close(got.flatten(0, 1), seen[0], atol=1e-6, rtol=1e-5)


def test_a_recordings_refusals_say_the_whole_reason():
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=None) as rec, torch.no_grad():
        model(images)
    cases = [
        (lambda: rec.attention(0), "this recording rebuilds no 'rows' attention; it has none (the attention= option "
                                   "of qkhooks.record)."),
        (lambda: rec.geometry(7), "this recording did not record layer 7; its layers are [0, 1]."),
        (lambda: rec.spectrum(0), "this recording has no modes (modes=None), so no spectrum; use qkhooks.spectrum(model)."),
        (lambda: rec.bias(2), "layer 2 is not recorded here; recorded layers: [0, 1]."),
    ]
    _assert_refused(cases)
    assert rec.bias(0) is None  # a plain ViT adds no position term
    from test_multigrid_runs import _swin

    # a plain layer's geometry is read off its tokens (round 31), with or without modes; a windowed one's off its maps
    with qkhooks.record(model, modes=2) as with_modes, torch.no_grad():
        model(images)
    assert rec.geometry(1) == with_modes.geometry(1) and rec.geometry(1).grid == ASYMMETRIC_TIMM.grid
    swin = _swin()
    with qkhooks.record(swin, modes=None) as windowed, torch.no_grad():
        swin(torch.randn(2, 3, 64, 64))
    _assert_refused([(lambda: windowed.geometry(1), "this recording has no query/key maps to read the token counts "
                                                    "off; record with modes=.")])


def test_old_spellings_answer_the_old_dicts_values():
    """The deprecated dict views hand out the very tensors the new calls return (len, membership, iteration, dict
    methods); private probes (copy, pickle, IPython) see a plain method, not the old value."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=2, layers=[1], keep_inputs=True) as rec, torch.no_grad():
        model(images)
    with pytest.warns(DeprecationWarning, match=r"Recording.query\[l\] is deprecated; use query\(l\)."):
        assert len(rec.query) == 1 and 1 in rec.query and 0 not in rec.query and list(rec.query) == [1]
    with pytest.warns(DeprecationWarning):
        assert rec.key.get(1) is rec.key(1) and list(rec.inputs.keys()) == [1] and rec.inputs[1] is rec.inputs(1)
    with pytest.raises(AttributeError):
        rec.query._repr_html_
    assert repr(rec.query) == "<method query(l)>" and repr(rec.spectrum) == "<method spectrum(l) or recording.qk_spectrum>"
    assert rec.inputs(1).shape == (2, 25, 32)
    with pytest.warns(DeprecationWarning, match=r"use batch.captures"):
        assert list(rec.last.layers.keys()) == [1] and rec.last.layers.get(1) is rec.last.captures[1]
        assert rec.last.layers.get(5, "none") == "none" and list(rec.last.layers.values()) == [rec.last.captures[1]]


@pytest.mark.skipif("MUTANT_UNDER_TEST" in __import__("os").environ,
                    reason="inside mutmut its trampolines are the callers, so no warning can point at this file")
def test_old_spellings_warn_at_the_callers_line():
    import warnings

    import qkhooks
    from qkhooks.results import BatchCapture, LayerCapture

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=2, attention="rows") as rec, torch.no_grad():
        model(images)
    calls = [lambda: rec.query[1], lambda: rec.spectrum[0], lambda: rec.last.layers.items(),
             lambda: rec.attention_maps("rows"), lambda: BatchCapture([], {}, layers={0: LayerCapture(0, 1)})]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught] == [__file__], [str(w.message) for w in caught]


def test_modes_are_read_as_a_count_all_or_none():
    from qkhooks.capture import parse_modes

    for given, want in ((16, 16), ("16", 16), (" 3 ", 3), ("all", "all"), ("ALL", "all"), (None, None), (0, None),
                        ("0", None), ("none", None), (" None ", None)):
        assert parse_modes(given) == want, given
    for bad in (True, -2, "1.5", "some"):
        with pytest.raises(QKHooksError) as err:
            parse_modes(bad)
        assert str(err.value) == f"modes must be a positive integer, 'all' or none (0); got {bad!r}."


def test_each_batch_says_its_prefix_tokens_and_its_grid_read_off_the_first_recorded_layer():
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=None, layers=[1]) as rec, torch.no_grad():
        rec(images, ids=["left", "right"], meta={"note": 7})
    meta = dict(rec.last.meta)
    geometry = meta.pop("geometry")  # layer 1's own, read in its hook (round 31)
    assert meta.pop("prefix_tokens") == {1: 1}  # each recorded layer's own (round 31)
    assert meta == {"note": 7, "num_prefix_tokens": 1, "grid": (4, 6)}
    assert list(geometry) == [1] and (geometry[1].num_prefix_tokens, geometry[1].grid) == (1, (4, 6))
    assert rec.ids == ["left", "right"] and rec.last.offset == 0


def test_sites_are_searched_once_per_model_and_again_when_a_setting_the_adapters_read_changes(monkeypatch):
    import qkhooks
    import qkhooks.capture as capture

    calls = []
    real = capture.find_sites
    monkeypatch.setattr(capture, "find_sites", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    hf = next(t for t in TINY_MODELS if t.name == "hf-vit-4x6-key-first")
    for tiny in (ASYMMETRIC_TIMM, hf):
        model = tiny.model()
        for _ in range(2):
            with qkhooks.record(model, modes=None):
                pass
        assert calls == [model], tiny.name
        if tiny.kind == "timm":
            model.blocks[0].attn.fused_attn = not model.blocks[0].attn.fused_attn  # a plain setting
        else:
            model.config._attn_implementation = "eager"  # a config's setting, changed in place
        with qkhooks.record(model, modes=None):
            pass
        assert calls == [model, model], tiny.name
        calls.clear()


def test_a_recording_of_unchanged_weights_reuses_the_projectors_built_for_them_and_rebuilds_after_a_change():
    """record() entered per batch builds no projector again while the weights are unchanged (the cached spectrum's
    identity vouches for them); changed weights get new projectors whose maps follow the new weights."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=2) as first, torch.no_grad():
        model(images)
    with qkhooks.record(model, modes=2) as second, torch.no_grad():
        model(images)
    assert first.mode_source == second.mode_source == {0: "qk", 1: "qk"}
    assert all(first._from_qk[l] is second._from_qk[l] for l in (0, 1))
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.mul_(2.0)  # both W_q and W_k doubled: sigma x 4
    with qkhooks.record(model, modes=2) as third, torch.no_grad():
        model(images)
    assert third._from_qk[0] is first._from_qk[0] and third._from_qk[1] is not first._from_qk[1]
    torch.testing.assert_close(third.spectrum(1).S, 4 * first.spectrum(1).S, rtol=1e-5, atol=1e-6)


def test_a_recording_built_directly_takes_the_documented_defaults_and_a_given_spectrum_over_the_models():
    import qkhooks
    from qkhooks.capture import Recording

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    direct = Recording(model)
    assert (direct.input, direct.modes, direct.left_out, direct.outputs) == ("normed", 16, {}, "unchanged")
    assert direct.config["augmented"] is False and direct.mode_source == {0: "qk", 1: "qk"}
    given = qkhooks.spectrum(model)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.mul_(2.0)  # the model's own spectrum changes; the given one does not
    with pytest.raises(QKHooksError, match=r"^layer 1 .* the spectrum given \(spectrum=\) is not that of this layer's "):
        qkhooks.record(model, modes=2, spectrum=given)  # round 32: refused unless said
    with qkhooks.record(model, modes=2, spectrum=given, spectrum_of_other_weights=True) as rec, torch.no_grad():
        model(images)
    torch.testing.assert_close(rec.spectrum(1).S, given[1].S[:, :2], atol=0, rtol=0)
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, layers=[0], attention="full:1")
    assert str(err.value) == ("attention 'full' asks for layers [1], which this recording does not hook (recorded "
                              "layers: [0]); pick block indices among them or add them to layers.")


def test_a_recording_names_its_models_spectrum_and_refuses_a_second_attach_and_eager_outputs_without_full_maps():
    import qkhooks

    model = ASYMMETRIC_TIMM.model()
    with qkhooks.record(model, modes=2) as rec:
        assert rec.qk_spectrum.model == "VisionTransformer"
        _assert_refused([(rec.attach, "this recording is already attached; use a new qkhooks.record(...) to nest."),
                         (lambda: qkhooks.record(model, modes=2, outputs="eager"),
                          "outputs='eager' computes a layer's attention once from its recorded full maps, and this "
                          "recording asks for none; add attention='full' (or 'full:LAYERS'), or leave "
                          "outputs='unchanged'.")])


# ------------------------------------------------------------------------------------------------ round 12
class _UnmodelledProbe(torch.nn.Module):
    """A module that owns q and k projections no adapter models (never called): a partial recording names it."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


def test_given_sites_with_skip_unmodelled_leave_out_the_models_unmodelled_modules_not_the_unselected_layers():
    """left_out names what no site of the model covers, found from every site of the model even when the sites are
    handed over as a selection (a layer not selected is recorded elsewhere, not unmodelled)."""
    import qkhooks

    model = ASYMMETRIC_TIMM.model()
    model.probe = _UnmodelledProbe()
    every = qkhooks.sites(model, skip_unmodelled=True)
    assert [s.path for s in every] == ["blocks.0.attn", "blocks.1.attn"]
    with qkhooks.record(model, modes=None, sites=every[1:], skip_unmodelled=True) as given:
        pass
    with qkhooks.record(model, modes=None, layers=[1], skip_unmodelled=True) as chosen:
        pass
    assert list(given.left_out) == list(chosen.left_out) == ["probe"] and given.layers == [1]
    assert given.left_out["probe"].startswith("_UnmodelledProbe: ")


def test_a_forward_that_fails_inside_an_eager_layer_leaves_the_recording_usable_for_the_next_one():
    """outputs="eager": the layer's attention mode is left even when its forward raises (the exit hook runs on
    errors too), so the retried forward computes the layer's maps once, equal to the module's own eager maps."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    attn = model.blocks[0].attn
    want = timm_module_eager_maps(model, attn, images)[0]

    def fail(module, args, output):
        raise RuntimeError("stopped after the attention")

    with qkhooks.record(model, modes=None, attention="full:0", outputs="eager") as rec, torch.no_grad():
        handle = attn.proj.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="stopped after the attention"):
            model(images)
        handle.remove()
        model(images)
    torch.testing.assert_close(rec.attention(0, "full"), want, atol=1e-6, rtol=1e-5)
    assert torch.overrides._get_current_function_mode_stack() == []


def test_a_finished_recording_keeps_no_module_alive_and_its_sites_stay_well_formed():
    """After the with block the sites hold no module (the model can be freed) and keep their field types: no
    q/k modules is the empty tuple a site without them has, so code iterating them needs no special case."""
    import gc
    import weakref

    import qkhooks

    model = ASYMMETRIC_TIMM.model()
    alive = weakref.ref(model)
    with qkhooks.record(model, modes=2) as rec:
        assert [len(s.qk_modules) for s in rec.sites] == [1, 1]  # timm's fused qkv
    assert [(s.module, s.block, s.qk_modules) for s in rec.sites] == [(None, None, ())] * 2
    with pytest.raises(QKHooksError):
        rec.sites[0].qk_linear()
    del model
    gc.collect()
    assert alive() is None


# rows from the q/k hook (round 11's hot path): where the hook runs anyway (modes or full maps from q/k), rows and
# pooled rows come from the model's own q and k; elsewhere from the tokens x. Either way: the model's eager rows.
_CENTRE_4X6 = 1 + 2 * 6 + 3  # the class token, then row 2 (of 4), column 3 (of 6): the default second query


@pytest.mark.parametrize("name", ["timm-vit-4x6", "hf-vit-4x6-key-first"])  # fused qkv; separate q/k, k called first
def test_rows_taken_from_the_qk_hook_equal_the_models_eager_rows_wherever_that_hook_runs(name):
    import qkhooks
    from conftest import eager_attention

    tiny = next(t for t in TINY_MODELS if t.name == name)
    model, images = tiny.model(), tiny.images()
    eager = eager_attention(tiny, model, images)
    masks = torch.rand(2, 3, 25, generator=torch.Generator().manual_seed(5))
    chosen = torch.tensor([[5, 0, 24], [17, 3, 3]])
    cases = [  # (record's options, the layers whose rows come from the q/k hook)
        (dict(modes=2, attention=["rows", "pooled"]), {0, 1}),
        (dict(modes=None, attention=["full:0", "rows"]), {0}),
        (dict(modes=None, attention=["rows", "pooled"]), set()),
        (dict(modes=2, attention="rows", qk_path=False), set()),
        (dict(modes=2, attention=["full:0", "rows"], outputs="eager"), {1}),  # layer 0's softmax is the model's own
    ]
    for options, from_qk in cases:
        for tokens in (None, chosen):
            meta = {"pool_masks": masks} if "pooled" in options["attention"] else {}
            if tokens is not None:
                meta["query_tokens"] = tokens
            with qkhooks.record(model, **options) as rec, torch.no_grad():
                rec(images, meta=meta)
            assert rec._qk_rows == from_qk, options
            want_tokens = torch.tensor([[0, _CENTRE_4X6]] * 2) if tokens is None else tokens
            for layer in (0, 1):
                want = torch.stack([eager[layer][b][:, want_tokens[b]] for b in range(2)])
                torch.testing.assert_close(rec.attention(layer), want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{options}: {m}")
                if "pooled" in options["attention"]:
                    pooled = np.einsum("bhtn,bmn->bhtm", want.double().numpy(), masks.double().numpy())
                    np.testing.assert_allclose(rec.attention(layer, "pooled").double().numpy(), pooled, atol=1e-6)


def test_a_windowed_layers_rows_come_from_its_windows_not_from_the_qk_hook():
    """Swin: the q/k hook runs (modes from q/k), but a window site reads its rows its own way: each row is the
    query's window softmax (timm's eager window attention), placed at that window's tokens, zero elsewhere."""
    import qkhooks
    from test_multigrid_runs import _swin

    model, images = _swin(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    windows = timm_module_eager_maps(model, model.layers[0].blocks[0].attn, images)[0]  # (B * 16, H, 16, 16)
    tokens = torch.tensor([[136, 5], [0, 255]])  # on the 16 x 16 grid, windows of 4 x 4, no shift in block 0
    with qkhooks.record(model, modes=2, layers=[0], attention="rows") as rec, torch.no_grad():
        rec(images, meta={"query_tokens": tokens})
    assert rec.mode_source == {0: "qk"} and rec._qk_rows == set()
    want = torch.zeros(2, 2, 2, 256)
    for b in range(2):
        for t, token in enumerate(tokens[b].tolist()):
            r, c = divmod(token, 16)
            window = b * 16 + (r // 4) * 4 + c // 4
            keys = [(r // 4 * 4 + j // 4) * 16 + c // 4 * 4 + j % 4 for j in range(16)]
            want[b, :, t, keys] = windows[window, :, (r % 4) * 4 + c % 4]
    torch.testing.assert_close(rec.attention(0), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["timm-vit-4x6", "hf-vit-4x6-key-first"])  # fused qkv; separate q/k, k called first
def test_modes_from_the_qk_hook_in_a_compute_dtype_cast_both_sides_and_equal_the_tokens_on_the_modes(name):
    """compute_dtype=float64 on a float32 model: the q and k the Linear modules return are both cast before the
    projection, so both maps are float64 and equal x·u_n and x·v_n (numpy, float64) to float32 rounding of q, k."""
    import qkhooks

    tiny = next(t for t in TINY_MODELS if t.name == name)
    model, images = tiny.model(), tiny.images()
    with qkhooks.record(model, modes=2, compute_dtype=torch.float64, keep_inputs=True) as rec, torch.no_grad():
        rec(images)
    assert rec.mode_source == {0: "qk", 1: "qk"}
    for layer in (0, 1):
        x = rec.inputs(layer).double().numpy()
        spectrum = rec.spectrum(layer)
        assert (rec.query(layer).dtype, rec.key(layer).dtype) == (torch.float64, torch.float64)
        for got, side in ((rec.query(layer), spectrum.U), (rec.key(layer), spectrum.V)):
            want = np.einsum("bnd,hdk->bhkn", x, np.asarray(side, dtype=np.float64))
            np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=1e-4)


def test_an_attention_that_bypasses_its_qk_linear_is_refused_when_its_full_maps_or_modes_come_from_it():
    """A layer whose full maps (or modes) are taken from its q/k Linear's output, in a forward that computes q, k
    without calling that module (its hook never runs): the batch is refused with the whole reason, never handed
    over without the maps asked for."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    qkv = model.blocks[0].attn.qkv
    for options in (dict(modes=None, attention="full:0"), dict(modes=2)):
        with qkhooks.record(model, **options) as rec, torch.no_grad():
            object.__setattr__(model.blocks[0].attn, "qkv", lambda x: torch.nn.functional.linear(x, qkv.weight, qkv.bias))
            try:
                with pytest.raises(QKHooksError) as err:
                    model(images)
            finally:
                del model.blocks[0].attn.__dict__["qkv"]
        assert str(err.value) == (
            "layer 0's attention did not call its q/k Linear modules, so its modes or full maps could not be taken "
            "from their outputs; record with qk_path=False to use the tokens instead."), options
        assert rec.last is None and rec.images_seen == 0


# ---------------------------------------------------------------------------------------------- round 13 (mut13-capture)
def test_default_rows_across_swin_stages_are_refused_with_the_whole_reason_and_chosen_tokens_are_each_stages_own():
    """The rows-axis check: default tokens (those of the first rows layer's grid) in a layer of another stage are
    refused before any batch is handed over; chosen tokens index each layer's own tokens, so the rows of both stages
    are recorded, each the query's window softmax of timm's eager window attention (block 0 of a stage: no shift)."""
    import qkhooks
    from test_multigrid_runs import _swin

    model, images = _swin(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(QKHooksError) as err:
        with qkhooks.record(model, modes=0, layers=[1, 2], attention="rows") as rec, torch.no_grad():
            rec(images)
    assert str(err.value) == (
        "layer 2 (layers.1.blocks.0.attn) attends over 2 images of 16 tokens (stage 'layers.1.blocks'; query positions "
        "0 prefix + 8x8 grid) and layer 1 (layers.0.blocks.1.attn) over 2 images of 16 (stage 'layers.0.blocks'; query "
        "positions 0 prefix + 16x16 grid): the default query tokens (the class "
        "token and the centre patch) are those of the first layer's grid. Record the rows of one stage at a time "
        "(layers=[...]) or record attention='full'.")
    assert rec.images_seen == 0 and rec.last is None
    tokens = torch.tensor([[3, 45], [0, 60]])  # valid on both grids (16 x 16 and 8 x 8)
    with qkhooks.record(model, modes=0, layers=[0, 2], attention="rows") as rec, torch.no_grad():
        rec(images, meta={"query_tokens": tokens})
    for layer, attn, side in ((0, model.layers[0].blocks[0].attn, 16), (2, model.layers[1].blocks[0].attn, 8)):
        windows = timm_module_eager_maps(model, attn, images)[0]  # (B * windows, H, 16, 16), windows of 4 x 4
        per_row = side // 4
        want = torch.zeros(2, windows.shape[1], 2, side * side)
        for b in range(2):
            for t, token in enumerate(tokens[b].tolist()):
                r, c = divmod(token, side)
                window = b * per_row * per_row + (r // 4) * per_row + c // 4
                keys = [(r // 4 * 4 + j // 4) * side + c // 4 * 4 + j % 4 for j in range(16)]
                want[b, :, t, keys] = windows[window, :, (r % 4) * 4 + c % 4]
        torch.testing.assert_close(rec.attention(layer), want, atol=1e-6, rtol=1e-5)


def test_a_layer_run_twice_is_refused_with_the_whole_reason():
    """A module called twice in one forward (a ViT's second block used twice): the refusal names the layer, its
    module and why, in full; nothing is handed over."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    model.blocks = torch.nn.Sequential(model.blocks[0], model.blocks[1], model.blocks[1])
    with pytest.raises(QKHooksError) as err:
        with torch.no_grad(), qkhooks.record(model, modes=2) as rec:
            rec(images)
    assert str(err.value) == (
        "layer 1 (blocks.1.attn, Attention) ran more than once in one forward of the model, and a recording holds one "
        "call per layer and forward, so its earlier calls would be lost; qkhooks does not model this module's "
        "repeated calls.")
    assert rec.images_seen == 0


def test_per_frame_calls_are_joined_image_major_in_every_tensor_a_capture_holds():
    """T calls of a layer over the same B images become one capture of B·T, image b's calls together (b·T + t), for
    every tensor kept (inputs, modes, each attention kind, the relative term); a tensor a call lacks stays None."""
    from qkhooks.capture import _joined_calls
    from qkhooks.results import LayerCapture

    rng = np.random.default_rng(13)
    shapes = {"inputs": (2, 5, 3), "query": (2, 2, 4, 5), "key": (2, 2, 4, 5), "relative": (2, 2, 5, 5)}
    calls = []
    for _ in range(3):
        parts = {name: torch.from_numpy(rng.standard_normal(shape)) for name, shape in shapes.items()}
        attention = {"full": torch.from_numpy(rng.standard_normal((2, 2, 5, 5))),
                     "rows": torch.from_numpy(rng.standard_normal((2, 2, 1, 5)))}
        calls.append(LayerCapture(7, 2, attention=attention, **parts))
    joined = _joined_calls(calls)
    assert (joined.layer, joined.batch_size, sorted(joined.attention)) == (7, 6, ["full", "rows"])
    for name in shapes:
        want = np.stack([[getattr(calls[t], name)[b].numpy() for t in range(3)] for b in range(2)]).reshape(
            (6,) + shapes[name][1:])
        np.testing.assert_array_equal(getattr(joined, name).numpy(), want)
    for kind in ("full", "rows"):
        want = np.concatenate([np.stack([calls[t].attention[kind][b].numpy() for t in range(3)]) for b in range(2)])
        np.testing.assert_array_equal(joined.attention[kind].numpy(), want)
    bare = _joined_calls([LayerCapture(0, 2, query=torch.zeros(2, 1, 1, 3)), LayerCapture(0, 2, query=torch.ones(2, 1, 1, 3))])
    assert (bare.inputs, bare.key, bare.relative, bare.attention) == (None, None, None, {})
    assert bare.query[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_terms_are_read_by_index_or_path_and_refused_with_the_whole_reason():
    """Recording.terms: the same terms by block index and by module path; a one-softmax layer, a two-softmax layer
    recorded without full maps and a layer never recorded are refused with the whole message."""
    import qkhooks
    from test_map_forms import _dwee

    model = _dwee()
    plain = ASYMMETRIC_TIMM.model()
    with qkhooks.record(model, modes=0, attention="full:1") as rec, torch.no_grad():
        model(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    by_path = rec.terms(rec.module_paths[1])
    assert set(by_path) == {"softmax1", "softmax2", "lambda"}
    for name, term in rec.terms(1).items():
        assert torch.equal(term, by_path[name])
    with qkhooks.record(plain, modes=0, attention="full") as plain_rec, torch.no_grad():
        plain_rec(ASYMMETRIC_TIMM.images())
    _assert_refused([
        (lambda: plain_rec.terms(0), "layer 0 (blocks.0.attn) has one softmax per map: it has no separate terms."),
        (lambda: rec.terms(0), "this recording has no full attention for layer 0 (layers with them: [1]); the terms "
                               "are kept with the full maps: record the layer with attention='full'."),
        (lambda: rec.terms(5), "this recording did not record layer 5; its layers are [0, 1]."),
    ])


def test_a_forward_that_fails_in_the_last_recorded_layer_hands_over_no_batch_whichever_call_opened_it():
    """A forward that raises inside the last recorded layer (after every layer's hooks ran): whether the batch was
    opened by the model's own call or by the first layer (a submodule's forward called directly), no batch is handed
    to the sinks or counted; the next forward is recorded as batch 0, with the maps of timm's eager attention."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    want = timm_module_eager_maps(model, model.blocks[1].attn, images)[0]

    def fail(module, args, output):
        raise RuntimeError("stopped inside the last layer")

    for forward in (model, model.forward_features):
        handed: list = []
        with qkhooks.record(model, modes=None, attention="full") as rec, torch.no_grad():
            rec.sinks.append(type("Sink", (), {"update": lambda self, batch: handed.append(batch)})())
            handle = model.blocks[1].attn.proj.register_forward_hook(fail)
            with pytest.raises(RuntimeError, match="stopped inside the last layer"):
                forward(images)
            handle.remove()
            assert (handed, rec.images_seen, rec.last) == ([], 0, None)
            forward(images)
        assert len(handed) == 1 and handed[0].ids == ["0", "1"] and rec.images_seen == 2
        torch.testing.assert_close(rec.attention(1, "full"), want, atol=1e-6, rtol=1e-5)


def test_pooled_rows_without_pool_masks_are_refused_with_the_whole_reason_on_either_path():
    """attention='pooled' with no pool_masks in the batch metadata: refused with the whole message, whether the rows
    come from the tokens x (qk_path=False) or from the q/k hook; nothing is counted."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    for options in (dict(modes=2, qk_path=False), dict(modes=2)):
        with pytest.raises(QKHooksError) as err:
            with qkhooks.record(model, attention="pooled", **options) as rec, torch.no_grad():
                rec(images)
        assert str(err.value) == (
            "attention='pooled' needs pool_masks (B, M, tokens), the masks each row's mass is summed on, with the "
            "batch; none came with this one. pool_masks belongs to each batch: inside the `with`, call "
            "`run(images, meta={'pool_masks': masks})` or `run.set_batch(pool_masks=masks)` before `model(images)` "
            "(README: \"Choosing query tokens and pooled masks\")."), options
        assert rec.images_seen == 0


def test_two_softmax_terms_taken_from_the_tokens_without_the_qk_path_equal_the_terms_written_out():
    """qk_path=False: a differential layer's full maps and its terms (softmax1, softmax2, λ) come from the tokens x in
    the layer hook, not from the q/k hook; each equals the terms written out from the parameters (float64)."""
    import qkhooks
    from test_map_forms import _diff_reference, _dwee, _inputs_of

    model = _dwee(qkv_bias=True)
    attn = model.blocks[1].attn
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, xs = _inputs_of(model, {"a": attn}, images)
    with qkhooks.record(model, modes=2, attention="full:1", qk_path=False) as rec, torch.no_grad():
        rec(images)
    assert rec._qk_attention == set() and rec.mode_source == {0: "x", 1: "x"}
    _, s1, s2, lam = _diff_reference(attn, xs["a"])
    terms = rec.terms(1)
    torch.testing.assert_close(terms["softmax1"].double(), s1, atol=1e-6, rtol=0)
    torch.testing.assert_close(terms["softmax2"].double(), s2, atol=1e-6, rtol=0)
    assert abs(float(terms["lambda"]) - float(lam)) < 1e-6
    torch.testing.assert_close(rec.attention(1, "full").double(), s1 - lam * s2, atol=1e-6, rtol=0)


def _eomt_recording(**options):
    """A recording of the small EoMT-DINOv3 of the zoo (5 object queries joined before its last block), one batch."""
    import qkhooks
    from test_zoo import FAST_CASES, _call

    case = next(c for c in FAST_CASES if c.name == "EomtDinov3ForUniversalSegmentation")
    torch.manual_seed(0)
    model, inputs = case.build().eval(), case.inputs()
    with qkhooks.record(model, modes=0, **options) as rec, torch.no_grad():
        _call(model, inputs)
    return rec


def test_a_masked_layer_has_no_position_only_term_and_says_why_in_full():
    """EoMT's last block masks each object query to its predicted mask: a term that depends on the image, so the
    layer's bias is refused with the whole reason; its first block adds no term at all (None)."""
    rec = _eomt_recording(attention="full")
    assert rec.layers == [0, 1] and rec.bias(0) is None
    _assert_refused([(lambda: rec.bias(1), "layer 1 has no position-only additive term to give: it is a mask (it "
                                           "masks keys out or differs between images), applied in the rebuilt maps.")])


def test_reduced_keys_in_a_compute_dtype_are_the_models_reduced_tokens_on_the_modes_in_that_dtype():
    """PVT-v2 (keys from spatially reduced tokens, modes from x): with compute_dtype=float64 both maps are float64,
    the query maps the layer's input tokens times U and the key maps the model's own reduced tokens (the output of its
    reduction LayerNorm) times V, in numpy float64."""
    import qkhooks
    from test_multigrid_runs import _outputs, _timm

    model = _timm("pvt_v2_b0", embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2), depths=(1, 1, 1, 1),
                  sr_ratios=(4, 2, 1, 1))
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    attn = model.stages[0].blocks[0].attn
    reduced, remove = _outputs({0: attn.norm})
    inputs: list = []
    handle = attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    try:
        with qkhooks.record(model, modes=2, layers=[0], compute_dtype=torch.float64) as rec, torch.no_grad():
            rec(images)
    finally:
        remove()
        handle.remove()
    assert rec.mode_source == {0: "x"} and (rec.query(0).dtype, rec.key(0).dtype) == (torch.float64, torch.float64)
    spectrum = rec.spectrum(0)
    for got, tokens, side in ((rec.query(0), inputs[0], spectrum.U), (rec.key(0), reduced[0][0], spectrum.V)):
        want = np.einsum("bnd,hdk->bhkn", tokens.double().numpy(), np.asarray(side, dtype=np.float64))
        assert got.shape == want.shape  # (2, 2, 2, 384) queries, (2, 2, 2, 24) reduced keys
        np.testing.assert_allclose(got.numpy(), want, atol=1e-10, rtol=1e-10)


def test_a_windowed_layers_modes_from_the_tokens_are_laid_out_on_the_image_grid():
    """Swin with qk_path=False (modes from the window tokens x in the layer hook): the query and key maps of each
    image are on its 16 x 16 grid, the token at (r, c) the one timm's window partition put in window (r//4, c//4) at
    (r%4, c%4) (block 0: no shift), times U and V (numpy float64)."""
    import qkhooks
    from test_multigrid_runs import _swin

    model, images = _swin(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    attn = model.layers[0].blocks[0].attn
    windows: list = []
    handle = attn.register_forward_pre_hook(lambda module, args: windows.append(args[0].detach().clone()))
    try:
        with qkhooks.record(model, modes=2, layers=[0], qk_path=False) as rec, torch.no_grad():
            rec(images)
    finally:
        handle.remove()
    assert rec.mode_source == {0: "x"}
    x = windows[0].double().numpy()  # (2 * 16 windows, 16 tokens, C)
    grid = np.stack([[x[b * 16 + (r // 4) * 4 + c // 4, (r % 4) * 4 + c % 4] for r in range(16) for c in range(16)]
                     for b in range(2)])  # (2, 256, C), row-major on the image grid
    spectrum = rec.spectrum(0)
    for got, side in ((rec.query(0), spectrum.U), (rec.key(0), spectrum.V)):
        want = np.einsum("bnd,hdk->bhkn", grid, np.asarray(side, dtype=np.float64))
        assert got.shape == want.shape == (2, 2, 2, 256)
        np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=1e-4)


def test_a_windowed_layers_relative_term_is_laid_out_per_image_and_window_like_its_full_maps():
    """SAM's windowed layer 0: the module is called on windows (B·nW, s, s, d); its relative term is q_i·R_h[h_i − h_j
    + s − 1] + q_i·R_w[w_i − w_j + s − 1] within each window (the module's tables indexed directly), stored per image
    as (B, nW, H, s·s, s·s), the layout of its full maps."""
    rec, want = _sam_relative_term_of_its_calls(0)  # (B·nW, H, s·s, s·s): layer 0 is called on windows
    calls, images = want.shape[0], rec.n
    assert calls % images == 0 and calls // images > 1  # several windows per image
    got = rec.relative_term(0)
    assert got.shape == rec.attention(0, "full").shape == (images, calls // images) + tuple(want.shape[1:])
    torch.testing.assert_close(got.double(), want.unflatten(0, (images, -1)), atol=1e-5, rtol=1e-5)


def test_whether_a_cached_sites_attributes_lead_back_to_it_is_walked_through_every_road_once():
    """_links_back (a cached site is copied only when nothing it holds reaches the original): a closure, a default,
    a keyword default, an object's attribute and a list each reach the site; a graph with a cycle that reaches
    nothing is walked once and answers False; a graph over 10,000 objects counts as reaching it."""
    import types

    from qkhooks.capture import _links_back

    site = object.__new__(type("Site", (), {}))  # anything with an id; only identity matters
    originals = {id(site)}

    def closure():
        return site

    roads = {
        "closure": closure,
        "default": lambda x=site: x,
        "keyword default": lambda *, x=site: x,
        "attribute": types.SimpleNamespace(helper=types.SimpleNamespace(owner=site)),
        "list": [1.0, [site]],
    }
    for road, value in roads.items():
        assert _links_back([value], originals), road
        assert not _links_back([value], {id(object())}), road
    cycle: dict = {"size": 3, "name": "grid"}
    cycle["again"] = types.SimpleNamespace(back=cycle)
    assert not _links_back([cycle, lambda n: n + 1], originals)
    chain = None
    for _ in range(10_001):
        chain = types.SimpleNamespace(next=chain)
    assert _links_back([chain], originals)  # too large to walk: taken as reaching the site


def test_an_attention_module_replaced_by_another_of_the_same_class_is_found_by_a_new_search():
    """The cached sites are keyed by every module's identity, not only its class and settings: after a block's
    attention is replaced by a copy with other weights (same class, same settings), the next recording hooks the
    new module and its maps are the new module's eager maps."""
    import qkhooks

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=None, attention="full") as rec, torch.no_grad():
        rec(images)  # the sites are searched and cached for this model
    new = copy.deepcopy(model.blocks[1].attn)
    with torch.no_grad():
        new.qkv.weight.mul_(1.5)
    model.blocks[1].attn = new
    want = timm_module_eager_maps(model, new, images)[0]
    with qkhooks.record(model, modes=None, attention="full") as rec, torch.no_grad():
        rec(images)
        assert rec.sites[1].module is new
    torch.testing.assert_close(rec.attention(1, "full"), want, atol=1e-6, rtol=1e-5)


def test_a_batchs_prefix_tokens_are_the_first_recorded_layers_where_later_layers_have_more():
    """EoMT: CLS and 4 registers are the prefix tokens (5); the 5 object queries join them before the last block (10
    there). The batch's metadata keeps the first recorded layer's count, and the last layer's when it alone is
    recorded."""
    both, last = _eomt_recording(attention="full"), _eomt_recording(attention="full", layers=[1])
    assert [s.num_prefix_tokens for s in both.sites] == [5, 10]
    assert (both.last.meta["num_prefix_tokens"], last.last.meta["num_prefix_tokens"]) == (5, 10)


def test_a_module_whose_class_changes_in_place_is_searched_again(monkeypatch):
    """The cached sites are keyed by every module's class too: a block's attention given, in place, a class that
    qkhooks knows as unmodelled (a test's entry in UNMODELLED_FORMS) is refused by the next recording, naming it,
    not recorded from the sites found for its old class."""
    import qkhooks
    from qkhooks.models import unsupported

    model, images = ASYMMETRIC_TIMM.model(), ASYMMETRIC_TIMM.images()
    with qkhooks.record(model, modes=None, attention="full") as rec, torch.no_grad():
        rec(images)  # the sites are searched and cached for this model
    attn = model.blocks[1].attn

    class OpaqueAttention(type(attn)):
        pass

    monkeypatch.setitem(unsupported.UNMODELLED_FORMS, f"{OpaqueAttention.__module__}.{OpaqueAttention.__qualname__}",
                        "a test's opaque attention")
    attn.__class__ = OpaqueAttention
    _assert_refused([(lambda: qkhooks.record(model, modes=None, attention="full"),
                      "unsupported attention in 'blocks.1.attn' (OpaqueAttention): a test's opaque attention. To record "
                      "the layers qkhooks does model and leave this one out, named with its reason in the recording and "
                      "the run file, pass skip_unmodelled=True (qkhooks record --skip-unmodelled).")])


# ------------------------------------------------------------------ round 13, after the merge: zoo13's changed functions
def test_a_differential_layers_description_is_a_plain_layers_with_the_heads_part_naming_maps_and_components():
    """``describe`` of a layer whose modes have 2H component heads (differential attention) keeps every part a plain
    layer's line has and replaces only the heads part (the whole line compared, not a substring)."""
    geometry = LayerGeometry(3, (4, 6), 1, 25, 25, (4, 6), 1, heads=4, head_dim=8, stage="blocks", component_heads=8)
    plain = dataclasses.replace(geometry, component_heads=0).describe()
    assert ", 4 heads x 8" in plain
    assert geometry.describe() == plain.replace(", 4 heads x 8", ", 4 maps of 8 component heads x 8")


def test_chosen_query_tokens_in_a_call_of_another_image_count_are_refused_as_naming_no_common_tokens():
    """Chosen tokens index each layer's own tokens, so another stage is fine; a call that holds another number of
    images than the first rows layer's cannot be indexed by one (images, tokens) array: the refusal says that, not the
    default tokens' reason (which would send the user to choose tokens they already chose)."""
    import qkhooks

    model = ASYMMETRIC_TIMM.model()
    rec = qkhooks.record(model, modes=0, attention="rows")
    first, second = rec.sites[0], rec.sites[1]
    rec._check_rows_axis(first, 2, 25, chosen=True)
    rec._check_rows_axis(second, 2, 25, chosen=True)  # same images: accepted
    with pytest.raises(QKHooksError) as err:
        rec._check_rows_axis(second, 3, 25, chosen=True)
    message = str(err.value)
    assert "one set of query tokens cannot name the same tokens in both" in message
    assert "default query tokens" not in message
    assert f"layer {second.layer} ({second.path}) attends over 3 images of 25 tokens" in message
