"""Kill tests for the mutants of round 22's functions that its own tests let survive (module "round22" of
tests/mutation.py); each checks a behaviour against an independent reference."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from qkhooks.readings import MIN_UNITS, intervals, layer_intervals, trend_reading
from qkhooks.store import RunWriter, open_run
from qkhooks.store import format as fmt
from qkhooks.store import reader as reader_module
from qkhooks.stream import record_dataset

from test_wrapped_qk_layers_and_half_precision import PeftLoraLinear, _timm_vit
from test_foreign_hooks_refused import Quantised, _accelerate, steer_input, steer_output
from test_store_damaged_resume_and_retries import IDS, clock  # noqa: F401 (clock: a fixture)
from test_inference_mode_weights_check import DK, H, _vit
from test_zoo import perturb
from test_newcomer_messages import run_path, tiny_vit  # noqa: F401 (run_path: a fixture, a 3-image run of a 2-block ViT)




# ------------------------------------------------------------------------------------ models/unsupported.py
@pytest.mark.parametrize("where", ["blocks.1.attn.qkv", ""])
def test_a_model_offloaded_by_accelerate_is_refused_naming_the_offloading_module(where):
    """Weights on the meta device with an offloading accelerate hook (here alone, or inside a SequentialHook on the
    model itself): the refusal names the module the hook is on, not an earlier module whose hook keeps its weights
    (offload=False), nor one without a hook; without an offloading hook, the refusal is the plain meta one."""
    hooks = _accelerate("stand-in")
    model = _timm_vit()
    hooks.add_hook_to_module(model.blocks[0].attn.qkv, hooks.AlignDevicesHook(execution_device="cpu"))
    model.blocks[1].attn.qkv.to("meta")
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=2)
    assert "has no weights" in str(err.value) and "offload" not in str(err.value), str(err.value)
    offloading = hooks.AlignDevicesHook(execution_device="cpu", offload=True)
    hooks.add_hook_to_module(model.get_submodule(where), offloading if where else hooks.SequentialHook(
        hooks.AlignDevicesHook(execution_device="cpu"), offloading))
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=2)
    assert str(err.value).startswith(
        f"VisionTransformer's weights are offloaded by accelerate (the hook on {where or '(model)'!r} has offload=True): "
        "between calls they sit on the 'meta' device (e.g. blocks.1.attn.qkv.weight), so there are no weights to read. "
        "To record it, load it without offloading"), str(err.value)


def test_a_maps_only_layer_is_not_checked_for_a_forward_replaced_on_the_instance():
    """A layer whose maps are taken in the module's own forward (EfficientViT-MSRA's cascaded heads) reads no
    weights: a pass-through forward set on its instance is taken, with the maps and outputs of the plain model."""
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("efficientvit_m0", pretrained=False, img_size=64, window_size=(4, 4, 4))).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as plain:
        plain_out = model(images)
    site = qkhooks.sites(model)[0]
    assert site.observes_maps()
    site.module.forward = functools.partial(type(site.module).forward, site.module)
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as patched:
        out = model(images)
    assert torch.equal(out, plain_out) and patched.layers == plain.layers
    for layer in plain.layers:
        assert torch.equal(patched.attention(layer, "full"), plain.attention(layer, "full"))


def test_a_lora_layer_after_a_maps_only_layer_is_refused():
    """GCViT's global blocks are maps-only (nothing read off their q/k to check); the local block after one still
    is checked: a LoRA around its qkv is refused naming it."""
    import timm

    model = timm.create_model("gcvit_xxtiny", pretrained=False, img_size=64).eval()
    assert model.stages[0].blocks[1].attn.use_global
    block = model.stages[1].blocks[0].attn
    block.qkv = PeftLoraLinear(block.qkv)
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model)
    assert "W_q/W_k are read off 'stages.1.blocks.0.attn.qkv" in str(err.value), str(err.value)
    assert "merge_and_unload()" in str(err.value), str(err.value)


def test_efficientformer_v2s_downsampling_query_is_taken_its_local_conv_outside_what_is_read():
    """EfficientFormer-v2's downsampling attention makes q with LocalGlobalQuery (a local conv and a pool, then the
    ConvNorm W_q is read off): only the modules owning what is read must have all their parameters read, so every
    attention module of the model is a site, that one included, with its q read off q.proj."""
    import timm

    model = timm.create_model("efficientformerv2_s0", pretrained=False).eval()
    attentions = [name for name, m in model.named_modules() if type(m).__name__ in ("Attention2d", "Attention2dDownsample")]
    sites = qkhooks.sites(model)
    assert [s.path for s in sites] == attentions and "stages.3.downsample.attn" in attentions
    scope = dict(next(s for s in sites if s.path == "stages.3.downsample.attn").qk_scope)
    assert scope["q"] is False and scope["q.proj.conv"] is True and "q.local" not in scope


class MagnitudeLinear(torch.nn.Linear):
    """Linear's own forward, with a parameter beside the weight (as a DoRA magnitude or a quantisation scale)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features)
        self.load_state_dict(linear.state_dict())
        self.magnitude = torch.nn.Parameter(torch.ones(linear.out_features))


