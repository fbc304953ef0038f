"""Drift sensors: pure statistics that decide when the student needs re-distilling.

Each sensor returns a dict {"sensor", "fired": bool, "value", ...} with the
numbers it judged, so the drift-watch flow can put them in an event payload and
a report unchanged. A sensor that lacks the data to judge returns fired=False
with a "reason"; it never guesses.

- accuracy_drop: holdout accuracy now vs at promotion.
- entropy_collapse: prediction entropy falling cycle after cycle while accuracy
  does not improve (re-distilling on its own outputs sharpens a model without
  making it right).
- divergence: student-teacher disagreement (and KL) on live traffic vs baseline.
- input_drift: recent traffic vs training inputs, by a kernel two-sample (MMD)
  permutation test on sentence embeddings, or on text statistics without an
  encoder (PSI per statistic is reported alongside).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def accuracy_drop(baseline_acc: float | None, current_acc: float | None, threshold: float) -> dict:
    """Fires when accuracy fell by more than `threshold` (absolute) since promotion.

    Args:
        baseline_acc: holdout accuracy recorded at promotion.
        current_acc: holdout accuracy of the same model now.
        threshold: largest tolerated drop, e.g. 0.05 for 5 points.
    """
    out = {"sensor": "accuracy_drop", "baseline": baseline_acc, "current": current_acc, "threshold": threshold}
    if baseline_acc is None or current_acc is None:
        return {**out, "fired": False, "value": None, "reason": "no baseline or current accuracy"}
    drop = float(baseline_acc) - float(current_acc)
    return {**out, "fired": bool(drop > threshold), "value": drop}


def entropy_collapse(entropies: Sequence[float], accuracies: Sequence[float], window: int,
                     min_gain: float = 0.0) -> dict:
    """Fires when mean prediction entropy decreased at every step of the last `window` cycles
    while accuracy over the same cycles gained no more than `min_gain`.

    Args:
        entropies: mean prediction entropy (nats) per cycle, oldest first.
        accuracies: accuracy per cycle, aligned with `entropies`.
        window: number of cycles judged (window - 1 consecutive decreases).
        min_gain: accuracy gain over the window that counts as real improvement.
    """
    if len(entropies) != len(accuracies):
        raise ValueError("entropies and accuracies must have the same length")
    out = {"sensor": "entropy_collapse", "window": window, "entropies": [float(e) for e in entropies[-window:]],
           "accuracies": [float(a) for a in accuracies[-window:]]}
    if window < 2 or len(entropies) < window:
        return {**out, "fired": False, "value": None, "reason": f"{len(entropies)} cycles, {window} needed"}
    e = np.asarray(entropies[-window:], dtype=float)
    a = np.asarray(accuracies[-window:], dtype=float)
    falling = bool(np.all(np.diff(e) < 0))
    gain = float(a[-1] - a[0])
    return {**out, "fired": bool(falling and gain <= min_gain), "value": float(e[0] - e[-1]),
            "monotone": falling, "accuracy_gain": gain}


def _as_probs(x) -> np.ndarray:
    p = np.asarray(x, dtype=float)
    if p.ndim != 2:
        raise ValueError("probabilities must be a 2-D array [n, labels]")
    return p / p.sum(axis=1, keepdims=True)


def divergence(student_probs, teacher_probs, baseline_disagreement: float | None, max_increase: float,
               min_samples: int = 30) -> dict:
    """Fires when the student-teacher disagreement rate rose by more than `max_increase`.

    Args:
        student_probs: [n, k] student label distributions on recent traffic.
        teacher_probs: [n, k] teacher distributions on the same requests, same label order.
        baseline_disagreement: disagreement rate at promotion (1 - agreement on the holdout).
        max_increase: tolerated absolute rise of the disagreement rate.
        min_samples: fewer paired requests than this are not judged (too noisy).
    Returns also "kl" (mean KL(teacher || student), nats) and "n".
    """
    s, t = _as_probs(student_probs), _as_probs(teacher_probs)
    if s.shape != t.shape:
        raise ValueError(f"student {s.shape} and teacher {t.shape} probabilities differ in shape")
    out = {"sensor": "divergence", "baseline": baseline_disagreement, "max_increase": max_increase, "n": len(s)}
    if len(s) == 0:
        return {**out, "fired": False, "value": None, "kl": None, "reason": "no paired requests"}
    rate = float(np.mean(s.argmax(1) != t.argmax(1)))
    eps = 1e-12
    kl = float(np.mean(np.sum(t * (np.log(t + eps) - np.log(s + eps)), axis=1)))
    out.update(value=rate, kl=kl)
    if len(s) < min_samples:
        return {**out, "fired": False, "reason": f"{len(s)} paired requests, {min_samples} needed"}
    if baseline_disagreement is None:
        return {**out, "fired": False, "reason": "no baseline disagreement"}
    return {**out, "fired": bool(rate - baseline_disagreement > max_increase),
            "increase": rate - baseline_disagreement}


def text_stats(texts: Sequence[str]) -> np.ndarray:
    """Per-text statistics [n, 6]: log length, word count, mean word length, and the shares of
    digits, upper-case letters and non-ASCII characters."""
    rows = []
    for t in texts:
        n = max(len(t), 1)
        words = t.split()
        rows.append([
            np.log1p(len(t)), len(words), (sum(len(w) for w in words) / len(words)) if words else 0.0,
            sum(c.isdigit() for c in t) / n, sum(c.isupper() for c in t) / n, sum(ord(c) > 127 for c in t) / n,
        ])
    return np.asarray(rows, dtype=float).reshape(len(rows), 6)


TEXT_STAT_NAMES = ("log_chars", "words", "mean_word_len", "digit_share", "upper_share", "non_ascii_share")


def psi(reference: np.ndarray, recent: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of one feature, on the reference's inner quantile cut points.

    Cut points are deduplicated, so a feature with a point mass (e.g. digit share, mostly 0)
    gets a bin of its own for that value instead of collapsing into one bin.
    """
    cuts = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(cuts, reference, side="left"), minlength=len(cuts) + 1) / len(reference)
    q = np.bincount(np.searchsorted(cuts, recent, side="left"), minlength=len(cuts) + 1) / len(recent)
    p, q = p + eps, q + eps
    return float(np.sum((q - p) * np.log(q / p)))


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


