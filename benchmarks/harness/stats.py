"""Statistics of interleaved timings: quantiles, summaries, the round-robin schedule, ratios paired by round."""

from __future__ import annotations

import math
from typing import Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default method)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    v = sorted(float(x) for x in values)
    pos = (len(v) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval of the median: (low, high, coverage).

    The order statistics x(l) and x(n+1-l) (1-based) bound the population median with probability
    1 - 2·P(Binomial(n, 1/2) < l), whatever the distribution (rounds of a benchmark are skewed, with outliers, so no
    normal approximation). l is the largest index whose coverage is still >= ``level``; where even (min, max) falls
    short of it (n <= 5 for 95 %), that interval is returned with its smaller coverage, for the caller to say so.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = sorted(float(x) for x in values)
    n = len(v)
    if n == 0:
        raise ValueError("interval of no values")

    def coverage(l: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(l)) / 2 ** n

    l = 1
    while l + 1 <= (n + 1) // 2 and coverage(l + 1) >= level:
        l += 1
    return v[l - 1], v[n - l], coverage(l)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min, max, mean, count, and the median's 95 % confidence interval
    (:func:`median_interval`: ``ci_low``, ``ci_high``, ``ci_coverage``)."""
    vals = [float(x) for x in values]
    q1, med, q3 = quantile(vals, 0.25), quantile(vals, 0.5), quantile(vals, 0.75)
    low, high, coverage = median_interval(vals)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": min(vals), "max": max(vals),
            "mean": sum(vals) / len(vals), "n": len(vals), "ci_low": low, "ci_high": high, "ci_coverage": coverage}


def interleaved_schedule(names: Sequence[str], rounds: int, warmup: int = 0) -> list[tuple[int, str]]:
    """(round, method) pairs: every round runs every method once (A B C, B C A, C A B, ...).

    Warm-up rounds come first and have negative round numbers. With three or more methods the order is
    rotated by one each round, so no method always runs first or always follows the same neighbour, and no
    method ever runs twice in a row; two methods simply alternate (A B A B ...).
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"method names repeat: {names}")
    out: list[tuple[int, str]] = []
    for i, r in enumerate(range(-warmup, rounds)):
        shift = i % len(names) if len(names) > 2 else 0
        out.extend((r, n) for n in names[shift:] + names[:shift])
    return out


def bracketed_schedule(names: Sequence[str], rounds: int, warmup: int = 0, base: str = "plain") -> list[tuple[int, str]]:
    """(round, method) pairs in which ``base`` runs before every other method and once more at the very end, so that
    each repetition of a method lies between two of ``base``'s (P A P B P C, P B P C P A, ..., P): its ratio to their
    mean (:func:`bracket_means`) cancels a drift of the machine's speed that a ratio to one ``base`` repetition per
    round, seconds away, keeps. The other methods' order is rotated by one each round. Warm-up rounds come first,
    with negative round numbers."""
    others = [n for n in names if n != base]
    if len(set(names)) != len(names) or base not in names or not others:
        raise ValueError(f"a bracketed schedule needs {base!r} and at least one other method, each once: {list(names)}")
    out: list[tuple[int, str]] = []
    for i, r in enumerate(range(-warmup, rounds)):
        shift = i % len(others)
        for name in others[shift:] + others[:shift]:
            out += [(r, base), (r, name)]
    return out + [(rounds - 1, base)]


def bracket_means(sequence: Sequence[tuple[int, str, float]], base: str = "plain") -> dict[str, list[float]]:
    """For every timed repetition (round >= 0) of a method other than ``base`` in a :func:`bracketed_schedule`'s
    ``sequence`` of (round, method, seconds): the mean of the ``base`` repetitions just before and just after it,
    per method in round order."""
    out: dict[str, list[float]] = {}
    for i, (r, name, _) in enumerate(sequence):
        if name == base or r < 0:
            continue
        before, after = sequence[i - 1], sequence[i + 1]
        if i == 0 or before[1] != base or after[1] != base:
            raise ValueError(f"repetition {i} ({name}) does not lie between two {base!r} repetitions")
        out.setdefault(name, []).append((before[2] + after[2]) / 2)
    return out


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-round ratios time / reference time (both lists indexed by round)."""
    if len(times) != len(reference):
        raise ValueError(f"{len(times)} times vs {len(reference)} reference times: pair them by round")
    return [t / r for t, r in zip(times, reference)]
