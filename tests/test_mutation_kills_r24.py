"""Kill tests for the mutants of round 23's functions that its own tests let survive (module "round24" of
tests/mutation.py, ``--only ROUND23``; tests/MUTATION.md's round-24 section names each); each checks a behaviour
against an independent reference (h5py's own reading of the file, numpy, the whole message a user reads)."""

from __future__ import annotations

import json
import os
import resource

import h5py
import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from qkhooks.readings import (BOOTSTRAP, MIN_UNITS, _resamples, compare_reading, intervals, layer_intervals,
                              pair_pivots, trend_reading)
from qkhooks.store import RunWriter, open_run, repair
from qkhooks.store import writer as writer_module
from qkhooks.store.writer import FREE_MARGIN_BYTES

from test_foreign_hooks_refused import _images, _model
from test_mutation_kills_r23 import _reference_bootstrap_t
from test_readings_clipped_intervals import _pair_mean
from test_store_write_failures import WIDTH, _values
from test_torch_tooling_refused import _quantised

LIMIT_FIX = ("raise the limit on file size (`ulimit -f`; where the file system has a largest file, such as FAT32's 4 "
             "GiB, write the run to another)")


# ------------------------------------------------------------------------------------ store/writer.py: ulimit -f
class _FileSizeLimit:
    """Stands in for the ``resource`` module the writer reads RLIMIT_FSIZE from: the check before a batch sees
    ``limit`` (RLIM_INFINITY: none). The process's own limit is not touched."""

    RLIMIT_FSIZE, RLIM_INFINITY = resource.RLIMIT_FSIZE, resource.RLIM_INFINITY

    def __init__(self, limit: int):
        self.limit = limit

    def getrlimit(self, what: int) -> tuple[int, int]:
        assert what == resource.RLIMIT_FSIZE
        return self.limit, resource.RLIM_INFINITY


def test_a_file_size_limit_the_check_sees_refuses_the_batch_that_would_pass_it_and_takes_one_that_reaches_it(
        tmp_path, monkeypatch):
    """The check before a batch (no child process here, so mutants of the writer run): a batch whose chunks and the
    free-space margin would end the file past the limit is refused before HDF5 writes any of it, with the committed
    count and the fix; one that ends exactly at the limit is written. The file closes whole and reads its images."""
    out = tmp_path / "run.h5"
    w = RunWriter(out, dtype="float32", chunk_images=1)
    w.write_batch(["i0", "i1"], {"v": _values(0, 2)})
    w.flush()
    batch_bytes = FREE_MARGIN_BYTES + 2 * WIDTH * 4  # two one-image chunks of float32 and the margin
    monkeypatch.setattr(writer_module, "resource", _FileSizeLimit(os.path.getsize(out) + batch_bytes))
    w.write_batch(["i2", "i3"], {"v": _values(2, 4)})  # ends at the limit: taken
    w.flush()
    monkeypatch.setattr(writer_module, "resource", _FileSizeLimit(os.path.getsize(out) + batch_bytes - 1))
    w.write_batch(["i4", "i5"], {"v": _values(4, 6)})
    with pytest.raises(QKHooksError) as stopped:
        w.flush()
    assert str(stopped.value) == ("file size limit reached while writing run.h5: 4 images are committed and safe; "
                                  f"{LIMIT_FIX} and run the same command with --resume")
    assert isinstance(stopped.value.__cause__, OSError) and stopped.value.__cause__.errno == 27  # EFBIG
    w.close(complete=False)
    with open_run(out) as run:
        assert run.ids == ["i0", "i1", "i2", "i3"] and not run.complete
        np.testing.assert_array_equal(run.array("v")[:], _values(0, 4))


