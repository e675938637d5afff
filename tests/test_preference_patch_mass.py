"""Review r40 (SCI, lead): attention preference on rows that are no distribution over the patch tokens.

Preference normalises each attention row over the patch tokens to sum 1 (METHODS A.4). The old code divided by
``mass.clamp_min(tiny)``, so a row whose patch mass was 0 or below gave values of ~1e37 (folded into the reducer's
means without a word) or inf (refused as "NaN pixels or float16 overflow"), and a softmax row with all its mass on a
prefix token gave (0, 0, 0) instead of three values that sum to 1. Maps that are not one softmax have such rows:
differential attention (a row sums to 1 - lambda) and CaiT's talking heads (``proj_w`` mixes the softmaxes).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.analysis.preference import PreferenceReducer, odd_one_out_meta, preference_from_reducer, preference_from_rows
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError


def _grids(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.zeros(b, 2, 2)
    d = torch.zeros(b, 2, 2)
    t[:, 0, 0], d[:, 1, 1] = 1.0, 1.0
    return t, d


def _numpy_preference(rows: np.ndarray, t: np.ndarray, d: np.ndarray, prefix: int) -> np.ndarray:
    """The six values by direct loops (METHODS A.4), the reference for rows with positive patch mass."""
    out = np.zeros(rows.shape[:2] + (6,))
    for b in range(rows.shape[0]):
        masks = [t[b].ravel(), d[b].ravel(), np.clip(1 - t[b].ravel() - d[b].ravel(), 0, None)]
        for h in range(rows.shape[1]):
            tgt, dis = (rows[b, h, i, prefix:] / rows[b, h, i, prefix:].sum() for i in (0, 1))
            out[b, h] = [tgt @ masks[0], tgt @ masks[1], tgt @ masks[2], dis @ masks[1], dis @ masks[0], dis @ masks[2]]
    return out


def test_rows_with_negative_patch_mass_are_refused_not_turned_into_huge_values():
    t, d = _grids()
    rows = torch.full((2, 1, 2, 5), 0.1)
    rows[1, 0, 1, 1:] = torch.tensor([-0.2, 0.05, 0.05, 0.02])  # patch mass -0.08: a row of softmax1 - 1.3 softmax2
    with pytest.raises(QKHooksError, match=r"position\(s\) \[1\] of this batch at layer\(s\) \[3\] are no attention distribution over the patch tokens") as err:
        preference_from_rows(rows, t, d, 1, layer=3)
    assert "differential attention" in str(err.value) and "layers=" in str(err.value)
    # the rows with positive mass keep their values: those of the direct computation
    good = preference_from_rows(rows[:1], t[:1], d[:1], 1)
    np.testing.assert_allclose(good.numpy(), _numpy_preference(rows[:1].double().numpy(), t[:1].numpy(), d[:1].numpy(), 1),
                               atol=1e-12)


def test_a_softmax_row_with_all_its_mass_on_the_prefix_token_is_refused_not_read_as_zero():
    t, d = _grids(1)
    rows = torch.tensor([[[[1.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]]]])  # the target row: all on CLS
    with pytest.raises(QKHooksError, match="no attention distribution over the patch tokens"):
        preference_from_rows(rows, t, d, 1)
    # unchecked (as the reducer calls it), such a row gives NaN, never a number
    values = preference_from_rows(rows, t, d, 1, check_mass=False)
    assert torch.isnan(values[0, 0, :3]).all() and torch.isfinite(values[0, 0, 3:]).all()


def test_reducer_refuses_a_batch_with_negative_patch_mass_naming_the_layer_and_keeps_its_state():
    t, d = _grids()
    red = PreferenceReducer()
    good = torch.softmax(torch.randn(2, 1, 2, 5, generator=torch.Generator().manual_seed(0)), -1)
    red.update(BatchCapture(["a", "b"], {"target_grid": t, "distractor_grid": d},
                            {0: LayerCapture(0, 2, attention={"rows": good}), 4: LayerCapture(4, 2, attention={"rows": good})}))
    before = preference_from_reducer(red)
    bad = good.clone()
    bad[0, 0, 0, 1:] = -bad[0, 0, 0, 1:]  # image "c", layer 4: patch mass below 0
    batch = BatchCapture(["c", "d"], {"target_grid": t, "distractor_grid": d},
                         {0: LayerCapture(0, 2, attention={"rows": good}), 4: LayerCapture(4, 2, attention={"rows": bad})}, 2)
    with pytest.raises(QKHooksError, match=r"rows of image 'c' at layer\(s\) \[4\] are no attention distribution"):
        red.update(batch)
    after = preference_from_reducer(red)
    assert after["num_images"] == 2 and after["same_object"]["mean"] == before["same_object"]["mean"]


def test_reducer_still_names_nan_rows_as_not_finite():
    t, d = _grids()
    rows = torch.softmax(torch.randn(2, 1, 2, 5), -1)
    rows[1, 0, 0, 2] = float("nan")
    batch = BatchCapture(["a", "b"], {"target_grid": t, "distractor_grid": d}, {0: LayerCapture(0, 2, attention={"rows": rows})})
    with pytest.raises(QKHooksError, match="not finite"):
        PreferenceReducer().update(batch)


def test_differential_attention_with_lambda_above_one_is_refused_by_the_recording_reducer():
    """A live recording of timm's differential attention (vit_dwee) whose lambda exceeds 1: its rows sum to
    1 - lambda < 0. The old reducer folded values of ~-2e36 into the table; now the batch is refused, naming why."""
    torch.manual_seed(0)
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, embed_dim=32, depth=2, num_heads=4,
                              img_size=32, patch_size=8).eval()
    for block in model.blocks:
        block.attn.lambda_init = 1.3
    lambdas = [float(b.attn._compute_lambda().detach()) for b in model.blocks]
    assert min(lambdas) > 1  # the case under test: rows sum to 1 - lambda < 0
    target, distractor = torch.zeros(2, 32, 32), torch.zeros(2, 32, 32)
    target[:, :8, :8], distractor[:, 16:24, 16:] = 1, 1
    meta = odd_one_out_meta(target, distractor, (4, 4), model.num_prefix_tokens)
    red = PreferenceReducer()
    with qkhooks.record(model, modes=None, attention="rows", sinks=[red]) as run, torch.no_grad():
        with pytest.raises(QKHooksError, match="differential attention"):
            run(torch.randn(2, 3, 32, 32), meta=meta)
    assert red.images_held() == 0


def test_a_signed_row_with_a_positive_sum_is_refused_its_shares_would_leave_zero_to_one():
    """Differential attention with 0 < lambda < 1: rows sum to 1 - lambda > 0 but have negative entries, so the
    "shares" of a region could be negative or above 1 (the direct computation says so); refused, not read (lead)."""
    t, d = _grids(1)
    rows = torch.tensor([[[[0.1, 0.7, -0.5, 0.1, 0.6], [0.2, 0.2, 0.2, 0.2, 0.2]]]])  # patch sum 0.9 > 0
    shares = _numpy_preference(rows.double().numpy(), t.numpy(), d.numpy(), 1)[0, 0]
    assert shares[:3].max() > 1 or shares[:3].min() < 0  # what the old code reported as preference
    with pytest.raises(QKHooksError, match=r"an entry below 0"):
        preference_from_rows(rows, t, d, 1)
    red = PreferenceReducer()
    batch = BatchCapture(["a"], {"target_grid": t, "distractor_grid": d}, {2: LayerCapture(2, 1, attention={"rows": rows})})
    with pytest.raises(QKHooksError, match=r"rows of image 'a' at layer\(s\) \[2\] are no attention distribution"):
        red.update(batch)
    assert red.images_held() == 0
