"""Entering ``record()`` reads each layer's W_q/W_k views once (round 51, issue 20's per-batch fixed cost): the views
the recording keeps for its per-batch check are the ones the spectrum cache's verdict compares at entry, so an edit
made before entry, through ``.data`` too, still gives the new weights' modes, counted against x·u_n of the spectrum
the recording reports and against a fresh SVD of W_q^T W_k."""

from __future__ import annotations

import importlib

import timm
import torch

import qkhooks

spectrum_module = importlib.import_module("qkhooks.spectrum")  # the module (qkhooks.spectrum is also a function)


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=4, num_classes=0).eval()


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_entering_record_slices_each_layers_weights_once(monkeypatch):
    """Was: twice a layer (the cache's verdict, then the views kept for the per-batch check)."""
    model = _vit()
    with qkhooks.record(model, modes=4):  # the spectra cached
        pass
    reads: list[int] = []
    real = spectrum_module._qk_tensors
    monkeypatch.setattr(spectrum_module, "_qk_tensors", lambda site: reads.append(site.layer) or real(site))
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        assert sorted(reads) == [0, 1, 2]
        reads.clear()
        run(_images())
    assert reads == []  # the batch compares the views taken at entry


def test_a_data_edit_between_entries_gives_the_new_weights_modes():
    """The verdict at entry compares the very views the recording keeps: an edit through ``.data`` (which keeps
    ``_version``) between two entries is seen, and the second recording's maps are x·u_n of the new weights' modes."""
    model = _vit()
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        run(_images())
        before = run.spectrum(1)
    qkv = model.blocks[1].attn.qkv
    qkv.weight.data[:32].mul_(1.5)  # W_q of layer 1, in place through .data
    tokens: list[torch.Tensor] = []
    handle = model.blocks[1].norm1.register_forward_hook(lambda m, a, o: tokens.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(_images(seed=1))
    finally:
        handle.remove()
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        run(_images(seed=1))
        after = run.spectrum(1)
        query = run.query(1).double()
    w_q, w_k = qkv.weight.detach().double()[:32], qkv.weight.detach().double()[32:64]
    reference = torch.linalg.svdvals(w_q.view(4, 8, 32).transpose(1, 2) @ w_k.view(4, 8, 32))[:, :4]
    assert torch.allclose(torch.as_tensor(after.S).double(), reference, rtol=1e-5)
    assert not torch.allclose(torch.as_tensor(before.S).double(), reference, rtol=1e-3)
    u = torch.as_tensor(after.U).double()
    assert torch.allclose(query, torch.einsum("bnd,hdk->bhkn", tokens[0].double(), u), atol=1e-4)
