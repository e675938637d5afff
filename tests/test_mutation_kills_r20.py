"""Kill tests of round 20's mutation run: the functions round 19 changed or added (module "round19" of
tests/mutation.py), each checked against a reference written independently of the code under test."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from test_preference import make_batch, numpy_reference, random_case
from test_store_safety import _as_if_killed

from qkhooks import QKHooksError
from qkhooks.analysis.preference import PreferenceReducer
from qkhooks.store import RunWriter, open_run


# ------------------------------------------------------------------------------------------ preference reducer
def _overlapping_case(grid=(3, 5)):
    """A random case (ids '0'..'4', 2 prefix tokens) whose image at position 1 has target + distractor above 1 in
    exactly one patch."""
    rows, t, d = random_case(grid=grid)
    t[1, 2, 3], d[1, 2, 3] = 0.7, 0.5
    return rows, t, d


def _state(reducer: PreferenceReducer) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in reducer.state_dict().items()}


def test_the_preference_reducer_refuses_overlapping_grids_by_the_batchs_ids_and_keeps_its_state():
    """The reducer checks the grids it folds (the values' background is 1 - T - D), naming each image by its id,
    before any layer is folded: the state after the refusal is the state of the batches before it."""
    rows, t, d = random_case(grid=(3, 5), seed=3)
    reducer = PreferenceReducer()
    reducer.update(make_batch({0: rows, 2: rows.flip(-1)}, t, d))
    before = _state(reducer)
    rows, t, d = _overlapping_case()
    with pytest.raises(QKHooksError, match=r"masks overlap \(image '6': 1 of 15 patches of the 3 x 5 grid\)"):
        reducer.update(make_batch({0: rows, 2: rows.flip(-1)}, t, d, offset=5))
    after = _state(reducer)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_grids_without_the_batch_axis_are_refused_for_their_shape_not_read_as_rows_of_images():
    """The reducer's once-per-batch overlap check takes only (batch, gh, gw) grids: equal (gh, gw) grids given without
    the batch axis get the shape refusal, not an overlap refusal that reads each grid row as an image."""
    rows, t, d = random_case(grid=(3, 5))
    t2, d2 = np.array(t[1]), np.array(d[1])
    t2[0, :] = d2[0, :] = 0.6  # the rows of a (gh, gw) grid would "overlap" if read as images
    with pytest.raises(QKHooksError, match=r"grids must both be \(batch=5, gh, gw\), got \(3, 5\)"):
        PreferenceReducer().update(make_batch({0: rows}, t2, d2))


def test_a_batch_without_ids_is_folded_as_one_with_them_and_its_refusals_name_positions():
    """A duck-typed batch (captures and meta, no ids) gives the same state as a BatchCapture of the same values; its
    overlap refusal names the image by its position in the batch."""
    rows, t, d = random_case(seed=4)
    with_ids, plain = PreferenceReducer(), PreferenceReducer()
    batch = make_batch({1: rows}, t, d)
    with_ids.update(batch)
    plain.update(types.SimpleNamespace(captures=batch.captures, meta=batch.meta, offset=0))
    ours, theirs = _state(plain), _state(with_ids)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    np.testing.assert_allclose(theirs["sum"][0], numpy_reference(rows.numpy(), t.numpy(), d.numpy(), 2).sum(0),
                               rtol=1e-12)
    rows, t, d = _overlapping_case()
    batch = make_batch({1: rows}, t, d)
    with pytest.raises(QKHooksError, match=r"masks overlap \(the image at position 1 of this batch: 1 of 15 patches"):
        PreferenceReducer().update(types.SimpleNamespace(captures=batch.captures, meta=batch.meta, offset=0))


def test_the_preference_reducers_refusals_of_a_batch_it_cannot_read_say_what_is_missing_and_how_to_build_it():
    rows, t, d = random_case()
    batch = make_batch({0: rows}, t, d)
    batch.captures[0].attention = {}
    with pytest.raises(QKHooksError) as err:
        PreferenceReducer().update(batch)
    assert str(err.value) == ("PreferenceReducer needs attention rows: record with attention='rows' (and odd-one-out "
                              "data).")
    batch = make_batch({0: rows}, t, d)
    del batch.meta["distractor_grid"]
    with pytest.raises(QKHooksError) as err:
        PreferenceReducer().update(batch)
    assert str(err.value) == (
        "PreferenceReducer needs batch meta ['distractor_grid']: build the batch meta with "
        "qkhooks.analysis.preference.odd_one_out_meta(target, distractor, grid, num_prefix_tokens) (qkhooks record "
        "does this for o3:/o3dir: data).")


def test_rows_whose_prefix_differs_from_the_models_are_refused_by_the_preference_reducer():
    """The batch meta's num_prefix_tokens (the model's, from a recording) must be what the rows leave before the
    mask grid: 2 here; a model said to have 1 is refused, one with 2 is folded."""
    rows, t, d = random_case()
    batch = make_batch({3: rows}, t, d)
    batch.meta["num_prefix_tokens"] = 1
    with pytest.raises(QKHooksError, match=r"layer 3: 18 tokens with a \(4, 4\) mask grid leave 2 prefix tokens, "
                                           r"but the model has 1"):
        PreferenceReducer().update(batch)
    batch.meta["num_prefix_tokens"] = 2
    reducer = PreferenceReducer()
    reducer.update(batch)
    assert reducer.num_prefix_tokens == 2
    with pytest.raises(QKHooksError) as err:
        PreferenceReducer().update(make_batch({3: rows[..., :10]}, t, d))
    assert str(err.value) == "layer 3: 10 tokens cannot hold a (4, 4) grid."


# ------------------------------------------------------------------------------------------ run files
def _intact_killed_run(path) -> dict[str, np.ndarray]:
    """Two batches of two with a 2-d and a 3-d per-image array (its last axis of length 1) in chunks of two images,
    left as a killed writer leaves it; returns the values written."""
    values = {"v": np.arange(4 * 8, dtype=np.float32).reshape(4, 8),
              "w": np.arange(4 * 3, dtype=np.float32).reshape(4, 3, 1) - 5}
    with RunWriter(path, dtype="float32", chunk_images=2, attrs={"model": "m"}) as w:
        for i in (0, 2):
            w.write_batch([f"i{i}", f"i{i + 1}"], {k: v[i:i + 2] for k, v in values.items()})
    _as_if_killed(path)
    return values


def test_an_intact_killed_run_of_several_array_shapes_resumes_and_reads_as_written(tmp_path):
    """The resume's damage check reads every per-image array's chunk index where it cuts or appends: an intact file
    passes it whatever its arrays' shapes, and the resumed run holds every image as written."""
    path = tmp_path / "run.h5"
    values = _intact_killed_run(path)
    more = {"v": np.full((2, 8), 7, np.float32), "w": np.full((2, 3, 1), -1, np.float32)}
    with RunWriter(path, mode="resume", dtype="float32", attrs={"model": "m"}) as w:
        assert w.committed == 4
        w.write_batch(["i4", "i5"], more)
    with open_run(path) as run:
        assert run.ids == [f"i{i}" for i in range(6)] and run.complete
        for name in ("v", "w"):
            np.testing.assert_array_equal(run.array(name)[:], np.concatenate([values[name], more[name]]))