def test_a_q_k_layer_with_a_parameter_not_read_is_refused_whole_naming_its_class():
    model = _timm_vit()
    model.blocks[1].attn.qkv = MagnitudeLinear(model.blocks[1].attn.qkv)
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model)
    assert str(err.value) == (
        "unsupported attention in 'blocks.1.attn' (Attention): W_q/W_k are read off 'blocks.1.attn.qkv' "
        f"({__name__}.MagnitudeLinear), which also computes with 'magnitude', parameters W_q/W_k are not read from, "
        "so the spectrum, modes and maps would describe the bare weights, not what the model computes. To record it, "
        "merge the adapter into the weights first (peft: model = model.merge_and_unload(), then record that model), "
        "or record the model without the wrapper.")


_REFUSED = ("so the spectrum, modes and maps would describe the bare weights, not what the model computes. To record "
            "it, remove it while recording (handle.remove() on the handle its registration returned) and put it back "
            "after, or record first and steer after.")


def test_a_forward_hook_on_the_qkv_layer_is_refused_whole():
    model = _timm_vit()
    handle = model.blocks[1].attn.qkv.register_forward_hook(steer_output)
    try:
        with pytest.raises(QKHooksError) as err:
            qkhooks.record(model, modes=2)
    finally:
        handle.remove()
    assert str(err.value) == (
        "unsupported attention in 'blocks.1.attn' (Attention): W_q/W_k are read off 'blocks.1.attn.qkv' "
        "(torch.nn.modules.linear.Linear), which carries a forward hook someone else registered "
        f"({steer_output.__module__}.steer_output): it can change what the layer hands on as q or k (a steering hook) "
        f"while the weights read stay the same, {_REFUSED}")


@pytest.mark.parametrize("which", ["forward hook", "forward pre-hook"])
def test_a_global_hook_is_refused_whole_naming_the_first_recorded_q_k_layer(which):
    model = _timm_vit()
    module = torch.nn.modules.module
    hook, register = ((steer_output, module.register_module_forward_hook) if which == "forward hook"
                      else (steer_input, module.register_module_forward_pre_hook))
    handle = register(hook)
    try:
        with pytest.raises(QKHooksError) as err:
            qkhooks.record(model, modes=2, layers=[1])
    finally:
        handle.remove()
    registered = "register_module_forward_hook" if which == "forward hook" else "register_module_forward_pre_hook"
    assert str(err.value) == (
        f"unsupported attention in 'blocks.1.attn' (Attention): a global {which} ({hook.__module__}.{hook.__name__}, "
        f"registered with torch.nn.modules.module.{registered}) runs on every module, 'blocks.1.attn.qkv' among them, "
        f"and can change q or k while the weights read stay the same, {_REFUSED}")


