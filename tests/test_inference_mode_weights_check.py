"""Weights without a version counter (a model made in ``torch.inference_mode()``): record()'s per-batch check and the
spectrum cache compare W_q/W_k bit for bit with a copy, so every edit inside the context is seen, also one that a
float64 fingerprint W·r rounds away, and unchanged weights give the maps of a fresh recording."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_speed import dense_check, svd_calls  # noqa: F401 (svd_calls: a fixture)

H, DK = 3, 16  # _vit's heads: W_q is qkv.weight[:48], W_k qkv.weight[48:96]


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=H, qkv_bias=True).eval()


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _below_rounding(weight: torch.Tensor) -> None:
    """W_q[0, 0] from 1e-30 to 3e-30 (the caller set 1e-30 first): a change, but W·r in float64 for any r in
    [0.5, 1.5) (the fingerprint the check used to be) stays the same to the bit, checked here with numpy."""
    r = np.random.default_rng(0).uniform(0.5, 1.5, weight.shape[1])
    before = weight.detach().double().numpy() @ r
    weight[0, 0] = 3e-30
    assert np.array_equal(weight.detach().double().numpy() @ r, before)


EDITS = {
    "W_q scaled": lambda w, b: w[:DK].mul_(1.5),
    "two entries of W_k swapped": lambda w, b: w[H * DK + 2].index_put_((torch.tensor([3, 7]),), w[H * DK + 2, [7, 3]]),
    "b_k +1": lambda w, b: b[H * DK + 5].add_(1.0),
    "W_q below the float64 rounding of W·r": lambda w, b: _below_rounding(w),
}


@pytest.mark.parametrize("device_path", [False, True], ids=["memcmp", "one-device-read"])
@pytest.mark.parametrize("edit", EDITS)
def test_an_edit_of_inference_mode_weights_inside_the_context_refuses_the_next_batch(edit, device_path, monkeypatch):
    """Each edit (in inference mode: the only place inference tensors can be edited in place) of layer 1's W_q, W_k
    or b_k after a first batch refuses the next one naming layer 1; the last edit fooled the fingerprint. With the
    device path opened (as for copies on a GPU: every layer compared in one read of the device, round 25), the
    per-batch check makes no per-layer comparison (``_same_bits``) and refuses the same edits."""
    per_layer: list[int] = []
    if device_path:
        spectrum_module = sys.modules["qkhooks.spectrum"]  # the module: qkhooks.spectrum is also the function's name
        monkeypatch.setattr(spectrum_module, "_compared_on_device", lambda t: True)
        same_bits = spectrum_module._same_bits
        monkeypatch.setattr(spectrum_module, "_same_bits", lambda a, b: per_layer.append(1) or same_bits(a, b))
    images = _images()
    with torch.inference_mode():
        model = _vit()
        qkv = model.blocks[1].attn.qkv
        qkv.weight[0, 0] = 1e-30
        with qkhooks.record(model, modes=4) as run:
            model(images)
            per_layer.clear()  # entry's checks are not the per-batch check
            before = qkv.weight.clone(), qkv.bias.clone()
            EDITS[edit](qkv.weight, qkv.bias)
            assert not (torch.equal(qkv.weight, before[0]) and torch.equal(qkv.bias, before[1]))
            with pytest.raises(QKHooksError, match=r"layer 1 \(blocks.1.attn\): its weights changed inside this record"):
                model(images)
    assert run.images_seen == 2 and per_layer == []


def test_an_edit_through_data_outside_inference_mode_is_refused_too():
    """``param.data`` of an inference tensor can be edited outside inference mode (only the tensor itself refuses),
    so the check cannot skip batches run outside it: a model made in inference mode, recorded under ``no_grad``, has
    layer 0's qkv weight scaled through ``.data`` between two batches (its slices refuse, the whole does not), and the
    second batch is refused."""
    images = _images()
    with torch.inference_mode():
        model = _vit()
    weight = model.blocks[0].attn.qkv.weight
    assert weight.is_inference()
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        model(images)
        weight.data.mul_(1.5)
        with pytest.raises(QKHooksError, match=r"layer 0 \(blocks.0.attn\): its weights changed inside this record"):
            model(images)
    assert run.images_seen == 2


def test_unchanged_inference_mode_weights_pass_every_batch_with_the_maps_of_a_fresh_recording():
    """Three batches of unchanged inference-mode weights pass; the last one's query and key maps equal, to the bit,
    those of one batch recorded from the same weights built outside inference mode (versioned, no cache entry)."""
    images = _images()
    with torch.inference_mode():
        model = _vit()
        with qkhooks.record(model, modes=4) as run:
            for _ in range(3):
                model(images)
    fresh_model = _vit()
    with qkhooks.record(fresh_model, modes=4) as fresh, torch.no_grad():
        fresh_model(images)
    assert run.images_seen == 6 and run.layers == fresh.layers == [0, 1]
    for layer in run.layers:
        assert torch.equal(run.query(layer), fresh.query(layer)) and torch.equal(run.key(layer), fresh.key(layer))


@pytest.mark.parametrize("made", ["inference_mode", "param.data"])
def test_the_spectrum_cache_keeps_a_spectrum_until_an_edit_the_fingerprint_missed(made, svd_calls):  # noqa: F811
    """The cache reuses a layer's spectrum of unchanged weights (no SVD; for inference-mode weights, new: they were
    computed afresh at every call) and computes it again after W_q[0, 0] goes from 1e-30 to 3e-30, in inference mode
    or through ``param.data`` (which keeps ``_version``): an edit W·r's float64 rounding hides. Layer 1 is reused."""
    if made == "inference_mode":
        with torch.inference_mode():
            model = _vit()
    else:
        model = _vit()
    weight = model.blocks[0].attn.qkv.weight
    with torch.inference_mode() if made == "inference_mode" else torch.no_grad():
        weight.data[0, 0] = 1e-30
        first = qkhooks.spectrum(model)
        again = qkhooks.spectrum(model)
        assert len(svd_calls) == 2 and again[0] is first[0] and again[1] is first[1]
        version = None if made == "inference_mode" else weight._version
        _below_rounding(weight.data)
        assert made == "inference_mode" or weight._version == version
        after = qkhooks.spectrum(model)
    assert len(svd_calls) == 3 and after[0] is not first[0] and after[1] is first[1]
    dense_check(qkhooks.sites(model)[0], after[0])


