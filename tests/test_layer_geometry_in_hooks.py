"""Round 31: a plain layer's geometry (prefix tokens, grid, token counts) is read in its hook, from the tokens handed
to it, before any sink takes them, and whether or not modes are recorded.

Before, a live recording's batches got each layer's geometry only as the batch ended, from its maps: the sinks that
take a layer's tokens in its hook (the anisotropy baseline, the BFD reducers) saw the first layer's prefix for every
layer, so live anisotropy on CaiT (CLS + patches in its class-attention layers after patch-only layers) was refused,
and a recording without modes had no geometry at all. The reference for the hook's reading is the one from the maps
(``observe_geometry`` of the maps' token counts, what ``record_dataset``'s probe stores), over a spread of the zoo's
forms with plain layers: prefixes of 0, 1, 5 and 10, class attention, stages of other grids, padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.analysis.anisotropy import AnisotropyReducer
from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite
from qkhooks.results import observe_geometry
from qkhooks.stream import probe_geometry
from test_zoo import FAST_CASES, Case, _call, perturb


def _cait() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                             num_heads=4, depth_token_only=1).eval()


def _images(seed: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _plain(site: AttentionSite) -> bool:
    return site.geometry_from_tokens()


@pytest.mark.parametrize("modes", [None, 2])
def test_live_anisotropy_on_cait_takes_each_layers_own_centre_patch_as_numpy_does(modes):
    """The class-attention layer's tokens are [CLS; 4x4 patches]: its centre patch is token 1 + 2·4 + 2 = 11, where the
    patch-only layers' is 10. Live (no geometry given), the reducer folds exactly the unit centre rows numpy picks
    from the kept tokens with each layer's own prefix (before round 31 it refused: 17 tokens on a 4x4 grid)."""
    model = _cait()
    live = AnisotropyReducer()
    kept: dict[int, list[np.ndarray]] = {}
    with torch.no_grad(), qkhooks.record(model, modes=modes, sinks=[live], keep_inputs=True) as run:
        for seed in (1, 2):
            run(_images(seed))
            for layer, cap in run.last.captures.items():
                kept.setdefault(layer, []).append(cap.inputs.double().numpy())
    centre = {0: 10, 1: 10, 2: 11}
    assert sorted(live.sums) == sorted(kept) == [0, 1, 2]
    for layer, parts in kept.items():
        x = np.concatenate(parts)[:, centre[layer]]  # (6, d)
        units = x / np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(live.sums[layer].numpy(), units.sum(0), rtol=1e-12, atol=1e-12)
        assert live.count[layer] == 6


def test_a_recording_without_modes_gives_its_plain_layers_geometry_as_the_probe_does():
    """``run.geometry(l)`` of a recording of full maps without modes: before round 31, refused for want of modes."""
    model = _cait()
    probe = probe_geometry(model, qkhooks.record(model, modes=2).sites, (32, 32))
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as run:
        run(_images(1))
        assert {l: run.geometry(l) for l in run.layers} == probe
        assert probe[2].num_prefix_tokens == 1 and probe[0].num_prefix_tokens == 0


def test_the_callers_geometry_is_kept_and_not_changed():
    """A caller's ``meta["geometry"]`` (``record_dataset``'s probe, cached between runs) is used as given for its
    layers, the hook's reading added for the others, into a copy: the caller's dict is left as it was."""
    model = _cait()
    probe = probe_geometry(model, qkhooks.record(model, modes=2).sites, (32, 32))
    given = {0: probe[0].__class__(**{**probe[0].__dict__, "stage": "given"})}
    with torch.no_grad(), qkhooks.record(model, modes=None) as run:
        run(_images(1), meta={"geometry": given})
        seen = run.last.meta["geometry"]
    assert seen is not given and list(given) == [0] and seen[0].stage == "given"
    assert seen[1] == probe[1] and seen[2] == probe[2]
    empty: dict = {}  # an empty one too
    with torch.no_grad(), qkhooks.record(model, modes=None) as run:
        run(_images(1), meta={"geometry": empty})
        assert empty == {} and run.last.meta["geometry"] == probe


