"""Kill tests for the mutants of round 33's later library code and round 34's fixes (``ebe8fa2..b0ec42d``: masks read
from the pixels each token shows, the review-33 fixes, timm's parallel blocks, round 34's review fixes) that their tests
let survive (module "round34" of tests/mutation.py, ``--only ROUND34``; tests/MUTATION.md's "round 34" section names
each); and the harness's round34 module kept consistent."""

from __future__ import annotations

from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round34
def test_the_round34_module_names_files_and_tests_that_exist_and_round_33s_later_commits():
    """The harness's module "round34" and its named set ROUND34: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the 24 library commits
    of ``ebe8fa2..b0ec42d``, and every library file they changed is mutated."""
    check_round_module("round34", "ROUND34", "ebe8fa2", "b0ec42d", library_commits=24)


# ------------------------------------------------------------------ helpers
import types  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import qkhooks  # noqa: E402
from qkhooks.errors import QKHooksError  # noqa: E402

_TERMS = ("CC", "CP", "PC", "PP")


def _bfd_result(head_energies, mode_labels, null=(), images=20):
    """A BFD result of one layer, by hand: each head's energy shares (CC, CP, PC, PP) and labels, and per-mode entries
    labelled ``mode_labels`` (the indices in ``null`` marked numerically null)."""
    heads = []
    for e in head_energies:
        energy = dict(zip(_TERMS, e))
        label = max(_TERMS, key=lambda t: energy[t])
        heads.append({"energy": energy, "label": label, "frobenius": {"energy": energy, "label": label}, "modes": []})
    heads[0]["modes"] = [{"null": i in null, "frobenius": {"label": "null" if i in null else lab}}
                         for i, lab in enumerate(mode_labels)]
    return {"definition": "frobenius", "images": images, "layers": [{"layer": 0, "heads": heads}]}


# ------------------------------------------------------------------ analysis/bfd_summary.py: paper_claims
def test_the_mode_labels_sentence_counts_a_term_no_mode_carries_as_zero_and_names_the_null_modes_left_out():
    """``paper_claims`` ``_185`` (a term no mode carries counted 1): two labelled modes (CC, PP) and one null mode give
    CP 0 and PC 0, the null one named as left out."""
    from qkhooks.analysis.bfd import paper_claims

    result = _bfd_result([(0.6, 0.1, 0.1, 0.2), (0.5, 0.2, 0.1, 0.2)], ["CC", "PP", "CC"], null=(2,))
    sentence = next(s for s in paper_claims(result)["sentences"] if s.startswith("Mode labels"))
    assert sentence == ("Mode labels over 2 modes: CC 1, CP 0, PC 0, PP 1 (1 numerically null modes left out: the "
                        "weights do not fix their vectors).")
    result = _bfd_result([(0.6, 0.1, 0.1, 0.2)], ["PC"])
    sentence = next(s for s in paper_claims(result)["sentences"] if s.startswith("Mode labels"))
    assert sentence == "Mode labels over 1 modes: CC 0, CP 0, PC 1, PP 0."


# ------------------------------------------------------------------ report.py: bfd_section
def test_the_bfd_sections_claims_and_head_labels_sentence_follow_its_tests(tmp_path, monkeypatch):
    """``bfd_section`` ``_157`` (the heads read under another key), ``_175`` / ``_186`` / ``_189`` (the head labels'
    sentence: its "(all alike)" kept or its "Head labels:" not marked point estimates), ``_205`` / ``_207`` (summary's
    cp_second under another name, or False where the test does not tell). BFD's run is stubbed with a result of 2 heads
    (too few to test): both claims None, the head-label sentence rewritten as the page states it."""
    from qkhooks import report
    from qkhooks.analysis import bfd

    result = _bfd_result([(0.6, 0.1, 0.1, 0.2), (0.5, 0.2, 0.1, 0.2)], ["CC", "PP"])
    monkeypatch.setattr(report, "find_sites", lambda model: [])
    monkeypatch.setattr(bfd, "bfd_layers", lambda *a, **k: ([0], [], None))
    monkeypatch.setattr(bfd, "run_bfd", lambda *a, **k: result)
    monkeypatch.setattr(bfd, "plot_bfd", lambda *a, **k: {})
    loaded = types.SimpleNamespace(model=None, image_config=types.SimpleNamespace(size=(32, 32)))
    section = report.bfd_section(loaded, tmp_path, tmp_path, report.PHOTOS, None,
                                 dict(device="cpu", batch_size=2, progress=False), keep_runs=True)
    claims = section.numbers
    assert claims["cc_dominant"] is None and claims["cp_second"] is None
    assert claims["sentences"][2] == ("Head labels (each head's largest share; point estimates, not tested): CC 2, "
                                      "CP 0, PC 0, PP 0.")
    assert claims["sentences"][:2] == [
        "CC has the largest mean of the four energy shares (CC − CP +0.400, no interval; CC − PC +0.450, no interval; "
        "CC − PP +0.350, no interval), but there are too few heads (2) to test it.",
        "PP has the largest mean of CP, PC and PP (PP − CP +0.050, no interval; PP − PC +0.100, no interval), but there "
        "are too few heads (2) to test it."]
    assert claims["sentences"][2] in section.intro


