"""Readings: the report's sentences about per-layer curves, each decided by a bootstrap test, never a template.

A curve is given as samples: an (units, layers) array, one row per independent unit (an image, or a head
where the statistic has no per-image value), NaN where a unit has no value at a layer. Every sentence that
states a direction ("falls", "rises", "above", "crosses") comes from a 95% bootstrap percentile interval over
the units that excludes zero; when the interval holds zero the sentence says "no clear trend" or "no clear
difference". Each sentence carries its effect size and interval, so a reader can check it against the figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np

from qkhooks.errors import QKHooksError

__all__ = ["Estimate", "Reading", "bootstrap", "layer_intervals", "trend_reading", "compare_reading", "thirds", "fmt_layers"]

BOOTSTRAP = 2000
"""Bootstrap resamples per estimate (the CI's third digit is stable at this count)."""

MIN_UNITS = 3
"""Below this many units no interval is computed and the reading says the data are too few."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% bootstrap interval over ``units``."""

    value: float
    low: float
    high: float
    units: int
    level: float = 0.95

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval excludes zero on that side, 0 when it holds zero (no clear effect)."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def text(self) -> str:
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


def bootstrap(samples: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], *, n_boot: int = BOOTSTRAP,
              seed: int = 0, level: float = 0.95) -> Estimate:
    """Percentile ``level`` interval of ``statistic`` (units, ...) -> scalar, resampling the units with replacement.

    ``statistic`` gets a (resamples, units, ...) array and returns (resamples,), so all resamples run at once.
    """
    x = np.asarray(samples, dtype=np.float64)
    n = x.shape[0]
    value = float(statistic(x[None])[0])
    if n < MIN_UNITS:
        return Estimate(value, float("nan"), float("nan"), n, level)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    with np.errstate(invalid="ignore"), _quiet():
        boot = np.asarray(statistic(x[idx]), dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return Estimate(value, float("nan"), float("nan"), n, level)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(low), float(high), n, level)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's 'mean of empty slice' warnings: a resample may miss every unit with a value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def layer_intervals(samples: np.ndarray, *, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: mean over units and its 95% bootstrap interval (the CI bands of the figures)."""
    x = _as_samples(samples)
    with _quiet():
        mean = np.nanmean(x, 0)
    if x.shape[0] < MIN_UNITS:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    idx = np.random.default_rng(seed).integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    with _quiet():
        boot = np.nanmean(x[idx], 1)  # (n_boot, layers)
        low, high = np.nanquantile(boot, [0.025, 0.975], axis=0)
    return mean, low, high


