"""Readings: the report's sentences about per-layer curves, each decided by a test, never a template.

A curve is given as samples: an (units, layers) array, one row per independent unit (an image, or a head
where the statistic has no per-image value), NaN where a unit has no value at a layer. Every sentence that
states a direction ("falls", "rises", "above", "crosses", "rises again", "falls again") comes from a 95%
bootstrap-t interval over the units that excludes zero; the intervals of one reading are simultaneous (the
critical values from the largest and smallest t* over the reading's comparisons), so a reading of pure noise
states any direction in at most about 5% of data sets. When the interval holds zero the sentence says "no clear
trend" or "no clear difference"; with fewer than :data:`MIN_UNITS` units it says that no test can tell. Each
sentence carries its effect size and interval, so a reader can check it against the figure.

Every interval is clipped to the range its mean can take (``limits``, declared where each reading is built from
the statistic's definition: :data:`PROBABILITY` for a probability or a share, :data:`COSINE` for a cosine; a
difference's range follows from its two sides'). Clipping keeps coverage (the true mean lies in the range) and
changes no claim: a claim is whether the interval excludes 0, which must lie in the range.

Why bootstrap-t (resampled (mean* - mean) / se*) and not the percentile bootstrap: the percentile interval of a
mean is too narrow for few units (it shrinks by sqrt((n - 1) / n) and takes few distinct values), and it cannot
reach a familywise level's far tails; Student's t alone is too liberal in those tails for skewed units.
``tests/test_readings_null_calibration.py`` checks the false-claim rate on null data, Gaussian and skewed, from 6 to 30 units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from qkhooks.errors import QKHooksError

__all__ = ["Estimate", "Reading", "intervals", "layer_intervals", "trend_reading", "compare_reading", "thirds",
           "fmt_layers", "MIN_UNITS", "Pivots", "pair_pivots", "Limits", "UNBOUNDED", "PROBABILITY", "COSINE"]

BOOTSTRAP = 2000
"""Bootstrap resamples per reading (its critical values' Monte Carlo error is a few hundredths)."""

LEVEL = 0.95
"""Confidence of every interval: per layer for the figures' bands, simultaneous over a reading's comparisons."""

MIN_UNITS = 6
"""Fewer units and no test of a direction reaches 95%: under noise symmetric about zero, n units all on one side
of zero happen with probability 2 / 2**n (1/16 at n = 5), the rarest sign pattern there is. Below this the
reading says the units are too few and the figures draw no band."""


Limits = tuple[float, float]
"""The range (low, high) a statistic's mean can take, by its definition."""

UNBOUNDED: Limits = (-math.inf, math.inf)
PROBABILITY: Limits = (0.0, 1.0)
"""A probability, or a share of a whole."""
COSINE: Limits = (-1.0, 1.0)
"""A cosine, or a weighted mean of cosines."""

_SLACK = 1e-6
"""How far a mean may lie outside its declared range by rounding (a float32 cosine of 1 + 1e-7) before the
declaration, not the rounding, is taken to be wrong."""


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


class Pivots(NamedTuple):
    """What a bootstrap-t interval is made of, per column: the estimate, its standard error, its unit count and
    t* = (estimate* - estimate) / se* on each resample of the units, (n_boot, K) (NaN: a resample with no estimate,
    ±inf: one with no spread; (0, K) when no column has :data:`MIN_UNITS` units). A mean's come from
    :func:`_bootstrap_t`, a mean over pairs of units' from :func:`pair_pivots`; both resample the same draws."""

    value: np.ndarray
    se: np.ndarray
    count: np.ndarray
    t: np.ndarray


def _as_samples(samples: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2:
        raise QKHooksError(f"readings need (units, layers) samples, got shape {x.shape}.")
    _refuse_infinite(x)
    return x


def _refuse_infinite(x: np.ndarray) -> None:
    """NaN is "no value at this layer"; an infinite value is a value whose mean is infinite: dropped like a NaN, it
    left a finite interval over the other units without a word (review r34)."""
    infinite = np.argwhere(np.isinf(x))
    if infinite.size:  # (unit, column) first; pair_pivots' vectors add an axis within the column
        unit, column = (int(v) for v in infinite[0][:2])
        raise QKHooksError(f"unit {unit} has an infinite value ({x[tuple(infinite[0])]}) at column {column}: a mean "
                           "over it is infinite, and no interval can be read. Find where the statistic overflows (a "
                           "float16 run, a zero denominator) and recompute it.")


@functools.lru_cache(maxsize=16)
def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) float counts: how often each of ``n`` units is drawn in each resample (seeded, so a reading
    is the same on every run; cached, as a report asks for many readings of the same units)."""
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n)) + n * np.arange(n_boot)[:, None]
    weights = np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    weights.flags.writeable = False
    return weights


def _bootstrap_t(samples: np.ndarray, n_boot: int, seed: int) -> Pivots:
    """The :class:`Pivots` of the means of the columns of (units, K) ``samples``: t* = (mean* - mean) / se*, the
    units resampled with replacement (one draw shared by all columns; no draw, (0, K), when no column has
    :data:`MIN_UNITS` units).

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
            return Pivots(mean, se, count, np.zeros((0, x.shape[1])))
        weights = _resamples(x.shape[0], n_boot, seed)
        k = weights @ valid.astype(np.float64)
        shift = weights @ centred / k  # mean* - mean
        var = np.maximum(weights @ centred ** 2 - k * shift ** 2, 0) / (k - 1)
        t = np.where(var > 0, shift / np.sqrt(var / k), np.where(shift == 0, 0.0, np.sign(shift) * np.inf))
    t[k < 2] = np.nan
    return Pivots(mean, se, count, t)


def pair_pivots(vectors: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = 0) -> Pivots:
    """The :class:`Pivots` of the mean dot product over pairs of different units, per column of (units, K, d)
    ``vectors`` (a zero vector: no value there), on the resamples of :func:`_bootstrap_t`.

    Such a mean (a U-statistic) is not a mean over units: each pair holds two. Its standard error is the
    jackknife's, sd(ψ) / sqrt(n) with the pseudo-values ψ_i = n U - (n - 1) U_(-i) = U + 2 (n - 1) / (n - 2) (a_i - U),
    a_i the mean of unit i's dot products with the others. A resample recomputes both: U* over pairs of draws of
    different units (a unit drawn twice is never paired with itself, as U never pairs a unit with itself) and se*
    from each draw's mean over its partners, so t* follows the statistic's own skew and its tie of spread to level.
    """
    z = np.asarray(vectors, dtype=np.float64)
    if z.ndim != 3:
        raise QKHooksError(f"pair_pivots needs (units, columns, d) vectors, got shape {z.shape}.")
    n, columns, _ = z.shape
    _refuse_infinite(z)
    valid = np.linalg.norm(z, axis=-1) > 0
    count = valid.sum(0)
    value, se = np.full(columns, np.nan), np.full(columns, np.nan)
    t = np.full((n_boot if (count >= MIN_UNITS).any() else 0, columns), np.nan)
    weights = _resamples(n, n_boot, seed) if t.shape[0] else np.ones((0, n))
    for k in range(columns):
        if count[k] < 2:  # no pair: no value (the jackknife's standard error needs 3 units, the interval 6)
            continue
        zk, v = z[:, k][valid[:, k]], valid[:, k]
        value[k], se[k] = (float(x[0]) for x in _pair_mean_se(zk, np.ones((1, len(zk)))))
        if count[k] >= MIN_UNITS and t.shape[0]:
            mean_star, se_star = _pair_mean_se(zk, weights[:, v])
            with np.errstate(invalid="ignore", divide="ignore"):
                shift = mean_star - value[k]
                t[:, k] = np.where(se_star > 0, shift / se_star, np.where(shift == 0, 0.0, np.sign(shift) * np.inf))
            t[np.isnan(mean_star) | np.isnan(se_star), k] = np.nan  # fewer than 3 units drawn: no t*
    return Pivots(value, se, count, t)


def _pair_mean_se(z: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of draw counts ``c`` (B, n) of the units ``z`` (n, d): the mean dot product over pairs of draws of
    different units and its jackknife standard error (NaN where fewer than 3 units are drawn)."""
    q = (z * z).sum(1)  # each unit with itself: left out
    drawn = c.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = c @ z
        mean = ((s * s).sum(1) - (c * c) @ q) / (drawn ** 2 - (c * c).sum(1))
        partners = (s @ z.T - c * q) / (drawn[:, None] - c)  # a_i: unit i's mean over the others' draws
        psi = mean[:, None] + 2 * (drawn[:, None] - 1) / (drawn[:, None] - 2) * (partners - mean[:, None])
        psi = np.where(c > 0, psi, 0.0)
        centre = (c * psi).sum(1) / drawn
        var = (c * (psi - centre[:, None]) ** 2).sum(1) / (drawn - 1) / drawn
    units = (c > 0).sum(1)
    mean[units < 2] = np.nan
    se = np.sqrt(np.maximum(var, 0))
    se[units < 3] = np.nan
    return mean, se


def _limits(limits: Limits | tuple[np.ndarray, np.ndarray], columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the range, one per column; a column whose range is unknown (NaN) is not bounded."""
    low, high = (np.broadcast_to(np.asarray(v, dtype=np.float64), (columns,)) for v in limits)
    return np.where(np.isnan(low), -np.inf, low), np.where(np.isnan(high), np.inf, high)


def _pivots(samples: np.ndarray | Pivots, n_boot: int, seed: int) -> Pivots:
    return samples if isinstance(samples, Pivots) else _bootstrap_t(samples, n_boot, seed)


def _bounds(pivots: Pivots, level: float, simultaneous: bool, limits: Limits | tuple[np.ndarray, np.ndarray] = UNBOUNDED
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, low, high and unit count per column: mean - c_high · se to mean - c_low · se, the critical values
    the (1 ± level) / 2 quantiles of t* per column, or of its largest / smallest over the columns when
    ``simultaneous``, clipped to the column's ``limits`` (the range of its mean). The interval excludes 0 exactly
    when t = mean / se is beyond a critical value; columns with fewer than :data:`MIN_UNITS` units get NaN and take
    no part in the maximum."""
    mean, se, count, t = pivots
    floor, ceiling = _limits(limits, mean.shape[0])
    outside = (mean < floor - _SLACK) | (mean > ceiling + _SLACK)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise QKHooksError(f"column {k}'s mean {mean[k]:+.6g} lies outside its declared range [{floor[k]:+.6g}, "
                           f"{ceiling[k]:+.6g}]: declare the range the statistic's definition gives (limits=), or check "
                           "the samples.")
    low, high = np.full(mean.shape, np.nan), np.full(mean.shape, np.nan)
    tested = count >= MIN_UNITS
    if tested.any():
        hi, lo = np.where(np.isnan(t), np.inf, t)[:, tested], np.where(np.isnan(t), -np.inf, t)[:, tested]
        if simultaneous:
            hi, lo = hi.max(1), lo.min(1)
        alpha = (1 - level) / 2
        c_high = np.quantile(hi, 1 - alpha, axis=0, method="higher")
        c_low = np.quantile(lo, alpha, axis=0, method="lower")
        with np.errstate(invalid="ignore"):  # inf · 0 (an infinite critical value where se = 0) is NaN: no bound
            low[tested], high[tested] = (np.where(np.isnan(b), fill, b) for b, fill in
                                         ((mean[tested] - c_high * se[tested], -np.inf),
                                          (mean[tested] - c_low * se[tested], np.inf)))
    return mean, np.clip(low, floor, ceiling), np.clip(high, floor, ceiling), count


def intervals(samples: np.ndarray | Pivots, *, level: float = LEVEL, n_boot: int = BOOTSTRAP, seed: int = 0,
              limits: Limits | tuple[np.ndarray, np.ndarray] = UNBOUNDED) -> list[Estimate]:
    """Simultaneous ``level`` bootstrap-t intervals for the means of the columns of (units, K) ``samples`` (or for
    the estimates whose :class:`Pivots` are given).

    One critical value per side from the largest (smallest) t* over the columns, each side at (1 - level) / 2:
    with probability about ``level`` every interval holds its mean, so a direction claimed from any of them is
    wrong in at most about 1 - level of data sets. A column with fewer than :data:`MIN_UNITS` units has no
    interval (NaN). ``limits``: the range of each column's mean (one pair, or a pair of K-vectors); every interval
    is clipped to it, which must hold 0 (each estimate's claim is about 0: clipped so, the claim is unchanged).
    """
    pivots = _pivots(samples, n_boot, seed)
    lo, hi = _limits(limits, pivots.value.shape[0])
    if ((lo > 0) | (hi < 0)).any():
        k = int(np.flatnonzero((lo > 0) | (hi < 0))[0])
        raise QKHooksError(f"column {k}'s range [{lo[k]:+.6g}, {hi[k]:+.6g}] excludes 0, the value every interval is "
                           "tested against: the value compared with lies outside the statistic's range.")
    mean, low, high, count = _bounds(pivots, level, simultaneous=True, limits=(lo, hi))
    return [Estimate(float(m), float(lo), float(hi), int(n), level) for m, lo, hi, n in zip(mean, low, high, count)]


def layer_intervals(samples: np.ndarray | Pivots, *, n_boot: int = BOOTSTRAP, seed: int = 0, limits: Limits = UNBOUNDED
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: mean over units and its 95% bootstrap-t interval, the figures' CI bands, clipped to ``limits``
    (the range of the statistic's mean).

    The readings' kind of interval, but each layer on its own: a display, not adjusted for the number of layers,
    so a band may clear zero at a layer where the reading (adjusted) claims nothing. NaN where a layer has fewer
    than :data:`MIN_UNITS` units.
    """
    mean, low, high, _ = _bounds(_pivots(samples, n_boot, seed), LEVEL, simultaneous=False, limits=limits)
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


def _beyond(before: np.ndarray, value: float, side: int) -> bool:
    """Whether some layer of ``before`` (the means before a bend's layer) lies above ``value`` (``side`` 1) or below
    it (-1): the curve came down (up) to the bend, so "rises (falls) again" is what it does after it."""
    return bool((side * (before[np.isfinite(before)] - value) > 0).any())


def trend_reading(samples: np.ndarray, layers: Sequence[int], what: str, units: str, *,
                  limits: Limits = UNBOUNDED) -> Reading:
    """Does ``what`` change with depth? Late third minus early third, per unit.

    When the curve's extreme sits inside the layers and the last layer moves back from it by a clear margin,
    the sentence says so: a fall that ends in a rise is not a plain fall. The inner extreme is picked from the
    data, so the last layer is compared with every inner layer, and these comparisons and the trend share one
    simultaneous interval: all the reading's directions together are wrong in at most about 5% of data sets.
    ``limits``: the range of ``what`` (a difference of two of its means lies within ± its width).
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
    for third, name in ((early, "first"), (late, "last")):
        if not np.isfinite(mean[third]).any():  # not "too few units": no unit has a value there
            return Reading(f"{what}: no {units} have a value in the {name} third of the layers "
                           f"({fmt_layers(layers[third])}), so no trend can be tested.", "too_few")
    width = limits[1] - limits[0]
    est = intervals(np.column_stack([change, x[:, [-1]] - x[:, inner]]),  # [trend, last - L_j for inner j]
                    limits=(-width, width))
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
    # the extreme is the inner layers' (the last is compared with it): where the first layer lies beyond it, "lowest" /
    # "peaks" alone would name the wrong layer (DINOv2-S's same-object share is lowest at L0, 0.218, not L7, 0.290)
    named = [layers[i] for i in inner]
    span = (f"L{named[0]}–L{named[-1]}" if all(isinstance(n, (int, np.integer)) for n in named)
            and list(named) == list(range(named[0], named[0] + len(named))) else ", ".join(f"L{n}" for n in named))
    among = f"Of the inner layers ({span}) it"  # a range only where every layer in it was read
    # and only where the curve came down to it (some layer before it is higher): else it "rises again" without a fall
    j = int(inner[np.nanargmin(mean[inner])])
    if verdict != "rises" and est[j].sign > 0 and _beyond(mean[:j], mean[j], 1):
        who = "It is" if not mean[0] < mean[j] else f"{among} is"
        text += (f" {who} lowest at L{layers[j]} ({mean[j]:.3f}) and rises again to {mean[-1]:.3f} at the last layer "
                 f"(L{layers[-1]} − L{layers[j]} {est[j].text()}).")
        estimates["last_minus_minimum"] = est[j]
    j = int(inner[np.nanargmax(mean[inner])])
    if verdict != "falls" and est[j].sign < 0 and _beyond(mean[:j], mean[j], -1):
        who = "It" if not mean[0] > mean[j] else among
        text += (f" {who} peaks at L{layers[j]} ({mean[j]:.3f}) and falls again to {mean[-1]:.3f} at the last layer "
                 f"(L{layers[-1]} − L{layers[j]} {est[j].text()}).")
        estimates["last_minus_maximum"] = est[j]
    return Reading(text, verdict, estimates)


def _difference(a: np.ndarray | float | Pivots, b: np.ndarray | float | Pivots, layers: int, limits: Limits
                ) -> tuple[np.ndarray | Pivots, int, tuple[np.ndarray, np.ndarray]]:
    """a - b (samples (units, layers), or pivots where one side is pivots), its unit count and the range of its mean
    per layer. A side of samples or pivots has a mean in ``limits``; a constant (a number, or one per layer) is its
    own range."""
    sampled = [isinstance(v, Pivots) or np.ndim(v) == 2 for v in (a, b)]
    shapes = [(len(v.value),) if isinstance(v, Pivots) else np.shape(v) for v in (a, b)]
    units = {s[0] for s, drawn in zip(shapes, sampled) if drawn and len(s) == 2}
    if (not any(sampled) or len(units) > 1 or any(len(s) > 2 or (len(s) >= 1 and s[-1] != layers) for s in shapes)
            or (isinstance(a, Pivots) or isinstance(b, Pivots)) and all(sampled)):
        raise QKHooksError(f"compare_reading takes samples (units, layers) on both sides, paired by unit, or samples or "
                           f"pivots against a constant (one number or one per layer): {shapes[0]}, {shapes[1]}, "
                           f"{layers} layers.")
    (x_lo, x_hi), (y_lo, y_hi) = (limits if drawn else (np.asarray(v, float),) * 2 for v, drawn in zip((a, b), sampled))
    span = (np.asarray(x_lo - y_hi), np.asarray(x_hi - y_lo))
    if isinstance(a, Pivots):  # minus a constant
        return a._replace(value=a.value - np.asarray(b, float)), int(a.count.max()), span
    if isinstance(b, Pivots):  # a constant minus: the pivots turn round
        return b._replace(value=np.asarray(a, float) - b.value, t=-b.t), int(b.count.max()), span
    d = np.broadcast_to(np.asarray(a, float) - np.asarray(b, float), (units.pop(), layers))
    return d, int(np.isfinite(d).any(1).sum()), span


def compare_reading(a: np.ndarray | float | Pivots, b: np.ndarray | float | Pivots, layers: Sequence[int],
                    name_a: str, name_b: str, units: str, *, limits: Limits = UNBOUNDED) -> Reading:
    """Is curve ``a`` above curve ``b`` (paired by unit, or a constant such as chance), layer by layer?

    Each side is (units, layers) samples or a constant (one number, or one per layer), or :class:`Pivots` (an
    estimate that is not a mean over units, per layer) against a constant. ``limits``: the range of the sampled
    curves' means; a constant must lie in it (a claim is about a value the statistic can take). The layers'
    intervals are simultaneous (:func:`intervals`), so that a flat pair of curves is called different somewhere in
    at most about 5% of data sets, not 1 - 0.95^layers.
    Verdicts: ``above`` / ``below`` at every layer, ``crosses`` (clearly above at some, clearly below at others),
    ``mixed`` (clear at some, no clear difference at others), ``flat`` (no clear difference anywhere),
    ``too_few`` (fewer than :data:`MIN_UNITS` units at every layer).
    """
    layers = list(layers)
    d, n_units, d_limits = _difference(a, b, len(layers), limits)
    est = dict(zip(layers, intervals(d, limits=d_limits)))
    valued = {l: e for l, e in est.items() if np.isfinite(e.value)}  # a layer with no value is never the largest
    if not valued:
        return Reading(f"{name_a} vs {name_b}: no layer has a value ({n_units} {units}), so nothing can be compared.",
                       "too_few", {f"L{l}": e for l, e in est.items()})
    tested = {l: e for l, e in valued.items() if e.units >= MIN_UNITS}
    largest_l, largest = max((tested or valued).items(), key=lambda kv: abs(kv[1].value))
    biggest = f"largest in magnitude at L{largest_l}: {largest.text()}"  # review r40: -0.451 is no "largest"
    if not tested:
        return Reading(f"{name_a} vs {name_b}: {biggest}, but there are {_too_few(n_units, units)}.", "too_few",
                       {f"L{l}": e for l, e in est.items()})
    untested = [l for l in layers if l not in tested]  # no value, or too few units there: nothing is said of them
    above = [l for l, e in tested.items() if e.sign > 0]
    below = [l for l, e in tested.items() if e.sign < 0]
    small = min(tested.items(), key=lambda kv: abs(kv[1].value))
    smallest = f"smallest difference at L{small[0]}: {small[1].text()}"
    n = (f"{n_units} {units}" + (f"; intervals adjusted for {len(tested)} layers" if len(tested) > 1 else "")
         + (f"; not tested at {fmt_layers(untested)}: no value or fewer than {MIN_UNITS} {units} there" if untested
            else ""))
    every = "every tested layer" if untested else "every layer"
    layers = [l for l in layers if l in tested]
    if len(above) == len(layers):
        text, verdict = f"{name_a} is above {name_b} at {every} ({smallest}; {n}).", "above"
    elif len(below) == len(layers):
        text, verdict = f"{name_a} is below {name_b} at {every} ({smallest}; {n}).", "below"
    elif above and below:
        text, verdict = (f"{name_a} is above {name_b} at {fmt_layers(above)} and below it at {fmt_layers(below)}: they "
                         f"cross ({biggest}; {n}).", "crosses")
    elif above or below:
        side, clear = ("above", above) if above else ("below", below)
        rest = [l for l in layers if l not in clear]
        text, verdict = (f"{name_a} is {side} {name_b} at {fmt_layers(clear)} ({biggest}) and not clearly different at "
                         f"{fmt_layers(rest)} ({n}).", "mixed")
    else:
        text, verdict = (f"{name_a} and {name_b} show no clear difference at any {'tested ' if untested else ''}layer "
                         f"({biggest}; the intervals hold 0; {n}).", "flat")
    return Reading(text, verdict, {f"L{l}": e for l, e in est.items()})
