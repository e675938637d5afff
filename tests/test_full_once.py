"""``record(..., attention="full", outputs="eager")``: each layer's attention computed once, from the recorded maps.

References are the model's own: its eager forward (timm ``fused_attn=False``, HF ``attn_implementation="eager"``)
for the outputs, its eager attention weights for the maps; the fused kernel's calls are counted by a torch function
mode entered outside the recording's (it sees every ``scaled_dot_product_attention`` call the recording lets through).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import qkhooks
from conftest import TINY_MODELS, Tiny, eager_attention
from qkhooks import QKHooksError
from test_zoo import FAST_CASES, _call, _first_tensor, eager_maps, perturb

SDPA = torch.nn.functional.scaled_dot_product_attention


class CountSDPA(torch.overrides.TorchFunctionMode):
    """Counts the ``scaled_dot_product_attention`` calls that reach below the modes pushed after it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is SDPA
        return func(*args, **(kwargs or {}))


def _eager_forward(model: torch.nn.Module, kind: str, call) -> torch.Tensor:
    """The model's output on its own eager attention path."""
    if kind == "timm":
        fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
        for m, _ in fused:
            m.fused_attn = False
        try:
            return call()
        finally:
            for m, value in fused:
                m.fused_attn = value
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return call()
    finally:
        model.set_attn_implementation(before)


def _tiny_call(tiny: Tiny, model: torch.nn.Module, images: torch.Tensor):
    def call() -> torch.Tensor:
        with torch.no_grad():
            out = model(images) if tiny.kind == "timm" else model(pixel_values=images)
        return _first_tensor(out)

    return call


@pytest.mark.parametrize("tiny", TINY_MODELS, ids=lambda t: t.name)
def test_eager_outputs_equal_the_eager_forward_maps_equal_eager_attention_and_no_fused_kernel_runs(tiny: Tiny):
    model, images = tiny.model(), tiny.images()
    call = _tiny_call(tiny, model, images)
    want_out, want_maps = _eager_forward(model, tiny.kind, call), eager_attention(tiny, model, images)
    counted = CountSDPA()
    with counted, qkhooks.record(model, modes=4, attention="rows+full", outputs="eager") as run:
        out = call()
    assert counted.calls == 0
    assert float((out - want_out).abs().max()) < 1e-5
    assert run.attention_layers("full") == list(range(len(want_maps)))
    for layer, want in enumerate(want_maps):
        assert float((run.attention(layer, "full") - want).abs().max()) < 1e-5
        # the rows (rebuilt from x) are the same maps' rows
        rows = run.attention(layer, "rows")
        tokens = run.last.meta["query_tokens"]
        picked = torch.stack([want[b][:, tokens[b]] for b in range(len(tokens))])
        assert float((rows - picked).abs().max()) < 1e-5


def test_the_default_keeps_the_fused_kernel_and_bit_identical_outputs():
    tiny = TINY_MODELS[0]
    model, images = tiny.model(), tiny.images()
    call = _tiny_call(tiny, model, images)
    plain = call()
    counted = CountSDPA()
    with counted, qkhooks.record(model, modes=4, attention="full") as run:
        out = call()
    assert torch.equal(out, plain)
    assert counted.calls == len(run.layers) and run.outputs == "unchanged"


def _case(name: str):
    return next(c for c in FAST_CASES if c.name == name)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "BeitModel-layer-bias", "swin_tiny_patch4_window7_224",
                                  "cait_xxs24_224", "PvtV2Model", "Data2VecVisionModel"])
def test_rope_bias_windows_class_attention_reduced_keys_and_an_eager_model_from_the_zoo(name: str):
    """RoPE (EVA-02), a relative-position bias (BEiT), windows with a shift mask (Swin), class attention and
    talking heads (CaiT), reduced keys (PVT v2), and a model that runs its own eager attention (Data2Vec)."""
    case = _case(name)
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    sites = qkhooks.sites(model)
    want_maps = eager_maps(model, sites, inputs, case.kind)
    want_out = _eager_forward(model, case.kind, lambda: _first_tensor(_call(model, inputs)))
    with qkhooks.record(model, modes=None, attention="full", outputs="eager") as run:
        out = _first_tensor(_call(model, inputs))
    assert float((out - want_out).abs().max()) < 1e-5
    assert len(want_maps) == len(sites)
    for site, want in zip(sites, want_maps):
        got = run.attention(site.layer, "full")
        assert float((got.reshape(want.shape) - want).abs().max()) < 1e-5, site.path


def test_training_mode_dropout_is_refused_naming_the_module_and_the_fix():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=4, attn_drop_rate=0.1).train()
    with pytest.raises(QKHooksError, match=r"blocks\.0\.attn .*dropout_p=0\.1.*model\.eval\(\)"):
        with qkhooks.record(model, modes=None, attention="full", outputs="eager"):
            model(torch.randn(2, 3, 32, 32))
    assert not torch.overrides._get_current_function_mode_stack()  # nothing left intercepting after the failure


def test_a_call_the_adapter_cannot_match_is_refused_and_a_failed_forward_leaves_no_mode_behind():
    tiny = TINY_MODELS[0]
    model, images = tiny.model(), tiny.images()
    sites = qkhooks.sites(model)  # found as built: 4 heads of 8
    attn = model.blocks[1].attn
    attn.num_heads = 2  # the module now splits 2 heads of 16, where the adapter found 4 heads of 8
    attn.head_dim = 16
    # the head count the search found is watched: refused before the call (round 37)
    with pytest.raises(QKHooksError, match=r"blocks\.1\.attn' \(Attention\): its num_heads changed from 4 to 2"):
        with qkhooks.record(model, modes=None, attention="full", outputs="eager", sites=sites):
            model(images)
    # a change the watch cannot see (its list emptied here) is still refused where the call does not match
    for site in sites:
        site.qk_watch = ()
    with pytest.raises(QKHooksError, match=r"blocks\.1\.attn \(Attention\).*shape \(2, 2, 17, 16\)"):
        with qkhooks.record(model, modes=None, attention="full", outputs="eager", sites=sites):
            model(images)
    assert not torch.overrides._get_current_function_mode_stack()