# ------------------------------------------------------------------ capture.py: Recording._ran_outside_error
@torch.no_grad()
def test_an_fx_copy_called_inside_the_recording_is_refused_in_the_whole_sentence():
    """``_ran_outside_error`` ``_8``, ``_13`` (the refusal's middle and last words): the whole sentence, naming the
    layer's q/k Linear."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10).eval()
    copy = torch.fx.symbolic_trace(model)
    with qkhooks.record(model, modes=2):
        model(torch.randn(1, 3, 32, 32))
        with pytest.raises(QKHooksError) as err:
            copy(torch.randn(1, 3, 32, 32))
    assert str(err.value) == (
        "blocks.0.attn.qkv (layer 0's q/k projection) ran outside any forward of the recorded model: a copy of the "
        "model that shares its modules (torch.fx.symbolic_trace, a wrapper calling the submodules itself) was called "
        "inside the record() context. Its attention is not recorded, and the recording still holds the batch before. "
        "Call the recorded model itself (a TorchScript copy runs no hooks at all and is not seen).")


# ------------------------------------------------------------------ data/masks.py: downscale_mask
def test_a_mask_read_through_token_cells_keeps_float32_and_is_each_cells_pixel_mean():
    """``downscale_mask`` ``_78`` (the cells' float64 sums handed back as float64): a bool or float32 mask read through
    a floored grid's cells is float32 (a float64 one stays float64), each token the mean of the pixels its cell shows
    (numpy reference)."""
    from qkhooks.data.masks import downscale_mask, token_cells

    rng = np.random.default_rng(0)
    mask = rng.random((30, 45)) > 0.5
    cells = token_cells((30, 45), (4, 6), (7, 7))  # 28 x 42 read: the last 2 rows and 3 columns never
    want = mask[:28, :42].reshape(4, 7, 6, 7).mean(axis=(1, 3))
    for given, dtype in ((torch.from_numpy(mask), torch.float32), (torch.from_numpy(mask).float(), torch.float32),
                         (torch.from_numpy(mask).double(), torch.float64)):
        got = downscale_mask(given, (4, 6), cells)
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-7)


# ------------------------------------------------------------------ models/hf.py: FrameTokenSite.run_file_refusal
def test_x_clips_message_attention_is_refused_a_run_file_in_the_whole_sentence():
    """``FrameTokenSite.run_file_refusal`` ``_2`` (its last words re-cased): the whole refusal."""
    import transformers

    config = transformers.XCLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        num_frames=3, mit_hidden_size=32, mit_intermediate_size=64, mit_num_hidden_layers=1, mit_num_attention_heads=4)
    site = [s for s in qkhooks.sites(transformers.XCLIPVisionModel(config)) if s.path.endswith("message_attn")][-1]
    assert site.run_file_refusal() == (
        "X-CLIP's message attention attends across a video's frames (one message token a frame), so its tokens are "
        "frames, not an image's CLS and patches; its maps and modes are exact frame by frame (rows: give query_tokens "
        "as frame indices). A run file holds one row per image, and this layer's batch axis holds videos; record the "
        "other layers (--layers) into the file, and this one live.")


# ------------------------------------------------------------------ store: reader's _incomplete_hint, repair's statics
def _small_run(tmp_path, name="run.h5", checksum=True):
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2).eval()
    path = tmp_path / name
    record_dataset(load_model(model, image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)),
                   "samples", path, limit=2, batch_size=2, progress=False, modes=2, checksum=checksum)
    return path


def test_info_on_a_run_a_live_writer_holds_says_so_in_the_whole_sentence(tmp_path):
    """``_incomplete_hint`` ``_5`` (the live writer's hint, its last words re-cased): the whole line."""
    import h5py

    from qkhooks.store import open_run
    from qkhooks.store.lock import WriterLock

    out = _small_run(tmp_path)
    with h5py.File(out, "r+", libver="latest") as f:
        f.attrs["complete"] = False
    lock = WriterLock(out)
    lock.hold_run()
    try:
        with open_run(out) as run:
            line = next(l for l in run.summary().splitlines() if l.startswith("images"))
    finally:
        lock.release()
    assert line == ("images   2 committed (being written: a live writer holds it, running or paused; its images so "
                    "far are readable, and a resume is for a writer that has ended)")


@pytest.mark.parametrize("checksum", [True, False])
def test_repair_keeps_each_static_arrays_values_and_its_checksum(tmp_path, checksum):
    """``_copy_statics`` ``_37`` (a static array created without its data): the repaired file's spectrum arrays equal
    the original's, value for value, and keep Fletcher-32 where the run had it."""
    import h5py

    from qkhooks.store import repair as repair_run

    path = _small_run(tmp_path, checksum=checksum)
    fixed = tmp_path / "fixed.h5"
    repair_run(path, fixed)
    with h5py.File(path, "r") as a, h5py.File(fixed, "r") as b:
        names = [n for n in a["spectrum/L0"]]
        assert "cos_all" in names
        for n in names:
            ds, got = a["spectrum/L0"][n], b["spectrum/L0"][n]
            assert got.shape == ds.shape and got.dtype == ds.dtype and got.fletcher32 == checksum
            np.testing.assert_array_equal(got[()], ds[()])


# ------------------------------------------------------------------ report.py: _tested_share_sentences
def test_a_share_with_no_value_at_any_head_is_never_named_the_largest():
    """``_tested_share_sentences`` ``_14`` (a term without any finite share ranked +inf, not -inf): with PC's shares
    all missing, CC is the largest mean of the four and PP of CP, PC and PP (the means of the others, numpy), and the
    test does not tell (no interval for the difference from PC)."""
    from qkhooks.report import _tested_share_sentences

    rng = np.random.default_rng(0)
    shares = {t: v + 0.02 * rng.standard_normal((12, 2)) for t, v in
              {"CC": 0.6, "CP": 0.1, "PC": 0.1, "PP": 0.25}.items()}
    shares["PC"][:] = np.nan
    sentences, (largest, coupled) = _tested_share_sentences(shares)
    cc_cp = float(np.mean(shares["CC"] - shares["CP"]))
    assert sentences[0].startswith(f"CC has the largest mean of the four energy shares (CC − CP {cc_cp:+.3f}, ")
    assert sentences[1].startswith("PP has the largest mean of CP, PC and PP (PP − CP ")
    assert largest is None and coupled is None


# ------------------------------------------------------------------ data/masks.py: receptive_cells
def test_a_convolution_of_no_kernel_is_refused_as_making_no_token():
    """``receptive_cells`` ``_21`` (``count <= 0 or k <= 0 and s <= 0``: a kernel of 0 with a positive stride let
    through to the padding-only refusal): the first refusal, word for word."""
    from qkhooks.data.masks import receptive_cells

    with pytest.raises(QKHooksError) as err:
        receptive_cells((8, 8), [((0, 0), (1, 1), (0, 0))])
    assert str(err.value) == ("a convolution of kernel 0, stride 1, padding 0 makes no token of 8; the input is too "
                              "small for the model.")
    cells = receptive_cells((8, 8), [((4, 4), (2, 2), (1, 1))])  # 4 tokens a side, each clipped to the image
    assert cells.rows == cells.cols == ((0, 3), (1, 5), (3, 7), (5, 8))


# ------------------------------------------------------------------ analysis/modes.py: analyze_modes' summary
@pytest.mark.parametrize("reducers", ["default", "none"])
def test_the_modes_summary_names_the_prefix_tokens_and_its_anisotropy_note(tmp_path, reducers):
    """``analyze_modes`` ``_711`` (``num_prefix_tokens`` under another key), ``_761`` / ``_765`` / ``_768`` (the
    anisotropy note under another key, or not built), ``_776`` (the note without a baseline re-cased): a ViT with one
    CLS token recorded with the default reducers (its baseline over both images: no note of fewer), and without any."""
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2).eval()
    path = tmp_path / "run.h5"
    kw = {} if reducers == "default" else dict(reducers=[])
    record_dataset(load_model(model, image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)),
                   "samples", path, limit=2, batch_size=2, progress=False, modes=2, **kw)
    summary = analyze_modes(path, tmp_path / "out", figure_modes=0, overview=False, images=False)
    assert summary["num_prefix_tokens"] == 1 and summary["images"] == 2 and summary["complete"] is True
    if reducers == "none":
        assert summary["anisotropy_note"].startswith("the run has no anisotropy reducer state (")
    else:
        assert summary["anisotropy_note"].startswith("cos_weighted is the sigma-weighted sum over all ")
        assert "the baseline covers" not in summary["anisotropy_note"]


