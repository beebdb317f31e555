"""Every interval the project reports, in one place.

* :func:`mean_interval`: the mean over seeds with a 95% Student-t interval (``scipy.stats.t``).
* :func:`wilson_interval` / :func:`accuracy_summary`: a binomial proportion's 95% Wilson score interval
  (``scipy.stats.binomtest``).
* :func:`paired_bootstrap_mean`: the mean of paired differences (accuracy of a minus accuracy of b on
  the same items) with a percentile bootstrap over items.
* :func:`bootstrap_ratio`: a ratio of sums (``Σ nll / Σ tokens``) with a percentile bootstrap over items.
* :func:`two_level_bootstrap`: the mean over seeds of a paired difference of ratios of sums, with a
  bootstrap that draws the seeds, then the items (the same items for every seed drawn and both sides).

The bootstraps draw with :class:`random.Random` rather than through ``scipy.stats.bootstrap``: a
ratio of sums resampled as pairs, and a draw over two levels, are not statistics of independent
samples that scipy resamples, and the draws stay those behind every stored report (a report rewritten
from its per-item data gives the same numbers). Each is tested against a computation written out
another way (tests/test_stats.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from scipy import stats as _scipy_stats

from cctuning.errors import CCError

LEVEL = 0.95


def _percentiles(draws: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentile of sorted bootstrap draws (the index rule of every report)."""
    draws.sort()
    reps = len(draws)
    return draws[int(0.025 * reps)], draws[min(reps - 1, int(0.975 * reps))]


def mean_interval(values: Sequence[float], low: float | None = None, high: float | None = None) -> dict:
    """Mean and 95% t-interval over seeds (a single value has no interval), clipped to ``[low, high]``
    when given (an accuracy's interval is cut at 0 and 1)."""
    n = len(values)
    if n == 0:
        raise CCError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(_scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    ci_low, ci_high = mean - half, mean + half
    if low is not None:
        ci_low = max(low, ci_low)
    if high is not None:
        ci_high = min(high, ci_high)
    return {"mean": mean, "ci_low": ci_low, "ci_high": ci_high, "n": n}


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (``(0, 1)`` for no trials)."""
    if n == 0:
        return 0.0, 1.0
    ci = _scipy_stats.binomtest(successes, n).proportion_ci(confidence_level=LEVEL, method="wilson")
    # the bounds are exactly 0 and 1 at k = 0 and k = n (rounding would leave 1e-16 off)
    return (0.0 if successes == 0 else float(ci.low)), (1.0 if successes == n else float(ci.high))


def accuracy_summary(correct: Sequence[bool]) -> dict:
    """Accuracy of a list of right/wrong answers with its Wilson interval."""
    k, n = sum(bool(c) for c in correct), len(correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "ci_low": low, "ci_high": high, "correct": k, "n": n}


def paired_bootstrap_mean(a: Sequence[bool], b: Sequence[bool], reps: int, seed: int) -> dict:
    """Accuracy(a) − accuracy(b) on the same items, with a paired bootstrap 95% percentile interval."""
    if len(a) != len(b) or not a:
        raise CCError("a paired difference needs two non-empty runs on the same items")
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(diffs)
    rng = random.Random(seed)
    low, high = _percentiles([sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps)])
    return {"margin": sum(diffs) / n, "ci_low": low, "ci_high": high, "n": n}


def bootstrap_ratio(
    numerator: Sequence[float], denominator: Sequence[float], reps: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of ``Σ numerator / Σ denominator`` under resampling of items."""
    if len(numerator) < 2:
        value = sum(numerator) / max(1, sum(denominator))
        return value, value
    rng = random.Random(seed)
    n = len(numerator)
    draws = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        draws.append(sum(numerator[i] for i in idx) / max(1, sum(denominator[i] for i in idx)))
    return _percentiles(draws)


def _ratio(rows: Sequence[tuple[float, float]], idx: Sequence[int]) -> float:
    return sum(rows[i][0] for i in idx) / max(1, sum(rows[i][1] for i in idx))


def two_level_bootstrap(
    runs: Sequence[tuple[Sequence[tuple[float, float]], Sequence[tuple[float, float]]]],
    reps: int,
    rng: random.Random,
    seed_rng: random.Random,
) -> dict:
    """The mean over seeds of ``ratio(a) − ratio(b)``, where ``runs`` holds one (a, b) pair per seed,
    each a list of ``(numerator, denominator)`` per item, in the same item order for every run.

    Each of ``reps`` replicates draws the seeds with replacement (from ``seed_rng``; one seed is never
    drawn), then the items with replacement (from ``rng``), the same items for every seed drawn and for
    a and b, and averages the drawn seeds' differences. The generators are passed in so that a caller
    scoring several groups (languages) continues one stream of draws across them."""
    n_seeds, n_items = len(runs), len(runs[0][0])
    full = list(range(n_items))
    diff = sum(_ratio(a, full) - _ratio(b, full) for a, b in runs) / n_seeds
    draws = []
    for _ in range(reps):
        drawn = [seed_rng.randrange(n_seeds) for _ in range(n_seeds)] if n_seeds > 1 else [0]
        idx = [rng.randrange(n_items) for _ in range(n_items)]
        draws.append(sum(_ratio(runs[s][0], idx) - _ratio(runs[s][1], idx) for s in drawn) / len(drawn))
    low, high = _percentiles(draws)
    return {"diff": diff, "ci_low": low, "ci_high": high, "items": n_items, "seeds": n_seeds}
