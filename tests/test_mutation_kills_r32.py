"""Kill tests for the mutants of the library code of rounds 31 and 32 (``4a07a01..fcb421f``: each layer's geometry
read in its hook and its own prefix tokens, GroupViT's segment tokens, the refusals of windows and mixed batch axes, a
failed forward's batch dropped, a merged view's missing shards refused; the float16 overflow refusals,
``Reducer.images_held``, same-object's chance per layer) that their tests let survive (module "round32" of
tests/mutation.py, ``--only ROUND32``; tests/MUTATION.md's "round 32" section names each); and the harness's round32
module kept consistent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.analysis.anisotropy import AnisotropyReducer
from qkhooks.analysis.topk import TopKModes
from qkhooks.errors import QKHooksError
from qkhooks.models.base import find_sites

from test_float16_overflow_and_held_reducers import _images, _tiny  # a 2-layer ViT of 32-pixel images, 8-pixel patches (CLS + 16 tokens)
from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round32
def test_the_round32_module_names_files_and_tests_that_exist_and_rounds_31_and_32s_commits():
    """The harness's module "round32" and its named set ROUND32: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the 13 library commits
    of ``4a07a01..fcb421f``, and every library file they changed is mutated."""
    check_round_module("round32", "ROUND32", "4a07a01", "fcb421f", library_commits=13)


# ------------------------------------------------------------------- reducers' repr: the images they hold
def test_the_anisotropy_reducers_repr_names_its_layers_and_the_images_it_holds():
    """``AnisotropyReducer.__repr__`` ``_1`` (``sorted(None)``: a TypeError for any repr): the repr names the layers folded
    and the images held, here 3 images at layers 0 and 1 of a 2-layer ViT."""
    reducer, model = AnisotropyReducer(), _tiny()
    assert repr(reducer) == "AnisotropyReducer(layers=[], images=0)"
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[reducer]) as run:
        run(_images(3))
    assert repr(reducer) == "AnisotropyReducer(layers=[0, 1], images=3)"


# ------------------------------------------------------------------- models/hf.py: GroupViT's segment tokens
def test_groupvits_segment_layers_refuse_every_grid_naming_the_layer_its_path_and_why():
    """``_UngriddedSite.grid_for_image`` ``_1`` (the refusal raised with no message): a GroupViT layer after a grouping
    stage refuses a grid for an image size as it does for a token count, in the same whole sentence naming the layer,
    its module path and that its tokens are segments."""
    from test_layer_geometry_in_hooks import _groupvit

    sites = find_sites(_groupvit())
    segment = sites[1]
    assert type(segment).__name__ == "SegmentTokenSite"
    said = (f"layer 1 ({segment.path}): GroupViT's tokens after a grouping stage are segments (soft groups of patches), "
            "not patches, so no token is a position of the patch grid; its maps and modes are exact token by token.")
    for ask in (lambda: segment.grid_for_image(32, 32), lambda: segment.grid_for(16)):
        with pytest.raises(QKHooksError) as refused:
            ask()
        assert str(refused.value) == said


# ------------------------------------------------------------------- report.py: the same-object readings
@pytest.fixture(scope="module")
def modes_report(tmp_path_factory):
    """report.modes_sections on a 3-layer ViT (2 photos; 2 masked photos and 6 object displays), every compare_reading call it makes kept
    (passed on unchanged), and the modes.json of its same-object analysis."""
    import timm

    import qkhooks.report as report

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=3,
                              num_heads=4).eval()
    out = tmp_path_factory.mktemp("modes_report")
    (out / "runs").mkdir()
    calls = []
    real = report.compare_reading

    def kept(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "compare_reading", kept)
        sections = report.modes_sections(qkhooks.load_model(model), out / "runs", out, "samples", 2,
                                         report.OBJECTS.format(n=6), dict(batch_size=4, device="cpu", progress=False,
                                                                          input="normed"), "max", False)
    same = json.loads((out / "same_object" / "modes.json").read_text())["same_object"]
    return {s.key: s for s in sections}, calls, same


def test_the_report_reads_each_heads_same_object_probability_against_the_chance_of_its_own_images(modes_report):
    """``modes_sections`` ``_334`` (no chance per head), ``_369`` / ``_370`` (None for either side) and ``_382`` (the
    comparison without PROBABILITY's limits): the same-object section's second reading compares each head's p_same with
    the chance over the images that p_same counts (modes.json's ``per_head`` and ``chance_per_head``, heads x layers),
    as probabilities, and its per-layer estimates are the mean over heads of their difference."""
    from qkhooks.readings import PROBABILITY

    sections, calls, same = modes_report
    layers = sorted(int(l) for l in same["layers"])
    per_head = np.array([same["layers"][str(l)]["per_head"] for l in layers]).T  # (heads, layers)
    chance = np.array([same["layers"][str(l)]["chance_per_head"] for l in layers]).T
    assert layers == [0, 1, 2] and per_head.shape == chance.shape == (4, 3)
    assert not np.allclose(chance, same["chance"])  # each head's own images: not the data set's one number
    (args, kwargs), = [c for c in calls if c[0][3] == "The same-object probability"]
    np.testing.assert_allclose(args[0], per_head)
    np.testing.assert_allclose(args[1], chance)
    assert list(args[2]) == layers and args[4:] == ("the chance of the same images", "heads")
    assert kwargs == {"limits": PROBABILITY}
    reading = sections["same_object"].readings[1]
    assert reading.text.startswith("The same-object probability vs the chance of the same images: ")
    for i, l in enumerate(layers):
        assert reading.estimates[f"L{l}"].value == pytest.approx((per_head[:, i] - chance[:, i]).mean(), abs=1e-6)


def test_a_preference_reducer_that_folded_nothing_holds_zero_images():
    """``PreferenceReducer.images_held`` ``_2`` (None for no images): a fresh reducer holds 0 images (a number a recording
    compares with what it gave), and says so in its repr."""
    from qkhooks.analysis.preference import PreferenceReducer

    reducer = PreferenceReducer()
    assert reducer.images_held() == 0
    assert repr(reducer) == "PreferenceReducer(layers=[], images=0)"
    reducer.count = {2: 5, 4: 7}  # as folds leave it: images per layer; it holds the most any layer saw
    assert reducer.images_held() == 7


# ------------------------------------------------------------------- reducers.py: the overflow refusal's words
@pytest.mark.parametrize("ids, named", [(["a", "b"], "image(s) ['b'] "), (["a"], "image(s) "), ([], "image(s) ")])
def test_the_overflow_refusal_names_the_images_by_id_where_the_batch_has_one_each_else_by_place(ids, named):
    """``_refused_images`` ``_41`` ("IMAGE(S)" where the batch's ids do not name each image): refuse_overflow's whole
    sentence for a (layers, images) table of peaks where image 1 at layer 5 is past float16 (70000 rounds to inf,
    65000 to 65024), by id where the batch has one id an image, by position and global index otherwise."""
    import types

    from qkhooks.reducers import refuse_overflow

    peaks = torch.tensor([[1.0, 6.5e4], [2.0, 7.0e4]])  # layers 3 and 5, images 0 and 1
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(7.0e4)) and np.isfinite(np.float16(6.5e4))  # the reference: numpy's cast
    batch = types.SimpleNamespace(ids=ids, offset=10)
    with pytest.raises(QKHooksError) as refused:
        refuse_overflow(peaks, [3, 5], batch, "R", "maps", torch.float16, "Use float32.")
    assert str(refused.value) == (
        f"R: the maps of {named}at position(s) [1] of this batch (image index [11]) reach |x| = 70000 at layer(s) [5], "
        "beyond float16's range (65504), and would be kept as inf; the whole batch is refused and the reducer's state "
        "is unchanged. Use float32.")
    refuse_overflow(peaks[:, :1], [3, 5], batch, "R", "maps", torch.float16, "Use float32.")  # image 0 fits: no refusal


# ------------------------------------------------------------------- models/load.py: the reader's error in one line
def test_the_readers_error_is_its_class_and_first_line_cut_at_300_characters():
    """``_reader_error`` ``_4`` ("XXXX" for an error without a message) and ``_8`` (no "..." after a cut line): the
    refusal quotes the reader's error as its class and its first line, the first 300 characters of it and "..." where
    it was longer."""
    from qkhooks.models.load import _reader_error

    assert _reader_error(OSError()) == "OSError: "
    assert _reader_error(ValueError("  bad config\nknown types: a, b, c\n")) == "ValueError: bad config"
    assert _reader_error(ValueError("x" * 300 + "\nmore")) == "ValueError: " + "x" * 300
    assert _reader_error(ValueError("y" * 301)) == "ValueError: " + "y" * 300 + "..."


# ------------------------------------------------------------------- data/readers.py: a skipped item's id
def test_an_unreadable_item_that_is_no_dict_is_listed_as_skipped_under_its_position(tmp_path):
    """``MapReader.row_id`` ``_8`` (``or`` for ``and``: ``.get`` asked of bytes) and ``_13`` (``str(None)``): a list of
    raw image bytes, the second unreadable, records the others under their positions and lists the lost one under its
    own position, "1" (a dict without an id, likewise)."""
    import io
    import warnings

    import h5py
    from PIL import Image

    def png(value):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    model = _tiny()
    for i, items in enumerate(([png(90), b"not an image", png(30)],
                               [{"image": png(90)}, {"image": b"not an image"}, {"image": png(30)}])):
        out = tmp_path / f"run{i}.h5"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = qkhooks.record_dataset(model, items, out, modes=None, progress=False, batch_size=2)
        with h5py.File(out) as f:
            recorded = [x.decode() for x in f["images/ids"][()]]
            skipped = [x.decode() for x in f["images/skipped"][()][:, 0]]
        assert recorded == ["0", "2"] and skipped == ["1"] and [s[0] for s in result.skipped] == ["1"]


# ------------------------------------------------------------------- store/reader.py: a missing shard's rows
def test_a_missing_shard_that_starts_at_or_past_the_committed_images_holds_none_of_them(tmp_path):
    """``missing_shard_rows`` ``_10`` (``lo <= n``): a shard file that is gone, holding rows [4, 8) of a view of which
    4 images are committed, holds none of them (no refusal); with 5 committed it holds image 4, and with 10 images 4-7."""
    from qkhooks.store.reader import missing_shard_rows

    folder = tmp_path
    (folder / "here.h5").touch()
    sources = [("here.h5", 0, 4), ("gone.h5", 4, 8)]
    assert missing_shard_rows(None, folder, 4, sources) == []
    assert missing_shard_rows(None, folder, 5, sources) == [(4, 5)]
    assert missing_shard_rows(None, folder, 10, sources) == [(4, 8)]
    assert missing_shard_rows(None, folder, 3, sources) == []


# ------------------------------------------------------------------- analysis/modes.py: k smaller than the state's
def test_analyze_modes_with_a_smaller_k_lists_that_many_images_per_mode_the_best_of_the_states(tmp_path):
    """``analyze_modes`` ``_76`` (the state not cut to ``k``): a run whose TopKModes kept 4 images per mode, read with
    k=2, says k=2 and lists each mode's best 2 images, the first 2 of the 4 it lists read with the state's own k."""
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.topk import TopKModes
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    folder = tmp_path
    loaded = LoadedModel(model=_tiny(size=48), spec="tiny",
                         image_config=ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3))
    qkhooks.record_dataset(loaded, "o3:6:2", folder / "run.h5", modes=2, batch_size=4, progress=False, dtype="float32",
                           store_modes=False, reducers=[TopKModes(k=4, map_dtype="float32")])
    read = {k: analyze_modes(folder / "run.h5", folder / f"k{k}", k=k, same_object_top=2, figure_modes=0,
                             overview=False, images=False) for k in (None, 2)}
    assert read[None]["k"] == 4 and read[2]["k"] == 2
    for full, cut in zip(read[None]["layers"], read[2]["layers"]):
        for head_full, head_cut in zip(full["heads"], cut["heads"]):
            for mode_full, mode_cut in zip(head_full["modes"], head_cut["modes"]):
                assert len(mode_full["top"]) == 4 and mode_cut["top"] == mode_full["top"][:2]


# ------------------------------------------------------------------- stream.py: record_dataset's held-images refusal
def test_record_dataset_refuses_a_reducer_holding_even_one_image_also_when_it_overwrites_a_run(tmp_path):
    """record_dataset is decorated (mutmut leaves it): its round-32 lines mutated by hand, ``resume and`` / ``and
    Path(out).exists()`` made ``or`` (an overwrite of an existing run skipped the refusal), ``out is None`` for ``out
    is not None`` (a resume refused) and ``refuse_sinks_holding_images(reducers, 1)`` (one image held let through): a
    reducer that holds one image of an earlier recording is refused before an overwrite touches the run file, which
    keeps its images; a resume takes it, its state replaced by the run's."""
    import h5py

    from test_float16_overflow_and_held_reducers import _photos

    model = _tiny()
    folder = tmp_path / "photos"
    _photos(folder)
    out = tmp_path / "run.h5"
    qkhooks.record_dataset(model, str(folder), out, modes=None, progress=False, reducers=[AnisotropyReducer()])
    held = AnisotropyReducer()
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[held]) as run:
        run(_images(1))
    with pytest.raises(QKHooksError) as refused:
        qkhooks.record_dataset(model, str(folder), out, modes=None, progress=False, overwrite=True, reducers=[held])
    assert str(refused.value) == (
        "this AnisotropyReducer already holds 1 images from an earlier recording, and this recording has given it 0: its "
        "image indices start again here, so one index would name two images. Keep one recording open for all the "
        "batches (with qkhooks.record(model, sinks=[...]) as run: for x in loader: run(x)), give each recording a fresh "
        "AnisotropyReducer(...), or continue a run file with resume=True.")
    with h5py.File(out) as f:
        assert [x.decode() for x in f["images/ids"][()]] == ["0.png", "1.png", "2.png"]
    assert held.images_held() == 1
    resumed = qkhooks.record_dataset(model, str(folder), out, modes=None, progress=False, resume=True, reducers=[held])
    assert resumed.resumed_from == 3 and held.images_held() == 3  # the run's state, not the one image it held


# ------------------------------------------------------------------- reducers.py: Recipe.reducers hands on its arguments
def test_a_recipe_hands_its_build_every_argument_as_given_with_or_without_the_dtype():
    """``Recipe.reducers`` ``_13`` / ``_21`` (None for ``has_target``, with and without the dtype): a build gets modes,
    attention specs and has_target as given (the default recipe adds the preference reducer only for a target), and a
    build that takes ``dtype`` the run's dtype."""
    from qkhooks.attention import parse_attention
    from qkhooks.analysis.preference import PreferenceReducer
    from qkhooks.reducers import Recipe, recipe

    seen = []
    specs = parse_attention(["rows"])
    takes = Recipe("takes", build=lambda modes, attention, has_target, dtype: seen.append(
        (modes, attention, has_target, dtype)) or [])
    plain = Recipe("plain", build=lambda modes, attention, has_target: seen.append((modes, attention, has_target)) or [])
    for has_target in (True, False):
        takes.reducers(16, specs, has_target, "float32")
        plain.reducers(16, specs, has_target, "float32")
    assert seen == [(16, specs, True, "float32"), (16, specs, True), (16, specs, False, "float32"), (16, specs, False)]
    made = recipe("default").reducers(16, specs, True)
    assert [type(r).__name__ for r in made] == ["TopKModes", "AnisotropyReducer", "PreferenceReducer"]
    assert not any(isinstance(r, PreferenceReducer) for r in recipe("default").reducers(16, specs, False))


# ------------------------------------------------------------------- analysis/topk.py: _map_peaks over every token
@pytest.mark.parametrize("stacked", [False, True], ids=["per layer", "stacked"])
@pytest.mark.parametrize("key_prefix", [None, 2], ids=["keys of the queries' prefix", "reduced keys' own prefix"])
def test_map_peaks_are_each_layers_and_images_largest_finite_value_over_every_token_of_both_maps(stacked, key_prefix):
    """``_map_peaks`` ``_11`` (key_prefix None), ``_12`` (the query side's prefix never taken for the keys') and ``_16``
    (the query side's prefix read off the keys): the peak of each (layer, image) is the largest finite |value| of its
    query and key maps over all their tokens, prefix tokens included (a class token's massive activation on one side
    alone, 70000 on the key side, 80000 on the query side, is found), the model's own inf and NaN left out; numpy over
    the whole maps is the reference."""
    from qkhooks.analysis.topk import _layer_extremes, _map_peaks, _stacked_maps

    g = torch.Generator().manual_seed(0)
    maps = [(layer, torch.randn(3, 2, 2, 6, generator=g), torch.randn(3, 2, 2, 7, generator=g)) for layer in (0, 1)]
    maps[1][2][1, 0, 1, 0] = -7.0e4  # layer 1, image 1: the key map's first (prefix) token
    maps[1][2][1, 1, 0, 1] = 5.0e3  # its second: a prefix token of reduced keys, a patch token otherwise
    maps[0][1][2, 1, 1, 0] = float("inf")  # the model's own inf and NaN in the query map's prefix token
    maps[0][1][2, 0, 0, 0] = 8.0e4  # layer 0, image 2: the query map's prefix token
    maps[0][2][0, 0, 0, 0] = float("nan")
    stack = _stacked_maps(maps) if stacked else None
    extremes = _layer_extremes(maps, 1, key_prefix, stack)
    peaks = _map_peaks(maps, 1, key_prefix, extremes, stack)
    reference = np.array([[max(np.nan_to_num(np.abs(m[i].numpy()), nan=0.0, posinf=0.0).max() for m in (q, k))
                           for i in range(3)] for _, q, k in maps])
    assert reference[1, 1] == 7.0e4 and reference[0, 2] == 8.0e4
    np.testing.assert_array_equal(peaks.numpy(), reference)


# ------------------------------------------------------------------- analysis/modes.py: same_object.csv
def test_the_same_object_table_lists_each_modes_sigma_cos_and_chance_as_the_summary_weighs_them(tmp_path):
    """``analyze_modes`` ``_445`` (the cos column "nan") and ``_469`` (the header's "head" misspelt): same_object.csv's
    header, each mode's sigma and cos (the run's spectrum), and its chance column, whose sigma-weighted mean over the
    modes with a value is modes.json's chance of the head (``chance_per_head``)."""
    import csv

    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.topk import TopKModes
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    loaded = LoadedModel(model=_tiny(size=48), spec="tiny",
                         image_config=ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3))
    qkhooks.record_dataset(loaded, "o3:6:2", tmp_path / "run.h5", modes=2, batch_size=4, progress=False, dtype="float32",
                           store_modes=False, reducers=[TopKModes(k=4, map_dtype="float32")])
    summary = analyze_modes(tmp_path / "run.h5", tmp_path / "out", same_object_top=3, figure_modes=0, overview=False,
                            images=False)
    with open(tmp_path / "out" / "same_object.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["layer", "head", "mode", "sigma", "cos", "p_same", "p_same_pooled", "p_same_unweighted", "images",
                       "chance"]
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        spectra = {l: {k: np.asarray(v) for k, v in run.spectrum_arrays(l).items()} for l in (0, 1)}
    for layer in (0, 1):
        mine = [r for r in rows[1:] if r[0] == str(layer) and r[1] != "mean"]
        assert len(mine) == 4 * 2  # heads x modes
        chance = np.full((4, 2), np.nan)
        for r in mine:
            h, m = int(r[1]), int(r[2])
            assert float(r[3]) == pytest.approx(spectra[layer]["S"][h, m], rel=1e-5)
            assert float(r[4]) == pytest.approx(spectra[layer]["cos"][h, m], rel=1e-5, abs=1e-6)
            chance[h, m] = float(r[9])
        S = spectra[layer]["S"][:, :2]
        w = np.where(np.isnan(chance), 0.0, S)
        np.testing.assert_allclose((w * np.nan_to_num(chance)).sum(1) / w.sum(1),
                                   summary["same_object"]["layers"][layer]["chance_per_head"], rtol=1e-5)


# ------------------------------------------------------------------- store/reader.py: a merged view's missing shards
def _merged_view(folder):
    """A merged view as merge_shards lays it out: /x of view.h5 reads rows 0-2 from a.h5 and 3-5 from b.h5 (beside it)."""
    import h5py

    data = np.arange(18, dtype=np.float32).reshape(6, 3)
    layout = h5py.VirtualLayout(shape=(6, 3), dtype="f4")
    for name, rows in (("a.h5", slice(0, 3)), ("b.h5", slice(3, 6))):
        with h5py.File(folder / name, "w") as f:
            f["x"] = data[rows]
        layout[rows] = h5py.VirtualSource(name, "x", shape=(3, 3))
    with h5py.File(folder / "view.h5", "w") as f:
        f.create_virtual_dataset("x", layout, fillvalue=np.nan)
    return data


def test_a_merged_views_shard_sources_are_read_once_a_handle_and_a_gone_shard_is_refused_in_a_whole_sentence(
        tmp_path, monkeypatch):
    """``RunArray._refuse_missing_shards`` ``_4`` (the cached sources compared with the wrong item: read again at every
    read) and ``_33`` (the fix's last words upper-cased): a view's sources are read once for its handle, each read
    looks for the shard files again, and a read with one gone is refused in the whole sentence naming the array, the
    file, the images and both fixes."""
    import h5py

    import qkhooks.store.reader as reader

    monkeypatch.chdir(tmp_path)  # HDF5 finds the shards beside the view
    data = _merged_view(tmp_path)
    calls = []
    real = reader.shard_sources
    monkeypatch.setattr(reader, "shard_sources", lambda ds: calls.append(ds.name) or real(ds))
    with h5py.File(tmp_path / "view.h5", "r") as f:
        array = reader.RunArray(f["x"], 6)
        assert np.array_equal(array[:], data) and np.array_equal(array[4], data[4])
        assert calls == ["/x"]  # once for the handle, not once a read
        (tmp_path / "b.h5").rename(tmp_path / "moved.h5")
        with pytest.raises(QKHooksError) as refused:
            array[0]
        assert calls == ["/x"]
    assert str(refused.value) == (
        f"/x of {tmp_path / 'view.h5'} is a merged view that reads its images from the shard files beside it, and the "
        "shard(s) holding images 3-5 are missing there, so HDF5 would read those images as NaN without an error. Put "
        "the shard files back next to the merged file (`qkhooks info --verify` lists them), or merge again with "
        "copy=True (a self-contained file) while they are there.")


def test_shard_sources_are_each_shards_file_and_rows_and_a_gone_first_shard_names_its_own_images(tmp_path, monkeypatch):
    """``shard_sources`` ``_10`` (each source's stop one row too far): the view's sources are (file, first row, last
    row + 1) as laid out, [] for a plain dataset, and with the first shard gone the refusal names its images 0-2 only."""
    import h5py

    from qkhooks.store.reader import RunArray, shard_sources

    monkeypatch.chdir(tmp_path)
    _merged_view(tmp_path)
    with h5py.File(tmp_path / "view.h5", "r") as f:
        assert shard_sources(f["x"]) == [("a.h5", 0, 3), ("b.h5", 3, 6)]
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert shard_sources(f["x"]) == []
    (tmp_path / "a.h5").rename(tmp_path / "moved.h5")
    with h5py.File(tmp_path / "view.h5", "r") as f:
        with pytest.raises(QKHooksError, match=r"the shard\(s\) holding images 0-2 are missing there"):
            RunArray(f["x"], 6)[5]


# ------------------------------------------------------------------- analysis/topk.py: the non-finite refusal's words
def test_topk_refuses_a_nan_image_in_the_whole_sentence_naming_the_maps_it_checked():
    """``TopKModes.update`` ``_165`` / ``_167`` (the reducer misnamed) and ``_168`` (what was checked misnamed), lines
    round 32 moved under the one check of finite and in-range maps: an image of NaN pixels is refused in the whole
    sentence naming TopKModes, the maps' extremes over the patch tokens, the image and every layer; nothing is kept."""
    model = _tiny()
    images = _images(3)
    images[1] = float("nan")
    topk = TopKModes(k=2)
    with pytest.raises(QKHooksError) as refused:
        with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[topk]) as run:
            run(images)
    assert str(refused.value) == (
        "TopKModes: the query/key maps (their extremes over the patch tokens) of image(s) ['1'] at position(s) [1] of "
        "this batch (image index [1]) are not finite (NaN or inf) at layer(s) [0, 1]. Folding them would give a wrong "
        "statistic, so the whole batch is refused and the reducer's state is unchanged (drop these images and go on). "
        "Likely causes: NaN or inf pixels in the input (check torch.isfinite(pixel_values)), or a model run in float16 "
        "whose activations overflow (compute in float32: model.float(), or bfloat16).")
    assert topk.images_held() == 0


