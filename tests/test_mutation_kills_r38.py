"""Kill tests for the mutants that survived round 39's mutation runs: the round-37 lines (``b0ec42d..9977ff1``) of the
nine files round 38's run left unrun (module "round37rest" of tests/mutation.py, ``--only ROUND37``) and round 38's
own library code (``9977ff1..4f4469b``, module "round38", ``--only ROUND38``); tests/MUTATION.md's "round 39" section
names each. And the harness's two modules kept consistent."""

from __future__ import annotations

from test_mutation_kills_r26 import _harness, commits_in, library_files_changed, module_files

ROUND37_LEFT = {"qkhooks/stream.py", "qkhooks/models/unsupported.py", "qkhooks/store/_hdf5.py",
                "qkhooks/store/repair.py", "qkhooks/store/format.py", "qkhooks/store/writer.py",
                "qkhooks/attention.py", "qkhooks/capture.py", "qkhooks/sdpa.py"}
ROUND38_NAMED = {"qkhooks/capture.py", "qkhooks/models/unsupported.py", "qkhooks/spectrum.py",
                 "qkhooks/cli/__init__.py", "qkhooks/analysis/bfd_summary.py", "qkhooks/analysis/bfd.py"}


# ------------------------------------------------------------------------- tests/mutation.py: round37rest, round38
def test_the_round37rest_module_mutates_the_nine_files_round_38s_run_left_with_round_37s_commits():
    """Module "round37rest": its files and tests exist, it mutates exactly the nine files whose round-37 draws round 38
    did not run (each one round 37's commits changed), with round 37's tests, and is drawn from ROUND37."""
    mutation = _harness()
    files = module_files(mutation, "round37rest")
    assert set(files) == ROUND37_LEFT and ROUND37_LEFT <= set(library_files_changed("b0ec42d", "9977ff1"))
    assert set(mutation.MODULES["round37"][1]) < set(mutation.MODULES["round37rest"][1])
    assert mutation.MODULES["round37"][2] in mutation.MODULES["round37rest"][2]  # round 37's exclusions kept
    assert mutation.NAMED_SETS["ROUND37"] == ("commits:b0ec42d..9977ff1",)


def test_the_round38_module_names_round_38s_commits_and_files_they_changed():
    """Module "round38" and its named set ROUND38: files and tests exist, every file mutated is one round 38's library
    commits changed, and the range resolves in this checkout to its 39 commits."""
    mutation = _harness()
    files = module_files(mutation, "round38")
    assert set(files) == ROUND38_NAMED and ROUND38_NAMED <= set(library_files_changed("9977ff1", "4f4469b"))
    assert mutation.NAMED_SETS["ROUND38"] == mutation.ROUND38 == ("commits:9977ff1..4f4469b",)
    assert len(commits_in("9977ff1..4f4469b")) == 39


# ------------------------------------------------------------------ helpers
import copy  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import qkhooks  # noqa: E402
from qkhooks import sdpa  # noqa: E402
from qkhooks.errors import QKHooksError  # noqa: E402


