"""Tests written to kill mutants of the I/O and statistics modules (reducers, stream, store, data/preprocess, the
analyses' statistics, capture, models) that survived the rest of the suite (tests/MUTATION.md, round 10), each
against an independent reference: numpy, a direct computation, or a run file read back with h5py."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from qkhooks import QKHooksError, load_model
from qkhooks.access import LayerGeometry
from qkhooks.analysis.modes import TopKModes
from qkhooks.attention import parse_attention
from qkhooks.data import ImageConfig
from qkhooks.store.reader import open_run
from qkhooks.stream import record_dataset
from conftest import TINY_MODELS

ASYMMETRIC_TIMM = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6")  # 4 x 6 patches, mean != std


@pytest.fixture(scope="module")
def loaded():
    model = ASYMMETRIC_TIMM.model()
    return load_model(model, image_config=ImageConfig.from_timm(model))


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _no_address(text: str) -> str:
    """A decoder's message without the object address it names (``<_io.BytesIO object at 0x7f...>``)."""
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def _contents(path: Path) -> dict:
    """What a run holds, decoder messages without their object addresses (they differ from run to run)."""
    with open_run(path) as run:
        return {"ids": run.ids, "skipped": [(i, _no_address(why)) for i, why in run.skipped],
                "arrays": {name: run.array(name)[:] for name in run.arrays()},
                "states": {name: {k: _no_address(v) if isinstance(v, str) else np.asarray(v)
                                  for k, v in run.state(name).items()} for name in run.states()}}


def _same_run(path_a: Path, path_b: Path) -> None:
    """Two run files hold the same images, skipped list, arrays and reducer states."""
    a = _contents(path_a)
    assert a["arrays"] and a["states"]
    np.testing.assert_equal(a, _contents(path_b))


# ------------------------------------------------------------------------------------------------ stream
def _geometry(layer, grid=(4, 6), prefix=1, queries=25) -> LayerGeometry:
    return LayerGeometry(layer=layer, grid=grid, num_prefix_tokens=prefix, query_tokens=queries, key_tokens=queries,
                         key_grid=grid, key_prefix_tokens=prefix)


# layers 2, 4, 5 each differ from layer 0 in one thing only: the grid (rows and cols swapped), the prefix, the queries;
# the dict is not in layer order, so "the first layer" must be the lowest, not the first key
MIXED = {3: _geometry(3), 0: _geometry(0), 2: _geometry(2, grid=(6, 4)), 1: _geometry(1),
         4: _geometry(4, prefix=2), 5: _geometry(5, queries=26)}


def test_rows_are_refused_on_layers_whose_tokens_differ_from_the_lowest_layers_in_grid_prefix_or_count():
    from qkhooks.stream import _check_rows_geometry, same_layout_layers

    assert same_layout_layers(MIXED) == [0, 1, 3]
    for kind in ("rows", "pooled"):
        with pytest.raises(QKHooksError) as err:
            _check_rows_geometry(parse_attention(kind), MIXED)
        assert str(err.value) == (
            f"attention {kind!r} picks query tokens by their index in layer 0's tokens (grid 4x6 + 1 prefix, 25 queries), "
            f"but layers [2, 4, 5] have other tokens (grid 6x4 + 1 prefix, 25 queries); record {kind!r} on the layers "
            f"that share layer 0's grid (e.g. --attention {kind}:0,1,3), or full maps.")
    _check_rows_geometry(parse_attention("rows:0,1,3+full"), MIXED)  # rows only where the layout is layer 0's
    with pytest.raises(QKHooksError, match=r"but layers \[4\] have other tokens \(grid 4x6 \+ 2 prefix"):
        _check_rows_geometry(parse_attention("rows:1,4"), MIXED)


class _Site:
    """What rows_layers reads of a site: its layer, path, kind check and class attention."""

    def __init__(self, layer, refuse=None, class_attention=False):
        self.layer, self.path, self.class_attention, self._refuse = layer, f"blocks.{layer}.attn", class_attention, refuse

    def check_attention_kind(self, kind):
        assert kind == "rows"
        if self._refuse:
            raise QKHooksError(self._refuse)


def test_rows_layers_keep_the_layers_laid_out_as_the_first_candidate_and_say_why_each_other_is_left_out(monkeypatch):
    import qkhooks.stream as stream

    geometry = {0: _geometry(0, grid=(2, 3), queries=7), 1: _geometry(1), 2: _geometry(2), 3: _geometry(3, grid=(6, 4)),
                4: _geometry(4)}
    seen = []
    monkeypatch.setattr(stream, "probe_geometry", lambda net, sites, size, device: seen.append((size, device)) or geometry)
    sites = [_Site(0, refuse="windowed: a row lives in its window"), _Site(1), _Site(2, class_attention=True), _Site(3),
             _Site(4)]
    kept, left_out = stream.rows_layers(None, sites, (32, 48), "cpu")
    assert seen == [((32, 48), "cpu")]
    assert kept == [1, 4]
    assert left_out == {
        0: "windowed: a row lives in its window",
        2: "blocks.2.attn: only the class token queries (class attention), not the image's tokens",
        3: "its tokens (grid 6x4 + 1 prefix, 25 queries) are not layer 1's (grid 4x6 + 1 prefix, 25 queries), and one "
           "batch's query tokens index one layout",
    }
    assert stream.rows_layers(None, [_Site(2, class_attention=True)], (32, 48)) == (
        [], {2: "blocks.2.attn: only the class token queries (class attention), not the image's tokens"})