def test_eager_outputs_need_full_maps_and_a_known_value():
    model = TINY_MODELS[0].model()
    with pytest.raises(QKHooksError, match="asks for none; add attention='full'"):
        qkhooks.record(model, attention="rows", outputs="eager")
    with pytest.raises(QKHooksError, match="outputs must be 'unchanged'"):
        qkhooks.record(model, attention="full", outputs="fast")


def test_only_the_layers_with_full_maps_leave_the_fused_kernel():
    tiny = TINY_MODELS[0]
    model, images = tiny.model(), tiny.images()
    call = _tiny_call(tiny, model, images)
    want = eager_attention(tiny, model, images)
    counted = CountSDPA()
    with counted, qkhooks.record(model, modes=None, attention="full:1", outputs="eager") as run:
        call()
    assert counted.calls == 1  # layer 0 still runs the fused kernel
    assert float((run.attention(1, "full") - want[1]).abs().max()) < 1e-5


def test_record_dataset_passes_outputs_on(tmp_path: Any):
    from qkhooks.options import RecordOptions

    assert RecordOptions().outputs == "unchanged"
    seen: list[torch.Tensor] = []
    counted = CountSDPA()
    with counted:
        qkhooks.record_dataset("timm:vit_tiny_patch16_224", "samples", None, random_init=True, modes=None,
                               attention="full:0", outputs="eager", limit=2, batch_size=2, progress=False,
                               reducers=[], on_batch=lambda b: seen.append(b.attention(0, "full")))
    # the one batch: 12 blocks, one of them attended once from its maps (a plain ViT's geometry needs no probe forward)
    assert len(seen) == 1 and counted.calls == 11


@pytest.mark.parametrize("form", ["plain", "float-mask", "bool-mask", "causal", "grouped-query", "scale"])
def test_sdpa_maps_are_the_maps_scaled_dot_product_attention_applies(form: str):
    """Against torch's own kernel (its output = maps @ v) and a direct float64 softmax of q·kᵀ."""
    from qkhooks.attention import sdpa_maps

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    kwargs: dict[str, Any] = {}
    if form == "float-mask":
        kwargs["attn_mask"] = torch.randn(4, 7, 7, generator=g)
    if form == "bool-mask":
        kwargs["attn_mask"] = torch.rand(2, 1, 7, 7, generator=g) > 0.4
        kwargs["attn_mask"][..., 0] = True  # every row keeps a key
    if form == "causal":
        kwargs["is_causal"] = True
    if form == "grouped-query":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    if form == "scale":
        kwargs["scale"] = 0.3
    maps = sdpa_maps(q, k, **kwargs)
    kk, vv = (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)) if form == "grouped-query" else (k, v)
    logits = q.double() @ kk.double().transpose(-1, -2) * kwargs.get("scale", 8 ** -0.5)
    if form == "float-mask":
        logits = logits + kwargs["attn_mask"].double()
    if form == "bool-mask":
        logits = logits.masked_fill(~kwargs["attn_mask"], float("-inf"))
    if form == "causal":
        logits = logits.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    assert float((maps.double() - logits.softmax(-1)).abs().max()) < 1e-6
    assert float((maps @ vv - SDPA(q, k, v, **kwargs)).abs().max()) < 1e-5


def test_a_model_on_its_own_eager_path_hands_over_the_maps_it_computes_and_its_outputs_stay_bit_identical():
    tiny = TINY_MODELS[0]
    model, images = tiny.model(), tiny.images()
    want_maps = eager_attention(tiny, model, images)
    for block in model.blocks:
        block.attn.fused_attn = False  # timm's eager path: softmax, attn_drop, @ v
    call = _tiny_call(tiny, model, images)
    plain = call()
    with qkhooks.record(model, modes=None, attention="full", outputs="eager") as run:
        out = call()
    assert torch.equal(out, plain)
    for layer, want in enumerate(want_maps):
        assert torch.equal(run.attention(layer, "full"), want)


def test_the_outputs_flag_of_qkhooks_record_is_made_from_the_option():
    import argparse

    from qkhooks.options import RecordOptions

    parser = argparse.ArgumentParser()
    RecordOptions.add_arguments(parser)
    assert RecordOptions.from_args(parser.parse_args(["--outputs", "eager"])).outputs == "eager"
    assert RecordOptions.from_args(parser.parse_args([])).outputs == "unchanged"
    with pytest.raises(SystemExit):
        parser.parse_args(["--outputs", "fused"])


def test_training_mode_dropout_refusal_says_the_whole_reason_and_the_fix():
    """The whole message: the module, its class, why the maps cannot be the outputs' maps, and the two fixes."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=4, attn_drop_rate=0.1).train()
    with pytest.raises(QKHooksError) as refused:
        with qkhooks.record(model, modes=None, attention="full", outputs="eager"):
            model(torch.randn(1, 3, 32, 32))
    assert str(refused.value) == (
        "blocks.0.attn (Attention): outputs='eager' cannot compute this layer's attention once: it drops attention "
        "weights at random (dropout_p=0.1, the module is in training mode), so its outputs cannot be the recorded "
        "maps @ v; call model.eval(). Record with outputs='unchanged' (the default: the maps are rebuilt beside the "
        "model's own attention).")
