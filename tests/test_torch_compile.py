"""r24: torch.compile caught wherever it happens, and refusals of tooling no broader than the harm.

Compiled inside the record() context (``model.compile()``, a ``torch.compile`` wrapper called there, with or without
``fullgraph``, with Dynamo's ``suppress_errors``): every qkhooks hook refuses to be traced, so a QKHooksError naming the
layer reaches the user, no batch is handed on, and a dataset run keeps only what was recorded uncompiled. Compiled or
dynamically quantised modules away from the attention (the head, an MLP) are taken, with maps equal to the model's own
eager maps and to the uncompiled / float model's recording; compiled or quantised attention (the module, a block
around it, its q/k layer, the layer the grid is read from) is still refused, naming it. Compiles use Dynamo with the
eager or aot_eager backend: tracing is what runs (or skips) the hooks; inductor's code generation adds nothing here."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import qkhooks
from qkhooks.errors import QKHooksError

from conftest import record_samples
from test_wrapped_qk_layers_and_half_precision import _hf_attentions, _hf_vit, _timm_vit
from test_foreign_hooks_refused import _eager, _images

MAP_KINDS = ("query", "key")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, and leaves no compiled code behind for the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Batches:
    """A sink keeping how many batches it was handed."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, batch) -> None:
        self.n += 1