# ------------------------------------------------------------------ data/masks.py: TokenCells, token_cells, majority_labels
def test_token_cells_outside_the_input_are_refused_naming_the_first_and_last():
    """``TokenCells.weights`` ``_6`` / ``_10`` (a last cell past the input let through where the first is inside, or
    the second-last checked), ``_18`` (the refusal naming two first cells): the refusal word for word; cells inside
    give each cell's 0/1 pixel rows (numpy reference)."""
    from qkhooks.data.masks import TokenCells

    cells = TokenCells(((0, 2), (2, 3), (3, 5)), ((0, 4),))
    with pytest.raises(QKHooksError) as err:
        cells.weights((4, 4))
    assert str(err.value) == ("token cells ((0, 2),)...((3, 5),) do not lie inside 4 pixels; make them for this input "
                              "size (token_cells).")
    rows, cols = TokenCells(((0, 2), (1, 4)), ((0, 3),)).weights((4, 3))
    np.testing.assert_array_equal(rows.numpy(), np.array([[1, 1, 0, 0], [0, 1, 1, 1]], float))
    np.testing.assert_array_equal(cols.numpy(), np.ones((1, 3)))
    assert rows.dtype == cols.dtype == torch.float64


def test_a_grid_of_one_pixel_a_token_is_blocks_and_one_finer_than_the_input_is_refused():
    """``token_cells`` ``_22`` (a grid as fine as the input refused): 4 tokens over 4 pixels are 1-pixel cells;
    5 over 4 is refused."""
    from qkhooks.data.masks import token_cells

    cells = token_cells((4, 6), (4, 3))
    assert cells.rows == ((0, 1), (1, 2), (2, 3), (3, 4)) and cells.cols == ((0, 2), (2, 4), (4, 6))
    with pytest.raises(QKHooksError):
        token_cells((4, 6), (5, 3))


