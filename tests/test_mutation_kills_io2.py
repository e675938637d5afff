"""Tests written to kill mutants of stream, store (writer, reader, format), data/preprocess and the analyses'
statistics (topk, anisotropy) that survived the rest of the suite in round 12 (tests/MUTATION.md), each against an
independent reference: numpy, a direct computation, or a run file read back with h5py."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from qkhooks import QKHooksError
from qkhooks.store import RunWriter, open_run
from qkhooks.store import format as fmt


# ------------------------------------------------------------------------------------------------ store
def test_a_checkpoint_keeps_scalars_in_its_json_and_arrays_as_members_numpy_scalars_as_plain_numbers(tmp_path):
    """The checkpoint archive read with numpy alone: numpy and Python scalars in ``__meta__``'s JSON as plain numbers
    and strings, arrays and tensors as members (copied when queued: changed afterwards, the checkpoint keeps the old
    values)."""
    out = tmp_path / "run.h5"
    total = np.arange(3.0)
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a", "b"], {"v": np.ones((2, 2), np.float32)})
        w.write_checkpoint({"r": {"count": np.int64(3), "mean": np.float32(0.5), "n": 4, "name": "x", "total": total,
                                  "t": torch.tensor([1.0, 2.0])}})
        total[:] = -1  # a reducer keeps updating its buffers after the checkpoint was queued
        w.flush()
        with np.load(fmt.checkpoint_path(out), allow_pickle=False) as archive:
            assert sorted(archive.files) == ["__meta__", "r/t", "r/total"]
            meta = json.loads(str(archive["__meta__"]))
            np.testing.assert_array_equal(archive["r/total"], [0.0, 1.0, 2.0])
            np.testing.assert_array_equal(archive["r/t"], [1.0, 2.0])
        assert meta == {"images": 2, "scalars": {"r": {"count": 3, "mean": 0.5, "n": 4, "name": "x"}}, "run_id": w.run_id}
        images, states = w.checkpoint()
        assert images == 2 and {k: states["r"][k] for k in ("count", "mean", "n", "name")} == meta["scalars"]["r"]
        assert type(states["r"]["count"]) is int and type(states["r"]["name"]) is str


def test_a_full_disk_gives_back_the_lock_files_reserve_and_keeps_the_batches_committed_before_it(tmp_path, monkeypatch):
    """The free-space check meets a full disk at the second batch: the error names the committed count, the lock
    file's reserved MiB goes back to the file system (so that closing can flush), and the run keeps its first batch."""
    from qkhooks.store import writer as writer_module
    from qkhooks.store.lock import RESERVE_BYTES

    out = tmp_path / "run.h5"
    lock = fmt.lock_path(out)
    w = RunWriter(out, dtype="float32")
    w.write_batch(["a", "b"], {"v": np.arange(4.0, dtype=np.float32).reshape(2, 2)})
    w.flush()
    note = json.loads(lock.read_bytes().split(b"\n", 1)[0])
    note_size = len(json.dumps(note)) + 1
    assert lock.stat().st_size == note_size + RESERVE_BYTES

    class FullDisk:
        free = 1000

    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda path: FullDisk())
    w.write_batch(["c"], {"v": np.ones((1, 2), np.float32)})
    with pytest.raises(QKHooksError) as err:
        w.flush()
    assert str(err.value) == ("disk full while writing run.h5: 2 images are committed and safe; free space and run the "
                              "same command with --resume")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert lock.stat().st_size == note_size  # the reserve given back
    w.close()
    with open_run(out) as run:
        assert run.ids == ["a", "b"] and not run.complete
        np.testing.assert_array_equal(run.array("v")[:], np.arange(4.0).reshape(2, 2))


