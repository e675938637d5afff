"""Kill tests of round 42's mutation run of round 40's library code (module "round40" in tests/mutation.py).

Each test fails on the mutant named in its docstring (mutmut's name, ``tests/MUTATION.md``, round 42) and asserts a
value or a whole message against an expectation written out here (os.stat and hashlib for file stamps, the bytes the
message counts, what the user reads). Fast, CPU only, in this process (mutmut switches mutants only here).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks import QKHooksError, open_run
from qkhooks.analysis.preference import PreferenceReducer
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.data import ImageConfig
from test_modes import samples_run  # noqa: F401  (the fixture: test_modes' tiny ViT on 5 bundled sample photos)

CFG = ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3)


def _grids(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = torch.zeros(b, 2, 2), torch.zeros(b, 2, 2)
    t[:, 0, 0], d[:, 1, 1] = 1.0, 1.0
    return t, d


# ------------------------------------------------------------------------------------------ preference
def test_the_reducer_names_the_one_image_whose_row_has_no_patch_mass_among_images_that_have_it():
    """preference.rows_with_mass (_6: the mass summed over the whole batch, not per row): image 'b''s target row puts
    all its mass on the CLS token, image 'a''s rows are softmaxes. The batch's total patch mass is positive, so
    the mutant passes it, and the NaN values of 'b' were refused as "not finite" instead of with the reason."""
    t, d = _grids(2)
    rows = torch.softmax(torch.randn(2, 1, 2, 5, generator=torch.Generator().manual_seed(0)), -1)
    rows[1, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # image 'b', target row: all on the prefix token
    batch = BatchCapture(["a", "b"], {"target_grid": t, "distractor_grid": d},
                         {0: LayerCapture(0, 2, attention={"rows": rows})})
    red = PreferenceReducer()
    with pytest.raises(QKHooksError, match=r"^attention preference: the rows of image 'b' at layer\(s\) \[0\] are no "
                                           r"attention distribution over the patch tokens"):
        red.update(batch)
    assert red.images_held() == 0


# ------------------------------------------------------------------------------------------ room, re-checked
def test_merge_copy_stopped_by_a_disk_that_filled_says_how_much_it_needs_and_leaves_the_shards(tmp_path, monkeypatch):
    """distributed._refuse_disk_filled (_20: MiB multiplied, not divided). test_unsealed_attributes_and_full_disks's own test of this
    names the callers from their frames, which mutmut renames, so it is not in the module's selection; the message is
    asserted whole here: the next write is one shard's maps/a (4 images of 4 float16 in ``write``, 32 bytes) plus
    the 4 MiB HDF5 spare."""
    from qkhooks.distributed import merge_shards, shard_path
    from test_attribute_digests import CONFIG, write
    from test_unsealed_attributes_and_full_disks import _disk_filling_after_the_first_check

    out = tmp_path / "run.h5"
    shards = [shard_path(out, rank, 2) for rank in range(2)]
    for rank, shard in enumerate(shards):
        write(shard, prefix=f"rank{rank}", config=dict(CONFIG, shard=[rank, 2]))
    with h5py_file(shards[0]) as f:
        nbytes = f["maps/a"].shape[0] * int(np.prod(f["maps/a"].shape[1:])) * f["maps/a"].dtype.itemsize
    before = [s.read_bytes() for s in shards]
    _disk_filling_after_the_first_check(monkeypatch)
    with pytest.raises(QKHooksError) as refused:
        merge_shards(out, copy=True)
    assert str(refused.value) == (
        f"merging into {out} stopped before copying more of maps/a: {tmp_path} has 1.0 MiB free, and the next write "
        f"needs {(nbytes + (4 << 20)) / 2**20:.1f} MiB with HDF5's spare (the disk filled since the merge began: "
        "something else writes there); free space there, or merge into a file on another disk, then merge again. "
        "Nothing was written (run.h5.merging removed; the shards are unchanged).")
    assert [s.read_bytes() for s in shards] == before


def test_repair_stopped_by_a_disk_that_filled_says_how_much_it_needs_and_leaves_nothing(tmp_path, monkeypatch):
    """repair._refuse_disk_filled (_9: no message; _15: the spare subtracted, "needs -4.0 MiB"), outside the
    selection's frame-naming test as above."""
    from qkhooks.store import repair
    from test_attribute_digests import write
    from test_unsealed_attributes_and_full_disks import _disk_filling_after_the_first_check

    run, fixed = tmp_path / "run.h5", tmp_path / "new" / "fixed.h5"
    write(run)
    _disk_filling_after_the_first_check(monkeypatch)
    with pytest.raises(QKHooksError) as refused:
        repair(run, fixed)
    assert str(refused.value) == (
        f"repair stopped before copying more of /maps/a: {fixed.parent} has 1.0 MiB free, and the next write needs "
        "4.0 MiB with HDF5's spare (the disk filled since the repair began: something else writes there); free space "
        f"or give --out on another disk, then repair again. {run} is unchanged and nothing was left at {fixed}.")
    assert not fixed.parent.exists()