def test_majority_labels_refuses_a_grid_of_no_column_in_its_sentence():
    """``majority_labels`` ``_65`` (a grid of 0 columns let through to a division by zero): the refusal word for
    word."""
    from qkhooks.data.masks import majority_labels

    labels = torch.tensor([[0, 1, 1, 2]] * 4)
    with pytest.raises(QKHooksError) as err:
        majority_labels(labels, (2, 0))
    assert str(err.value) == "grid (2, 0) does not fit the labels (4, 4); pass the patch grid, e.g. (14, 14)."
    assert majority_labels(labels, (2, 2)).tolist() == [[0, 1], [0, 1]]  # ties: the lowest id


@pytest.mark.parametrize("shape", [(5, 4), (4, 5)])
def test_majority_labels_of_a_grid_that_does_not_divide_the_labels_and_no_cells_is_refused(shape):
    """``majority_labels`` ``_72`` (``h % gh != 0``), ``_76`` (``w % gw == 1``): a 2 x 2 grid over 5 x 4 or 4 x 5
    labels with no cells took the block path (blocks of a grid that does not tile them); it is refused naming the
    grid, and the same labels through their floored cells give each cell's majority."""
    from qkhooks.data.masks import majority_labels, token_cells

    labels = torch.zeros(shape, dtype=torch.int64)
    labels[:2, :2] = 3
    labels[2:4, 2:4] = 1
    with pytest.raises(QKHooksError, match=r"the 2x2 token grid does not tile the %dx%d input" % shape):
        majority_labels(labels, (2, 2))
    got = majority_labels(labels, (2, 2), token_cells(shape, (2, 2), (2, 2)))  # 4 x 4 read, the odd edge left out
    assert got.tolist() == [[3, 0], [0, 1]]