_FORMS = ("cait_xxs24_224", "volo_d1_224-partial", "EomtForUniversalSegmentation", "vit_small_patch16_dinov3",
          "levit_128s", "PvtV2Model", "Siglip2VisionModel-padded", "DepthProModel", "convit_tiny",
          "VideomtForUniversalSegmentation", "vit_relpos_small_patch16_224-bias-cls",
          # forms with no plain layer or only some (windows, pooled queries, reduced keys): read off their maps as before
          "swin_tiny_patch4_window7_224", "mvitv2-cls", "hiera_tiny_224")


@pytest.mark.parametrize("case", [c for c in FAST_CASES if c.name in _FORMS], ids=lambda c: c.name)
def test_a_plain_layers_geometry_read_in_its_hook_equals_the_one_read_off_its_maps(case: Case):
    """Every layer of the form: the geometry the batch carries (a plain layer's read in its hook, from its tokens; any
    other's as the batch ends) equals ``observe_geometry`` of its maps' token counts, and a recording without modes
    reads the same for the plain layers and has none for the others."""
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    partial = case.name.endswith("-partial")
    with torch.no_grad(), qkhooks.record(model, modes=2, skip_unmodelled=partial) as run:
        _call(model, inputs)
        from_maps = {s.layer: observe_geometry(s, int(run.query(s.layer).shape[-1]), int(run.key(s.layer).shape[-1]))
                     for s in run.sites}
        assert run.last.meta["geometry"] == from_maps
        plain = {s.layer for s in run.sites if _plain(s)}
    with torch.no_grad(), qkhooks.record(model, modes=None, skip_unmodelled=partial) as run:
        _call(model, inputs)
        assert run.last.meta.get("geometry", {}) == {l: from_maps[l] for l in sorted(plain)}


