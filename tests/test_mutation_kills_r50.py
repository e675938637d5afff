"""Kill tests for round 49's library code (module "round49" of ``tests/mutation.py``, ``--only ROUND49``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 50's run)."""

from __future__ import annotations

import subprocess

import h5py
import numpy as np
import pytest

from qkhooks.errors import QKHooksError
from test_bfd import _close, tiny_run  # noqa: F401 (a fixture)


# ------------------------------------------------------------------ tests/mutation.py: round49
def test_the_round49_module_names_files_and_tests_that_exist_and_round_49s_commits():
    """The harness's module "round49" and its named set ROUND49: every file to mutate and every test file exists, the
    selection names only test files it selects, the range resolves in this checkout to round 49's 22 library commits
    (31 in all) (``git rev-list``), so ``--only ROUND49`` draws the same sample wherever it runs, and every library file
    they changed is mutated but ``report.py`` (one line of the modes report, which only the full report reaches)."""
    from test_mutation_kills_r26 import ROOT, _harness, commits_in, library_files_changed, module_files

    mutation = _harness()
    files = module_files(mutation, "round49")
    assert mutation.NAMED_SETS["ROUND49"] == mutation.ROUND49 == ("commits:edf303a..81bab99",)
    assert len(commits_in("edf303a..81bab99")) == 31
    library = subprocess.run(["git", "rev-list", "edf303a..81bab99", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 22
    assert set(library_files_changed("edf303a", "81bab99")) - set(files) == {"qkhooks/report.py"}


# ------------------------------------------------------------------ bfd: a resume to another limit
def test_a_bfd_run_without_a_limit_resumed_to_one_is_refused_naming_no_limit_as_the_resume_to_give(tiny_run):
    """analysis.bfd._refuse_other_run (_66: "LIMIT=NONE (NO --LIMIT)"): a BFD run of the whole folder (no --limit)
    resumed with limit=4 is refused (by its first pass's file), read whole: the file's limit None, the fix "Resume with limit=None (no --limit)";
    the run file is left as it was (the same result read back)."""
    from qkhooks.analysis.bfd import read_bfd, run_bfd

    loaded, folder, _, tmp = tiny_run
    out = tmp / "bfd.h5"
    whole = run_bfd(loaded, str(folder), out, batch_size=4, holdout_every=3)
    with pytest.raises(QKHooksError) as err:
        run_bfd(loaded, str(folder), out, batch_size=4, holdout_every=3, limit=4, resume=True)
    assert str(err.value) == (
        f"cannot resume the BFD run at {tmp / 'bfd.pass1.h5'} to another limit (the file's limit None, now 4): pass 2 centres every "
        "image's tokens on pass 1's position means over all the run's images, so other images change what every image "
        "adds to pass 2 from the first on, and a resume cannot carry its sums on exactly. Resume with limit=None (no "
        "--limit), or overwrite=True (--overwrite) to run both passes again to the new limit, or give another --out "
        "(nothing was run or changed).")
    assert _close(read_bfd(out), whole)


# ------------------------------------------------------------------ modes: anisotropy.csv and the figure's series
def test_the_anisotropy_csv_and_figure_of_a_run_with_its_baseline_hold_each_value_against_it(tmp_path, monkeypatch):
    """analysis.modes._anisotropy_section (_36, _37: the weighted row's relative cell read under another key, so
    empty; _66: each mode's relative cell left empty; _157, _164: the figure's lower interval bound dropped or its
    series shifted; _162: the layers left out): on a run with the anisotropy and centre-embedding states,
    anisotropy.csv's relative cells are the row's cosine minus its baseline (the weighted row's from modes.json's
    cos_weighted), and plot_anisotropy is handed modes.json's layers, baselines, interval bounds and weighted cosines
    in that order; the note says what the baseline and its interval are in its whole sentence (_anisotropy_note
    _50: its words)."""
    import csv
    import math

    from qkhooks.analysis import modes as modes_module
    from qkhooks.analysis.anisotropy import AnisotropyReducer, CentreEmbeddings
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset
    from conftest import TINY_MODELS

    drawn = {}

    def plot(layers, baseline, low, high, cos_weighted, path, title):
        drawn.update(layers=list(layers), baseline=list(baseline), low=low, high=high, cos_weighted=list(cos_weighted))
        return path

    monkeypatch.setattr("qkhooks.plots.plot_anisotropy", plot)
    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize=32)
    run = tmp_path / "run.h5"
    record_dataset(LoadedModel(TINY_MODELS[0].model(), "tiny-test-vit", cfg), "samples", run, modes=3, batch_size=4,
                   limit=8, progress=False, reducers=[AnisotropyReducer(), CentreEmbeddings()])
    summary = modes_module.analyze_modes(run, tmp_path / "out", figure_modes=0, overview=False, images=False)
    rows = summary["anisotropy"]
    layers = sorted(rows)
    assert layers and all("baseline_low" in rows[l] for l in layers)
    assert drawn == {"layers": layers, "baseline": [rows[l]["baseline"] for l in layers],
                     "low": [rows[l]["baseline_low"] for l in layers], "high": [rows[l]["baseline_high"] for l in layers],
                     "cos_weighted": [rows[l]["cos_weighted"] for l in layers]}
    table = list(csv.DictReader(open(tmp_path / "out" / "anisotropy.csv")))
    weighted = [r for r in table if r["head"] == "mean"]
    assert [int(r["layer"]) for r in weighted] == layers
    for r in weighted:
        layer = rows[int(r["layer"])]
        assert float(r["relative_cos"]) == pytest.approx(layer["cos_weighted"] - layer["baseline"], abs=2e-5)  # cells of 6 digits
    per_mode = [r for r in table if r["head"] != "mean" and r["cos"] != "nan"]
    assert per_mode
    for r in per_mode:
        assert float(r["relative_cos"]) == pytest.approx(float(r["cos"]) - float(r["baseline"]), abs=2e-5)
        assert not math.isnan(float(r["baseline"]))
    assert ("; baseline = mean cosine between centre-patch embeddings of different images (zero embeddings skipped); "
            "baseline_low/high (where the run kept the centre embeddings: of its first baseline_images images) its 95% "
            "bootstrap-t interval over them at that layer (jackknife standard error; null with fewer than 6), within "
            "[-1, 1]") in summary["anisotropy_note"], summary["anisotropy_note"]


# ------------------------------------------------------------------ stream: a resume's unchecked images, counted
def test_a_dataset_resume_of_a_run_from_before_the_stamps_warns_whole_and_lists_no_resume_by_ids_alone(tmp_path):
    """stream._refuse_changed_stream_files (_166: the warning's last words; _168: the resume counted as unchecked,
    so record_dataset listed it in the config's UNCHECKED_RESUMES as a resume by ids alone): a torch Dataset's resume
    of a run recorded before the file stamps warns, read whole, that it checks the kept ids alone; it was not a
    resume_ids_only=True resume, so the run's config lists none (README: the list names the resumes by ids alone)."""
    import qkhooks
    from qkhooks.store import format as fmt
    from test_file_stamps import as_before_the_stamps
    from test_resume_held_images_check_progress import _KW, _interrupted, _Named, _tiny_loaded
    from test_resume_in_memory_images import _arrays

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    arrays, ids = _arrays(0), [f"n{i}" for i in range(8)]
    data = _Named(arrays, ids)
    _interrupted(loaded, run, batches=3, data=data)
    as_before_the_stamps(run)
    with pytest.warns(UserWarning) as caught:
        assert qkhooks.record_dataset(loaded, data, run, resume=True, **_KW).images == 8
    said = [str(w.message) for w in caught if "stamps" in str(w.message)]
    assert said == [
        f"{run} was recorded before qkhooks stored each image's stamps ({fmt.FILE_SIZES}), so this resume checks the 4 "
        "images it keeps by their ids alone, in order: an image of torch:_Named replaced since "
        "is not noticed (their content is not checked). To be sure, record it afresh into a new --out (or --overwrite), "
        "which also has every kept image checked on a later resume."]
    with qkhooks.open_run(run) as after:
        assert fmt.UNCHECKED_RESUMES not in dict(after.config)


def test_a_streamed_resume_lists_no_resume_by_ids_alone(tmp_path):
    """stream._refuse_changed_stream_files (_83: a streamed source's resume, whose kept items are not read again,
    counted as unchecked, so record_dataset listed it in the config's UNCHECKED_RESUMES): that list names the resumes
    made with resume_ids_only=True (README); a resume whose kept items are not read again warns instead (its own
    test in test_mutation_kills_r42) and counts none (round 51: a streamed Hugging Face dataset is read in passing,
    so the check is called directly on a source that is not)."""
    from test_mutation_kills_r42 import _streamed_resume_warning

    kept, said, unchecked = _streamed_resume_warning(tmp_path)
    assert kept == 4 and len(said) == 1 and unchecked == 0


# ------------------------------------------------------------------ messages read whole
def test_a_pre_hook_on_a_block_before_the_attention_is_refused_in_the_whole_sentence(tmp_path):
    """models.unsupported.refuse_moved_tokens (_65: the fix's sentence upper-cased): masks read onto a timm ViT whose
    first block carries someone else's forward pre-hook (rolling the tokens) are refused naming the block, the hook,
    the attention and the fix, read whole; no run file is left."""
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.stream import record_dataset
    from test_token_cells import DATA, _roll_block_input, _timm_vit

    model = _timm_vit()
    model.blocks[0].register_forward_pre_hook(_roll_block_input)
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(QKHooksError) as err:
        record_dataset(load_model(model, image_config=config), DATA, tmp_path / "run.h5", batch_size=2,
                       progress=False, modes=2, reducers=[])
    assert str(err.value) == (
        "timm-vit's 'blocks.0' (Block) carries a forward pre-hook someone else registered "
        "(test_token_cells._roll_block_input), which can "
        "move or mix tokens, on the tokens' way to the attention 'blocks.0.attn', so a token may not show the pixels of "
        "its cell, and masks read onto the tokens would be wrong. Record this model without masks, or remove the hook "
        "(handle.remove()) / restore the module while recording masks.")
    assert not (tmp_path / "run.h5").exists()


def test_a_talking_heads_mixer_whose_model_is_gone_says_so_whole():
    """models.class_attention.held_mixer (_4: the message's words): a site's TalkingHeads reads the model's own
    proj_l / proj_w while they live (the same modules) and, once the model is gone, refuses in the whole sentence."""
    import gc

    from torch import nn

    from qkhooks.models.class_attention import TalkingHeads

    proj_l, proj_w = nn.Linear(2, 2), nn.Linear(2, 2)
    mixing = TalkingHeads(proj_l, proj_w)
    assert mixing.proj_l is proj_l and mixing.proj_w is proj_w
    del proj_l, proj_w
    gc.collect()
    for name in ("proj_l", "proj_w"):
        with pytest.raises(QKHooksError) as err:
            getattr(mixing, name)
        assert str(err.value) == (
            "the model whose head mixing (talking heads, differential or gated maps) this site reads is gone (a "
            "finished recording keeps no model alive); record the model again.")


def test_a_zeroed_checksummed_chunk_is_refused_in_the_whole_sentence(tmp_path):
    """store.format.zeroed_chunk_words (_12: its last clause upper-cased): a --checksum run whose image 3's chunk of
    attention rows (one image a chunk) was zeroed with its checksum is refused when read, in the whole sentence: the
    image, the array, why the checksum passes it, and the repair to run."""
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset
    from test_checksum import tiny_vit

    run = tmp_path / "run.h5"
    record_dataset(tiny_vit(), "samples", run, modes=2, layers="0", batch_size=4, limit=6, attention="rows",
                   progress=False, reducers=[], checksum=True)
    name = "attention/L0/rows"
    with h5py.File(run, "r") as f:
        assert f[name].chunks[0] == 1
        info = f[name].id.get_chunk_info_by_coord((3,) + (0,) * (f[name].ndim - 1))
    with open(run, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))
    with open_run(run) as reader, pytest.raises(QKHooksError) as err:
        reader.array(name)[3]
    assert str(err.value) == (
        f"{run} is damaged (image 3's chunk of its array /{name} holds only zero bytes, its Fletcher-32 checksum too, "
        "which the checksum cannot tell from a disk page zeroed over it (a recorded row is never stored as zero bytes)): run "
        f"`qkhooks repair {run} --out FIXED.h5` to copy every committed image still readable (of 6 committed) into a "
        "new file (it leaves run.h5 unchanged).")