def test_a_bias_that_is_a_tensor_subclass_is_refused_whole():
    model = _timm_vit()
    qkv = model.blocks[0].attn.qkv
    qkv.bias = torch.nn.Parameter(qkv.bias.detach().as_subclass(Quantised), requires_grad=False)
    with pytest.raises(QKHooksError) as err:
        qkhooks.record(model, modes=2)
    assert str(err.value) == (
        "unsupported attention in 'blocks.0.attn' (Attention): W_q/W_k are read off 'blocks.0.attn.qkv' "
        f"(torch.nn.modules.linear.Linear), whose 'bias' is a {Quantised.__module__}.Quantised (a torch.Tensor subclass, "
        "as quantised weights are): its forward computes with the subclass's arithmetic, not with the values read, so "
        "the spectrum, modes and maps would describe the bare weights, not what the model computes. To record it, "
        "record the float model (load it unquantised, or turn the weight into a plain tensor first).")


# ---------------------------------------------------------------------------------------------------- spectrum.py
def test_the_spectrum_of_inference_mode_weights_follows_a_bias_dropped():
    """Weights made in inference mode keep no version counter, so the cache tells them apart by the copy alone: a
    q/k bias dropped (one tensor read where two were) is other weights. The augmented spectrum after it equals the
    SVD of W_q^T W_k per head (numpy), the augmented form's bias row and column being zero."""
    with torch.inference_mode():
        model = _vit()
        model.blocks[0].attn.qkv.bias.copy_(torch.randn(3 * H * DK, generator=torch.Generator().manual_seed(2)))
        before = qkhooks.spectrum(model, augmented=True)[0]
        model.blocks[0].attn.qkv.bias = None
        after = qkhooks.spectrum(model, augmented=True)[0]
    w = model.blocks[0].attn.qkv.weight.detach().double().numpy()
    w_q, w_k = w[:H * DK].reshape(H, DK, -1), w[H * DK:2 * H * DK].reshape(H, DK, -1)
    expected = np.stack([np.linalg.svd(w_q[h].T @ w_k[h], compute_uv=False)[:DK] for h in range(H)])
    np.testing.assert_allclose(after.S[:, :DK].double().numpy(), expected, rtol=1e-5, atol=1e-7 * expected.max())
    assert not np.allclose(before.S[:, :DK].double().numpy(), expected, rtol=1e-3)  # the bias made a difference