def test_the_summary_of_an_intact_run_of_several_array_shapes_finds_no_damage(tmp_path):
    path = tmp_path / "run.h5"
    _intact_killed_run(path)
    with open_run(path) as run:
        assert run.problems == []  # a list before any summary too
        text = run.summary()
        assert "DAMAGED" not in text and run.problems == [], text
        assert [line.split()[0] for line in text.splitlines() if line.strip().startswith(("v ", "w "))] == ["v", "w"]


# ------------------------------------------------------------------------------------------ mask overlap
def test_overlap_is_counted_per_image_as_numpy_counts_it_and_names_the_first_five_of_seven():
    """Boolean numpy masks overlap where both are set, fractional ones where they add up to more than 1 + the
    tolerance; the refusal counts each image's cells (numpy's count), names five images and how many more, and has
    the type asked for."""
    from qkhooks.data.masks import OVERLAP_TOLERANCE, refuse_overlap
    from qkhooks.errors import DataRefusal

    rng = np.random.default_rng(0)
    target, distractor = rng.random((9, 6, 7)) < 0.5, rng.random((9, 6, 7)) < 0.3
    distractor[[2, 5]] &= ~target[[2, 5]]  # two images disjoint
    counts = np.logical_and(target, distractor).sum((1, 2))
    bad = np.flatnonzero(counts)
    assert len(bad) == 7
    names = [f"item {i}" for i in range(9)]
    with pytest.raises(DataRefusal) as err:
        refuse_overlap(target, distractor, names, "pixels", error=DataRefusal)
    listed = ", ".join(f"item {i}: {counts[i]} of 42 pixels" for i in bad[:5])
    assert f"the target and distractor masks overlap ({listed} (and 2 more))." in str(err.value)
    refuse_overlap(target[[2, 5]], distractor[[2, 5]], names[:2], "pixels")  # disjoint: nothing raised
    fractions = np.full((1, 2, 2), 0.5)
    refuse_overlap(fractions, fractions + OVERLAP_TOLERANCE / 2, ["a"], "patches")  # within the tolerance
    with pytest.raises(QKHooksError, match=r"\(a: 4 of 4 patches\)"):
        refuse_overlap(fractions, fractions + 2 * OVERLAP_TOLERANCE, ["a"], "patches")


