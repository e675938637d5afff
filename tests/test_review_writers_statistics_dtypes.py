"""Round 34's fixes of round 33's open items and its reviews' findings: each test states the exact value or the
refusal, against an independent reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.errors import QKHooksError


def _sharded_run(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two shards of a 4-photo recording, merged into a view beside them."""
    from test_review_grids_bfd_damage import merged_shards

    _, _, _, out, shards, _ = merged_shards(tmp_path)
    return out, shards


@torch.no_grad()
def test_a_shard_removed_between_the_look_and_the_stat_reads_as_missing_not_a_raw_error(tmp_path, monkeypatch):
    """``rewritten_shards`` looked for each shard (``exists``) and then stat-ed it: a shard removed in between raised
    a bare FileNotFoundError. Now a shard gone at any point reads as missing, which the read refuses by name."""
    import h5py

    from qkhooks.store import open_run, reader

    out, shards = _sharded_run(tmp_path)
    shards[1].unlink()
    monkeypatch.setattr(reader.Path, "exists", lambda self: True)  # the shard was there when looked for
    with h5py.File(out, "r") as f:
        views: list[str] = []
        f.visit(lambda n: views.append(n) if isinstance(f[n], h5py.Dataset) and f[n].is_virtual else None)
        assert views and all(reader.rewritten_shards(f[n], out.parent, 4) == [] for n in views)
    monkeypatch.undo()
    with pytest.raises(QKHooksError, match=r"holding images 2-3 are missing there"):
        with open_run(out) as run:
            run.query(0)[:]


@torch.no_grad()
def test_the_shard_run_id_cache_keeps_a_bounded_number_of_versions(tmp_path, monkeypatch):
    """One entry was kept for every shard version a process read, without bound."""
    from qkhooks.store import reader

    _, shards = _sharded_run(tmp_path)
    monkeypatch.setattr(reader, "_SHARD_RUN_IDS", type(reader._SHARD_RUN_IDS)())
    monkeypatch.setattr(reader, "_SHARD_RUN_IDS_KEPT", 1)
    ids = [reader._shard_run_id(p) for p in shards]
    assert len(reader._SHARD_RUN_IDS) == 1 and list(reader._SHARD_RUN_IDS)[0][0] == str(shards[1])  # the latest
    assert None not in ids and ids[0] != ids[1]  # each rank's own run id
    assert reader._shard_run_id(shards[0]) == ids[0] and list(reader._SHARD_RUN_IDS)[0][0] == str(shards[0])


def _closed_run(tmp_path: Path) -> Path:
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    loaded = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                  embed_dim=32, depth=1, num_heads=2).eval())
    rng = np.random.default_rng(0)
    out = tmp_path / "r.h5"
    record_dataset(loaded, [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)], out, modes=2,
                   batch_size=2, reducers=[], progress=False)
    return out


def test_a_run_held_open_for_writing_by_plain_h5py_is_named_not_called_damaged(tmp_path):
    """A script holding a run file with h5py.File(path, "a") made every reader say the file was damaged and point to
    ``repair``. Now the reader names the other program and the fix; the file itself reads once it is closed."""
    import subprocess
    import sys

    from qkhooks.store import open_run
    from qkhooks.store._hdf5 import HeldOpenError, open_reader

    out = _closed_run(tmp_path)
    with open_run(out) as run:
        before = np.asarray(run.query(0)[:])
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, sys; f = h5py.File({str(out)!r}, 'a'); "
                               "print('open', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(HeldOpenError, match=r"another program has it open for writing with plain HDF5") as err:
            open_reader(out, deadline_s=0)
        assert "is damaged" not in str(err.value) and "qkhooks repair" not in str(err.value)
    finally:
        holder.communicate("")  # closes the file
    with open_run(out) as run:
        np.testing.assert_array_equal(np.asarray(run.query(0)[:]), before)


