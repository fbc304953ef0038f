"""The tests behind the drift sensors: each returns the statistic, its p-value or interval,
and nothing that depends on a threshold chosen after looking at the data.

- proportion_drop_test: one-sided two-proportion z test that a rate (agreement, accuracy)
  fell by more than a margin below its baseline, with a Newcombe (Wilson-based) interval
  for the difference; a baseline without a sample size is taken as exact.
- wilson_interval: the score interval of one proportion.
- bootstrap_ci: percentile bootstrap interval of any statistic of a sample.
- mann_kendall_decrease: Kendall's trend test for a decreasing series, exact (all
  permutations) up to 8 points, normal approximation beyond.
- mmd_permutation_test: squared MMD with an RBF kernel and its permutation p-value.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """Inverse of the standard normal CDF (bisection: exact enough, no scipy in the core)."""
    lo, hi = -12.0, 12.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if normal_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (well behaved near 0 and 1, unlike Wald's)."""
    if n <= 0:
        raise ValueError("n must be positive")
    z = normal_quantile(1 - (1 - confidence) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_drop_test(k: int, n: int, baseline: float, baseline_n: int | None, margin: float = 0.0,
                         confidence: float = 0.95) -> dict:
    """Is the current rate k/n lower than `baseline - margin`? One-sided two-proportion z test.

    H0: p_now >= baseline - margin; H1: p_now < baseline - margin. The variance is the
    unpooled one (the two rates are not assumed equal under a margin). With `baseline_n`
    None the baseline is treated as known exactly (a one-sample test).

    Returns {"test", "p_value", "rate", "baseline", "difference", "ci" (Newcombe interval of
    rate - baseline at `confidence`), "z", "n", "baseline_n", "margin"}.
    """
    if n <= 0:
        raise ValueError("n must be positive")
    rate = k / n
    var = rate * (1 - rate) / n
    lo_now, hi_now = wilson_interval(k, n, confidence)
    if baseline_n:
        var += baseline * (1 - baseline) / baseline_n
        kb = round(baseline * baseline_n)
        lo_b, hi_b = wilson_interval(kb, baseline_n, confidence)
        # Newcombe's hybrid score interval for a difference of two independent proportions.
        d = rate - baseline
        ci = (d - math.sqrt((rate - lo_now) ** 2 + (hi_b - baseline) ** 2),
              d + math.sqrt((hi_now - rate) ** 2 + (baseline - lo_b) ** 2))
        test = "two-proportion z test (one-sided)"
    else:
        ci = (lo_now - baseline, hi_now - baseline)
        test = "one-sample z test against a fixed baseline (one-sided)"
    # A zero variance (all agree, or none) still has a Wilson interval; use its width as the floor.
    var = max(var, ((hi_now - lo_now) / (2 * normal_quantile(1 - (1 - confidence) / 2))) ** 2, 1e-12)
    z = (rate - (baseline - margin)) / math.sqrt(var)
    return {"test": test, "p_value": normal_cdf(z), "rate": rate, "baseline": float(baseline),
            "difference": rate - baseline, "ci": [float(ci[0]), float(ci[1])], "confidence": confidence,
            "z": z, "n": n, "baseline_n": baseline_n, "margin": margin}


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean,
                 resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over `values` (resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(x[rng.integers(0, len(x), len(x))]) for _ in range(resamples)])
    a = (1 - confidence) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def _kendall_s(x: Sequence[float]) -> int:
    return sum((x[j] > x[i]) - (x[j] < x[i]) for i in range(len(x)) for j in range(i + 1, len(x)))


def mann_kendall_decrease(series: Sequence[float]) -> dict:
    """Kendall's S of the series against time and the one-sided p-value of a decreasing trend.

    Exact (S over every ordering of the values, ties included) for up to 7 points, which is
    where a drift history of distillation cycles lives; the normal approximation with a
    continuity correction beyond. The smallest p-value n points can give is 1/n! exactly:
    3 cycles can never reach 0.05, 4 can (1/24).
    """
    x = [float(v) for v in series]
    n = len(x)
    if n < 2:
        raise ValueError("a trend needs at least 2 points")
    s = _kendall_s(x)
    if n <= 7:
        null = [_kendall_s(p) for p in itertools.permutations(x)]
        p = sum(1 for v in null if v <= s) / len(null)
        method = "exact"
    else:
        _, counts = np.unique(x, return_counts=True)
        var = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in counts)) / 18
        p = normal_cdf((s + 1) / math.sqrt(var)) if var > 0 else 1.0
        method = "normal"
    return {"test": f"Mann-Kendall trend test, decreasing (one-sided, {method})", "s": s, "p_value": float(p),
            "n": n, "min_p": 1 / math.factorial(n) if n <= 7 else None}


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Squared MMD (RBF kernel, median-distance bandwidth) and its permutation p-value.

    Args:
        x: [n, d] reference samples; y: [m, d] recent samples.
        permutations: random relabellings used for the null distribution.
    """
    z = np.vstack([x, y]).astype(np.float64)
    n, total = len(x), len(z)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    off = d2[np.triu_indices(total, k=1)]
    med = np.median(off[off > 0]) if np.any(off > 0) else 1.0
    k = np.exp(-d2 / med)
    rng = np.random.default_rng(seed)

    def weights(perm_rows: np.ndarray) -> np.ndarray:
        w = np.full(perm_rows.shape, -1.0 / (total - n))
        w[perm_rows < n] = 1.0 / n
        return w

    # w^T K w with w = +1/n on the first sample and -1/m on the second is the (biased) MMD^2.
    observed_w = weights(np.arange(total)[None, :])
    perms = np.argsort(rng.random((permutations, total)), axis=1)
    null_w = weights(perms)
    w = np.vstack([observed_w, null_w])
    stats = np.sum((w @ k) * w, axis=1)
    observed, null = stats[0], stats[1:]
    p = (1 + np.sum(null >= observed)) / (1 + permutations)
    return float(observed), float(p)
