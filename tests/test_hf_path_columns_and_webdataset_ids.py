"""Round 38, helper FIX: five small inconsistencies, each with the test that failed before its fix.

1. A Hugging Face dataset whose image column holds file paths names each row by its path (as a list of paths does).
2. A ``webdataset.WebDataset`` object's samples keep the image member's letter case, as ``wds:`` does.
3. Hugging Face columns that are not read are named in one warning a run, as a dict's unread keys are.
4. A same-object probability that is 1 by construction (chance 1: every image counted holds one object) is flagged.
5. Negative layers in ``analyze modes`` count from the model's last block, as ``record(layers=...)`` does.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import qkhooks
from qkhooks.data import ImageConfig, open_source
from qkhooks.errors import QKHooksError
from test_user_data_items import stop_after

CFG = ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3)


def _loaded(depth: int = 2):
    from qkhooks.models.load import LoadedModel

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, embed_dim=32,
                              depth=depth, num_heads=4, num_classes=0).eval()
    return LoadedModel(model=model, spec="tiny", image_config=CFG)


def _photos(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _stream(stream) -> tuple[list[str], list[torch.Tensor], list[tuple[str, str]]]:
    ids, pixels, failures = [], [], []
    for batch in stream.batches(2):
        ids += [item["id"] for item in batch.items]
        pixels += [item["pixel_values"] for item in batch.items]
        failures += batch.failures
    return ids, pixels, failures


# ------------------------------------------------------------------ 1. a Hugging Face column of file paths


def test_a_hugging_face_column_of_paths_names_rows_by_path_as_a_list_does_and_refuses_a_path_twice(tmp_path):
    """Rows of a path-string image column without an id column were named by position (0, 1, 2) where a list of the
    same paths is named by the paths; now both give the paths and the same pixels, and one path twice is refused
    before anything is read (it was recorded twice under two position ids)."""
    datasets = pytest.importorskip("datasets")
    paths = _photos(tmp_path / "a", 3)
    ds = datasets.Dataset.from_dict({"image": paths})
    ids, pixels, _ = _stream(open_source(ds, CFG))
    list_ids, list_pixels, _ = _stream(open_source(list(paths), CFG))
    assert ids == list_ids == paths
    for a, b in zip(pixels, list_pixels):
        assert torch.equal(a, b)
    assert _stream(open_source(ds.to_iterable_dataset(), CFG))[0] == paths  # streamed: named alike
    assert open_source(ds, CFG).ids_before(2) == paths[:2]  # what a resume compares, without decoding
    with pytest.raises(QKHooksError, match=rf"items 0 and 2 have the same id {paths[1]!r}.*list each file once"):
        open_source(datasets.Dataset.from_dict({"image": [paths[1], paths[0], paths[1]]}), CFG)
    # an id column still names the rows; a column of images held as bytes (not paths) still has positions (an image
    # opened from a file is kept by datasets as its path, named by it since round 39: the images here are in memory)
    named = datasets.Dataset.from_dict({"image": paths, "id": ["x", "y", "z"]})
    assert _stream(open_source(named, CFG))[0] == ["x", "y", "z"]
    photos = datasets.Dataset.from_dict({"image": [Image.open(p).convert("RGB") for p in paths]}).cast_column(
        "image", datasets.Image())
    assert _stream(open_source(photos, CFG))[0] == ["0", "1", "2"]


def test_resuming_a_run_that_named_path_rows_by_position_is_refused_with_the_reason(tmp_path, monkeypatch):
    """A run of an earlier qkhooks named the rows of a path column 0, 1, ...; resumed now it would go on under path
    ids (and with a changed dataset, onto other images): refused, saying an earlier qkhooks named them by position."""
    datasets = pytest.importorskip("datasets")
    from qkhooks.data import readers

    paths = _photos(tmp_path / "many", 6)
    ds = datasets.Dataset.from_dict({"image": paths})
    loaded, out = _loaded(), tmp_path / "hf.h5"
    kw = dict(layers="0", modes=2, batch_size=2, progress=False, checkpoint_every=1)
    stop = stop_after(2)

    with monkeypatch.context() as old:  # the earlier naming: positions, and no ids listed without decoding
        old.setattr(readers._HFReader, "row_id", lambda self, row, position: str(position))
        old.setattr(readers._HFReader, "mask_layouts", lambda self, stop: None)
        with pytest.raises(KeyboardInterrupt):
            qkhooks.record_dataset(loaded, ds, out, on_batch=stop, **kw)
    with qkhooks.open_run(out) as run:
        assert list(run.ids) == [str(i) for i in range(run.n)] and run.n >= 2
    with pytest.raises(QKHooksError, match=r"image 0 of the file is '0', the data's is .*img00\.png'.*recorded by an "
                                           r"earlier qkhooks, which named items given as file paths by their position"):
        qkhooks.record_dataset(loaded, ds, out, resume=True, **kw)
    new = tmp_path / "new.h5"  # a new run names them by path
    qkhooks.record_dataset(loaded, ds, new, **kw)
    with qkhooks.open_run(new) as run:
        assert list(run.ids) == paths


# ------------------------------------------------------------------ 3. Hugging Face columns that are not read


def test_hugging_face_columns_that_are_not_read_are_named_once_per_run_as_a_dicts_fields_are():
    """A 'mask' column (a mask under a name qkhooks does not use) and a 'label' were dropped without a word, where the
    same fields of plain dicts are named; now one warning names them, what is read, and masks= for the fix."""
    datasets = pytest.importorskip("datasets")
    n = 5
    ds = datasets.Dataset.from_dict({
        "image": [Image.fromarray(np.full((40, 56, 3), 30 * i, np.uint8)) for i in range(n)],
        "id": [f"x{i}" for i in range(n)], "label": list(range(n)),
        "mask": [Image.fromarray(np.zeros((40, 56), np.uint8)) for _ in range(n)],
    }).cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    for data in (ds, ds.to_iterable_dataset()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, _, _ = _stream(open_source(data, CFG, image_column="image"))
        named = [str(w.message) for w in caught if "not read" in str(w.message)]
        assert ids == [f"x{i}" for i in range(n)]
        assert len(named) == 1, named
        assert "columns 'label', 'mask' are not read" in named[0] and "masks={'objects': 'mask'}" in named[0], named
        assert "the image column 'image', the id column 'id'" in named[0], named
    # a column read as a mask, and a dataset of read columns only, are not named
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _stream(open_source(ds.remove_columns("label"), CFG, image_column="image", masks={"objects": "mask"}))
        _stream(open_source(ds.remove_columns(["label", "mask"]), CFG))


# ------------------------------------------------------------------ 2. a webdataset.WebDataset object's ids


def _encoded(value: int, fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    shape = (40, 56, 3) if mode == "RGB" else (40, 56)
    Image.fromarray(np.full(shape, value, np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _as_webdataset_yields(shard: Path) -> list[dict]:
    """The samples ``webdataset.WebDataset(shard)`` yields (webdataset 1.0's group_by_keys): members grouped by the
    name before the first dot of their base name, keyed by the rest, lower-cased, with ``__key__`` and ``__url__``."""
    samples: list[dict] = []
    with tarfile.open(shard) as tar:
        for member in tar:
            prefix, _, suffix = member.name.rpartition("/")[2].partition(".")
            key = member.name.rpartition("/")[0] + "/" + prefix if "/" in member.name else prefix
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__url__": str(shard)})
            samples[-1][suffix.lower()] = tar.extractfile(member).read()
    return samples


def test_a_webdataset_object_gives_the_ids_images_and_masks_wds_gives_for_the_same_tar(tmp_path):
    """webdataset lower-cases the extensions it keys a sample by, and the object route named p2.JPG 'p2.jpg' where
    wds: keeps 'p2.JPG' (round 37); it also recorded one image of a two-image sample, and read neither NAME.json's
    id nor NAME.objects.png. Now both routes give the same ids, skipped samples, pixels and masks."""
    shard = tmp_path / "mixed.tar"
    _write_tar(shard, [("d/p1.jpg", _encoded(10, "JPEG")), ("d/p1.png", _encoded(20, "PNG")),
                       ("d/p2.JPG", _encoded(30, "JPEG")), ("p3.PNG", _encoded(40, "PNG")),
                       ("p3.json", b'{"id": "three"}'), ("p4.webp", _encoded(50, "WEBP")),
                       ("p5.Png", _encoded(60, "PNG")), ("p5.cls", b"7")])
    masked = tmp_path / "masked.tar"
    mask = np.zeros((40, 56), np.uint8)
    mask[5:20, 10:30] = 3
    _write_tar(masked, [("m1.JPG", _encoded(70, "JPEG")), ("m1.objects.png", _encoded(0, "PNG", "L")),
                        ("m2.png", _encoded(80, "PNG")), ("m2.objects.png", (lambda b: (Image.fromarray(mask).save(
                            b, "PNG"), b.getvalue())[1])(io.BytesIO()))])
    routes = {"list": lambda s: _as_webdataset_yields(s)}
    try:
        import webdataset
    except ImportError:
        webdataset = None
    if webdataset is not None:  # the package's own reader, undecoded
        routes["webdataset"] = lambda s: webdataset.WebDataset(str(s), shardshuffle=False)
    for tar in (shard, masked):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # p5.cls: named as unread, in both routes
            reference = open_source(f"wds:{tar}", CFG)
            ids, pixels, failures = _stream(reference)
            masks = [item.get("objects") for batch in reference.batches(2) for item in batch.items]
            for name, route in routes.items():
                stream = open_source(route(tar), CFG)
                got_ids, got_pixels, got_failures = _stream(stream)
                assert got_ids == ids, (name, got_ids, ids)
                assert [f[0] for f in got_failures] == [f[0] for f in failures], name
                assert all("more than one image" in f[1] for f in got_failures), got_failures
                assert stream.has_masks == reference.has_masks, name
                for a, b in zip(got_pixels, pixels):
                    assert torch.equal(a, b), name
                got_masks = [item.get("objects") for batch in stream.batches(2) for item in batch.items]
                for a, b in zip(got_masks, masks):
                    assert (a is None and b is None) or torch.equal(a, b), name
    assert ids == ["m1.JPG", "m2.png"] and masks[1].max() == 3  # the masked tar, read last
    assert _stream(open_source(f"wds:{shard}", CFG))[0] == ["d/p2.JPG", "three", "p4.webp", "p5.Png"]


# ------------------------------------------------------------------ 4. a p_same that is 1 by construction


def _masked_run(tmp_path: Path, name: str, masks: list[np.ndarray]) -> Path:
    rng = np.random.default_rng(5)
    items = [{"image": rng.integers(0, 255, (48, 48, 3), np.uint8), "objects": m, "id": f"{name}{i}"}
             for i, m in enumerate(masks)]
    out = tmp_path / f"{name}.h5"
    qkhooks.record_dataset(_loaded(), items, out, layers="0,1", modes=2, batch_size=2, progress=False)
    return out


def test_a_one_image_runs_same_object_probability_of_one_at_chance_one_is_flagged_not_reported(tmp_path):
    """One image with one object: each side can only pick it, so every mode scored p_same 1 at chance 1, and the
    layer reported p_same 1.0 as a finding. Now the layer has no value and left_out names why; an image with two
    objects (chance 1/2, checked directly) still gets its value."""
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.same_object import UNINFORMATIVE_NOTE

    one = np.zeros((48, 48), np.int64)
    one[8:24, 8:40] = 4
    summary = analyze_modes(_masked_run(tmp_path, "one", [one]), tmp_path / "one", figure_modes=0, overview=False,
                            images=False, same_object_top=1)
    same = summary["same_object"]
    assert sorted(same["layers"]) == [0, 1]
    for layer, row in same["layers"].items():
        assert row["modes_with_value"] > 0 and row["chance"] == 1.0  # every mode scored, on one object
        assert all(np.isnan(v) for v in (row["p_same"], row["p_same_pooled"], row["p_same_unweighted"])), row
        assert same["left_out"][layer] == UNINFORMATIVE_NOTE
    csv = (tmp_path / "one" / "same_object.csv").read_text().splitlines()
    assert csv[1].split(",")[5] == "nan" and csv[2].split(",")[5] == "1"  # layer row: no value; a mode: 1 beside 1
    from qkhooks.analysis.modes import format_summary

    text = format_summary(summary).splitlines()
    rows = [line for line in text[1:] if line.split()[0].isdigit()]  # the table; under it, why (round 40)
    assert len(rows) == 2 and all(line.split()[4] == "—" and line.split()[5] == "+1.000" for line in rows)  # p_same, chance
    assert all(f"p_same of layer {l} —: {UNINFORMATIVE_NOTE.rstrip('.')}." in text for l in (0, 1))

    two = one.copy()
    two[30:44, 8:40] = 7  # a second object: chance 1/2, and p_same says which the sides pick
    summary = analyze_modes(_masked_run(tmp_path, "two", [two]), tmp_path / "two", figure_modes=0, overview=False,
                            images=False, same_object_top=1)
    same = summary["same_object"]
    assert same["left_out"] == {}
    for row in same["layers"].values():
        assert row["chance"] == 1 / len(np.unique(two[two > 0]))
        assert 0.0 <= row["p_same"] <= 1.0


# ------------------------------------------------------------------ 5. negative layers in analyze modes


def test_analyze_modes_counts_negative_layers_from_the_models_last_block_as_record_does(tmp_path, capsys):
    """A 4-block model recorded at layers 1 and 2: record(layers=-1) means block 3, but `analyze modes --layers -1`
    analysed block 2 (the highest recorded). Now -1 is block 3 and refused naming the recorded layers; -2 is block
    2, the same layer record(layers=-2) records; a run file without the model's blocks refuses negative layers."""
    import h5py

    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.cli import main
    from qkhooks.models.base import select_layers
    from qkhooks.stream import model_sites

    loaded = _loaded(depth=4)
    rng = np.random.default_rng(2)
    photos = [rng.integers(0, 255, (48, 48, 3), np.uint8) for _ in range(3)]
    out = tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, photos, out, layers="1,2", modes=2, batch_size=2, progress=False)
    every = model_sites(loaded.model, False)
    assert [s.layer for s in select_layers(every, "-1")] == [3] and [s.layer for s in select_layers(every, "-2")] == [2]
    with pytest.raises(QKHooksError, match=r"layer -1 is the model's block 3 .*did not record; it has layers \[1, 2\]"):
        analyze_modes(out, tmp_path / "a", layers="-1", images=False, figure_modes=0, overview=False)
    assert not (tmp_path / "a").exists()
    summary = analyze_modes(out, tmp_path / "b", layers="-2", images=False, figure_modes=0, overview=False)
    assert [entry["layer"] for entry in summary["layers"]] == [2]
    assert main(["analyze", "modes", str(out), "--out", str(tmp_path / "c"), "--layers", "-1", "--no-images"]) == 2
    assert "layer -1 is the model's block 3" in capsys.readouterr().err
    with h5py.File(out, "r+") as f:  # as a run of an earlier qkhooks: no model_layers in model/info
        import json

        info = json.loads(f["model"].attrs["info"])
        assert info.pop("model_layers") == [0, 1, 2, 3]
        f["model"].attrs["info"] = json.dumps(info)
    with pytest.raises(QKHooksError, match=r"does not store how many blocks the model has.*the run has layers \[1, 2\]"):
        analyze_modes(out, tmp_path / "d", layers="-2", images=False, figure_modes=0, overview=False)
    assert [e["layer"] for e in analyze_modes(out, tmp_path / "e", layers="2", images=False, figure_modes=0,
                                              overview=False)["layers"]] == [2]