def h5py_file(path: Path):
    import h5py

    return h5py.File(path, "r")


# ------------------------------------------------------------------------------------------ full disk, overwrite
def test_a_full_disk_before_an_overwrites_first_checkpoint_says_the_old_run_is_kept_not_to_resume(tmp_path,
                                                                                                 monkeypatch):
    """RunWriter.room_help (_13: ``not self._in_place`` dropped): an overwrite whose new run fails for room before its
    first checkpoint still has the old run under the name; its message says so (the writer's own), not "run.h5 has
    2 committed images ... run the same command with --resume" (which would resume the old, complete run)."""
    from qkhooks.stream import record_dataset
    from test_run_file_safety_adversarial import KW, _loaded, _photos
    from test_unsealed_attributes_and_full_disks import _over_room_from

    data, run = _photos(tmp_path / "photos", 12), tmp_path / "run.h5"
    record_dataset(_loaded(), str(data), run, **KW)
    _over_room_from(monkeypatch, 2)  # batches of 2, the first checkpoint after 4 images
    with pytest.raises(QKHooksError) as stopped:
        record_dataset(_loaded(), str(data), run, overwrite=True, **KW)
    assert str(stopped.value) == (
        "disk full while writing the new run beside run.h5, before its first checkpoint: run.h5 keeps the old run, "
        "unchanged; free space and run the same command (with --overwrite) again")
    monkeypatch.undo()
    with open_run(run) as kept:
        assert kept.n == 12 and kept.complete


# ------------------------------------------------------------------------------------------ text models
def test_a_text_model_with_its_own_image_config_is_refused_by_its_layers_naming_this_model(tmp_path):
    """hf.text_model_refusal (_1: its default ``what``): a BertModel given with an ImageConfig passes load_model's
    check and is refused by its attention layers (TextTokenSite.run_file_refusal), before any file."""
    from test_image_folder_ids_and_text_models import _tiny_bert

    loaded = qkhooks.load_model(_tiny_bert(), image_config=CFG)
    with pytest.raises(QKHooksError) as refused:
        qkhooks.record_dataset(loaded, "samples", tmp_path / "b.h5", progress=False)
    assert str(refused.value) == (
        "this model cannot be recorded into a run file: encoder.layer.0.attention.self: this model is a text model "
        "(bert): it reads token ids (input_ids), not images, so qkhooks cannot feed it a dataset's images (no image run "
        "file, no image size or preprocessing applies). Its query-key spectrum needs only the weights: "
        "qkhooks.spectrum(model), or `qkhooks spectrum MODEL`; its maps and modes on your own token ids are recorded "
        "live: `with qkhooks.record(model) as run: model(input_ids=ids)`.")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ stamps in a worker
def test_a_stream_workers_decode_carries_each_files_stamp_by_os_stat_and_blake2b(tmp_path, monkeypatch):
    """sources._worker_decode (_4: the stamps flag dropped). It runs in the stream's worker processes, where mutmut
    sees no test run it; called here with the worker's stream set as its initializer sets it."""
    from qkhooks.data import sources
    from test_spectrum_edits_and_dataparallel import _same_size_photos

    folder = tmp_path / "imgs"
    names = [f"a{i}.png" for i in range(3)]
    _same_size_photos(folder, names, seed=0)
    paths = [str(folder / n) for n in names]
    stream = sources.open_source(paths, CFG)
    monkeypatch.setattr(sources, "_WORKER_STREAM", stream)
    items, failures, _ = sources._worker_decode(list(enumerate(stream._reader.rows(0))), True)
    assert failures == []

    def blake(p: str) -> int:
        value = int.from_bytes(hashlib.blake2b(Path(p).read_bytes(), digest_size=8).digest(), "little", signed=True)
        return -2 if value == -1 else value

    assert [tuple(item["file_stamp"]) for item in items] == [
        (os.stat(p).st_size, os.stat(p).st_mtime_ns, blake(p)) for p in paths]


