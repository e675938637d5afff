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


class HostOnly(torch.Tensor):
    """A host tensor that refuses ``.to(<device>)``, ``.cuda()`` and ``torch.as_tensor(..., device=)``: on a GPU
    each is a blocking copy, so a hook may move it only through ``qkhooks._devices.to_device``."""

    allowed = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moves = func in (torch.Tensor.to, torch.Tensor.cuda) and (
            func is torch.Tensor.cuda or "device" in kwargs
            or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:]))
        if moves and not cls.allowed:
            raise AssertionError(f"a host tensor moved with {func.__name__}() outside qkhooks._devices.to_device")
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture
def moves_only_through_to_device(monkeypatch):
    """Every qkhooks module's ``to_device`` lets a :class:`HostOnly` tensor move; nothing else does."""
    real = qkhooks._devices.to_device

    def allowed(t, device):
        HostOnly.allowed = True
        try:
            return real(t.as_subclass(torch.Tensor) if isinstance(t, HostOnly) else t, device)
        finally:
            HostOnly.allowed = False

    for name, module in list(sys.modules.items()):
        if name.startswith("qkhooks") and getattr(module, "to_device", None) is real:
            monkeypatch.setattr(module, "to_device", allowed)


@pytest.mark.parametrize("tiny", [t for t in TINY_MODELS if t.name in ("timm-vit", "hf-vit", "timm-dinov2-reg")],
                         ids=lambda t: t.name)
def test_query_tokens_and_pool_masks_reach_the_model_only_through_to_device(tiny, moves_only_through_to_device):
    """What would catch ``to_device`` reverted to ``.to(device)`` at the sites that move a batch's query tokens and
    pool masks (issue 20's +47 % on a GPU), on the CPU; and the rows and pooled rows still equal the model's eager
    attention."""
    model, images = tiny.model(), tiny.images()
    n = tiny.grid[0] * tiny.grid[1] + tiny.prefix
    tokens = torch.tensor([[0, n - 1], [1, 2]])
    masks = torch.rand(2, 3, n, generator=torch.Generator().manual_seed(0))
    meta = {"query_tokens": tokens.as_subclass(HostOnly), "pool_masks": masks.as_subclass(HostOnly)}
    with qkhooks.record(model, modes=4, attention=["rows", "pooled"]) as run, torch.no_grad():
        run(images, meta=meta)
    eager = eager_attention(tiny, model, images)
    for site in qkhooks.sites(model):
        ref_rows = torch.stack([eager[site.layer][b][:, tokens[b]] for b in range(2)])
        rows = run.attention(site.layer, "rows").as_subclass(torch.Tensor)
        pooled = run.attention(site.layer, "pooled").as_subclass(torch.Tensor)
        torch.testing.assert_close(rows, ref_rows, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, torch.einsum("bhtn,bmn->bhtm", ref_rows, masks), rtol=0, atol=1e-5)


def test_preference_grids_reach_the_rows_device_only_through_to_device(moves_only_through_to_device):
    """The odd-one-out grids move to the rows' device once per layer in PreferenceReducer.update: through to_device
    (a plain .to(device) made the host wait for the GPU in every layer); the values match a direct computation."""
    from qkhooks.analysis.preference import preference_from_rows

    gen = torch.Generator().manual_seed(1)
    rows = torch.rand(2, 3, 2, 1 + 4, generator=gen)
    t = torch.zeros(2, 2, 2)
    t[:, 0, 0] = 1.0
    d = torch.zeros(2, 2, 2)
    d[:, 1, 1] = 1.0
    values = preference_from_rows(rows, t.as_subclass(HostOnly), d.as_subclass(HostOnly), 1).as_subclass(torch.Tensor)
    attn = rows[..., 1:].double() / rows[..., 1:].double().sum(-1, keepdim=True)
    tt, td, tb = attn[:, :, 0, 0], attn[:, :, 0, 3], attn[:, :, 0, 1] + attn[:, :, 0, 2]
    dd, dt, db = attn[:, :, 1, 3], attn[:, :, 1, 0], attn[:, :, 1, 1] + attn[:, :, 1, 2]
    ref = torch.stack([tt, td, tb, dd, dt, db], dim=-1)
    torch.testing.assert_close(values.double(), ref, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and asynchronous copies need a GPU")
def test_to_device_copies_a_pinned_tensor_before_the_caller_can_edit_it():
    """A tensor the caller pinned already is not the copy's source (``pin_memory()`` returns it as it is): the copy
    runs after the kernels queued before it, and the caller may have edited the tensor in place by then."""
    from qkhooks._devices import to_device

    source = torch.arange(1000).pin_memory()
    torch.cuda._sleep(50_000_000)  # a busy stream: the copy runs well after to_device returns
    moved = to_device(source, "cuda")
    source.zero_()
    assert torch.equal(moved.cpu(), torch.arange(1000))