# ------------------------------------------------------------------- bfd_reducers.py: images held with no layers
def test_bfd_energies_of_no_layers_hold_zero_images_and_a_recording_takes_them():
    """``BFDEnergies.images_held`` ``_2`` (None) and ``_4`` (``max`` of nothing: ValueError) where the reducer has no
    layers (none of its spectra asked): it holds 0 images, a number, and a recording's check of held images passes."""
    from qkhooks.analysis.bfd_reducers import BFDEnergies

    energies, model = BFDEnergies([], {}), _tiny()
    assert energies.images_held() == 0
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[energies]) as run:
        run(_images(2))
    assert energies.images_held() == 0 and run.images_seen == 2


# ------------------------------------------------------------------- bfd_reducers.py: PositionMeans without tokens
def test_position_means_handed_a_batch_without_its_tokens_refuses_naming_itself_the_layer_and_the_fixes():
    """``PositionMeans.update`` ``_14`` (the refusal's reducer misnamed): a PositionMeans handed whole batches only (no
    take_inputs), of a recording that keeps no tokens, refuses in the whole sentence naming PositionMeans, the layer
    and both fixes, and folds nothing."""
    from qkhooks.analysis.bfd_reducers import PositionMeans

    from test_layer_geometry_in_hooks import _UpdateOnly

    means, model = PositionMeans([0]), _tiny()
    with pytest.raises(QKHooksError) as refused:
        with torch.no_grad(), qkhooks.record(model, modes=None, layers=[0], sinks=[_UpdateOnly(means)]) as run:
            run(_images(2))
    assert str(refused.value) == (
        "PositionMeans got no tokens entering W_q/W_k of layer 0: the recording neither handed them over (it does so "
        "for the sinks it holds as the batch begins) nor kept them; pass this reducer in record(..., sinks=[...]), or "
        "record with keep_inputs=True.")
    assert means.images_held() == 0


