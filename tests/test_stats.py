"""cctuning/stats.py: every interval, each against a value computed another way."""

import math
import random

import pytest

from cctuning.errors import CCError
from cctuning.stats import (
    accuracy_summary,
    bootstrap_ratio,
    mean_interval,
    paired_bootstrap_mean,
    two_level_bootstrap,
    wilson_interval,
)


def test_mean_interval_uses_the_closed_form_t_quantiles():
    # Student's t has closed forms at 1 and 2 degrees of freedom: tan(π(q − ½)) and (2q−1)·√(2/(4q(1−q)))
    q = 0.975
    t1 = math.tan(math.pi * (q - 0.5))
    t2 = (2 * q - 1) * math.sqrt(2 / (4 * q * (1 - q)))
    two = mean_interval([1.0, 3.0])  # mean 2, sd √2
    assert two["ci_high"] - 2.0 == pytest.approx(t1 * math.sqrt(2) / math.sqrt(2), rel=1e-9)
    three = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert three["mean"] == 2.0
    assert three["ci_low"] == pytest.approx(2 - t2 / math.sqrt(3), rel=1e-9)
    assert three["ci_high"] == pytest.approx(2 + t2 / math.sqrt(3), rel=1e-9)
    assert mean_interval([5.0]) == {"mean": 5.0, "ci_low": None, "ci_high": None, "n": 1}
    with pytest.raises(CCError):
        mean_interval([])


def test_mean_interval_is_clipped_to_its_bounds():
    m = mean_interval([0.0, 1.0], low=0.0, high=1.0)
    assert m["ci_low"] == 0.0 and m["ci_high"] == 1.0 and m["mean"] == 0.5
    # many seeds: the quantile tends to the normal 1.95996
    values = [float(i % 2) for i in range(2000)]
    half = mean_interval(values)["ci_high"] - 0.5
    sd = math.sqrt(sum((v - 0.5) ** 2 for v in values) / 1999)
    assert half == pytest.approx(1.959964 * sd / math.sqrt(2000), rel=1e-3)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (9, 10), (37, 72), (72, 72)])
def test_wilson_interval_solves_the_score_equation(k, n):
    """The Wilson bounds are the p where |k/n − p| = z·sqrt(p(1−p)/n)."""
    low, high = wilson_interval(k, n)
    z = 1.959964
    for p in (low, high):
        if 0 < p < 1:
            assert abs(abs(k / n - p) - z * math.sqrt(p * (1 - p) / n)) < 1e-6
    assert low <= k / n <= high
    assert (low == 0) == (k == 0) and (high == 1) == (k == n)
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_accuracy_summary_counts():
    s = accuracy_summary([True, False, True, True])
    assert (s["accuracy"], s["correct"], s["n"]) == (0.75, 3, 4)
    assert (s["ci_low"], s["ci_high"]) == wilson_interval(3, 4)


def test_paired_bootstrap_mean_counts_and_brackets():
    rng = random.Random(0)
    a = [rng.random() < 0.7 for _ in range(200)]
    b = [rng.random() < 0.3 for _ in range(200)]
    m = paired_bootstrap_mean(a, b, reps=500, seed=1)
    assert m["margin"] == pytest.approx((sum(a) - sum(b)) / 200)
    assert m["ci_low"] < m["margin"] < m["ci_high"]
    assert m["ci_low"] > 0.2  # a 40-point gap on 200 items is far from zero
    same = paired_bootstrap_mean(a, a, reps=100, seed=1)
    assert same["margin"] == same["ci_low"] == same["ci_high"] == 0
    with pytest.raises(CCError):
        paired_bootstrap_mean(a, b[:3], reps=10, seed=0)


def test_paired_bootstrap_mean_equals_a_bootstrap_written_out():
    a, b = [True, False, True, True, False], [False, False, True, False, False]
    reps, seed = 300, 4
    rng = random.Random(seed)
    d = [int(x) - int(y) for x, y in zip(a, b)]
    draws = sorted(sum(d[rng.randrange(5)] for _ in range(5)) / 5 for _ in range(reps))
    m = paired_bootstrap_mean(a, b, reps=reps, seed=seed)
    assert (m["ci_low"], m["ci_high"]) == (draws[int(0.025 * reps)], draws[int(0.975 * reps)])


def test_bootstrap_ratio_by_hand():
    # two items: resamples can only give {a,a}, {a,b}, {b,b}: ratios 1.0, 1.5 (or 2.0 via b,b)
    low, high = bootstrap_ratio([1.0, 4.0], [1, 2], reps=400, seed=0)
    assert low == 1.0 and high == 2.0
    assert bootstrap_ratio([3.0], [2]) == (1.5, 1.5)


def test_two_level_bootstrap_equals_a_bootstrap_written_out():
    gen = random.Random(11)
    runs = [
        (
            [(gen.random(), gen.randint(1, 4)) for _ in range(7)],
            [(gen.random(), gen.randint(1, 4)) for _ in range(7)],
        )
        for _ in range(3)
    ]
    reps = 200
    out = two_level_bootstrap(runs, reps, random.Random(3), random.Random("s"))

    def ratio(rows, idx):
        return sum(rows[i][0] for i in idx) / sum(rows[i][1] for i in idx)

    items, seeds = random.Random(3), random.Random("s")
    draws = []
    for _ in range(reps):
        picked = [seeds.randrange(3) for _ in range(3)]
        idx = [items.randrange(7) for _ in range(7)]
        draws.append(sum(ratio(runs[s][0], idx) - ratio(runs[s][1], idx) for s in picked) / 3)
    draws.sort()
    full = range(7)
    assert out["diff"] == pytest.approx(sum(ratio(a, full) - ratio(b, full) for a, b in runs) / 3)
    assert (out["ci_low"], out["ci_high"]) == (draws[int(0.025 * reps)], draws[int(0.975 * reps)])
    assert (out["items"], out["seeds"]) == (7, 3)
