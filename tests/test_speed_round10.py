"""Issue 20, round 10: the hot path's leftovers.

- ``QKPathProjector`` keeps one representation (the stacked, transposed weights and folded offsets): its maps still
  equal the x path's x·u_n computed densely in float64, with a bias on one side only (the zero offsets of the other).
- The full maps, rebuilt beside the fused kernel or computed once (``outputs="eager"``), still equal the model's
  eager attention, and the rebuilt ones equal softmax(q·scale kᵀ) of the model's own q and k bit for bit (a softmax
  written over its logits was timed and not kept: 0.3-0.6 ms slower per ViT-S layer).
- A cached site is shared only when nothing it holds leads back to the original (a helper keeping its bound method,
  the site itself or one of its containers): such a site is searched afresh at every entry, never shared.
- The geometry probe is keyed on the model's structure and takes its sites from the site cache.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks import capture, stream
from qkhooks.attention import full_from_qk, rows_from_qk, split_heads
from qkhooks.projector import QKPathProjector


def _vit(seed: int = 0, **kw) -> torch.nn.Module:
    """A small timm ViT on a non-square grid (4 x 6 patches + CLS), every weight and bias random (timm's init leaves
    the qkv bias at zero, which would hide a wrong offset)."""
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=(32, 48), patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True, num_classes=0, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("zero_side", ["q", "k", None])
def test_projector_maps_equal_the_dense_x_path_with_a_bias_on_either_side(zero_side):
    model = _vit(seed=5)
    site = qkhooks.sites(model)[0]
    spectrum = qkhooks.spectrum(model)[site.layer]
    weights = site.weights()
    if zero_side is not None:  # only the other side has a bias: its offsets sit beside zeros
        weights = type(weights)(**{**vars(weights), f"b_{zero_side}": None})
    projector = QKPathProjector(spectrum, weights)
    x = torch.randn(4, 25, 48, generator=torch.Generator().manual_seed(6))
    width = site.num_heads * site.head_dim
    with torch.no_grad():
        w, b = site.qk_linear()
        bias = b.clone()
        if zero_side == "q":
            bias[:width] = 0
        elif zero_side == "k":
            bias[width:] = 0
        qk = torch.nn.functional.linear(x, w, bias)
    query, key = projector.from_fused(qk)
    x64 = x.double().numpy()
    ref_q = np.einsum("bnd,hdk->bhkn", x64, spectrum.U.double().numpy())
    ref_k = np.einsum("bnd,hdk->bhkn", x64, spectrum.V.double().numpy())
    scale = max(np.abs(ref_q).max(), np.abs(ref_k).max())
    assert query.shape == key.shape == (4, 3, 16, 25)
    assert all(image.is_contiguous() for image in (*query, *key))  # each image's block, its token axis last
    np.testing.assert_allclose(query.double().numpy(), ref_q, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(key.double().numpy(), ref_k, atol=2e-5 * scale, rtol=0)


def test_rebuilt_maps_equal_the_softmax_of_the_models_q_and_k_bit_for_bit_and_the_eager_attention():
    model = _vit(seed=7)
    site = qkhooks.sites(model)[1]
    x = torch.randn(3, 25, 48, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        q, k = (split_heads(site, t) for t in site.module.qkv(x)[..., :2 * 48].split(48, dim=-1))
        reference = torch.softmax((q * site.scale) @ k.transpose(-1, -2), dim=-1)
        full = full_from_qk(site, q, k)
        tokens = torch.tensor([[0, 7], [3, 24], [11, 11]])
        rows = rows_from_qk(site, q, k, tokens)
    assert torch.equal(full, reference)
    picked = torch.stack([q[i, :, tokens[i]] for i in range(3)])
    assert torch.equal(rows, torch.softmax((picked * site.scale) @ k.transpose(-1, -2), dim=-1))
    torch.testing.assert_close(rows, torch.stack([reference[i, :, tokens[i]] for i in range(3)]), atol=1e-6, rtol=0)
    # the whole recording, default (fused kept) and outputs="eager", against the model's own eager attention
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(9))
    eager: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, out, i=i: eager.__setitem__(i, out))
    with torch.no_grad():
        model(images)
        for block in model.blocks:
            block.attn.fused_attn = True
        for outputs in ("unchanged", "eager"):
            with qkhooks.record(model, modes=None, attention="full", outputs=outputs) as run:
                run(images)
            for layer in run.layers:
                torch.testing.assert_close(run.attention_maps("full")[layer], eager[layer], atol=1e-5, rtol=0)


def _helper_with(site):
    """Helpers an adapter might keep on a site, each leading back to the original by another road."""
    return {
        "bound method": types.SimpleNamespace(call=site.grid_for),
        "the site": types.SimpleNamespace(owner=[site]),
        "a closure": types.SimpleNamespace(call=lambda n: site.grid_for(n)),
        "its container": (site.__dict__.setdefault("_calls", []),),
    }


@pytest.mark.parametrize("road", ["bound method", "the site", "a closure", "its container"])
def test_a_site_whose_helper_leads_back_to_it_is_not_shared(road):
    site = qkhooks.sites(_vit())[0]
    site.helper = _helper_with(site)[road]
    assert capture._copy_plan(site) is None


def test_a_helper_that_leads_elsewhere_is_shared_and_direct_methods_are_rebound():
    site = qkhooks.sites(_vit())[0]
    other = qkhooks.sites(_vit(seed=1))[0]
    site.helper = types.SimpleNamespace(call=other.grid_for, settings={"size": 3})
    site.own = site.grid_for
    plan = capture._copy_plan(site)
    copy = plan.copy(site)
    assert copy is not site
    assert copy.helper is site.helper  # nothing in it leads back: shared as the search left it
    assert copy.own.__self__ is copy and copy.own.__func__ is site.own.__func__


def test_sites_with_a_helper_leading_back_are_searched_at_every_entry_and_record_right(monkeypatch):
    model = _vit(seed=3)
    real = capture.find_sites
    calls = [0]

    def with_helpers(*args, **kwargs):
        calls[0] += 1
        found = real(*args, **kwargs)
        for site in found:
            site.helper = types.SimpleNamespace(call=site.grid_for)
        return found

    monkeypatch.setattr(capture, "find_sites", with_helpers)
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    runs = []
    for _ in range(2):
        with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
            run(images)
        runs.append(run)
    assert calls[0] == 2  # one search per entry: sites that cannot be shared are used as found, never cached
    assert model not in capture._SITES
    assert not {id(s) for s in runs[0].sites} & {id(s) for s in runs[1].sites}
    for layer in runs[0].layers:
        assert torch.equal(runs[0].attention_maps("full")[layer], runs[1].attention_maps("full")[layer])
        assert torch.equal(runs[0].last.query(layer), runs[1].last.query(layer))


def test_the_geometry_probe_follows_the_structure_and_reuses_the_cached_sites(monkeypatch):
    """A patch embedding swapped in place changes the grid: the probe runs again and reads the new grid (keyed on
    the size, device and dtype alone it returned the old one). The sites come from the site cache: probing at a
    second size searches nothing."""
    monkeypatch.setattr(stream, "_STATIC_GEOMETRY", set())  # probe even this plain ViT
    model = _vit(seed=2, dynamic_img_size=True)
    searches, probes = [0], [0]
    real_find, real_probe = capture.find_sites, stream._probe_forward

    def find(*args, **kwargs):
        searches[0] += 1
        return real_find(*args, **kwargs)

    def probe(*args, **kwargs):
        probes[0] += 1
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(capture, "find_sites", find)
    monkeypatch.setattr(stream, "_probe_forward", probe)
    sites = real_find(model)
    first = stream.probe_geometry(model, sites, (32, 48))
    assert stream.probe_geometry(model, sites[1:], (32, 48))[1] == first[1]
    stream.probe_geometry(model, sites, (48, 48))
    assert (searches[0], probes[0]) == (1, 2)
    assert first[0].grid == (4, 6)

    coarse = timm.models.vision_transformer.VisionTransformer(
        img_size=(32, 48), patch_size=16, embed_dim=48, depth=2, num_heads=3, qkv_bias=True, num_classes=0,
        dynamic_img_size=True)
    model.patch_embed, model.pos_embed = coarse.patch_embed, coarse.pos_embed
    changed = stream.probe_geometry(model, real_find(model), (32, 48))
    assert probes[0] == 3
    assert changed[0].grid == (2, 3) and changed[0].query_tokens == 7


def test_the_benchmark_counts_the_page_faults_of_fresh_memory():
    """``qkhooks bench`` reports each method's minor page faults per batch (they set much of the round-to-round
    noise): touching 64 MiB of fresh memory must move the counter by one fault per page, or per 2 MiB huge page."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from harness.machine import minor_page_faults

    before = minor_page_faults()
    if before is None:
        pytest.skip("no resource module on this platform")
    fresh = np.empty(64 << 20, dtype=np.uint8)
    fresh[::4096] = 1
    assert minor_page_faults() - before >= (64 << 20) // (2 << 20)


def test_entering_again_copies_the_cached_sites_by_their_plan_without_walking_them(monkeypatch):
    """The cached sites never record, so the copy plan made when they were found (which attributes are the site's own
    methods, which are containers) holds for every later copy: entering again walks no site's referents, and each
    recording's containers are its own."""
    from conftest import count_calls

    model = _vit(seed=5)
    walks = count_calls(monkeypatch, capture, "_links_back")
    first = qkhooks.record(model, modes=2)
    after_first = walks[0]
    again = qkhooks.record(model, modes=2)
    assert after_first > 0 and walks[0] == after_first
    for one, other in zip(first.sites, again.sites):
        shared = [name for name, value in vars(one).items()
                  if isinstance(value, (dict, list, set)) and value is vars(other)[name]]
        assert one is not other and not shared
