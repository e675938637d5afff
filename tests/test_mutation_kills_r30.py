"""Kill tests for the mutants of round 30's library code (``369d0ec..abe37ed``: a joining layer's tokens handed to the
sinks that take inputs once its calls are joined, ``TakenParts``, the BFD reducers' ``take_inputs`` and whole-batch
folds, ``qkhooks bfd`` keeping no tokens) that their tests let survive (module "round30" of tests/mutation.py,
``--only ROUND30``; tests/MUTATION.md's "round 30" section names each); and the harness's round30 module kept
consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.analysis.bfd import _tensor_pass
from qkhooks.analysis.bfd_reducers import PositionDecoding, PositionMeans, is_held_out
from qkhooks.capture import BatchCapture
from qkhooks.errors import QKHooksError

from test_mutation_kills_r26 import check_round_module
from test_taken_inputs_bfd import UpdateOnly, _batch, _images, _states_equal, _tiny_vit, _two_ways


# ------------------------------------------------------------------------------------ tests/mutation.py: round30
def test_the_round30_module_names_files_and_tests_that_exist_and_round_30s_commits():
    """The harness's module "round30" and its named set ROUND30: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to round 30's two library
    commits, and every library file they changed is mutated."""
    check_round_module("round30", "ROUND30", "369d0ec", "abe37ed", library_commits=2)


# ------------------------------------------------------------------------------------------ bfd.py: _tensor_pass
class _Spy:
    """A sink after the reducers: what each finished batch holds (maps, kept tokens) and its ids."""

    def __init__(self):
        self.seen: list[tuple[list[str], bool, bool]] = []

    def update(self, batch: BatchCapture) -> None:
        caps = list(batch.captures.values())
        self.seen.append((list(batch.ids), any(c.query is not None or c.key is not None for c in caps),
                          any(c.inputs is not None for c in caps)))


class _HookIds(PositionDecoding):
    """Position probes that note, in each layer's hook, the batch's ids as given then (none: made as the batch ends)."""

    def take_inputs(self, batch: BatchCapture, layer: int, tokens: torch.Tensor) -> None:
        self.hook_ids = getattr(self, "hook_ids", [])
        self.hook_ids.append((layer, list(batch.ids), int(tokens.shape[0])))
        super().take_inputs(batch, layer, tokens)


def _kept_tokens(model, batches, layers, input) -> dict[int, np.ndarray]:
    """Each recorded layer's tokens (all images, float64) as ``qkhooks.record`` keeps them: the reference."""
    out: dict[int, list[np.ndarray]] = {}
    with torch.no_grad(), qkhooks.record(model, modes=None, layers=layers, input=input, keep_inputs=True) as run:
        for pixels in batches:
            run(pixels)
            for layer in run.layers:
                out.setdefault(layer, []).append(run.inputs(layer).double().numpy())
    return {layer: np.concatenate(x) for layer, x in out.items()}


def test_the_tensor_pass_records_the_chosen_layers_from_the_chosen_input_without_maps_or_kept_tokens():
    """`qkhooks bfd` on tensors: PositionMeans (all layers it is handed) over the chosen layer 1 only, of the residual
    stream when asked, equal numpy's mean of the tokens `record(..., input="residual")` keeps; every batch finished
    without query/key maps and without kept tokens (the reducers took them in the hooks)."""
    model = _tiny_vit()
    batches = [_images(1), _images(2, n=3)]
    means, spy = PositionMeans(), _Spy()
    _tensor_pass(model, batches, [means, spy], [1], "residual", "cpu")
    reference = _kept_tokens(model, batches, [1], "residual")
    assert sorted(means.means()) == [1] and means.counts == {1: 7}
    np.testing.assert_allclose(means.means()[1].numpy(), reference[1].mean(0), rtol=0, atol=1e-12)
    normed = _kept_tokens(model, batches, [1], "normed")[1].mean(0)
    assert np.abs(normed - reference[1].mean(0)).max() > 1e-3  # the two inputs differ: the test can tell them apart
    assert [(has_maps, kept) for _, has_maps, kept in spy.seen] == [(False, False), (False, False)]


