"""Readings: the report's sentences about per-layer curves, each decided by a test, never a template.

A curve is given as samples: an (units, layers) array, one row per independent unit (an image, or a head
where the statistic has no per-image value), NaN where a unit has no value at a layer. Every sentence that
states a direction ("falls", "rises", "above", "crosses", "rises again", "falls again") comes from a 95%
bootstrap-t interval over the units that excludes zero; the intervals of one reading are simultaneous (the
critical values from the largest and smallest t* over the reading's comparisons), so a reading of pure noise
states any direction in at most about 5% of data sets. When the interval holds zero the sentence says "no clear
trend" or "no clear difference"; with fewer than :data:`MIN_UNITS` units it says that no test can tell. Each
sentence carries its effect size and interval, so a reader can check it against the figure.

Why bootstrap-t (resampled (mean* - mean) / se*) and not the percentile bootstrap: the percentile interval of a
mean is too narrow for few units (it shrinks by sqrt((n - 1) / n) and takes few distinct values), and it cannot
reach a familywise level's far tails; Student's t alone is too liberal in those tails for skewed units.
``tests/test_readings_r22.py`` checks the false-claim rate on null data, Gaussian and skewed, from 6 to 30 units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Iterator, Sequence

import numpy as np

from qkhooks.errors import QKHooksError

__all__ = ["Estimate", "Reading", "intervals", "layer_intervals", "trend_reading", "compare_reading", "thirds",
           "fmt_layers", "MIN_UNITS"]

BOOTSTRAP = 2000
"""Bootstrap resamples per reading (its critical values' Monte Carlo error is a few hundredths)."""

LEVEL = 0.95
"""Confidence of every interval: per layer for the figures' bands, simultaneous over a reading's comparisons."""

MIN_UNITS = 6
"""Fewer units and no test of a direction reaches 95%: under noise symmetric about zero, n units all on one side
of zero happen with probability 2 / 2**n (1/16 at n = 5), the rarest sign pattern there is. Below this the
reading says the units are too few and the figures draw no band."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over ``units`` with its ``level`` interval (NaN where the units are too few to give one)."""

    value: float
    low: float
    high: float
    units: int
    level: float = LEVEL

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval excludes zero on that side, 0 when it holds zero (no clear effect)."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def text(self) -> str:
        if np.isnan(self.low):
            return f"{self.value:+.3f}, no interval"
        return f"{self.value:+.3f}, {100 * self.level:.3g}% CI {self.low:+.3f} to {self.high:+.3f}"


@dataclasses.dataclass(frozen=True)
class Reading:
    """One sentence and the verdict and estimates behind it (``verdict``: falls, rises, flat, above, below, ...)."""

    text: str
    verdict: str
    estimates: dict[str, Estimate] = dataclasses.field(default_factory=dict)


def _as_samples(samples: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2:
        raise QKHooksError(f"readings need (units, layers) samples, got shape {x.shape}.")
    return x


@functools.lru_cache(maxsize=16)
def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) float counts: how often each of ``n`` units is drawn in each resample (seeded, so a reading
    is the same on every run; cached, as a report asks for many readings of the same units)."""
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n)) + n * np.arange(n_boot)[:, None]
    weights = np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    weights.flags.writeable = False
    return weights


def _bootstrap_t(samples: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column of (units, K) ``samples``: mean, standard error, unit count and the (n_boot, K) resampled
    t* = (mean* - mean) / se*, the units resampled with replacement (one draw shared by all columns; no draw,
    (0, K), when no column has :data:`MIN_UNITS` units).

    A resample with no spread (one unit drawn every time) has t* = ±inf and one with fewer than 2 units with a
    value NaN: both count as more extreme than any data, so few units give wide intervals, never narrow ones.
    """
    x = np.ascontiguousarray(_as_samples(samples))  # BLAS takes ~100x longer on a Fortran-ordered right factor
    valid = np.isfinite(x)
    count = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, x, 0).sum(0) / count
        centred = np.where(valid, x - mean, 0.0)
        se = np.sqrt((centred ** 2).sum(0) / (count - 1) / count)
        if not (count >= MIN_UNITS).any():
            return mean, se, count, np.zeros((0, x.shape[1]))
        weights = _resamples(x.shape[0], n_boot, seed)
        k = weights @ valid.astype(np.float64)
        shift = weights @ centred / k  # mean* - mean
        var = np.maximum(weights @ centred ** 2 - k * shift ** 2, 0) / (k - 1)
        t = np.where(var > 0, shift / np.sqrt(var / k), np.where(shift == 0, 0.0, np.sign(shift) * np.inf))
    t[k < 2] = np.nan
    return mean, se, count, t