def test_a_training_batchnorm_folded_into_q_and_k_is_refused_in_the_whole_sentence():
    """models.biased.refuse_training_batchnorm (_3: the middle of the message): an attention whose q/k BatchNorm is
    in training mode is refused naming its path and class, why, and the fix, read whole; in eval mode it passes."""
    from torch import nn

    from qkhooks.models.biased import refuse_training_batchnorm

    batchnorm = nn.BatchNorm1d(4)
    with pytest.raises(QKHooksError) as err:
        refuse_training_batchnorm("stages.0.blocks.0.attn", "Attention", (batchnorm,))
    assert str(err.value) == (
        "unsupported attention in 'stages.0.blocks.0.attn' (Attention): its q/k BatchNorm is in training mode, where it "
        "normalises with each batch's own statistics, so no fixed W_q, W_k describe the logits; call model.eval() "
        "(BatchNorm then folds into W_q, W_k exactly).")
    refuse_training_batchnorm("stages.0.blocks.0.attn", "Attention", (batchnorm.eval(),))


def test_only_mode_projections_and_maps_are_looked_at_for_zeroed_chunks(tmp_path):
    """store.format.zeroed_chunks (_1: its guard's `or` made `and`, so any array with images asked for was looked
    at): an image's rows of zeros in a Fletcher-32 array whose rows can be all zero (a relative term, an array of
    your own) are data, not damage: none is named; the same zeros under a map's name are named (its chunk's bytes and
    checksum all zero, as numpy reads the chunk off the disk)."""
    from qkhooks.store import format as fmt

    with h5py.File(tmp_path / "zeros.h5", "w") as f:
        for name in ("relative/L0", "attention/L0/rows"):
            f.create_dataset(name, data=np.zeros((3, 4, 5), np.float32), chunks=(1, 4, 5), fletcher32=True)
        for name, named in (("relative/L0", []), ("attention/L0/rows", [0, 2])):
            ds = f[name]
            raw = [np.frombuffer(ds.id.read_direct_chunk((i, 0, 0))[1], np.uint8) for i in range(3)]
            assert not any(r.any() for r in raw)  # Fletcher-32 of zeros is zero: every stored byte is zero
            assert fmt.zeroed_chunks(ds, [0, 2], ds[[0, 2]]) == named