def test_a_file_size_limit_met_inside_hdf5_in_this_process_names_the_damage_and_repair_recovers_it(tmp_path,
                                                                                                 monkeypatch):
    """test_store_write_failures's child process, in this process (a mutant of the writer runs only here): the check
    before a batch does not see the limit (as for FAT32's largest file), HDF5 meets it (EFBIG), and closing leaves
    the file shorter than its superblock says; the message says so, with the committed count repair recovers."""
    out = tmp_path / "run.h5"
    monkeypatch.setattr(writer_module, "resource", _FileSizeLimit(resource.RLIM_INFINITY))
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, before[1]))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        w = RunWriter(out, dtype="float32", chunk_images=1)
        with pytest.raises(QKHooksError) as stopped:
            for i in range(64):  # 64 KiB an image: the limit is met at about 47
                w.write_batch([f"i{i}"], {"v": _values(i, i + 1)})
                w.flush()
        w.close(complete=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
    said = str(stopped.value)
    size = os.path.getsize(out)
    with open(out, "rb") as fh:  # the superblock's end-of-file address (version 2/3: after 4 addresses of 8 bytes)
        head = fh.read(48)
    end_of_file = int.from_bytes(head[28:36], "little")
    n = w.committed
    assert said == (f"file size limit reached while writing run.h5, and closing it left it truncated at {size} of "
                    f"{end_of_file} bytes: its {n} committed images are recoverable: {LIMIT_FIX}, run `qkhooks repair "
                    f"{out} --out FIXED.h5` and resume that (the same command with --out FIXED.h5 --resume)")
    assert size == 3 << 20 < end_of_file and 10 < n < 48
    report = repair(out, tmp_path / "fixed.h5")
    assert report.recovered == [f"i{i}" for i in range(n)]


# ------------------------------------------------------------------------------------ readings.py
def test_a_trend_of_one_layer_says_there_is_nothing_to_test():
    reading = trend_reading(np.arange(12.0).reshape(12, 1), [5], "the cosine", "images")
    assert (reading.text, reading.verdict, reading.estimates) == ("the cosine: 1 layer, no trend to test.", "too_few", {})


def test_a_trend_of_two_layers_is_the_last_minus_the_first_per_unit_with_its_interval():
    """Two layers: no inner layer to bend at; the reading is late − early alone, its estimate the per-unit difference's
    mean (numpy) with the interval intervals() gives that difference (the readings' own tests check intervals)."""
    rng = np.random.default_rng(3)
    x = np.column_stack([rng.normal(0.2, 0.05, 12), rng.normal(0.5, 0.05, 12)])
    reading = trend_reading(x, [0, 11], "the cosine", "images")
    diff = reading.estimates["late_minus_early"]
    assert list(reading.estimates) == ["late_minus_early"] and reading.verdict == "rises"
    assert diff == intervals((x[:, 1] - x[:, 0])[:, None], limits=(-np.inf, np.inf))[0]
    assert diff.value == pytest.approx(np.mean(x[:, 1] - x[:, 0]), abs=1e-12)
    assert reading.text == (f"the cosine rises with depth, from {x[:, 0].mean():.3f} in the first third of the layers "
                            f"to {x[:, 1].mean():.3f} in the last third (late − early {diff.text()}, 12 images).")


@pytest.mark.parametrize("direction", ["falls", "rises"])
def test_a_steady_trend_is_not_said_to_bend_back_at_its_inner_extreme(direction):
    """A curve that falls (rises) layer after layer: its inner maximum (minimum) is the first inner layer, and the last
    layer lies clearly below (above) it, as any steady fall (rise) has it; that is the trend, not a bend back."""
    rng = np.random.default_rng(4)
    step = -0.1 if direction == "falls" else 0.1
    x = 0.5 + step * np.arange(5) + rng.normal(0, 0.01, (12, 5))
    reading = trend_reading(x, range(5), "the cosine", "images")
    diff = reading.estimates["late_minus_early"]
    assert reading.verdict == direction and list(reading.estimates) == ["late_minus_early"]
    assert reading.text == (f"the cosine {direction} with depth, from {x[:, 0].mean():.3f} in the first third of the "
                            f"layers to {x[:, 4].mean():.3f} in the last third (late − early {diff.text()}, 12 images; "
                            "intervals adjusted for 4 comparisons: the trend and the last layer against each inner "
                            "layer).")


# ------------------------------------------------------------------------------------ store/writer.py: the layout
def test_a_float16_run_stores_every_floating_array_as_float16_and_integer_arrays_as_they_are(tmp_path):
    """The run's dtype is its floating arrays' storage, whatever float the batch hands over (float32 tensors'
    values, float64 numpy); integer arrays (masks, labels) keep their own dtype. h5py reads the stored types."""
    out = tmp_path / "run.h5"
    v32, v64 = _values(0, 2)[:, :4] + 0.1, np.linspace(0, 1, 8).reshape(2, 4)
    labels = np.array([[1, 2], [3, 4]], dtype=np.int32)
    with RunWriter(out, dtype="float16") as w:
        w.write_batch(["i0", "i1"], {"a": v32, "b": v64, "labels": labels})
    with h5py.File(out, "r") as f:
        assert (f["a"].dtype, f["b"].dtype, f["labels"].dtype) == (np.float16, np.float16, np.int32)
        np.testing.assert_array_equal(f["a"][:], v32.astype(np.float16))
        np.testing.assert_array_equal(f["b"][:], v64.astype(np.float16))
        np.testing.assert_array_equal(f["labels"][:], labels)


def test_an_array_that_appears_when_a_run_of_ids_only_is_resumed_is_refused_whole_and_its_images_stay(tmp_path):
    """A run whose batches had no array (ids only) leaves its resume no array names to check a batch against before
    it is queued: the writer thread refuses the new array, and the committed images stay as they were."""
    out = tmp_path / "run.h5"
    w = RunWriter(out, dtype="float32")
    w.write_batch(["i0"], {})
    w.close(complete=False)
    w = RunWriter(out, mode="resume", dtype="float32")
    w.write_batch(["i1"], {"v": _values(1, 2)})
    with pytest.raises(QKHooksError) as refused:
        w.flush()
    assert str(refused.value) == (f"writing {out} failed: v appears after the run's first batch, which did not have it; "
                                  "every batch needs the same arrays.")
    w.close(complete=False)
    with open_run(out) as run:
        assert run.ids == ["i0"] and not run.complete


def test_a_static_written_again_with_its_shape_holds_the_last_value_before_and_after_the_layout(tmp_path):
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_static("meta/scale", np.array([1.0, 2.0]))
        w.write_static("meta/scale", np.array([3.0, 4.0]))  # before the first batch
        w.write_static("meta/offset", np.array(1.5))
        w.write_batch(["i0"], {"v": _values(0, 1)})
        w.write_static("meta/offset", np.array(2.5))  # after it: in place, the layout fixed
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["meta/scale"][()], [3.0, 4.0])
        assert f["meta/offset"][()] == 2.5


