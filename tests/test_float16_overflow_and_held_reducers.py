"""Round 32: the three open findings round 31 left, each a wrong number or a guess without a word.

- A value beyond float16's range (65504: a class token's massive activation) was stored as inf in a float16 run
  file, and kept as inf in ``TopKModes``' float16 maps. Both now refuse the batch, naming the images and the fix.
- A reducer that already held images (an earlier recording's) was fed by a new recording that numbers its images
  from 0 again, so one top-k index named two images. Recordings now refuse it.
- A module loaded with ``from_pretrained`` from a hub id, whose cached processor config cannot be read, got guessed
  preprocessing (with a warning) where a local folder's unreadable one is refused. Both are refused now.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import qkhooks
from qkhooks.analysis.anisotropy import AnisotropyReducer
from qkhooks.analysis.bfd_reducers import BFDEnergies, PositionDecoding, PositionMeans, full_modes
from qkhooks.analysis.recipes import default_reducers
from qkhooks.analysis.topk import TopKModes
from qkhooks.errors import QKHooksError
from qkhooks.reducers import Recipe
from qkhooks.store import RunWriter

F16_MAX = float(np.finfo(np.float16).max)  # 65504


def _tiny(cls_peak: float | None = None, size: int = 32) -> torch.nn.Module:
    """A 2-layer ViT; with ``cls_peak``, layer 1's class token enters W_q/W_k with one channel near ``cls_peak``
    (a massive activation) while its patch tokens stay well inside float16's range."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=0).eval()
    if cls_peak is not None:
        c = 5
        with torch.no_grad():
            model.cls_token.zero_()
            model.cls_token[..., c] = 1000.0  # after layer norm: ~sqrt(32) in channel c, ~0 elsewhere
            model.pos_embed[..., c] = 0
            model.patch_embed.proj.weight[c] = 0
            model.patch_embed.proj.bias[c] = 0
            model.blocks[1].norm1.weight[c] = cls_peak / 32 ** 0.5
    return model


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _photos(folder, n: int = 3) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


# ----------------------------------------------------------------------------- the run file's float16 cast
def test_a_float16_run_refuses_a_batch_with_a_value_beyond_float16_and_keeps_writing_the_next(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as writer:
        writer.write_batch(["a", "b"], {"x": np.ones((2, 3), np.float32)})
        big = np.ones((3, 3), np.float32)
        big[1, 2] = -7.0e4  # image "d"
        with pytest.raises(QKHooksError) as err:
            writer.write_batch(["c", "d", "e"], {"x": big})
        assert str(err.value) == (
            "x of image(s) ['d'] hold values beyond float16's range (largest |x| = 70000; float16 ends at 65504), "
            "which a float16 run file would store as inf without a word; the batch is refused. Record in float32: "
            f"--dtype float32 (dtype='float32'). {path} keeps the 2 images before it, but its arrays (names, shapes, "
            "storage dtype) were fixed by its first batch, so a --resume meets the same refusal: apply the fix above "
            "and start again with --overwrite.")
        writer.write_batch(["c"], {"x": np.full((1, 3), 2.0, np.float32)})  # the refusal left the writer whole
    with h5py.File(path) as f:
        assert [i.decode() for i in f["images/ids"][()]] == ["a", "b", "c"]
        assert np.array_equal(f["x"][()], np.array([[1] * 3, [1] * 3, [2] * 3], np.float16))


@pytest.mark.parametrize("source", [torch.float32, torch.float64, torch.bfloat16, "numpy"])
def test_the_float16_bound_is_the_casts_own_values_that_round_to_65504_are_stored_those_that_round_to_inf_refused(
        tmp_path, source):
    """float16's round-to-nearest-even sends |x| < 65520 to 65504 and |x| >= 65520 to inf: the refusal follows the
    cast exactly (numpy's float16 is the reference), from every wider source dtype."""
    def array(values):
        if source == "numpy":
            return np.asarray(values, np.float64)
        return torch.tensor(values, dtype=source)

    fits = 65280.0 if source == torch.bfloat16 else 65519.0  # bfloat16 steps by 256 there: 65280, 65536
    overflows = 65536.0 if source == torch.bfloat16 else 65520.0
    path = tmp_path / "run.h5"
    with RunWriter(path) as writer:
        writer.write_batch(["a"], {"x": array([[fits, -fits]])})
        with pytest.raises(QKHooksError, match=r"^x of image\(s\) \['b'\] hold values beyond float16's range"):
            writer.write_batch(["b"], {"x": array([[1.0, -overflows]])})
    with h5py.File(path) as f:
        stored = f["x"][()]
    assert stored.dtype == np.float16 and np.array_equal(stored, np.float16([[fits, -fits]]))
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(np.float64(overflows)))  # the reference: numpy's cast of the refused value