def _numpy_softmax_maps(q: torch.Tensor, k: torch.Tensor, scale: float, mask: np.ndarray | None = None) -> np.ndarray:
    """softmax(q kᵀ·scale [+ mask]) over the keys, in float64 numpy."""
    logits = np.einsum("bhld,bhsd->bhls", q.double().numpy(), k.double().numpy()) * scale
    if mask is not None:
        logits = logits + mask
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------ sdpa.py: sdpa_probabilities
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_maps_without_a_scale_use_one_over_the_root_of_the_head_width_as_torch_does(masked):
    """``sdpa_probabilities`` ``_11`` (the default scale ``d ** -0.5`` made ``d * -0.5``): every caller the round's
    tests run hands a scale. Without one (a model's ``F.scaled_dot_product_attention(q, k, v)``), the maps are
    softmax(q kᵀ / sqrt(d)) in float64 numpy, and maps @ v is torch's own SDPA output; with a float mask too."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(5, 5, generator=g, dtype=torch.float64) if masked else None
    got = sdpa.sdpa_maps(q, k, mask)
    want = _numpy_softmax_maps(q, k, 16 ** -0.5, None if mask is None else mask.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    maps, out = sdpa.SdpaCall(q, k, v, mask).attend()
    np.testing.assert_allclose(maps.numpy(), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, mask))


# ------------------------------------------------------------------ capture.py: Recording._partial_call
def test_a_call_that_stops_early_is_refused_in_the_whole_sentence():
    """``Recording._partial_call`` ``_19`` (the middle of the refusal upper-cased): round 37's test matches its start
    and end. The whole sentence, word for word, after ``forward_intermediates(..., stop_early=True)``."""
    from test_capture_changes_inside_record import _images, _timm

    model = _timm()
    with torch.no_grad(), qkhooks.record(model, modes=2) as run:
        model(_images(2))
        model.forward_intermediates(_images(3, seed=1), indices=[1], stop_early=True)
    with pytest.raises(QKHooksError) as err:
        run.query(0)
    assert str(err.value) == (
        "the last call ran the recorded layers [0, 1] but not [2], so it completed no batch: a call other than the "
        "model's own (model.forward_intermediates(..., stop_early=True), a block called on its own) completes one when "
        "the last recorded layer returns, and this one stopped before (or raised), while a recording frees its last "
        "batch as the next begins, so there is no batch to read. Record the layers such a call runs: "
        "qkhooks.record(model, layers=[0, 1], ...) (or run the model's own forward); if the call is still running, "
        "read after it returns.")


# ------------------------------------------------------------------ store/repair.py: _verify, VerifyReport.summary
def _written_run(path) -> None:
    from qkhooks.store import RunWriter

    with RunWriter(path, dtype="float32") as w:
        for lo in range(0, 6, 3):
            w.write_batch([f"i{i}" for i in range(lo, lo + 3)], {"v": np.arange(lo, lo + 3, dtype=np.float32)[:, None]})


def test_verify_reads_a_run_whose_model_info_names_no_layers_as_the_reader_does(tmp_path):
    """``_verify`` ``_57`` (a model/info without a ``layers`` list handed to ``geometry_gap`` as None: a TypeError out
    of verify_run). The reader takes such a file's layers from its groups; verify reads it and finds nothing wrong,
    while a version-2 info whose ``layers`` name a layer without geometry is still named."""
    import h5py

    from qkhooks.store.repair import verify_run

    path = tmp_path / "run.h5"
    _written_run(path)
    with h5py.File(path, "r+") as f:
        f.require_group("model").attrs["info"] = json.dumps({"grid": [2, 2], "num_prefix_tokens": 1})
    report = verify_run(path)
    assert report.ok and report.problems == [] and report.images == 6
    with h5py.File(path, "r+") as f:
        f["model"].attrs["info"] = json.dumps({"layers": [0, 3], "layer_geometry": {"0": {}}})
    assert verify_run(path).problems == ["model/info's layer_geometry has no entry for recorded layer 3 (its keys: 0)"]


def test_verify_names_every_static_a_repair_lost_one_by_one(tmp_path):
    """``VerifyReport.summary`` ``_26`` (the lost statics joined by another separator): round 36's test has one lost
    static. Two, in the summary's own line, and the run still passes (gone, not damage in this file)."""
    import h5py

    from qkhooks.store import format as fmt
    from qkhooks.store.repair import verify_run

    path = tmp_path / "run.h5"
    _written_run(path)
    with h5py.File(path, "r+") as f:
        f.attrs[fmt.LOST_STATICS] = json.dumps(["spectrum/L0/U", "spectrum/L1/S"])
    report = verify_run(path)
    assert report.ok and report.lost == ["spectrum/L0/U", "spectrum/L1/S"]
    assert ("lost     spectrum/L0/U, spectrum/L1/S: a repair could not copy them from the damaged file (their values "
            "are gone: what needs them is refused, and the run cannot be resumed)") in report.summary().splitlines()