# ------------------------------------------------------------------------------------ readings.py: pair pivots
def test_pair_pivots_of_few_images_give_no_t_where_a_resample_draws_fewer_than_3_of_them():
    """At MIN_UNITS images some resamples draw only one or two of them (~2% of 2,000): no jackknife there, so no t*
    (NaN, as extreme as any); every other resample's t* is (U* - U) / se* written out by loops over its draws."""
    rng = np.random.default_rng(6)
    z = rng.normal(size=(MIN_UNITS, 1, 3)) + [1.0, 0.0, 0.0]
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    p = pair_pivots(z)
    u = ((z[:, 0] @ z[:, 0].T).sum() - MIN_UNITS) / (MIN_UNITS * (MIN_UNITS - 1))
    rows = _resamples(MIN_UNITS, BOOTSTRAP, 0).astype(int)
    few = (rows > 0).sum(1) < 3
    assert few.sum() > 10
    assert np.isnan(p.t[few, 0]).all()
    for b in np.flatnonzero(~few):
        mean, se = _pair_mean(z[:, 0], np.repeat(np.arange(MIN_UNITS), rows[b]))
        assert p.t[b, 0] == pytest.approx((mean - u) / se, rel=1e-6, abs=1e-9)


def test_pair_pivots_of_images_all_alike_have_no_spread_and_no_shift():
    """Every centre embedding the same direction: the baseline is 1 on every resample, with no spread (se* = 0) and
    no shift, so t* is 0 (not the ±inf of a shift without spread), NaN only where fewer than 3 images are drawn."""
    z = np.tile([[[0.5, 0.5, 0.5, 0.5]]], (8, 1, 1))  # dot products of exactly 1: no rounding makes a spread
    p = pair_pivots(z)
    few = (_resamples(8, BOOTSTRAP, 0) > 0).sum(1) < 3
    assert p.value[0] == pytest.approx(1.0) and p.se[0] == pytest.approx(0.0, abs=1e-7)
    assert (p.t[~few, 0] == 0).all() and np.isnan(p.t[few, 0]).all()