def test_a_resume_by_ids_alone_of_a_run_from_before_the_stamps_warning_points_at_the_callers_line(tmp_path):
    """stream._refuse_changed_stream_files (_151: the warning's stacklevel one frame short of the caller's): a
    torch Dataset's resume_ids_only=True resume of a run recorded before the file stamps warns that it checks the kept
    images by their ids alone, pointing at the line that called record_dataset (this file), not into qkhooks. Left
    out of the module round49's selection (the name's last words): mutmut's trampoline adds frames, so only the
    ordinary suite can check a stacklevel."""
    import qkhooks
    from test_file_stamps import as_before_the_stamps
    from test_resume_held_images_check_progress import _KW, _interrupted, _Named, _tiny_loaded
    from test_resume_in_memory_images import _arrays

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    data = _Named(_arrays(0), [f"n{i}" for i in range(8)])
    _interrupted(loaded, run, batches=3, data=data)
    as_before_the_stamps(run)
    with pytest.warns(UserWarning, match="by their ids alone") as caught:
        qkhooks.record_dataset(loaded, data, run, resume=True, resume_ids_only=True, **_KW)
    said = [w for w in caught if "by their ids alone" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__, [(w.filename, w.lineno) for w in said]


def paths_stopped_before_the_stamps(tmp_path):
    """(a tiny loaded model, a list of 8 photo paths, a run of them stopped after 3 batches and made as if recorded
    before the file stamps): the set-up of the ids-alone warning's tests (here and in test_mutation_kills_r51)."""
    from test_file_stamps import as_before_the_stamps
    from test_review_symlinks_repair_messages import _interrupted
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    names = [f"a{i}.png" for i in range(8)]
    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, names, seed=0)
    paths = [str(folder / n) for n in names]
    _interrupted(loaded, run, batches=3, data=paths)
    as_before_the_stamps(run)
    return loaded, paths, run


