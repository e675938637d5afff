"""Round 36's review findings, each a test seen to fail on the code before its fix."""

from __future__ import annotations

import csv
import json
import math

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
