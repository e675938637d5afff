"""The reading generator on synthetic curves with known answers: flat, rising, falling, crossing, a fall that
ends in a rise, and too few units. Noise is drawn per unit, so the bootstrap has something to resample.
(Calibration on null data and the t quantiles: tests/test_readings_null_calibration.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from qkhooks.readings import compare_reading, intervals, layer_intervals, trend_reading

LAYERS = list(range(12))


def _units(curve, n=40, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(curve, float)[None] + noise * rng.standard_normal((n, len(curve)))


def test_flat_curve_says_no_clear_trend():
    r = trend_reading(_units(np.full(12, 0.35)), LAYERS, "Same-object share", "images")
    assert r.verdict == "flat" and "no clear trend" in r.text and "95% CI" in r.text
    est = r.estimates["late_minus_early"]
    assert est.low < 0 < est.high


@pytest.mark.parametrize("slope, verdict", [(0.05, "rises"), (-0.05, "falls")])
def test_monotone_curves_rise_or_fall_with_effect_and_ci(slope, verdict):
    x = _units(0.3 + slope * np.arange(12))
    r = trend_reading(x, LAYERS, "The cosine", "heads")
    assert r.verdict == verdict and f"The cosine {verdict}" in r.text and "95% CI" in r.text
    est = r.estimates["late_minus_early"]
    # effect: mean of the last 4 layers minus the first 4, computed directly
    direct = x[:, 8:].mean() - x[:, :4].mean()
    assert est.value == pytest.approx(direct) and est.low < direct < est.high
    assert abs(direct - slope * 8) < 0.03


def test_a_fall_that_ends_in_a_rise_is_said():
    curve = np.r_[np.linspace(0.66, 0.12, 11), 0.37]
    r = trend_reading(_units(curve, noise=0.02), LAYERS, "The cosine", "heads")
    assert r.verdict == "falls" and "rises again to" in r.text and "L11 − L10" in r.text


def test_crossing_curves_and_a_curve_above_another():
    a = _units(np.linspace(0.5, 0.2, 12), seed=1)
    b = _units(np.linspace(0.2, 0.5, 12), seed=2)
    r = compare_reading(a, b, LAYERS, "same object", "other object", "images")
    assert r.verdict == "crosses" and "same object is above other object at L0" in r.text
    assert "L11" in r.text.split("below it at")[1].split(":")[0] and "L0," not in r.text.split("below it at")[1]
    above = compare_reading(a + 1, b, LAYERS, "A", "B", "images")
    assert above.verdict == "above" and "95% CI" in above.text and "adjusted for 12 layers" in above.text
    chance = compare_reading(_units(np.full(12, 0.1), seed=2), 0.1, LAYERS, "P(same)", "chance", "heads")
    assert chance.verdict == "flat" and "no clear difference" in chance.text


def test_flat_pairs_are_rarely_called_different_anywhere():
    """Simultaneous intervals over layers keep the chance of a false 'above/below somewhere' near 5%, not
    1 - 0.95^12 = 46% (a coarse check on 40 data sets; the calibrated one is in test_readings_null_calibration.py)."""
    calls = [compare_reading(_units(np.full(12, 0.1), seed=s), 0.1, LAYERS, "a", "b", "heads").verdict != "flat"
             for s in range(40)]
    assert np.mean(calls) <= 0.25


def test_too_few_units_refuse_to_read():
    r = trend_reading(np.ones((2, 12)), LAYERS, "x", "images")
    assert r.verdict == "too_few" and "too few images (2)" in r.text


def test_bootstrap_t_interval_covers_a_known_mean_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    small, large = rng.normal(1.0, 1.0, 25), rng.normal(1.0, 1.0, 2500)
    (e_small,) = intervals(small[:, None])
    (e_large,) = intervals(large[:, None])
    assert e_small.value == pytest.approx(small.mean()) and e_small.low < 1.0 < e_small.high
    width = e_large.high - e_large.low
    assert width < (e_small.high - e_small.low) / 5
    assert width == pytest.approx(2 * 1.96 / np.sqrt(2500), rel=0.15)  # normal-theory width of a mean
    mean, low, high = layer_intervals(np.c_[small, small + 1])
    np.testing.assert_allclose(mean, [small.mean(), small.mean() + 1])
    assert low[0] == pytest.approx(e_small.low) and (low < mean).all() and (mean < high).all()