def test_a_list_of_paths_resumed_on_a_run_from_before_the_stamps_warns_once_that_it_checks_ids_alone(tmp_path):
    """stream._refuse_changed_stream_files (_15 at 81bab99: `done and reads_again` made `or`, so every source's resume
    of a run from before the stamps took the torch Dataset's path; round 50 made a list's resume of such a run warn
    too, from one helper): a list of file paths resumed on a run from before the stamps warns once, not once per path
    it takes, that its kept images are checked by their ids alone, and ends with every image."""
    import warnings

    import qkhooks
    from test_review_symlinks_repair_messages import _KW

    loaded, paths, run = paths_stopped_before_the_stamps(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert qkhooks.record_dataset(loaded, paths, run, resume=True, **_KW).images == 8
    said = [str(w.message) for w in caught if "by their ids alone" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"{run} was recorded before qkhooks stored each image's stamps"), said


def test_repair_of_an_intact_checksum_run_copies_every_chunked_static(tmp_path):
    """store.repair._static_outside (_14: the chunk count read as range(None); _29: a chunk taken as past the end
    when it has an offset): a --checksum run's statics are Fletcher-32 chunks (chunked storage); repaired whole, none
    lies past the file's end, so each is copied: the copy's spectrum arrays equal the run's, read with h5py, and the
    repair names no problem."""
    from qkhooks.store import open_run, repair
    from qkhooks.stream import record_dataset
    from test_checksum import tiny_vit

    run = tmp_path / "run.h5"
    record_dataset(tiny_vit(), "samples", run, modes=2, layers="0", batch_size=4, limit=4, progress=False,
                   reducers=[], checksum=True)
    with h5py.File(run, "r") as f:
        want = {k: f["spectrum/L0"][k][()] for k in f["spectrum/L0"] if isinstance(f["spectrum/L0"][k], h5py.Dataset)}
        assert want and all(f["spectrum/L0"][k].chunks is not None for k in want)
    fixed = repair(run, tmp_path / "fixed.h5")
    assert not fixed.problems, fixed.problems
    with open_run(tmp_path / "fixed.h5") as got:
        arrays = got.spectrum_arrays(0)
        for k, value in want.items():
            np.testing.assert_array_equal(arrays[k], value)
