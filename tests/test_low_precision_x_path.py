"""Round 21: maps from the model's own q/k stay as exact as maps from x below float32, and a recording refuses weights
changed inside its context.

1. The q/k path magnifies q's rounding by up to kappa (< 32, set for float32). Where q and k come out of their
   Linear in bfloat16 or float16 (a low-precision model, autocast) a layer takes x in that batch; the references are
   float64 x·u_n of the tokens the layer received and the maps of a recording with ``qk_path=False``.
2. Modes, q/k path vectors and the spectrum are computed at entry: a checkpoint loaded or an optimiser step inside the
   context is refused at the next forward; forwards that change no weights (no_grad, eval/train) are not.
"""

from __future__ import annotations

import pytest
import timm
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from qkhooks.projector import QKPathProjector, qk_path_check
from qkhooks.stream import record_dataset

from conftest import ASYMMETRIC


def _vit(seed: int = 0) -> torch.nn.Module:
    """The review's tiny ViT (its t1b.py): qkv biases of std 1, so kappa ~ 13 (the q/k path's fp32
    check passes) and q's rounding is magnified most."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, qkv_bias=True).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.normal_(0, 1.0)
    return model


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _error(run) -> float:
    """Largest |maps - float64 x·u_n| / max |x·u_n| over layers and both sides, x the tokens the layer received."""
    worst = 0.0
    for layer in run.layers:
        x, spec = run.last.captures[layer].inputs.double(), run.spectrum(layer)
        for maps, vectors in ((run.query(layer), spec.U), (run.key(layer), spec.V)):
            ref = torch.einsum("bnd,hdk->bhkn", x, torch.as_tensor(vectors).double())
            worst = max(worst, float((maps.double() - ref).abs().amax() / ref.abs().amax()))
    return worst


def _record(model, images, autocast: torch.dtype | None = None, **options):
    with qkhooks.record(model, modes="all", keep_inputs=True, **options) as run, torch.no_grad():
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            model(images)
    return run


def test_the_float32_check_passes_these_layers_so_below_float32_only_the_dtype_sends_them_to_x():
    """The setup exercises the bug: every layer fits the float32 rule (kappa < 32, well above 1)."""
    model = _vit()
    for site in qkhooks.sites(model):
        check = qk_path_check(qkhooks.spectrum(model)[site.layer], site.weights())
        assert check.fits and float(check.amplification.max()) > 4


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 2 * 2.0 ** -8), (torch.float16, 2 * 2.0 ** -11)])
def test_a_low_precision_model_takes_x_and_its_maps_are_the_x_paths(dtype, bound):
    """bfloat16 / float16 models: maps within 2 eps(dtype) of float64 x·u_n (the old q/k path: 8.8e-2 and 8.8e-3,
    the x path 3.9e-3 and 4.7e-4) and bit-equal to a recording with qk_path=False; the layers say "x" before and after
    the batch."""
    model = _vit().to(dtype)
    images = _images().to(dtype)
    with qkhooks.record(model, modes="all") as planned:
        assert planned.mode_source == {0: "x", 1: "x"}
    run = _record(model, images)
    slow = _record(model, images, qk_path=False)
    assert run.mode_source == {0: "x", 1: "x"}
    assert _error(run) < bound
    for layer in run.layers:
        assert torch.equal(run.query(layer), slow.query(layer)) and torch.equal(run.key(layer), slow.key(layer))


def test_a_low_precision_model_with_float32_compute_is_exact_to_float32():
    """compute_dtype=float32 on a bfloat16 model: x (exact bfloat16 tokens) projected in float32 gives maps within 1e-5
    of float64 (2.7e-7 measured); q cast up carries its bfloat16 rounding (the old q/k path: 2.4e-2)."""
    model = _vit().to(torch.bfloat16)
    run = _record(model, _images().to(torch.bfloat16), compute_dtype=torch.float32)
    assert run.mode_source == {0: "x", 1: "x"} and run.query(0).dtype == torch.float32
    assert _error(run) < 1e-5


def test_autocast_entered_inside_record_takes_x_in_that_batch_and_float32_batches_keep_the_qk_path():
    """A float32 model under bfloat16 autocast entered after record(): the planned q/k layers see bfloat16 q/k and
    take x in that batch (maps within 2^-7 of float64, the old q/k path 6.4e-2; bit-equal to qk_path=False under the
    same autocast); the next float32 batch takes q/k again, its maps bit-equal to a plain float32 recording's."""
    model, images = _vit(), _images()
    slow = _record(model, images, autocast=torch.bfloat16, qk_path=False)
    plain = _record(model, images)
    assert plain.mode_source == {0: "qk", 1: "qk"}
    with qkhooks.record(model, modes="all", keep_inputs=True) as run, torch.no_grad():
        assert run.mode_source == {0: "qk", 1: "qk"}  # planned: no autocast at entry
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
        assert run.mode_source == {0: "x", 1: "x"}
        assert _error(run) < 2 * 2.0 ** -8
        for layer in run.layers:
            assert torch.equal(run.query(layer), slow.query(layer)) and torch.equal(run.key(layer), slow.key(layer))
        model(images)
        assert run.mode_source == {0: "qk", 1: "qk"}
        for layer in run.layers:
            assert torch.equal(run.query(layer), plain.query(layer)) and torch.equal(run.key(layer), plain.key(layer))