# ------------------------------------------------------------------------------------------ webdataset samples
def test_a_webdataset_sample_of_two_images_is_skipped_naming_its_key():
    """readers._webdataset_item (_12: the key left out of where): the reason names the shard and the sample's key,
    then its two members."""
    from qkhooks.data.readers import Unreadable, _webdataset_item

    with pytest.raises(Unreadable) as skipped:
        _webdataset_item({"__key__": "p1", "jpg": b"", "png": b""}, "p1", "shard.tar")
    assert str(skipped.value).startswith("shard.tar (key 'p1') holds p1.jpg, p1.png: webdataset makes one sample")


# ------------------------------------------------------------------------------------------ Hugging Face file paths
def test_the_file_paths_of_a_hugging_face_column_past_one_arrow_slice_name_each_row_once():
    """_HFReader.file_paths (_32: slices of 4097 rows stepped by 4096, row 4096 read twice): 5,000 rows of path
    strings (no file is read for the paths), each (id, path) once, in order, as the column holds them."""
    datasets = pytest.importorskip("datasets")
    from qkhooks.data.readers import _HFReader

    paths = [f"/photos/p{i:05d}.jpg" for i in range(5000)]
    reader = _HFReader(datasets.Dataset.from_dict({"image": paths}), "image", None, {})
    assert reader.file_paths(5000) == [(p, p) for p in paths]
    assert reader.file_paths(4097) == [(p, p) for p in paths[:4097]]


def test_the_file_paths_of_an_image_folder_read_as_a_dataset_are_named_relative_to_its_root(tmp_path):
    """_HFReader.file_paths (_50: ``cell.get(None)``, so a folder's rows were named by their absolute paths): with a
    root, each row's id is its file's path relative to the root, as row_id names it when the row is read."""
    datasets = pytest.importorskip("datasets")
    from qkhooks.data.readers import _HFReader

    names = ["a.png", "sub/b.png"]
    paths = [str(tmp_path / n) for n in names]
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image(decode=False))
    reader = _HFReader(ds, "image", None, {}, root=str(tmp_path))
    assert reader.file_paths(2) == list(zip(names, paths))
    assert [reader.row_id(ds[i], i) for i in range(2)] == names


