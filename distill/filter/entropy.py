"""Teacher uncertainty: drop the rows whose label-distribution (or mean token) entropy is highest.
"""

from __future__ import annotations

import math

from distill.config import (
    EntropyConfig,
    TaskConfig,
)
from distill.filter.dedup import dedup  # noqa: F401  (the dedup stage lives with its algorithms)
from distill.filter.rows import Rows, near_row, reject_row


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy for a list."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def entropy_filter(rows: Rows, config: EntropyConfig, task: TaskConfig | None = None) -> tuple[Rows, Rows]:
    """Drop rows where the teacher was uncertain.

    The thresholds are `config.max_entropy` (absolute, nats) and the (100 - drop_percentile)-th
    percentile of the rows' entropies; with both set the lower one applies, so a row above either is
    dropped. Rows strictly above it are dropped (so ties never drop everything).
    Rows without an entropy (no logprobs) are kept. A kept row is marked near the threshold when
    its entropy is above 0.8 x the absolute threshold, or above the (100 - 2 x drop_percentile)-th
    percentile.

    Args:
        rows: candidate rows with "entropy" (nats).
        config: entropy section.
        task: unused; every stage takes it so the pipeline calls stages uniformly.
    """
    values = [r["entropy"] for r in rows if r.get("entropy") is not None]
    if not values:
        return list(rows), []
    limits = []  # (threshold, band, how); with both set, a row above either one is dropped
    if config.max_entropy is not None:
        limits.append((config.max_entropy, 0.8 * config.max_entropy, "max_entropy"))
    if config.drop_percentile:
        limits.append((_percentile(values, 100 - config.drop_percentile),
                       _percentile(values, max(0.0, 100 - 2 * config.drop_percentile)),
                       f"{100 - config.drop_percentile:g}th percentile"))
    if not limits:
        return list(rows), []
    threshold, band, how = min(limits)
    kept, rejected = [], []
    for row in rows:
        e = row.get("entropy")
        if e is not None and e > threshold:
            rejected.append(reject_row(row, "entropy", f"entropy: {e:.3f} nats > {threshold:.3f} ({how})"))
        elif e is not None and e >= band and band < threshold:
            kept.append(near_row(row, "entropy"))
        else:
            kept.append(row)
    return kept, rejected