def test_the_tensor_pass_gives_the_ids_the_recording_would_make_up_front_so_the_probes_fold_in_the_hooks():
    """The position probes see each batch's ids in the layer hooks (so they fold there, keeping no tokens): the ids
    the recording makes, image 0, 1, ... across batches; the state equals the one folded from kept tokens with the
    recording's own ids."""
    model = _tiny_vit()
    batches = [_images(1), _images(2, n=3)]
    means, _ = _two_ways(model, PositionMeans)
    probes, spy = _HookIds(means, (4, 4), num_prefix_tokens=1, holdout_every=2), _Spy()
    _tensor_pass(model, batches, [probes, spy], [0, 1, 2], "normed", "cpu")
    first, second = ["0", "1", "2", "3"], ["4", "5", "6"]
    assert probes.hook_ids == [(l, first, 4) for l in (0, 1, 2)] + [(l, second, 3) for l in (0, 1, 2)]
    assert [ids for ids, _, _ in spy.seen] == [first, second]
    kept = PositionDecoding(means, (4, 4), num_prefix_tokens=1, holdout_every=2)
    with torch.no_grad(), qkhooks.record(model, modes=None, keep_inputs=True, sinks=[UpdateOnly(kept)]) as run:
        for pixels in batches:
            run(pixels)
    assert _states_equal(probes.state_dict(), kept.state_dict())
    held = [np.count_nonzero([is_held_out(str(i), 2) for i in range(7)])]
    assert probes.stats[0]["images"].tolist() == [7 - held[0], held[0]] and 0 < held[0] < 7


