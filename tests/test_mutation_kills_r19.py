"""Round 19: tests that kill the surviving mutants of the functions round 18 changed or added (tests/MUTATION.md,
"Round 19"), each against an independent reference (numpy, the file system, the model's own arguments)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from qkhooks.data_files import absolute_spec


def test_absolute_spec_makes_every_kind_of_local_path_absolute_and_leaves_names_and_remote_specs_alone(
        tmp_path, monkeypatch):
    """data_files._absolute_part, absolute_spec (_1, _9, _13-_32, _38, _42 of the sample: the named, prefixed, hfds:
    and wds: branches) against os.path.join(cwd, ...), each spec form written out by hand."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder in ("imgs", "more", "shards", "samples", "home/photos", "a+b"):
        (tmp_path / folder).mkdir(parents=True)
    here = os.getcwd()

    def at(*parts: str) -> str:
        return os.path.join(here, *parts)

    expected = {
        "imgs": at("imgs"),
        "missing": "missing",  # not here: kept as typed
        "~/photos": at("home", "photos"),
        "samples": "samples", "voc": "voc", "arc2017": "arc2017", "o3:name": "o3:name",  # named wins over a folder
        "ade20k:imgs": "ade20k:" + at("imgs"), "o3dir:more": "o3dir:" + at("more"),
        "ade20k:missing": "ade20k:missing", "ade20k:": "ade20k:", "o3dir:/data/x": "o3dir:/data/x",
        "o3dir:" + at("imgs", "..", "more"): "o3dir:" + at("imgs", "..", "more"),  # absolute: kept as typed
        "ade20k:http://host/x": "ade20k:http://host/x",
        "hfds:imgs": "hfds:" + at("imgs"), "hfds:imgs:validation": "hfds:" + at("imgs") + ":validation",
        "hfds:user/name:train": "hfds:user/name:train", "hfds:name": "hfds:name",
        "wds:shards/{000..001}.tar": "wds:" + at("shards", "{000..001}.tar"), "wds:x.tar": "wds:" + at("x.tar"),
        "wds:nowhere/x.tar": "wds:nowhere/x.tar", "wds:pipe:cat x.tar": "wds:pipe:cat x.tar",
        "wds:https://host/{0..9}.tar": "wds:https://host/{0..9}.tar",
        "imgs+ade20k:more+samples": at("imgs") + "+ade20k:" + at("more") + "+samples",
        "imgs++missing": at("imgs") + "++missing",
        "a+b": at("a+b"),  # a folder whose name has a "+" is that folder, not a join
        "": "",
    }
    got = {spec: absolute_spec(spec) for spec in expected}
    assert got == expected
    assert absolute_spec(Path("imgs")) == at("imgs") and absolute_spec(Path("missing")) == Path("missing")
    mine = object()
    assert absolute_spec(mine) is mine and absolute_spec(None) is None


def test_the_anisotropy_baseline_of_float32_embeddings_is_computed_in_float64_and_is_the_same_on_every_call():
    """pair_pivots (round 23, replacing anisotropy_interval: float32 vectors must not be multiplied in float32; the
    seeded resamples) against a numpy reference: the mean over pairs of different images by mask."""
    from qkhooks.readings import pair_pivots

    n = 40
    rng = np.random.default_rng(3)
    v = rng.normal(size=(n, 16)) + 0.5  # a shared direction: mean cosine clearly above 0
    v32 = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)  # what CentreEmbeddings keeps
    z = v32.astype(np.float64)
    G = z @ z.T
    reference = G[~np.eye(n, dtype=bool)].mean()

    got = pair_pivots(v32[:, None])
    assert got.value[0] == pytest.approx(reference, rel=1e-13)
    again = pair_pivots(v32[:, None])
    assert all(np.array_equal(a, b) for a, b in zip(got, again))  # the same pivots on every call


