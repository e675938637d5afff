"""Round 30: the BFD reducers fold each layer's tokens in the layer's hook (``take_inputs``), as the anisotropy
baseline does since round 29, so `qkhooks bfd` no longer keeps every layer's tokens (B, N, d) to the batch's end. The
states must equal the ones folded from kept tokens bit for bit (and a direct numpy mean), and a batch is folded whole
or refused whole, whichever way its tokens came."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import timm
import torch

import qkhooks
import qkhooks.analysis.bfd
from qkhooks.analysis.bfd_reducers import BFDEnergies, PositionDecoding, PositionMeans, full_modes
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError
from qkhooks.spectrum import LayerSpectrum, factored_svd
from qkhooks.stream import record_dataset
from test_taken_inputs_anisotropy import _images as _images_of, _tiny_vit  # the same 3-layer ViT of 4x4 patches


def _images(seed: int, n: int = 4) -> torch.Tensor:
    return _images_of(seed, n)


class UpdateOnly:
    """A sink that hands the reducer whole batches only (no ``take_inputs``): the kept-tokens path."""

    def __init__(self, reducer):
        self.reducer = reducer

    def update(self, batch: BatchCapture) -> None:
        self.reducer.update(batch)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _two_ways(model, make, ids: bool = True) -> tuple:
    """The same reducer fed in the layer hooks (no tokens kept) and from kept tokens, over the same two batches."""
    taken, kept = make(), make()
    kwargs = lambda run, n: {"ids": [f"img{run.images_seen + i}" for i in range(n)]} if ids else {}  # noqa: E731
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[taken]) as run:
        for seed in (1, 2):
            run(_images(seed), **kwargs(run, 4))
            assert all(c.inputs is None for c in run.last.captures.values())  # nothing kept to the batch's end
    with torch.no_grad(), qkhooks.record(model, modes=None, keep_inputs=True, sinks=[UpdateOnly(kept)]) as run:
        for seed in (1, 2):
            run(_images(seed), **kwargs(run, 4))
    return taken, kept


def test_position_means_taken_in_the_hooks_equal_kept_tokens_bit_for_bit_and_numpy():
    model = _tiny_vit()
    taken, kept = _two_ways(model, PositionMeans)
    assert _states_equal(taken.state_dict(), kept.state_dict()) and taken.counts == {0: 8, 1: 8, 2: 8}
    tokens: dict[int, list[np.ndarray]] = {}
    with torch.no_grad(), qkhooks.record(model, modes=None, keep_inputs=True) as run:
        for seed in (1, 2):
            run(_images(seed))
            for layer in run.layers:
                tokens.setdefault(layer, []).append(run.inputs(layer).double().numpy())
    for layer, means in taken.means().items():
        np.testing.assert_allclose(means.numpy(), np.concatenate(tokens[layer]).mean(0), rtol=0, atol=1e-12)


def test_bfd_energies_and_probes_taken_in_the_hooks_equal_kept_tokens_bit_for_bit():
    model = _tiny_vit()
    means, _ = _two_ways(model, PositionMeans)
    spectra = full_modes(model)
    taken, kept = _two_ways(model, lambda: BFDEnergies(spectra, means, num_prefix_tokens=1))
    assert _states_equal(taken.state_dict(), kept.state_dict())
    assert float(taken.stats[2]["images"]) == 8 and float(taken.stats[2]["total"].sum()) > 0
    taken, kept = _two_ways(model, lambda: PositionDecoding(means, (4, 4), num_prefix_tokens=1, holdout_every=3))
    assert _states_equal(taken.state_dict(), kept.state_dict())
    assert taken.stats[0]["images"].tolist() == kept.stats[0]["images"].tolist() and sum(taken.stats[0]["images"]) == 8


def test_position_probes_without_ids_hold_the_tokens_until_the_ids_are_made_and_split_as_given_ids_do():
    """Live, without ids, the ids are made as the batch ends: the probes hold each layer's tokens until then, and the
    split equals the one of the same ids given up front (folded in the hooks)."""
    model = _tiny_vit()
    means, _ = _two_ways(model, PositionMeans)
    make = lambda: PositionDecoding(means, (4, 4), num_prefix_tokens=1, holdout_every=2)  # noqa: E731
    without, given = make(), make()
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[without]) as run:
        for seed in (1, 2):
            run(_images(seed))
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[given]) as run:
        for seed in (1, 2):
            run(_images(seed), ids=[str(run.images_seen + i) for i in range(4)])
    assert _states_equal(without.state_dict(), given.state_dict())
    assert 0 < int(given.stats[1]["images"][1]) < 8  # both splits have images


def _batch(tokens: dict[int, torch.Tensor], ids: list[str], inputs: bool = True) -> BatchCapture:
    caps = {l: LayerCapture(l, x.shape[0], inputs=x if inputs else None) for l, x in tokens.items()}
    return BatchCapture(ids=ids, meta={"num_prefix_tokens": 1}, layers=caps, offset=0)


def _bfd_reducers() -> list:
    g = torch.Generator().manual_seed(0)
    means = {l: torch.randn(5, 6, generator=g, dtype=torch.float64) for l in (0, 1)}
    spectra = [LayerSpectrum(l, *factored_svd(torch.randn(2, 3, 6, generator=g, dtype=torch.float64),
                                              torch.randn(2, 3, 6, generator=g, dtype=torch.float64))) for l in (0, 1)]
    return [PositionMeans(), BFDEnergies(spectra, means, num_prefix_tokens=1),
            PositionDecoding(means, (2, 2), num_prefix_tokens=1, holdout_every=2)]


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("taken", [True, False])
def test_a_batch_with_one_layer_of_the_wrong_shape_is_refused_whole_whichever_way_its_tokens_came(which, taken):
    """Layer 0's tokens fit, layer 1's have one token too many: nothing of the batch is folded, not even layer 0."""
    reducer = _bfd_reducers()[which]
    g = torch.Generator().manual_seed(1)
    good = {l: torch.randn(3, 5, 6, generator=g, dtype=torch.float64) for l in (0, 1)}
    first = _batch(good, ["a", "b", "c"])
    reducer.update(first)
    before = {k: np.array(v, copy=True) for k, v in reducer.state_dict().items()}
    bad = {0: torch.randn(3, 5, 6, generator=g, dtype=torch.float64), 1: torch.randn(3, 6, 6, generator=g, dtype=torch.float64)}
    batch = _batch(bad, ["d", "e", "f"], inputs=not taken)
    with pytest.raises(QKHooksError, match="layer 1: .*tokens"):
        if taken:
            for layer, x in bad.items():
                reducer.take_inputs(batch, layer, x)
        reducer.update(batch)
    assert _states_equal(reducer.state_dict(), before)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_parts_taken_for_a_batch_whose_forward_failed_are_not_folded_into_the_next_and_do_not_keep_it_alive(which):
    g = torch.Generator().manual_seed(2)
    tokens = {l: torch.randn(3, 5, 6, generator=g, dtype=torch.float64) for l in (0, 1)}
    reducer, reference = _bfd_reducers()[which], _bfd_reducers()[which]
    failed = _batch(tokens, ["a", "b", "c"], inputs=False)
    reducer.take_inputs(failed, 0, tokens[0] * 1000)  # the forward then fails: no update for this batch
    del failed
    gc.collect()
    assert not reducer._taken
    for r in (reducer, reference):
        r.update(_batch(tokens, ["a", "b", "c"]))
    assert _states_equal(reducer.state_dict(), reference.state_dict())


def test_a_layer_neither_handed_over_nor_kept_is_refused_naming_the_reducer_the_layer_and_both_fixes():
    reducer = _bfd_reducers()[1]
    g = torch.Generator().manual_seed(3)
    tokens = {l: torch.randn(3, 5, 6, generator=g, dtype=torch.float64) for l in (0, 1)}
    batch = _batch(tokens, ["a", "b", "c"], inputs=False)
    reducer.take_inputs(batch, 0, tokens[0])
    with pytest.raises(QKHooksError, match=r"^BFDEnergies got no tokens entering W_q/W_k of layer 1: .*sinks=\[\.\.\.\]\), "
                                           r"or record with keep_inputs=True\.$"):
        reducer.update(batch)
    assert float(reducer.stats[0]["images"]) == 0


def test_record_dataset_with_the_bfd_reducers_keeps_no_tokens_and_equals_kept_tokens(tmp_path):
    model = _tiny_vit()
    seen: list[bool] = []
    common = dict(modes=None, limit=4, batch_size=2, progress=False, store_modes=False)

    class KeptMeans(PositionMeans):  # the same reducer reading kept tokens: record_dataset keeps them for it
        take_inputs = None

    taken, kept = PositionMeans(), KeptMeans()
    record_dataset(model, "samples", tmp_path / "a.h5", reducers=[taken], on_batch=lambda b: seen.append(
        any(c.inputs is not None for c in b.captures.values())), **common)
    record_dataset(model, "samples", tmp_path / "b.h5", reducers=[kept], on_batch=lambda b: seen.append(
        all(c.inputs is not None for c in b.captures.values())), **common)
    assert seen == [False, False, True, True]
    assert _states_equal(taken.state_dict(), kept.state_dict()) and taken.counts == {0: 4, 1: 4, 2: 4}


# ------------------------------------------------------------------- qkhooks bfd reads data as qkhooks record does
def _pngs(folder, seed: int, n: int = 5) -> list:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    paths = [folder / f"img{i:02d}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return paths


def test_bfd_reads_the_image_column_it_is_given_and_equals_the_same_images_from_a_folder(tmp_path):
    """``qkhooks bfd --image-column``: a dataset with two image columns is read from the named one, so its result
    equals the one of that column's images in a folder (same ids), not the other column's."""
    import json

    import datasets

    from qkhooks.cli import main

    photos, pictures = _pngs(tmp_path / "photo", seed=1), _pngs(tmp_path / "picture", seed=2)
    ds = datasets.Dataset.from_dict({"photo": [str(p) for p in photos], "picture": [str(p) for p in pictures],
                                     "id": [p.name for p in pictures]})
    ds.cast_column("photo", datasets.Image()).cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    common = ["--random-init", "--layers", "0,1", "--batch-size", "3", "--holdout-every", "2"]
    results = {}
    for name, data, extra in (("column", f"hfds:{tmp_path / 'hf'}", ["--image-column", "picture", "--workers", "0"]),
                              ("folder", str(tmp_path / "picture"), []), ("other", str(tmp_path / "photo"), [])):
        js = tmp_path / f"{name}.json"
        assert main(["bfd", "timm:test_vit", data, "--out", str(tmp_path / f"{name}.h5"), "--json", str(js),
                     *common, *extra]) == 0
        results[name] = json.loads(js.read_text())
    layers = lambda r: json.dumps(r["layers"], sort_keys=True)  # noqa: E731
    assert layers(results["column"]) == layers(results["folder"]) != layers(results["other"])
    with pytest.raises(QKHooksError, match="'nope' is not in the dataset"):
        qkhooks.analysis.bfd.run_bfd("timm:test_vit", f"hfds:{tmp_path / 'hf'}", None, random_init=True,
                                     image_column="nope")


def test_bfd_refuses_loader_options_for_image_tensors_and_bad_workers_naming_the_flag(tmp_path, capsys):
    from qkhooks.analysis.bfd import run_bfd
    from qkhooks.cli import main

    model = _tiny_vit()
    with pytest.raises(QKHooksError, match="^num_workers and image_column say how a dataset is read"):
        run_bfd(model, _images(1), None, num_workers=2, image_column="image")
    folder = tmp_path / "images"
    _pngs(folder, seed=3)
    assert main(["bfd", "timm:test_vit", str(folder), "--random-init", "--out", str(tmp_path / "r.h5"),
                 "--workers", "-1"]) == 2
    assert "the loader workers must be a whole number >= 0 (num_workers, --workers; 0 decodes in this process), got -1." in (
        capsys.readouterr().err)
    assert not list(tmp_path.glob("r*.h5"))  # neither pass left a file


# ------------------------------------------------------------------- run.last freed as the next forward begins
def test_the_last_batch_is_freed_as_the_next_forward_begins_and_a_batch_the_caller_keeps_stays_whole():
    """A recording never holds two batches at once: by the time the next forward's first block runs, the previous
    ``run.last`` is gone (unless the caller kept it, and then it is unchanged), and the new batch is ``run.last``."""
    import weakref

    model = _tiny_vit()
    alive_in_forward: list[bool] = []
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full") as run:
        run(_images(1))
        first = weakref.ref(run.last)

        def watch(module, args) -> None:
            gc.collect()
            alive_in_forward.append(first() is not None)

        handle = model.blocks[0].register_forward_pre_hook(watch)
        run(_images(2))
        handle.remove()
        assert alive_in_forward == [False]  # batch 1 was gone before batch 2's first block ran
        kept = run.last
        maps = kept.attention(1, "full").clone()
        run(_images(3))  # the caller holds `kept`: the recording drops its reference only
        assert run.last is not kept and run.ids == ["8", "9", "10", "11"]
        assert torch.equal(kept.attention(1, "full"), maps) and kept.ids == ["4", "5", "6", "7"]
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full") as fresh:
        fresh(_images(2))
        assert torch.equal(fresh.attention(1, "full"), maps)  # what the kept batch holds is that batch's


def test_after_a_forward_that_raised_the_last_batch_is_gone_and_reading_it_says_why():
    model = _tiny_vit()
    handed: list[str] = []

    class Watch:
        def update(self, batch):
            handed.extend(batch.ids)

    def boom(module, args):
        raise RuntimeError("boom")

    with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[Watch()]) as run:
        run(_images(1))
        handle = model.blocks[2].register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            run(_images(2))
        handle.remove()
        assert run.last is None and run.n == 0 and run.ids == [] and handed == ["0", "1", "2", "3"]
        with pytest.raises(QKHooksError, match=r"^the last forward did not complete \(it raised, or it is still "
                                               r"running\).*run the model again \(keep the batch you need: "
                                               r"batch = run\.last\)\.$"):
            run.query(0)
        run(_images(3))
        assert run.ids == ["4", "5", "6", "7"] and run.query(0).shape[0] == 4


# ------------------------------------------------------------- each layer's own geometry in a live recording's batches
def test_a_live_recordings_sinks_get_each_layers_own_geometry_as_record_dataset_gives_it():
    """CaiT's class-attention layer sees CLS + patches after patch-only layers: its prefix is 1 where the first
    layer's is 0. Live, the batches carry every layer's geometry as ``record_dataset``'s probe gives it, so the top-k
    reducer drops that layer's CLS (before round 30 it ranked it as a patch) and its state equals the one fed the
    probe's geometry."""
    from qkhooks.analysis.topk import TopKModes
    from qkhooks.stream import probe_geometry

    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=4, depth_token_only=1).eval()
    probe = probe_geometry(model, qkhooks.record(model, modes=2).sites, (32, 32))
    live, given = TopKModes(), TopKModes()
    with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[live]) as run:
        for seed in (1, 2):
            run(_images(seed))
            assert run.last.meta["geometry"] == probe and run.geometry(2) == probe[2]
    with torch.no_grad(), qkhooks.record(model, modes=2, sinks=[given]) as run:
        for seed in (1, 2):
            run(_images(seed), meta={"geometry": probe, "num_prefix_tokens": 0, "grid": (4, 4)})
    assert live.prefixes == given.prefixes == {0: 0, 1: 0, 2: 1}
    assert _states_equal(live.state_dict(), given.state_dict())


def test_timesformers_groups_have_no_layer_geometry_and_reading_one_says_why_not_that_maps_are_missing():
    """TimeSformer's time and space groups are not windows of an image grid: its batches carry no geometry for those
    layers (the forward is not refused for it), and ``run.geometry(l)`` names the reason."""
    from test_inside_forms import _timesformer

    model = _timesformer()
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), qkhooks.record(model, modes=2) as run:
        model(pixel_values=clip)
        assert run.last.query(0) is not None and "geometry" not in run.last.meta
        with pytest.raises(QKHooksError, match=r"groups its tokens in its own way \(TimeSformer's time or space groups\), "
                                               r"not in windows of an image grid, so it has no layer geometry\.$"):
            run.geometry(0)
