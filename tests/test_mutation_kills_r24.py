"""Kill tests for the mutants of round 23's functions that its own tests let survive (module "round24" of
tests/mutation.py, ``--only ROUND23``; tests/MUTATION.md's round-24 section names each); each checks a behaviour
against an independent reference (h5py's own reading of the file, numpy, the whole message a user reads)."""

from __future__ import annotations

import os
import resource

import h5py
import numpy as np
import pytest

from qkhooks.errors import QKHooksError
from qkhooks.readings import BOOTSTRAP, MIN_UNITS, _resamples, intervals, pair_pivots, trend_reading
from qkhooks.store import RunWriter, open_run, repair
from qkhooks.store import writer as writer_module
from qkhooks.store.writer import FREE_MARGIN_BYTES

from test_readings_r23 import _pair_mean
from test_store_safety_r23 import WIDTH, _values

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
    """test_store_safety_r23's child process, in this process (a mutant of the writer runs only here): the check
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
def test_a_checksummed_compressed_run_keeps_one_image_a_chunk_whatever_its_batches(tmp_path):
    """With a filter (here both) every chunk is one image, so no later batch re-encodes a chunk holding committed
    images (a kill inside that write would lose them); the filters are the ones asked for (h5py reads the layout)."""
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32", compression="gzip", checksum=True) as w:
        w.write_batch(["i0", "i1"], {"v": _values(0, 2)[:, :8]})
        w.write_batch(["i2", "i3", "i4"], {"v": _values(2, 5)[:, :8]})
    with h5py.File(out, "r") as f:
        v = f["v"]
        assert (v.chunks, v.compression, v.fletcher32, v.shape) == ((1, 8), "gzip", True, (5, 8))
        np.testing.assert_array_equal(v[:], _values(0, 5)[:, :8])


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