def test_anisotropy_table_weighs_every_mode_and_a_truncated_layer_without_them_is_nan_with_its_whole_note():
    """anisotropy_table (_52, _56, _57: the note's text; _74: the per-mode rows' key) against numpy: the layer's
    sigma-weighted cosine over all modes, the kept modes' cosines minus the baseline, and NaN where only K modes
    are known."""
    from qkhooks.analysis.anisotropy import anisotropy_table

    rng = np.random.default_rng(5)
    S_all = np.sort(rng.uniform(0.1, 2.0, size=(2, 6)), axis=1)[:, ::-1].astype(np.float32)
    cos_all = rng.uniform(-1, 1, size=(2, 6)).astype(np.float32)
    S, cos = S_all[:, :3], cos_all[:, :3]
    spectra = {0: {"S": S, "cos": cos, "S_all": S_all, "cos_all": cos_all},
               1: {"S": S, "cos": cos, "truncated": True},
               2: {"S": S_all, "cos": cos_all}}  # untruncated: S, cos are every mode
    table = anisotropy_table(spectra, {0: 0.25, 1: 0.25, 2: -0.5})
    s, c = S_all.astype(np.float64), cos_all.astype(np.float64)
    every = np.mean([(s[h] * c[h]).sum() / s[h].sum() for h in range(2)])
    rows = {r["layer"]: r for r in table["rows"]}
    assert table["layers"] == [0, 1, 2]
    assert rows[0]["cos_weighted"] == pytest.approx(every, rel=1e-12)
    assert rows[0]["relative_cos_weighted"] == pytest.approx(every - 0.25, rel=1e-12)
    assert rows[2]["cos_weighted"] == pytest.approx(every, rel=1e-12) and "cos_weighted_note" not in rows[2]
    assert np.isnan(rows[1]["cos_weighted"]) and np.isnan(rows[1]["relative_cos_weighted"])
    assert rows[1]["cos_weighted_note"] == (
        "the run keeps 3 modes per head and not every mode's sigma and cosine (recorded before runs stored "
        "S_all/cos_all), so the sigma-weighted cosine over all modes is unknown; qkhooks spectrum MODEL gives it "
        "from the weights")
    for layer, base in ((0, 0.25), (1, 0.25)):
        assert rows[layer]["relative_cos"] == (cos.astype(np.float64) - base).tolist()
        assert rows[layer]["cos"] == cos.tolist() and rows[layer]["S"] == S.tolist()


def files_dataset(paths: dict[str, str | None]):
    """An ImageDataset of the given ids and files (None: an item not read from a file), which no test here loads:
    what changed_files and the file columns read of a dataset read from files (its ids and each item's file)."""
    from qkhooks.data import ImageConfig
    from qkhooks.data.items import ImageDataset, ItemRecord

    def unread():
        raise AssertionError("not loaded by these tests")

    records = [ItemRecord(id=i, load=unread, path=p) for i, p in paths.items()]
    return ImageDataset("files", records, ImageConfig(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3), has_masks=False)


def _files_dataset(folder: Path, names: list[str]):
    return files_dataset({n: str(folder / n) for n in names})