# ------------------------------------------------------------------------------------ readings.py: intervals
def test_intervals_at_another_level_say_their_level():
    x = np.random.default_rng(9).normal(0.3, 0.2, (20, 2))
    est = intervals(x, level=0.9)
    assert [e.level for e in est] == [0.9, 0.9] and est[0].text().startswith(f"{x[:, 0].mean():+.3f}, 90% CI ")


@pytest.mark.parametrize("simultaneous", [True, False])
def test_a_column_with_few_values_among_many_units_gets_a_finite_interval_from_its_rare_empty_resamples(simultaneous):
    """7 values among 20 units: a few resamples draw fewer than 2 of them (no t*, as extreme as any), too few to move
    the 97.5% critical value: the interval is finite, equal to bootstrap-t written out resample by resample."""
    rng = np.random.default_rng(10)
    x = np.column_stack([rng.normal(0.4, 0.3, 20), np.where(np.arange(20) % 3 == 0, rng.normal(0.2, 0.3, 20), np.nan)])
    assert np.isfinite(x[:, 1]).sum() == 7
    mean, low, high, count = _reference_bootstrap_t(x, simultaneous)
    got = (np.array([[e.value, e.low, e.high, e.units] for e in intervals(x)]).T if simultaneous
           else np.array([*layer_intervals(x), count]))
    np.testing.assert_allclose(got, np.array([mean, low, high, count]), rtol=1e-9, atol=1e-12)
    assert np.isfinite(low).all() and np.isfinite(high).all()


def test_a_mean_outside_its_declared_range_is_refused_whole():
    with pytest.raises(QKHooksError) as refused:
        intervals(np.full((8, 2), 0.5) + [0.0, 0.7], limits=(-1.0, 1.0))
    assert str(refused.value) == ("column 1's mean +1.2 lies outside its declared range [-1, +1]: declare the range the "
                                  "statistic's definition gives (limits=), or check the samples.")


def test_a_range_that_excludes_0_is_refused_whole():
    with pytest.raises(QKHooksError) as refused:
        intervals(np.full((8, 2), 0.5), limits=([-1.0, 0.2], [1.0, 0.9]))
    assert str(refused.value) == ("column 1's range [+0.2, +0.9] excludes 0, the value every interval is tested against: "
                                  "the value compared with lies outside the statistic's range.")


# ------------------------------------------------------------------------------------ readings.py: comparisons
def test_a_curve_above_another_at_every_layer_names_the_layer_of_the_smallest_difference():
    rng = np.random.default_rng(7)
    x = rng.normal(0.0, 0.02, (12, 4)) + [0.9, 0.5, 0.2, 0.6]  # smallest above chance at the third layer
    reading = compare_reading(x, 0.0, [0, 1, 2, 3], "the probability", "chance", "heads")
    small = reading.estimates["L2"]
    assert reading.verdict == "above" and small.value == pytest.approx(x[:, 2].mean(), abs=1e-12)
    assert reading.text == (f"the probability is above chance at every layer (smallest difference at L2: {small.text()}; "
                            "12 heads; intervals adjusted for 4 layers).")