@pytest.mark.parametrize("tiny", ASYMMETRIC, ids=lambda t: t.name)
def test_q_and_k_from_separate_linears_under_autocast_take_x(tiny):
    """The 4x6 timm ViT (fused qkv) and the HF ViT calling k_proj before q_proj (q and k from two Linears, both
    checked): under bfloat16 autocast entered inside record() their maps are bit-equal to qk_path=False's."""
    model, images = tiny.model(), tiny.images()
    slow = _record(model, images, autocast=torch.bfloat16, qk_path=False)
    with qkhooks.record(model, modes="all") as run, torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
    assert set(run.mode_source.values()) == {"x"} and set(run._from_qk) == set(run.layers)
    for layer in run.layers:
        assert torch.equal(run.query(layer), slow.query(layer)) and torch.equal(run.key(layer), slow.key(layer))


def test_reduced_keys_under_autocast_take_x_with_the_reduced_tokens():
    """Segformer's spatially reduced keys (k from other tokens than q): under autocast entered inside record() the
    key maps come from the reduced tokens projected (the x path), bit-equal to qk_path=False's, M < N keys."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SegformerConfig(hidden_sizes=[16, 16, 16, 16], num_attention_heads=[2, 2, 2, 2],
                                          depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1])
    model = transformers.SegformerModel(config).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    slow = _record(model, images, autocast=torch.bfloat16, qk_path=False)
    with qkhooks.record(model, modes="all") as run, torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
    assert set(run.mode_source.values()) == {"x"} and set(run._from_qk) == set(run.layers)
    assert run.key(0).shape[-1] < run.query(0).shape[-1]
    for layer in run.layers:
        assert torch.equal(run.query(layer), slow.query(layer)) and torch.equal(run.key(layer), slow.key(layer))


def test_autocast_entered_before_record_plans_x():
    """Autocast on at entry: the layers plan x (no q/k hook for modes), and the maps are the x path's."""
    model, images = _vit(), _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run = _record(model, images)
    assert run.mode_source == {0: "x", 1: "x"} and not run._from_qk
    assert _error(run) < 2 * 2.0 ** -8


def test_float32_keeps_the_qk_path_with_the_projectors_values():
    """float32: every layer on the q/k path, its maps those of QKPathProjector applied to the model's own qkv output
    (the layer's qkv run again on the tokens it was handed, kept with keep_inputs: a hook of the test on a q/k layer
    would be refused), within float32 rounding of float64 x·u_n."""
    model, images = _vit(), _images()
    run = _record(model, images)
    assert run.mode_source == {0: "qk", 1: "qk"}
    assert _error(run) < 1e-5
    for site in qkhooks.sites(model):
        projector = QKPathProjector(run.spectrum(site.layer), site.weights())
        with torch.no_grad():
            output = model.blocks[site.layer].attn.qkv(run.inputs(site.layer))
        query, key = projector.from_fused(output[..., :2 * 48])
        assert torch.equal(run.query(site.layer), query) and torch.equal(run.key(site.layer), key)


class _Count:
    def __init__(self):
        self.batches = 0

    def update(self, batch) -> None:
        self.batches += 1


def test_a_pinned_qk_source_refuses_a_batch_below_float32_before_any_sink_sees_it():
    """What a run file states (pin_mode_source) stays true: a bfloat16 autocast batch on layers pinned "qk" is
    refused naming the layer and dtype, nothing reaches the sinks; a float32 batch passes."""
    model, images = _vit(), _images()
    sink = _Count()
    with qkhooks.record(model, modes=4, sinks=[sink]) as run, torch.no_grad():
        assert run.pin_mode_source() == {0: "qk", 1: "qk"}
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(QKHooksError, match="layer 0 .*bfloat16"):
            model(images)
        assert sink.batches == 0 and run.last is None
        model(images)
        assert sink.batches == 1 and run.mode_source == {0: "qk", 1: "qk"}


