"""The tests behind the sensors hold their stated error rates on simulated data with known truth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from distill.drift import stats


def test_wilson_interval_covers_the_true_rate_at_its_level():
    rng = np.random.default_rng(0)
    n, p = 200, 0.9
    hits = [lo <= p <= hi for lo, hi in (stats.wilson_interval(int(k), n, 0.95) for k in rng.binomial(n, p, 2000))]
    assert 0.93 <= np.mean(hits) <= 0.97
    assert stats.wilson_interval(0, 50)[0] == 0.0 and stats.wilson_interval(50, 50)[1] == 1.0


def test_proportion_drop_test_false_alarm_rate_is_at_most_alpha():
    rng = np.random.default_rng(1)
    n, nb, p = 300, 1000, 0.85
    # Under H0 (no drop): the baseline itself is an estimate with its own noise.
    pvals = [stats.proportion_drop_test(int(k), n, kb / nb, nb)["p_value"]
             for k, kb in zip(rng.binomial(n, p, 3000), rng.binomial(nb, p, 3000))]
    assert np.mean(np.array(pvals) < 0.05) <= 0.06
    # A 10-point drop on 300 requests is found almost always.
    drops = [stats.proportion_drop_test(int(k), n, p, nb)["p_value"] for k in rng.binomial(n, p - 0.10, 500)]
    assert np.mean(np.array(drops) < 0.01) > 0.95


def test_margin_and_interval():
    t = stats.proportion_drop_test(86, 100, 0.90, 1000, margin=0.05)
    assert t["p_value"] > 0.3  # 4 points down, within a 5-point margin
    lo, hi = t["ci"]
    assert t["difference"] == pytest.approx(-0.04) and lo < t["difference"] < hi
    exact = stats.proportion_drop_test(86, 100, 0.90, None)
    assert "fixed baseline" in exact["test"] and exact["ci"][1] - exact["ci"][0] < hi - lo


def test_mann_kendall_exact_matches_enumeration_and_minimum_p():
    t = stats.mann_kendall_decrease([4, 3, 2, 1])
    assert t["s"] == -6 and t["p_value"] == pytest.approx(1 / 24) and t["min_p"] == pytest.approx(1 / 24)
    assert stats.mann_kendall_decrease([3, 2, 1])["p_value"] == pytest.approx(1 / 6)
    up = stats.mann_kendall_decrease([1, 2, 3, 4, 5])
    assert up["p_value"] == pytest.approx(1.0)
    # the exact null over 5 distinct values: P(S <= s) equals the share of orderings with S <= s
    x = [0.5, 0.9, 0.1, 0.7, 0.3]
    s = stats.mann_kendall_decrease(x)
    count = sum(1 for p in itertools.permutations(range(5))
                if sum((p[j] > p[i]) - (p[j] < p[i]) for i in range(5) for j in range(i + 1, 5)) <= s["s"])
    assert s["p_value"] == pytest.approx(count / math.factorial(5))
    long = stats.mann_kendall_decrease(list(range(20, 0, -1)))
    assert "normal" in long["test"] and long["p_value"] < 1e-4


def test_bootstrap_ci_contains_the_mean():
    x = np.random.default_rng(2).normal(1.0, 1.0, 400)
    lo, hi = stats.bootstrap_ci(x, resamples=500)
    assert lo < x.mean() < hi and hi - lo < 0.3


def test_mmd_permutation_p_value_is_uniform_under_the_null():
    rng = np.random.default_rng(3)
    pvals = [stats.mmd_permutation_test(rng.normal(size=(40, 3)), rng.normal(size=(40, 3)), permutations=99,
                                        seed=i)[1] for i in range(60)]
    assert np.mean(np.array(pvals) < 0.05) <= 0.12
    _, p = stats.mmd_permutation_test(rng.normal(size=(40, 3)), rng.normal(1.0, size=(40, 3)), permutations=99)
    assert p < 0.05