def test_a_comparison_of_too_few_units_keeps_every_layers_mean_without_an_interval():
    """Below MIN_UNITS no interval is drawn, but each layer's estimate is still the mean difference (numpy's)."""
    x = np.random.default_rng(8).normal(0.5, 0.1, (MIN_UNITS - 2, 3))
    reading = compare_reading(x, 0.1, [4, 5, 6], "the probability", "chance", "heads")
    assert reading.verdict == "too_few" and list(reading.estimates) == ["L4", "L5", "L6"]
    for layer, e in zip((4, 5, 6), reading.estimates.values()):
        assert e.value == pytest.approx(x[:, layer - 4].mean() - 0.1, abs=1e-12)
        assert e.units == MIN_UNITS - 2 and np.isnan(e.low) and np.isnan(e.high)


# ------------------------------------------------------------------------------------ store/lock.py
def test_a_second_writer_is_refused_naming_the_writer_its_lock_file_names(tmp_path):
    """The refusal quotes the lock file's note (read here as JSON: pid, host, since) and says what to do."""
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32"):
        with open(f"{out}.lock", "rb") as fh:
            note = json.loads(fh.readline())
        with pytest.raises(QKHooksError) as refused:
            RunWriter(out, mode="resume", dtype="float32")
    assert note["pid"] == os.getpid()  # the same process: the refusal says so, not "another process"
    assert str(refused.value) == (f"{out} is being written by this process (pid {note['pid']} on {note['host']}, "
                                  f"since {note['since']}): another writer in it (a RunWriter, record_dataset) has the "
                                  "run open; close that one first (leave its with block or call its close()), then open "
                                  "the run again.")


def test_a_symlink_to_nothing_as_the_output_is_refused_whole(tmp_path):
    link, target = tmp_path / "link.h5", tmp_path / "sub" / "run.h5"
    link.symlink_to(target)
    with pytest.raises(QKHooksError) as refused:
        RunWriter(link)
    assert str(refused.value) == (f"{link} is a symlink to {target}, which does not exist; writing would replace the "
                                  f"link by a new file and never create {target}. Give {target} as the output (or "
                                  "remove the link).")
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link.h5"]


