"""Attention preference (Pan et al. Fig. 2): token choice, values, reducer, run-file analysis, CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import timm
import torch

from qkhooks.analysis.preference import (
    PAIRS,
    PreferenceReducer,
    analyze_preference,
    group_preference,
    odd_one_out_meta,
    preference_from_reducer,
    preference_from_rows,
    preference_table,
)
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError
from conftest import Tiny, eager_attention


# ------------------------------------------------------------------------------------------ helpers
def numpy_reference(rows: np.ndarray, t_grid: np.ndarray, d_grid: np.ndarray, prefix: int) -> np.ndarray:
    """Direct loops over images, heads, queries and patches, written from the paper's description."""
    b_n, h_n = rows.shape[:2]
    out = np.zeros((b_n, h_n, 6))
    for b in range(b_n):
        t = t_grid[b].reshape(-1).astype(np.float64)
        d = d_grid[b].reshape(-1).astype(np.float64)
        bg = np.array([max(0.0, 1.0 - t[p] - d[p]) for p in range(len(t))])
        for h in range(h_n):
            for q, (own, other) in enumerate(((t, d), (d, t))):
                row = rows[b, h, q, prefix:].astype(np.float64)
                total = sum(row[p] for p in range(len(row)))
                a = [row[p] / total for p in range(len(row))]
                out[b, h, 3 * q + 0] = sum(a[p] * own[p] for p in range(len(a)))
                out[b, h, 3 * q + 1] = sum(a[p] * other[p] for p in range(len(a)))
                out[b, h, 3 * q + 2] = sum(a[p] * bg[p] for p in range(len(a)))
    return out


def random_case(b: int = 5, h: int = 3, grid=(4, 4), prefix: int = 2, seed: int = 0):
    """Softmax rows and disjoint fractional masks on the patch grid."""
    g = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    rows = torch.softmax(torch.randn(b, h, 2, n, generator=g, dtype=torch.float64) * 2, dim=-1)
    t = torch.rand(b, *grid, generator=g, dtype=torch.float64) * 0.6
    d = torch.rand(b, *grid, generator=g, dtype=torch.float64) * 0.4
    return rows, t, d


def make_batch(rows_by_layer: dict[int, torch.Tensor], t: torch.Tensor, d: torch.Tensor, offset: int = 0) -> BatchCapture:
    b = t.shape[0]
    layers = {l: LayerCapture(l, b, attention={"rows": r}) for l, r in rows_by_layer.items()}
    return BatchCapture([str(offset + i) for i in range(b)], {"target_grid": t, "distractor_grid": d}, layers, offset)


def assert_tables_close(a: dict, b: dict, atol: float = 1e-9) -> None:
    assert a["layers"] == b["layers"] and a["num_images"] == b["num_images"] and a["num_heads"] == b["num_heads"]
    for g in ("same_object", "different_object", "background"):
        np.testing.assert_allclose(a[g]["mean"], b[g]["mean"], atol=atol)
        np.testing.assert_allclose(a[g]["std"], b[g]["std"], atol=atol)
    for k in a["per_head"]:
        np.testing.assert_allclose(a["per_head"][k]["mean"], b["per_head"][k]["mean"], atol=atol)
        np.testing.assert_allclose(a["per_head"][k]["std"], b["per_head"][k]["std"], atol=atol)