def thirds(n_layers: int) -> tuple[slice, slice]:
    """The first and the last third of the layers (at least one layer each)."""
    k = max(1, n_layers // 3)
    return slice(0, k), slice(n_layers - k, n_layers)


def fmt_layers(layers: Sequence[int]) -> str:
    return ", ".join(f"L{l}" for l in layers)


def trend_reading(samples: np.ndarray, layers: Sequence[int], what: str, units: str) -> Reading:
    """Does ``what`` change with depth? Late third minus early third, per unit, with its bootstrap interval.

    When the curve's extreme sits inside the layers and the last layer moves back from it by a clear margin
    (interval excludes 0), the sentence says so: a fall that ends in a rise is not a plain fall.
    """
    x = _as_samples(samples)
    layers = list(layers)
    if x.shape[1] != len(layers):
        raise QKHooksError(f"{x.shape[1]} layers of samples but {len(layers)} layer labels.")
    n_units = int(np.isfinite(x).any(1).sum())
    with _quiet():
        mean = np.nanmean(x, 0)
    if n_units < MIN_UNITS or len(layers) < 2:
        return Reading(f"{what}: too few {units} ({n_units}) or layers ({len(layers)}) to test a trend.", "too_few")
    early, late = thirds(len(layers))
    diff = bootstrap(x, lambda b: np.nanmean(np.nanmean(b[..., late], -1) - np.nanmean(b[..., early], -1), -1))
    e, l = float(np.nanmean(mean[early])), float(np.nanmean(mean[late]))
    where = f"{e:.3f} in the first third of the layers to {l:.3f} in the last third"
    basis = f"late − early {diff.text()}, {n_units} {units}"
    if diff.sign > 0:
        text, verdict = f"{what} rises with depth, from {where} ({basis}).", "rises"
    elif diff.sign < 0:
        text, verdict = f"{what} falls with depth, from {where} ({basis}).", "falls"
    else:
        text, verdict = f"{what} shows no clear trend with depth: {where} ({basis}; the interval holds 0).", "flat"
    estimates = {"late_minus_early": diff}
    # a bend: the last layer moves back from an interior extreme
    inner = np.arange(1, len(layers) - 1)
    if inner.size and verdict != "rises":
        j = int(inner[np.nanargmin(mean[inner])])
        back = bootstrap(x, lambda b: np.nanmean(b[..., -1] - b[..., j], -1))
        if back.sign > 0:
            text += (f" It is lowest at L{layers[j]} ({mean[j]:.3f}) and rises again to {mean[-1]:.3f} at the last layer "
                     f"(L{layers[-1]} − L{layers[j]} {back.text()}).")
            estimates["last_minus_minimum"] = back
    if inner.size and verdict != "falls":
        j = int(inner[np.nanargmax(mean[inner])])
        back = bootstrap(x, lambda b: np.nanmean(b[..., -1] - b[..., j], -1))
        if back.sign < 0:
            text += (f" It peaks at L{layers[j]} ({mean[j]:.3f}) and falls again to {mean[-1]:.3f} at the last layer "
                     f"(L{layers[-1]} − L{layers[j]} {back.text()}).")
            estimates["last_minus_maximum"] = back
    return Reading(text, verdict, estimates)


def compare_reading(a: np.ndarray, b: np.ndarray | float, layers: Sequence[int], name_a: str, name_b: str,
                    units: str) -> Reading:
    """Is curve ``a`` above curve ``b`` (paired by unit, or a constant such as chance), layer by layer?

    Each layer's interval is Bonferroni-adjusted over the layers (level 1 - 0.05 / layers), so that a flat
    pair of curves is called different somewhere with probability about 5%, not 1 - 0.95^layers.
    Verdicts: ``above`` / ``below`` at every layer, ``crosses`` (clearly above at some, clearly below at others),
    ``mixed`` (clear at some, no clear difference at others), ``flat`` (no clear difference anywhere).
    """
    x = _as_samples(a)
    y = np.broadcast_to(np.asarray(b, dtype=np.float64), x.shape) if np.ndim(b) == 0 else _as_samples(b)
    if x.shape != y.shape or x.shape[1] != len(layers):
        raise QKHooksError(f"paired samples must share (units, layers): {x.shape}, {y.shape}, {len(layers)} layers.")
    layers = list(layers)
    d = x - y
    n_units = int(np.isfinite(d).any(1).sum())
    if n_units < MIN_UNITS:
        return Reading(f"{name_a} vs {name_b}: too few {units} ({n_units}) to compare.", "too_few")
    level = 1 - 0.05 / len(layers)
    est = {l: bootstrap(d[:, [i]], lambda s: np.nanmean(s[..., 0], -1), seed=i, level=level)
           for i, l in enumerate(layers)}
    above = [l for l, e in est.items() if e.sign > 0]
    below = [l for l, e in est.items() if e.sign < 0]
    small = min(est.items(), key=lambda kv: abs(kv[1].value))
    smallest = f"smallest difference at L{small[0]}: {small[1].text()}"
    largest_l, largest = max(est.items(), key=lambda kv: abs(kv[1].value))
    biggest = f"largest at L{largest_l}: {largest.text()}"
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
