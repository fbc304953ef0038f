"""Pure metric functions on arrays: accuracy, agreement, per-label scores, calibration, entropy.

Every function takes plain numpy arrays (or lists) and returns floats or small
dicts, so the evaluation stage, the drift sensors and the tests share one
definition of each measure.

Conventions:
- `probs` is [n, k] with rows summing to 1; `y` holds integer class indices.
- Calibration is measured on the top label: confidence = max prob, correct =
  (argmax == y). The binned measures take (confidence, correct) pairs so that
  generative students (sequence or label-token probabilities, see
  `distill.evaluate.calibration.sequence_confidence`) are measured by the same code.
- Equal-width bins over [0, 1]; a confidence on an inner edge falls into the
  lower bin and bin 0 also holds 0.0 (the convention of scikit-learn's
  `calibration_curve`, so the two agree where they overlap).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Share of positions where `y_pred` equals `y_true` (NaN for empty input)."""
    a, b = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    return float(np.mean(a == b)) if len(a) else math.nan


def agreement(a: Sequence, b: Sequence) -> float:
    """Share of inputs on which two models give the same answer."""
    return accuracy(a, b)


def per_label_scores(y_true: Sequence[str], y_pred: Sequence[str], labels: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support per label.

    Args:
        y_true: gold labels.
        y_pred: predicted labels (a prediction outside `labels` counts as wrong everywhere).
        labels: the label set, in report order.
    Returns:
        {label: {"precision", "recall", "f1", "support"}}
    """
    # scikit-learn rather than Hugging Face `evaluate`: `evaluate.load(...)` fetches its
    # metric scripts from the hub at run time, which is impossible offline.
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(list(y_true), list(y_pred), labels=labels, zero_division=0)
    return {l: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, l in enumerate(labels)}


def macro_f1(per_label: dict[str, dict]) -> float:
    """Unweighted mean F1 over labels that occur in the gold set."""
    values = [v["f1"] for v in per_label.values() if v["support"] > 0]
    return float(np.mean(values)) if values else math.nan


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: list[str]) -> np.ndarray:
    """Confusion matrix [gold, predicted] over `labels` (predictions outside the set are dropped)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(list(y_true), list(y_pred), labels=labels)


def top_label(probs: np.ndarray, y: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of the top label per row: the pairs the binned measures use."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)


def reliability_bins(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width bins of confidence with their accuracy.

    Returns:
        {"edges" [n_bins+1], "count" [n_bins], "confidence" (mean per bin), "accuracy" (per bin)};
        empty bins hold NaN confidence and accuracy.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.shape != corr.shape:
        raise ValueError(f"length mismatch: {conf.shape} vs {corr.shape}")
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(ids, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(ids, weights=conf, minlength=n_bins)
    sum_corr = np.bincount(ids, weights=corr, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        acc = np.where(count > 0, sum_corr / count, np.nan)
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc}


def ece(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 15) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - mean confidence|."""
    b = reliability_bins(confidence, correct, n_bins)
    n = b["count"].sum()
    if n == 0:
        return math.nan
    gaps = np.abs(b["accuracy"] - b["confidence"])
    return float(np.nansum(b["count"] / n * gaps))


def mce(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 15) -> float:
    """Maximum calibration error: the largest |accuracy - mean confidence| over non-empty bins."""
    b = reliability_bins(confidence, correct, n_bins)
    gaps = np.abs(b["accuracy"] - b["confidence"])[b["count"] > 0]
    return float(gaps.max()) if gaps.size else math.nan


def brier(probs: np.ndarray, y: Sequence[int]) -> float:
    """Multiclass Brier score: mean over rows of sum_k (p_k - 1[k == y])^2, in [0, 2]."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return math.nan
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def nll(probs: np.ndarray, y: Sequence[int], eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return math.nan
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0))))


def mean_entropy(probs: np.ndarray) -> float:
    """Mean Shannon entropy (nats) of each row's predicted distribution.

    Tracked per run: a cycle-over-cycle fall means the student is growing more
    certain on the same inputs (entropy collapse), which calibration alone can hide.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.size == 0:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
    return float(h.mean())


def label_entropy(y_pred: Sequence) -> float:
    """Entropy (nats) of the histogram of predicted labels: falls when predictions pile onto few labels."""
    _, counts = np.unique(np.asarray([str(x) for x in y_pred]), return_counts=True)
    if counts.sum() == 0:
        return math.nan
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def percentiles(values_ms: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """{"p50": ..., "p95": ..., "p99": ...} by linear interpolation (NaN for no values)."""
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        return {f"p{int(q)}": math.nan for q in qs}
    return {f"p{int(q)}": float(np.percentile(v, q)) for q in qs}