# ------------------------------------------------------------------------------------------ an unchecked resume
def _resumed_warning(loaded, data, run, words: str) -> tuple[int, list[str]]:
    """(the images a stopped run's checkpoint keeps, the warnings holding ``words`` its resume to all 8 images gave)."""
    import warnings

    from qkhooks.store import format as fmt
    from test_review_symlinks_repair_messages import _KW

    with open_run(run) as stopped:
        kept = fmt.read_checkpoint(run, fmt.run_id_of(stopped.file))[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert qkhooks.record_dataset(loaded, data, run, resume=True, **_KW).images == 8
    return kept, [str(w.message) for w in caught if words in str(w.message)]


def _streamed_resume_warning(tmp_path) -> tuple[int, list[str], int]:
    """The warnings saying "does not check" that the resume of a source whose kept items are not read again gives
    (its reader has neither ``file_paths`` nor ``file_stamps``; a streamed Hugging Face dataset's until round 51,
    which reads them in passing), its 4 kept images each recorded from a file (sizes >= 0), and what the check
    returns (the kept images not checked by their content that a resume by ids alone counts)."""
    import warnings
    from types import SimpleNamespace

    from qkhooks import stream as stream_module

    writer = SimpleNamespace(path=tmp_path / "run.h5", ids=[f"a{i}.png" for i in range(4)],
                             rows=lambda name, done: np.full(done, 852))
    source = SimpleNamespace(name="datasets:IterableDataset", file_paths=lambda start, progress=False, first=0: None,
                             file_stamps=lambda start, progress=False, first=0: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unchecked = stream_module._refuse_changed_stream_files(writer, source, 4, 4)
    return 4, [str(w.message) for w in caught if "does not check" in str(w.message)], unchecked


def test_a_streamed_resume_warns_whole_that_its_kept_files_are_not_checked_and_why(tmp_path):
    """stream._refuse_changed_stream_files (_35: the warning's middle sentence): the warning read whole, with the
    counts of the run it resumes (4 kept images, each from a file). A streamed Hugging Face dataset of paths gave it
    until round 51 (a torch Dataset of them, then an iterable, until round 47), which read their kept items again;
    the branch stays for a source that cannot."""
    kept, said, _ = _streamed_resume_warning(tmp_path)
    run = tmp_path / "run.h5"
    assert kept == 4
    assert said == [
        f"{run}: this resume does not check the {kept} files of the {kept} images it keeps against their recorded "
        "sizes, times and hashes: datasets:IterableDataset's items before the resume point are not read again (a "
        "streamed Hugging Face dataset has no index), so a file replaced since is not noticed. Load it as a map-style "
        "dataset (not streamed), or pass the items as a list or another iterable, to have every kept file "
        "checked."], said


def test_a_wds_resume_whose_kept_member_was_renamed_is_refused_naming_it_not_as_a_changed_size(tmp_path):
    """stream._refuse_changed_stream_files (_64: the check that every kept image is among the data's items dropped;
    round 49: that check is the order check, _refuse_other_items, which names the member found in its place):
    a wds: source names its items only by reading the shard's members (no ids before the resume point), so this is
    the check that a kept member is gone. The shard rewritten with a1.png renamed b1.png (the same bytes): refused
    naming a1.png and b1.png in its place, not as a file of another size ("unreadable now")."""
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _tiny_loaded
    from test_file_stamps import _kept, _pngs, _shard

    loaded, shard, run = _tiny_loaded(), tmp_path / "s0.tar", tmp_path / "run.h5"
    members = _pngs(0)
    _shard(shard, members, mtime=1_700_000_000)
    _interrupted(loaded, run, batches=3, data=f"wds:{shard}")
    from qkhooks.store import format as fmt

    committed = _kept(run)
    with open_run(run) as stopped:
        resume_point = fmt.read_checkpoint(run, fmt.run_id_of(stopped.file))[0]  # the images a resume keeps
    assert (committed, resume_point) == (6, 4)  # stopped as batch 3 was handed on, before its checkpoint
    _shard(shard, {("b1.png" if n == "a1.png" else n): data for n, data in members.items()}, mtime=1_700_000_000)
    with pytest.raises(QKHooksError) as refused:
        qkhooks.record_dataset(loaded, f"wds:{shard}", run, resume=True, **_KW)
    assert str(refused.value) == (  # round 49: the order check of every source read again names both ids
        f"cannot resume {run}: the data's items before the resume point are not those the run recorded (image 1 of the "
        "file is 'a1.png', the data's is 'b1.png'): the data changed since the run started, or the run was recorded by "
        "an earlier qkhooks, which named items given as file paths by their position. Put the data back as it was, "
        "record into a new --out, or --overwrite to start again.")
    assert _kept(run) == committed


# ------------------------------------------------------------------------------------------ analyze modes


def test_anisotropy_csv_names_its_columns_and_each_mode_row_is_its_cosine_less_the_layers_baseline(samples_run,
                                                                                                   tmp_path):
    """modes._anisotropy_section (_92, _93: the "baseline" column renamed): anisotropy.csv's header as documented,
    one weighted row and heads x modes rows per layer, and each mode's relative_cos its cos less the layer's
    baseline (the baseline one value per layer, the run's anisotropy baseline as analyze_modes returns it)."""
    import csv

    from qkhooks.analysis.modes import analyze_modes

    path, _, cfg = samples_run
    summary = analyze_modes(path, tmp_path / "out", figure_modes=0, overview=False, images=False, image_config=cfg)
    with open(tmp_path / "out" / "anisotropy.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["layer", "head", "mode", "sigma", "cos", "baseline", "relative_cos"]
    rows = [dict(zip(table[0], r)) for r in table[1:]]
    baselines = {str(layer): r["baseline"] for layer, r in summary["anisotropy"].items()}
    assert sorted(baselines) == ["0", "1"] and len(rows) == 2 * (1 + 4 * 3)
    for r in rows:
        assert float(r["baseline"]) == pytest.approx(baselines[r["layer"]], abs=1e-4)
        if r["head"] != "mean":
            assert float(r["relative_cos"]) == pytest.approx(float(r["cos"]) - float(r["baseline"]), abs=2e-4)


@pytest.fixture(scope="module")
def centre_run(tmp_path_factory):
    """The tiny ViT of test_modes on all 14 bundled sample photos, with the anisotropy baseline's centre rows
    (CentreEmbeddings, as `qkhooks report` records them): enough images for the baseline's interval."""
    from qkhooks.analysis.anisotropy import CentreEmbeddings
    from qkhooks.analysis.recipes import default_reducers
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset
    from test_modes import TINY_MODELS

    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize=32)
    path = tmp_path_factory.mktemp("centre") / "run.h5"
    record_dataset(LoadedModel(TINY_MODELS[0].model(), "tiny-test-vit", cfg), "samples", path, modes=3, batch_size=3,
                   progress=False, reducers=default_reducers(3, [], False) + [CentreEmbeddings()])
    return path, cfg


def test_a_layers_baseline_interval_is_its_own_whichever_layers_are_analysed(centre_run, tmp_path):
    """modes._anisotropy_section (_108: the pivots of every layer in the centre state, not of the layers analysed;
    _136: the images count): analysed alone, layer 1 keeps the interval and image count it has among all layers
    (before the mutant it took layer 0's), the interval holds the baseline, and the count is the run's images."""
    from qkhooks.analysis.modes import analyze_modes

    path, cfg = centre_run
    with open_run(path) as run:
        n = run.n
    every = analyze_modes(path, tmp_path / "all", figure_modes=0, overview=False, images=False, image_config=cfg)
    alone = analyze_modes(path, tmp_path / "one", layers=[1], figure_modes=0, overview=False, images=False,
                          image_config=cfg)
    assert sorted(every["anisotropy"]) == [0, 1] and sorted(alone["anisotropy"]) == [1]
    keys = ("baseline", "baseline_low", "baseline_high", "baseline_images")
    assert [alone["anisotropy"][1][k] for k in keys] == [every["anisotropy"][1][k] for k in keys]
    for layer, r in every["anisotropy"].items():
        assert r["baseline_low"] < r["baseline"] < r["baseline_high"] and r["baseline_images"] == n == 14
    assert every["anisotropy"][0]["baseline_low"] != every["anisotropy"][1]["baseline_low"]  # the layers differ


def test_a_run_whose_masks_are_background_only_says_so_per_layer_and_names_the_csv_columns(tmp_path):
    """modes._same_object_section (_27: the background-only reason replaced by "every mode is numerically null";
    _128: same_object.csv's "mode" column renamed): one image whose object mask is all background: no mode of either
    layer has a value, each layer is left out for that reason (its modes are not null: sigma > 0 in the CSV), and
    the CSV's header is as documented."""
    from qkhooks.analysis.modes import analyze_modes
    from test_hf_path_columns_and_webdataset_ids import _masked_run

    summary = analyze_modes(_masked_run(tmp_path, "bg", [np.zeros((48, 48), np.int64)]), tmp_path / "bg",
                            figure_modes=0, overview=False, images=False, same_object_top=1)
    reason = ("no mode has a value: none of its modes' top-1 images has a labelled object (their masks are "
              "background only)")
    assert summary["same_object"]["left_out"] == {0: reason, 1: reason}
    with open(tmp_path / "bg" / "same_object.csv") as f:
        table = list(__import__("csv").reader(f))
    assert table[0] == ["layer", "head", "mode", "sigma", "cos", "p_same", "p_same_pooled", "p_same_unweighted",
                        "images", "chance"]
    modes = [dict(zip(table[0], r)) for r in table[1:] if r[1] != "mean"]
    assert modes and all(float(r["sigma"]) > 0 and r["p_same"] == "nan" and r["images"] == "0" for r in modes)


def test_the_anisotropy_figure_is_titled_with_the_runs_images_data_and_model(samples_run, tmp_path, monkeypatch):
    """modes._anisotropy_section (_154: the figure's title None): what the figure says it shows, read from the call
    that draws it (the run of test_modes: 5 of the bundled samples, the model named tiny-test-vit)."""
    import qkhooks.plots as plots
    from qkhooks.analysis.modes import analyze_modes

    drawn = []
    real = plots.plot_anisotropy

    def recorded(*args, **kwargs):
        drawn.append(args[-1] if len(args) == 7 else kwargs.get("title"))
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_anisotropy", recorded)
    path, _, cfg = samples_run
    analyze_modes(path, tmp_path / "out", figure_modes=0, overview=False, images=False, image_config=cfg)
    assert drawn == ["Anisotropy baseline: centre patches of 5 images of samples — tiny-test-vit"]


def test_the_same_object_figure_draws_the_chance_line_of_the_runs_objects(tmp_path, monkeypatch):
    """modes._same_object_section (_181: the chance reference line left out of the figure): one image with two
    labelled objects, so chance is 1/2 (one of two objects, as test_hf_path_columns_and_webdataset_ids checks per layer); the figure is
    drawn with that line, labelled with its value."""
    import qkhooks.plots as plots
    from qkhooks.analysis.modes import analyze_modes
    from test_hf_path_columns_and_webdataset_ids import _masked_run

    two = np.zeros((48, 48), np.int64)
    two[8:24, 8:40], two[30:44, 8:40] = 4, 7
    drawn = []
    real = plots.plot_layer_curves

    def recorded(*args, **kwargs):
        drawn.append(kwargs.get("references"))
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_layer_curves", recorded)
    summary = analyze_modes(_masked_run(tmp_path, "two", [two]), tmp_path / "two", figure_modes=0, overview=False,
                            images=False, same_object_top=1)
    assert summary["same_object"]["chance"] == 0.5
    assert drawn == [{"chance (0.50)": 0.5}]


def test_modes_json_names_its_fields_and_each_top_image_by_id_score_and_sign_from_the_runs_state(samples_run,
                                                                                                   tmp_path):
    """modes._modes_summary (_29, _34: the "num_prefix_tokens" and "naming" keys renamed; _226, _233: a top image's
    "id" and "sign" keys renamed) and analyze_modes (_74: figures_left_out None; _92: the figures folder named when
    none was drawn): modes.json read back: the run's prefix tokens and the naming rule under their
    names, and every mode's top images each with its index, the run's id of that index, and the score and sign the
    saved top-k state ranks it by (topk.top_images, both signs)."""
    import json

    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.topk import layer_state, top_images

    path, _, cfg = samples_run
    summary = analyze_modes(path, tmp_path / "out", figure_modes=0, overview=False, images=False, image_config=cfg)
    saved = json.loads((tmp_path / "out" / "modes.json").read_text())
    # no figure asked: no figures folder named, none counted, no layer's figures left out (analyze_modes _92, _74)
    assert summary["files"]["figures"] == "" and summary["files"]["figure_count"] == 0
    assert summary["figures_left_out"] == {} == saved["figures_left_out"]
    with open_run(path) as run:
        prefix, ids, state = run.info["num_prefix_tokens"], list(run.ids), run.state("topk_modes")
    assert saved["num_prefix_tokens"] == prefix == 1
    assert saved["naming"] == "L{layer} H{head} M{mode}, all 0-based"
    for entry in saved["layers"]:
        st = layer_state(state, entry["layer"])
        for h, head in enumerate(entry["heads"]):
            for m, mode in enumerate(head["modes"]):
                best = top_images(st, h, m)
                assert [sorted(t) for t in mode["top"]] == [["id", "index", "score", "sign"]] * len(best["index"])
                assert [t["index"] for t in mode["top"]] == best["index"].tolist()
                assert [t["id"] for t in mode["top"]] == [ids[i] for i in best["index"].tolist()]
                assert [t["sign"] for t in mode["top"]] == best["sign"].tolist()
                np.testing.assert_allclose([t["score"] for t in mode["top"]], best["score"], rtol=1e-6)


def test_a_run_without_the_anisotropy_reducer_says_so_in_its_note(tmp_path):
    """modes._modes_summary (_85: the note for a run without an anisotropy state replaced by the notes of a run with
    one): a run recorded with the default reducers less the anisotropy reducer."""
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.recipes import default_reducers
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset
    from test_modes import TINY_MODELS

    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize=32)
    reducers = [r for r in default_reducers(3, [], False) if r.name != "anisotropy"]
    assert len(reducers) == len(default_reducers(3, [], False)) - 1
    path = tmp_path / "run.h5"
    record_dataset(LoadedModel(TINY_MODELS[0].model(), "tiny-test-vit", cfg), "samples", path, modes=3, batch_size=3,
                   limit=3, progress=False, reducers=reducers)
    summary = analyze_modes(path, tmp_path / "out", figure_modes=0, overview=False, images=False, image_config=cfg)
    assert summary["anisotropy_note"].startswith("the run has no anisotropy reducer state (")


# ------------------------------------------------------------------------------------------ the data readers
def test_an_items_target_and_distractor_masks_are_read_as_the_two_regions_given():
    """readers._item_to_raw (_114: the distractor read under another key): an odd-one-out item given as a dict, its
    target and distractor masks (labels 1 and 3) kept as the two regions, in the image's frame."""
    from qkhooks.data.readers import _item_to_raw

    image = np.zeros((40, 56, 3), np.uint8)
    target, distractor = np.zeros((40, 56), np.uint8), np.zeros((40, 56), np.uint8)
    target[:10, :10], distractor[20:30, 30:50] = 1, 3
    own, raw = _item_to_raw({"image": image, "target": target, "distractor": distractor, "id": "x"}, "item 0")
    assert own == "x"
    np.testing.assert_array_equal(raw.target, target > 0)
    np.testing.assert_array_equal(raw.distractor, distractor > 0)


def test_only_torchvisions_dataset_folder_is_read_by_its_files(tmp_path):
    """readers.folder_reader (_20: ``or`` for ``and``: any class named DatasetFolder, or any torchvision class, taken
    for torchvision's folder): a user's own class named DatasetFolder, with samples and a root, is not torchvision's,
    so its items are read through its own __getitem__ (no FolderReader); torchvision's ImageFolder is."""
    torchvision = pytest.importorskip("torchvision")
    from qkhooks.data.readers import FolderReader, folder_reader

    class DatasetFolder(torch.utils.data.Dataset):
        def __init__(self):
            self.samples, self.root = [("/photos/a.png", 0)], "/photos"

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return np.zeros((8, 8, 3), np.uint8)

    assert folder_reader(DatasetFolder()) is None
    assert not any(c.__module__.startswith("torchvision.") for c in DatasetFolder.__mro__)
    assert torchvision.datasets.ImageFolder.__mro__[1].__name__ == "DatasetFolder"
    assert isinstance(folder_reader(torch.utils.data.Subset(_image_folder(tmp_path), [0])), FolderReader)


def _image_folder(folder: Path):
    """A torchvision ImageFolder over ``folder`` holding one class of one photo."""
    import torchvision
    from PIL import Image

    root = folder / "cls"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a.png")
    return torchvision.datasets.ImageFolder(str(root.parent))


# ------------------------------------------------------------------------------------------ a text model's weights
def test_a_text_model_module_loads_for_its_weights_alone_as_itself_without_an_image_config():
    """load_model (_100: the LoadedModel made of None; _111: the image config left out of the call, a TypeError): a
    BertModel given as a module with for_images=False (a spectrum, weight-only curves) is the LoadedModel of that
    very module, left as it was (in training mode here), with no image config; for images it is refused."""
    from qkhooks.models.load import load_model
    from test_image_folder_ids_and_text_models import _tiny_bert

    bert = _tiny_bert().train()
    loaded = load_model(bert, for_images=False)
    assert loaded.model is bert and loaded.image_config is None and bert.training  # a module you built stays as it is
    with pytest.raises(QKHooksError, match=r"is a text model \(bert\)"):
        load_model(bert)


# ------------------------------------------------------------------------------------------ a folder run without times
def test_a_folder_run_without_file_times_resumes_with_the_whole_warning(tmp_path, monkeypatch):
    """stream._refuse_changed_files (_125: the warning's stacklevel None, a TypeError out of the resume): a folder's
    run recorded as qkhooks did before the times were stored (test_spectrum_edits_and_dataparallel's case) resumes on its sizes, with
    the one warning read whole, counting the images its reducers' last checkpoint holds (stopped as the second batch
    was handed on: the first batch's 2)."""
    import qkhooks.stream as stream
    from test_review_symlinks_repair_messages import _interrupted
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, [f"a{i}.png" for i in range(8)], seed=0)
    with monkeypatch.context() as older:
        older.setattr(stream, "file_mtime_column", lambda dataset: None)
        _interrupted(loaded, run, batches=2, data=str(folder))
    kept, said = _resumed_warning(loaded, str(folder), run, "modification time")
    assert kept == 2
    assert said == [
        f"{run} was recorded before qkhooks stored each image file's modification time (images/file_mtimes), so this "
        f"resume checks the {kept} images it keeps by their file sizes only: a file replaced since by another of the same "
        "size is not noticed. Record into a new --out (or --overwrite) to have every file checked on a later resume."]


