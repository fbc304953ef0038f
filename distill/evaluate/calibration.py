"""Temperature scaling and reliability diagrams.

Temperature scaling (Guo et al., 2017) divides a classifier's logits by one
scalar T fitted to minimise negative log-likelihood on held-out validation rows.
It changes confidence, never the argmax, so accuracy is untouched. It is fitted
on the validation split only: fitting on the gold holdout would make the
reported ECE optimistic.

For generative students there are no class logits; `sequence_confidence` and
`label_token_confidence` turn an OpenAI-style logprobs list into a confidence in
[0, 1] that the binned measures of `distill.evaluate.metrics` accept as is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill.evaluate import metrics
from distill.models.encoders import softmax


def fit_temperature(logits: np.ndarray, y: Sequence[int], bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature that minimises NLL of `y` under softmax(logits / T).

    Args:
        logits: [n, k] validation logits.
        y: [n] true class indices.
        bounds: search range for T; optimised over log T, which is smooth and
            unimodal in practice, so a bounded scalar search is enough.
    Returns:
        T (1.0 when there are no rows).
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    if logits.ndim != 2 or logits.shape[0] != len(y):
        raise ValueError(f"logits {logits.shape} do not match {len(y)} labels")

    def loss(log_t: float) -> float:
        return metrics.nll(softmax(logits, math.exp(log_t)), y)

    res = minimize_scalar(loss, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    t = float(math.exp(res.x))
    # Never return a temperature that is worse than leaving the model alone.
    return t if loss(res.x) <= loss(0.0) else 1.0


def sequence_confidence(logprobs: list[dict[str, Any]] | None) -> float | None:
    """Probability of a whole generated answer: exp(sum of its token logprobs)."""
    if not logprobs:
        return None
    return float(math.exp(sum(t["logprob"] for t in logprobs)))


def label_token_confidence(logprobs: list[dict[str, Any]] | None) -> float | None:
    """Probability of the first answer token, the one that decides the label of a generative classifier."""
    if not logprobs:
        return None
    return float(math.exp(logprobs[0]["logprob"]))


def generative_calibration(responses: Sequence[str | None], golds: Sequence[str],
                           logprobs: Sequence[list[dict[str, Any]] | None], n_bins: int = 15,
                           mode: str = "sequence") -> dict[str, Any]:
    """Calibration of a generative student's answers from their logprobs.

    Args:
        responses: the generated answers.
        golds: the gold answers; an answer is correct when it equals the gold after
            stripping and lower-casing.
        logprobs: each answer's OpenAI-style logprobs content list (None: no confidence, row skipped).
        n_bins: equal-width bins.
        mode: "sequence" (probability of the whole answer) or "label_token" (of its first token).
    Returns:
        {"n", "ece", "mce", "brier" (binary: mean (confidence - correct)^2), "confidence", "correct"}.
    """
    if mode not in ("sequence", "label_token"):
        raise ValueError("mode must be 'sequence' or 'label_token'")
    read = sequence_confidence if mode == "sequence" else label_token_confidence
    conf, corr = [], []
    for response, gold, lp in zip(responses, golds, logprobs):
        c = read(lp)
        if c is None:
            continue
        conf.append(min(max(c, 0.0), 1.0))
        corr.append(float(response is not None and response.strip().lower() == str(gold).strip().lower()))
    conf_a, corr_a = np.array(conf), np.array(corr)
    return {"n": len(conf), "ece": metrics.ece(conf_a, corr_a, n_bins), "mce": metrics.mce(conf_a, corr_a, n_bins),
            "brier": float(np.mean((conf_a - corr_a) ** 2)) if conf else math.nan,
            "confidence": conf_a, "correct": corr_a}


def reliability_diagram(confidence: Sequence[float], correct: Sequence[float], path: str | Path,
                        n_bins: int = 15, title: str = "Reliability") -> Path:
    """Write a reliability diagram PNG (accuracy per confidence bin against the diagonal).

    Args:
        confidence: top-label confidences in [0, 1].
        correct: 1.0 where the top label was right, else 0.0.
        path: PNG to write (atomically).
        n_bins: equal-width bins, the same as the ECE's.
        title: plot title; the ECE is appended.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = metrics.reliability_bins(confidence, correct, n_bins)
    e = metrics.ece(confidence, correct, n_bins)
    edges = b["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    filled = b["count"] > 0  # empty bins have no accuracy to draw
    acc, conf, at = b["accuracy"][filled], b["confidence"][filled], centers[filled]
    ax.bar(at, acc, width=width * 0.95, color="#4878d0", edgecolor="black", label="accuracy")
    ax.bar(at, conf - acc, bottom=acc, width=width * 0.95, color="#ee854a", alpha=0.45,
           edgecolor="#d65f5f", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {e:.3f}, n={int(b['count'].sum())})")
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centers, b["count"], width=width * 0.95, color="grey")
    axh.set_xlabel("confidence")
    axh.set_ylabel("rows")
    axh.set_xlim(0, 1)
    fig.tight_layout()
    return _save(fig, path)


def confusion_plot(matrix: np.ndarray, labels: list[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Write a row-normalised confusion matrix heatmap PNG (gold rows, predicted columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    size = min(4 + 0.12 * len(labels), 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    fontsize = 8 if len(labels) <= 20 else 4
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import os
    import tempfile

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