def test_grids_that_carry_autograd_are_checked_and_give_the_numpy_values():
    """Mask grids from a differentiable model (requires_grad) are read for the overlap check as they are: the values
    equal numpy's, and an overlap among them is refused."""
    from qkhooks.analysis.preference import preference_from_rows

    rows, t, d = random_case(grid=(3, 5))
    values = preference_from_rows(rows, t.clone().requires_grad_(), d.clone().requires_grad_(), 2)
    np.testing.assert_allclose(values.detach().numpy(), numpy_reference(rows.numpy(), t.numpy(), d.numpy(), 2),
                               rtol=1e-12)
    rows, t, d = _overlapping_case()
    with pytest.raises(QKHooksError, match=r"position 1 of this batch: 1 of 15 patches of the 3 x 5 grid"):
        preference_from_rows(rows, t.requires_grad_(), d.requires_grad_(), 2)


# ------------------------------------------------------------------------------------------ BFD's content refusal
@pytest.mark.parametrize("dtype, eps", [(np.float32, 2.0 ** -23), (np.float64, 2.0 ** -52), (np.int64, 2.0 ** -52)])
def test_content_at_the_rounding_of_the_accumulation_dtype_is_refused_and_above_it_decomposed(dtype, eps):
    """The threshold is ((images + 1) eps)^2 of the second moment, eps of the dtype the reducers summed in (float64's
    for a dtype that is not floating-point: the state arrays are then cast to float64)."""
    from qkhooks.analysis.bfd_summary import refuse_no_content

    images, second = 7, 3.0
    limit = ((images + 1) * eps) ** 2 * second
    with pytest.raises(QKHooksError) as err:
        refuse_no_content(limit, second, images, np.dtype(dtype))
    assert str(err.value) == (
        f"BFD's content factor is zero: all {images} images give the same tokens entering W_q/W_k (content energy "
        f"{limit:.3g} of 3, within {np.dtype(dtype).name} rounding), so every head would be 100% position-position "
        "and the content claims untestable. Run it over more, different images.")
    refuse_no_content(limit * (1 + 1e-9), second, images, np.dtype(dtype))  # above the rounding: content