def _bounds(samples: np.ndarray, level: float, n_boot: int, seed: int, simultaneous: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, low, high and unit count per column: mean - c_high · se to mean - c_low · se, the critical values
    the (1 ± level) / 2 quantiles of t* per column, or of its largest / smallest over the columns when
    ``simultaneous``. The interval excludes 0 exactly when t = mean / se is beyond a critical value; columns
    with fewer than :data:`MIN_UNITS` units get NaN and take no part in the maximum."""
    mean, se, count, t = _bootstrap_t(samples, n_boot, seed)
    low, high = np.full(mean.shape, np.nan), np.full(mean.shape, np.nan)
    tested = count >= MIN_UNITS
    if tested.any():
        hi, lo = np.where(np.isnan(t), np.inf, t)[:, tested], np.where(np.isnan(t), -np.inf, t)[:, tested]
        if simultaneous:
            hi, lo = hi.max(1), lo.min(1)
        alpha = (1 - level) / 2
        c_high = np.quantile(hi, 1 - alpha, axis=0, method="higher")
        c_low = np.quantile(lo, alpha, axis=0, method="lower")
        with np.errstate(invalid="ignore"):  # inf · 0: an infinite critical value where se = 0
            low[tested] = np.nan_to_num(mean[tested] - c_high * se[tested], nan=-np.inf)
            high[tested] = np.nan_to_num(mean[tested] - c_low * se[tested], nan=np.inf)
    return mean, low, high, count


def intervals(samples: np.ndarray, *, level: float = LEVEL, n_boot: int = BOOTSTRAP, seed: int = 0) -> list[Estimate]:
    """Simultaneous ``level`` bootstrap-t intervals for the means of the columns of (units, K) ``samples``.

    One critical value per side from the largest (smallest) t* over the columns, each side at (1 - level) / 2:
    with probability about ``level`` every interval holds its mean, so a direction claimed from any of them is
    wrong in at most about 1 - level of data sets. A column with fewer than :data:`MIN_UNITS` units has no
    interval (NaN).
    """
    mean, low, high, count = _bounds(samples, level, n_boot, seed, simultaneous=True)
    return [Estimate(float(m), float(lo), float(hi), int(n), level) for m, lo, hi, n in zip(mean, low, high, count)]


def layer_intervals(samples: np.ndarray, *, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: mean over units and its 95% bootstrap-t interval, the figures' CI bands.

    The readings' kind of interval, but each layer on its own: a display, not adjusted for the number of layers,
    so a band may clear zero at a layer where the reading (adjusted) claims nothing. NaN where a layer has fewer
    than :data:`MIN_UNITS` units.
    """
    mean, low, high, _ = _bounds(samples, LEVEL, n_boot, seed, simultaneous=False)
    return mean, low, high


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's 'mean of empty slice' warnings: a unit or a layer may have no value (NaN is the answer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def thirds(n_layers: int) -> tuple[slice, slice]:
    """The first and the last third of the layers (at least one layer each)."""
    k = max(1, n_layers // 3)
    return slice(0, k), slice(n_layers - k, n_layers)


def fmt_layers(layers: Sequence[int]) -> str:
    return ", ".join(f"L{l}" for l in layers)


def _too_few(n: int, units: str) -> str:
    """Why ``n`` units cannot tell a direction (the bound of :data:`MIN_UNITS`)."""
    chance = (f": {n} {units} all on one side of zero happen in {100 * 2.0 ** (1 - n):.3g}% of data sets of noise "
              "symmetric about zero" if n >= 2 else "")
    return f"too few {units} ({n}) to tell: with fewer than {MIN_UNITS}, no test reaches 95%{chance}"


def trend_reading(samples: np.ndarray, layers: Sequence[int], what: str, units: str) -> Reading:
    """Does ``what`` change with depth? Late third minus early third, per unit.

    When the curve's extreme sits inside the layers and the last layer moves back from it by a clear margin,
    the sentence says so: a fall that ends in a rise is not a plain fall. The inner extreme is picked from the
    data, so the last layer is compared with every inner layer, and these comparisons and the trend share one
    simultaneous interval: all the reading's directions together are wrong in at most about 5% of data sets.
    """
    x = _as_samples(samples)
    layers = list(layers)
    if x.shape[1] != len(layers):
        raise QKHooksError(f"{x.shape[1]} layers of samples but {len(layers)} layer labels.")
    if len(layers) < 2:
        return Reading(f"{what}: {len(layers)} layer, no trend to test.", "too_few")
    early, late = thirds(len(layers))
    inner = np.arange(1, len(layers) - 1)
    with _quiet():
        mean = np.nanmean(x, 0)
        change = np.nanmean(x[:, late], 1) - np.nanmean(x[:, early], 1)  # per unit
    est = intervals(np.column_stack([change, x[:, [-1]] - x[:, inner]]))  # [trend, last - L_j for inner j]
    diff = est[0]
    e, l = float(np.nanmean(mean[early])), float(np.nanmean(mean[late]))
    where = f"{e:.3f} in the first third of the layers to {l:.3f} in the last third"
    estimates = {"late_minus_early": diff}
    if diff.units < MIN_UNITS:
        return Reading(f"{what} goes from {where} (late − early {diff.value:+.3f}), but there are "
                       f"{_too_few(diff.units, units)}.", "too_few", estimates)
    adjusted = (f"; intervals adjusted for {len(est)} comparisons: the trend and the last layer against each inner "
                "layer" if inner.size else "")
    basis = f"late − early {diff.text()}, {diff.units} {units}{adjusted}"
    if diff.sign > 0:
        text, verdict = f"{what} rises with depth, from {where} ({basis}).", "rises"
    elif diff.sign < 0:
        text, verdict = f"{what} falls with depth, from {where} ({basis}).", "falls"
    else:
        text, verdict = f"{what} shows no clear trend with depth: {where} ({basis}; the interval holds 0).", "flat"
    if not np.isfinite(mean[inner]).any():
        return Reading(text, verdict, estimates)
    # a bend: the last layer moves back from an inner extreme (est[j] is last - L_j)
    j = int(inner[np.nanargmin(mean[inner])])
    if verdict != "rises" and est[j].sign > 0:
        text += (f" It is lowest at L{layers[j]} ({mean[j]:.3f}) and rises again to {mean[-1]:.3f} at the last layer "
                 f"(L{layers[-1]} − L{layers[j]} {est[j].text()}).")
        estimates["last_minus_minimum"] = est[j]
    j = int(inner[np.nanargmax(mean[inner])])
    if verdict != "falls" and est[j].sign < 0:
        text += (f" It peaks at L{layers[j]} ({mean[j]:.3f}) and falls again to {mean[-1]:.3f} at the last layer "
                 f"(L{layers[-1]} − L{layers[j]} {est[j].text()}).")
        estimates["last_minus_maximum"] = est[j]
    return Reading(text, verdict, estimates)


def compare_reading(a: np.ndarray, b: np.ndarray | float, layers: Sequence[int], name_a: str, name_b: str,
                    units: str) -> Reading:
    """Is curve ``a`` above curve ``b`` (paired by unit, or a constant such as chance), layer by layer?

    The layers' intervals are simultaneous (:func:`intervals`), so that a flat pair of curves is called
    different somewhere in at most about 5% of data sets, not 1 - 0.95^layers.
    Verdicts: ``above`` / ``below`` at every layer, ``crosses`` (clearly above at some, clearly below at others),
    ``mixed`` (clear at some, no clear difference at others), ``flat`` (no clear difference anywhere),
    ``too_few`` (fewer than :data:`MIN_UNITS` units at every layer).
    """
    x = _as_samples(a)
    y = np.broadcast_to(np.asarray(b, dtype=np.float64), x.shape) if np.ndim(b) == 0 else _as_samples(b)
    if x.shape != y.shape or x.shape[1] != len(layers):
        raise QKHooksError(f"paired samples must share (units, layers): {x.shape}, {y.shape}, {len(layers)} layers.")
    layers = list(layers)
    d = x - y
    n_units = int(np.isfinite(d).any(1).sum())
    est = dict(zip(layers, intervals(d)))
    largest_l, largest = max(est.items(), key=lambda kv: abs(kv[1].value))
    biggest = f"largest at L{largest_l}: {largest.text()}"
    if all(e.units < MIN_UNITS for e in est.values()):
        return Reading(f"{name_a} vs {name_b}: {biggest}, but there are {_too_few(n_units, units)}.", "too_few",
                       {f"L{l}": e for l, e in est.items()})
    above = [l for l, e in est.items() if e.sign > 0]
    below = [l for l, e in est.items() if e.sign < 0]
    small = min(est.items(), key=lambda kv: abs(kv[1].value))
    smallest = f"smallest difference at L{small[0]}: {small[1].text()}"
    n = f"{n_units} {units}" + (f"; intervals adjusted for {len(layers)} layers" if len(layers) > 1 else "")
    if len(above) == len(layers):
        text, verdict = f"{name_a} is above {name_b} at every layer ({smallest}; {n}).", "above"
    elif len(below) == len(layers):
        text, verdict = f"{name_a} is below {name_b} at every layer ({smallest}; {n}).", "below"
    elif above and below:
        text, verdict = (f"{name_a} and {name_b} cross: {name_a} is above at {fmt_layers(above)} and below at "
                         f"{fmt_layers(below)} ({biggest}; {n}).", "crosses")
    elif above or below:
        side, clear = ("above", above) if above else ("below", below)
        rest = [l for l in layers if l not in clear]
        text, verdict = (f"{name_a} is {side} {name_b} at {fmt_layers(clear)} ({biggest}) and not clearly different at "
                         f"{fmt_layers(rest)} ({n}).", "mixed")
    else:
        text, verdict = (f"{name_a} and {name_b} show no clear difference at any layer ({biggest}; the intervals hold 0; "
                         f"{n}).", "flat")
    return Reading(text, verdict, {f"L{l}": e for l, e in est.items()})