# ------------------------------------------------------------------ models/unsupported.py: _CopiedHook.__deepcopy__
def test_a_copy_of_a_copy_made_inside_record_is_refused_there_and_copied_after_the_recording_is_gone():
    """``_CopiedHook.__deepcopy__`` ``_5`` (``original is not None and original.live`` made ``or``: copying a copy
    whose recording is over and whose original hook is gone read ``None.live``, an AttributeError): round 38's test
    copies only the model. A copy of the copy made inside record() is refused when called there; one made after exit
    (the first copy never called, so still carrying its copied hooks) is a plain model: its output is the first
    copy's, and it carries no hook once called."""
    import gc

    from test_capture_changes_inside_record import _images, _timm

    model, x = _timm(), _images()
    with torch.no_grad(), qkhooks.record(model, modes=2):
        model(x)
        ema = copy.deepcopy(model)
        inner = copy.deepcopy(ema)
        with pytest.raises(QKHooksError, match=r"^a copy of the recorded model made inside record\(\)"):
            inner(x)
    gc.collect()  # the recording's own hooks are gone: the copies' weak references are dead
    later = copy.deepcopy(ema)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(later(x), want) and torch.equal(ema(x), want)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in later.modules()) == 0


def _bfd_result(x: np.ndarray, grid: tuple[int, int], alpha: float) -> dict:
    """Both BFD passes over synthetic tokens x (n, N, d) through the reducers: the whole ``summarize`` result."""
    from test_cli_refusals_before_work import bfd_summary_of

    return bfd_summary_of(x, grid, alpha)


# ------------------------------------------------------------------ analysis/bfd.py: format_table
def test_the_bfd_table_ends_with_each_layers_probe_note_as_summarize_gives_it():
    """``format_table`` ``_142`` (the probe note's line made None: a TypeError joining the table) and ``_146`` (the
    note read under another key: a KeyError): round 38's test reads the note from ``summarize`` only. Training images
    identical, held-out ones shifted (round 38's constant-features case, through both BFD reducers): the table's last
    line is layer 0's note, word for word (after the few-held-out-images warning), and the C column says '-'."""
    from qkhooks.analysis.bfd import format_table, holdout_images
    from test_cli_refusals_before_work import _held

    rng = np.random.default_rng(3)
    x = np.repeat(rng.normal(size=(16, 6))[None], 10, 0)
    x[_held(range(10), 5)] += rng.normal(size=6)
    result = _bfd_result(x, (4, 4), 1e-3)
    lines = format_table(result).splitlines()
    assert lines[-1] == ("probes of layer 0: C: constant features (trace(S_xx) = 0 up to rounding, e.g. a single "
                         "training image for C): no probe can be fitted, so there is no R^2; use more images.")
    assert lines[2].split()[0] == "0" and lines[2].split()[-1] == "-"
    assert holdout_images(result) == 4 and lines[3].startswith("R2(X) and R2(C) are tested on 4 held-out images")
    assert len(lines) == 5


# ------------------------------------------------------------------ analysis/bfd_summary.py: _position_folds_r2
def _numpy_folds_r2(p: np.ndarray, y: np.ndarray, alpha: float, folds: int = 5) -> np.ndarray:
    """k-fold (position i held out in fold i % folds) ridge R^2 from P's rows to y, each fold's ridge solved as the
    least-squares problem [F_c; sqrt(lam) I] w = [Y_c; 0] (lam = alpha * trace(F_cᵀF_c) / d, intercept not
    penalised)."""
    fold = np.arange(len(y)) % folds
    sse = np.zeros(y.shape[1])
    for f in range(folds):
        train, test = fold != f, fold == f
        fc, yc = p[train] - p[train].mean(0), y[train] - y[train].mean(0)
        lam = alpha * (fc**2).sum() / p.shape[1]
        a = np.vstack([fc, np.sqrt(lam) * np.eye(p.shape[1])])
        w = np.linalg.lstsq(a, np.vstack([yc, np.zeros((p.shape[1], y.shape[1]))]), rcond=None)[0]
        sse += ((y[test] - (p[test] - p[train].mean(0)) @ w - y[train].mean(0)) ** 2).sum(0)
    return 1 - sse / ((y - y.mean(0)) ** 2).sum(0)