# ------------------------------------------------------------------------------------------ stamps' digest and sink
def test_a_digest_that_reads_minus_one_is_stored_as_minus_two_and_others_as_they_read():
    """items.digest_value (_17: -2 kept, -1 let through, so a file whose hash reads -1 would be stored as "no
    file"): the 8 bytes little-endian signed, -1 alone moved to -2."""
    from qkhooks.data.items import digest_value

    class Digest:
        def __init__(self, data: bytes):
            self.data = data

        def digest(self) -> bytes:
            return self.data

    assert digest_value(Digest(b"\xff" * 8)) == -2
    assert digest_value(Digest(b"\xfe" + b"\xff" * 7)) == -2
    assert digest_value(Digest(bytes([5, 0, 0, 0, 0, 0, 0, 0]))) == 5
    data = b"qkhooks"
    assert digest_value(hashlib.blake2b(data, digest_size=8)) == int.from_bytes(
        hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def test_a_writer_sink_asked_for_stamps_refuses_a_batch_without_one_per_image():
    """WriterSink.update (_33: ``and`` for ``or``: a batch without stamps raised a TypeError, and one with too few
    was written with a column shorter than its ids): the refusal, whole, for both, and nothing written."""
    from qkhooks.store import format as fmt
    from qkhooks.stream import WriterSink

    class Writer:
        layout_arrays = None

        def __init__(self):
            self.batches = []

        def write_static(self, name, value):
            pass

        def write_batch(self, ids, arrays):
            self.batches.append((ids, arrays))

    writer = Writer()
    sink = WriterSink(writer, stamped=[fmt.FILE_SIZES, fmt.FILE_MTIMES, fmt.FILE_HASHES])
    for meta, carries in (({}, "none"), ({"file_stamps": [(10, 20, 30)]}, "1")):
        with pytest.raises(QKHooksError) as refused:
            sink.update(BatchCapture(["a", "b"], meta, {}))
        assert str(refused.value) == (
            f"WriterSink was asked to store {fmt.FILE_SIZES} from the batches' file stamps, but a batch of 2 images "
            f"carries {carries}; read the images inside qkhooks.data.items.stamps_read() and pass each one's stamp as "
            "meta['file_stamps'], or give WriterSink file_sizes= / file_mtimes= / file_hashes= instead.")
    assert writer.batches == []
    sink.update(BatchCapture(["a", "b"], {"file_stamps": [(10, 20, 30), (11, 21, 31)]}, {}))
    (ids, arrays), = writer.batches
    assert ids == ["a", "b"] and {k: v.tolist() for k, v in arrays.items()} == {
        fmt.FILE_SIZES: [10, 11], fmt.FILE_MTIMES: [20, 21], fmt.FILE_HASHES: [30, 31]}


def test_a_torch_dataset_opened_with_a_limit_gives_that_many_items():
    """sources.open_source (_141: the limit dropped for a map-style torch Dataset or a sequence): 5 arrays, limit 2:
    the stream holds and yields the first 2, by position, as a list does."""
    from qkhooks.data.sources import open_source

    class Arrays(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.full((16, 16, 3), 40 * i, np.uint8)

    for data in (Arrays(), [Arrays()[i] for i in range(5)]):
        stream = open_source(data, CFG, limit=2)
        got = [item for batch in stream.batches(4) for item in batch.items]
        assert [item["id"] for item in got] == ["0", "1"]