# --------------------------------------------------------------------------------- token choice
def test_query_tokens_and_pool_masks_on_hand_made_masks():
    # 32x32 pixels, 4x4 grid of 8x8 patches. Target: a full patch at grid (1, 2) plus a sliver at (0, 0).
    # Distractors: a half patch at (3, 0) and a full patch at (2, 3); the first maximum in row-major order wins.
    target = torch.zeros(2, 32, 32)
    distractor = torch.zeros(2, 32, 32)
    target[0, 8:16, 16:24] = 1
    target[0, 0:2, 0:8] = 1
    distractor[0, 24:32, 0:4] = 1
    distractor[0, 16:24, 24:32] = 1
    # image 1: target covers (0,0) and (0,1) fully (tie -> first), distractor only half of (3,3).
    target[1, 0:8, 0:16] = 1
    distractor[1, 28:32, 24:32] = 1
    meta = odd_one_out_meta(target, distractor, (4, 4), num_prefix_tokens=2)  # DeiT: CLS + distillation token

    expected_patches = torch.tensor([[1 * 4 + 2, 2 * 4 + 3], [0, 3 * 4 + 3]])
    assert meta["query_tokens"].dtype == torch.long
    assert torch.equal(meta["query_tokens"], expected_patches + 2)
    t_grid = torch.zeros(2, 4, 4)
    t_grid[0, 1, 2], t_grid[0, 0, 0] = 1.0, 0.25
    t_grid[1, 0, 0] = t_grid[1, 0, 1] = 1.0
    d_grid = torch.zeros(2, 4, 4)
    d_grid[0, 3, 0], d_grid[0, 2, 3], d_grid[1, 3, 3] = 0.5, 1.0, 0.5
    assert torch.equal(meta["target_grid"], t_grid) and torch.equal(meta["distractor_grid"], d_grid)
    assert meta["pool_masks"].shape == (2, 3, 16)
    assert torch.equal(meta["pool_masks"][:, 0], t_grid.flatten(1))
    assert torch.equal(meta["pool_masks"][:, 1], d_grid.flatten(1))
    assert torch.equal(meta["pool_masks"][:, 2], (1 - t_grid - d_grid).flatten(1))
    # no prefix tokens (SigLIP): the patch index itself
    plain = odd_one_out_meta(target, distractor, (4, 4), num_prefix_tokens=0)
    assert torch.equal(plain["query_tokens"], expected_patches)


@pytest.mark.parametrize("how, pixels", [("identical", 16), ("overlapping", 4)])
def test_overlapping_or_identical_masks_are_refused_on_pixels_and_on_the_patch_grid(how, pixels):
    """METHODS A.7: background = 1 - T - D, so the three values of a query sum to 1 only for disjoint masks; an
    overlap is refused naming the image and the overlapping cells, on the pixels odd_one_out_meta gets and on the
    patch grid the values are computed from (the reducer's and a run file's input)."""
    target, distractor = torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)
    target[:, :4, :4] = 1
    distractor[0, 4:, 4:] = 1  # image 'a': disjoint
    if how == "identical":
        distractor[1] = target[1]
    else:
        distractor[1, 2:6, 2:6] = 1  # overlaps the target on [2:4, 2:4]
    with pytest.raises(QKHooksError, match=rf"overlap \(image 'b': {pixels} of 64 pixels.*must be disjoint"):
        odd_one_out_meta(target, distractor, (2, 2), 1, ids=["a", "b"])
    rows = torch.softmax(torch.randn(2, 3, 2, 5, generator=torch.Generator().manual_seed(0)), -1)
    t_grid, d_grid = (m.reshape(2, 2, 4, 2, 4).mean((2, 4)) for m in (target, distractor))
    with pytest.raises(QKHooksError, match=r"at position 1 of this batch: 1 of 4 patches of the 2 x 2 grid"):
        preference_from_rows(rows, t_grid, d_grid, 1)