# ------------------------------------------------------------------------------------ capture.py
def test_a_batch_handed_to_a_sink_carries_the_spectrum_its_modes_were_projected_on():
    """A sink reads a batch's modes against their spectrum (batch.spectrum(layer)): the model's own, as
    qkhooks.spectrum computes it apart from any recording."""
    model, images = _model("timm"), _images()

    class Keep:
        def __init__(self):
            self.batches = []

        def update(self, batch):
            self.batches.append(batch)

    sink = Keep()
    with qkhooks.record(model, modes=4, sinks=[sink]), torch.no_grad():
        model(images)
    (batch,) = sink.batches
    reference = qkhooks.spectrum(model)
    for layer in (0, 1):
        torch.testing.assert_close(batch.spectrum(layer).S, reference[layer].S[:, :4], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(batch.spectrum(layer).U, reference[layer].U[:, :, :4], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ models/unsupported.py
def _pass_through_forward(module: torch.nn.Module):
    """A forward set on the instance that calls the class's own (as baukit or a patch would put one there)."""
    own = module.forward

    def patched_forward(*args, **kwargs):
        return own(*args, **kwargs)

    return patched_forward


def test_an_attention_module_whose_forward_is_replaced_is_refused_whole_naming_it_and_its_class_forward():
    model = _model("timm")
    attn = model.blocks[1].attn
    attn.forward = _pass_through_forward(attn)
    with pytest.raises(QKHooksError) as refused:
        qkhooks.record(model, modes=4)
    forward = f"{__name__}._pass_through_forward.<locals>.patched_forward"
    assert str(refused.value) == (
        f"unsupported attention in 'blocks.1.attn' (Attention): its forward is replaced on the instance (module.forward "
        f"= {forward}: baukit, an nnsight-style tracer or a patch), while qkhooks rebuilds the maps as "
        f"{type(attn).__module__}.Attention.forward computes them, so the maps, modes and spectrum would describe the "
        "class's forward, not what the model runs. To record it, restore the class's forward while recording "
        "(accelerate: remove_hook_from_module, or load without offloading the weights; otherwise del module.forward or "
        "the tool's own way to undo its patch).")


COMPILED_WHY = ("the compiled graph runs the hooks qkhooks reads q, k and the tokens with only while it is traced, or not "
                "at all, so the recording would be empty or stale without a word. To record it, ")


@pytest.mark.parametrize("how", ["model.compile", "wrapper in place"])
def test_a_compiled_model_is_refused_whole_with_the_fix_for_how_it_was_compiled(how):
    """Nothing is run (refused at entry), so the eager backend compiles nothing here."""
    model = _model("timm")
    if how == "model.compile":
        model.compile(backend="eager")
        says = ("the model (VisionTransformer) is compiled by torch.compile (module.compile()) where qkhooks hooks the "
                "attention: " + COMPILED_WHY + "record the model uncompiled (load or build it again without .compile(); "
                "compile only what runs without qkhooks, such as the head).")
    else:
        model.blocks[1].attn = torch.compile(model.blocks[1].attn, backend="eager")
        says = ("'blocks.1.attn' (OptimizedModule) is compiled by torch.compile (a compiled wrapper) where qkhooks hooks "
                "the attention: " + COMPILED_WHY
                + "record model.blocks.1.attn._orig_mod and run that module itself (the wrapper runs the compiled graph "
                "around it).")
    with pytest.raises(QKHooksError) as refused:
        qkhooks.record(model, modes=4)
    assert str(refused.value) == says


def test_a_quantised_q_k_layer_is_refused_whole_naming_its_class_and_the_fix():
    model = _quantised("timm")
    with pytest.raises(QKHooksError) as refused:
        qkhooks.record(model, modes=4)
    cls = type(model.blocks[0].attn.qkv)
    assert str(refused.value) == (
        f"'blocks.0.attn.qkv' (Linear) is a quantised layer ({cls.__module__}.{cls.__qualname__}, from "
        "torch.ao.quantization.quantize_dynamic or convert) in an attention layer: it computes with integer weights, so "
        "there are no float W_q/W_k whose products the model computes. Record the float model (before quantising it), "
        "or quantise only layers outside the attention (the head, the MLPs: those are taken).")


# ------------------------------------------------------------------------------------ store/writer.py: out of room
@pytest.mark.parametrize("room", ["disk", "size"])
def test_running_out_of_room_while_overwriting_before_the_first_checkpoint_keeps_the_old_run_and_says_so(
        tmp_path, monkeypatch, room):
    """The new run is written beside the old one until its first checkpoint: a full disk (or a file size limit) then
    leaves the old run whole, and the message says so (not --resume: there is nothing of the new run to resume)."""
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["old0", "old1"], {"v": _values(0, 2)})
    w = RunWriter(out, mode="overwrite", dtype="float32")
    w.write_batch(["new0"], {"v": _values(5, 6)})
    w.flush()
    if room == "disk":
        monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda path: type("Full", (), {"free": 1000})())
        what, fix = "disk full", "free space"
    else:
        monkeypatch.setattr(writer_module, "resource", _FileSizeLimit(os.path.getsize(f"{out}.creating")))
        what, fix = "file size limit reached", LIMIT_FIX
    w.write_batch(["new1"], {"v": _values(6, 7)})
    with pytest.raises(QKHooksError) as stopped:
        w.flush()
    assert str(stopped.value) == (f"{what} while writing the new run beside run.h5, before its first checkpoint: run.h5 "
                                  f"keeps the old run, unchanged; {fix} and run the same command (with --overwrite) "
                                  "again")
    w.close(complete=False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]  # the new run's file is gone
    with open_run(out) as run:
        assert run.ids == ["old0", "old1"] and run.complete
        np.testing.assert_array_equal(run.array("v")[:], _values(0, 2))