def test_a_plain_layers_geometry_follows_each_calls_grid_at_the_same_token_count():
    """A dynamic-size ViT handed 32x48 and 48x32 images: 24 patches either way, on a 4x6 and a 6x4 grid. The geometry
    read in the hook is kept per token count *and* call grid, so each batch carries its own (a cache keyed on the
    token count alone would hand the second batch the first one's grid)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, dynamic_img_size=True).eval()
    seen = []
    with torch.no_grad(), qkhooks.record(model, modes=None) as run:
        for height, width in ((32, 48), (48, 32), (32, 48)):
            run(torch.randn(2, 3, height, width))
            seen.append([(run.geometry(l).grid, run.geometry(l).query_tokens) for l in run.layers])
    assert seen == [[((4, 6), 25)] * 2, [((6, 4), 25)] * 2, [((4, 6), 25)] * 2]


def test_topk_on_timesformer_drops_each_layers_own_prefix_where_its_layers_have_no_geometry():
    """TimeSformer's time attention has no class token, its space attention one, and neither kind of layer has a
    geometry (its groups are not windows of an image grid). The batch's ``meta["prefix_tokens"]`` says each layer's
    own, so the space layers' class token is never ranked as a patch: with every layer recorded (the time attention
    first, prefix 0) their states equal those of a recording of the space layers alone (prefix 1 throughout). In
    this model's first space layer the class token holds the largest query or key value of some (image, head, mode),
    so a prefix of 0 there changes the scores."""
    from qkhooks.analysis.topk import TopKModes

    case = next(c for c in FAST_CASES if c.name == "TimesformerModel")
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    every, space = TopKModes(k=2), TopKModes(k=2)
    with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[every]) as run:
        _call(model, inputs)
        assert "geometry" not in run.last.meta and run.last.meta["num_prefix_tokens"] == 0
        class_token_tops = int((run.query(1).argmax(-1) == 0).sum() + (run.key(1).argmax(-1) == 0).sum())
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[1, 3], sinks=[space]) as run:
        _call(model, inputs)
    assert class_token_tops > 0 and every.prefixes == {0: 0, 1: 1, 2: 0, 3: 1}
    for layer in (1, 3):
        assert every.layers[layer].keys() == space.layers[layer].keys()
        for name, value in every.layers[layer].items():
            assert torch.equal(value, space.layers[layer][name]), (layer, name)


def _groupvit():
    from transformers import GroupViTVisionConfig, GroupViTVisionModel

    torch.manual_seed(0)
    config = GroupViTVisionConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=32,
                                  patch_size=8, depths=[1, 1, 1], num_hidden_layers=3, num_group_tokens=[16, 8, 0],
                                  num_output_groups=[16, 16, 16])
    return GroupViTVisionModel(config).eval()


def test_groupvits_segment_tokens_are_never_read_as_the_patch_grid():
    """After GroupViT's first grouping stage the tokens are segments, not patches. Its last stage here has 16 segments,
    as many as the 4x4 patch grid: its geometry has no grid (before round 31: the patch grid, and live anisotropy
    folded segment 10 as "the centre patch"), the anisotropy baseline refuses the layer naming it, and a batch's grid
    (another layer's, or the caller's meta) is not taken for a layer whose geometry has none."""
    from qkhooks.analysis.geometry import layer_grid

    model = _groupvit()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), qkhooks.record(model, modes=2) as run:
        run(pixel_values=images)
        assert [type(s).__name__ for s in run.sites] == ["AttentionSite", "SegmentTokenSite", "SegmentTokenSite"]
        assert run.geometry(2).query_tokens == 16 and run.geometry(2).grid is None
        meta = {**run.last.meta, "grid": (4, 4)}
    with pytest.raises(QKHooksError, match=r"^layer 2: 16 patch tokens, and no grid was recorded for them"):
        layer_grid(meta, 2, 16)
    with pytest.raises(QKHooksError, match=r"^layer 2: 16 patch tokens, and no grid was recorded for them"):
        with torch.no_grad(), qkhooks.record(model, modes=2, layers=[2], sinks=[AnisotropyReducer()]) as run:
            run(pixel_values=images, meta={"grid": (4, 4)})


def test_a_site_says_its_tokens_are_its_queries_and_keys_in_its_own_class_body_only():
    """``TOKENS_ARE_QUERIES_AND_KEYS`` is read off the class's own body: a subclass that windows, pools or joins its
    tokens does not inherit it (its geometry would be read off tokens that are not its maps'), one that says it again
    has it, and reduced keys take it away."""
    import dataclasses

    from qkhooks.models.hf import SegmentTokenSite
    from qkhooks.models.windows import WindowSite

    site = qkhooks.record(_cait(), modes=None).sites[0]
    fields = {f.name: getattr(site, f.name) for f in dataclasses.fields(AttentionSite)}
    assert site.geometry_from_tokens()
    assert not WindowSite.__dict__.get("TOKENS_ARE_QUERIES_AND_KEYS") and WindowSite.TOKENS_ARE_QUERIES_AND_KEYS
    assert SegmentTokenSite(**fields).geometry_from_tokens()
    assert not dataclasses.replace(site, key_tokens=lambda x, args, kwargs: x).geometry_from_tokens()

    @dataclasses.dataclass(eq=False)
    class Pooling(AttentionSite):
        pass

    assert not Pooling(**fields).geometry_from_tokens()


def _tiny_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, embed_dim=16,
                             depths=(2,), num_heads=(2,), window_size=4).eval()


class _UpdateOnly:
    """Hands the reducer whole batches only (no ``take_inputs``): the kept-tokens path."""

    def __init__(self, reducer):
        self.reducer = reducer

    def update(self, batch) -> None:
        self.reducer.update(batch)


@pytest.mark.parametrize("path", ["taken in the hook", "kept tokens"])
@pytest.mark.parametrize("kind", ["PositionMeans", "BFDEnergies", "PositionDecoding"])
def test_bfd_reducers_refuse_a_layer_whose_attention_takes_windows_not_images(kind, path):
    """A windowed Swin layer hands its attention 12 windows of 16 tokens for 3 images of 8x8 patches. Folded as
    images, PositionMeans' "per-position means" were 4x the mean window, without a word (found by review); each BFD
    reducer now refuses the batch naming the layer and the counts, and folds nothing. (Position means given per
    window position, so the shape checks alone would let the windows through.)"""
    from qkhooks.analysis.bfd_reducers import BFDEnergies, PositionDecoding, PositionMeans, full_modes

    model = _tiny_swin()
    positions = {0: torch.zeros(16, 16, dtype=torch.float64), 1: torch.zeros(16, 16, dtype=torch.float64)}
    reducer = {"PositionMeans": lambda: PositionMeans(),
               "BFDEnergies": lambda: BFDEnergies(full_modes(model), positions),
               "PositionDecoding": lambda: PositionDecoding(positions, (4, 4), holdout_every=2)}[kind]()
    sink = reducer if path == "taken in the hook" else _UpdateOnly(reducer)
    with pytest.raises(QKHooksError, match=rf"^layer 0: its attention took 12 token sequences for 3 images \(windows "
                                           rf"or groups of tokens along the batch axis\), and {kind} decomposes each "
                                           r"image's one sequence of tokens, position by position; leave the layer "
                                           r"out \(layers=\[\.\.\.\]\), as qkhooks bfd does\.$"):
        with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[sink], keep_inputs=path == "kept tokens") as run:
            run(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    folded = {"PositionMeans": lambda r: r.counts, "BFDEnergies": lambda r: [s["images"] for s in r.stats.values()],
              "PositionDecoding": lambda r: [int(s["images"].sum()) for s in r.stats.values()]}[kind](reducer)
    assert folded in ({}, [0, 0])


@pytest.mark.parametrize("kind", ["TopKModes", "AnisotropyReducer"])
def test_reducers_across_layers_refuse_a_batch_whose_layers_run_over_other_batch_axes(kind):
    """DepthPro runs its patch encoder over 35 crops an image (70 rows for 2 images) and its image encoder over the 2
    images. The reducers that fold one batch of images across layers refused it with torch's bare ``stack`` error, or
    took crops for images (found by review); they now refuse naming two layers and their rows, fold nothing, and take
    the layers of one axis."""
    from qkhooks.analysis.topk import TopKModes

    case = next(c for c in FAST_CASES if c.name == "DepthProModel")
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    reducer = TopKModes(k=2) if kind == "TopKModes" else AnisotropyReducer()
    with pytest.raises(QKHooksError, match=rf"^{kind}: layer 0 runs over 70 rows along its batch axis and layer 2 over "
                                           r"2 \(the model runs some layers over crops, frames or patches along the "
                                           r"batch axis\), and it folds one batch of images across layers; record the "
                                           r"layers of one batch axis with it \(layers=\[\.\.\.\]\)\.$"):
        with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[reducer]) as run:
            _call(model, inputs)
    assert not (reducer.layers if kind == "TopKModes" else reducer.sums)
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[2, 3], sinks=[reducer]) as run:
        _call(model, inputs)
    assert sorted(reducer.layers if kind == "TopKModes" else reducer.sums) == [2, 3]


def test_reading_a_recorded_layer_that_did_not_run_in_the_last_forward_names_it():
    """A recorded layer absent from the last batch (its block skipped in that forward): ``run.geometry(l)`` refuses
    naming it and the layers the batch has, as ``run.query(l)`` does (before: a bare KeyError, found by round 31's
    mutation run)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4).eval()
    blocks = model.blocks
    with torch.no_grad(), qkhooks.record(model, modes=None, attention=None) as run:
        model.blocks = blocks[:1]
        try:
            model(_images(1))
        finally:
            model.blocks = blocks
        with pytest.raises(QKHooksError, match=r"^this batch did not record layer 1; its layers are \[0\]\.$"):
            run.geometry(1)
        assert run.geometry(0).grid == (4, 4)