def test_a_recording_with_a_given_spectrum_takes_the_weights_of_now_not_the_caches_older_copy():
    """Inference-mode weights edited after their spectrum was cached, then recorded with a spectrum handed in (no
    spectrum computed at entry, so the cache still holds the older copy): the recording compares its batches with the
    weights at entry, so it records, with the query modes of the same recording of a model made with those weights."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        edited, fresh = _vit(), _vit()
        given = qkhooks.spectrum(edited)
        for model in (edited, fresh):
            model.blocks[0].attn.qkv.weight[:16].mul_(1.5)
        with pytest.raises(QKHooksError, match=r"the spectrum given \(spectrum=\) is not that of this layer's"):
            qkhooks.record(edited, modes=4, spectrum=given)  # round 32: another weights' spectrum, refused unless said
        with qkhooks.record(edited, modes=4, spectrum=given, spectrum_of_other_weights=True) as run:
            edited(images)
        with qkhooks.record(fresh, modes=4, spectrum=given, spectrum_of_other_weights=True) as reference:
            fresh(images)
    assert run.images_seen == 2
    for layer in run.layers:
        assert torch.equal(run.query[layer], reference.query[layer])


# ------------------------------------------------------------------------------------------- store/reader.py
def test_an_unknown_state_is_refused_with_the_states_the_run_has_whole(run_path):
    with open_run(run_path) as run:
        have = run.states()
        with pytest.raises(QKHooksError) as err:
            run.state("topk")
    assert have and str(err.value) == (f"{run_path} holds no reducer state 'topk'; its states: {', '.join(sorted(have))} "
                                       "(run.states() lists them).")


def test_an_unknown_state_of_a_run_without_its_checkpoint_says_none_and_where_they_went(run_path, tmp_path):
    alone = tmp_path / "alone.h5"
    shutil.copy(run_path, alone)
    assert fmt.checkpoint_path(run_path).exists() and not fmt.checkpoint_path(alone).exists()
    with open_run(alone) as run:
        with pytest.raises(QKHooksError) as err:
            run.state("topk_modes")
    assert str(err.value).startswith(f"{alone} holds no reducer state 'topk_modes'; its states: none (run.states() lists "
                                     f"them). {fmt.checkpoint_path(alone).name} is missing: "), str(err.value)


def _closed_run(path: Path, images: int = 2) -> Path:
    with RunWriter(path, dtype="float32", chunk_images=2) as w:  # closed: read without SWMR, so a change is stale
        w.write_batch(IDS[:images], {"v": np.zeros((images, 8), np.float32)})
    return path


@pytest.mark.parametrize("change", ["replaced", "deleted", "changed"])
def test_a_file_changed_under_a_reader_is_refused_saying_how_whole(tmp_path, change):
    path = _closed_run(tmp_path / "run.h5")
    how = {"replaced": "was replaced by another file (an --overwrite or a copy)", "deleted": "was deleted or renamed",
           "changed": "was changed (a writer resumed or truncated it)"}[change]
    with open_run(path) as run:
        if change == "replaced":
            os.replace(_closed_run(tmp_path / "other.h5"), path)
        elif change == "deleted":
            path.unlink()
        else:
            os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
        with pytest.raises(QKHooksError) as err:
            run.refresh()
    assert str(err.value) == (f"{path} {how} since this reader opened it, so what it would read is stale; open it "
                              "again (qkhooks.open_run).")


def test_a_file_that_keeps_changing_while_it_opens_is_refused_whole(tmp_path, clock, monkeypatch):  # noqa: F811
    path = _closed_run(tmp_path / "run.h5")
    stamp, changes = reader_module._stamp, iter(range(10**6))
    monkeypatch.setattr(reader_module, "_stamp", lambda p: stamp(p)[:3] + (next(changes),))  # a new mtime each look
    with pytest.raises(QKHooksError) as err:
        open_run(path)
    assert str(err.value) == (f"{path} kept changing while it was being opened, for 3 s (a writer laying it out, "
                              "resuming, truncating or replacing it): open it again once that writer is past that step "
                              "(a resume's cut takes seconds).")


def test_an_integer_past_an_axis_of_an_array_outside_the_schema_names_the_axes_by_number(tmp_path):
    """An array the schema does not name (another tool's, or a windowed layer's extra axes): its axes after the
    images are called by number, in numpy's own words for the same key on the array read whole."""
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2) as w:
        w.write_batch(IDS[:2], {"v": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})
    with open_run(path) as run:
        v = run.array("v")
        whole = v[:]
        for key, axis in (((0, 0, 9), 2), ((1, -4), 1)):
            with pytest.raises(IndexError) as numpy_says:
                whole[key]
            with pytest.raises(IndexError) as ours:
                v[key]
            said = str(numpy_says.value)
            assert said == f"index {key[-1]} is out of bounds for axis {axis} with size {whole.shape[axis]}"
            assert str(ours.value) == (said.replace(f"axis {axis} with", f"axis {axis} (axis {axis}) with")
                                       + ": /v is images x axis 1 x axis 2 (2, 3, 4)."), str(ours.value)


# ---------------------------------------------------------------------------------------------- readings.py
@pytest.mark.parametrize("n", [1, MIN_UNITS - 1])
def test_too_few_units_state_the_chance_of_all_on_one_side_only_from_two_units_on(n):
    """n units of noise symmetric about zero all on one side: 2 / 2**n of data sets (said only where n >= 2)."""
    samples = np.random.default_rng(0).normal(size=(n, 4)) + np.arange(4)
    reading = trend_reading(samples, range(4), "x", "images")
    assert reading.verdict == "too_few"
    chance = f"{n} images all on one side of zero happen in {100 * 2 / 2 ** n:.3g}% of data sets"
    assert (chance in reading.text) == (n >= 2) and f"too few images ({n}) to tell" in reading.text, reading.text