def test_a_plain_write_flag_left_by_a_dead_program_is_named_with_its_fix(tmp_path, monkeypatch):
    """The flag a plain h5py writer leaves when it dies without closing: named, with h5clear as the fix; verify
    reports it the same way (not a crash, not 'damaged')."""
    from qkhooks.store import verify_run
    from qkhooks.store import _hdf5

    out = _closed_run(tmp_path)
    block = _hdf5.Superblock.read(out)
    assert block.ok_checksum and block.flags == 0
    with open(out, "r+b") as fh:
        fh.write(block.with_flags(_hdf5._WRITE_FLAG))
    monkeypatch.setattr(_hdf5.Backoff, "wait", lambda self: False)
    with pytest.raises(_hdf5.HeldOpenError, match=r"left its \"open for write\" flag set, and no program holds"):
        _hdf5.open_reader(out)
    report = verify_run(out)
    assert not report.ok and report.problems == [f"the file does not open ({_hdf5.foreign_writer(out)})"]
    assert "h5clear -s" in report.problems[0]
    with open(out, "r+b") as fh:  # what h5clear -s does: the file reads again
        fh.write(block.with_flags(0))
    assert verify_run(out).ok


def test_info_on_a_run_a_live_writer_holds_says_it_is_being_written_not_to_resume_it(tmp_path):
    """An incomplete run read while its writer lives (running, or stopped with Ctrl-Z) was summarised as "resume with
    the same command plus --resume", which the live writer's lock refuses. Now it says the run is being written; the
    same file with its writer gone says to resume."""
    import h5py

    from qkhooks.store import open_run
    from qkhooks.store.lock import WriterLock

    out = _closed_run(tmp_path)
    with h5py.File(out, "r+", libver="latest") as f:  # as a killed writer leaves it
        f.attrs["complete"] = False
    with open_run(out) as run:
        assert "(incomplete: resume with the same command plus --resume)" in run.summary()
    lock = WriterLock(out)
    lock.hold_run()
    try:
        with open_run(out) as run:
            summary = run.summary()
        assert "being written: a live writer holds it" in summary and "--resume)" not in summary
    finally:
        lock.release()


@pytest.mark.parametrize("outer", [dict(modes=2), dict(modes=None, attention="rows"), dict(modes=None, attention="full"),
                                   dict(modes=None, attention="full", outputs="eager")])
@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_an_eager_outputs_recording_nested_in_another_is_taken_and_both_hold_the_models_maps(kind, outer):
    """``outputs="eager"`` inside another recording of the same model was refused as "computes attention more than
    once": the outer recording's rebuilt maps, computed in its hooks while the inner one watched the module, were
    taken for the module's own. qkhooks' hooks are now not watched; both hold the model's eager maps and the output is
    the eager forward's."""
    from test_foreign_hooks_refused import _eager, _images, _model

    model, images = _model(kind), _images()
    call = (lambda: model(images)) if kind == "timm" else (lambda: model(pixel_values=images).last_hidden_state)
    eager = _eager(model, kind, images)
    with torch.no_grad():
        fused = call()
        with qkhooks.record(model, **outer) as a:
            with qkhooks.record(model, modes=None, attention="full", outputs="eager") as b:
                got = call()
    for layer, want in enumerate(eager):
        torch.testing.assert_close(b.attention(layer, "full"), want, atol=1e-5, rtol=0)
        if outer.get("attention") == "full":
            torch.testing.assert_close(a.attention(layer, "full"), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, fused, atol=1e-5, rtol=1e-4)
    assert a.last is not None and a.last.n == 2


def test_the_same_object_test_takes_object_ids_up_to_int32s_largest_as_it_takes_small_ones():
    """Object ids up to 2**31 - 1 are valid (``masks/objects`` is int32) and were recorded, but the same-object test's
    ``optimal_objects`` took a bincount over the raw ids: 16 GiB for the largest, a MemoryError. Now the bins are the
    labels present. Reference: each object's mean map value, computed directly, the lowest label winning a tie."""
    from qkhooks.analysis.same_object import optimal_objects

    rng = np.random.default_rng(0)
    ids = np.array([0, 7, 2**31 - 2, 2**31 - 1], dtype=np.int32)
    objects = ids[rng.integers(0, 4, (6, 4, 4))]
    objects[5] = 0  # an image without objects: 0
    maps = rng.normal(size=(6, 16))
    maps[4] = 1.0  # a tie among every object: the lowest label
    want = []
    for m, o in zip(maps, objects.reshape(6, -1)):
        means = {int(label): m[o == label].mean() for label in np.unique(o) if label > 0}
        want.append(max(sorted(means), key=lambda label: means[label]) if means else 0)
    got = optimal_objects(maps, objects)
    assert got.dtype == np.int64 and got.tolist() == want and want[4] == min(set(objects[4].ravel()) - {0})
    small = np.searchsorted(ids, objects)  # the same objects under the ids 0..3: the same choices
    np.testing.assert_array_equal(ids[optimal_objects(maps, small)], got)