def test_changed_files_names_the_first_file_whose_size_differs_or_that_cannot_be_read_in_the_whole_message(
        tmp_path, monkeypatch):
    """changed_files (_58, _59: an unreadable file's size; _63, _65: the text; _36, _38: the older run's text; _17:
    a dataset without ids) against sizes written by hand."""
    from qkhooks.data_files import SIZES_ATTR, changed_files

    (tmp_path / "imgs").mkdir()
    for name, size in (("a.png", 10), ("b.png", 20), ("c.png", 30)):
        (tmp_path / "imgs" / name).write_bytes(b"x" * size)
    spec = str(tmp_path / "imgs")
    data = _files_dataset(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    attrs = {"data": spec, SIZES_ATTR: json.dumps({"a.png": 10, "b.png": 21, "c.png": 30})}
    assert changed_files({**attrs, SIZES_ATTR: json.dumps({"a.png": 10, "b.png": 20})}, data, ["a.png", "b.png"]) == ""
    assert changed_files(attrs, data, ["a.png", "b.png", "c.png"]) == (
        f"1 of the 3 images to draw in {spec!r} are not the files this run recorded (first: 'b.png', 21 bytes when "
        "recorded, 20 now); drawing no photos rather than others. Put the recorded files back, or draw without "
        "photos (--no-images).")
    (tmp_path / "imgs" / "a.png").unlink()  # listed by the dataset, gone from the disk: its size cannot be read
    assert changed_files(attrs, data, ["a.png", "c.png"]) == (
        f"1 of the 2 images to draw in {spec!r} are not the files this run recorded (first: 'a.png', 10 bytes when "
        "recorded, unreadable now); drawing no photos rather than others. Put the recorded files back, or draw "
        "without photos (--no-images).")
    assert changed_files(attrs, [object()], ["a.png"]) == ""  # a container without ids: nothing to check
    old = {"data": "imgs"}  # a run from before sizes, naming a folder relative to where it was recorded
    monkeypatch.chdir(tmp_path)
    assert changed_files(old, _files_dataset(tmp_path / "imgs", ["b.png"]), ["a.png", "b.png"]) == (
        "1 of the 2 images to draw are not in 'imgs' (first: 'a.png'), a path this run names relative to the "
        "folder it was recorded in, so the folder found from here is not the one recorded; drawing no photos "
        "rather than others. Run from that folder, or draw without photos (--no-images).")


def test_null_modes_takes_torch_tensors_with_gradients_lists_and_integers_by_the_rank_rule():
    """null_modes (_3, _5, _10: a tensor with autograd through np.asarray; _11: a list lost; _15, _22: an integer
    array's eps; _17, _18: float32's eps; _31: dim divided; _32: one maximum for all heads) against numpy's matrix_rank rule written out: sigma <= max sigma x dim x eps of the type held."""
    import torch

    from qkhooks.spectrum import null_modes

    S = np.array([[3.0, 1e-3, 1e-7, 0.0], [2.0, 2.0, 1e-8, 1e-12], [1e-6, 1e-13, 1e-12, 0.0]])  # per head: own max

    def tied(eps: float) -> np.ndarray:  # review r45: a sigma within TIE_ULPS eps (x the head's max) of another's
        gaps = np.where(np.eye(4, dtype=bool), np.inf, np.abs(S[:, :, None] - S[:, None, :]))
        return (gaps <= S.max(1)[:, None, None] * TIE_ULPS * eps).any(-1)

    from qkhooks.spectrum import TIE_ULPS

    want32 = (S <= S.max(1, keepdims=True) * 4 * np.finfo(np.float32).eps) | tied(np.finfo(np.float32).eps)
    want64 = (S <= S.max(1, keepdims=True) * 4 * np.finfo(np.float64).eps) | tied(np.finfo(np.float64).eps)
    assert not np.array_equal(want32, want64)  # the two epsilons give different answers here
    held = torch.tensor(S, dtype=torch.float32, requires_grad=True)
    assert np.array_equal(null_modes(held, 4), want32)
    assert np.array_equal(null_modes(S.tolist(), 4), want64)
    assert np.array_equal(null_modes(np.array([[4, 0, 1]]), 4), [[False, True, False]])  # integers: float64's eps


def test_a_truncated_spectrum_missing_either_sigma_or_cosine_of_its_other_modes_refuses_in_the_whole_message():
    """LayerSpectrum.all_modes (_2: `or` -> `and`, S_all known but cos_all not; _7, _14, _17: the text)."""
    from qkhooks.errors import QKHooksError
    from qkhooks.spectrum import LayerSpectrum

    rng = np.random.default_rng(0)
    U, V = rng.normal(size=(2, 2, 5, 2))
    S_all = np.array([[3.0, 2.0, 1.0, 0.5, 0.1], [2.0, 1.0, 0.5, 0.2, 0.1]])
    message = (
        "layer 4's spectrum keeps only the top 2 modes of each head and does not know the others' sigma and cosine, "
        "so it cannot give the sigma-weighted cosine (METHODS A.2: a sum over all modes; over the kept ones only it "
        "would be another number). Use qkhooks.spectrum(model) (every mode, from the weights), a recording's "
        "spectrum (it carries every mode's sigma and cosine), or a run file's spectrum_arrays(layer)['S_all'], "
        "['cos_all'] with qkhooks.spectrum.head_weighted_cosines.")
    for known in ({"S_all": S_all}, {"cos_all": rng.uniform(-1, 1, (2, 5))}, {}):
        spec = LayerSpectrum(4, U, S_all[:, :2], V, truncated=True, **known)
        with pytest.raises(QKHooksError) as refused:
            spec.all_modes()
        assert str(refused.value) == message


def test_a_resume_with_another_configuration_is_refused_naming_each_setting_that_differs(tmp_path):
    """RunWriter._check_identity (_6, _7, _9: the settings that differ left out of the refusal) against the two
    configurations written here."""
    from qkhooks.errors import QKHooksError
    from qkhooks.store.writer import RunWriter

    out = tmp_path / "run.h5"
    config = {"modes": 2, "layers": "0", "outputs": "modes"}
    with RunWriter(out, attrs={"model": "tiny", "config": config}, dtype="float32") as w:
        w.write_batch(["a.png"], {"x": np.zeros((1, 3), np.float32)})
    with pytest.raises(QKHooksError) as refused:
        RunWriter(out, mode="resume", attrs={"model": "tiny", "config": {**config, "modes": 3, "layers": "1"}})
    assert "its config differs from this run's (layers: file '0', now '1'; modes: file 2, now 3).\n" in str(
        refused.value)


def test_the_weights_fingerprint_follows_an_in_place_edit_and_equals_a_fresh_copys():
    """weights_fingerprint's cache (_4: no key, _14: `==` -> `!=`): after a weight is edited in place the
    fingerprint is that of a fresh copy of the edited model (no cache), and differs from the one before."""
    import copy

    import torch

    from conftest import TINY_MODELS
    from qkhooks.stream import weights_fingerprint

    net = TINY_MODELS[0].model()
    before = weights_fingerprint(net)
    assert weights_fingerprint(net) == before == weights_fingerprint(copy.deepcopy(net))
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    after = weights_fingerprint(net)
    assert after != before and after == weights_fingerprint(copy.deepcopy(net))


def test_a_resume_with_other_weights_names_both_fingerprints_by_their_first_twelve_characters(tmp_path):
    """RunWriter._check_identity (_33, _35, _38: the fingerprints in the refusal) against the two written here."""
    from qkhooks.errors import QKHooksError
    from qkhooks.store.writer import RunWriter

    out = tmp_path / "run.h5"
    mine, theirs = "0123456789ab" + "c" * 52, "fedcba987654" + "3" * 52
    with RunWriter(out, attrs={"model": "tiny", "identity": json.dumps({"weights_sha256": mine})},
                   dtype="float32") as w:
        w.write_batch(["a.png"], {"x": np.zeros((1, 3), np.float32)})
    with pytest.raises(QKHooksError) as refused:
        RunWriter(out, mode="resume", attrs={"model": "tiny", "identity": json.dumps({"weights_sha256": theirs})})
    assert "differs between the run file and this run (file 0123456789ab..., now fedcba987654...); " in str(
        refused.value)


def test_file_sizes_of_every_file_or_the_ids_asked_and_records_without_a_path_left_out(tmp_path):
    """file_sizes (_4: every file when no ids are given) and _paths (_14: a record without a path) against
    os.stat."""
    from qkhooks.data_files import file_sizes

    for name, size in (("a.png", 3), ("b.png", 5)):
        (tmp_path / name).write_bytes(b"x" * size)
    data = files_dataset({"a.png": str(tmp_path / "a.png"), "b.png": str(tmp_path / "b.png"),
                          "drawn": None})  # generated, no file behind it
    assert file_sizes(data) == {"a.png": 3, "b.png": 5}
    assert file_sizes(data, ["b.png", "drawn", "gone.png"]) == {"b.png": 5}
    assert file_sizes([1, 2]) == {}


def test_weighted_cosines_of_float32_spectra_are_computed_in_float64_and_a_layer_without_weights_warns_nothing():
    """head_weighted_cosines (_3, _5: float32 sigma divided in float32) and mean_over_heads (_5: a float32 mean;
    _9: the mean of no head taken, with numpy's empty-slice warning) against float64 numpy sums."""
    import warnings

    from qkhooks.spectrum import head_weighted_cosines, mean_over_heads

    rng = np.random.default_rng(2)
    S = rng.uniform(0.01, 3.0, size=(6, 48)).astype(np.float32)  # as a run file stores them
    cos = rng.uniform(-1, 1, size=(6, 48)).astype(np.float32)
    s, c = S.astype(np.float64), cos.astype(np.float64)
    want = np.array([(s[h] * c[h]).sum() / s[h].sum() for h in range(6)])
    got = head_weighted_cosines(S, cos)
    assert got.dtype == np.float64 and np.allclose(got, want, rtol=1e-12, atol=1e-15)
    values = rng.uniform(-1, 1, size=4097).astype(np.float32)
    assert mean_over_heads(values) == pytest.approx(values.astype(np.float64).sum() / values.size, rel=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mean_over_heads([np.nan, np.nan]))


def test_the_unmodelled_input_refusal_names_each_argument_by_the_forwards_own_names_and_keeps_the_modelled_ones():
    """AttentionSite.refuse_unmodelled_inputs (_21, _24: an argument past the named ones; _37, _41: the causal
    flags; _46, _50, _51: the text; _31: rotary tables kept) on timm's Attention.forward(x, attn_mask, is_causal)."""
    import torch

    import qkhooks
    from conftest import TINY_MODELS
    from qkhooks.errors import QKHooksError
    from qkhooks.models.base import recast

    site = qkhooks.sites(TINY_MODELS[0].model())[0]
    x = torch.zeros(1, 3, site.dim)

    def refusal(args: tuple, kwargs: dict) -> str:
        with pytest.raises(QKHooksError) as refused:
            site.refuse_unmodelled_inputs(args, kwargs)
        return str(refused.value)

    def message(label: str, what: str) -> str:
        return (f"unsupported attention in 'blocks.0.attn' (Attention): the model passes {label} ({what}) to it, an "
                "extra term (mask, position bias, rotary tables) that qkhooks does not model for this family, so "
                "rebuilt maps and modes would not be the model's. Record a model or input without it, or teach the "
                "adapter that term (see README, 'Supported models').")

    assert refusal((x, torch.zeros(1, 1, 3, 3)), {}) == message("'attn_mask'", "a (1, 1, 3, 3) tensor")
    assert refusal((x, None, False, [torch.zeros(2)]), {}) == message("argument 3", "a list of 1 holding tensors")
    assert refusal((x, None, True), {}) == message("'is_causal'", "True")
    assert refusal((x,), {"causal": True}) == message("'causal'", "True")
    site.refuse_unmodelled_inputs((x, None, False), {"output_attentions": True, "scale": 0.5})  # no term: recorded
    rope = recast(site, type(site), rope_input="rope")
    tables = (torch.ones(3, 2), torch.zeros(3, 2))
    rope.refuse_unmodelled_inputs((x,), {"rope": tables})  # the adapter models it: kept for the maps, not refused
    assert rope._call_rope is tables


def test_a_grid_source_called_with_its_input_by_keyword_notes_the_convolutions_own_grid_on_every_layer():
    """grid_source_hooks (_15: the call's keywords not handed to the reader): one hook for the layers sharing HF
    ViT's patch projection; called as conv(input=image), every layer notes the grid of the conv's own output."""
    import torch

    import qkhooks
    from conftest import TINY_MODELS
    from qkhooks.models.base import grid_source_hooks

    sites = qkhooks.sites(next(t for t in TINY_MODELS if t.name == "hf-vit-4x6-key-first").model())
    hooks = grid_source_hooks(sites)
    assert len(hooks) == 1 and len(sites) == 2
    conv, note_grid = hooks[0]
    handle = conv.register_forward_pre_hook(note_grid, with_kwargs=True)
    try:
        image = torch.zeros(1, 3, 37, 61)
        with torch.no_grad():
            grid = tuple(conv(input=image).shape[-2:])
    finally:
        handle.remove()
    assert [site._grid_of_source for site in sites] == [grid, grid]


def test_the_qk_path_residual_of_each_mode_is_its_distance_from_the_row_space_of_the_weights():
    """_solve_side (_48: the residual's norm over the modes instead of the coordinates): for u_n, v_n outside the row
    spaces of rank-deficient W_q, W_k (d_k < d), qk_path_check's residual (2, H, K) is ||(I - P) u_n|| with P
    numpy's projector onto the row space, and the layer does not fit."""
    import torch

    from qkhooks.models.base import QKWeights
    from qkhooks.projector import qk_path_check
    from qkhooks.spectrum import LayerSpectrum

    rng = np.random.default_rng(7)
    heads, dk, d, modes = 2, 4, 6, 3
    w_q, w_k = rng.normal(size=(2, heads, dk, d))
    U, V = rng.normal(size=(2, heads, d, modes))
    U, V = U / np.linalg.norm(U, axis=1, keepdims=True), V / np.linalg.norm(V, axis=1, keepdims=True)
    spec = LayerSpectrum(0, torch.from_numpy(U), torch.from_numpy(np.full((heads, modes), 1.0)), torch.from_numpy(V))
    check = qk_path_check(spec, QKWeights(torch.from_numpy(w_q), torch.from_numpy(w_k), None, None))

    def distance(w: np.ndarray, vectors: np.ndarray) -> np.ndarray:  # (H, K)
        rows = [np.linalg.pinv(w[h]) @ w[h] for h in range(heads)]  # (d, d) projector onto the row space
        return np.stack([np.linalg.norm(vectors[h] - rows[h] @ vectors[h], axis=0) for h in range(heads)])

    assert tuple(check.residual.shape) == (2, heads, modes)
    assert np.allclose(check.residual.numpy(), [distance(w_q, U), distance(w_k, V)], rtol=1e-9, atol=1e-12)
    assert not check.fits


def test_top_of_every_mode_is_the_whole_spectrum_not_a_truncated_one():
    """LayerSpectrum.top (_3: k equal to the modes kept taken as a truncation): top(K) of a K-mode spectrum is not
    truncated, and top(K - 1) is, with every mode's sigma still known."""
    from qkhooks.spectrum import LayerSpectrum

    rng = np.random.default_rng(1)
    U, V = rng.normal(size=(2, 2, 5, 4))
    spec = LayerSpectrum(0, U, np.array([[4.0, 3.0, 2.0, 1.0], [2.0, 1.5, 1.0, 0.5]]), V)
    assert spec.top(4).truncated is False and spec.top(4).S_all is None
    assert spec.top(3).truncated is True and np.array_equal(spec.top(3).S_all, spec.S)