def test_both_ways_of_comparing_bits_agree_with_numpy():
    """The copy is compared bit for bit (memcmp on contiguous CPU tensors; torch.equal of integer views otherwise, as
    for a transposed W and on other devices): a NaN equals itself (the old fingerprint refused unchanged weights with
    one), and one flipped low bit of one entry is a change; numpy's compare of the int32 views is the reference."""
    from qkhooks.spectrum import _same_bits

    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    w[2, 3] = float("nan")
    bias = torch.randn(6, generator=torch.Generator().manual_seed(1))
    flipped = w.clone()
    flipped.view(torch.int32)[4, 5] ^= 1
    for layout in (lambda t: t, lambda t: t.T):  # contiguous, and a transposed view
        for other, same in ((w.clone(), True), (flipped, False)):
            a, b = layout(w), layout(other)
            assert a.is_contiguous() == (layout(w) is w)
            assert np.array_equal(a.numpy().view(np.int32), b.numpy().view(np.int32)) is same
            assert _same_bits((a.clone(), bias.clone()), (b, bias)) is same
    assert not _same_bits((w.clone(),), (w.double(),)) and not _same_bits((w.clone(),), (w[:5],))


def test_entering_again_compares_inference_mode_weights_once_a_layer_and_still_sees_an_edit(monkeypatch):
    """Entering ``record()`` with cached spectra of inference-mode weights compares each layer's copy with the weights
    once (the spectrum cache's check), not a second time for the recording's own state; an edit through ``.data``
    between two entries still gives the next entry a new spectrum, and its batches pass."""
    from conftest import count_calls

    spectrum_module = sys.modules["qkhooks.spectrum"]
    with torch.inference_mode():
        model = _vit()
        with qkhooks.record(model, modes=4):
            model(_images())
    compares = count_calls(monkeypatch, spectrum_module, "_same_bits")
    again = qkhooks.record(model, modes=4)
    assert compares[0] == len(again.layers) == 2
    before = again.qk_spectrum[0].S.clone()
    model.blocks[0].attn.qkv.weight.data.mul_(2.0)  # through .data (the whole: its slices refuse), no version to tell
    with qkhooks.record(model, modes=4) as edited, torch.inference_mode():
        model(_images())
    assert edited.images_seen == 2
    torch.testing.assert_close(edited.qk_spectrum[0].S, 4 * before, rtol=1e-5, atol=0)  # W_q and W_k doubled