@torch.no_grad()
def test_pixios_eight_cls_tokens_are_its_prefix_and_its_rows_are_its_eager_attention():
    """Pixio puts 8 CLS tokens before its patches (``cls_token`` (1, 8, D)); qkhooks counted one, so rows, grids and
    BFD were refused saying tokens followed the patches. Now its prefix is 8, and the default rows (the first CLS
    token and the centre patch) are those rows of the model's own eager attention."""
    import transformers

    torch.manual_seed(0)
    config = transformers.PixioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      image_size=32, patch_size=8)
    model = transformers.PixioModel(config).eval()
    assert config.n_cls_tokens == 8 and all(s.num_prefix_tokens == 8 and s.grid == (4, 4) for s in qkhooks.sites(model))
    images = torch.randn(2, 3, 32, 32)
    with qkhooks.record(model, modes=None, attention="rows") as run:
        model(pixel_values=images)
    model.set_attn_implementation("eager")
    eager = model(pixel_values=images, output_attentions=True).attentions
    centre = 8 + 2 * 4 + 2  # the patch at (2, 2) of the 4x4 grid, after the 8 CLS tokens
    for layer, want in enumerate(eager):
        torch.testing.assert_close(run.attention(layer, "rows"), want[:, :, [0, centre]], atol=1e-6, rtol=0)


@torch.no_grad()
def test_x_clips_message_attention_over_frames_is_never_read_as_cls_and_patches():
    """X-CLIP's message attention attends across a video's frames. With 17 frames (CLS + a 4x4 grid's count) its
    tokens were read as CLS and patches: rows of the "centre patch" were frame 11's, without a word. Now every grid
    question is refused naming the frames; its full maps are the softmax of its own q·kᵀ (computed here from the
    module's projections)."""
    import transformers

    torch.manual_seed(0)
    frames = 17
    config = transformers.XCLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        num_frames=frames, mit_hidden_size=32, mit_intermediate_size=64, mit_num_hidden_layers=1,
        mit_num_attention_heads=4)
    model = transformers.XCLIPVisionModel(config).eval()
    site = [s for s in qkhooks.sites(model) if s.path.endswith("message_attn")][-1]
    assert site.num_prefix_tokens == 0 and site.grid is None
    video = torch.randn(frames, 3, 32, 32)
    with pytest.raises(QKHooksError, match=r"message_attn\): X-CLIP's message attention attends across a video's fra"):
        with qkhooks.record(model, modes=None, layers=[site.layer], attention="rows"):
            model(pixel_values=video)
    seen = []
    handle = site.module.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        with qkhooks.record(model, modes=None, layers=[site.layer], attention="full") as run:
            model(pixel_values=video)
    finally:
        handle.remove()
    x, attn = seen[0], site.module
    q = attn.q_proj(x).unflatten(-1, (4, 8)).transpose(1, 2)
    k = attn.k_proj(x).unflatten(-1, (4, 8)).transpose(1, 2)
    want = torch.softmax(q @ k.transpose(-1, -2) * site.scale, dim=-1)  # (1 video, 4 heads, 17 frames, 17 frames)
    torch.testing.assert_close(run.attention(site.layer, "full"), want, atol=1e-6, rtol=0)