# ------------------------------------------------------------------- store/writer.py: GPU arrays' overflow check
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused inf-norm path runs on CUDA arrays only")
def test_a_float16_run_refuses_gpu_arrays_beyond_float16_as_it_refuses_host_arrays(tmp_path):
    """``_overflow`` ``_29`` / ``_31`` / ``_36`` (the fused inf-norm of CUDA arrays: None, no arrays, "XXinfXX"), device-
    only: a batch of CUDA arrays, one image past float16 (70000 rounds to inf), is refused naming the arrays and the
    image, as a host batch is; an in-range CUDA batch is stored as numpy's float16 cast of it."""
    import h5py

    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    fits = torch.tensor([[1.0, -65519.0], [2.0, 3.0]], device="cuda")
    with RunWriter(path) as writer:
        writer.write_batch(["a", "b"], {"x": fits, "y": fits[:, :1].double()})
        big = torch.ones(2, 2, device="cuda")
        big[1, 0] = 7.0e4
        with pytest.raises(QKHooksError, match=r"^x of image\(s\) \['d'\] hold values beyond float16's range \(largest "
                                               r"\|x\| = 70000; float16 ends at 65504\)"):
            writer.write_batch(["c", "d"], {"x": big, "y": torch.ones(2, 1, dtype=torch.float64, device="cuda")})
    with h5py.File(path) as f:
        assert np.array_equal(f["x"][()], np.float16(fits.cpu().numpy()))


# ------------------------------------------------------------------- store/writer.py: beyond a float32 run's range
def test_a_float32_run_refuses_float64_values_beyond_float32_saying_no_run_files_dtype_holds_them(tmp_path):
    """``_overflow`` ``_110`` (the float32 fix's words): a float64 value past float32's range (1e39; numpy's float32 cast
    makes it inf) in a float32 run file is refused in the whole sentence, whose fix is not --dtype float32 but the
    model's inputs, and nothing is written."""
    from qkhooks.store import RunWriter

    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(1.0e39)) and np.isfinite(np.float32(3.0e38))  # the reference: numpy's cast
    path = tmp_path / "run.h5"
    with pytest.raises(QKHooksError) as refused:
        with RunWriter(path, dtype="float32") as writer:
            writer.write_batch(["a", "b"], {"x": np.array([[1.0, 3.0e38], [-1.0e39, 2.0]])})
    assert str(refused.value) == (
        "x of image(s) ['b'] hold values beyond float32's range (largest |x| = 1e+39; float32 ends at 3.40282e+38), "
        "which a float32 run file would store as inf without a word; the batch is refused. No run file's dtype holds "
        "them: they are an overflow upstream of the recording; check the model's inputs. Nothing was written; apply "
        "the fix above and run again.")