def test_the_position_probe_is_the_k_fold_ridge_over_positions_and_a_constant_p_has_none():
    """``_position_folds_r2`` ``_42`` (the ridge term ``lam * I`` made ``lam / I``) and ``_33`` (a constant P's
    answer ``np.full(2, nan)`` made ``np.full(nan)``, a TypeError): round 38's tests read R^2(P) nowhere. Random tokens
    on a 5x4 grid: R^2(P) for row and column is a k-fold ridge over the positions, solved here as least squares, with
    P the tokens' mean over the images; tokens equal at every position (P constant): no R^2(P), and the note says P."""
    from qkhooks.analysis.bfd_summary import CONSTANT_FEATURES, patch_targets

    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 20, 6)) + rng.normal(size=(20, 6))  # a position term shared by the images
    dec = _bfd_result(x, (5, 4), 0.5)["layers"][0]["decoding"]
    want = _numpy_folds_r2(x.mean(0), np.asarray(patch_targets((5, 4)), dtype=float), 0.5)
    np.testing.assert_allclose([dec["P"]["row"], dec["P"]["col"]], want, rtol=1e-9)
    assert dec["P"]["mean"] == pytest.approx(want.mean(), rel=1e-9) and "note" not in dec

    # each image one vector at every position, of whole multiples of 12: every sum and mean is exact, so P is
    # constant to the bit (a P constant only up to rounding gets a probe fitted: see tests/MUTATION.md, round 39)
    flat = np.repeat(12.0 * rng.integers(-3, 4, size=(12, 1, 6)), 20, 1)
    dec = _bfd_result(flat, (5, 4), 0.5)["layers"][0]["decoding"]
    assert dec["P"] == {"row": None, "col": None, "mean": None}
    assert dec["note"] == f"P: {CONSTANT_FEATURES}."


# ------------------------------------------------------------------ stream.py: _refuse_changed_stream
def _list_run_stopped_after_two_batches(tmp_path):
    """A run over a list of 6 image paths, batches of 2, a checkpoint each batch, interrupted after its second batch:
    (paths, the loaded model, the run file, the record options, the ids it keeps)."""
    from test_user_data_items import _loaded, _photos, stop_after

    paths = [str(p) for p in _photos(tmp_path / "many", 6)]
    loaded, out = _loaded(), tmp_path / "list.h5"
    kw = dict(layers="0", modes=2, batch_size=2, progress=False, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        qkhooks.record_dataset(loaded, paths, out, on_batch=stop_after(2), **kw)
    with qkhooks.open_run(out) as run:
        return paths, loaded, out, kw, list(run.ids)


def test_a_resume_over_a_list_cut_before_the_resume_point_names_the_first_image_it_lacks(tmp_path):
    """``_refuse_changed_stream`` ``_15`` (no default for the first differing position: a StopIteration out of
    record_dataset where the data's ids are a prefix of the run's) and ``_32`` (the data's "nothing" re-worded): round
    37's tests change the first item. Interrupted after 2 batches of 2, resumed over only the first path: the whole
    refusal names the run's second image and the data's nothing."""
    paths, loaded, out, kw, kept = _list_run_stopped_after_two_batches(tmp_path)
    assert kept == paths[:len(kept)] and len(kept) >= 2
    with pytest.raises(QKHooksError) as err:
        qkhooks.record_dataset(loaded, paths[:1], out, resume=True, **kw)
    assert str(err.value) == (
        f"cannot resume {out}: the data's items before the resume point are not those the run recorded (image 1 of "
        f"the file is {paths[1]!r}, the data's is nothing): the data changed since the run started, or the run was "
        "recorded by an earlier qkhooks, which named items given as file paths by their position. Put the data back as "
        "it was, record into a new --out, or --overwrite to start again.")


def test_a_refused_resume_of_a_changed_stream_leaves_the_run_as_it_found_it(tmp_path):
    """The except clause around the resume says "a refused resume leaves the file as it found it": a run stopped
    after 2 batches of 2 (4 images committed, its last checkpoint at 2), resumed over a list whose first path changed,
    is refused, and still holds its 4 images (round 39: the file was cut back to the checkpoint before the refusal)."""
    import h5py

    from qkhooks.store import format as fmt

    paths, loaded, out, kw, kept = _list_run_stopped_after_two_batches(tmp_path)
    with h5py.File(out, "r") as f:
        checkpointed = fmt.read_checkpoint(out, fmt.run_id_of(f))[0]
    assert kept == paths[:4] and checkpointed < 4  # images past the checkpoint: what a cut would lose
    with pytest.raises(QKHooksError, match="the data's items before the resume point are not those the run recorded"):
        qkhooks.record_dataset(loaded, paths[5:] + paths[1:5], out, resume=True, **kw)
    with qkhooks.open_run(out) as run:
        assert list(run.ids) == kept


# ------------------------------------------------------------------ store/writer.py: RunWriter.interruption_help
def test_an_overwrite_interrupted_after_it_replaced_the_old_run_says_resume_in_place_of_overwrite(tmp_path):
    """``interruption_help`` ``_21`` (the overwrite's "--resume in place of --overwrite" never given): round 35's test
    stops its overwrite before the old run is replaced. Once a checkpoint replaced it, the help says so."""
    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    _written_run(path)
    with RunWriter(path, mode="overwrite", dtype="float32") as w:
        w.write_batch(["d", "e"], {"v": np.ones((2, 1), np.float32)})
        w.write_checkpoint({})
        w.flush()
        assert w.interruption_help(2) == (f"{path} keeps 2 committed images; the same command with --resume in place "
                                          "of --overwrite continues after them.")


# ------------------------------------------------------------------ capture.py: Recording._begin_batch
def test_an_empty_batch_handed_to_an_hf_attention_as_hidden_states_is_refused_before_the_last_batch_is_freed():
    """``_begin_batch`` ``_20`` (the ``hidden_states`` keyword not read): round 38's test hands the empty batch
    positionally. An HF ViT's attention module called on its own with ``hidden_states=`` of 0 images: refused as an
    input, as the batch begins, so the model's batch before is still there (under the mutant the layer's hook refused
    it after the last batch was freed)."""
    import transformers as T

    torch.manual_seed(0)
    hf = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                image_size=16, patch_size=8)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qkhooks.record(hf, modes=4) as run:
        hf(pixel_values=x)
        with pytest.raises(QKHooksError, match=r"^the batch is empty \(an input of shape \(0, 5, 32\): 0 images\)"):
            hf.get_submodule(run.module_paths[0])(hidden_states=torch.zeros(0, 5, 32))
        assert run.n == 2 and run.ids == ["0", "1"]