def test_masks_that_touch_inside_a_patch_are_accepted_and_their_values_sum_to_one_as_in_numpy():
    target, distractor = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    target[:, :3, :4] = 1
    distractor[:, 3:6, :4] = 1  # touches the target inside patch (0, 0): 12 + 4 of its 16 pixels
    meta = odd_one_out_meta(target, distractor, (2, 2), 1, ids=["a", "b", "c"])
    assert meta["target_grid"][0, 0, 0] + meta["distractor_grid"][0, 0, 0] == 1.0
    rows = torch.softmax(torch.randn(3, 2, 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    values = preference_from_rows(rows, meta["target_grid"], meta["distractor_grid"], 1)
    ref = numpy_reference(rows.numpy(), meta["target_grid"].numpy(), meta["distractor_grid"].numpy(), 1)
    np.testing.assert_allclose(values.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(values[..., :3].sum(-1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(values[..., 3:].sum(-1).numpy(), 1.0, rtol=1e-12)


def test_dict_items_whose_masks_overlap_are_refused_by_id_and_touching_ones_recorded_as_numpy_says(tmp_path):
    """Dict items are checked on their own pixels (before preprocessing), named by id; touching masks, whose
    area-averaged edges are fractions, go through and the stored values equal numpy's on the stored grids."""
    from qkhooks.models.load import LoadedModel
    from qkhooks.data import ImageConfig
    from qkhooks.stream import record_dataset

    loaded = LoadedModel(model=TINY_O3.model(), spec="tiny-deit-48",
                         image_config=ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3))
    rng = np.random.default_rng(0)

    def items(overlap: bool) -> list[dict]:
        out = []
        for i in range(3):
            t, d = np.zeros((60, 60), bool), np.zeros((60, 60), bool)
            t[10:25, 10:30] = True
            d[25:45, 10:30] = True  # touches the target along row 25
            if overlap and i == 1:
                d[20:25, 10:30] = True  # 5 x 20 pixels inside the target
            out.append({"image": rng.integers(0, 256, (60, 60, 3), dtype=np.uint8), "id": f"o{i}", "target": t,
                        "distractor": d})
        return out

    with pytest.raises(QKHooksError, match=r"overlap \(item 1 \(id 'o1'\): 100 of 3600 pixels.*Nothing was written"):
        record_dataset(loaded, items(True), tmp_path / "bad.h5", modes=None, attention="rows", batch_size=3,
                       progress=False)
    result = record_dataset(loaded, items(False), tmp_path / "ok.h5", modes=None, attention="rows", batch_size=3,
                            progress=False, dtype="float32")
    from qkhooks.analysis.preference import preference_values
    from qkhooks.store import open_run

    values, prefix = preference_values(result.path)
    with open_run(result.path) as run:
        t_grid, d_grid = run.array("masks/target")[:], run.array("masks/distractor")[:]
        rows = {l: run.array(f"attention/L{l}/rows")[:] for l in values}
    assert (t_grid + d_grid).max() <= 1 + 1e-6 and ((t_grid > 0) & (d_grid > 0)).any()  # shared patches
    for l, v in values.items():
        np.testing.assert_allclose(v, numpy_reference(rows[l], t_grid, d_grid, prefix), rtol=1e-6)
        np.testing.assert_allclose(v[..., :3].sum(-1), 1.0, rtol=1e-5)


def test_empty_mask_and_bad_shapes_are_clear_errors():
    target = torch.zeros(3, 16, 16)
    distractor = torch.ones(3, 16, 16) * 0.5
    target[0, :4, :4] = 1
    target[2, :4, :4] = 1
    with pytest.raises(QKHooksError, match=r"target mask of image\(s\) at position\(s\) \[1\] of this batch is empty"):
        odd_one_out_meta(target, distractor, (4, 4), 1)
    with pytest.raises(QKHooksError, match="same shape"):
        odd_one_out_meta(target, distractor[:, :8], (4, 4), 1)


# --------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_values_equal_numpy_loops_and_sum_to_one(prefix):
    rows, t, d = random_case(prefix=prefix, seed=prefix)
    got = preference_from_rows(rows, t, d, prefix)
    ref = numpy_reference(rows.numpy(), t.numpy(), d.numpy(), prefix)
    assert got.shape == (5, 3, 6)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    # masks are disjoint fractions (t + d <= 1), so each query's three values sum to 1
    np.testing.assert_allclose(got[..., :3].sum(-1).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(got[..., 3:].sum(-1).numpy(), 1.0, atol=1e-12)


def test_values_on_a_constructed_pattern():
    # 2x2 grid, one prefix token that takes half of every row (dropped, then renormalised away).
    # Target on patch 0, distractor on patch 3 (half covered), background elsewhere.
    t = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    d = torch.tensor([[[0.0, 0.0], [0.0, 0.5]]])
    rows = torch.tensor([[[[0.5, 0.25, 0.25, 0.0, 0.0],  # target query: half on itself, half on patch 1
                           [0.5, 0.0, 0.0, 0.0, 0.5]]]])  # distractor query: all on patch 3
    got = preference_from_rows(rows, t, d, 1)[0, 0]
    # T->T .5, T->D 0, T->B .5 | D->D .5, D->T 0, D->B .5 (patch 3 is half distractor, half background)
    np.testing.assert_allclose(got.numpy(), [0.5, 0.0, 0.5, 0.5, 0.0, 0.5], atol=1e-7)
    groups = group_preference(got)
    assert float(groups["same_object"]) == pytest.approx(0.5)
    assert float(groups["different_object"]) == pytest.approx(0.0)
    assert float(groups["background"]) == pytest.approx(0.5)


def test_rows_and_grid_that_do_not_match_are_errors():
    rows, t, d = random_case(prefix=1)
    with pytest.raises(QKHooksError, match="prefix tokens"):
        preference_from_rows(rows, t, d, 2)
    with pytest.raises(QKHooksError, match="heads, 2, tokens"):
        preference_from_rows(rows[:, :, :1], t, d, 1)


# --------------------------------------------------------------------------------------- reducer
def test_reducer_equals_batch_table_and_merge_equals_one_pass():
    batches = []
    for seed in range(4):
        r0, t, d = random_case(b=3 + seed, prefix=1, seed=10 + seed)
        r1, _, _ = random_case(b=3 + seed, prefix=1, seed=20 + seed)
        batches.append(({0: r0, 5: r1}, t, d))
    one = PreferenceReducer()
    offset = 0
    for rows, t, d in batches:
        one.update(make_batch(rows, t, d, offset))
        offset += t.shape[0]
    values = {l: torch.cat([preference_from_rows(rows[l], t, d, 1) for rows, t, d in batches]) for l in (0, 5)}
    batch_table = preference_table(values, 1)
    stream_table = preference_from_reducer(one)
    assert stream_table["num_images"] == 18 and stream_table["layers"] == [0, 5]
    assert_tables_close(stream_table, batch_table)
    # head-averaged group mean = mean over images of the mean over heads, independent numpy
    v = values[5].numpy()
    gb = (v[..., 2] + v[..., 5]).mean(1) / 2
    assert stream_table["background"]["mean"][1] == pytest.approx(gb.mean(), abs=1e-12)
    assert stream_table["background"]["std"][1] == pytest.approx(gb.std(), abs=1e-12)

    first, second = PreferenceReducer(), PreferenceReducer()
    for i, (rows, t, d) in enumerate(batches):
        (first if i < 2 else second).update(make_batch(rows, t, d))
    first.merge(second)
    assert_tables_close(preference_from_reducer(first), stream_table)

    restored = PreferenceReducer()
    restored.load_state_dict({k: (np.array(v) if not isinstance(v, int) else v) for k, v in first.state_dict().items()})
    assert_tables_close(preference_from_reducer(restored), stream_table)
    assert restored.num_prefix_tokens == 1
    rows, t, d = batches[0]
    restored.update(make_batch(rows, t, d))  # a restored state keeps accumulating
    assert preference_from_reducer(restored)["num_images"] == 21


def test_reducer_errors_name_the_fix():
    rows, t, d = random_case()
    batch = make_batch({0: rows}, t, d)
    batch.meta = {}
    with pytest.raises(QKHooksError, match="odd_one_out_meta"):
        PreferenceReducer().update(batch)
    batch = make_batch({0: rows}, t, d)
    batch.captures[0].attention = {}
    with pytest.raises(QKHooksError, match="attention='rows'"):
        PreferenceReducer().update(batch)
    with pytest.raises(QKHooksError, match="seen no images"):
        preference_from_reducer(PreferenceReducer())


# --------------------------------------------------------------------------------- end to end
TINY_O3 = Tiny(
    "timm-deit-distilled-48",
    lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=48, patch_size=8,
                              embed_dim=32, depth=2, num_heads=4),
    48, 2, "timm",
)  # o3 displays need >= 48 px: a 6x6 grid of 8-px patches, CLS + distillation token


def write_run(path, ids, arrays, prefix=None, dtype="float32", complete=True):
    """A run file written with the store's own writer."""
    from qkhooks.store import RunWriter

    with RunWriter(path, dtype=dtype) as writer:
        if prefix is not None:  # statics belong to the layout: before the first batch
            writer.write_static("model/info", json.dumps({"num_prefix_tokens": prefix}))
        writer.write_batch(ids, {k: np.asarray(v) for k, v in arrays.items()})
        writer.close(complete=complete)


@pytest.fixture(scope="module")
def o3_runs(tmp_path_factory):
    """o3:6 recorded through `record_dataset` (float32 and the default float16), plus an independent reference:
    the model's own eager attention at tokens chosen from the stimulus masks with numpy."""
    from qkhooks.data import ImageConfig, collate, open_dataset
    from qkhooks.models.load import LoadedModel
    from qkhooks.stream import record_dataset

    model = TINY_O3.model()
    assert all(b.attn.fused_attn for b in model.blocks)  # the recording runs the fused path
    cfg = ImageConfig(size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    loaded = LoadedModel(model=model, spec="tiny-deit-48", image_config=cfg)
    folder = tmp_path_factory.mktemp("o3")
    runs = {
        dtype: record_dataset(loaded, "o3:6", folder / f"run_{dtype}.h5", modes=None, attention="rows", batch_size=3,
                              progress=False, **({"dtype": dtype} if dtype == "float32" else {}))
        for dtype in ("float32", "float16")  # float16: the default
    }

    ds = open_dataset("o3:6", cfg)
    batch = collate([ds[i] for i in range(len(ds))])
    n = len(batch["id"])
    t_grid = batch["target"].numpy().reshape(n, 6, 8, 6, 8).mean((2, 4))  # block means: the area fractions
    d_grid = batch["distractor"].numpy().reshape(n, 6, 8, 6, 8).mean((2, 4))
    tokens = np.stack([t_grid.reshape(n, -1).argmax(1), d_grid.reshape(n, -1).argmax(1)], axis=1) + 2
    eager = eager_attention(TINY_O3, model, batch["pixel_values"])
    rows = {l: np.stack([a[b][:, tokens[b]].double().numpy() for b in range(n)]) for l, a in enumerate(eager)}
    values = {l: numpy_reference(r, t_grid, d_grid, 2) for l, r in rows.items()}
    ref = {"ids": list(batch["id"]), "tokens": tokens, "rows": rows, "values": values}
    return runs, ref


def test_record_dataset_then_analysis_equals_eager_attention(o3_runs, tmp_path):
    from qkhooks.store import open_run

    runs, ref = o3_runs
    result = runs["float32"]
    assert result.images == 6
    with open_run(result.path) as run:  # what the stream stored is what the reference computed
        assert run.ids == ref["ids"] and run.complete
        np.testing.assert_array_equal(run.array("attention/query_tokens")[:], ref["tokens"])
        for l in (0, 1):
            np.testing.assert_allclose(run.array(f"attention/L{l}/rows")[:], ref["rows"][l], atol=1e-5)
        saved = PreferenceReducer()
        saved.load_state_dict(run.state("preference"))  # the default reducer's state, saved with the run

    table = analyze_preference(result.path, tmp_path / "out")
    assert table["num_images"] == 6 and table["layers"] == [0, 1] and table["num_heads"] == 4
    assert table["num_prefix_tokens"] == 2 and table["complete"] and table["model"] == "tiny-deit-48"
    for name, (i, j) in {"same_object": (0, 3), "different_object": (1, 4), "background": (2, 5)}.items():
        per_image = np.stack([(ref["values"][l][..., i] + ref["values"][l][..., j]).mean(1) / 2 for l in (0, 1)])
        np.testing.assert_allclose(table[name]["mean"], per_image.mean(1), atol=1e-5)
        np.testing.assert_allclose(table[name]["std"], per_image.std(1), atol=1e-5)
    for pi, pair in enumerate(PAIRS):
        np.testing.assert_allclose(table["per_head"][pair]["mean"],
                                   [ref["values"][l][..., pi].mean(0) for l in (0, 1)], atol=1e-5)
    # the streaming reducer (in memory and as saved in the file) gives the same table
    assert_tables_close(preference_from_reducer(result.reducer("preference")), table, atol=1e-5)
    assert_tables_close(preference_from_reducer(saved), table, atol=1e-5)

    # the files: JSON round-trips the table, the CSV has a head-mean row and one row per head per layer
    saved_json = json.loads((tmp_path / "out" / "preference.json").read_text())
    np.testing.assert_allclose(saved_json["background"]["mean"], table["background"]["mean"])
    lines = (tmp_path / "out" / "preference.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:3] == ["layer", "head", "images"] and header[3:9] == list(PAIRS)
    assert len(lines) == 1 + 2 * (1 + 4)
    mean_row = dict(zip(header, lines[1].split(",")))
    assert mean_row["head"] == "mean" and float(mean_row["same_object"]) == pytest.approx(table["same_object"]["mean"][0], rel=1e-5)
    assert float(mean_row["TB"]) == pytest.approx(ref["values"][0][..., 2].mean(), abs=1e-5)
    head_row = dict(zip(header, lines[2 + 4 + 1 + 3].split(",")))  # layer 1, head 3
    assert (head_row["layer"], head_row["head"]) == ("1", "3")
    assert float(head_row["DT"]) == pytest.approx(ref["values"][1][:, 3, 4].mean(), abs=1e-5)
    assert (tmp_path / "out" / "preference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_float16_run_through_the_cli(o3_runs, tmp_path, capsys):
    from qkhooks.cli import main

    runs, ref = o3_runs
    assert main(["analyze", "preference", str(runs["float16"].path), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "same_object" in out and "preference.png" in out and "incomplete" not in out
    table = json.loads((tmp_path / "cli" / "preference.json").read_text())
    for name, (i, j) in {"same_object": (0, 3), "different_object": (1, 4), "background": (2, 5)}.items():
        per_image = np.stack([(ref["values"][l][..., i] + ref["values"][l][..., j]).mean(1) / 2 for l in (0, 1)])
        np.testing.assert_allclose(table[name]["mean"], per_image.mean(1), atol=2e-3)


def test_run_without_masks_or_rows_is_a_clear_error(tmp_path, capsys):
    from qkhooks.cli import main

    rows, t, d = random_case(b=2, prefix=1)
    tokens = np.array([[1, 2], [1, 2]])
    path = tmp_path / "nomasks.h5"
    write_run(path, ["a", "b"], {"attention/L0/rows": rows.numpy(), "attention/query_tokens": tokens})
    with pytest.raises(QKHooksError, match=r"no masks/target, masks/distractor.*o3:"):
        analyze_preference(path, tmp_path / "o")
    assert main(["analyze", "preference", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "odd-one-out" in capsys.readouterr().err

    path = tmp_path / "norows.h5"
    write_run(path, ["a", "b"], {"attention/query_tokens": tokens, "masks/target": t.numpy(), "masks/distractor": d.numpy()})
    with pytest.raises(QKHooksError, match="--attention rows"):
        analyze_preference(path, tmp_path / "o")
    with pytest.raises(QKHooksError, match="no run file"):
        analyze_preference(tmp_path / "missing.h5", tmp_path / "o")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["masks/target"] = t.numpy()
    with pytest.raises(QKHooksError, match="not a qkhooks run"):
        analyze_preference(tmp_path / "plain.h5", tmp_path / "o")


def test_rows_not_at_the_mask_maximum_or_a_wrong_prefix_are_refused(tmp_path, capsys):
    from qkhooks.cli import main

    rows, t, d = random_case(b=3, prefix=1, seed=4)
    meta = odd_one_out_meta(t, d, (4, 4), 1)  # grids already on the patch grid: downscale is the identity
    tokens = meta["query_tokens"].numpy().copy()

    def arrays(tok):
        return {"attention/L0/rows": rows.numpy(), "attention/query_tokens": tok, "masks/target": t.numpy(),
                "masks/distractor": d.numpy()}

    write_run(tmp_path / "ok.h5", ["a", "b", "c"], arrays(tokens), prefix=1, complete=False)
    table = analyze_preference(tmp_path / "ok.h5", tmp_path / "o")
    np.testing.assert_allclose(table["per_head"]["TT"]["mean"][0],
                               numpy_reference(rows.numpy(), t.numpy(), d.numpy(), 1)[..., 0].mean(0), atol=1e-6)
    assert table["complete"] is False  # a recording that stopped early: analysed, and said so
    assert main(["analyze", "preference", str(tmp_path / "ok.h5"), "--out", str(tmp_path / "o"), "--overwrite"]) == 0
    assert "incomplete" in capsys.readouterr().out
    write_run(tmp_path / "prefix.h5", ["a", "b", "c"], arrays(tokens), prefix=2)
    with pytest.raises(QKHooksError, match="inconsistent"):
        analyze_preference(tmp_path / "prefix.h5", tmp_path / "o")
    tokens[2, 1] = 0  # the CLS token, as a run recorded without odd-one-out masks would have
    write_run(tmp_path / "bad.h5", ["a", "b", "c"], arrays(tokens), prefix=1)
    with pytest.raises(QKHooksError, match="distractor query token of image 2"):
        analyze_preference(tmp_path / "bad.h5", tmp_path / "o")


@pytest.mark.parametrize("batch_size", [2, 4])
def test_a_display_whose_target_the_centre_crop_removes_is_named_by_its_id_with_the_cause_and_the_fix(tmp_path, batch_size):
    """o3dir displays of 64x64 cropped to 32 after resizing to 36 (review 18 F4): d2.png's target lies in the 2-pixel
    left border the crop removes, so its downscaled target mask is empty (numpy: the crop's columns hold none of it).
    The refusal names "d2.png", not its position in the batch ([0] with batch_size 2, [2] with 4), the crop and the
    way out."""
    from PIL import Image

    import qkhooks
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from conftest import TINY_MODELS

    for d in ("images", "targ_images", "dist_images"):
        (tmp_path / d).mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        target, distractor = np.zeros((2, 64, 64), np.uint8)
        target[28:36, 0:2] = 255 if i == 2 else 0
        target[28:36, 20:28] = 0 if i == 2 else 255
        distractor[10:18, 40:48] = distractor[44:52, 40:48] = 255
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"d{i}.png")
        Image.fromarray(target).save(tmp_path / "targ_images" / f"d{i}.png")
        Image.fromarray(distractor).save(tmp_path / "dist_images" / f"d{i}.png")
    # numpy: resize 64 -> 36 keeps the target within columns < 2 * 36 / 64 + 1 < 3, the centre crop drops columns < 2
    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize=36)
    loaded = LoadedModel(model=TINY_MODELS[0].model(), spec="tiny", image_config=cfg)
    with pytest.raises(QKHooksError) as caught:
        qkhooks.record_dataset(loaded, f"o3dir:{tmp_path}", tmp_path / "run.h5", modes=None, attention="rows",
                               batch_size=batch_size, progress=False)
    message = str(caught.value)
    assert "target mask of image(s) ['d2.png'] is empty" in message and "[0]" not in message and "[2]" not in message
    assert "centre crop" in message and "Drop those images" in message
