"""Kill tests for the mutants of round 26's own code that its tests let survive (module "round26b" of
tests/mutation.py, ``--only ROUND26``; tests/MUTATION.md's round-26b section names each): the q/k path's per-image
products of a layer without biases (against the dense x path in float64), each recording's own copy of a cached site's
containers, a run file stamped format 0 (as h5py reads the attribute). The last test keeps the harness's round26b
module consistent."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import qkhooks
import qkhooks.projector
from qkhooks import capture
from qkhooks.projector import QKPathProjector
from qkhooks.store import open_run, verify_run
from qkhooks.store import format as fmt

from test_format_version_refusals import ids_of, maps, set_format, write
from test_format_version_info import format_lines
from qkhooks.analysis.topk import TopKModes
from test_modes import assert_matches_brute, fake_batch, fold_path  # noqa: F401 (fold_path: a fixture)
from test_mutation_kills_r25 import _harness
from test_mutation_kills_r26 import commits_in, library_files_changed, module_files
from test_speed_round9 import _dense_maps, _vit
from test_topk_signs import SHAPES, SIZES, STARTS, maps_of

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ projector.py: _maps
@pytest.mark.parametrize("layout", ["images", "tokens", "batched"])
def test_qk_path_maps_of_a_layer_without_biases_equal_the_dense_x_path_in_every_product_layout(monkeypatch, layout):
    """A layer whose q and k have no bias has no offsets to subtract: each product layout (on the CPU "images" for
    more than d_k / 4 modes, as here with all 16) must still write every image's maps, equal to x·u and x·v."""
    monkeypatch.setattr(qkhooks.projector, "_product_layout", lambda heads, k: layout)
    model = _vit(seed=11, qkv_bias=False)
    site = qkhooks.sites(model)[1]
    weights = site.weights()
    assert weights.b_q is None and weights.b_k is None
    spectrum = qkhooks.spectrum(model)[site.layer]
    projector = QKPathProjector(spectrum, weights)
    x = torch.randn(3, 25, 48, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        query, key = projector.from_fused(site.module.qkv(x))
    ref_q, ref_k = _dense_maps(x, spectrum)
    scale = max(np.abs(ref_q).max(), np.abs(ref_k).max())
    assert query.shape == key.shape == (3, 3, 16, 25)
    np.testing.assert_allclose(query.double().numpy(), ref_q, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(key.double().numpy(), ref_k, atol=2e-5 * scale, rtol=0)


# ------------------------------------------------------------------------------------ capture.py: _CopyPlan
def test_each_recording_gets_its_own_copy_of_the_containers_an_adapter_keeps_on_a_cached_site(monkeypatch):
    """An adapter may keep call state on its sites in a list, dict or set: every recording of the model gets the
    cached sites' copies, each with its own containers holding what the search left there, so one recording's state
    never shows in another's (nested recordings, or two threads) nor in the cache."""
    model = _vit(seed=13, qkv_bias=True)
    real = capture.find_sites

    def with_state(*args, **kwargs):
        found = real(*args, **kwargs)
        for site in found:
            site.calls, site.sizes, site.seen = [1, 2], {"size": 3}, {"cls"}
        return found

    monkeypatch.setattr(capture, "find_sites", with_state)
    capture._SITES.pop(model, None)
    first, second = qkhooks.record(model, modes=2), qkhooks.record(model, modes=2)
    cached = [site for site, _ in capture._SITES[model][1]]
    assert len(first.sites) == len(second.sites) == len(cached) == 2
    for one, other, kept in zip(first.sites, second.sites, cached):
        assert (one.calls, one.sizes, one.seen) == (other.calls, other.sizes, other.seen) == ([1, 2], {"size": 3}, {"cls"})
        for name in ("calls", "sizes", "seen"):
            assert len({id(getattr(site, name)) for site in (one, other, kept)}) == 3, name
        one.calls.append(3)
        one.sizes["size"] = 4
        one.seen.add("patch")
        assert (other.calls, other.sizes, other.seen) == (kept.calls, kept.sizes, kept.seen) == (
            [1, 2], {"size": 3}, {"cls"})


# ------------------------------------------------------------------------------------ analysis/topk.py
def test_folding_batches_on_either_path_warns_nothing_and_ranks_as_brute_force(fold_path):
    """A recording's top-k fold raises no warning of its own (an accelerator's path writes each layer's picked rows
    into its slot of the candidates in place: a copy relying on torch resizing an ``out=`` tensor warns, a behaviour
    torch deprecates), and ranks every (layer, head, mode, sign) as brute force does."""
    batches = [fake_batch({l: (maps_of(l)[0][lo:lo + size], maps_of(l)[1][lo:lo + size]) for l in SHAPES}, lo)
               for lo, size in zip(STARTS, SIZES)]  # made outside: the test helper builds batches the deprecated way
    reducer = TopKModes(k=3, num_prefix_tokens=1, map_dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches:
            reducer.update(batch)
    for layer in SHAPES:
        q, k = maps_of(layer)
        assert_matches_brute(reducer, q.double().numpy(), k.double().numpy(), 1, layer=layer)


# ------------------------------------------------------------------------------------ store/format.py
def test_a_run_file_stamped_format_0_is_the_format_before_numbers_read_resumed_and_verified(tmp_path, capsys):
    """Format 0 is the number of the files written before format numbers: a file whose attribute says 0 explicitly
    (a tool marking such files) is described as format 0 by ``qkhooks info`` and resumed and verified like one
    without the attribute, not refused as a value qkhooks never writes."""
    path = tmp_path / "run.h5"
    write(path)
    set_format(path, np.int64(0))
    with h5py.File(path, "r") as f:
        assert f.attrs[fmt.FORMAT_ATTR] == 0
    assert format_lines(path, capsys) == ["format   0"]
    write(path, batches=1, first=2, mode="resume")
    with open_run(path) as run:
        assert run.ids == ids_of(0) + ids_of(1) + ids_of(2)
        np.testing.assert_array_equal(run.array("maps/a")[:], np.concatenate([maps(b) for b in range(3)]))
    assert verify_run(path).ok


# ------------------------------------------------------------------------------------ tests/mutation.py: round26b
def test_the_round26b_module_names_files_and_tests_that_exist_and_round_26s_commits():
    """The harness's module "round26b" and its named set ROUND26: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout (``git rev-list``), so
    ``--only ROUND26`` draws the same sample wherever it runs, and every library file round 26 changed is mutated but
    repair.py (its one change ran in the module "round26")."""
    mutation = _harness()
    files = module_files(mutation, "round26b")
    assert mutation.NAMED_SETS["ROUND26"] == mutation.ROUND26 == ("commits:aaff763..5580996",)
    assert commits_in("aaff763..5580996")
    changed = library_files_changed("aaff763", "5580996")
    assert set(changed) - {"qkhooks/store/repair.py"} == set(files)
