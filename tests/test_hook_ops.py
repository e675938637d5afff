"""Round 27 (issue 20, GPU): what a recorded layer costs the host. On a GPU each tensor operation is a kernel launch
(~5-10 us of host time) whatever its size, and a small ViT's batch sits where the host's pace is the GPU's: the q/k
path's hooks dispatched 16 operations a layer (slices of q and k no one read, a second slice of the same q/k block,
``detach`` of tensors that need no grad); now 10. Counted with a dispatch mode, as on a GPU (the product in one batched
shape), against the plain forward of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks import projector
from conftest import CountOps


def _vit(depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=depth, num_heads=4).eval()


def _ops_a_layer(monkeypatch, **options) -> float:
    """qkhooks' operations a recorded layer: the recorded forward's count minus the plain forward's, per layer, from a
    2- and a 4-layer ViT (what a batch costs once, whatever its layers, cancels)."""
    monkeypatch.setattr(projector, "_product_layout", lambda heads, modes: "batched")  # the GPU's shape
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    extra = {}
    for depth in (2, 4):
        model = _vit(depth)
        with torch.no_grad():
            with CountOps() as plain:
                model(images)
            with qkhooks.record(model, **options) as run:
                model(images)  # the first batch builds what later ones reuse
                with CountOps() as recorded:
                    model(images)
            assert run.mode_source == {layer: "qk" for layer in range(depth)}  # the q/k path, as counted
        extra[depth] = recorded.total - plain.total
    return (extra[4] - extra[2]) / 2


def test_a_q_k_path_layer_costs_10_operations_with_its_tokens_kept(monkeypatch):
    assert _ops_a_layer(monkeypatch, modes=4, keep_inputs=True) <= 10


def test_with_grad_enabled_what_a_recording_keeps_is_still_cut_from_the_graph():
    """The hooks detach only what needs it: with autograd recording (weights that require grad), the kept tokens and
    maps are detached all the same, and equal those of a no-grad forward."""
    model = _vit(2)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), qkhooks.record(model, modes=4, keep_inputs=True) as plain:
        model(images)
    with qkhooks.record(model, modes=4, keep_inputs=True) as graphed:
        out = model(images)
    assert out.requires_grad
    for layer in (0, 1):
        for name in ("inputs", "query", "key"):
            kept = getattr(graphed, name)[layer]
            assert not kept.requires_grad and kept.grad_fn is None, (layer, name)
            torch.testing.assert_close(kept, getattr(plain, name)[layer], rtol=0, atol=0)


def test_the_writer_stores_a_tensor_that_tracks_grad_as_its_values(tmp_path):
    """The hand-off detaches only what tracks grad (an operation less an array otherwise): a (B, ...) tensor in a
    graph is stored as its values, cast to the run's float16 as numpy casts them."""
    from qkhooks.store import RunWriter, open_run

    leaf = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    tracked = leaf * 2.0
    assert tracked.requires_grad and tracked.grad_fn is not None
    with RunWriter(tmp_path / "run.h5", attrs={"model": "m", "config": "{}"}) as writer:
        writer.write_batch(["a", "b", "c"], {"modes/L0/query": tracked})
    with open_run(tmp_path / "run.h5") as run:
        stored = run.query(0)[:]
    np.testing.assert_array_equal(stored, (leaf.detach().numpy() * 2.0).astype(np.float16))