def test_query_tokens_given_as_a_numpy_array_are_the_batchs_own_copy_and_choose_its_rows():
    """``_begin_batch`` ``_55`` (a per-batch value that is not a tensor copied as None): round 38's test gives
    tensors. Query tokens as a numpy array: the rows are the model's own eager softmax at those tokens, and the batch
    keeps its own copy when the caller reuses the array for the next batch."""
    from test_capture_shared_qkv_threads_copies import _collected, _eager_probs
    from test_capture_changes_inside_record import _images, _timm

    model, x = _timm(), _images(3)
    want = _eager_probs(model, x)[1]
    qt = np.array([[0, 3]] * 3)
    batches, sink = _collected()
    with torch.no_grad(), qkhooks.record(model, modes=None, layers=[1], attention="rows", sinks=[sink]) as run:
        run(x, meta={"query_tokens": qt})
        qt[:, 1] = 4
        run(x, meta={"query_tokens": qt})
    first, second = batches
    assert np.asarray(first.meta["query_tokens"]).tolist() == [[0, 3]] * 3
    assert float((first.attention(1, "rows") - want[:, :, [0, 3]]).abs().max()) < 1e-5
    assert float((second.attention(1, "rows") - want[:, :, [0, 4]]).abs().max()) < 1e-5


# ------------------------------------------------------------------ models/unsupported.py: remove_own_hooks
def test_a_copy_made_inside_record_does_nothing_after_exit_while_its_original_hooks_are_still_referenced():
    """``remove_own_hooks`` ``_7`` (the removed hook left ``live``): round 38's test lets the original hooks be
    collected as the recording ends, so its copies see them gone. Held elsewhere (here a list; a kept traceback
    through a hook's frame does the same), the removed hooks must still be marked over: the copy's call after exit
    is a plain forward, equal to the model's, and its copied hooks take themselves off."""
    from test_capture_changes_inside_record import _images, _timm

    model, x = _timm(), _images()
    with torch.no_grad(), qkhooks.record(model, modes=2):
        model(x)
        held = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
        ema = copy.deepcopy(model)
    assert held and sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    with torch.no_grad():
        assert torch.equal(ema(x), model(x))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ema.modules()) == 0