def test_the_models_own_inf_is_stored_as_it_is_and_nan_does_not_hide_an_overflow(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as writer:
        writer.write_batch(["a", "b"], {"x": torch.tensor([[np.inf, 1.0], [np.nan, -np.inf]])})
        hidden = torch.tensor([[np.nan, 1.0], [2.0, 1.0e5]])  # aminmax of the array is NaN
        with pytest.raises(QKHooksError, match=r"^x of image\(s\) \['d'\] hold values beyond float16's range "
                                               r"\(largest \|x\| = 100000;"):
            writer.write_batch(["c", "d"], {"x": hidden})
    with h5py.File(path) as f:
        stored = f["x"][()]
    assert np.array_equal(stored, np.float16([[np.inf, 1.0], [np.nan, -np.inf]]), equal_nan=True)


def test_a_float32_run_stores_what_a_float16_run_refuses(tmp_path):
    value = np.array([[1.0e5, -3.0e6, 0.5]], np.float32)
    with RunWriter(tmp_path / "run.h5", dtype="float32") as writer:
        writer.write_batch(["a"], {"x": value})
    with h5py.File(tmp_path / "run.h5") as f:
        assert np.array_equal(f["x"][()], value)


def test_record_dataset_refuses_a_class_tokens_massive_activation_in_float16_and_records_it_exactly_in_float32(
        tmp_path):
    from qkhooks.data import ImageConfig, open_dataset
    from qkhooks.models.load import LoadedModel

    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    loaded = LoadedModel(model=_tiny(cls_peak=2.0e5), spec="tiny-massive-cls", image_config=cfg)
    folder = tmp_path / "photos"
    _photos(folder)
    with pytest.raises(QKHooksError) as err:
        qkhooks.record_dataset(loaded, str(folder), tmp_path / "r16.h5", modes=2, progress=False, batch_size=2)
    assert str(err.value).startswith("modes/L1/key, modes/L1/query of image(s) ['0.png', '1.png'] hold values beyond "
                                     "float16's range (largest |x| = ")
    assert str(err.value).endswith("Record in float32: --dtype float32 (dtype='float32'). Nothing was written; apply "
                                   "the fix above and run again.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no run file, no lock left behind

    result = qkhooks.record_dataset(loaded, str(folder), tmp_path / "r32.h5", modes=2, progress=False, batch_size=2,
                                    dtype="float32")
    topk = result.reducer("topk_modes")
    assert topk.map_dtype == torch.float32  # the default recipe keeps the run's dtype
    with qkhooks.open_run(tmp_path / "r32.h5") as stored:
        maps = np.asarray(stored.query(1)[:])
    pixels = torch.stack([open_dataset(str(folder), cfg)[i]["pixel_values"] for i in range(3)])
    with torch.no_grad(), qkhooks.record(loaded.model, modes=2) as run:  # the reference: a live recording
        run(pixels)
        live = run.query(1).numpy()
    assert np.abs(maps).max() > F16_MAX and np.isfinite(maps).all()
    np.testing.assert_allclose(maps, live, rtol=1e-6, atol=1e-3)
    assert torch.isfinite(topk.layers[1]["query"]).all() and topk.layers[1]["query"].abs().max() > F16_MAX


# ----------------------------------------------------------------------------- TopKModes' kept maps
def test_topk_float16_refusal_names_images_layer_and_fix_and_leaves_state_unchanged():
    model = _tiny(cls_peak=2.0e5)
    topk = TopKModes(k=2, num_prefix_tokens=1)
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[0], sinks=[topk]) as run:
        run(_images(2))  # layer 0 only: in range
    before = {name: value.clone() for name, value in topk.layers[0].items()}
    with pytest.raises(QKHooksError) as err:
        with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[TopKModes(k=2)]) as run:
            run(_images(3))
    assert str(err.value).startswith(
        "TopKModes: the query/key maps of image(s) ['0', '1', '2'] at position(s) [0, 1, 2] of this batch (image index "
        "[0, 1, 2]) reach |x| = ")
    assert str(err.value).endswith(
        "at layer(s) [1], beyond float16's range (65504), and would be kept as inf; the whole batch is refused and the "
        "reducer's state is unchanged. Keep them in float32: TopKModes(map_dtype='float32'), which `qkhooks record "
        "--dtype float32` (record_dataset(dtype='float32')) makes.")
    assert all(torch.equal(before[name], topk.layers[0][name]) for name in before)

    for dtype in ("float32", "bfloat16"):  # wider ranges keep the same ranking and finite maps
        wide = TopKModes(k=2, map_dtype=dtype)
        with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[wide]) as run:
            run(_images(3))
            cls_values = run.query(1)[..., 0]
        kept = wide.layers[1]["query"].float()
        assert torch.isfinite(kept).all() and kept[..., 0].abs().max() > F16_MAX
        assert cls_values.abs().max() > F16_MAX and run.query(1)[..., 1:].abs().max() < F16_MAX  # a prefix token's


