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


def _same_run(path_a: Path, path_b: Path) -> None:
    """Two run files hold the same images, skipped list, arrays and reducer states."""
    with open_run(path_a) as a, open_run(path_b) as b:
        assert a.ids == b.ids
        assert [(i, _no_address(why)) for i, why in a.skipped] == [(i, _no_address(why)) for i, why in b.skipped]
        assert a.arrays() == b.arrays() and a.arrays()
        for name in a.arrays():
            np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)
        assert a.states() == b.states()
        for name in a.states():
            sa, sb = a.state(name), b.state(name)
            assert sa.keys() == sb.keys()
            for key in sa:
                if isinstance(sa[key], str):
                    assert _no_address(sa[key]) == _no_address(sb[key])
                else:
                    np.testing.assert_array_equal(np.asarray(sa[key]), np.asarray(sb[key]), err_msg=f"{name}/{key}")


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
    from qkhooks.reducers import Recipe
    from qkhooks.stream import _batch_meta

    plan = Recipe("probe", meta=lambda batch, meta: {"arrays": {"seen": dict(meta)}})
    geometry = {3: _geometry(3, grid=(2, 3), prefix=0, queries=6), 1: _geometry(1, grid=(4, 6), prefix=2, queries=26)}
    meta = _batch_meta({"pixel_values": torch.zeros(1, 3, 32, 48)}, geometry, (32, 48), plan)
    assert meta["num_prefix_tokens"] == 2 and meta["grid"] == (4, 6) and meta["geometry"] is geometry
    assert meta["arrays"]["seen"] == {"num_prefix_tokens": 2, "geometry": geometry, "grid": (4, 6)}
    no_grid = {0: LayerGeometry(0, None, 1, 9, 9, None, 1)}
    assert "grid" not in _batch_meta({"pixel_values": torch.zeros(1, 3, 32, 48)}, no_grid, [32, 48], plan)
    with pytest.raises(QKHooksError) as err:
        _batch_meta({"pixel_values": torch.zeros(2, 3, 48, 32)}, geometry, (32, 48), plan)
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


def test_a_streamed_shard_interrupted_then_resumed_continues_at_its_checkpoint_without_decoding_what_came_before(
        tmp_path, loaded, capsys):
    """14 items, shard 1 of 2 (items 7..13), item 8 not an image, batches of 2 read items, a checkpoint every 2
    batches; the run is stopped in its third batch. The resume starts at the checkpoint's position, reads nothing
    before it, keeps the skipped item listed by the checkpoint, and ends equal to an uninterrupted run."""
    def record(photos, out, **kw):  # fresh reducers each time: they hold state
        return record_dataset(loaded, photos, out, modes=4, batch_size=2, checkpoint_every=2, reducers=[TopKModes(k=2)],
                              progress=False, shard=(1, 2), **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = record(_Photos(14, broken=8), tmp_path / "clean.h5")
        assert clean.images == 6 and [i for i, _ in clean.skipped] == ["8"]

        def stop(batch, calls=[]):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            record(_Photos(14, broken=8), tmp_path / "run.h5", on_batch=stop)
        capsys.readouterr()
        photos = _Photos(14, broken=8)
        resumed = record(photos, tmp_path / "run.h5", resume=True)
    said = re.fullmatch(r"resuming the stream at item (\d+): (\d+) images are in the file; the (\d+) items before are "
                        r"skipped without decoding\n", capsys.readouterr().err)
    assert said, "the resume says where it continues"
    position, done, before = map(int, said.groups())
    assert position in (9, 11) and before == position - 7 and done == position - 7 - 1  # item 8 is no image
    assert min(photos.read[1:]) == position  # the first read is the open check of item 0
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record(_Photos(7, broken=1), tmp_path / "clean.h5")

        def stop(batch, calls=[]):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            record(_Photos(7, broken=1), tmp_path / "run.h5", on_batch=stop)
        capsys.readouterr()
        photos = _Photos(7, broken=1)
        record(photos, tmp_path / "run.h5", resume=True)
    assert capsys.readouterr().err == ""  # nothing resumed, nothing said (progress off)
    assert sorted(set(photos.read)) == list(range(7))
    _same_run(tmp_path / "clean.h5", tmp_path / "run.h5")


@pytest.mark.parametrize("order,twice", [([0, 1, 1, 2], 1), ([0, 1, 2, 0], 0)], ids=["in-one-batch", "in-a-later-batch"])
def test_a_streamed_id_seen_twice_is_refused(tmp_path, loaded, order, twice):
    items = [{"image": _png(i), "id": f"img{i}"} for i in order]
    with pytest.raises(QKHooksError) as err:
        record_dataset(loaded, items, tmp_path / "run.h5", modes=4, batch_size=3, progress=False, reducers=[])
    assert str(err.value) == (f"two items of the data have the id 'img{twice}'; "
                              "give each item its own 'id', or none at all (then the position is the id).")
