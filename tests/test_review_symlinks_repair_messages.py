"""Round 36's review findings, each a test seen to fail on the code before its fix."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import timm
import torch

import qkhooks


def _tiny(size: int = 48) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, embed_dim=32,
                             depth=2, num_heads=4, num_classes=0).eval()


def _loaded(model: torch.nn.Module):
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    return LoadedModel(model=model, spec="tiny", image_config=ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3))


# ------------------------------------------------------------------ analyze modes: numerically null modes (review D)
def test_null_modes_get_no_cosine_images_or_same_object_value_and_leave_the_layer_figures(tmp_path):
    """Layer 1's head 2 has W_k = 0, so all its sigma are 0 and its u_n, v_n are any basis: its modes are labelled
    null in modes.json (no cosine, no top images, no p_same), their cosines are blank in the CSVs, and the layer's
    unweighted p_same and modes_with_value cover the other heads' modes only (numpy over the per-mode values, the
    null set from a dense float64 SVD of the weights)."""
    from qkhooks.analysis.anisotropy import AnisotropyReducer
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.topk import TopKModes

    model = _tiny()
    d, heads, dk = 32, 4, 8
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[d + 2 * dk: d + 3 * dk].zero_()  # W_k of head 2
        model.blocks[1].attn.qkv.bias[d + 2 * dk: d + 3 * dk].zero_()
    w = model.blocks[1].attn.qkv.weight.detach().double().numpy()
    sigma = np.stack([np.linalg.svd(w[h * dk:(h + 1) * dk].T @ w[d + h * dk: d + (h + 1) * dk], compute_uv=False)[:2]
                      for h in range(heads)])
    null = sigma <= sigma.max(1, keepdims=True) * d * np.finfo(np.float32).eps
    assert null[2].all() and not null[[0, 1, 3]].any()

    qkhooks.record_dataset(_loaded(model), "o3:8:2", tmp_path / "run.h5", modes=2, batch_size=4, progress=False,
                           dtype="float32", reducers=[TopKModes(k=4, map_dtype="float32"), AnisotropyReducer()])
    summary = analyze_modes(tmp_path / "run.h5", tmp_path / "out", same_object_top=3, figure_modes=0, overview=False,
                            images=False)
    saved = json.loads((tmp_path / "out" / "modes.json").read_text())
    layer = next(e for e in saved["layers"] if e["layer"] == 1)
    for h, head in enumerate(layer["heads"]):
        for rec in head["modes"]:
            if null[h, rec["mode"]]:
                assert rec["null"] is True and rec["cos"] is None and rec["top"] == [] and rec["p_same"] is None
                assert rec["relative_cos"] is None
            else:
                assert "null" not in rec and rec["cos"] is not None and len(rec["top"]) == 4
    assert f"per layer: {{1: {int(null.sum())}}}" in summary["null_modes_note"] and "numerically null" in summary["null_modes_note"]

    with open(tmp_path / "out" / "same_object.csv") as fh:
        rows = [r for r in csv.reader(fh)][1:]
    per_mode = {(int(r[1]), int(r[2])): r for r in rows if r[0] == "1" and r[1] != "mean"}
    for (h, m), r in per_mode.items():
        assert (r[4] == "nan") == bool(null[h, m]) and (r[5] == "nan" if null[h, m] else True)
    values = np.array([float(per_mode[h, m][5]) for h in range(heads) for m in range(2) if not null[h, m]])
    same = summary["same_object"]["layers"][1]
    assert same["modes_with_value"] == int(np.isfinite(values).sum()) <= 6
    assert same["p_same_unweighted"] == pytest.approx(float(np.nanmean(values)), rel=1e-6)
    assert math.isnan(same["per_head"][2])
    with open(tmp_path / "out" / "anisotropy.csv") as fh:
        aniso = [r for r in csv.reader(fh)][1:]
    blank = {(int(r[1]), int(r[2])) for r in aniso if r[0] == "1" and r[1] != "mean" and r[4] == "nan"}
    assert blank == {(h, m) for h in range(heads) for m in range(2) if null[h, m]}


def test_a_layer_where_no_mode_has_a_same_object_value_says_why(tmp_path):
    """Masks that are background only: the same-object statistic is NaN, as before, and the layers are listed as
    left out with the reason, where they had none."""
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.topk import TopKModes

    qkhooks.record_dataset(_loaded(_tiny()), "o3:8:2", tmp_path / "run.h5", modes=2, batch_size=4, progress=False,
                           dtype="float32", reducers=[TopKModes(k=4, map_dtype="float32")])
    import h5py

    with h5py.File(tmp_path / "run.h5", "r+") as f:  # every object label set to background after the recording
        f["masks/objects"][...] = 0
    summary = analyze_modes(tmp_path / "run.h5", tmp_path / "out", same_object_top=3, figure_modes=0, overview=False,
                            images=False)
    same = summary["same_object"]
    for layer in (0, 1):
        assert same["layers"][layer]["modes_with_value"] == 0 and math.isnan(same["layers"][layer]["p_same"])
        assert same["left_out"][layer].startswith("no mode has a value: none of its modes' top-3 images has a labelled")


# ------------------------------------------------------------------ run files: links and checkpoints (review C)
def _photo(seed: int, size: int = 32):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


_ITEMS = [{"image": _photo(i), "id": f"item{i}"} for i in range(8)]
_KW = dict(layers="0", modes=2, batch_size=2, progress=False, checkpoint_every=1)


def _interrupted(loaded, path, batches: int = 2, data=None, **options) -> None:
    """A run of ``data`` (default _ITEMS) stopped by Ctrl-C after ``batches`` batches (by default a checkpoint after
    each)."""
    from qkhooks.errors import RunInterrupted

    seen = []

    def interrupt(batch) -> None:
        seen.append(batch)
        if len(seen) == batches:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted):
        qkhooks.record_dataset(loaded, _ITEMS if data is None else data, path, on_batch=interrupt, **{**_KW, **options})


def _states(path) -> dict:
    with qkhooks.open_run(path) as run:
        return {name: run.state(name) for name in run.states()}


def _assert_same_states(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert sorted(a[name]) == sorted(b[name])
        for key in a[name]:
            np.testing.assert_array_equal(np.asarray(a[name][key]), np.asarray(b[name][key]), err_msg=f"{name}/{key}")


@pytest.fixture(scope="module")
def tiny_loaded():
    return qkhooks.load_model("timm:vit_tiny_patch16_224@random")


@pytest.fixture(scope="module")
def reference_states(tiny_loaded, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    qkhooks.record_dataset(tiny_loaded, _ITEMS, path, **_KW)
    return _states(path)


def test_a_run_resumed_through_a_symlink_keeps_one_checkpoint_at_its_target(tiny_loaded, reference_states, tmp_path):
    """Resumed through a link, the checkpoint was looked up and written beside the link: the resume started over, and
    the target's stale checkpoint (same run id, fewer images) was read with the complete file without a word. Now
    the sidecar is the target's whichever name is used: the resume continues from it and the states equal an
    uninterrupted run's."""
    real, link = tmp_path / "real.h5", tmp_path / "link.h5"
    _interrupted(tiny_loaded, real)
    link.symlink_to(real)
    result = qkhooks.record_dataset(tiny_loaded, _ITEMS, link, resume=True, **_KW)
    assert result.resumed_from >= 2  # from the target's checkpoint (one a batch), not from the first image
    assert link.is_symlink() and not (tmp_path / "link.h5.reducers").exists()
    with qkhooks.open_run(real) as run:
        assert run.complete and run.n == 8
    _assert_same_states(_states(real), reference_states)
    _assert_same_states(_states(link), reference_states)
    # a run resumed through a link before this round kept its checkpoint beside the link: still found through it
    (tmp_path / "real.h5.reducers").rename(tmp_path / "link.h5.reducers")
    _assert_same_states(_states(link), reference_states)
    with qkhooks.open_run(real) as opened:  # through the real name it is missing, and said to be beside real.h5
        assert opened.states() == [] and opened.missing_states().startswith(
            "real.h5.reducers is missing: the states of the reducers this run kept (topk_modes, anisotropy) live in "
            "that file, next to real.h5;")