def _recorded(model: nn.Module, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Full maps and mode maps of every layer, recorded from the model as it is (q/k path and x path give the same)."""
    with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
        model(images)
    return {kind: [getattr(run, kind)(l).clone() if kind in MAP_KINDS else run.attention(l, "full").clone()
                   for l in run.layers] for kind in ("full", *MAP_KINDS)}


def _assert_same_maps(got: dict[str, list[torch.Tensor]], want: dict[str, list[torch.Tensor]]) -> None:
    for kind in got:
        assert len(got[kind]) == len(want[kind]) == 2
        for a, b in zip(got[kind], want[kind]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ compiled inside the context
COMPILED_INSIDE = {  # how -> (compile, what the refusal names)
    "model.compile": (lambda m: m.compile(backend="eager") or m, "the model (VisionTransformer)"),
    "wrapper": (lambda m: torch.compile(m, backend="eager"), "the model (VisionTransformer)"),
    "attention.compile aot_eager": (lambda m: m.blocks[1].attn.compile(backend="aot_eager") or m,
                                    "'blocks.1.attn' (Attention)"),
    "qkv.compile": (lambda m: m.blocks[0].attn.qkv.compile(backend="eager") or m, "'blocks.0.attn.qkv' (Linear)"),
    "wrapper fullgraph": (lambda m: torch.compile(m, backend="eager", fullgraph=True), "through a torch.compile wrapper"),
    "wrapper fullgraph, head compiled": (  # the head, compiled too, is not what the refusal blames
        lambda m: m.head.compile(backend="eager") or torch.compile(m, backend="eager", fullgraph=True),
        "the recorded model, through a torch.compile wrapper"),
    "model.compile fullgraph": (lambda m: m.compile(backend="eager", fullgraph=True) or m,
                                "the model (VisionTransformer) is compiled by torch.compile (module.compile())"),
}


@pytest.mark.parametrize("how, suppress_errors", [(how, False) for how in COMPILED_INSIDE] + [
    (how, True) for how in ("wrapper", "wrapper fullgraph", "model.compile fullgraph")])
def test_compiling_inside_the_context_is_refused_naming_the_layer_and_hands_on_nothing(how, suppress_errors):
    """Before: the hooks were traced, so a batch was recorded only where Dynamo happened to break the graph at them
    (fullgraph: Dynamo's own error about a data pointer comparison). Now the first hook traced refuses, as a
    QKHooksError (not Dynamo's wrapper), also where Dynamo is told to fall back to eager on its errors
    (``suppress_errors``: a fullgraph compile still raises, and the refusal runs eagerly, as a graph break)."""
    compile_, named = COMPILED_INSIDE[how]
    model, images, batches = _timm_vit(), _images(), _Batches()
    with torch._dynamo.config.patch(suppress_errors=suppress_errors):
        with pytest.raises(QKHooksError) as err:
            with qkhooks.record(model, modes=4, attention="full", sinks=[batches]) as run, torch.no_grad():
                compile_(model)(images)
    message = str(err.value)
    assert type(err.value) is QKHooksError
    assert named in message and "torch.compile" in message and "empty or stale" in message, message
    assert "record the model uncompiled" in message, message
    assert run.last is None and batches.n == 0 and run.images_seen == 0  # nothing half-recorded handed on


def test_a_wrapper_compiled_before_entry_is_refused_when_called_inside_and_left_clean_after():
    """A ``torch.compile`` wrapper compiled and run before record() is invisible at entry (the model is not marked):
    called inside the context Dynamo traces the hooks anew, and they refuse. After the context the wrapper computes
    what the uncompiled model does: nothing of qkhooks stays in its compiled code."""
    model, images = _timm_vit(), _images()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(images)
        with pytest.raises(QKHooksError, match=r"the model \(VisionTransformer\) runs under torch.compile"):
            with qkhooks.record(model, modes=4, attention="full") as run:
                compiled(images)
        assert run.last is None
        torch.testing.assert_close(compiled(images), _timm_vit()(images), atol=0, rtol=0)


def test_a_dataset_run_compiled_after_entry_keeps_only_the_batches_recorded_before(tmp_path):
    """``on_batch`` compiles the model after the first of two batches: the second is refused (QKHooksError), nothing of
    it reaches the file, and the file is a resumable, incomplete run of the first batch, whose maps are the uncompiled
    model's eager maps of those images."""
    from qkhooks.store import open_run

    model = _timm_vit()
    inputs: list[torch.Tensor] = []  # the images of each call (a hook on the model itself, which qkhooks takes)
    handle = model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    live: list[torch.Tensor] = []

    def compile_after_first(batch) -> None:
        live.append(batch.attention(1, "full").clone())
        model.compile(backend="eager")

    path = tmp_path / "compiled.h5"
    try:
        with pytest.raises(QKHooksError, match=r"the model \(VisionTransformer\) runs under torch.compile"):
            record_samples(model, (32, 32), path, compile_after_first, limit=4)
    finally:
        handle.remove()
    assert len(live) == 1  # the second batch never reached a sink
    first = inputs[0]
    reference = _eager(_timm_vit(), "timm", first)[1]
    with open_run(path) as run:
        assert not run.complete and run.n == 2 == first.shape[0]
        stored = torch.as_tensor(run.attention(1, "full")[:])
    torch.testing.assert_close(stored, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(live[0], reference, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ compiled or quantised away from the attention
def _compiled_head(model: nn.Module) -> nn.Module:
    model.head.compile(backend="eager")
    return model


def _compiled_mlp_wrapper(model: nn.Module) -> nn.Module:
    model.blocks[0].mlp = torch.compile(model.blocks[0].mlp, backend="eager")
    return model


@pytest.mark.parametrize("compile_", [_compiled_head, _compiled_mlp_wrapper], ids=["head.compile", "mlp wrapper"])
def test_a_compiled_head_or_mlp_is_taken_with_the_uncompiled_models_maps(compile_):
    images = _images()
    plain = _timm_vit()
    want = _recorded(plain, images)
    model = compile_(_timm_vit())
    before = sum(torch._dynamo.utils.counters["frames"].values())
    got = _recorded(model, images)
    assert sum(torch._dynamo.utils.counters["frames"].values()) > before  # Dynamo did compile the part while recorded
    _assert_same_maps(got, want)
    for recorded, eager in zip(got["full"], _eager(plain, "timm", images)):  # and the model's own eager maps
        torch.testing.assert_close(recorded, eager, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), atol=1e-5, rtol=0)


def _quantised(model: nn.Module, names: set[str]) -> nn.Module:
    with warnings.catch_warnings():  # torch's deprecation notice for torch.ao.quantization
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8)


def test_a_quantised_head_is_taken_with_the_float_models_maps():
    images = _images()
    plain = _timm_vit()
    model = _quantised(_timm_vit(), {"head"})
    assert type(model.head).__module__.startswith("torch.ao.nn.quantized")
    with torch.no_grad():
        assert not torch.allclose(model(images), plain(images), atol=1e-4)  # the head does compute in integers
    got = _recorded(model, images)
    _assert_same_maps(got, _recorded(plain, images))
    for recorded, eager in zip(got["full"], _eager(plain, "timm", images)):
        torch.testing.assert_close(recorded, eager, atol=1e-5, rtol=0)


def test_a_quantised_mlp_is_taken_with_the_models_own_eager_maps():
    """Quantising block 0's MLP changes what block 1's attention sees: the reference is the quantised model's own
    eager attention, and it differs from the float model's (so the comparison can tell)."""
    images = _images()
    model = _quantised(_timm_vit(), {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"})
    got = _recorded(model, images)["full"]
    eager = _eager(model, "timm", images)
    for recorded, own in zip(got, eager):
        torch.testing.assert_close(recorded, own, atol=1e-5, rtol=0)
    assert not torch.allclose(eager[1], _eager(_timm_vit(), "timm", images)[1], atol=1e-6)


def _hf_query(model: nn.Module) -> nn.Module:
    attention = _hf_attentions(model)[0]
    attention.q_proj = _quantised(nn.Sequential(attention.q_proj), {nn.Linear})[0]
    return model


REFUSED = {  # what is compiled or quantised -> what the refusal names
    "block.compile": "'blocks.0' (Block) is compiled",
    "qkv.compile": "'blocks.1.attn.qkv' (Linear) is compiled",
    "qkv wrapper": "'blocks.1.attn.qkv' (OptimizedModule) is compiled",
    "hf grid source": "'embeddings.patch_embeddings.projection' (Conv2d) is compiled",
    "quantised qkv": "'blocks.1.attn.qkv' (Linear) is a quantised layer",
    "quantised proj": "'blocks.0.attn.proj' (Linear) is a quantised layer",
    "hf quantised q_proj": "'layers.0.attention.q_proj' (Linear) is a quantised layer",
}


def _refused_model(what: str) -> nn.Module:
    if what in ("hf grid source", "hf quantised q_proj"):
        model = _hf_vit()
        if what == "hf grid source":
            model.embeddings.patch_embeddings.projection.compile(backend="eager")
            return model
        return _hf_query(model)
    model = _timm_vit()
    if what == "block.compile":
        model.blocks[0].compile(backend="eager")
    elif what == "qkv.compile":
        model.blocks[1].attn.qkv.compile(backend="eager")
    elif what == "qkv wrapper":
        model.blocks[1].attn.qkv = torch.compile(model.blocks[1].attn.qkv, backend="eager")
    elif what == "quantised qkv":
        model = _quantised(model, {"blocks.1.attn.qkv"})
    elif what == "quantised proj":
        model = _quantised(model, {"blocks.0.attn.proj"})
    return model


@pytest.mark.parametrize("what", list(REFUSED))
def test_compiled_or_quantised_attention_is_refused_naming_the_layer(tmp_path, what):
    """Refused at entry (nothing is compiled: nothing runs the model), and before any file is made."""
    model, named = _refused_model(what), REFUSED[what]
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=4)
    message = str(err.value)
    assert named in message, message
    assert ("Record the float model" if "quantised" in what else "empty or stale") in message, message
    out = tmp_path / "refused.h5"
    with pytest.raises(QKHooksError, match=re.escape(named)):
        qkhooks.record_dataset(qkhooks.load_model(model), "samples", out, limit=2, batch_size=2, progress=False, modes=2)
    assert not out.exists()