def input_drift(reference_texts: Sequence[str], recent_texts: Sequence[str], p_value: float,
                embed: Callable[[list[str]], np.ndarray] | None = None, *, min_recent: int = 1,
                max_samples: int = 500, permutations: int = 200, seed: int = 0) -> dict:
    """Fires when recent inputs differ from the training inputs at significance `p_value`.

    Args:
        reference_texts: training inputs (what the student learned from).
        recent_texts: recent traffic.
        p_value: significance level of the MMD permutation test.
        embed: texts -> [n, d] embeddings (e.g. SentenceEncoder(...).encode); None tests the
            standardised text statistics instead.
        min_recent: fewer recent texts than this are not judged.
        max_samples: each side is randomly subsampled to this many texts (the test is O(n^2)).
        permutations: permutations of the test.
        seed: subsampling and permutation seed.
    Returns also "p_value" (the test's), "alpha", "mmd2", "method", and "psi" {statistic: PSI}.
    """
    if 1.0 / (1 + permutations) > p_value:
        raise ValueError(f"{permutations} permutations cannot reach p < {p_value}; use more permutations")
    out = {"sensor": "input_drift", "alpha": p_value, "n_reference": len(reference_texts),
           "n_recent": len(recent_texts)}
    if len(recent_texts) < max(min_recent, 2) or len(reference_texts) < 2:
        return {**out, "fired": False, "value": None, "p_value": None,
                "reason": f"{len(recent_texts)} recent inputs, {max(min_recent, 2)} needed"}
    rng = np.random.default_rng(seed)

    def sample(texts):
        texts = list(texts)
        if len(texts) <= max_samples:
            return texts
        return [texts[i] for i in sorted(rng.choice(len(texts), max_samples, replace=False))]

    ref, new = sample(reference_texts), sample(recent_texts)
    ref_stats, new_stats = text_stats(ref), text_stats(new)
    psis = {name: psi(ref_stats[:, i], new_stats[:, i]) for i, name in enumerate(TEXT_STAT_NAMES)}
    if embed is not None:
        x, y = np.asarray(embed(ref)), np.asarray(embed(new))
        method = "mmd-embeddings"
    else:
        mu, sd = ref_stats.mean(0), ref_stats.std(0) + 1e-9
        x, y = (ref_stats - mu) / sd, (new_stats - mu) / sd
        method = "mmd-text-stats"
    mmd2, p = mmd_permutation_test(x, y, permutations=permutations, seed=seed)
    return {**out, "fired": bool(p < p_value), "value": mmd2, "mmd2": mmd2, "p_value": p, "method": method,
            "psi": psis, "max_psi": max(psis.values())}


