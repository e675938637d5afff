"""r24 review: a model with a dynamically quantised head is taken by ``record()`` and must be by ``record_dataset`` too.
Its state dict holds a dtype and a (weight, bias) tuple of packed params, which the run's weights fingerprint (what a
resume compares) read as tensors and crashed on. The fingerprint now hashes such entries by content, and is unchanged
for plain tensors (runs recorded before resume as before)."""

from __future__ import annotations

import copy
import hashlib
import warnings

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import qkhooks
from qkhooks.errors import QKHooksError
from qkhooks.stream import weights_fingerprint

from test_wrapped_qk_layers_and_half_precision import _timm_vit


def _quantised_head(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch's deprecation notice for torch.ao.quantization
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {"head"}, dtype=torch.qint8)


def _reference_fingerprint(net: nn.Module) -> str:
    """The fingerprint of a model of plain tensors as documented (and as runs before r24 stored it): sha256 over each
    tensor's sha256 of name|shape|dtype| and its bytes, in name order."""
    digests = []
    for name, t in sorted(net.state_dict().items()):
        h = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests.append(h.digest())
    return hashlib.sha256(b"".join(digests)).hexdigest()


def test_a_plain_models_fingerprint_is_the_documented_one():
    assert weights_fingerprint(_timm_vit()) == _reference_fingerprint(_timm_vit())


def test_a_quantised_heads_fingerprint_follows_its_integers_and_scale():
    model = _quantised_head(_timm_vit())
    first = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == first  # content, not identity
    changed = copy.deepcopy(model)
    weight, bias = changed.head._packed_params._weight_bias()
    ints = weight.int_repr().clone()
    ints[0, 0] = ints[0, 0] + (1 if ints[0, 0] < 127 else -1)
    requantised = torch._make_per_tensor_quantized_tensor(ints, weight.q_scale(), weight.q_zero_point())
    changed.head.set_weight_bias(requantised, bias)
    assert weights_fingerprint(changed) != first
    rescaled = copy.deepcopy(model)
    rescaled.head.set_weight_bias(torch._make_per_tensor_quantized_tensor(weight.int_repr(), weight.q_scale() * 2,
                                                                           weight.q_zero_point()), bias)
    assert weights_fingerprint(rescaled) != first


class _Stop(Exception):
    pass


def _stop_after_first(batch) -> None:
    raise _Stop  # an interruption after the first batch was committed


def test_a_dataset_run_of_a_model_with_a_quantised_head_records_the_float_models_maps_and_resumes(tmp_path):
    float_model = _timm_vit()
    model = _quantised_head(copy.deepcopy(float_model))
    out, want = tmp_path / "q.h5", tmp_path / "f.h5"
    options = dict(limit=4, batch_size=2, progress=False, modes=2, dtype="float32")
    qkhooks.record_dataset(qkhooks.load_model(float_model), "samples", want, **options)
    with pytest.raises(_Stop):
        qkhooks.record_dataset(qkhooks.load_model(model), "samples", out, on_batch=_stop_after_first, **options)
    with qkhooks.open_run(out) as part:
        assert part.n == 2 and not part.complete
    # the resume compares the quantised model's fingerprint with the file's: the same model is taken...
    qkhooks.record_dataset(qkhooks.load_model(model), "samples", out, resume=True, **options)
    with qkhooks.open_run(out) as got, qkhooks.open_run(want) as ref:
        assert got.n == 4 and got.complete and got.ids == ref.ids
        for layer in ref.layers:
            np.testing.assert_allclose(np.asarray(got.query(layer)), np.asarray(ref.query(layer)), atol=1e-6)
    # ... and the float model, whose head differs, is not (its weights are another model's)
    with pytest.raises(_Stop):
        qkhooks.record_dataset(qkhooks.load_model(model), "samples", tmp_path / "q2.h5", on_batch=_stop_after_first,
                               **options)
    with pytest.raises(QKHooksError, match="cannot resume"):
        qkhooks.record_dataset(qkhooks.load_model(float_model), "samples", tmp_path / "q2.h5", resume=True, **options)


class _Opaque:
    """Extra module state that neither torch nor pickle can serialise (a lock, as a user's cache might hold)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()


class _WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def get_extra_state(self):
        return _Opaque()

    def set_extra_state(self, state) -> None:
        pass


def test_state_that_cannot_be_fingerprinted_is_refused_naming_it():
    with pytest.raises(QKHooksError, match=r"'_extra_state', a _Opaque that can be neither hashed"):
        weights_fingerprint(_WithExtraState())


def test_a_compiled_tubelet_embedding_is_refused_at_entry_naming_it():
    """r24 review: a video site also hooks its tubelet Conv3d (``context_hooks``), which lies neither around nor inside
    the attention; compiled, it would run without that hook. Refused at entry like the attention itself, naming it."""
    from test_hf_builds import _case

    model, _ = _case("VideoMAEModel")
    site = qkhooks.sites(model)[0]
    (tubelets, _hook), = site.context_hooks()
    tubelets.compile(backend="eager")
    path = next(p for p, m in model.named_modules() if m is tubelets)
    with pytest.raises(QKHooksError, match=f"'{path}' .* is compiled by torch.compile"):
        qkhooks.record(model, modes=2)