def test_the_tensor_pass_casts_the_images_to_the_models_dtype():
    """A float64 model fed float32 images: the pass casts them (torch refuses a float32 input to float64 weights),
    and the means equal numpy's over the tokens of the float64 images."""
    model = _tiny_vit().double()
    batches = [_images(1)]
    means = PositionMeans(dtype=torch.float64)
    _tensor_pass(model, batches, [means], [0, 2], "normed", "cpu")
    reference = _kept_tokens(model, [b.double() for b in batches], [0, 2], "normed")
    for layer in (0, 2):
        np.testing.assert_allclose(means.means()[layer].numpy(), reference[layer].mean(0), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ bfd_reducers.py: PositionMeans
def test_a_merge_of_position_means_with_another_token_count_is_refused_whole_with_the_shape_message():
    """Layer 0 fits, layer 1 has one token more: the merge raises the shape refusal naming layer 1 and both shapes
    (not torch's broadcast error), and neither layer's sums or counts change."""
    g = torch.Generator().manual_seed(4)
    mine, theirs = PositionMeans(dtype=torch.float64), PositionMeans(dtype=torch.float64)
    mine.update(_batch({0: torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
                        1: torch.randn(2, 5, 6, generator=g, dtype=torch.float64)}, ["a", "b"]))
    theirs.update(_batch({0: torch.randn(3, 5, 6, generator=g, dtype=torch.float64),
                          1: torch.randn(3, 6, 6, generator=g, dtype=torch.float64)}, ["c", "d", "e"]))
    before = {k: np.array(v, copy=True) for k, v in mine.state_dict().items()}
    with pytest.raises(QKHooksError) as err:
        mine.merge(theirs)
    assert str(err.value) == ("layer 1: tokens changed shape from (5, 6) to (6, 6); BFD needs one input size (one token "
                              "count) for the whole dataset.")
    assert _states_equal(mine.state_dict(), before) and mine.counts == {0: 2, 1: 2}


# ------------------------------------------------------------- stream.py: record_dataset's keep_inputs (by hand)
def test_record_dataset_keeps_the_tokens_when_any_reducer_needs_them_kept_beside_one_that_takes_them(tmp_path):
    """record_dataset is decorated (mutmut leaves it); its keep_inputs line mutated by hand (`all` for `any`): one
    reducer taking its tokens in the hooks beside one that reads kept tokens: the tokens are kept (for the second),
    and both fold the same state."""
    from qkhooks.stream import record_dataset

    class KeptMeans(PositionMeans):  # the same reducer reading kept tokens
        take_inputs = None

    model, seen = _tiny_vit(), []
    taken, kept = PositionMeans(), KeptMeans()
    record_dataset(model, "samples", tmp_path / "a.h5", reducers=[taken, kept], modes=None, limit=4, batch_size=2,
                   progress=False, store_modes=False,
                   on_batch=lambda b: seen.append(all(c.inputs is not None for c in b.captures.values())))
    assert seen == [True, True]
    assert _states_equal(taken.state_dict(), kept.state_dict()) and kept.counts == {0: 4, 1: 4, 2: 4}


# ---------------------------------------------------------------------------------------- reducers.py: TakenParts
def test_taken_parts_are_true_only_while_their_batch_lives_and_hold_parts_of_one_batch_at_a_time():
    """TakenParts: empty is false; a part put for a live batch makes it true; pop of another batch gives nothing and
    forgets; a new batch's first part drops the old batch's; once the batch is freed it is false again."""
    import gc

    from qkhooks.reducers import TakenParts

    parts = TakenParts()
    assert not parts and parts.pop(_batch({}, [])) == {}
    first, second = _batch({}, ["a"]), _batch({}, ["b"])
    parts.put(first, 0, "x0")
    parts.put(first, 1, "x1")
    assert parts and parts.pop(first) == {0: "x0", 1: "x1"} and not parts and parts.pop(first) == {}
    parts.put(first, 0, "x0")
    parts.put(second, 1, "y1")  # a new batch: the first's parts are dropped
    assert parts.pop(second) == {1: "y1"}
    parts.put(second, 1, "y1")
    assert parts.pop(first) == {} and parts.pop(second) == {}  # the pop of another batch forgets them all
    parts.put(second, 2, "y2")
    assert parts
    del second
    gc.collect()
    assert not parts


# ------------------------------------------------------------------------------ bfd_reducers.py: the refusals
def test_position_means_on_a_batch_without_tokens_are_refused_naming_the_reducer_the_layer_and_both_fixes():
    reducer = PositionMeans()
    batch = _batch({3: torch.zeros(2, 5, 6)}, ["a", "b"], inputs=False)
    with pytest.raises(QKHooksError) as err:
        reducer.update(batch)
    assert str(err.value) == (
        "PositionMeans got no tokens entering W_q/W_k of layer 3: the recording neither handed them over (it does so "
        "for the sinks it holds as the batch begins) nor kept them; pass this reducer in record(..., sinks=[...]), or "
        "record with keep_inputs=True.")
    assert reducer.sums == {} and reducer.counts == {}


def test_a_batch_of_no_images_leaves_the_position_probes_as_they_were():
    """A batch of zero images (no rows in either split) adds nothing: the state equals the one before, bit for bit."""
    g = torch.Generator().manual_seed(5)
    means = {0: torch.randn(5, 6, generator=g, dtype=torch.float64)}
    probes = PositionDecoding(means, (2, 2), num_prefix_tokens=1, holdout_every=2)
    probes.update(_batch({0: torch.randn(3, 5, 6, generator=g, dtype=torch.float64)}, ["a", "b", "c"]))
    before = {k: np.array(v, copy=True) for k, v in probes.state_dict().items()}
    probes.update(_batch({0: torch.zeros(0, 5, 6, dtype=torch.float64)}, []))
    assert _states_equal(probes.state_dict(), before)


def test_bfd_energies_refuse_tokens_of_another_size_and_a_rebuilt_state_without_modes_in_whole_sentences():
    """BFDEnergies._increments' two refusals, word for word, whichever way the tokens come (handed over in the hook or
    kept), and nothing folded: tokens of another token count than pass 1's means; a reducer rebuilt from its saved
    state without the model's modes."""
    from qkhooks.reducers import Reducer
    from test_taken_inputs_bfd import _bfd_reducers

    energies = _bfd_reducers()[1]
    g = torch.Generator().manual_seed(6)
    short = {0: torch.randn(2, 4, 6, generator=g, dtype=torch.float64)}
    with pytest.raises(QKHooksError) as err:
        energies.take_inputs(_batch(short, ["a", "b"], inputs=False), 0, short[0])
    assert str(err.value) == ("layer 0: tokens of shape (4, 6) do not match the pass-1 position means (5, 6); both "
                              "passes need the same images at the same size.")
    with pytest.raises(QKHooksError) as kept:
        energies.update(_batch(short, ["a", "b"]))
    assert str(kept.value) == str(err.value) and float(energies.stats[0]["images"]) == 0
    rebuilt = Reducer.from_state(energies.saved_state())
    tokens = {0: torch.randn(2, 5, 6, generator=g, dtype=torch.float64)}
    for hand_over in (True, False):
        batch = _batch(tokens, ["a", "b"], inputs=not hand_over)
        with pytest.raises(QKHooksError) as err:
            if hand_over:
                rebuilt.take_inputs(batch, 0, tokens[0])
            rebuilt.update(batch)
        assert str(err.value) == (
            "this BFDEnergies was rebuilt from a saved state without the model's modes of layer 0, so it can merge and "
            "report but not update; pass spectra=full_modes(model) to BFDEnergies.from_state.")


# -------------------------------------------------------------------------------------------- bfd.py: run_bfd
from test_bfd import tiny_run  # noqa: E402,F401  (the fixture: a tiny DeiT and a folder of 10 images)


@pytest.mark.parametrize("progress", [False, True])
def test_run_bfd_hands_its_progress_flag_to_both_passes_and_stores_no_modes(tiny_run, capsys, progress):  # noqa: F811
    """run_bfd on a run file with progress=False shows no bar; with progress=True both passes (pass 1's means, pass
    2's energies) show record_dataset's bar, each over the 10 images. Both run files record store_modes=False in
    their config (a resume with other options is refused by it)."""
    from qkhooks.analysis.bfd import pass1_path, run_bfd
    from qkhooks.store import open_run

    loaded, folder, _, tmp = tiny_run
    capsys.readouterr()
    run_bfd(loaded, str(folder), tmp / "bfd.h5", batch_size=5, holdout_every=3, progress=progress)
    err = capsys.readouterr().err
    assert err.count("| 0/10 [") == (2 if progress else 0) and ("record: 100%" in err) == progress  # two bars start
    for path in (pass1_path(tmp / "bfd.h5"), tmp / "bfd.h5"):
        with open_run(path) as run:
            assert run.config["store_modes"] is False and run.config["modes"] is None


def test_bfd_energies_content_sums_are_per_position_as_numpy_sums_them_with_means_of_other_images():
    """content_sum = sum over images of C = X - P per position and channel (N, d), content_ss = sum of ||C||^2: with
    position means that are not these images' own mean (so C does not sum to zero), handed over in the hook or kept,
    equal numpy's."""
    from test_taken_inputs_bfd import _bfd_reducers

    g = torch.Generator().manual_seed(0)  # the position means _bfd_reducers draws first
    means = {l: torch.randn(5, 6, generator=g, dtype=torch.float64).numpy() for l in (0, 1)}
    g = torch.Generator().manual_seed(7)
    tokens = {l: torch.randn(3, 5, 6, generator=g, dtype=torch.float64) + 2.0 for l in (0, 1)}
    for hand_over in (True, False):
        energies = _bfd_reducers()[1]
        batch = _batch(tokens, ["a", "b", "c"], inputs=not hand_over)
        if hand_over:
            for layer, x in tokens.items():
                energies.take_inputs(batch, layer, x)
        energies.update(batch)
        for layer, x in tokens.items():
            c = x.numpy() - means[layer]
            st = energies.stats[layer]
            assert float(st["images"]) == 3
            np.testing.assert_allclose(st["content_sum"].numpy(), c.sum(0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(float(st["content_ss"]), (c ** 2).sum(), rtol=1e-12)
            assert np.abs(c.sum(0)).min() > 1e-3  # not the images' own mean: a per-position sum is not one number


# ------------------------------------------------------------------------------------ capture.py: _join_calls
def test_position_means_of_a_per_frame_layer_fold_the_joined_calls_handed_over_with_their_batch():
    """VidEoMT's per-frame layers: a real reducer taking inputs (PositionMeans, whose parts are keyed to the batch)
    gets each joined layer's (B·T, N, d) tokens with the batch it then folds, and its means equal numpy's over the
    tokens keep_inputs=True keeps (2 clips x 3 frames = 6 images a layer)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.VideomtConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                        image_size=32, patch_size=8, num_queries=5, num_blocks=2)
    model = transformers.VideomtForUniversalSegmentation(config).eval()
    clip = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    means = PositionMeans(dtype=torch.float64)
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full", sinks=[means]) as run:
        model(pixel_values_videos=clip)
        assert all(c.inputs is None for c in run.last.captures.values())
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full", keep_inputs=True) as kept:
        model(pixel_values_videos=clip)
        tokens = {layer: kept.inputs(layer).double().numpy() for layer in kept.layers}
    assert sorted(means.means()) == sorted(tokens) and set(means.counts.values()) == {6}
    for layer, x in tokens.items():
        np.testing.assert_allclose(means.means()[layer].numpy(), x.mean(0), rtol=0, atol=1e-12)