def test_analyze_modes_says_when_the_run_stopped_early(tmp_path, capsys):
    """``analyze modes`` on a run stopped early gave its numbers over the committed images without a word (``analyze
    preference`` said so). Now modes.json has ``complete`` and the command prints a note; a finished run has none."""
    import json

    import h5py

    from qkhooks.cli import main

    out = _closed_run(tmp_path)
    args = ["analyze", "modes", str(out), "--no-images", "--figure-modes", "0", "--no-overview"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    finished = capsys.readouterr().out
    with h5py.File(out, "r+", libver="latest") as f:  # as a killed writer leaves it
        f.attrs["complete"] = False
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    stopped = capsys.readouterr().out
    assert "incomplete" not in finished and json.loads((tmp_path / "a" / "modes.json").read_text())["complete"] is True
    assert f"note: {out} is incomplete (the recording stopped early); every number covers its 2 committed" in stopped
    assert json.loads((tmp_path / "b" / "modes.json").read_text())["complete"] is False


def test_an_infinite_sample_is_refused_naming_it_not_dropped_like_a_missing_one():
    """NaN is "no value"; an infinite value was dropped as if missing, so the interval and the sentence spoke of the
    other units' mean (7 of 8) while the mean is infinite."""
    from qkhooks.readings import compare_reading, intervals, pair_pivots, trend_reading

    x = 1 + 0.1 * np.random.default_rng(0).standard_normal((8, 4))
    assert intervals(x)[2].units == 8  # finite: read
    x[3, 2] = np.inf
    for read in (lambda: intervals(x), lambda: trend_reading(x, [0, 1, 2, 3], "x", "images"),
                 lambda: compare_reading(x, 0.0, [0, 1, 2, 3], "x", "zero", "images")):
        with pytest.raises(QKHooksError, match=r"unit 3 has an infinite value \(inf\) at column 2"):
            read()
    z = np.ones((4, 2, 3))
    z[1, 0, 0] = -np.inf
    with pytest.raises(QKHooksError, match=r"unit 1 has an infinite value \(-inf\) at column 0"):
        pair_pivots(z)


def test_layers_without_a_value_or_with_too_few_units_are_named_untested_never_the_largest():
    """A layer with no value was named "largest at L0: +nan" and "not clearly different"; a trend whose first third
    had no value said "too few heads (0)" of 8 heads."""
    from qkhooks.readings import compare_reading, trend_reading

    rng = np.random.default_rng(1)
    x = 0.5 + 0.05 * rng.standard_normal((8, 4))
    x[:, 0] = np.nan  # L0: no head has a value
    x[3:, 1] = np.nan  # L1: 3 heads
    r = compare_reading(x, 0.0, [0, 1, 2, 3], "cos", "zero", "heads")
    assert r.verdict == "above" and "at every tested layer" in r.text and "not tested at L0, L1" in r.text
    assert "nan" not in r.text and "largest in magnitude at L0" not in r.text and "largest in magnitude at L1" not in r.text
    want = max((2, 3), key=lambda l: abs(np.mean(x[:, l])))
    assert r.estimates[f"L{want}"].value == pytest.approx(np.mean(x[:, want]))
    t = trend_reading(x[:, [0, 0, 2, 3]], [0, 1, 2, 3], "cos", "heads")
    assert t.verdict == "too_few" and "no heads have a value in the first third of the layers (L0)" in t.text
    allnan = np.full((8, 2), np.nan)
    assert compare_reading(allnan, 0.0, [0, 1], "a", "b", "heads").text == (
        "a vs b: no layer has a value (0 heads), so nothing can be compared.")


def test_a_pair_statistic_of_two_units_has_its_value_with_no_interval():
    """The mean dot product over pairs is defined for two units (one pair): it was NaN below three, so the report
    showed "+nan" for the anisotropy baseline of two photos."""
    from qkhooks.readings import intervals, pair_pivots

    z = np.random.default_rng(2).standard_normal((2, 3, 5))
    p = pair_pivots(z)
    np.testing.assert_allclose(p.value, (z[0] * z[1]).sum(-1), rtol=1e-12)
    assert np.isnan(p.se).all() and all(np.isnan(e.low) and e.units == 2 for e in intervals(p))


def test_an_augmented_mode_with_no_token_part_has_no_cosine():
    """A head with W_q = 0 and a q bias: in the augmented [x; 1] form its query direction is the bias alone, so
    cos(u_n, v_n) over the token part is 0/0. It read float noise as a cosine (the weighted cosine -0.07 or +0.12 by
    seed); now NaN, and the head has no weighted cosine. Other modes and heads keep the dense SVD's cosines."""
    from qkhooks.spectrum import spectrum

    torch.manual_seed(4)
    d, h = 8, 4
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=d, depth=1, num_heads=h,
                              img_size=32, num_classes=0).eval()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:2] = 0  # head 0's W_q: zero; its bias is not
        model.blocks[0].attn.qkv.bias.normal_()
    layer = spectrum(model, augmented=True).layers[0]
    w, b = model.blocks[0].attn.qkv.weight.detach().double(), model.blocks[0].attn.qkv.bias.detach().double()
    cos = np.asarray(layer.cos, np.float64)
    assert np.isnan(cos[0, 0]) and np.isnan(np.asarray(layer.cosine_weighted)[0])
    for head in range(1, h):  # the others: the dense SVD of [W_q b_q]^T [W_k b_k]
        rows = slice(2 * head, 2 * head + 2)
        q = torch.cat([w[rows], b[rows, None]], 1).numpy()
        k = torch.cat([w[d:][rows], b[d:][rows, None]], 1).numpy()
        u, s, vt = np.linalg.svd(q.T @ k)
        want = [abs(u[:d, n] @ vt[n, :d]) / np.linalg.norm(u[:d, n]) / np.linalg.norm(vt[n, :d]) for n in range(2)]
        np.testing.assert_allclose(np.abs(cos[head]), want, atol=1e-5)