def test_resuming_a_file_that_is_not_a_run_or_a_merge_of_shards_is_refused_with_the_whole_reason(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["images/ids"] = np.array([b"a"])
    with pytest.raises(QKHooksError) as err:
        RunWriter(other, mode="resume")
    assert str(err.value) == f"cannot resume {other}: it is not a qkhooks run file; use --overwrite."
    merged = tmp_path / "merged.h5"
    with RunWriter(merged, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
    with h5py.File(merged, "a") as f:
        f["images"].attrs["shards"] = "[\"s0.h5\", \"s1.h5\"]"
    with pytest.raises(QKHooksError) as err:
        RunWriter(merged, mode="resume")
    assert str(err.value) == (f"cannot resume {merged}: it is a merge of shard files ([\"s0.h5\", \"s1.h5\"]); resume the "
                              "shards with the same torchrun command plus --resume, which merges again.")
    assert not fmt.lock_path(other).exists() and not fmt.lock_path(merged).exists()  # a refusal releases the lock


def test_a_string_static_is_an_attribute_of_the_group_its_path_names_and_the_layout_marks_the_run_incomplete(tmp_path):
    """``a/b/c`` as a string is attribute ``c`` of group ``a/b`` (a dataset ``a/b/c`` otherwise); the file laid out
    and published says ``complete = False`` until its writer closes it complete."""
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_static("spectrum/L0/note", "made by hand")
        w.write_static("spectrum/L0/S", np.arange(3.0))
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
        w.flush()
        assert fmt.lock_path(out).exists() and not out.with_name("run.h5.creating").exists()
        with h5py.File(out, "r", swmr=True) as f:
            assert dict(f["spectrum/L0"].attrs) == {"note": "made by hand"}
            np.testing.assert_array_equal(f["spectrum/L0/S"][()], [0.0, 1.0, 2.0])
            assert f.attrs["complete"] == False  # noqa: E712 - a numpy bool read back
            # its run_id (ties the checkpoints to this run) and its format number, stamped when it was created
            assert sorted(f.attrs) == ["complete", "identity", "qkhooks_format"]
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == True  # noqa: E712


# ------------------------------------------------------------------------------------------------ statistics
def _stages_batch(tokens: dict[int, torch.Tensor], caps: dict[int, dict] | None = None) -> "BatchCapture":
    """A hand-made batch of a two-stage model: layer 0 on a 4 x 6 grid, layer 1 on a 2 x 3 grid, one CLS token each
    (the batch's own grid is layer 0's, as a recording's is the first layer's)."""
    from qkhooks.access import LayerGeometry
    from qkhooks.results import BatchCapture, LayerCapture

    geometry = {0: LayerGeometry(0, (4, 6), 1, 25, 25, (4, 6), 1), 1: LayerGeometry(1, (2, 3), 1, 7, 7, (2, 3), 1)}
    layers = {l: LayerCapture(l, int(x.shape[0]), inputs=x, **(caps or {}).get(l, {})) for l, x in tokens.items()}
    return BatchCapture(ids=[str(i) for i in range(5)], meta={"num_prefix_tokens": 1, "grid": (4, 6),
                                                              "geometry": geometry}, layers=layers)


def test_centre_embeddings_of_stages_of_different_grids_and_widths_survive_the_saved_state_unpadded():
    """Round 13: each layer's centre patch is read on that layer's own grid (token 1 + 2·6 + 3 = 16 of the 4 x 6 layer,
    1 + 1·3 + 1 = 5 of the 2 x 3 one), unit-normalised (numpy); the saved state pads the narrower layer to the wider
    width and says each layer's own (``widths``), so a reducer loaded from it keeps each layer's own width, and the
    anisotropy baseline is numpy's mean cosine over pairs of different images."""
    from qkhooks.analysis.anisotropy import AnisotropyReducer, CentreEmbeddings

    gen = torch.Generator().manual_seed(0)
    tokens = {0: torch.randn(5, 25, 3, generator=gen) + 0.5, 1: torch.randn(5, 7, 5, generator=gen) + 0.5}  # float32
    centre = {0: tokens[0][:, 16].double().numpy(), 1: tokens[1][:, 5].double().numpy()}
    unit = {l: v / np.linalg.norm(v, axis=1, keepdims=True) for l, v in centre.items()}
    images, baseline = CentreEmbeddings(), AnisotropyReducer()
    for reducer in (images, baseline):
        reducer.update(_stages_batch(tokens))
    state = images.state_dict()
    np.testing.assert_array_equal(state["widths"], [3, 5])
    assert state["vectors"].shape == (5, 2, 5) and not state["vectors"][:, 0, 3:].any()
    loaded = CentreEmbeddings()
    loaded.load_state_dict(state)
    for l in (0, 1):
        (kept,) = loaded.vectors[l]
        assert kept.shape == unit[l].shape
        np.testing.assert_allclose(kept, unit[l], rtol=1e-6)
    again = AnisotropyReducer()
    again.load_state_dict(baseline.state_dict())
    assert {l: tuple(s.shape) for l, s in again.sums.items()} == {0: (3,), 1: (5,)}
    for reducer in (baseline, again):
        for l in (0, 1):
            G = unit[l] @ unit[l].T
            # the baseline is summed in float64 whatever the tokens' dtype (float32 here): exact to float64 rounding
            assert reducer.baselines()[l] == pytest.approx((G.sum() - np.trace(G)) / 20, rel=1e-12, abs=1e-14)


def test_a_top_k_state_stored_one_layer_at_a_time_loads_back_and_an_empty_legacy_state_keeps_its_map_dtype():
    """Round 13: layers of different token counts are stored one per layer (``per_layer``), without the stacked
    ``score`` / ``index`` / ``query`` / ``key``; that state loads into a fresh reducer, every array as saved. A state saved
    before states described themselves is rebuilt with the map dtype its ``query`` array has, also when it holds no
    layer yet (its empty ``query`` still has the dtype)."""
    from qkhooks.analysis.topk import TopKModes
    from qkhooks.reducers import DESCRIPTION_KEY, Reducer

    gen = torch.Generator().manual_seed(1)
    maps = {l: {"query": torch.randn(5, 2, 3, n, generator=gen), "key": torch.randn(5, 2, 3, n, generator=gen)}
            for l, n in ((0, 25), (1, 7))}
    top = TopKModes(k=2, map_dtype="float32")
    top.update(_stages_batch({l: torch.zeros(5, n, 4) for l, n in ((0, 25), (1, 7))}, maps))
    state = top.state_dict()
    assert state["per_layer"] == 1 and not {"score", "index", "query", "key"} & set(state)
    loaded = TopKModes(k=2, map_dtype="float32")
    loaded.load_state_dict(state)
    again = loaded.state_dict()
    assert sorted(again) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(again[name], value)
    for dtype in ("float32", "float16"):
        saved = dict(TopKModes(k=3, map_dtype=dtype).saved_state())
        del saved[DESCRIPTION_KEY]
        rebuilt = Reducer.from_state(saved, kind="topk_modes")
        assert (type(rebuilt), rebuilt.k, rebuilt.map_dtype) == (TopKModes, 3, getattr(torch, dtype))


def test_top_k_slots_not_filled_yet_say_so_the_maps_keep_their_dtype_and_a_batch_without_maps_is_refused_whole():
    """Round 13: with fewer images than k the empty slots hold index -1 and score -inf (the documented markers), the
    kept maps are stored in ``map_dtype`` (float16 by default: query and key alike); a batch without query/key maps
    is refused with the whole message; ``select_layers`` keeps a layer's "prefix not said" (-1) as -1."""
    from qkhooks.analysis.topk import TopKModes, select_layers
    from qkhooks.results import BatchCapture, LayerCapture

    gen = torch.Generator().manual_seed(2)
    query, key = torch.randn(2, 1, 1, 5, generator=gen), torch.randn(2, 1, 1, 5, generator=gen)
    top = TopKModes(k=4)
    top.update(BatchCapture(ids=["a", "b"], meta={"num_prefix_tokens": 1},
                            layers={0: LayerCapture(0, 2, query=query, key=key)}))
    state = top.state_dict()
    np.testing.assert_array_equal(np.sort(state["index"][0, 0, 0, 0, :2]), [0, 1])
    np.testing.assert_array_equal(state["index"][..., 2:], -1)
    assert np.isneginf(state["score"][..., 2:]).all() and np.isfinite(state["score"][..., :2]).all()
    assert state["query"].dtype == state["key"].dtype == np.float16
    with pytest.raises(QKHooksError) as err:
        top.update(BatchCapture(ids=["c"], meta={"num_prefix_tokens": 1}, layers={0: LayerCapture(0, 1)}))
    assert str(err.value) == "TopKModes needs query/key maps: record with modes=K (e.g. qkhooks.record(model, modes=16))."
    two = {**state, "layers": np.asarray([0, 3]), "layer_prefix": np.asarray([-1, 1]),
           **{name: np.concatenate([state[name]] * 2) for name in ("score", "index", "query", "key")}}
    picked = select_layers(two, [0, 3], 2)
    np.testing.assert_array_equal(picked["layer_prefix"], [-1, 1])
    np.testing.assert_array_equal(picked["L3.index"], state["index"][0, ..., :2])


# ------------------------------------------------------------------------------------------------ store (round 13)
def test_a_runs_two_softmax_terms_read_back_per_image_up_to_committed_and_once_stored_as_written(tmp_path):
    """Round 13, ``RunReader.terms`` (new in round 12): a run written by hand with a two-softmax layer 1 (two per-image
    terms, a position term and a gate stored once) and a plain layer 0. The per-image terms read back as run arrays of
    the committed images only (rows written past ``committed`` by hand stay unseen), the once-stored ones as arrays,
    all equal to what was written (numpy), by index or module path; a layer without terms is refused whole."""
    rng = np.random.default_rng(4)
    content, softmax = (rng.random((3, 2, 5, 5)).astype(np.float32) for _ in range(2))
    position, gate = rng.random((2, 5, 5)).astype(np.float32), np.asarray([0.25, 0.75], np.float32)
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_static("model/info", json.dumps({"layers": [0, 1], "paths": ["blocks.0.attn", "blocks.1.attn"]}))
        w.write_static("terms/L1/position", position)
        w.write_static("terms/L1/gate", gate)
        w.write_batch(["a", "b", "c"], {"terms/L1/content": content, "terms/L1/softmax2": softmax,
                                        "attention/L0/full": np.zeros((3, 2, 5, 5), np.float32)})
    with h5py.File(out, "a") as f:  # a fourth image's rows written but never committed
        for name in ("terms/L1/content", "terms/L1/softmax2"):
            f[name].resize(4, axis=0)
            f[name][3] = 9.0
    with open_run(out) as run:
        assert run.terms_layers == [1]
        for layer in (1, "blocks.1.attn"):
            terms = run.terms(layer)
            assert sorted(terms) == ["content", "gate", "position", "softmax2"]
            assert len(terms["content"]) == 3 and terms["softmax2"].shape == (3, 2, 5, 5)
            np.testing.assert_array_equal(terms["content"][:], content)
            np.testing.assert_array_equal(terms["softmax2"][1:], softmax[1:])
            assert isinstance(terms["position"], np.ndarray) and isinstance(terms["gate"], np.ndarray)
            np.testing.assert_array_equal(terms["position"], position)
            np.testing.assert_array_equal(terms["gate"], gate)
        with pytest.raises(QKHooksError) as err:
            run.terms(0)
    assert str(err.value) == (f"{out} has no two-softmax terms for layer 0 (layers with them: [1]); only layers whose "
                              "maps combine two softmaxes (ConViT GPSA), recorded with attention='full', store them.")


# ------------------------------------------------------------------------------------------------ preprocess (round 13)
def test_a_timm_models_pretrained_cfg_gives_its_crop_and_interpolation_and_the_unexpressible_ones_are_refused_whole():
    """Round 13, ``ImageConfig.from_timm`` on a module carrying a hand-written ``pretrained_cfg`` (what
    ``resolve_data_config`` reads): timm's defaults where a key is unset (crop_pct 0.875, centre crop, bicubic), each
    key read where set; the refusals word for word; and an ImageConfig's own statistics refused whole."""
    from qkhooks.data.preprocess import ImageConfig

    stats = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    model = torch.nn.Module()
    model.pretrained_cfg = {"input_size": (3, 32, 32), **stats}
    assert ImageConfig.from_timm(model) == ImageConfig(size=(32, 32), resize=36, interpolation="bicubic", **stats)
    model.pretrained_cfg = {"input_size": (3, 32, 48), "crop_pct": 0.8, "crop_mode": "squash",
                            "interpolation": "bilinear", **stats}
    assert ImageConfig.from_timm(model) == ImageConfig(size=(32, 48), resize=(40, 60), interpolation="bilinear", **stats)
    refusals = [
        ({"input_size": (3, 32, 48)}, "timm model has a non-square input (32, 48) with crop_mode='center' "
         "(ResizeKeepRatio), which ImageConfig cannot express; build ImageConfig(size=..., resize=(H, W)) by hand."),
        ({"input_size": (3, 32, 32), "crop_mode": "border"},
         "timm crop_mode 'border' is not supported (only 'center' and 'squash'); build ImageConfig(...) by hand."),
        ({"input_size": (3, 32, 32), "interpolation": "lanczos"}, "timm model asks for interpolation 'lanczos'; qkhooks "
         "supports ['bicubic', 'bilinear', 'nearest']. Build ImageConfig(...) by hand with the closest one."),
    ]
    for cfg, message in refusals:
        model.pretrained_cfg = {**cfg, **stats}
        with pytest.raises(QKHooksError) as err:
            ImageConfig.from_timm(model)
        assert str(err.value) == message
    for field, text in (("mean", "ImageConfig.mean"), ("std", "ImageConfig.std")):
        with pytest.raises(QKHooksError) as err:
            ImageConfig(size=32, **{**stats, field: (0.5, 0.5)})
        assert str(err.value) == f"{text} must be three numbers (R, G, B), got (0.5, 0.5)."


def test_a_processor_config_rescaling_by_other_than_1_255_is_refused_whole_unless_it_does_not_rescale():
    """Round 13: ``rescale_factor`` 0.5 with rescaling on is refused word for word. Round 32: ``do_rescale`` false is
    refused too (qkhooks always scales by 1/255: the model would get pixels 255 times too large)."""
    from qkhooks.data.preprocess import ImageConfig

    plain = {"size": {"height": 32, "width": 48}, "rescale_factor": 0.5, "resample": 2, "do_normalize": False}
    with pytest.raises(QKHooksError) as err:
        ImageConfig.from_hf(plain)
    assert str(err.value) == ("processor do_rescale=True, rescale_factor=0.5: qkhooks scales pixels by 1/255 before "
                              "normalising; build ImageConfig(...) by hand for another scale.")
    with pytest.raises(QKHooksError, match=r"^processor do_rescale=False, rescale_factor=0\.5: qkhooks scales"):
        ImageConfig.from_hf({**plain, "do_rescale": False})
    assert ImageConfig.from_hf({**plain, "rescale_factor": 1 / 255}).size == (32, 48)


@pytest.mark.skipif("MUTANT_UNDER_TEST" in __import__("os").environ,
                    reason="inside mutmut its trampolines are the callers, so no warning can point at this file")
def test_the_guessed_preprocessing_warning_points_at_the_callers_line():
    """Round 13 (``from_hf_model`` _106, ``stacklevel=3``): the warning names the line that called
    ``ImageConfig.from_hf_model``, where the fix (pass the preprocessor config) belongs."""
    import types
    import warnings

    from qkhooks.data.preprocess import ImageConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = __import__("inspect").currentframe().f_lineno + 1
        ImageConfig.from_hf_model(types.SimpleNamespace(model_type="vit", image_size=32))
    assert [(Path(w.filename).name, w.lineno) for w in caught] == [(Path(__file__).name, line)]


def _bytes_asked(tmp_path: Path, monkeypatch, sizes: list[int], chunk_images: int | None, free: int | None = None):
    """Write batches of ``sizes`` images (a float32 (3, 5) array and an int64 scalar per image); the last one meets
    ``free`` bytes on the disk (0 by default). Returns (the bytes the writer said the last batch needs, or None
    if it was written, and the images committed)."""
    from qkhooks.store import writer as writer_module

    plenty = type("Disk", (), {"free": 1 << 40})()
    last = type("Disk", (), {"free": 0 if free is None else free})()
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "run.h5"
    w = RunWriter(out, dtype="float32", chunk_images=chunk_images)
    n, asked_about = 0, []
    for i, b in enumerate(sizes):
        disk = last if i == len(sizes) - 1 else plenty
        monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda path, disk=disk: asked_about.append(path) or disk)
        w.write_batch([str(n + j) for j in range(b)],
                      {"big": np.ones((b, 3, 5), np.float32), "small": np.arange(n, n + b, dtype=np.int64)})
        n += b
        try:
            w.flush()
        except QKHooksError as err:
            w.close()
            assert asked_about and all(Path(p) == out.parent for p in asked_about)  # the disk the run file is on
            assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
            message = err.__cause__.strerror
            assert message.startswith(f"{last.free} bytes free, the next batch needs ")
            return int(message.rsplit(" ", 1)[1]), w.committed
    w.close()
    return None, w.committed


@pytest.mark.parametrize("sizes, chunk_images, new_chunks", [
    ([3], 4, 1),              # the first batch: chunk rows read from the file the writer just laid out
    ([3, 3], 4, 1),           # rows 3-5: the chunk of rows 0-3 is allocated, one new chunk (4-7)
    ([3, 3, 7], 4, 2),        # rows 6-12: chunks 8-11 and 12-15 are new
    ([4, 4], 4, 1),           # on a chunk boundary: exactly one
    ([2, 1], 4, 0),           # inside the first chunk: none
    ([5], None, 1),           # default chunks: whole batches grouped up to MIN_CHUNK_BYTES
])
def test_the_free_space_check_asks_for_the_chunks_a_batch_opens_at_their_full_size_plus_the_margin(
        tmp_path, monkeypatch, sizes, chunk_images, new_chunks):
    """HDF5 allocates whole chunks, so a batch needs (chunks it opens) x (chunk rows) x (bytes per image) per array,
    plus the margin; computed here from the file's own chunk shapes. With exactly that free the batch is written;
    one byte less and it is refused before anything of it is written."""
    from qkhooks.store.writer import FREE_MARGIN_BYTES

    with h5py.File(_write_plain(tmp_path, sizes, chunk_images), "r") as f:
        rows = {name: f[name].chunks[0] for name in ("big", "small")}
    assert chunk_images is None or set(rows.values()) == {chunk_images}
    expected = FREE_MARGIN_BYTES + new_chunks * (rows["big"] * 3 * 5 * 4 + rows["small"] * 8)
    asked, committed = _bytes_asked(tmp_path, monkeypatch, sizes, chunk_images)
    assert (asked, committed) == (expected, sum(sizes[:-1]))
    assert _bytes_asked(tmp_path, monkeypatch, sizes, chunk_images, free=expected - 1) == (expected, sum(sizes[:-1]))
    assert _bytes_asked(tmp_path, monkeypatch, sizes, chunk_images, free=expected) == (None, sum(sizes))


def _write_plain(tmp_path: Path, sizes: list[int], chunk_images: int | None) -> Path:
    out = tmp_path / "plain.h5"
    with RunWriter(out, dtype="float32", chunk_images=chunk_images) as w:
        n = 0
        for b in sizes:
            w.write_batch([str(n + j) for j in range(b)],
                          {"big": np.ones((b, 3, 5), np.float32), "small": np.arange(n, n + b, dtype=np.int64)})
            n += b
    return out


@pytest.mark.parametrize("options, message", [
    ({"compression": "zstd"}, "compression must be one of none, gzip, lzf; got 'zstd'."),
    ({"dtype": "bfloat16"}, "dtype must be 'float16' or 'float32', got 'bfloat16'."),
])
def test_a_writer_with_an_unknown_codec_or_dtype_is_refused_by_name_before_any_file_is_made(tmp_path, options, message):
    out = tmp_path / "run.h5"
    with pytest.raises(QKHooksError) as err:
        RunWriter(out, **options)
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []


def test_a_batch_whose_array_changes_shape_is_refused_by_name_and_the_run_keeps_the_batches_before_it(tmp_path):
    out = tmp_path / "run.h5"
    w = RunWriter(out, dtype="float32")
    w.write_batch(["a", "b"], {"v": np.ones((2, 3), np.float32)})
    w.write_batch(["c", "d"], {"v": np.ones((2, 4), np.float32)})
    with pytest.raises(QKHooksError) as err:
        w.flush()
    assert str(err.value) == f"writing {out} failed: v: a batch has shape (4,) per image, the run has (3,)."
    w.close()
    with open_run(out) as run:
        assert run.ids == ["a", "b"] and run.array("v").shape == (2, 3)


def test_a_runs_later_batches_find_their_arrays_without_looking_them_up_in_the_file(tmp_path, monkeypatch):
    """After the first batch the writer keeps each array's dataset (and its chunk rows): HDF5's path lookups, which
    cost more than the writes of a small batch, are not repeated for every array of every batch."""
    looked_up: list[str] = []
    get, getitem = h5py.Group.get, h5py.Group.__getitem__

    def spy_get(self, name, *args, **kwargs):
        looked_up.append(name)
        return get(self, name, *args, **kwargs)

    def spy_getitem(self, name):
        looked_up.append(name)
        return getitem(self, name)

    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_static("s", np.zeros(2))
        w.write_batch(["a"], {"modes/v": np.ones((1, 3), np.float32), "w": np.zeros((1, 2), np.float32)})
        w.flush()
        monkeypatch.setattr(h5py.Group, "get", spy_get)
        monkeypatch.setattr(h5py.Group, "__getitem__", spy_getitem)
        for i in range(3):
            w.write_batch([f"b{i}"], {"modes/v": np.full((1, 3), i, np.float32), "w": np.ones((1, 2), np.float32)})
        w.write_static("s", np.ones(2))  # rewritten in place: the writer thread looks it up
        w.flush()
        monkeypatch.undo()
    assert "s" in looked_up  # the spy sees the writer thread's lookups
    # nor the ids and the committed count's holders (round 23: fmt.CommittedCount opened once, with the ids)
    assert not {"modes/v", "w", "modes", "/modes/v", "/w", fmt.IDS, "images"} & set(looked_up), looked_up
    with open_run(out) as run:
        np.testing.assert_array_equal(run.array("modes/v")[:, 0], [1.0, 0.0, 1.0, 2.0])


def test_an_empty_batch_after_the_first_adds_nothing_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
        w.write_batch([], {"v": np.zeros((0, 2), np.float32)})
        w.write_batch(["b"], {"v": np.full((1, 2), 2.0, np.float32)})
        w.flush()
        assert w.committed == 2
    with open_run(out) as run:
        assert run.ids == ["a", "b"] and run.complete
        np.testing.assert_array_equal(run.array("v")[:], [[1.0, 1.0], [2.0, 2.0]])


def test_a_resume_matches_the_config_by_content_not_by_the_order_its_keys_were_given_in(tmp_path):
    """The run's config attribute is stored as JSON with sorted keys, so a resume whose config dict lists the same
    settings in another order is the same run (and the stored text does not depend on the caller's order)."""
    out = tmp_path / "run.h5"
    w = RunWriter(out, dtype="float32", attrs={"model": "timm:x", "config": {"modes": 16, "batch_size": 4}})
    w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
    w.close(complete=False)
    with h5py.File(out, "r") as f:
        assert f.attrs["config"] == '{"batch_size": 4, "modes": 16}'
    with RunWriter(out, mode="resume", dtype="float32", attrs={"model": "timm:x", "config": {"batch_size": 4, "modes": 16}}) as w:
        assert w.committed == 1
        w.write_batch(["b"], {"v": np.ones((1, 2), np.float32)})
    with open_run(out) as run:
        assert run.ids == ["a", "b"] and run.complete


def test_a_closed_writer_refuses_another_batch_by_saying_so(tmp_path):
    w = RunWriter(tmp_path / "run.h5", dtype="float32")
    w.close()
    with pytest.raises(QKHooksError) as err:
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
    assert str(err.value) == "this run writer is closed."


def test_the_writer_thread_never_keeps_a_program_alive_that_forgot_to_close_its_writer(tmp_path):
    """The writer's thread is a daemon: a script that ends without ``close()`` exits (its last batches may be lost,
    never the ones committed) instead of hanging on the thread's queue."""
    w = RunWriter(tmp_path / "run.h5", dtype="float32")
    try:
        threads = [t for t in __import__("threading").enumerate() if t.name == "qkhooks-writer" and t.is_alive()]
        assert threads and all(t.daemon for t in threads)
    finally:
        w.close()


def test_a_compressed_run_whose_first_batch_has_one_image_keeps_one_image_per_chunk(tmp_path):
    """Compressed chunks are one image each (a chunk touched by two batches is rewritten elsewhere in the file), also
    after a first batch of one image."""
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32", compression="gzip") as w:
        for i in range(3):
            w.write_batch([str(i)], {"v": np.full((1, 4), i, np.float32)})
    with h5py.File(out, "r") as f:
        assert f["v"].chunks == (1, 4) and f["v"].compression == "gzip"
        np.testing.assert_array_equal(f["v"][:, 0], [0.0, 1.0, 2.0])


def test_the_summary_of_a_run_without_a_data_attribute_says_it_is_unknown(tmp_path):
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.ones((1, 2), np.float32)})
    with open_run(out) as run:
        lines = run.summary().splitlines()
    assert "data     ?" in lines and "version  qkhooks ?" in lines


def test_a_version_1_model_info_without_heads_gives_every_layer_its_one_grid_and_no_head_count():
    from qkhooks.access import LayerGeometry

    info = {"num_prefix_tokens": 1, "grid": [2, 3]}
    assert fmt.layer_geometry(info, 4) == LayerGeometry(4, (2, 3), 1, 7, 7, (2, 3), 1, 0, 0)
    assert fmt.layer_geometry({"grid": [2, 3]}, 4) is None
