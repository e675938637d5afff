"""Run files, analyses and the demo for models whose layers differ in geometry: windowed attention (Swin), spatially
reduced keys (PVT), stages of different grids (PiT) and class attention (CaiT). Each checks what the run file holds
against the model's own tensors, taken with plain forward hooks on the model's modules (not qkhooks' sites)."""

from __future__ import annotations

import h5py
import json
import re
import numpy as np
import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.analysis.anisotropy import AnisotropyReducer, anisotropy_from_state
from qkhooks.analysis.geometry import resolve_prefix
from qkhooks.analysis.topk import TopKModes, layer_state
from qkhooks.models.load import load_model
from qkhooks.results import BatchCapture, LayerCapture
from qkhooks.store import open_run
from qkhooks.stream import record_dataset
from test_zoo import perturb


def _timm(name: str, **kw):
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model(name, pretrained=False, **kw))


def _swin():
    return _timm("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def _pit():
    return _timm("pit_ti_224", img_size=64, depth=(1, 2, 1), heads=(2, 2, 2), base_dims=(8, 8, 8))


def _cait():
    return _timm("cait_xxs24_224", depth_token_only=2, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


def _outputs(modules: dict[int, torch.nn.Module]):
    """Hooks keeping every call's output of each module, and a function that removes them."""
    seen: dict[int, list[torch.Tensor]] = {l: [] for l in modules}
    handles = [m.register_forward_hook(lambda mod, a, out, l=l: seen[l].append(out.detach().clone()))
               for l, m in modules.items()]
    return seen, lambda: [h.remove() for h in handles]


def _record(model, tmp_path, name: str, **kw):
    path = tmp_path / f"{name}.h5"
    record_dataset(load_model(model), "samples", path, limit=4, batch_size=2, progress=False, dtype="float32",
                   modes=4, **kw)
    return path


def test_swin_run_stores_each_stage_grid_windows_and_maps_on_the_image_grid(tmp_path):
    """Per layer: the grid the block really runs on (its norm1 output, (B, H, W, C)), the window layout, query maps
    equal to those tokens times U in row-major grid order, and the anisotropy baseline of the centre patch."""
    model = _swin()
    blocks = {0: model.layers[0].blocks[0], 1: model.layers[0].blocks[1], 2: model.layers[1].blocks[0],
              3: model.layers[1].blocks[1]}
    seen, remove = _outputs({l: b.norm1 for l, b in blocks.items()})
    try:
        path = _record(model, tmp_path, "swin")
    finally:
        remove()
    with open_run(path) as run:
        assert run.schema_version == 2 and run.layers == [0, 1, 2, 3]
        for layer, block in blocks.items():
            tokens = torch.cat(seen[layer][1:])  # the first call is the geometry probe (one blank image)
            n, h, w, c = tokens.shape
            g = run.geometry(layer)
            assert (g.grid, g.num_prefix_tokens, g.query_tokens, g.key_tokens) == ((h, w), 0, h * w, h * w)
            assert g.window["size"] == [4, 4] and g.window["shift"] == [int(v) for v in block.shift_size]
            assert g.window["windows"] == (h // 4) * (w // 4) and g.heads == block.attn.num_heads
            U = torch.as_tensor(run.spectrum(layer).U, dtype=torch.float64)  # (H, d, K)
            want = torch.einsum("nd,hdk->nhk", tokens.reshape(n, h * w, c).reshape(-1, c).double(), U)
            want = want.reshape(n, h * w, *want.shape[1:]).permute(0, 2, 3, 1)  # (n, H, K, h*w)
            got = torch.as_tensor(np.asarray(run.query(layer)[:]), dtype=torch.float64)
            assert got.shape == want.shape
            assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
            centre = tokens[:, h // 2, w // 2].double()
            z = (centre / centre.norm(dim=-1, keepdim=True)).numpy()
            gram = z @ z.T
            direct = (gram.sum() - np.trace(gram)) / (n * (n - 1))
            assert abs(anisotropy_from_state(run.state("anisotropy"))[layer] - direct) < 1e-6
        assert "16 windows of 4x4 shifted by (2, 2)" in run.summary()  # what `qkhooks info` prints
        stored = {l: run.geometry(l) for l in run.layers}
    with qkhooks.record(model, modes=2) as rec, torch.no_grad():  # a live recording answers the same
        rec(torch.randn(1, 3, 64, 64))
    assert {l: rec.geometry(l) for l in rec.layers} == stored


def test_reduced_key_run_stores_key_maps_on_the_models_reduced_grid(tmp_path):
    """PVT-v2: the key maps have the model's own reduced tokens (the output of its reduction LayerNorm) times V,
    on the grid its strided conv produces; the query side keeps the full grid."""
    model = _timm("pvt_v2_b0", embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2), depths=(1, 1, 1, 1),
                  sr_ratios=(4, 2, 1, 1))
    attn = {0: model.stages[0].blocks[0].attn, 1: model.stages[1].blocks[0].attn}
    convs, remove_convs = _outputs({l: a.sr for l, a in attn.items()})
    keys, remove_keys = _outputs({l: a.norm for l, a in attn.items()})
    try:
        path = _record(model, tmp_path, "pvt", layers="0,1,2")
    finally:
        remove_convs()
        remove_keys()
    with open_run(path) as run:
        for layer in attn:
            reduced = convs[layer][-1].shape[-2:]
            g = run.geometry(layer)
            assert g.reduced_keys and g.key_grid == tuple(reduced) and g.key_tokens == reduced[0] * reduced[1]
            assert g.query_tokens == g.grid[0] * g.grid[1] > g.key_tokens
            # the model's calls (qkhooks runs the same reduction once more per call, on the same tokens: an equal
            # output right after it), the geometry probe's first call dropped
            calls = [t for i, t in enumerate(keys[layer]) if i == 0 or not torch.equal(t, keys[layer][i - 1])]
            x_k = torch.cat(calls[1:]).double()  # (n, M, d)
            V = torch.as_tensor(run.spectrum(layer).V, dtype=torch.float64)
            want = torch.einsum("nmd,hdk->nhkm", x_k, V)
            got = torch.as_tensor(np.asarray(run.key(layer)[:]), dtype=torch.float64)
            assert got.shape == want.shape
            assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
        assert not run.geometry(2).reduced_keys  # sr_ratio 1: the keys are the queries' tokens


def test_topk_scores_leave_out_each_layers_own_prefix_tokens(tmp_path):
    """CaiT: the patch blocks have no prefix token, the class-attention blocks one (CLS): each layer's top-k scores
    are the paper's max(0, max q)·max(0, max k) over that layer's patch tokens, recomputed here from the stored maps."""
    path = _record(_cait(), tmp_path, "cait")
    with open_run(path) as run:
        state = run.state("topk_modes")
        assert [run.geometry(l).num_prefix_tokens for l in run.layers] == [0, 0, 1, 1]
        for layer in run.layers:
            prefix = run.geometry(layer).num_prefix_tokens
            q = np.asarray(run.query(layer)[:], dtype=np.float64)[..., prefix:]
            k = np.asarray(run.key(layer)[:], dtype=np.float64)[..., prefix:]
            plus = np.maximum(q.max(-1), 0) * np.maximum(k.max(-1), 0)  # (n, H, K)
            best = layer_state(state, layer)
            np.testing.assert_allclose(best["score"][:, :, 0, 0], plus.max(0), rtol=1e-5)


def test_stages_of_other_grids_keep_their_own_state_and_refuse_shared_query_rows(tmp_path):
    """PiT: 7x7, 4x4, 2x2 grids (+ CLS) are stored per layer, top-k states of different token counts are kept per
    layer and reload equal, and attention rows indexed on layer 0's grid are refused for the other stages."""
    model = _pit()
    path = _record(model, tmp_path, "pit")
    with open_run(path) as run:
        assert [run.geometry(l).grid for l in run.layers] == [(7, 7), (4, 4), (4, 4), (2, 2)]
        state = run.state("topk_modes")
        again = TopKModes(k=8)
        again.load_state_dict(state)
        for layer in run.layers:
            np.testing.assert_array_equal(layer_state(again.state_dict(), layer)["index"], layer_state(state, layer)["index"])
            assert layer_state(state, layer)["query"].shape[-1] == run.geometry(layer).query_tokens
    with pytest.raises(QKHooksError, match=r"layers \[1, 2, 3\] have other tokens.*rows:0"):
        record_dataset(load_model(model), "samples", None, limit=2, progress=False, modes=None, attention="rows")


def test_a_run_file_without_per_layer_geometry_reads_its_one_grid_for_every_layer(tmp_path):
    """Files written before schema 2 keep one grid and prefix in model/info: they hold for every layer."""
    path = _record(_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4),
                   tmp_path, "vit")
    with h5py.File(path, "r+") as f:
        info = json.loads(f["model"].attrs["info"])
        assert info["schema_version"] == 2 and set(info["layer_geometry"]) == {"0", "1"}
        del info["layer_geometry"], info["schema_version"]
        f["model"].attrs["info"] = json.dumps(info)
    with open_run(path) as run:
        assert run.schema_version == 1
        for layer in run.layers:
            g = run.geometry(layer)
            assert (g.grid, g.num_prefix_tokens, g.query_tokens) == ((4, 4), 1, 17)


def test_a_hand_made_batch_that_does_not_say_its_grid_is_refused_not_read_as_square():
    """25 tokens are a 5x5 grid or 4x6 + CLS: without the recording's word the reducers refuse; with it, the centre
    patch of the 4x6 grid is token 1 + 2*6 + 3 = 16."""
    with pytest.raises(QKHooksError, match="cannot tell the prefix tokens of a 25-token"):
        resolve_prefix(None, {}, 25)
    maps = torch.randn(3, 2, 4, 25, generator=torch.Generator().manual_seed(0))
    with pytest.raises(QKHooksError, match="cannot tell the prefix tokens"):
        TopKModes().update(BatchCapture(ids=[], meta={}, captures={0: LayerCapture(0, 3, query=maps, key=maps)}))
    x = torch.randn(3, 25, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reducer = AnisotropyReducer()
    reducer.update(BatchCapture(ids=[], meta={"num_prefix_tokens": 1, "grid": (4, 6)},
                                captures={0: LayerCapture(0, 3, inputs=x)}))
    z = (x[:, 16] / x[:, 16].norm(dim=-1, keepdim=True)).numpy()
    gram = z @ z.T
    assert abs(reducer.baselines()[0] - (gram.sum() - np.trace(gram)) / 6) < 1e-12


def test_bfd_names_the_layers_it_leaves_out_and_decomposes_the_rest():
    """BFD's one form over one grid: a Swin has no such layer (refused, naming windows); on PiT the first stage is
    decomposed and the other stages are listed with their reason."""
    from qkhooks.analysis.bfd import run_bfd

    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(QKHooksError, match="L0: windowed attention"):
        run_bfd(_swin(), images, None, batch_size=3, progress=False)
    result = run_bfd(_pit(), images, None, batch_size=3, holdout_every=3, progress=False)
    assert [l["layer"] for l in result["layers"]] == [0]
    assert sorted(result["left_out_layers"]) == ["1", "2", "3"]
    assert "one position grid" in result["left_out_layers"]["3"]


@pytest.mark.slow
def test_demo_runs_on_a_swin_and_names_per_section_the_layers_it_leaves_out(tmp_path):
    """`make_report` (what `qkhooks demo` runs) on a small random-weight Swin: every section is in the report; the
    modes, anisotropy and same-object sections cover every layer on its own grid; attention preference runs on the
    first stage (windowed rows on the image grid) and names the other stage's layers; BFD says per layer why it is
    left out (windows)."""
    from qkhooks.report import make_report

    summary = make_report(tmp_path / "demo", load_model(_swin()), photos=4, o3=6, objects=3, batch_size=4,
                          progress=False)
    sections = summary["sections"]
    assert set(sections) == {"modes", "same_object", "anisotropy", "spectrum", "preference", "bfd"}
    assert sorted(map(int, sections["anisotropy"]["baseline_by_layer"])) == [0, 1, 2, 3]
    assert sorted(map(int, sections["same_object"]["p_same_by_layer"])) == [0, 1, 2, 3]
    preference, bfd = sections["preference"], sections["bfd"]
    assert preference["images"] > 0 and sorted(map(int, preference["left_out"])) == [2, 3]
    assert all("are not layer 0's" in why for why in preference["left_out"].values())
    assert sorted(map(int, bfd["left_out"])) == [0, 1, 2, 3]
    assert all("window" in why for why in bfd["left_out"].values())
    page = (tmp_path / "demo" / "index.html").read_text()
    assert page.count("Not computed: Layers left out of") == 1  # BFD's; preference names its own in its text
    assert "Layers left out of attention preference: L2: " in page


def test_a_model_that_fails_on_its_configured_input_size_is_refused_before_any_file(tmp_path):
    """MaxViT built for 64 px keeps timm's 160 px data config; its own window check fails in the geometry probe.
    The user gets a QKHooksError naming the size and the fix, not the model's AssertionError, and no run file."""
    model = _timm("test_maxvit", img_size=64).eval()
    loaded = load_model(model)
    path = tmp_path / "maxvit.h5"
    with pytest.raises(QKHooksError, match=r"fails on a \d+x\d+ image, the size its image config gives, with no qkhooks hook on it .*image_config"):
        record_dataset(loaded, "samples", path, limit=2, batch_size=2, progress=False, modes=4)
    assert not path.exists()


@pytest.mark.parametrize("name, kw", [("pvt_v2_b0", {}), ("pvt_v2_b0", {"linear": True})])
def test_the_reduced_key_grid_is_read_off_the_modules_own_reduction_on_a_non_square_grid(name, kw):
    """A 4 x 6 query grid through each layer's own spatial reduction (conv kernel/stride/padding, PVT-v2-linear's
    adaptive pool): the key grid equals the shape the module's own sr conv returns on that grid (2 x 3 for ratio 2,
    7 x 7 pooled), with no ratio guessed from token counts; a grid whose token count the reduction does not make,
    or a module without a reduction conv, gives None (the analyses then refuse the layer)."""
    from qkhooks.results import _reduced_grid

    model = _timm(name, embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                  sr_ratios=(2, 2, 1, 1), **kw)
    sites = [s for s in qkhooks.sites(model) if s.key_tokens is not None]
    assert sites
    for site in sites:
        attn = site.module
        image = torch.zeros(1, attn.sr.in_channels, 4, 6)
        with torch.no_grad():
            want = tuple(attn.sr(attn.pool(image) if getattr(attn, "pool", None) is not None else image).shape[-2:])
        assert want == ((7, 7) if kw else (2, 3))
        assert _reduced_grid(attn, (4, 6), want[0] * want[1]) == want
        assert _reduced_grid(attn, (4, 6), want[0] * want[1] + 1) is None
    assert _reduced_grid(torch.nn.Linear(2, 2), (4, 6), 6) is None


def _dinov2_built_non_square():
    """An HF DINOv2 built for 48 x 32: its position table has 6 x 4 positions, but its own interpolation reads the
    table as a square, so it fails on the size it was built for. Its class is a plain ViT (no probe forward)."""
    import transformers

    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=(48, 32), patch_size=8)
    model = transformers.Dinov2Model._from_config(config, attn_implementation="eager").eval()
    with pytest.raises(RuntimeError):  # the model's own error, before qkhooks: the refusal below is not made up
        model(torch.zeros(1, 3, 48, 32))
    return LoadedModel(model, "dinov2-48x32", ImageConfig(size=(48, 32), mean=(0.5,) * 3, std=(0.25,) * 3))


@pytest.mark.parametrize("how", ["record", "record, resumable", "bfd", "bfd, tensors"])
def test_a_model_whose_first_forward_fails_is_refused_with_the_fix_on_every_path(tmp_path, how):
    """A plain-ViT class skips the geometry probe, so the first forward of the recording (or of BFD's blank-image
    look at the logits) was the first to meet the model's error, and it surfaced raw. Every path now gives the
    probe's refusal: the size, the model's own error and the fix, and no run file."""
    from qkhooks.analysis.bfd import pass1_path, run_bfd

    loaded = _dinov2_built_non_square()
    path = tmp_path / "run.h5"
    with pytest.raises(QKHooksError) as err:
        if how.startswith("record"):
            record_dataset(loaded, "samples", path, limit=2, batch_size=2, progress=False, modes=1,
                           checkpoint_every=1 if how.endswith("resumable") else 8)
        elif how == "bfd":
            run_bfd(loaded, "samples", path, limit=4, batch_size=2)
        else:
            run_bfd(loaded.model, torch.zeros(4, 3, 48, 32), None, batch_size=2)
    assert re.match(r"the model fails on a 48x32 image, the size its image config gives, with no qkhooks hook on it "
                    r"\(RuntimeError: .+\); nothing was written\. If it takes another input size, .+; if it fails at "
                    r"the size it was built for too, its own forward is at fault: run it alone on "
                    r"torch\.zeros\(1, 3, 48, 32\) to see why\.$", str(err.value), flags=re.S), err.value
    assert not path.exists() and not pass1_path(path).exists() and not list(tmp_path.iterdir())


def test_an_error_in_the_first_batch_of_a_model_that_runs_is_not_called_a_size_refusal(tmp_path):
    """The refusal is given only where the model alone fails on the size: a sink's own error in the first batch of a
    model that runs passes as it is (it was called "the model fails on a 32x32 image")."""
    loaded = load_model(_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))

    def broken(batch):
        raise ValueError("this sink is broken")

    with pytest.raises(ValueError, match="this sink is broken"):
        record_dataset(loaded, "samples", tmp_path / "run.h5", limit=2, batch_size=2, progress=False, modes=1,
                       on_batch=broken)
