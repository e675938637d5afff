"""Issue 20 (speed-e2e): the faster paths of a recording give the same values as before.

- TopKModes picks the kept maps in place (rows of the (B·H·K, N) maps) and reduces token extremes without a
  copy when the tokens are adjacent: same state, bit for bit, for contiguous and transposed maps, and equal to
  sorting every image by plain loops (ties included).
- ``record()`` entered again on unchanged weights reuses its projectors (none built), and an edit of the weights
  through ``.data`` (no version bump) still gives new projectors and the maps of the edited model.
- The q/k-path projector hands out contiguous maps equal to the x path's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qkhooks
from qkhooks.analysis.modes import TopKModes
from qkhooks.projector import QKPathProjector
from conftest import TINY_MODELS
from test_modes import assert_matches_brute, feed, tied_maps


def _state(reducer: TopKModes) -> dict[str, torch.Tensor]:
    return {f"{layer}/{name}": v for layer, s in reducer.layers.items() for name, v in s.items()}


@pytest.mark.parametrize("map_dtype", ["float32", "float16"])
def test_topk_of_transposed_and_contiguous_maps_is_the_same_state_and_equals_brute_force(map_dtype):
    q, k = tied_maps(n=40, heads=3, modes=4, tokens=11, prefix=1, seed=7)
    # a transposed view (the token axis strided), as the projectors produced before their maps became contiguous
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q_t.is_contiguous() and torch.equal(q_t, q)
    sizes = [16, 3, 16, 5]
    contiguous = feed(TopKModes(k=5, num_prefix_tokens=1, map_dtype=map_dtype), q, k, sizes)
    strided = feed(TopKModes(k=5, num_prefix_tokens=1, map_dtype=map_dtype), q_t, k_t, sizes)
    a, b = _state(contiguous), _state(strided)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    # the small integer patterns are exact in float16 too
    assert_matches_brute(contiguous, q.numpy(), k.numpy(), prefix=1)


def _count_projectors(monkeypatch) -> list[int]:
    built = [0]
    inner = QKPathProjector.__init__

    def counted(self, *args, **kwargs):
        built[0] += 1
        inner(self, *args, **kwargs)

    monkeypatch.setattr(QKPathProjector, "__init__", counted)
    return built


def test_record_entered_again_reuses_its_projectors_until_the_weights_change(monkeypatch):
    tiny = TINY_MODELS[0]
    model = tiny.model()
    images = tiny.images(3, 1)
    built = _count_projectors(monkeypatch)
    with torch.no_grad():
        with qkhooks.record(model, modes=4) as run:
            run(images)
        layers = len(run.layers)
        assert built[0] == layers
        with qkhooks.record(model, modes=4) as again:
            again(images)
        assert built[0] == layers  # per-batch entry: no projector built again
        assert all(torch.equal(run.last.query(l), again.last.query(l)) for l in run.layers)
        with qkhooks.record(model, modes=3) as fewer:  # another mode count is another projector
            fewer(images)
        assert built[0] == 2 * layers

        site = qkhooks.sites(model)[0]
        linear = site.qk_modules[0] if site.qk_modules else site.module
        weight = next(p for n, p in linear.named_parameters() if n.endswith("weight"))
        version = weight._version
        weight.data.mul_(1.5)  # bypasses the version counter; the spectrum cache's bit-for-bit copy sees it
        assert weight._version == version
        with qkhooks.record(model, modes=4) as edited:
            edited(images)
        assert built[0] > 2 * layers
        fresh_model = copy.deepcopy(model)  # no cache entry of its own yet: everything computed anew
        with qkhooks.record(fresh_model, modes=4) as fresh:
            fresh(images)
    for l in run.layers:
        assert torch.equal(edited.last.query(l), fresh.last.query(l))
        assert torch.equal(edited.last.key(l), fresh.last.key(l))
    assert not torch.allclose(edited.last.query(0), run.last.query(0))


@pytest.mark.parametrize("tiny", [TINY_MODELS[0]], ids=lambda t: t.name)
def test_qk_path_maps_are_contiguous_per_image_and_equal_the_x_path(tiny):
    model = tiny.model()
    images = tiny.images(2, 3)
    with torch.no_grad():
        with qkhooks.record(model, modes=4) as qk:
            qk(images)
        with qkhooks.record(model, modes=4, qk_path=False) as x:
            x(images)
    assert set(qk.mode_source.values()) == {"qk"}
    for l in qk.layers:
        for side in ("query", "key"):
            got, want = getattr(qk.last, side)(l), getattr(x.last, side)(l)
            # each image's (H, K, N) block is contiguous, its token axis last (a fused qkv's two sides may share
            # one block per image, so the batch axis may stride over both)
            assert all(image.is_contiguous() for image in got)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