@pytest.mark.parametrize("content, second", [(float("nan"), 1.0), (1.0, float("inf"))])
def test_non_finite_energies_are_refused_naming_both_and_the_fix(content, second):
    from qkhooks.analysis.bfd_summary import refuse_no_content

    with pytest.raises(QKHooksError) as err:
        refuse_no_content(content, second, 4, np.dtype(np.float64))
    assert str(err.value) == (
        f"BFD's energies are not finite (content {content}, second moment {second}): some image gives NaN or inf "
        "tokens entering W_q/W_k (NaN/inf pixels, or a float16 model that overflows). Find the image with "
        "qkhooks.record and its reducers (they name it), drop it, or compute in float32.")


# ------------------------------------------------------------------------------------------ non-finite batches
def test_a_non_finite_refusal_names_every_image_and_layer_by_id_or_by_position_and_index():
    """Images are named by id when the batch has one per image, else by position and index in the run (its offset,
    0 for a batch without one); the layers are those of the rows with a non-finite image, in order."""
    from qkhooks.reducers import refuse_non_finite

    finite = torch.ones(3, 4, dtype=torch.bool)
    finite[0, 2] = finite[2, 2] = finite[2, 3] = False
    tail = ("are not finite (NaN or inf) at layer(s) [4, 9]. Folding them would give a wrong statistic, so the whole "
            "batch is refused and the reducer's state is unchanged (drop these images and go on). Likely causes: NaN or "
            "inf pixels in the input (check torch.isfinite(pixel_values)), or a model run in float16 whose activations "
            "overflow (compute in float32: model.float(), or bfloat16).")
    cases = [(types.SimpleNamespace(ids=["a", "b", "c", "d"], offset=10),
              "image(s) ['c', 'd'] at position(s) [2, 3] of this batch (image index [12, 13]) "),
             (types.SimpleNamespace(ids=["a", "b"], offset=10),  # not one id per image: positions only
              "image(s) at position(s) [2, 3] of this batch (image index [12, 13]) "),
             (types.SimpleNamespace(ids=None, offset=10), "image(s) at position(s) [2, 3] of this batch (image index "
                                                          "[12, 13]) "),
             (types.SimpleNamespace(), "image(s) at position(s) [2, 3] of this batch (image index [2, 3]) ")]
    for batch, which in cases:
        with pytest.raises(QKHooksError) as err:
            refuse_non_finite(finite, [4, 7, 9], batch, "SomeReducer", "scores (maps)")
        assert str(err.value) == f"SomeReducer: the scores (maps) of {which}{tail}"
    refuse_non_finite(torch.ones(3, 4, dtype=torch.bool), [4, 7, 9], types.SimpleNamespace(), "R", "v")  # all finite


# ------------------------------------------------------------------------------------------ BFD's probes
def test_position_probes_on_a_batch_recorded_without_inputs_are_refused_naming_the_reducer_and_the_fix():
    from qkhooks.analysis.bfd_reducers import PositionDecoding
    from qkhooks.capture import BatchCapture, LayerCapture

    probes = PositionDecoding({0: torch.zeros(5, 6, dtype=torch.float64)}, (2, 2), 1, holdout_every=3)
    batch = BatchCapture(["a", "b"], {}, {0: LayerCapture(0, 2, attention={})}, 0)
    with pytest.raises(QKHooksError) as err:
        probes.update(batch)
    assert str(err.value) == ("PositionDecoding got no tokens entering W_q/W_k of layer 0: the recording neither "
                              "handed them over (it does so for the sinks it holds as the batch begins) nor kept them; "
                              "pass this reducer in record(..., sinks=[...]), or record with keep_inputs=True.")


# ------------------------------------------------------------------------------------------ modes kept
def test_modes_kept_passes_all_and_none_through_and_warns_in_one_whole_sentence():
    import warnings

    import qkhooks
    from qkhooks.capture import modes_kept
    from test_inputs import _dropout_vit

    sites = qkhooks.record(_dropout_vit().eval(), modes=8).sites
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert modes_kept("all", [8, 8], sites) == "all" and modes_kept(None, [8, 8], sites) is None
        assert modes_kept(20, [], sites) == 20  # no head recorded: nothing to cut to
    with pytest.warns(UserWarning) as seen:
        assert modes_kept(12, [8, 6], sites) == 8
    assert [str(w.message) for w in seen] == [
        "modes=12 is more than this model has: its 8-dim heads have at most 8 modes each, so all 8 are recorded (the "
        "config of the recording or run file says modes=8); ask for modes <= 8, or 'all' (--modes all)."]


