"""Round 25's device paths, checked on the CPU: the spectrum cache's batched weights check (taken on a GPU; here with
its device filter opened to CPU copies) never answers a later spectrum with a stale verdict, and host indices and masks
given with a batch reach the model's device only through ``qkhooks._devices.to_device`` (a plain ``.to(device)`` of
a host tensor makes the host wait for the GPU, once per layer)."""

from __future__ import annotations

import sys

import pytest
import torch

import qkhooks
import qkhooks._devices
from conftest import TINY_MODELS, eager_attention
from qkhooks.errors import QKHooksError

spectrum_module = sys.modules["qkhooks.spectrum"]  # the module: qkhooks.spectrum is also the function's name


def _dense_svdvals(model: torch.nn.Module, layer: int, k: int) -> torch.Tensor:
    """The reference: singular values of W_qᵀW_k per head, dense float64."""
    w = qkhooks.sites(model)[layer].weights()
    return torch.linalg.svdvals(w.w_q.double().transpose(1, 2) @ w.w_k.double())[:, :k]


def test_an_entry_that_fails_midway_leaves_no_weights_verdict_for_a_later_spectrum(monkeypatch):
    """Entering record() compares every cached copy of W_q/W_k at once (on a GPU); a layer that fails after that must
    not leave the other layers' verdicts behind, where a later spectrum would take 'unchanged' for weights edited since
    through ``.data`` (which keeps ``_version``: only the bit-for-bit compare sees it)."""
    monkeypatch.setattr(spectrum_module, "_compared_on_device", lambda t: True)  # the GPU path, on CPU copies
    model = TINY_MODELS[0].model()
    with qkhooks.record(model, modes=4):
        pass  # every layer's spectrum cached, with its copy of the weights
    compute = spectrum_module._compute_layer_spectrum

    def failing(site, augmented):
        if site.layer == 0:
            raise QKHooksError("layer 0 fails (as an interrupted or refused entry would)")
        return compute(site, augmented)

    monkeypatch.setattr(spectrum_module, "_compute_layer_spectrum", failing)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1.0)  # a new _version: layer 0 is recomputed, and fails
    with pytest.raises(QKHooksError, match="layer 0 fails"):
        qkhooks.record(model, modes=4)
    monkeypatch.setattr(spectrum_module, "_compute_layer_spectrum", compute)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.data[:8] *= 3.0  # through .data: _version kept
    spec = qkhooks.spectrum(model)
    ref = _dense_svdvals(model, 1, spec[1].S.shape[1])
    assert torch.allclose(spec[1].S.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))


def test_the_batched_weights_check_agrees_with_the_per_layer_check(monkeypatch):
    """With the device filter opened, entering record() again reuses unchanged layers' spectra and recomputes the one
    edited through ``.data`` (to the dense SVD), as the per-layer bit-for-bit check does."""
    monkeypatch.setattr(spectrum_module, "_compared_on_device", lambda t: True)
    model = TINY_MODELS[0].model()
    with qkhooks.record(model, modes=4) as first:
        pass
    with qkhooks.record(model, modes=4) as again:
        pass
    assert again.qk_spectrum[0] is first.qk_spectrum[0] and again.qk_spectrum[1] is first.qk_spectrum[1]
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.data[0, 0] += 1.0
    with qkhooks.record(model, modes=4) as edited:
        pass
    assert edited.qk_spectrum[0] is first.qk_spectrum[0] and edited.qk_spectrum[1] is not first.qk_spectrum[1]
    ref = _dense_svdvals(model, 1, 4)
    assert torch.allclose(edited.qk_spectrum[1].S.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))