def test_record_dataset_under_autocast_states_x_in_the_run_file(tmp_path):
    """record_dataset wrapped in bfloat16 autocast: the run file says every layer's maps came from x (the old code
    stated "qk" and took q/k in bfloat16); without autocast it says "qk"."""
    model = qkhooks.load_model(_vit())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        record_dataset(model, "samples", tmp_path / "autocast.h5", modes=4, limit=2, batch_size=2, reducers=[],
                       progress=False)
    record_dataset(model, "samples", tmp_path / "plain.h5", modes=4, limit=2, batch_size=2, reducers=[], progress=False)
    with qkhooks.open_run(tmp_path / "autocast.h5") as autocast, qkhooks.open_run(tmp_path / "plain.h5") as plain:
        assert autocast.mode_source == {0: "x", 1: "x"} and plain.mode_source == {0: "qk", 1: "qk"}


# ------------------------------------------------------------------------------------- weights inside record()
@pytest.mark.parametrize("qk_path", [True, False])
def test_a_checkpoint_loaded_inside_record_is_refused_at_the_next_forward(qk_path):
    """load_state_dict of other weights between two forwards of one context (the q/k path's maps were off by 1.26,
    run.spectrum stayed the old one on both paths): the next forward is refused naming layer 0 and the fix; the
    first batch stays the last one."""
    model, other, images = _vit(0), _vit(1), _images()
    with qkhooks.record(model, modes=4, qk_path=qk_path) as run, torch.no_grad():
        model(images)
        model.load_state_dict(other.state_dict())
        with pytest.raises(QKHooksError, match=r"layer 0 \(blocks.0.attn\): its weights changed inside this record\(\)"
                                               r".*Enter record\(\) per batch"):
            model(images)
        assert run.images_seen == 2
    with qkhooks.record(model, modes=4, qk_path=qk_path) as fresh, torch.no_grad():  # a new context: the new weights
        model(images)
    assert torch.allclose(torch.as_tensor(fresh.spectrum(1).U), qkhooks.spectrum(other)[1].top(4).U)


def test_an_optimiser_step_inside_record_is_refused_at_the_next_forward():
    """One SGD step between forwards (the q/k path drifted 2.6e-4 from x·u_n of the recorded spectrum): refused."""
    model, images = _vit(), _images(4)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    with qkhooks.record(model, modes="all") as run:
        model(images).square().mean().backward()
        optimiser.step()
        with pytest.raises(QKHooksError, match="weights changed inside this record"):
            model(images)
        assert run.images_seen == 4


def test_forwards_that_change_no_weights_are_not_refused_and_match_a_fresh_recording():
    """Several batches with grad and no_grad, eval/train toggles, requires_grad toggled and a backward without a
    step: no refusal, and the last batch's maps equal a fresh recording's of the same images."""
    model, images = _vit(), _images()
    sink = _Count()
    with qkhooks.record(model, modes=4, sinks=[sink]) as run:
        model(images).sum().backward()
        with torch.no_grad():
            model.train()
            model(images)
            model.eval()
            model.requires_grad_(False)
            model(images)
        model.requires_grad_(True)
        model(images)
    assert sink.batches == 4
    with qkhooks.record(model, modes=4) as fresh, torch.no_grad():
        model(images)
    for layer in run.layers:
        assert torch.equal(run.query(layer), fresh.query(layer)) and torch.equal(run.key(layer), fresh.key(layer))


def test_weights_without_a_version_counter_are_checked_by_their_fingerprint():
    """A model made in inference mode keeps no version counters: batches pass, and an in-place edit of W_q inside
    the context is refused, seen by the bit-for-bit compare with the copy taken at entry (a fingerprint W·r until
    round 22)."""
    with torch.inference_mode():
        model, images = _vit(), _images()
        with qkhooks.record(model, modes=4) as run:
            model(images)
            model(images)
            model.blocks[1].attn.qkv.weight[:16].mul_(1.5)
            with pytest.raises(QKHooksError, match=r"layer 1 \(blocks.1.attn\): its weights changed"):
                model(images)
    assert run.images_seen == 4