@pytest.mark.skipif("MUTANT_UNDER_TEST" in __import__("os").environ,
                    reason="inside mutmut its trampolines are the callers, so no warning can point at this file")
def test_the_modes_cut_warning_points_at_the_callers_line(tmp_path):
    import warnings

    import qkhooks
    from test_inputs import SAME_THREE, _dropout_vit

    model = _dropout_vit().eval()
    for call in (lambda: qkhooks.record(model, modes=12),
                 lambda: qkhooks.record_dataset(model, SAME_THREE, tmp_path / "m.h5", modes=12, progress=False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        cut = [w for w in seen if str(w.message).startswith("modes=12 is more")]
        assert len(cut) == 1 and cut[0].filename == __file__, [(w.filename, str(w.message)) for w in seen]


# ------------------------------------------------------------------------------------------ RunArray indexing
@pytest.fixture
def three_axes(tmp_path):
    """A run of five images with a (3, 4) array each, and that array as numpy has it."""
    full = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    with RunWriter(tmp_path / "run.h5", dtype="float32", chunk_images=2) as w:
        w.write_batch([f"i{i}" for i in range(5)], {"v": full})
    return tmp_path / "run.h5", full


def test_a_run_array_read_with_an_empty_key_is_the_whole_array_and_bad_keys_are_refused_whole(three_axes):
    """``a[()]`` is every committed image, as numpy's ``full[()]``; more indices than axes, and a new axis that would
    make numpy move the index arrays' axis, are refused saying why and what to do instead."""
    path, full = three_axes
    with open_run(path) as run:
        a = run.array("v")
        np.testing.assert_array_equal(a[()], full[()])
        with pytest.raises(IndexError) as err:
            a[0, 0, 0, 0]
        assert str(err.value) == "too many indices: the array has 3 axes (5, 3, 4), 4 were given."
        key = (slice(None), [0, 1], None, [1, 2])
        assert full[key].shape == (2, 5, 1)  # numpy moves the index arrays' axis first: not what the read gives
        with pytest.raises(IndexError) as err:
            a[key]
        assert str(err.value) == ("new axes among several index arrays move numpy's axes; read the array first "
                                  "(np.asarray(a)) and index that.")


def test_a_run_array_reads_backward_slices_negative_and_empty_picks_as_numpy_does_on_every_axis(three_axes):
    """The image axis read in HDF5's increasing order and put back in the order asked for, with the other axes
    selected by numpy where HDF5 cannot (lists, backward slices): every key gives numpy's answer on the array read
    whole."""
    path, full = three_axes
    keys = [(slice(None, None, -1), [2, 0]), (slice(4, 0, -2), slice(None, None, -1)), (slice(None, None, -1), [1], 0),
            slice(0, 3, -1), (slice(0, 3, -1), [1, 0]), ([-1, 0], 1), np.array([-5, 4, -2]), ([-1, -1], [0, 2]),
            (np.array([], dtype=np.int64), slice(None, None, -1)), ([], 1, slice(2, None, -1))]
    with open_run(path) as run:
        a = run.array("v")
        for key in keys:
            got, want = a[key], full[key]
            assert got.shape == want.shape and np.array_equal(got, want), key


def test_a_reader_of_a_run_still_being_written_follows_its_writer(tmp_path):
    """A reader opened while the writer has the file open reads it in SWMR mode: the writer's next batch changes
    the file in place, and the reader reads it after refresh() instead of calling the file stale."""
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2) as w:
        w.write_batch(["a", "b"], {"v": np.ones((2, 3), np.float32)})
        w.flush()
        with open_run(path) as run:
            assert run.ids == ["a", "b"]
            w.write_batch(["c"], {"v": np.full((1, 3), 2, np.float32)})
            w.flush()
            assert run.refresh() == 3 and run.ids == ["a", "b", "c"]
            np.testing.assert_array_equal(run.array("v")[:], np.array([[1] * 3, [1] * 3, [2] * 3], np.float32))


def test_the_open_retries_deadline_counts_from_the_first_try_on_any_clock(monkeypatch):
    """Backoff's time left is the deadline less the time since it started, whatever the clock's origin (a monotonic
    clock's is arbitrary)."""
    from qkhooks.store import _hdf5

    now = {"t": 1234.5}
    monkeypatch.setattr(_hdf5, "_clock", lambda: now["t"])
    monkeypatch.setattr(_hdf5, "_sleep", lambda s: now.__setitem__("t", now["t"] + s))
    backoff = _hdf5.Backoff(3.0)
    assert backoff.remaining() == 3.0
    assert backoff.wait() and backoff.remaining() == pytest.approx(3.0 - _hdf5.FIRST_PAUSE_S, abs=1e-9)


def test_every_layer_is_all_in_any_case_and_spacing(tmp_path):
    """"all" (a selection of every layer, in any case) is not a module path."""
    import qkhooks
    from test_inputs import _dropout_vit

    model = _dropout_vit().eval()
    every = [s.layer for s in qkhooks.record(model, modes=8).sites]
    assert len(every) > 1
    for spec in ("all", " ALL ", "All"):
        assert [s.layer for s in qkhooks.record(model, modes=8, layers=spec).sites] == every, spec


# ------------------------------------------------------------------------------------------ reducers' float64 sums
def test_position_probes_of_float32_tokens_sum_in_float64_as_numpy_and_name_a_shape_mismatch():
    """PositionDecoding accumulates in its dtype (float64): sums of X^T X of float32 tokens equal numpy's float64
    sums of the same tokens; tokens of another shape than the position means are refused naming both."""
    from qkhooks.analysis.bfd_reducers import PositionDecoding, is_held_out, layer_state
    from qkhooks.capture import BatchCapture, LayerCapture

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, 6, generator=g) * 1000 + 0.1).to(torch.float32)  # 1 prefix + a 2 x 2 grid, d = 6
    ids = [f"img{i}" for i in range(6)]
    probes = PositionDecoding({0: x.double().mean(0)}, (2, 2), 1, holdout_every=3)
    probes.update(BatchCapture(ids, {}, {0: LayerCapture(0, 6, inputs=x)}, 0))
    state = layer_state(probes.state_dict(), 0)
    xs = x[:, 1:].numpy().astype(np.float64)
    held = np.array([is_held_out(i, 3) for i in ids])
    sums = [k for k in state if np.asarray(state[k]).shape == (2, 6, 6)]
    assert sums, sorted(state)
    want = np.stack([np.einsum("btd,bte->de", xs[~held], xs[~held]), np.einsum("btd,bte->de", xs[held], xs[held])])
    np.testing.assert_allclose(np.asarray(state[sums[0]]), want, rtol=1e-13)
    with pytest.raises(QKHooksError) as err:
        probes.update(BatchCapture(ids, {}, {0: LayerCapture(0, 6, inputs=x[..., :5])}, 6))
    assert str(err.value).startswith("layer 0: patch tokens of shape (4, 5) do not match the position means (4, 6)")


def test_the_preference_reducers_non_finite_refusal_names_itself_and_its_values():
    rows, t, d = random_case()
    rows[1, 0, 0, 3] = float("nan")
    with pytest.raises(QKHooksError) as err:
        PreferenceReducer().update(make_batch({0: rows}, t, d, offset=5))
    assert str(err.value).startswith("PreferenceReducer: the preference values (attention rows) of image(s) ['6'] at "
                                     "position(s) [1] of this batch (image index [6]) are not finite")