# ------------------------------------------------------------------ capture.py: Recording._qk_twice_error
def test_a_qkv_linear_called_twice_within_its_attention_call_is_refused_in_the_whole_sentence():
    """``_qk_twice_error`` ``_9`` (the middle of the refusal re-worded): round 38's test matches its start and
    ``qk_path=False``. The whole sentence."""
    from test_capture_changes_inside_record import _images, _timm
    from test_capture_shared_qkv_threads_copies import qkv_called_twice

    model, x = _timm(depth=1), _images()
    with torch.no_grad(), qkhooks.record(model, modes=4), qkv_called_twice(model.blocks[0].attn):
        with pytest.raises(QKHooksError) as err:
            model(x)
    assert str(err.value) == (
        "blocks.0.attn.qkv (layer 0's q/k projection) ran more than once within one call of blocks.0.attn, so which "
        "output is the layer's q and k cannot be told and the maps would be of the last call; qkhooks does not model "
        "this attention. Record with qk_path=False (the tokens entering W_q/W_k) if its attention is "
        "softmax(q·kᵀ) of one projection of them, else leave the layer out (layers=...).")


# ------------------------------------------------------------------ capture.py: Recording.__call__
def test_a_recording_called_with_pixel_values_by_keyword_records_the_models_maps_and_refuses_photos_so_given():
    """``Recording.__call__`` ``_3`` (the input always read as ``args[0]``: an IndexError for a call by keyword): the
    round's tests call it positionally. ``run(pixel_values=x, ids=...)`` on an HF ViT: the full maps are the model's
    own eager ``output_attentions``, under the ids given; photos handed as ``pixel_values`` are refused by name."""
    import transformers as T
    from PIL import Image

    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         image_size=16, patch_size=8)
    config._attn_implementation = "eager"
    hf = T.ViTModel(config).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(pixel_values=x, output_attentions=True).attentions[0]
        with qkhooks.record(hf, modes=2, attention="full") as run:
            run(pixel_values=x, ids=["a", "b"])
            with pytest.raises(QKHooksError, match=r"^the recording was handed a list of a PIL\.Image\.Image; "):
                run(pixel_values=[Image.new("RGB", (16, 16))] * 2)
    assert run.ids == ["a", "b"]
    assert float((run.attention(0, "full") - want).abs().max()) < 1e-5


# ------------------------------------------------------------------ analysis/bfd.py: _refuse_other_run
def test_a_bfd_resume_into_another_kind_of_run_or_other_options_is_refused_in_the_whole_sentence(tmp_path):
    """``_refuse_other_run`` ``_27`` (the "not a file of `qkhooks bfd`" clause re-worded around its words): round 38's
    test matches those words only. A `record` run (reducers modes and topk, no BFD options) and a BFD run of other
    options, each resumed with other layers: the whole refusal."""
    from qkhooks.analysis.bfd import _refuse_other_run
    from qkhooks.store import RunWriter

    tail = (". Resume with the same model and options as the first run, give another --out, or --overwrite to start "
            "again (nothing was run or changed).")
    for name, config, what in [
            ("record.h5", {"model": "timm:test_vit", "layers": [0], "reducers": ["modes", "topk"]},
             "it is not a file of `qkhooks bfd` (modes, topk)"),
            ("bfd.h5", {"model": "timm:test_vit", "layers": [0], "reducers": ["bfd_energies"],
                        "extra": {"bfd": {"alpha": 1e-3}}}, "its options differ")]:
        path = tmp_path / name
        with RunWriter(path, dtype="float32", attrs={"config": json.dumps(config)}) as w:
            w.write_batch(["a"], {"v": np.ones((1, 1), np.float32)})
        with pytest.raises(QKHooksError) as err:
            _refuse_other_run(path, {"model": "timm:test_vit", "layers": (0, 1)})
        assert str(err.value) == f"cannot resume the BFD run at {path}: {what}: layers: file [0], now [0, 1]{tail}"
        _refuse_other_run(path, {"model": "timm:test_vit", "layers": [0]})  # the same options: no refusal