def test_default_workers_are_none_on_the_cpu_and_the_cores_but_one_up_to_four_beside_an_accelerator(monkeypatch):
    import qkhooks.stream as stream

    for cores, expected in ((1, 0), (2, 1), (4, 3), (5, 4), (16, 4)):
        monkeypatch.setattr(stream.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert stream.default_workers("cpu") == 0
        assert stream.default_workers("meta") == expected, cores
    monkeypatch.delattr(stream.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(stream.os, "cpu_count", lambda: 3)
    assert stream.default_workers(torch.device("meta")) == 2
    monkeypatch.setattr(stream.os, "cpu_count", lambda: None)
    assert stream.default_workers("meta") == 0


def test_batch_meta_refuses_another_input_size_and_reads_the_lowest_layers_prefix_and_grid():
    from qkhooks.data.masks import token_cells
    from qkhooks.reducers import Recipe
    from qkhooks.stream import _batch_meta

    plan = Recipe("probe", meta=lambda batch, meta: {"arrays": {"seen": dict(meta)}})
    geometry = {3: _geometry(3, grid=(2, 3), prefix=0, queries=6), 1: _geometry(1, grid=(4, 6), prefix=2, queries=26)}
    cells = {(4, 6): token_cells((32, 48), (4, 6))}
    meta = _batch_meta({"pixel_values": torch.zeros(1, 3, 32, 48)}, geometry, (32, 48), cells, plan)
    assert meta["num_prefix_tokens"] == 2 and meta["grid"] == (4, 6) and meta["geometry"] is geometry
    assert meta["arrays"]["seen"] == {"num_prefix_tokens": 2, "geometry": geometry, "grid": (4, 6), "cells": cells}
    no_grid = {0: LayerGeometry(0, None, 1, 9, 9, None, 1)}
    assert "grid" not in _batch_meta({"pixel_values": torch.zeros(1, 3, 32, 48)}, no_grid, [32, 48], {}, plan)
    with pytest.raises(QKHooksError) as err:
        _batch_meta({"pixel_values": torch.zeros(2, 3, 48, 32)}, geometry, (32, 48), cells, plan)
    assert str(err.value) == ("a batch of 48x32 images reached a recording laid out for 32x48 (every layer's grid "
                              "depends on it); preprocess every image to the model's input size.")


class _Photos:
    """A sequence of PNG bytes (one of them not an image) that notes every position it is asked for."""

    def __init__(self, n: int, broken: int):
        self.items = [b"not an image" if i == broken else _png(i) for i in range(n)]
        self.read: list[int] = []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.read.append(i)
        return self.items[i]


def _stopped_then_resumed(record, photos, tmp_path: Path, capsys, stop_at: int):
    """A clean run, a run stopped in batch ``stop_at``, and its resume (what it read kept); stderr of the resume is
    left for the caller."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = record(photos(), tmp_path / "clean.h5")
        batches = []

        def stop(batch):
            batches.append(batch)
            if len(batches) == stop_at:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            record(photos(), tmp_path / "run.h5", on_batch=stop)
        capsys.readouterr()
        again = photos()
        return clean, record(again, tmp_path / "run.h5", resume=True), again


def test_a_streamed_shard_interrupted_then_resumed_continues_at_its_checkpoint_without_decoding_what_came_before(
        tmp_path, loaded, capsys):
    """14 items, shard 1 of 2 (items 7..13), item 8 not an image, batches of 2 read items, a checkpoint every 2
    batches; the run is stopped in its third batch. The resume starts at the checkpoint's position, decodes nothing
    before it (it reads the shard's kept items again to check them, round 47), keeps the skipped item listed by the
    checkpoint, and ends equal to an uninterrupted run."""
    def record(photos, out, **kw):  # fresh reducers each time: they hold state
        return record_dataset(loaded, photos, out, modes=4, batch_size=2, checkpoint_every=2, reducers=[TopKModes(k=2)],
                              progress=False, shard=(1, 2), **kw)

    clean, resumed, photos = _stopped_then_resumed(record, lambda: _Photos(14, broken=8), tmp_path, capsys, stop_at=3)
    assert clean.images == 6 and [i for i, _ in clean.skipped] == ["8"]
    said = re.fullmatch(r"resuming the stream at item (\d+): (\d+) images are in the file; the (\d+) items before are "
                        r"skipped without decoding\n", capsys.readouterr().err)
    assert said, "the resume says where it continues"
    position, done, before = map(int, said.groups())
    assert position in (9, 11) and before == position - 7 and done == position - 7 - 1  # item 8 is no image
    # the first read is the open check of item 0; then the shard's items before the checkpoint once each, to check
    # the kept images (round 47: hashed, not decoded; none of the first shard's), and the rest once, recorded
    assert photos.read[1:] == list(range(7, 14))
    assert resumed.images == 6 and [i for i, _ in resumed.skipped] == ["8"]
    assert resumed.skipped[0][1].startswith("UnidentifiedImageError: cannot identify image file")
    _same_run(tmp_path / "clean.h5", tmp_path / "run.h5")
    with open_run(tmp_path / "run.h5") as run:
        assert run.ids == ["7", "9", "10", "11", "12", "13"]
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert json.loads(f["images"].attrs["shard"]) == {"rank": 1, "world": 2, "start": 7, "stop": 14}


def test_a_streamed_run_stopped_before_its_first_checkpoint_starts_again_silently(tmp_path, loaded, capsys):
    def record(photos, out, **kw):
        return record_dataset(loaded, photos, out, modes=4, batch_size=2, checkpoint_every=3, reducers=[TopKModes(k=2)],
                              progress=False, **kw)

    _, _, photos = _stopped_then_resumed(record, lambda: _Photos(7, broken=1), tmp_path, capsys, stop_at=2)
    assert capsys.readouterr().err == ""  # nothing resumed, nothing said (progress off)
    assert sorted(set(photos.read)) == list(range(7))
    _same_run(tmp_path / "clean.h5", tmp_path / "run.h5")


@pytest.mark.parametrize("order,twice", [([0, 1, 1, 2], 1), ([0, 1, 2, 0], 0)], ids=["in-one-batch", "in-a-later-batch"])
def test_a_streamed_id_seen_twice_is_refused(tmp_path, loaded, order, twice):
    items = [{"image": _png(i), "id": f"img{i}"} for i in order]
    with pytest.raises(QKHooksError) as err:
        # an iterable: read as a stream (a list's ids are checked before anything is read, test_user_data_items)
        record_dataset(loaded, iter(items), tmp_path / "run.h5", modes=4, batch_size=3, progress=False, reducers=[])
    said = (f"two items of the data have the id 'img{twice}'; "
            "give each item its own 'id', or none at all (then the position is the id; an item given as a file path "
            "has that path as its id). ")
    then = ("Nothing was written; fix the data" if twice == 1 else  # found in the first batch, or after 3 committed
            f"The 3 images before it stay committed in {tmp_path / 'run.h5'}: fix the data and run the same command with --resume")
    assert str(err.value).startswith(said + then)


# ------------------------------------------------------------------------------------------------ store
def _rows(n: int = 10) -> np.ndarray:
    return np.arange(n * 3 * 2, dtype=np.float32).reshape(n, 3, 2)


def test_run_array_indexing_equals_numpy_on_the_committed_rows_only(tmp_path):
    """A dataset of 10 rows of which 7 are committed: every kind of index gives numpy's answer on the first 7."""
    from qkhooks.store.reader import RunArray

    data = _rows()
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = data
    ref = data[:7]
    with h5py.File(tmp_path / "a.h5", "r") as f:
        arr = RunArray(f["x"], 7)
        assert arr.shape == (7, 3, 2) and len(arr) == 7 and arr.dtype == np.float32
        assert repr(arr) == "RunArray(/x, shape=(7, 3, 2), dtype=float32)"
        for key in (slice(None), slice(2, None), slice(-3, None), slice(None, None, 2), slice(1, 20), slice(-20, 3),
                    0, 6, -1, -7, np.int64(3), (slice(None), 1), (-2, 1, 0), [4, 0, 2], np.array([-1, 0]), [],
                    np.array([True, False, False, True, False, False, True]), ([5, 1], slice(None), 1)):
            got = arr[key]
            np.testing.assert_array_equal(got, ref[key], err_msg=repr(key))
            assert got.shape == ref[key].shape, repr(key)
        for bad in (7, -8, 100):
            with pytest.raises(IndexError) as err:
                arr[bad]
            assert str(err.value) == f"image {bad} is out of range for a run of 7 images."
        for bad in ([0, 7], [-8], np.array([8])):
            with pytest.raises(IndexError) as err:
                arr[bad]
            assert str(err.value) == "an image index is out of range for a run of 7 images."
        blocks = list(arr.chunks(3))
        assert [sl for sl, _ in blocks] == [slice(0, 3), slice(3, 6), slice(6, 7)]
        for sl, block in blocks:
            np.testing.assert_array_equal(block, ref[sl])
        assert [sl for sl, _ in arr.chunks()] == [slice(0, 7)]


def _hand_made_run(path: Path, committed: int = 7, complete: bool = False, info: dict | None = None) -> dict:
    """A run file written with h5py alone: 10 rows of ids and maps, ``committed`` of them committed, layers 2 and 10
    (so a plain string sort would put 10 first), rows at layer 2 and full maps at layer 10."""
    arrays = {"modes/L2/query": _rows(), "modes/L10/query": _rows() + 1, "modes/L2/key": _rows() + 2,
              "modes/L10/key": _rows() + 3, "attention/L2/rows": _rows() + 4, "attention/L10/full": _rows() + 5}
    with h5py.File(path, "w") as f:
        f.attrs.update({"model": "timm:tiny", "data": "samples", "qkhooks_version": "9.9", "complete": complete,
                        "config": json.dumps({"augmented": False, "modes": 4})})
        ids = f.create_dataset("images/ids", data=np.array([f"img{i}".encode() for i in range(10)]))
        for holder in (f["images"], ids):
            holder.attrs["committed"] = np.int64(committed)
        f["images/skipped"] = np.array([[b"bad.jpg", b"cannot decode"], [b"odd.png", b"truncated"]])
        for name, value in arrays.items():
            f.create_dataset(name, data=value).attrs["per_image"] = True
        f["spectrum/L2/S_all"] = np.ones((4, 8))
        f["spectrum/L10/S_all"] = np.ones((4, 8))
        if info is not None:
            f.require_group("model").attrs["info"] = json.dumps(info)
    return arrays


INFO = {"schema_version": 2, "num_prefix_tokens": 1, "heads": 4, "head_dim": 8, "dim": 32, "layers": [10, 2],
        "paths": ["blocks.10.attn", "blocks.2.attn"], "grid": [2, 3],
        "layer_geometry": {"2": _geometry(2, grid=(2, 3), queries=7).to_dict()},
        "left_out_by_design": {"head.decoder": "not self-attention"}}


def test_a_hand_made_run_file_reads_back_its_committed_images_names_and_layers(tmp_path):
    path = tmp_path / "run.h5"
    arrays = _hand_made_run(path, info=INFO)
    with open_run(path) as run:
        assert run.n == 7 and run.ids == [f"img{i}" for i in range(7)]
        assert run.skipped == [("bad.jpg", "cannot decode"), ("odd.png", "truncated")]
        assert run.model == "timm:tiny" and run.config == {"augmented": False, "modes": 4} and not run.complete
        assert run.info == json.loads(json.dumps(INFO)) and run.schema_version == 2
        assert run.arrays() == ["attention/L2/rows", "attention/L10/full", "modes/L2/key", "modes/L2/query",
                                "modes/L10/key", "modes/L10/query"]
        assert run.has("spectrum/L2/S_all") and not run.has("spectrum/L3")
        assert run.layers == [2, 10] and run.module_paths == {10: "blocks.10.attn", 2: "blocks.2.attn"}
        assert run.mode_layers == [2, 10] and run.attention_kinds == ["full", "rows"]
        assert run.attention_layers() == [2] and run.attention_layers("full") == [10] and run.attention_layers("x") == []
        for layer in (10, "blocks.10.attn", "10"):
            np.testing.assert_array_equal(run.query(layer)[:], arrays["modes/L10/query"][:7])
            np.testing.assert_array_equal(run.key(layer)[:], arrays["modes/L10/key"][:7])
        np.testing.assert_array_equal(run.attention(2)[:], arrays["attention/L2/rows"][:7])
        np.testing.assert_array_equal(run.attention("blocks.10.attn", "full")[-1], arrays["attention/L10/full"][6])
        with pytest.raises(QKHooksError) as err:
            run.array("spectrum/L2/S_all")
        assert str(err.value) == (f"{path} has no per-image array 'spectrum/L2/S_all'; it has: " + ", ".join(run.arrays())
                                  + ".")
        with pytest.raises(QKHooksError) as err:
            run.attention(10)
        assert str(err.value) == (f"{path} has no 'rows' attention for layer 10 (layers with them: [2]); the run stores "
                                  "attention kinds ['full', 'rows'] (the attention= option).")
        assert run.geometry(2) == _geometry(2, grid=(2, 3), queries=7)
        with pytest.raises(QKHooksError, match=r"is damaged \(model/info's layer_geometry has no entry for recorded "
                                               r"layer 10 \(its keys: 2\)\)"):  # version 2: never the one-grid rule
            run.geometry(10)
        assert repr(run) == f"RunReader({str(path)!r}, images=7, layers=[2, 10])"
        assert run.summary().splitlines() == [
            f"run      {path}", "model    timm:tiny", "data     samples",
            "images   7 committed (incomplete: resume with the same command plus --resume)", "version  qkhooks 9.9",
            "format   0 (written before format numbers: no root attribute qkhooks_format)",
            "skipped  2: bad.jpg, odd.png", "arrays",
            *[f"  {name:32s} {'(7, 3, 2)':24s} float32" for name in run.arrays()],
            "checksum none on the per-image arrays: damage inside their data is not detected (record with --checksum)",
            "layers   (model/info schema 2)",
            "  L2   blocks.2.attn: grid 2x3 + 1 prefix, 7 queries",
            "  L10  blocks.10.attn: DAMAGED (no entry in model/info's layer_geometry)",
            "  not recorded: head.decoder: not self-attention",
        ]
        with pytest.raises(QKHooksError) as err:
            run.spectrum(2)
        assert str(err.value) == (f"{path} stores no modes for layer 2 (recorded without modes); its every-mode sigma "
                                  "and cosine are in spectrum_arrays(2) as S_all, cos_all.")
        assert run.qk_spectrum is None


def test_a_run_file_without_model_info_takes_its_layers_from_its_groups_and_says_what_it_lacks(tmp_path):
    path = tmp_path / "old.h5"
    _hand_made_run(path, committed=0, complete=True)
    with h5py.File(path, "a") as f:
        f["spectrum/L4/S_all"] = np.ones(2)
        f["images"].attrs["shards"] = "[]"
    with open_run(path) as run:
        assert run.n == 0 and run.ids == [] and run.info == {} and run.schema_version == 1 and run.complete
        assert run.layers == [2, 4, 10] and run.module_paths == {}
        assert run.query(2)[:].shape == (0, 3, 2)
        with pytest.raises(QKHooksError) as err:
            run.query("blocks.2.attn")
        assert str(err.value) == (f"{path} does not know its layers' module paths (a run file written before qkhooks "
                                  "stored them); address the layer by block index: [2, 4, 10].")
        with pytest.raises(QKHooksError) as err:
            run.geometry(4)
        assert str(err.value) == f"{path} does not say layer 4's token grid (written before qkhooks stored it); record it again."
        with pytest.raises(QKHooksError) as err:
            run.query(4)
        assert str(err.value) == (f"{path} has no query/key maps for layer 4 (layers with them: [2, 10]); record with "
                                  "modes= to store them.")
        assert "images   0 committed\n" in run.summary() + "\n"
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with open_run(path) as run:
        assert "images   0 committed (incomplete: resume its shards with --resume)" in run.summary().splitlines()
        with pytest.raises(QKHooksError) as err:
            run.spectrum_arrays(4) and run.spectrum_arrays(3)
        assert str(err.value) == f"{path} did not record layer 3; its layers are [2, 4, 10]."


def test_a_file_that_is_not_a_run_is_refused_by_name(tmp_path):
    with pytest.raises(QKHooksError) as err:
        open_run(tmp_path / "none.h5")
    assert str(err.value) == f"no run file at {tmp_path / 'none.h5'}; record one with `qkhooks record`."
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["images/ids"] = np.array([b"a"])
    with pytest.raises(QKHooksError) as err:
        open_run(tmp_path / "other.h5")
    assert str(err.value) == (f"{tmp_path / 'other.h5'} is an HDF5 file but not a qkhooks run (no /images/ids with "
                              "`committed`): give the .h5 that `qkhooks record` wrote; if it wrote this one, `qkhooks "
                              "info --verify` on it says what is damaged.")


def test_the_committed_count_is_read_off_the_ids_first_then_the_images_group():
    from qkhooks.store import format as fmt

    with h5py.File("mem.h5", "w", driver="core", backing_store=False) as f:
        assert fmt.committed(f) is None
        f.create_group("images/ids")
        assert fmt.committed(f) is None  # a group is not the ids dataset
        del f["images/ids"]
        ids = f.create_dataset("images/ids", data=np.zeros(3))
        assert fmt.committed(f) is None
        f["images"].attrs["committed"] = np.int64(2)
        assert fmt.committed(f) == 2
        ids.attrs["committed"] = np.int64(1)
        assert fmt.committed(f) == 1
        fmt.set_committed(f, 3)
        assert int(f["images"].attrs["committed"]) == 3 and int(ids.attrs["committed"]) == 3


def test_resume_point_and_config_differences_follow_their_rules():
    from qkhooks.store.format import config_differences, resume_point

    assert resume_point(9, None, {}, []) == 9  # no reducer: every committed image
    assert resume_point(9, 4, {"a": {}, "b": {}}, ["a", "b"]) == 4
    assert resume_point(9, 9, {"a": {}}, ["a"]) == 9
    assert resume_point(9, 10, {"a": {}}, ["a"]) == 0  # claims more than is committed
    assert resume_point(9, None, {"a": {}}, ["a"]) == 0
    assert resume_point(9, 4, {"a": {}}, ["a", "b"]) == 0  # lacks one
    assert config_differences('{"a": 1, "b": "x", "c": 2}', '{"a": 1, "b": "y", "d": 3}') == (
        " (b: file 'x', now 'y'; c: file 2, now None; d: file None, now 3)")
    assert config_differences('{"a": 1}', '{"a": 1}') == ""
    assert config_differences("[1]", '{"a": 1}') == "" and config_differences('{"a": 1}', "[1]") == ""
    assert config_differences("not json", '{"a": 1}') == "" and config_differences(None, '{"a": 1}') == ""


# ------------------------------------------------------------------------------------------------ data/preprocess
def _refused(call, message: str) -> None:
    with pytest.raises(QKHooksError) as err:
        call()
    assert str(err.value) == message


def test_image_config_coerces_its_fields_and_refuses_bad_ones_with_the_whole_reason():
    base = dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    c = ImageConfig(size=np.int64(16), mean=np.array([1, 2, 3]), std=[1, 2, 3], resize=[20, 18], pad_value=np.uint8(7),
                    letterbox=0)
    assert (c.size, c.mean, c.std, c.resize, c.pad_value, c.letterbox) == ((16, 16), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0),
                                                                          (20, 18), 7, False)
    assert type(c.pad_value) is int and type(c.mean[0]) is float and type(c.size[0]) is int
    assert ImageConfig(size=(16, 24), resize=np.int64(30), **base).resize == 30
    assert ImageConfig(size=(16, 24), pad_value=255, letterbox=1, **base).letterbox is True
    assert ImageConfig(size=(16, 24), pad_value=0, **base).pad_value == 0
    _refused(lambda: ImageConfig(size=True, **base), "ImageConfig.size must be an int or an (H, W) pair, got True; "
             "pass e.g. (224, 224).")
    _refused(lambda: ImageConfig(size=(1, 2, 3), **base), "ImageConfig.size must be an int or an (H, W) pair, got "
             "(1, 2, 3); pass e.g. (224, 224).")
    _refused(lambda: ImageConfig(size=(16.5, 16), **base), "ImageConfig.size must hold integers, got (16.5, 16); pass "
             "e.g. (224, 224).")
    _refused(lambda: ImageConfig(size=(16, 0), **base), "ImageConfig.size must be positive, got (16, 0).")
    _refused(lambda: ImageConfig(size=(16, 16), resize=-1, **base), "ImageConfig.resize must be positive, got -1.")
    _refused(lambda: ImageConfig(size=16, mean=(1, 2), std=(1, 1, 1)), "ImageConfig.mean must be three numbers (R, G, "
             "B), got (1, 2).")
    _refused(lambda: ImageConfig(size=16, mean=0.5, std=(1, 1, 1)), "ImageConfig.mean must be three numbers (R, G, B), "
             "got 0.5.")
    _refused(lambda: ImageConfig(size=16, mean=(0, 0, 0), std=(1, 0, 1)), "ImageConfig.std must be positive, got "
             "(1.0, 0.0, 1.0).")
    _refused(lambda: ImageConfig(size=16, interpolation="lanczos", **base), "ImageConfig.interpolation 'lanczos' is not "
             "supported; use one of ('area', 'bicubic', 'bilinear', 'nearest').")
    _refused(lambda: ImageConfig(size=16, resize=(20, 20), letterbox=True, **base),
             "ImageConfig(letterbox=True) scales to fit `size` itself; leave resize=None.")
    for bad in (256, -1, 1.0, "0"):
        _refused(lambda: ImageConfig(size=16, pad_value=bad, **base),
                 f"ImageConfig.pad_value must be an int in 0..255, got {bad!r}.")


def test_from_hf_reads_each_size_layout_and_refuses_what_it_cannot_express():
    half = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    said = dict(resample=2, do_normalize=True, **half)  # what a config naming no class says itself (round 32)
    cfg = ImageConfig.from_hf({"size": {"height": 20, "width": 30}, **said})
    assert (cfg.size, cfg.resize, cfg.interpolation, cfg.mean) == ((20, 30), None, "bilinear", (0.5, 0.5, 0.5))
    cfg = ImageConfig.from_hf({"size": [20, 30], "resample": 3, "do_normalize": False})
    assert (cfg.size, cfg.interpolation, cfg.mean, cfg.std) == ((20, 30), "bicubic", (0.0,) * 3, (1.0,) * 3)
    cfg = ImageConfig.from_hf({**said, "size": 24, "resample": "NEAREST"})  # an int size without a crop: a square
    assert (cfg.size, cfg.interpolation, cfg.mean, cfg.std, cfg.crop) == ((24, 24), "nearest", (0.5,) * 3, (0.5,) * 3,
                                                                          "hf")
    crop = {"do_center_crop": True, "crop_size": {"height": 16, "width": 16}, **said}
    assert ImageConfig.from_hf({**crop, "size": {"shortest_edge": 20}}).resize == 20
    assert ImageConfig.from_hf({**crop, "size": {"height": 18, "width": 20}}).resize == (18, 20)
    assert ImageConfig.from_hf({**crop, "size": {"height": 16, "width": 16}}).resize is None
    assert ImageConfig.from_hf({**said, "do_center_crop": True, "crop_size": None, "size": [16, 12]}).size == (16, 12)
    assert ImageConfig.from_hf({**said, "do_center_crop": False, "crop_size": 8, "size": [16, 12]}).size == (16, 12)
    assert ImageConfig.from_hf({**said, "size": [16, 12], "rescale_factor": 1 / 255}).size == (16, 12)
    _refused(lambda: ImageConfig.from_hf({**crop, "size": 22}), "the processor config's size=22 with a centre crop is "
             "a shortest edge for some processor classes (CLIP) and a square for others (DeiT), and the config names "
             "no class (image_processor_type); pass processor.to_dict() of the loaded processor, or build "
             "ImageConfig(...) by hand.")
    _refused(lambda: ImageConfig.from_hf({**crop, "size": [16, 16], "do_rescale": False, "rescale_factor": 2}),
             "processor do_rescale=False, rescale_factor=2: qkhooks scales pixels by 1/255 before normalising; build "
             "ImageConfig(...) by hand for another scale.")
    _refused(lambda: ImageConfig.from_hf("config.json"), "ImageConfig.from_hf expects the preprocessor_config.json "
             "dict; for a processor object pass processor.to_dict().")
    _refused(lambda: ImageConfig.from_hf({**crop, "size": 20, "do_resize": False}), "processor config centre-crops "
             "without resizing, so the model input depends on the photo size; build ImageConfig(...) by hand.")
    _refused(lambda: ImageConfig.from_hf({**crop, "size": None}), "processor config centre-crops without resizing, so "
             "the model input depends on the photo size; build ImageConfig(...) by hand.")
    _refused(lambda: ImageConfig.from_hf({**said, "size": 20, "do_resize": False}), "processor config neither resizes "
             "nor crops to a fixed size; build ImageConfig(...) by hand.")
    _refused(lambda: ImageConfig.from_hf({}), "the processor config names no class (image_processor_type) and leaves "
             "out size, resample, do_normalize, image_mean, image_std, whose defaults differ from class to class; pass "
             "processor.to_dict() of the loaded processor, add image_processor_type, or build ImageConfig(...) by hand.")
    _refused(lambda: ImageConfig.from_hf({**said, "size": {"shortest_edge": 20}}), "processor config resizes the "
             "shortest edge without a centre crop, so inputs vary in size; build ImageConfig(size=(S, S), resize=S, "
             "...) by hand to crop them.")
    assert ImageConfig.from_hf({**said, "size": {"shortest_edge": 20, "height": 16, "width": 12}}).size == (16, 12)
    _refused(lambda: ImageConfig.from_hf({**said, "size": {"width": 20}}), "cannot read size={'width': 20} from the "
             "processor config; expected {height, width}.")
    _refused(lambda: ImageConfig.from_hf({**crop, "crop_size": {"height": 16}, "size": 20}), "cannot read "
             "crop_size={'height': 16} from the processor config; expected {height, width}.")
    _refused(lambda: ImageConfig.from_hf({**said, "size": 20, "rescale_factor": 1.0}), "processor do_rescale=True, "
             "rescale_factor=1.0: qkhooks scales pixels by 1/255 before normalising; build ImageConfig(...) by hand "
             "for another scale.")
    _refused(lambda: ImageConfig.from_hf({**said, "size": 20, "resample": 1}), "processor resample 1 is not supported; "
             "qkhooks handles ['bicubic', 'bilinear', 'nearest'] (PIL codes 0, 2, 3).")
    _refused(lambda: ImageConfig.from_hf({**said, "size": 20, "resample": "lanczos"}), "processor resample 'lanczos' is "
             "not supported; qkhooks handles ['bicubic', 'bilinear', 'nearest'] (PIL codes 0, 2, 3).")


def test_from_hf_model_reads_the_vision_config_or_the_config_and_says_it_guessed():
    from types import SimpleNamespace as NS

    cases = [  # (model, size, mean, resize, interpolation, model_type named in the warning)
        (NS(config=NS(model_type="clip", vision_config=NS(image_size=24))), (24, 24), CLIP, 24, "bicubic", "clip"),
        (NS(config=NS(model_type="", vision_config=NS(image_size=(24, 32), model_type="CLIP_vision_model"))),
         (24, 32), CLIP, None, "bicubic", "clip_vision_model"),
        (NS(config=NS(model_type="siglip", vision_config=None, image_size=20)), (20, 20), (0.5,) * 3, None, "bilinear",
         "siglip"),
        (NS(model_type="vit", image_size=16), (16, 16), (0.5,) * 3, None, "bilinear", "vit"),
        (NS(config=NS(model_type="vit_mae", image_size=16)), (16, 16), (0.485, 0.456, 0.406), None, "bicubic", "vit_mae"),
        (NS(config=NS(vision_config=NS(image_size=None), image_size=12)), (12, 12), (0.485, 0.456, 0.406), None,
         "bicubic", ""),
    ]
    for model, size, mean, resize, interpolation, model_type in cases:
        with pytest.warns(UserWarning) as caught:
            cfg = ImageConfig.from_hf_model(model)
        assert (cfg.size, cfg.mean, cfg.resize, cfg.interpolation) == (size, mean, resize, interpolation)
        assert str(caught[0].message) == (
            f"ImageConfig.from_hf_model guessed preprocessing for model_type={model_type!r} (size={size}, "
            f"mean={mean}, std={cfg.std}); for the checkpoint's exact preprocessing put its preprocessor_config.json "
            "in the model's folder (hf:DIR reads it there), or pass it to ImageConfig.from_hf and load_model(..., "
            "image_config=...).")
    _refused(lambda: ImageConfig.from_hf_model(NS(config=NS(model_type="vit"))), "model.config has no image_size; use "
             "ImageConfig.from_hf(preprocessor_config_dict) or build ImageConfig(...) by hand.")


CLIP = (0.48145466, 0.4578275, 0.40821073)


def test_geometry_of_each_resize_policy_against_the_rules_written_out():
    base = dict(mean=(0, 0, 0), std=(1, 1, 1))
    tall = ImageConfig(size=(16, 16), resize=20, **base).geometry((50, 30))  # w <= h: the short side is the width
    assert (tall.resized_hw, tall.top, tall.left) == ((33, 20), 8, 2)  # int(20 * 50 / 30); 17 / 2 rounds to even
    wide = ImageConfig(size=(16, 16), resize=20, **base).geometry((30, 50))
    assert (wide.resized_hw, wide.top, wide.left) == ((20, 33), 2, 8)
    square = ImageConfig(size=(16, 16), resize=20, **base).geometry((40, 40))
    assert square.resized_hw == (20, 20)
    squash = ImageConfig(size=(16, 12), resize=(20, 14), **base).geometry((50, 30))
    assert (squash.resized_hw, squash.top, squash.left, squash.output_hw) == ((20, 14), 2, 1, (16, 12))
    plain = ImageConfig(size=(16, 12), **base).geometry((50, 30))
    assert (plain.resized_hw, plain.top, plain.left, plain.source_hw) == ((16, 12), 0, 0, (50, 30))
    box = ImageConfig(size=(16, 24), letterbox=True, **base).geometry((10, 40))  # scale min(1.6, 0.6) = 0.6
    assert (box.resized_hw, box.top, box.left) == ((6, 24), -5, 0)
    same = ImageConfig(size=(16, 24), letterbox=True, **base).geometry((16, 24))
    assert (same.resized_hw, same.top, same.left) == ((16, 24), 0, 0)
    thin = ImageConfig(size=(16, 24), letterbox=True, **base).geometry((1000, 1))  # never below one pixel
    assert (thin.resized_hw, thin.top, thin.left) == ((16, 1), 0, -11)
    _refused(lambda: ImageConfig(size=16, **base).geometry((0, 5)), "image_hw must be positive, got (0, 5).")


def test_normalize_and_masks_refuse_what_they_cannot_place_with_the_whole_reason():
    cfg = ImageConfig(size=(4, 6), mean=(0.1, 0.3, 0.6), std=(0.2, 0.45, 0.35))
    pixels = np.random.default_rng(0).integers(0, 255, (4, 6, 3), dtype=np.uint8)
    expected = (pixels.astype(np.float32) / 255 - np.float32(cfg.mean)) / np.float32(cfg.std)
    np.testing.assert_allclose(cfg.normalize(Image.fromarray(pixels)).numpy(), expected.transpose(2, 0, 1), rtol=1e-6)
    _refused(lambda: cfg.normalize(pixels), "expected a PIL.Image.Image, got ndarray; use PIL.Image.open(path).")
    _refused(lambda: cfg(pixels), "expected a PIL.Image.Image, got ndarray; use PIL.Image.open(path).")
    _refused(lambda: cfg.normalize(Image.fromarray(pixels[:, :4])), "normalize() needs an image of exactly (4, 6) "
             "(H, W), got (4, 4); call the config itself to resize and crop.")
    _refused(lambda: cfg.mask(np.zeros(3), "labels"), "mask must be a 2-D (H, W) array, got shape (3,).")
    _refused(lambda: cfg.mask(np.zeros((4, 6)), "labels"), "labels mask must have an integer dtype, got float64; use "
             "kind='fraction'.")
    _refused(lambda: cfg.mask(np.full((4, 6), 2**31, np.int64), "labels"), "labels mask values must fit in int32.")
    _refused(lambda: cfg.mask(np.full((4, 6), -2**31 - 1, np.int64), "labels"), "labels mask values must fit in int32.")
    for bad in (1.5, -0.5, np.nan):  # one bad value among good ones (nanmin / nanmax skip a NaN)
        _refused(lambda: cfg.mask(np.where(np.eye(4, 6) > 0, bad, 0.5), "fraction"), "fraction mask values must lie in [0, 1]; "
                 "threshold or rescale it first.")
    _refused(lambda: cfg.mask(np.zeros((4, 6)), "area"), "mask kind must be 'labels' or 'fraction', got 'area'.")
    labels = np.arange(24).reshape(4, 6)
    np.testing.assert_array_equal(cfg.mask(torch.from_numpy(labels), "labels").numpy(), labels)
    assert cfg.mask(labels.astype(np.int32), "labels").dtype == torch.int64
    np.testing.assert_array_equal(cfg.mask(labels > 11, "labels").numpy(), (labels > 11).astype(np.int64))
    fractions = np.linspace(0, 1, 24).reshape(4, 6)
    np.testing.assert_allclose(cfg.mask(fractions, "fraction").numpy(), fractions.astype(np.float32), atol=1e-6)
    assert cfg.mask(fractions, "fraction").dtype == torch.float32
    assert cfg.mask(np.full((4, 6), 2**31 - 1, np.int64), "labels").max() == 2**31 - 1
    assert cfg.mask(np.full((4, 6), -2**31, np.int64), "labels").min() == -2**31


def test_probe_geometry_runs_one_forward_per_model_size_and_dtype_for_every_site_and_refuses_a_size_the_model_fails_on(
        monkeypatch):
    """A 4 x 6 HF ViT, its class taken off the list whose geometry needs no forward: the probe's geometry is the grid and
    prefix written down for the fixture, one forward serves every layer selection, another size or dtype probes
    again, and a size the model cannot take is refused naming the size and the model's own error."""
    import qkhooks.stream as stream
    from qkhooks.models.base import find_sites

    tiny = next(t for t in TINY_MODELS if t.name == "hf-vit-4x6-key-first")
    model = tiny.model()
    monkeypatch.setattr(stream, "_STATIC_GEOMETRY", set())
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(tuple(args[0].shape)))
    sites = find_sites(model)
    found = stream.probe_geometry(model, sites[1:], tiny.hw)
    assert forwards == [(1, 3, 32, 48)] and list(found) == [1]
    g = found[1]
    assert (g.grid, g.num_prefix_tokens, g.query_tokens, g.key_tokens) == (tiny.grid, tiny.prefix, 25, 25)
    first = stream.probe_geometry(model, sites[:1], tiny.hw)[0]
    assert (first.layer, first.grid, first.num_prefix_tokens, first.query_tokens) == (0, (4, 6), 1, 25)
    assert len(forwards) == 1  # layer 0 was probed with layer 1
    model.double()
    assert stream.probe_geometry(model, sites, tiny.hw)[1].grid == (4, 6) and forwards[1:] == [(1, 3, 32, 48)]
    with pytest.raises(QKHooksError) as err:  # another size is probed again (and this model takes no other)
        stream.probe_geometry(model, sites, (40, 48))
    assert forwards[2:] == [(1, 3, 40, 48)] * 2  # the probe, then the model alone: it is the model that fails
    assert re.fullmatch(r"the model fails on a 40x48 image, the size its image config gives, with no qkhooks hook on "
                        r"it \(\w+: .+\); nothing was written\. If it takes another input size, load it with that size "
                        r"\(load_model\(module, image_config=\.\.\.\), or the model's own pretrained config\); if it "
                        r"fails at the size it was built for too, its own forward is at fault: run it alone on "
                        r"torch\.zeros\(1, 3, 40, 48\) to see why\.", str(err.value), flags=re.S), str(err.value)


def test_config_readers_name_the_field_they_refuse():
    base = dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    _refused(lambda: ImageConfig(size=16, resize=(20, 0), **base), "ImageConfig.resize must be positive, got (20, 0).")
    said = dict(resample=2, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _refused(lambda: ImageConfig.from_hf({**said, "size": 20, "image_mean": [1, 2]}), "image_mean must be three numbers "
             "(R, G, B), got [1, 2].")
    _refused(lambda: ImageConfig.from_hf({**said, "size": 20, "image_std": [1, 2]}), "image_std must be three numbers "
             "(R, G, B), got [1, 2].")
    crop = {"do_center_crop": True, "crop_size": {"height": 16, "width": 16}, **said}
    _refused(lambda: ImageConfig.from_hf({**crop, "size": {"shortest_edge": 0}}), "size.shortest_edge must be positive, "
             "got 0.")
    _refused(lambda: ImageConfig.from_hf({**said, "size": -3}), "size must be positive, got -3.")
    _refused(lambda: ImageConfig.from_hf({**said, "size": {"height": 0, "width": 5}}), "size must be positive, got (0, 5).")


def test_from_timm_takes_the_size_the_model_was_built_for_over_its_pretrained_config():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=40, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2)
    cfg = ImageConfig.from_timm(model)  # the pretrained config says 224 px, crop_pct 0.9, bicubic
    assert (cfg.size, cfg.resize, cfg.interpolation) == ((40, 40), 44, "bicubic")  # floor(40 / 0.9) = 44
    assert (cfg.mean, cfg.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_labels_masks_shrink_by_nearest_pixel_centres_and_photos_by_exact_area_means():
    labels = np.arange(8 * 12).reshape(8, 12)
    cfg = ImageConfig(size=(4, 6), mean=(0, 0, 0), std=(1, 1, 1), interpolation="area")
    # a 2x shrink: output pixel i's centre (i + 0.5) * 2 falls in source pixel 2i + 1
    np.testing.assert_array_equal(cfg.mask(labels, "labels").numpy(), labels[1::2, 1::2])
    photo = np.random.default_rng(1).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    means = photo.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    expected = np.clip(np.rint(means), 0, 255).astype(np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(cfg(Image.fromarray(photo)).numpy(), expected, atol=1e-6)


def test_the_writers_chunks_hold_whole_images_a_batch_or_64_kib_of_batches_at_a_time(tmp_path):
    """The chunk rule read back with h5py: uncompressed arrays group whole batches up to MIN_CHUNK_BYTES,
    compressed ones take one image a chunk, ``chunk_images`` overrides both; a chunk always holds whole images."""
    from qkhooks.store.writer import MIN_CHUNK_BYTES, RunWriter

    small = np.ones((3, 4, 5), np.float32)  # 80 bytes an image as float32 -> 40 as float16
    big = np.ones((3, 128, 200), np.float32)  # 51200 bytes an image as float16
    expected = {"none": {"small": 3 * (MIN_CHUNK_BYTES // (3 * 40)), "big": 3}, "gzip": {"small": 1, "big": 1}}
    for compression, chunk_images in (("none", None), ("gzip", None), ("none", 5)):
        path = tmp_path / f"{compression}{chunk_images}.h5"
        with RunWriter(path, compression=compression, chunk_images=chunk_images) as writer:
            writer.write_batch(["a", "b", "c"], {"x/small": small, "x/big": big})
        with h5py.File(path, "r") as f:
            for name in ("small", "big"):
                want = chunk_images or expected[compression][name]
                assert f[f"x/{name}"].chunks == (want,) + f[f"x/{name}"].shape[1:], (compression, name)
                assert f[f"x/{name}"].dtype == np.float16 and f[f"x/{name}"].attrs["per_image"]
            assert f["images/ids"].chunks == (1024,) and f["images/ids"].maxshape == (None,)
            assert [i.decode() for i in f["images/ids"][()]] == ["a", "b", "c"]
            assert f.attrs["complete"]


def test_the_writer_refuses_a_late_array_and_a_truncation_past_committed_with_the_whole_reason(tmp_path):
    from qkhooks.store.writer import RunWriter

    path = tmp_path / "run.h5"
    writer = RunWriter(path, attrs={"model": "m", "config": {"a": [1, 2]}, "n": 3})
    writer.write_batch(["a", "b"], {"x": np.zeros((2, 3))})
    writer.write_skipped([("bad.jpg", "cannot decode")])
    writer.truncate(2)  # as many as are committed: nothing to cut, no refusal
    writer.flush()
    writer.close()
    with h5py.File(path, "r") as f:
        assert f.attrs["model"] == "m" and json.loads(f.attrs["config"]) == {"a": [1, 2]} and f.attrs["n"] == 3
        assert int(f["images"].attrs["committed"]) == 2 and f["images/skipped"][()].tolist() == [[b"bad.jpg",
                                                                                               b"cannot decode"]]
    for step, message in (
        (lambda w: w.truncate(3), f"writing {path} failed: cannot truncate to 3 images: only 2 are committed."),
        (lambda w: w.write_batch(["c"], {"x": np.ones((1, 3)), "y": np.ones((1, 2))}),  # refused before it is queued
         "a batch (first image 'c') does not have the run's arrays: it has y, which the run's first batch did not have "
         "(or the run file lost an array: then recover it with `qkhooks repair`). Every batch needs the same arrays: "
         "give every item the same annotations (masks on all items or on none). "
         f"{path} keeps the 2 images before it, but its arrays (names, shapes, storage dtype) were fixed by its "
         "first batch, so a --resume meets the same refusal: apply the fix above and start again with --overwrite."),
    ):
        writer = RunWriter(path, mode="resume", attrs={"model": "m", "config": {"a": [1, 2]}, "n": 3})
        with pytest.raises(QKHooksError) as err:  # raised by the call or by the flush after it (writer thread)
            step(writer)
            writer.flush()
        assert str(err.value) == message
        try:
            writer.close(complete=False)
        except QKHooksError:
            pass
        with open_run(path) as run:
            assert run.n == 2


def test_a_full_disk_is_told_by_errno_or_by_hdf5s_message():
    import errno

    from qkhooks.store.lock import out_of_room as _out_of_room

    assert _out_of_room(OSError(errno.ENOSPC, "No space left on device")) == "disk"
    assert _out_of_room(RuntimeError("Can't write data (file write failed: ..., errno = 28, error message = 'No space')")) == "disk"
    assert _out_of_room(RuntimeError("Can't write (file write failed: ..., errno = 27, error message = 'File too large')")) == "size"
    assert _out_of_room(OSError(errno.EACCES, "Permission denied")) is None
    assert _out_of_room(RuntimeError("errno = 2")) is None
    assert _out_of_room(RuntimeError("errno = 280, error message = ...")) is None


def _photo_folder(root: Path, n: int) -> Path:
    folder = root / "photos"
    folder.mkdir()
    for i in range(n):
        (folder / f"p{i}.png").write_bytes(_png(i))
    return folder


def test_a_resume_refuses_a_dataset_that_lost_a_recorded_image_and_the_run_keeps_its_options(tmp_path, loaded):
    import dataclasses

    import qkhooks

    folder = _photo_folder(tmp_path, 4)
    out = tmp_path / "run.h5"

    def stop(batch):
        raise KeyboardInterrupt

    opts = dict(modes=4, batch_size=1, reducers=[], progress=False, input="residual")
    with pytest.raises(KeyboardInterrupt):
        record_dataset(loaded, str(folder), out, on_batch=stop, **opts)
    (folder / "p0.png").unlink()
    with pytest.raises(QKHooksError) as err:
        record_dataset(loaded, str(folder), out, resume=True, **opts)
    assert str(err.value) == (f"cannot resume {out}: image 'p0.png' of the run file is no longer in the dataset; the "
                              "dataset changed since the run started (files removed, renamed or reordered). Put the "
                              "dataset back as it was when the run started, record it into a new --out, or "
                              "--overwrite to start again.")
    result = record_dataset(loaded, str(folder), out, overwrite=True, **opts)
    assert result.images == 3 and result.reducers == []
    with pytest.raises(KeyError) as err:
        result.reducer("topk_modes")
    assert err.value.args == ("topk_modes",)
    with open_run(out) as run, h5py.File(out, "r", locking=False) as f:
        assert run.ids == ["p1.png", "p2.png", "p3.png"]
        assert json.loads(f.attrs["image_config"]) == json.loads(json.dumps(dataclasses.asdict(loaded.image_config)))
        images = torch.stack([loaded.image_config(Image.open(folder / i)) for i in run.ids])
        with qkhooks.record(loaded.model, modes=4, input="residual") as rec, torch.no_grad():
            loaded.model(images)
        for layer in run.mode_layers:  # the file's maps are those of the residual stream, as asked
            np.testing.assert_allclose(run.query(layer)[:], rec.query(layer).numpy(), rtol=2e-3, atol=2e-3)
        with qkhooks.record(loaded.model, modes=4, input="normed") as normed, torch.no_grad():
            loaded.model(images)
        assert not np.allclose(run.query(0)[:], normed.query(0).numpy(), rtol=2e-3, atol=2e-3)


def test_pooled_attention_needs_target_masks_and_a_plain_vit_needs_no_probe_forward(tmp_path, loaded, monkeypatch):
    import qkhooks.stream as stream

    folder = _photo_folder(tmp_path, 1)
    with pytest.raises(QKHooksError) as err:
        record_dataset(loaded, str(folder), tmp_path / "run.h5", attention="pooled", progress=False)
    assert str(err.value) == (f"attention 'pooled' sums attention onto target, distractor and background masks, which "
                              f"{str(folder)!r} does not have; record odd-one-out data (o3:N or o3dir:DIR), or use rows or "
                              "full.")
    assert not (tmp_path / "run.h5").exists()
    forwards = []
    monkeypatch.setattr(stream, "_probe_forward", lambda *a: forwards.append(a))
    from qkhooks.models.base import find_sites

    found = stream.probe_geometry(loaded.model, find_sites(loaded.model), (32, 48))
    assert forwards == [] and [(g.grid, g.query_tokens) for g in found.values()] == [((4, 6), 25)] * 2


def test_reducer_states_round_trip_through_the_checkpoint_and_inside_a_file_with_their_image_count(tmp_path):
    from qkhooks.store import format as fmt

    states = {"topk": {"index": np.arange(6).reshape(2, 3), "k": np.int64(3), "name": "x", "score": torch.ones(2)},
              "aniso": {"sum": np.full(4, 0.5), "count": 9}}
    want = {"topk": {"index": np.arange(6).reshape(2, 3), "k": 3, "name": "x", "score": np.ones(2, np.float32)},
            "aniso": {"sum": np.full(4, 0.5), "count": 9}}

    def same(got, expected):
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].keys() == expected[name].keys(), name
            for key, value in expected[name].items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(got[name][key], value)
                    assert got[name][key].dtype == value.dtype
                else:
                    assert got[name][key] == value and type(got[name][key]) is type(value), (name, key)

    run = tmp_path / "run.h5"
    assert fmt.read_checkpoint(run) is None
    fmt.write_checkpoint(run, 7, states)
    assert not fmt.checkpoint_path(run).with_name("run.h5.reducers.tmp").exists()
    images, read = fmt.read_checkpoint(run)
    assert images == 7
    same(read, want)
    with h5py.File(run, "w") as f:
        assert fmt.read_states(f, run)[0] == 7  # no states inside: the checkpoint beside it
        fmt.write_states_into(f, states, 5)
        images, inside = fmt.read_states(f, run)
        assert images == 5
        same(inside, want)
        assert f["reducers/topk"].attrs["current"] == "a" and json.loads(f["reducers/topk/a"].attrs["scalars"]) == {
            "k": 3, "name": "x", "_images": 5}
    fmt.checkpoint_path(run).write_bytes(b"not a zip")
    assert fmt.read_checkpoint(run) is None


def test_a_resumed_run_reads_as_incomplete_until_its_writer_closes_it_complete(tmp_path):
    from qkhooks.store.writer import RunWriter

    path = tmp_path / "run.h5"
    attrs = {"model": "m", "config": "{}"}
    with RunWriter(path, attrs=attrs) as writer:
        writer.write_batch(["a"], {"x": np.zeros((1, 2))})
    with open_run(path) as run:
        assert run.complete
    writer = RunWriter(path, mode="resume", attrs=attrs)
    with open_run(path) as run:  # read while the writer has it: a kill now leaves a run that says it is unfinished
        assert run.complete is False and run.n == 1
    writer.close()
    with open_run(path) as run, h5py.File(path, "r", locking=False) as f:
        assert run.complete and f.attrs["complete"] is np.True_


# ------------------------------------------------------------------------------------------------ statistics
def test_topk_scores_reduced_keys_over_every_key_token_and_queries_past_the_prefix():
    """Spatially reduced keys (4 keys, no prefix, for 1 + 2x3 queries): the score of sign +1 is
    max(0, max over patch queries) * max(0, max over all keys), of sign -1 the same of the negated maps (numpy)."""
    from types import SimpleNamespace as NS

    from qkhooks.analysis.modes import TopKModes

    rng = np.random.default_rng(3)
    query = rng.normal(size=(3, 1, 2, 7))
    key = rng.normal(size=(3, 1, 2, 4))
    key[..., 0] = 5.0 * np.sign(rng.normal(size=(3, 1, 2)))  # the first key token decides: counted only without a prefix
    query[..., 0] = 9.0  # the class token would win every query maximum
    geometry = LayerGeometry(0, (2, 3), 1, 7, 4, (2, 2), 0)
    batch = NS(captures={0: NS(query=torch.from_numpy(query), key=torch.from_numpy(key), batch_size=torch.from_numpy(query).shape[0])}, size=3, offset=10,
               meta={"geometry": {0: geometry}, "num_prefix_tokens": 1})
    topk = TopKModes(k=2, map_dtype="float64")
    topk.update(batch)
    q, k = query[..., 1:], key
    plus = np.maximum(q.max(-1), 0) * np.maximum(k.max(-1), 0)  # (B, H, K)
    minus = np.maximum(-q.min(-1), 0) * np.maximum(-k.min(-1), 0)
    for s, scores in enumerate((plus, minus)):
        for m in range(2):
            order = sorted(range(3), key=lambda b: (-scores[b, 0, m], b))[:2]
            state = topk.layers[0]
            np.testing.assert_allclose(state["score"][0, m, s].numpy(), scores[order, 0, m], rtol=1e-6)
            assert state["index"][0, m, s].tolist() == [10 + b for b in order]
    assert topk.images == 3 and topk.prefixes == {0: 1}


def test_topk_keeps_image_indices_past_float32s_exact_integers_and_centre_embeddings_keep_their_documented_cap():
    from types import SimpleNamespace as NS

    from qkhooks.analysis.anisotropy import CentreEmbeddings
    from qkhooks.analysis.modes import TopKModes

    offset = 2**24 + 1  # the first integer float32 cannot hold
    maps = torch.arange(2 * 1 * 1 * 5, dtype=torch.float32).reshape(2, 1, 1, 5) - 3
    batch = NS(captures={0: NS(query=maps, key=maps, batch_size=maps.shape[0])}, size=2, offset=offset, meta={"num_prefix_tokens": 1})
    topk = TopKModes(k=2)
    topk.update(batch)
    best = topk.top(0, 0, 0, sign=1)
    assert best["index"].dtype.kind == "i" and best["index"].tolist() == [offset + 1, offset]
    assert CentreEmbeddings().max_images == 2048 and CentreEmbeddings().configuration()["max_images"] == 2048
    empty = CentreEmbeddings(grid=(2, 3)).state_dict()
    assert empty["vectors"].shape == (0, 0, 0) and empty["layers"].tolist() == []  # no image, no layer


def test_the_centre_patch_is_read_off_the_layers_own_grid_and_a_top_k_selection_keeps_all_slots_by_default():
    from types import SimpleNamespace as NS

    from qkhooks.analysis.anisotropy import AnisotropyReducer
    from qkhooks.analysis.modes import TopKModes
    from qkhooks.analysis.topk import select_layers

    x = torch.arange(2 * 7 * 3, dtype=torch.float64).reshape(2, 7, 3)
    meta = {"num_prefix_tokens": 1, "grid": (3, 2), "geometry": {1: LayerGeometry(1, (2, 3), 1, 7, 7, (2, 3), 1)}}
    batch = NS(meta=meta)
    # layer 1's own 2 x 3 grid: centre (row 1, col 1) is token 1 + 1 * 3 + 1 = 5; the batch-wide 3 x 2 grid would give 4
    torch.testing.assert_close(AnisotropyReducer().centre_embeddings(batch, 1, x), x[:, 5])
    torch.testing.assert_close(AnisotropyReducer().centre_embeddings(batch, 0, x), x[:, 4])  # no geometry: the batch's

    maps = torch.randn(3, 2, 2, 5, generator=torch.Generator().manual_seed(0))
    topk = TopKModes(k=3)
    topk.update(NS(captures={0: NS(query=maps, key=maps, batch_size=maps.shape[0])}, size=3, offset=0, meta={"num_prefix_tokens": 1}))
    state = topk.state_dict()
    every = select_layers(state, [0], None)
    assert every["k"] == 3 and every["L0.score"].shape[-1] == 3 and every["layers"].tolist() == [0]
    np.testing.assert_array_equal(every["L0.index"], topk.layers[0]["index"].numpy())
    assert select_layers(state, [0], 2)["L0.query"].shape[-2] == 2 and select_layers(state, [0], 9)["k"] == 3


def test_a_bfloat16_top_k_state_of_layers_with_other_token_counts_saves_its_maps_as_float32():
    from types import SimpleNamespace as NS

    from qkhooks.analysis.modes import TopKModes

    g = torch.Generator().manual_seed(0)
    small, big = torch.randn(2, 1, 1, 5, generator=g), torch.randn(2, 1, 1, 9, generator=g)  # two stages' token counts
    topk = TopKModes(k=2, map_dtype="bfloat16")
    topk.update(NS(captures={0: NS(query=big, key=big, batch_size=big.shape[0]), 3: NS(query=small, key=small, batch_size=small.shape[0])}, size=2, offset=0,
                   meta={"num_prefix_tokens": 1}))
    state = topk.state_dict()
    assert state["per_layer"] == 1 and state["layers"].tolist() == [0, 3]
    for layer in (0, 3):
        for name in ("query", "key"):
            saved = state[f"L{layer}.{name}"]
            assert saved.dtype == np.float32
            np.testing.assert_array_equal(saved, topk.layers[layer][name].float().numpy())
        assert state[f"L{layer}.index"].dtype == np.int64


# ------------------------------------------------------------------------------------------------ capture
def test_a_recordings_geometry_spectrum_and_refusals_name_its_layers_by_index_or_module_path():
    import qkhooks

    model = ASYMMETRIC_TIMM.model()
    with qkhooks.record(model, modes=4, attention="rows:1") as rec, torch.no_grad():
        model(ASYMMETRIC_TIMM.images())
    g = rec.geometry("blocks.1.attn")
    assert (g.layer, g.grid, g.num_prefix_tokens, g.query_tokens, g.key_tokens) == (1, (4, 6), 1, 25, 25)
    np.testing.assert_array_equal(rec.spectrum("blocks.0.attn").S.numpy(), rec.spectrum(0).S.numpy())
    with pytest.raises(QKHooksError) as err:
        rec.attention("blocks.0.attn", "rows")
    assert str(err.value).startswith("this recording has no 'rows' attention for layer 0 (layers with them: [1]); ")
    with pytest.raises(QKHooksError) as err:
        rec.relative_term(0)
    assert str(err.value).startswith("layer 0 (blocks.0.attn) adds no query-dependent relative-position term")