def test_topk_refuses_a_patch_tokens_overflow_too():
    model = _tiny()
    with torch.no_grad():
        model.blocks[1].norm1.weight.mul_(1.0e6)
    with pytest.raises(QKHooksError, match=r"TopKModes: the query/key maps of image\(s\) .* at layer\(s\) \[1\], "
                                           r"beyond float16's range"):
        with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[TopKModes(k=2)]) as run:
            run(_images(2))


# ----------------------------------------------------------------------------- the recipe's storage dtype
def test_the_recipe_gives_its_build_the_runs_dtype_only_where_the_build_takes_it():
    seen = []
    takes = Recipe("takes", build=lambda modes, attention, has_target, dtype: seen.append(dtype) or [])
    plain = Recipe("plain", build=lambda modes, attention, has_target: seen.append("plain") or [])
    assert takes.reducers(16, [], False, "float32") == [] and plain.reducers(16, [], False, "float32") == []
    assert seen == ["float32", "plain"]
    assert [r.map_dtype for r in default_reducers(16, [], False, "float32") if isinstance(r, TopKModes)] == [
        torch.float32]
    assert [r.map_dtype for r in default_reducers(16, [], False) if isinstance(r, TopKModes)] == [torch.float16]


# ----------------------------------------------------------------------------- reducers that hold images
def _fed(reducer, model, layers=None, keep_inputs=False, n=3):
    with torch.no_grad(), qkhooks.record(model, modes=2 if isinstance(reducer, TopKModes) else None,
                                         layers=layers, keep_inputs=keep_inputs, sinks=[reducer]) as run:
        run(_images(n))
    return reducer


def test_every_builtin_reducer_says_how_many_images_it_holds_after_folds_merges_and_loads():
    model = _tiny()
    means = _fed(PositionMeans([0]), model, layers=[0])
    made = {
        "topk": lambda: TopKModes(k=2),
        "anisotropy": AnisotropyReducer,
        "means": lambda: PositionMeans([0]),
        "energies": lambda: BFDEnergies(full_modes(model, [0]), means, 1),
        "decoding": lambda: PositionDecoding(means, (4, 4), 1, 3),
    }
    for name, make in made.items():
        assert make().images_held() == 0, name
        one = _fed(make(), model, layers=[0])
        assert one.images_held() == 3, name
        two = make()
        two.load_state_dict(one.state_dict())
        assert two.images_held() == 3, name
        if name != "decoding":  # its splits follow global indices, which two recordings from 0 share
            two.merge(_fed(make(), model, layers=[0], n=2))
            assert two.images_held() == 5, name