# ------------------------------------------------------------------ stream.py: mask_cells
def test_a_layer_whose_convolutions_make_another_grid_is_refused_in_the_whole_sentence():
    """``mask_cells`` ``_65`` (the refusal's sentence dropped): a layer on a 3 x 3 grid whose patch convolution (8 px
    every 8 px over 32 px) makes 4 x 4 cells is refused word for word; on its own 4 x 4 grid the cells are the 8 px
    blocks."""
    from qkhooks.stream import mask_cells

    site = types.SimpleNamespace(layer=0, path="blocks.0.attn", patch_size=None, family="test", pixel_route=(),
                                 pixel_convs=lambda: [((8, 8), (8, 8), (0, 0))])
    with pytest.raises(QKHooksError) as err:
        mask_cells([site], {0: types.SimpleNamespace(grid=(3, 3))}, (32, 32), "all")
    assert str(err.value) == ("the pixels of the 3x3 grid's tokens were read as a 4x4 grid from the model's "
                              "convolutions, so masks cannot be read onto them; record this model on images without "
                              "masks.")
    cells = mask_cells([site], {0: types.SimpleNamespace(grid=(4, 4))}, (32, 32), "first")
    assert cells[(4, 4)].rows == cells[(4, 4)].cols == ((0, 8), (8, 16), (16, 24), (24, 32))


# ------------------------------------------------------------------ readings.py: compare_reading
def test_a_comparison_where_no_layer_has_a_value_is_too_few():
    """``compare_reading`` ``_31`` (the verdict of "no layer has a value" renamed): the verdict is ``too_few`` and each
    layer's estimate is kept, of no unit."""
    from qkhooks.readings import compare_reading

    r = compare_reading(np.full((8, 2), np.nan), 0.0, [0, 1], "a", "b", "heads")
    assert r.verdict == "too_few"
    assert r.text == "a vs b: no layer has a value (0 heads), so nothing can be compared."
    assert sorted(r.estimates) == ["L0", "L1"] and all(e.units == 0 for e in r.estimates.values())


def test_no_clear_difference_speaks_of_the_tested_layers_only_where_some_are_not():
    """``compare_reading`` ``_130`` (the flat sentence's "tested " re-cased): with L0 without a value it says "at any
    tested layer" and names L0 untested; with every layer valued, "at any layer" and 3 layers adjusted for."""
    from qkhooks.readings import compare_reading

    rng = np.random.default_rng(3)
    x = 0.1 * rng.standard_normal((8, 3))
    x[:, 0] = np.nan
    r = compare_reading(x, 0.0, [0, 1, 2], "cos", "zero", "heads")
    assert r.verdict == "flat"
    assert r.text.startswith("cos and zero show no clear difference at any tested layer (largest in magnitude at L1: ")
    assert r.text.endswith("; the intervals hold 0; 8 heads; intervals adjusted for 2 layers; not tested at L0: no "
                           "value or fewer than 6 heads there).")
    x[:, 0] = 0.1 * rng.standard_normal(8)
    r = compare_reading(x, 0.0, [0, 1, 2], "cos", "zero", "heads")
    assert r.verdict == "flat" and r.text.startswith("cos and zero show no clear difference at any layer (")
    assert r.text.endswith("; the intervals hold 0; 8 heads; intervals adjusted for 3 layers).")


# ------------------------------------------------------------------ capture.py: _compute_dtype
@pytest.mark.parametrize("given, shown", [(torch.int32, "torch.int32"), ("float33", "'float33'")])
def test_a_compute_dtype_other_than_a_float_is_refused_in_the_whole_sentence(given, shown):
    """``_compute_dtype`` ``_20`` (the refusal's last words re-cased): the whole refusal, naming what was given; the
    four float dtypes and their names are taken as torch's."""
    from qkhooks.capture import _compute_dtype

    with pytest.raises(QKHooksError) as err:
        _compute_dtype(given)
    assert str(err.value) == (
        "compute_dtype must be one of torch's float dtypes (torch.float32, torch.float64, torch.bfloat16, "
        f"torch.float16) or its name, got {shown}: the modes are projections of the tokens, and another dtype would "
        "truncate or reinterpret them. Leave it out to project in the tokens' own dtype.")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        assert _compute_dtype(dtype) is _compute_dtype(name) is _compute_dtype(f"torch.{name}") is dtype
    assert _compute_dtype(None) is None