@pytest.mark.parametrize("given", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64,
                                   torch.float8_e4m3fn, "float33", "cuda", 32])
def test_a_compute_dtype_other_than_a_float_is_refused_naming_the_fix(given):
    """compute_dtype=torch.int32 gave all-zero maps without a word (the tokens cast to integers), complex64 complex
    maps; bool and a name raised torch's own errors."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=16, depth=1, num_heads=2,
                              img_size=32, patch_size=8).eval()
    with pytest.raises(QKHooksError, match=r"compute_dtype must be one of torch's float dtypes .*Leave it out"):
        qkhooks.record(model, modes=2, compute_dtype=given)


@torch.no_grad()
@pytest.mark.parametrize("given", ["float64", "torch.float64", torch.float64])
def test_a_compute_dtype_named_is_read_as_torchs(given):
    """A name is taken for the dtype: the maps in float64 are x·u_n computed in float64 from the same tokens."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=16, depth=1, num_heads=2,
                              img_size=32, patch_size=8).eval()
    seen = []
    model.blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.append(out))
    with qkhooks.record(model, modes="all", compute_dtype=given, qk_path=False) as run:
        model(torch.randn(2, 3, 32, 32))
    spec = run.qk_spectrum.layers[0]
    got = run.query(0)
    want = torch.einsum("bnd,hdk->bhkn", seen[0].double(), torch.as_tensor(spec.U).double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_a_float64_models_modes_are_float64_accurate():
    """A float64 model's maps were float64 tensors but float32-accurate (5e-8 off x·u_n): its spectrum was kept in
    float32. Now its u_n, sigma_n are float64; the maps equal x·u_n from numpy's dense SVD of W_q^T W_k to 1e-11."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=16, depth=1, num_heads=2,
                              img_size=32, patch_size=8).eval().double()
    seen = []
    model.blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.append(out))
    with qkhooks.record(model, modes="all") as run:
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    spec = run.qk_spectrum.layers[0]
    assert spec.U.dtype == spec.S.dtype == torch.float64
    w = model.blocks[0].attn.qkv.weight.numpy()
    x = seen[0].numpy()
    for head in range(2):
        rows = slice(8 * head, 8 * head + 8)
        u, s, vt = np.linalg.svd(w[rows].T @ w[16:][rows])
        np.testing.assert_allclose(spec.S[head].numpy(), s[:8], rtol=1e-12, atol=1e-12)
        want = np.einsum("bnd,dk->bkn", x, u[:, :8])  # x·u_n; u_n's sign is the SVD's choice
        got = run.query(0)[:, head].numpy()
        signs = np.sign((got * want).sum((0, 2)))
        np.testing.assert_allclose(got, want * signs[None, :, None], atol=1e-11, rtol=0)


@torch.no_grad()
def test_an_fx_copy_called_inside_the_recording_is_refused_not_left_reading_the_batch_before():
    """A torch.fx copy of the model shares its Linear modules, not its attention modules: called inside record(),
    nothing was recorded and run.query still gave the previous batch's maps as if they were this call's. Now the q/k
    projection's hook, firing outside any recorded forward, refuses; the model itself still records."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10).eval()
    copy = torch.fx.symbolic_trace(model)
    first, second = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with qkhooks.record(model, modes=3) as run:
        model(first)
        with pytest.raises(QKHooksError, match=r"blocks\.0\.attn\.qkv \(layer 0's q/k projection\) ran outside any "
                                               r"forward of the recorded model"):
            copy(second)
        model(second)  # the recorded model: recorded as before
    with qkhooks.record(model, modes=3) as again:
        model(second)
    torch.testing.assert_close(run.query(1), again.query(1), rtol=0, atol=0)


def test_the_reports_bfd_share_claims_come_from_a_test_over_heads():
    """The BFD section stated "Content-content does not dominate (PP does)" and "the largest is PP" from point
    estimates (margins down to 0.0004) under a page saying every difference comes from a test. Now each is tested:
    named only where every difference's simultaneous interval excludes 0."""
    from qkhooks.readings import intervals
    from qkhooks.report import _tested_share_sentences

    rng = np.random.default_rng(0)

    def shares(cc: float, pp: float, heads: int = 12) -> dict[str, np.ndarray]:
        base = {"CC": cc, "CP": 0.1, "PC": 0.1, "PP": pp}
        return {t: v + 0.02 * rng.standard_normal((heads, 2)) for t, v in base.items()}

    clear = shares(0.6, 0.2)
    sentences, (largest, coupled) = _tested_share_sentences(clear)
    assert largest == "CC" and coupled == "PP"
    assert sentences[0].startswith("CC is the largest of the four energy shares (CC − CP ")
    want = intervals(np.column_stack([(clear["CC"] - clear[t]).reshape(-1) for t in ("CP", "PC", "PP")]),
                     limits=(-1.0, 1.0))
    assert f"CC − PP {want[2].text()}" in sentences[0] and "24 heads" in sentences[0]
    close = shares(0.35, 0.35)
    close["PP"] = close["CC"] + 0.0004 * rng.standard_normal(close["CC"].shape)  # margins of a few 1e-4
    sentences, (largest, _) = _tested_share_sentences(close)
    assert largest is None and sentences[0].startswith("No term is clearly the largest of the four energy shares")
    few = {t: v[:2, :1] for t, v in clear.items()}  # 2 heads
    sentences, (largest, coupled) = _tested_share_sentences(few)
    assert largest is coupled is None and "too few heads (2) to test it" in sentences[0]


@pytest.mark.parametrize("heads, drawn", [(2, False), (8, True)])
def test_the_cosine_figures_caption_promises_a_band_only_where_one_is_drawn(tmp_path, heads, drawn):
    """Fig. 3's caption promised a "blue band: 95% bootstrap CI over heads" with 3 heads, where no band is drawn
    (an interval needs MIN_UNITS heads)."""
    from qkhooks.readings import MIN_UNITS
    from qkhooks.report import spectrum_section

    loaded = qkhooks.load_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=4 * heads,
                                                  depth=2, num_heads=heads, img_size=32, patch_size=8).eval())
    caption = spectrum_section(loaded, tmp_path).figures[0][1]
    assert (heads >= MIN_UNITS) == drawn
    assert ("blue band: 95% bootstrap CI over heads;" in caption) == drawn
    assert ("no band: fewer than 6 heads a layer" in caption) != drawn


def test_a_share_with_no_value_is_named_not_counted_as_too_few_heads():
    """A term with no value at any head made the sentence say "too few heads (0)" of 24 heads (mutation run r34)."""
    from qkhooks.report import _tested_share_sentences

    rng = np.random.default_rng(3)
    shares = {t: v + 0.02 * rng.standard_normal((12, 2)) for t, v in {"CC": 0.6, "CP": 0.1, "PC": 0.1, "PP": 0.2}.items()}
    shares["PC"][:] = np.nan
    sentences, (largest, coupled) = _tested_share_sentences(shares)
    assert largest is coupled is None
    assert sentences[0].endswith("but PC has no value at any head, so it cannot be tested.")
    assert "too few heads" not in sentences[0]
    shares = {t: np.full((12, 2), np.nan) for t in shares}
    assert _tested_share_sentences(shares)[0][0] == "No head has a value for any term of the four energy shares: nothing to compare."


def test_a_convolution_of_stride_zero_is_refused_by_receptive_cells_not_divided_by():
    from qkhooks.data import receptive_cells

    with pytest.raises(QKHooksError, match=r"a convolution of kernel 3, stride 0, padding 1 makes no token of 8"):
        receptive_cells((8, 8), [((3, 3), (0, 0), (1, 1))])