def test_a_recording_refuses_a_reducer_that_holds_an_earlier_recordings_images(tmp_path):
    model = _tiny()
    topk = TopKModes(k=2)
    with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[topk]) as run:
        run(_images(3))
        run(_images(2, seed=1))  # one recording: the indices run on
    assert sorted(set(topk.layers[0]["index"].flatten().tolist())) <= [0, 1, 2, 3, 4]
    with pytest.raises(QKHooksError, match=r"^this TopKModes already holds 5 images from an earlier recording, and "
                                           r"this recording has given it 0: its image indices start again here"):
        with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[topk]) as run:
            run(_images(3))
    assert topk.images_held() == 5

    folder = tmp_path / "photos"
    _photos(folder)
    with pytest.raises(QKHooksError, match=r"^this AnisotropyReducer already holds 3 images"):
        qkhooks.record_dataset(model, str(folder), tmp_path / "run.h5", modes=None, progress=False,
                               reducers=[_fed(AnisotropyReducer(), model)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # refused before the run file was made


def test_a_detached_and_reattached_recording_keeps_feeding_its_own_reducer():
    model = _tiny()
    topk = TopKModes(k=2)
    run = qkhooks.record(model, modes=2, sinks=[topk])
    with torch.no_grad():
        run.attach()
        run(_images(2))
        run.detach()
        run.attach()  # the reducer holds the 2 images this recording gave it
        run(_images(2, seed=1))
        run.detach()
    assert topk.images_held() == 4 and run.images_seen == 4


# ----------------------------------------------------------------------------- a hub id's cached processor
def test_a_module_from_a_hub_id_whose_cached_processor_config_cannot_be_read_is_refused_not_guessed(
        tmp_path, monkeypatch):
    """The module remembers only its hub id (``config._name_or_path``); the processor config lies in the local hub
    cache, which is read (never the network). Unreadable there, it is refused as a folder's is; not cached at all,
    the guess is made and said, as before."""
    import warnings

    import huggingface_hub.constants
    import transformers

    from qkhooks.models.load import load_model
    from test_inputs import TINY_VIT

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = transformers.ViTModel.from_pretrained("org/tiny", cache_dir=cache, local_files_only=True).eval()
    assert module.config._name_or_path == "org/tiny"
    with pytest.warns(UserWarning, match="guessed preprocessing"):  # none cached: the guess, said
        load_model(module)
    (snapshot / "preprocessor_config.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guess is made (and warned about)
        with pytest.raises(QKHooksError, match=r"^the image processor saved with this model \('org/tiny'\) could not "
                                               r"be read \(OSError: .*preprocessor_config\.json.*\); fix it there"):
            load_model(module)


# ----------------------------------------------------------------------------- same-object over more images than k
def test_same_object_table_refuses_more_images_per_mode_than_its_state_ranks():
    """top_images gives at most the state's k images per sign; a result labelled top-5 resting on 3 was wrong."""
    from qkhooks.analysis.same_object import same_object_table

    torch.manual_seed(0)
    topk = TopKModes(k=3, num_prefix_tokens=1, map_dtype="float32")
    model = _tiny()
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[0], sinks=[topk]) as run:
        run(_images(6))
    objects = np.ones((6, 4, 4), np.int16)
    spectra = {0: {"S": np.ones((4, 2))}}
    assert same_object_table(topk.state_dict(), objects, spectra, 1, top=3)["top"] == 3
    with pytest.raises(QKHooksError, match=r"^the same-object statistic over the top 5 images per mode needs a top-k "
                                           r"state that ranks at least 5, and this one ranks 3; ask for top <= 3"):
        same_object_table(topk.state_dict(), objects, spectra, 1, top=5)


def test_analyze_modes_ranks_the_same_object_images_again_from_the_stored_maps_when_k_is_smaller(tmp_path):
    """A run recorded with TopKModes(k=3) and its maps: --same-object-top 5 ranks 5 images per mode from the maps,
    so the statistic equals that of a run whose reducer kept 8; without stored maps it is refused."""
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    cfg = ImageConfig(size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    loaded = LoadedModel(model=_tiny(size=48), spec="tiny", image_config=cfg)
    runs = {}
    for name, k, store in (("k3", 3, True), ("k8", 8, True), ("k3-nomaps", 3, False)):
        runs[name] = tmp_path / f"{name}.h5"
        qkhooks.record_dataset(loaded, "o3:9:2", runs[name], modes=2, batch_size=4, progress=False, dtype="float32",
                               store_modes=store, reducers=[TopKModes(k=k, map_dtype="float32")])
    same = {name: analyze_modes(runs[name], tmp_path / name, same_object_top=5, figure_modes=0, overview=False,
                                images=False)["same_object"] for name in ("k3", "k8")}
    assert same["k3"]["top"] == same["k8"]["top"] == 5
    assert same["k3"]["layers"] == same["k8"]["layers"]  # the same p_same, per head and per mode
    with pytest.raises(QKHooksError, match=r"the saved top-k state does not fit \(it keeps k=3 < 5\) and its stored "
                                           r"maps cover layers \[\]"):
        analyze_modes(runs["k3-nomaps"], tmp_path / "nomaps", same_object_top=5, figure_modes=0, overview=False,
                      images=False)


def test_each_layers_chance_is_taken_over_the_images_its_p_same_counts_with_the_same_weights():
    """A mode's top images are a selection; an image with one object scores 1 whatever the mode does. So the chance
    a layer's p_same is read against is the σ-weighted mean, over the same modes and images, of 1 / objects, not
    the data set's mean (numpy reference over the state's own top images)."""
    from qkhooks.analysis.same_object import chance_same_object, same_object_table
    from qkhooks.analysis.topk import layer_state, top_images

    model = _tiny()
    topk = TopKModes(k=4, num_prefix_tokens=1, map_dtype="float32")
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[0], sinks=[topk]) as run:
        run(_images(10))
    rng = np.random.default_rng(0)
    objects = np.zeros((10, 4, 4), np.int16)
    for i in range(10):  # 1 to 4 objects an image, image 3 none
        for label in range(1, 1 + (i % 4) + 1):
            objects[i].flat[rng.choice(16, 3, replace=False)] = label
    objects[3] = 0
    S = rng.uniform(0.5, 2.0, (4, 2))
    row = same_object_table(topk.state_dict(), objects, {0: {"S": S}}, 1, top=3)["rows"][0]
    state = layer_state(topk.state_dict(), 0)
    chance = np.full((4, 2), np.nan)
    for h in range(4):
        for m in range(2):
            counts = [len(set(objects[i].flat) - {0}) for i in top_images(state, h, m, "both", 3)["index"]]
            counts = [c for c in counts if c]
            chance[h, m] = np.mean([1 / c for c in counts]) if counts else np.nan
    np.testing.assert_allclose(row["chance_per_mode"], chance)
    w = np.where(np.isnan(chance), 0, S)
    per_head = (w * np.nan_to_num(chance)).sum(1) / w.sum(1)
    np.testing.assert_allclose(row["chance_per_head"], per_head)
    assert row["chance"] == pytest.approx(per_head.mean())
    assert row["chance"] != pytest.approx(chance_same_object(objects), abs=1e-3)  # the data set's: another number


def test_a_resume_takes_held_reducers_only_where_the_runs_checkpoint_replaces_their_state(tmp_path, monkeypatch):
    """A resume loads each reducer's state from the run's checkpoint, so reducers handed to it may hold images: they
    end up holding the run's. One whose state the resume did not replace keeps what it held and is refused."""
    import qkhooks.stream as stream
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    loaded = LoadedModel(model=_tiny(), spec="tiny", image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3,
                                                                              std=(0.5,) * 3))
    folder = tmp_path / "photos"
    _photos(folder, 4)
    out = tmp_path / "run.h5"
    options = dict(modes=2, progress=False, batch_size=2, limit=2)
    qkhooks.record_dataset(loaded, str(folder), out, reducers=[TopKModes(k=2)], **options)
    held = _fed(TopKModes(k=2), loaded.model, n=3)
    qkhooks.record_dataset(loaded, str(folder), out, resume=True, reducers=[held], **options)
    assert held.images_held() == 2  # the run's 2, from its checkpoint
    real = stream._resume
    monkeypatch.setattr(stream, "_resume", lambda writer, reducers, *a, **kw: real(writer, [], *a, **kw))  # states not loaded
    stray = _fed(TopKModes(k=2), loaded.model, n=3)
    with pytest.raises(QKHooksError, match=r"^this TopKModes already holds 3 images from an earlier recording, and "
                                           r"this recording has given it 2"):
        qkhooks.record_dataset(loaded, str(folder), out, resume=True, reducers=[stray], **options)