# ------------------------------------------------------------------ stream.py: _loader
class _WhereRead(torch.utils.data.Dataset):
    """Each item says whether a DataLoader worker read it."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[int, bool]:
        return i, torch.utils.data.get_worker_info() is not None


def test_the_loader_reads_the_chosen_items_in_order_in_the_workers_asked_for():
    """``_loader`` ``_10`` (``num_workers`` not handed to the DataLoader: every item decoded in the main process):
    the round's in-process tests use no workers, and the spawned-worker test starts another Python. With one worker the
    items of the indices given come back in order, batched, each read in a worker; with none, in this process."""
    from qkhooks.stream import _loader

    for workers in (1, 0):
        got = list(_loader(_WhereRead(), [4, 1, 2], 2, workers, lambda batch: batch))
        assert got == [[(4, bool(workers)), (1, bool(workers))], [(2, bool(workers))]]


# ------------------------------------------------------------------ models/unsupported.py: _refuse_replaced
def test_a_qkv_or_head_count_changed_inside_record_is_refused_in_the_whole_sentence():
    """``_refuse_replaced`` ``_20`` (the fix sentence re-worded): round 37's test matches a few words of it. Both
    refusals, a q/k Linear replaced and a head count changed inside record(), word for word."""
    from test_capture_changes_inside_record import _images, _new_linear, _timm

    since = "inside this record() context (or since the sites handed to it were found)"
    fix = ("Make the change before entering record() (each entry finds the model as it is then), or undo it while "
           "recording.")
    head = "unsupported attention in 'blocks.0.attn' (Attention): "
    for change, said in [
            (lambda attn: setattr(attn, "qkv", _new_linear(attn.qkv)),
             f"{head}'blocks.0.attn.qkv', a module on its q/k path, is no longer the module qkhooks found (Linear "
             f"then, Linear now): it was replaced {since}, so the maps, modes and spectrum would be taken with the old "
             f"module (its weights, its norm, its hooks) while the model runs the new one; recording with "
             f"qk_path=False would not help. {fix}"),
            (lambda attn: setattr(attn, "num_heads", 4),
             f"{head}its num_heads changed from 2 to 4 {since}, so the maps and modes would split q and k into the "
             f"heads found at entry while the model splits them into others. {fix}")]:
        model, x = _timm(depth=1), _images()
        with torch.no_grad(), qkhooks.record(model, modes=2) as run:
            model(x)
            change(model.blocks[0].attn)
            with pytest.raises(QKHooksError) as err:
                model(x)
        assert str(err.value) == said and run.n == 2


# ------------------------------------------------------------------ store/_hdf5.py: other_program_file, not_hdf5_at_all
def test_a_run_without_its_format_number_or_without_images_is_not_another_programs_file(tmp_path):
    """``other_program_file`` ``_22`` (the ``images`` group looked for under another name: a run written before the
    format number, images and no format attribute, called another program's file, which --resume and --overwrite
    refuse). A run, the run without its format attribute, the run without its images group: none is another program's
    file; an HDF5 file with neither is, and so is a text file."""
    import h5py

    from qkhooks.store._hdf5 import other_program_file
    from qkhooks.store.format import FORMAT_ATTR

    path = tmp_path / "run.h5"
    _written_run(path)
    assert other_program_file(path) is None
    with h5py.File(path, "r+") as f:
        assert FORMAT_ATTR in f.attrs and "images" in f
        del f.attrs[FORMAT_ATTR]
    assert other_program_file(path) is None
    other = tmp_path / "other.h5"
    _written_run(other)
    with h5py.File(other, "r+") as f:
        del f["images"]
    assert other_program_file(other) is None
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    assert other_program_file(tmp_path / "foreign.h5") == ("another program's HDF5 file: neither a run's images nor "
                                                           "its format number in it")
    (tmp_path / "notes.txt").write_text("not a run\n" * 10)
    assert other_program_file(tmp_path / "notes.txt") == "not HDF5 at all"


def test_a_file_that_cannot_be_read_now_is_not_called_no_hdf5(tmp_path, monkeypatch):
    """``not_hdf5_at_all`` ``_21`` (a file that cannot be read now, an OSError, taken for visibly no HDF5): as
    documented, False for it, so the caller's own checks say what is wrong; a readable text file is True."""
    from qkhooks.store import _hdf5

    text = tmp_path / "notes.txt"
    text.write_text("not a run\n" * 10)
    assert _hdf5.not_hdf5_at_all(text) is True

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_hdf5, "open", unreadable, raising=False)  # the module's open(): root reads a chmod 000 file
    assert _hdf5.not_hdf5_at_all(text) is False