# --- inputs of the sensors, from the traffic log -------------------------------------------------


def paired_probs(rows: Sequence[dict], labels: Sequence[str], student: str = "champion"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] student and teacher distributions (label order `labels`) of the logged requests
    where both answered; labels missing from a logged distribution count as probability 0."""
    s_rows, t_rows = [], []
    for r in rows:
        s, t = r.get(f"{student}_probs"), r.get("teacher_probs")
        if isinstance(s, dict) and isinstance(t, dict) and s and t:
            s_rows.append([float(s.get(l, 0.0)) for l in labels])
            t_rows.append([float(t.get(l, 0.0)) for l in labels])
    k = len(labels)
    return np.asarray(s_rows, dtype=float).reshape(-1, k), np.asarray(t_rows, dtype=float).reshape(-1, k)


def cycle_series(history: Sequence[dict], current_model: str, current_entropy: float, current_accuracy: float
                 ) -> tuple[list[float], list[float]]:
    """Holdout entropy and accuracy per distillation cycle, oldest first, ending with the current model.

    A cycle is one model: several watches of the same model keep only its latest measurement,
    so watching more often never looks like a trend.
    """
    latest: dict[str, tuple[float, float]] = {}
    for h in history:
        if h.get("model_run") and h.get("holdout_entropy") is not None and h.get("holdout_accuracy") is not None:
            latest.pop(h["model_run"], None)  # re-insert: order by last appearance
            latest[h["model_run"]] = (float(h["holdout_entropy"]), float(h["holdout_accuracy"]))
    latest.pop(current_model, None)
    latest[current_model] = (float(current_entropy), float(current_accuracy))
    return [e for e, _ in latest.values()], [a for _, a in latest.values()]


def render_report(results: dict[str, dict], context: dict) -> str:
    """Markdown report of one drift watch (the flow's artifact)."""
    fired = [n for n, r in results.items() if r["fired"]]
    head = f"**Drift detected: {', '.join(fired)}**" if fired else "No drift detected."
    lines = ["# Drift watch", "", head, ""]
    lines += [f"- {k}: `{v}`" for k, v in context.items()]
    lines += ["", "| sensor | fired | value | detail |", "|---|---|---:|---|"]
    for name, r in results.items():
        v = r.get("value")
        value = "n/a" if v is None else f"{v:.4f}"
        if "reason" in r:
            detail = r["reason"]
        elif name == "accuracy_drop":
            detail = f"baseline {r['baseline']:.4f}, now {r['current']:.4f}, limit {r['threshold']}"
        elif name == "entropy_collapse":
            detail = (f"entropies {', '.join(f'{e:.3f}' for e in r['entropies'])}; accuracy gain "
                      f"{r['accuracy_gain']:+.4f}")
        elif name == "divergence":
            detail = f"baseline {r['baseline']:.4f}, KL {r['kl']:.4f}, n {r['n']}"
        else:
            detail = f"p = {r['p_value']:.4f} (alpha {r['alpha']}), {r['method']}, max PSI {r['max_psi']:.3f}"
        lines.append(f"| {name} | {'**yes**' if r['fired'] else 'no'} | {value} | {detail} |")
    return "\n".join(lines) + "\n"