def test_an_overwrite_through_a_symlink_replaces_the_run_it_names_and_keeps_the_link(tiny_loaded, tmp_path):
    """--overwrite through a link replaced the link by a new file and left the target's old run in place."""
    real, link = tmp_path / "real.h5", tmp_path / "link.h5"
    qkhooks.record_dataset(tiny_loaded, _ITEMS[:4], real, **_KW)
    link.symlink_to(real)
    qkhooks.record_dataset(tiny_loaded, _ITEMS, link, overwrite=True, **_KW)
    assert link.is_symlink() and link.resolve() == real.resolve()
    with qkhooks.open_run(real) as run:
        assert run.n == 8 and run.ids == [f"item{i}" for i in range(8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.h5", "real.h5", "real.h5.reducers"]


def test_reducer_states_that_count_other_images_than_the_file_holds_are_refused_not_read(tiny_loaded, tmp_path):
    """A copy of a live run whose checkpoint was copied later (states over 8 images, file of 4), and a complete file
    beside an earlier checkpoint of it (states over 4 images, file of 8: a run finished under a hard link's name):
    both were read without a word (only verify saw the first). Both are now refused, by the reader and by verify."""
    import shutil

    from qkhooks.store import format as fmt
    from qkhooks.store.repair import repair, verify_run

    run = tmp_path / "run.h5"
    _interrupted(tiny_loaded, run, batches=3)
    shutil.copy(run, tmp_path / "early.h5")
    shutil.copy(fmt.checkpoint_path(run), tmp_path / "early.reducers")
    with qkhooks.open_run(run) as opened:
        early = opened.n
    import h5py

    with h5py.File(run, "r") as f:
        early_states = fmt.read_states(f, run)[0]
    assert 2 <= early_states <= early < 8
    qkhooks.record_dataset(tiny_loaded, _ITEMS, run, resume=True, **_KW)
    cases = {"later": (tmp_path / "early.h5", fmt.checkpoint_path(run), f"they count 8 images, and the file holds {early}"),
             "earlier": (run, tmp_path / "early.reducers",
                         f"they count {early_states} images, and the file is complete with 8")}
    for name, (file, states, why) in cases.items():
        copy = tmp_path / f"{name}.h5"
        shutil.copy(file, copy)
        shutil.copy(states, fmt.checkpoint_path(copy))
        with qkhooks.open_run(copy) as opened:
            with pytest.raises(qkhooks.QKHooksError, match=rf"do not belong to the images it holds: {why}"):
                opened.state("topk_modes")
            assert opened.n == (early if name == "later" else 8)  # the per-image arrays still read
        report = verify_run(copy)
        assert not report.ok and any(why in p for p in report.problems)
        if name == "earlier":  # repair leaves such a checkpoint out, not copies it beside the copy (review F)
            fixed = repair(copy, tmp_path / f"{name}-fixed.h5")
            assert fixed.states == [] and any("is an earlier one of this run" in p for p in fixed.problems)
            assert verify_run(tmp_path / f"{name}-fixed.h5").ok
        fmt.checkpoint_path(copy).unlink()  # the fix the message gives: read without states
        with qkhooks.open_run(copy) as opened:
            assert opened.states() == []


def test_a_file_name_that_is_not_utf8_is_refused_before_anything_is_written(tiny_loaded, tmp_path):
    """A folder with b'zz\\xff.png': the run stopped at that image's batch ("'utf-8' codec can't encode ...", naming
    neither the file nor a fix), and every resume stopped there again. Now it is refused before anything is
    written, naming the file's bytes and the fix; a stream's item with such an id is refused at its batch."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        _photo(i).save(folder / f"a{i}.png")
    _photo(9).save(bytes(folder) + b"/zz\xff.png")
    with pytest.raises(qkhooks.QKHooksError, match=r"the id '.*zz\\udcff.png' \(its bytes: b'.*zz\\xff.png'\) is not "
                                                   r"UTF-8 text.*rename that file.*Nothing was written"):
        qkhooks.record_dataset(tiny_loaded, str(folder), tmp_path / "run.h5", **_KW)
    assert not (tmp_path / "run.h5").exists()

    def stream():
        yield from ({"image": _photo(i), "id": f"ok{i}"} for i in range(4))
        yield {"image": _photo(5), "id": "bad\udcff"}

    with pytest.raises(qkhooks.QKHooksError, match=r"the id 'bad\\udcff' \(its bytes: b'bad\\xff'\) is not UTF-8 "
                                                   r"text.* The 4 images before it stay committed in .*stream.h5"):
        qkhooks.record_dataset(tiny_loaded, stream(), tmp_path / "stream.h5", **_KW)
    with qkhooks.open_run(tmp_path / "stream.h5") as run:
        assert run.ids == ["ok0", "ok1", "ok2", "ok3"]  # the batches before it, committed


def test_verify_reads_the_json_attributes_and_a_changed_geometry_key_is_damage_not_the_one_grid_rule(
        tiny_loaded, tmp_path):
    """A flipped bit in model/info's JSON: open_run refused the run as damaged while `info --verify` said every
    part read. A flipped bit inside a layer_geometry key (the JSON still parses): run.geometry(l) fell back to the
    one-grid rule of version-1 files without a word. Both are now damage, for verify and for the reader."""
    import shutil

    import h5py

    from qkhooks.store.repair import verify_run

    run = tmp_path / "run.h5"
    qkhooks.record_dataset(tiny_loaded, _ITEMS[:4], run, **_KW)
    assert verify_run(run).ok
    with qkhooks.open_run(run) as opened:
        recorded = opened.geometry(0)
    broken, renamed = tmp_path / "broken.h5", tmp_path / "renamed.h5"
    for copy in (broken, renamed):
        shutil.copy(run, copy)
    with h5py.File(broken, "r+") as f:
        text = f["model"].attrs["info"]
        f["model"].attrs["info"] = text[:40] + "\x01" + text[41:]  # one byte of the JSON changed: it no longer parses
    with h5py.File(renamed, "r+") as f:
        info = json.loads(f["model"].attrs["info"])
        info["layer_geometry"] = {"\u0130": info["layer_geometry"]["0"]}  # the key "0" changed
        f["model"].attrs["info"] = json.dumps(info)
    report = verify_run(broken)
    assert not report.ok and any(p.startswith("an attribute's JSON does not parse") for p in report.problems)
    report = verify_run(renamed)
    assert report.problems == ["model/info's layer_geometry has no entry for recorded layer 0 (its keys: \u0130)"]
    shutil.copy(run, tmp_path / "identity.h5")  # the run id's JSON: a checkpoint is tied to its run by it
    with h5py.File(tmp_path / "identity.h5", "r+") as f:
        f.attrs["identity"] = f.attrs["identity"][:-1]
    assert any(p.startswith("an attribute's JSON does not parse") for p in verify_run(tmp_path / "identity.h5").problems)
    with qkhooks.open_run(renamed) as opened:
        with pytest.raises(qkhooks.QKHooksError, match=r"renamed.h5 is damaged \(model/info's layer_geometry has no "
                                                       r"entry for recorded layer 0"):
            opened.geometry(0)
    assert recorded.grid is not None  # what the file said before
    shutil.copy(run, tmp_path / "v1.h5")  # a file without any layer_geometry (version 1): the one-grid rule still holds
    with h5py.File(tmp_path / "v1.h5", "r+") as f:
        info = json.loads(f["model"].attrs["info"])
        del info["layer_geometry"]
        info["schema_version"] = 1
        f["model"].attrs["info"] = json.dumps(info)
    assert verify_run(tmp_path / "v1.h5").ok
    with qkhooks.open_run(tmp_path / "v1.h5") as opened:
        assert (opened.geometry(0).grid, opened.geometry(0).num_prefix_tokens) == (recorded.grid, recorded.num_prefix_tokens)


def test_repair_refuses_an_out_it_cannot_write_before_any_work_in_one_sentence(tiny_loaded, tmp_path, monkeypatch):
    """repair --out into a full disk died in HDF5 (a segfault, 48 tracebacks); into a read-only folder it raised two
    tracebacks. Now a folder that takes no file, or has less room than the damaged file's size, is refused before
    anything is written (the missing folder is made, as record makes a run's)."""
    import shutil as sh

    from qkhooks.store.repair import repair

    run = tmp_path / "run.h5"
    qkhooks.record_dataset(tiny_loaded, _ITEMS[:4], run, **_KW)
    size = run.stat().st_size
    report = repair(run, tmp_path / "new" / "deeper" / "fixed.h5")  # a folder that does not exist yet: made
    assert (tmp_path / "new" / "deeper" / "fixed.h5").exists() and len(report.recovered) == 4
    free = size + (4 << 20) - 1  # one byte short of the copy's bound and the spare room
    monkeypatch.setattr(sh, "disk_usage", lambda path: sh._ntuple_diskusage(10 * free, 9 * free, free))
    with pytest.raises(qkhooks.QKHooksError, match=rf"repair needs up to {size / 2**20:.1f} MiB \(the damaged file's "
                                                   rf"size\) in {tmp_path}, which has {free / 2**20:.1f} MiB free.*"
                                                   r"Nothing was written"):
        repair(run, tmp_path / "full.h5")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("full")) == []
    assert not (tmp_path / "new2").exists()
    with pytest.raises(qkhooks.QKHooksError, match="repair needs up to"):  # no folder is made for a refused repair
        repair(run, tmp_path / "new2" / "deeper" / "fixed.h5")
    assert not (tmp_path / "new2").exists()
    monkeypatch.undo()
    with pytest.raises(qkhooks.QKHooksError, match="nothing of .*a_text can be read"):
        (tmp_path / "a_text").write_text("not a run")
        repair(tmp_path / "a_text", tmp_path / "new3" / "fixed.h5")
    assert not (tmp_path / "new3").exists()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with pytest.raises(qkhooks.QKHooksError, match=r"cannot create the --out folder .*a_file/sub.*choose a folder"):
        repair(run, blocked / "sub" / "fixed.h5")


# ------------------------------------------------------------------ a newcomer's path (review B)
def test_a_recording_handed_photos_says_how_to_make_the_models_input(tiny_loaded):
    """run(pil), run([pil]), a numpy array or a uint8 tensor raised deep inside timm (AttributeError, ValueError,
    AssertionError); now a QKHooksError names the loaded model's own preprocessing, which gives what the model
    takes: the stacked images equal the run's input to the bit when recorded (the hooks see the same tokens)."""
    photo = _photo(3, size=40)
    with qkhooks.record(tiny_loaded, modes=2, layers=[0]) as run:
        for given, what in ((photo, "PIL.Image.Image"), ([photo], "list of a PIL.Image.Image"),
                            (np.array(photo), "numpy.ndarray")):
            with pytest.raises(qkhooks.QKHooksError, match=rf"handed a {what}.*torch.stack\(\[loaded.image_config\(img\)"):
                run(given)
        raw = torch.from_numpy(np.array(photo.resize((224, 224)))).permute(2, 0, 1)[None]
        with pytest.warns(UserWarning, match=r"handed a torch.uint8 tensor .*unless the model normalises them itself"):
            with pytest.raises(Exception):  # timm's own refusal of uint8 pixels: a wrapper may take them
                run(raw)
        x = torch.stack([tiny_loaded.image_config(photo)])
        with torch.no_grad():
            out = run(x)
    with torch.no_grad():
        plain = tiny_loaded.model(x)  # unhooked: the recording leaves the outputs bit for bit
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert run.query(0).shape == (1, 3, 2, 1 + (224 // 16) ** 2)  # the photo, resized and cropped to the model's size


def test_qkhooks_submodules_named_in_the_readme_work_after_a_plain_import():
    """qkhooks.options.RecordOptions, qkhooks.distributed.merge_shards and qkhooks.analysis.bfd raised
    AttributeError after `import qkhooks` unless something had imported them; a fresh interpreter shows it."""
    import subprocess
    import sys

    code = ("import qkhooks; print(qkhooks.options.RecordOptions.__name__, qkhooks.distributed.merge_shards.__name__, "
            "qkhooks.analysis.bfd.__name__, qkhooks.models.unsupported.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RecordOptions", "merge_shards", "qkhooks.analysis.bfd", "qkhooks.models.unsupported"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        qkhooks.analysis.nope  # noqa: B018


def test_a_resume_with_no_run_at_out_says_a_new_run_starts(tiny_loaded, tmp_path):
    """--resume with a mistyped --out recorded everything again without a word."""
    with pytest.warns(UserWarning, match=r"there is no run at .*typo.h5 to continue, so a new run starts there"):
        result = qkhooks.record_dataset(tiny_loaded, _ITEMS[:2], tmp_path / "typo.h5", resume=True, **_KW)
    assert result.resumed_from is None and result.images == 2


def test_info_on_a_run_stopped_before_its_first_checkpoint_says_a_resume_records_it_again(tiny_loaded, tmp_path):
    """info told a run killed before its first checkpoint that its sidecar 'is missing ... copy it along', though
    nothing was moved; it now says a resume records the committed images again (and the resume does)."""
    run = tmp_path / "run.h5"
    kw = {**_KW, "checkpoint_every": 100}
    _interrupted(tiny_loaded, run, batches=3, checkpoint_every=100)
    with qkhooks.open_run(run) as opened:
        n = opened.n
        assert n >= 2 and opened.missing_states() == (
            f"no reducer checkpoint yet (topk_modes, anisotropy): the run stopped before its first, so a --resume "
            f"records its {n} committed images again, for the reducers to see them.")
    import qkhooks.store.reader as reader_module

    with qkhooks.open_run(run) as opened:  # a writer still running (its lock held) has not reached it yet
        original = reader_module.writer_alive
        reader_module.writer_alive = lambda path: True
        try:
            assert opened.missing_states() == ("no reducer checkpoint yet (topk_modes, anisotropy): the writer has not "
                                               "reached its first (every --checkpoint-every / checkpoint_every "
                                               "batches, 8 by default); read the states again later.")
        finally:
            reader_module.writer_alive = original
    assert qkhooks.record_dataset(tiny_loaded, _ITEMS, run, resume=True, **kw).resumed_from == 0


def test_a_model_without_prefix_tokens_warns_that_its_default_rows_are_the_centre_patch_twice():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0, class_token=False, global_pool="avg").eval()
    with pytest.warns(UserWarning, match=r"layer 0 \(blocks.0.attn\) has no prefix token \(no CLS\)") as caught:
        with torch.no_grad(), qkhooks.record(model, modes=None, attention="rows") as run:
            run(torch.randn(1, 3, 32, 32))
    assert sum("no prefix token" in str(w.message) for w in caught) == 1  # once a recording, not once a layer
    centre = (4 // 2) * 4 + 4 // 2
    assert run.last.meta["query_tokens"].tolist() == [[centre, centre]]


def test_top_k_ranked_again_from_stored_maps_leaves_out_each_layers_own_prefix_tokens(tmp_path):
    """CaiT: its self-attention blocks have no prefix token, its class-attention block one. Ranked again from the
    stored maps (more images per mode than the saved state keeps), every layer was scored with the first layer's
    prefix (0), so the class-attention layer's CLS entered its scores; the ranking now equals the recording's own
    reducer with a larger k (review A's lead, confirmed here)."""
    from qkhooks.analysis.modes import _topk_state
    from qkhooks.analysis.topk import TopKModes, layer_state
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, depth_token_only=1, num_classes=0).eval()
    u = torch.as_tensor(qkhooks.spectrum(model)[2].U)[0, :, 0]  # layer 2's first mode of head 0, in x space
    with torch.no_grad():  # a CLS whose normed token lies along u and v: it scores above every patch where counted
        model.cls_token.copy_(5 * (u - u.mean()).view(1, 1, -1))
    loaded = LoadedModel(model=model, spec="cait", image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))
    runs = {}
    for k in (3, 6):
        runs[k] = tmp_path / f"k{k}.h5"
        qkhooks.record_dataset(loaded, _ITEMS, runs[k], modes=2, batch_size=4, progress=False, dtype="float32",
                               reducers=[TopKModes(k=k, map_dtype="float32")])
    with qkhooks.open_run(runs[3]) as run:
        assert [run.geometry(l).num_prefix_tokens for l in (0, 1, 2)] == [0, 0, 1]
        rebuilt, source = _topk_state(run, [0, 1, 2], 6, 0)
    assert "recomputed from the stored maps" in source
    with qkhooks.open_run(runs[6]) as run:
        saved = run.state("topk_modes")
    for layer in (0, 1, 2):
        mine, theirs = layer_state(rebuilt, layer), layer_state(saved, layer)
        np.testing.assert_array_equal(mine["index"], theirs["index"], err_msg=f"layer {layer}")
        np.testing.assert_allclose(mine["score"], theirs["score"], rtol=1e-6, err_msg=f"layer {layer}")


def test_repair_keeps_the_ids_outside_a_damaged_heap_collection(tmp_path):
    """One zeroed 4 KiB heap collection of the ids made repair recover 0 of 300 images (it read the ids in one call).
    Now the ids are read a block, then a row, at a time around the damage: every id outside the collection is kept,
    with its row, each equal to the original (the digests vouch for them)."""
    import re

    from qkhooks.store import RunWriter
    from qkhooks.store.repair import repair

    path = tmp_path / "run.h5"
    ids = [f"image-{i:04d}-" + "x" * 80 for i in range(300)]  # long ids: several heap collections
    with RunWriter(path, dtype="float32", checksum=True) as w:
        for lo in range(0, 300, 10):
            w.write_batch(ids[lo:lo + 10], {"v": np.arange(lo, lo + 10, dtype=np.float32)[:, None].repeat(4, 1)})
    data = bytearray(path.read_bytes())
    second = [m.start() for m in re.finditer(b"GCOL", data)][1]
    data[second:second + 4096] = bytes(4096)
    (tmp_path / "bad.h5").write_bytes(bytes(data))
    report = repair(tmp_path / "bad.h5", tmp_path / "fixed.h5")
    assert 200 <= len(report.recovered) < 300 and any("their ids do not read" in p for p in report.problems)
    with qkhooks.open_run(tmp_path / "fixed.h5") as run:
        kept = run.ids
        rows = np.asarray(run.array("v")[:])
    assert kept == [i for i in ids if i in set(kept)]  # in order, each an original id
    np.testing.assert_array_equal(rows[:, 0], [float(ids.index(i)) for i in kept])


def test_a_static_that_repair_could_not_copy_is_named_as_lost_not_as_never_recorded(tiny_loaded, tmp_path):
    """A flipped bit in spectrum/L0/U's chunk: repair dropped it with a note, and the copy then passed verify,
    said layer 0 was 'recorded without modes', and its resume failed deep in the writer. The copy now names what it
    lost: verify's summary, run.spectrum, and a resume refused up front."""
    import h5py

    from qkhooks.store.repair import repair, verify_run

    run = tmp_path / "run.h5"
    qkhooks.record_dataset(tiny_loaded, _ITEMS[:4], run, checksum=True, **_KW)
    with h5py.File(run, "r") as f:
        offset = f["spectrum/L0/U"].id.get_chunk_info(0).byte_offset
    data = bytearray(run.read_bytes())
    data[offset + 10] ^= 0x40
    (tmp_path / "bad.h5").write_bytes(bytes(data))
    report = repair(tmp_path / "bad.h5", tmp_path / "fixed.h5")
    assert any(p.startswith("spectrum/L0/U unreadable") for p in report.problems)
    checked = verify_run(tmp_path / "fixed.h5")
    assert checked.lost == ["spectrum/L0/U"] and "lost     spectrum/L0/U: a repair could not copy" in checked.summary()
    with qkhooks.open_run(tmp_path / "fixed.h5") as opened:
        with pytest.raises(qkhooks.QKHooksError, match=r"lost spectrum/L0/U to damage \(a repair could not copy it\)"):
            opened.spectrum(0)
    with pytest.raises(qkhooks.QKHooksError, match=r"cannot resume .*fixed.h5: the repair that wrote it could not copy "
                                                   r"spectrum/L0/U"):
        qkhooks.record_dataset(tiny_loaded, _ITEMS, tmp_path / "fixed.h5", resume=True, checksum=True, **_KW)
    from qkhooks.analysis.modes import analyze_modes

    with pytest.raises(qkhooks.QKHooksError, match=r"fixed.h5 lost spectrum/L0/U to damage .* the modes of those layers "
                                                   r"are not known"):  # which modes are null is not known there
        analyze_modes(tmp_path / "fixed.h5", tmp_path / "modes", figure_modes=0, overview=False, images=False)
    assert not (tmp_path / "modes").exists()


def test_a_misspelt_random_suffix_and_a_folder_of_other_image_formats_say_what_is_wrong(tmp_path):
    """'timm:NAME@rand' said timm does not know the model 'NAME@rand'; a folder of .tif files said no images were
    found, not that it saw files it does not read."""
    with pytest.raises(qkhooks.QKHooksError, match=r"ends in '@rand', which is no model spec suffix; the one there is "
                                                   r"'@random'"):
        qkhooks.load_model("timm:vit_tiny_patch16_224@rand")
    for name in ("a.tif", "b.bmp", "notes.txt"):
        _photo(0).save(tmp_path / name) if name != "notes.txt" else (tmp_path / name).write_text("x")
    with pytest.raises(qkhooks.QKHooksError, match=r"no images found .* It holds files with \.bmp, \.tif, \.txt: "
                                                   r"convert the images among them to PNG or JPEG"):
        qkhooks.data.open_dataset(str(tmp_path), tiny_image_config())


def tiny_image_config():
    from qkhooks.data import ImageConfig

    return ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)


def test_spectrum_rope_bands_on_a_model_without_rope_is_refused_before_the_table_with_the_fix(tmp_path, capsys):
    from qkhooks.cli import main

    code = main(["spectrum", "timm:vit_tiny_patch16_224", "--random-init", "--layers", "0", "--rope-bands", "2",
                 "--json", str(tmp_path / "s.json")])
    out, err = capsys.readouterr()
    assert code == 2 and "layers [0] were handed no rotary tables: the model does not rotate q and k there" in err
    assert "drop --rope-bands for this model" in err and out == "" and not (tmp_path / "s.json").exists()
    assert main(["spectrum", "timm:vit_tiny_patch16_224", "--random-init", "--rope-bands", "2"]) == 2
    assert "--rope-bands writes its figures to the --json file; add --json FILE." in capsys.readouterr().err


def test_a_resume_over_a_replaced_image_file_is_refused_naming_it(tiny_loaded, tmp_path):
    """An image recorded before the interrupt and replaced by another file (another size) was kept by --resume,
    though the run stores each file's size: the run held two versions of the data. Now refused, naming it."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        _photo(i).save(folder / f"a{i}.png")
    run = tmp_path / "run.h5"
    _interrupted(tiny_loaded, run, batches=3, data=str(folder))
    was = (folder / "a0.png").stat()
    before = was.st_size
    _photo(100, size=48).save(folder / "a0.png")  # another picture under the same name
    assert (folder / "a0.png").stat().st_size != before
    with pytest.raises(qkhooks.QKHooksError, match=rf"images it keeps have another file size than when it recorded them "
                                                   rf"\(first: 'a0.png', {before} bytes then, \d+ now\)"):
        qkhooks.record_dataset(tiny_loaded, str(folder), run, resume=True, **_KW)
    _photo(0).save(folder / "a0.png")  # put back, its time too (round 39: a resume compares it): the resume goes on
    os.utime(folder / "a0.png", ns=(was.st_atime_ns, was.st_mtime_ns))
    assert qkhooks.record_dataset(tiny_loaded, str(folder), run, resume=True, **_KW).images == 8


def test_a_reader_opened_while_its_writer_ran_reads_the_states_after_the_writer_ends(tmp_path):
    """Review E: a reader opened mid-run (its count 2-4 images) was refused the states once the writer had finished
    ('they count 16 images, and the file holds 4 ... move run.h5.reducers away'): the check compared them with the
    reader's own count. It now reads the file's count as it is."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run.h5"
    writer = ("import sys, time, numpy as np, qkhooks\nfrom PIL import Image\n"
              "items = [{'image': Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)),"
              " 'id': f'i{i}'} for i in range(12)]\n"
              "qkhooks.record_dataset(qkhooks.load_model('timm:vit_tiny_patch16_224@random'), items, sys.argv[1], "
              "layers='0', modes=2, batch_size=2, progress=False, checkpoint_every=1, on_batch=lambda b: time.sleep(0.4))\n")
    process = subprocess.Popen([sys.executable, "-c", writer, str(run)])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run.h5.reducers").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        reader = qkhooks.open_run(run)
        seen = reader.n
        assert not reader.complete and seen < 12
        assert process.wait(timeout=120) == 0
        state = reader.state("topk_modes")  # the states now count all 12 images; the reader still counts `seen`
        assert int(np.asarray(state["images"])) == 12 and reader.n == seen
        assert reader.refresh() == 12
        reader.close()
    finally:
        process.kill()


def test_the_demo_refuses_a_bad_o3_count_before_writing_anything(tiny_loaded, tmp_path):
    """--o3 0 was met in the preference section, after the spectrum section had written (replacing a previous
    report's), and named 'o3:0:3', a spec the user never typed."""
    from qkhooks.report import make_report

    with pytest.raises(qkhooks.QKHooksError, match=r"--o3 \(odd-one-out displays .*\) and --objects .* must be at "
                                                   r"least 1; got 0 and 24"):
        make_report(tmp_path / "report", tiny_loaded, o3=0, progress=False)
    assert not (tmp_path / "report").exists()


def test_a_repaired_runs_checkpoint_is_tied_to_its_run_id(tiny_loaded, tmp_path):
    """repair wrote its checkpoint without the run id the copy keeps, and a checkpoint without one is taken beside
    any run: another run of as many images copied over FIXED.h5 read the old run's top-k (review F)."""
    import shutil

    import h5py

    from qkhooks.store import format as fmt
    from qkhooks.store.repair import repair

    for name, items in (("a", _ITEMS[:6]), ("b", _ITEMS[2:8])):
        qkhooks.record_dataset(tiny_loaded, items, tmp_path / f"{name}.h5", **_KW)
    repair(tmp_path / "a.h5", tmp_path / "fixed.h5")
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert fmt.read_checkpoint(tmp_path / "fixed.h5", fmt.run_id_of(f))[0] == 6
    shutil.copy(tmp_path / "b.h5", tmp_path / "fixed.h5")  # another run's file, the repaired one's checkpoint kept
    with qkhooks.open_run(tmp_path / "fixed.h5") as run:
        assert run.states() == []  # not the other run's states