def _reference_bootstrap_t(x: np.ndarray, simultaneous: bool, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Bootstrap-t intervals of the column means of (units, K) ``x`` written out resample by resample from the
    definition: the units drawn with replacement (the seeded draw readings documents), per column the drawn units with
    a value, t* = (mean* - mean) / (sd* / sqrt(k)), ±inf where the draw has no spread and the mean moved (0 where it
    did not), NaN (beyond any critical value) under 2 values; critical values the (1 ± level) / 2 order statistics
    of t* per column, or of its max / min over the columns with MIN_UNITS units; mean - c_high se to mean - c_low se."""
    n, cols = x.shape
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    mean = np.array([x[np.isfinite(x[:, j]), j].mean() if np.isfinite(x[:, j]).any() else np.nan for j in range(cols)])
    count = np.isfinite(x).sum(0)
    se = np.array([x[np.isfinite(x[:, j]), j].std(ddof=1) / np.sqrt(count[j]) if count[j] > 1 else np.nan
                   for j in range(cols)])
    t = np.full((n_boot, cols), np.nan)
    for b, draw in enumerate(draws):
        for j in range(cols):
            v = x[draw, j][np.isfinite(x[draw, j])]
            if len(v) < 2:
                continue
            shift, sd = v.mean() - mean[j], v.std(ddof=1)
            t[b, j] = shift / (sd / np.sqrt(len(v))) if sd > 0 else (0.0 if shift == 0 else np.sign(shift) * np.inf)
    tested = count >= MIN_UNITS
    hi, lo = np.where(np.isnan(t), np.inf, t)[:, tested], np.where(np.isnan(t), -np.inf, t)[:, tested]
    if simultaneous:
        hi, lo = hi.max(1, keepdims=True), lo.min(1, keepdims=True)
    alpha = (1 - level) / 2
    c_high = np.sort(hi, 0)[int(np.ceil((1 - alpha) * (n_boot - 1)))]  # the order statistic at or above the quantile
    c_low = np.sort(lo, 0)[int(np.floor(alpha * (n_boot - 1)))]
    low, high = np.full(cols, np.nan), np.full(cols, np.nan)
    with np.errstate(invalid="ignore"):
        low[tested] = np.nan_to_num(mean[tested] - c_high * se[tested], nan=-np.inf, neginf=-np.inf, posinf=np.inf)
        high[tested] = np.nan_to_num(mean[tested] - c_low * se[tested], nan=np.inf, neginf=-np.inf, posinf=np.inf)
    return mean, low, high, count


def _units_with_ties_and_gaps() -> np.ndarray:
    """(9, 5) units: a skewed column, a column of seven 0s and one 8 (a draw without the 8 has no spread and a
    moved mean: t* = -inf), a constant column (no spread anywhere), a column with 3 values only (untested), and a
    column shifted clear of zero; every value and mean exact in float64."""
    rng = np.random.default_rng(4)
    x = np.column_stack([rng.exponential(size=9) - 1, [0, 0, 0, 8, 0, 0, 0, 0, np.nan], np.full(9, 2.0),
                         [1, np.nan, 2, np.nan, np.nan, 3, np.nan, np.nan, np.nan], rng.normal(3, 1, 9)])
    return x


@pytest.mark.parametrize("simultaneous", [True, False])
def test_intervals_equal_bootstrap_t_written_out_resample_by_resample(simultaneous):
    x = _units_with_ties_and_gaps()
    mean, low, high, count = _reference_bootstrap_t(x, simultaneous)
    if simultaneous:
        est = intervals(x)
        got = np.array([[e.value, e.low, e.high, e.units] for e in est]).T
        assert all(e.level == 0.95 for e in est)
    else:
        got = np.array([*layer_intervals(x), count])
    np.testing.assert_allclose(got, np.array([mean, low, high, count]), rtol=1e-9, atol=1e-12)
    assert np.isnan(low[3]) and high[1] == np.inf and low[2] == 2.0 and low[4] > 0  # each case is there
