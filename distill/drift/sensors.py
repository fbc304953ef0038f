"""Drift sensors: each one a stated statistical test that decides when the student needs re-distilling.

Each sensor returns a dict {"sensor", "fired": bool, "status", "value", "test", "p_value",
"alpha", "n", "min_n", ...} with the numbers it judged, so the drift-watch flow can put
them in an event payload and a report unchanged. status is "drift", "no drift" or
"not enough data": below its minimum sample size a sensor never fires, it says so.

- divergence: student-teacher agreement on a random, budgeted sample of recent traffic
  (teacher answers from the shadow log, or bought re-labels) against the champion's
  agreement at evaluation: one-sided two-proportion z test with a margin, Newcombe interval.
- accuracy_drop: the same test on gold accuracy, for the recent requests whose gold label
  arrived later (`distill feedback`).
- entropy_collapse: Mann-Kendall test of falling prediction entropy over distillation
  cycles (exact; at least `min_cycles`), while accuracy over those cycles does not improve.
- input_drift: recent traffic vs training inputs, by a kernel two-sample (MMD)
  permutation test on sentence embeddings, or on text statistics without an
  encoder (PSI per statistic is reported alongside).
- holdout_regression (a regression check, not a drift sensor): the frozen model on the
  static holdout against its registry accuracy; it can catch a broken export or runtime,
  never production drift, because neither the model nor that data changes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from distill.drift.stats import mann_kendall_decrease, mmd_permutation_test, proportion_drop_test

__all__ = ["accuracy_drop", "divergence", "entropy_collapse", "holdout_regression", "input_drift",
           "mmd_permutation_test", "render_report"]

NOT_ENOUGH = "not enough data"


def _verdict(out: dict, p_value: float, alpha: float) -> dict:
    fired = bool(p_value < alpha)
    return {**out, "fired": fired, "status": "drift" if fired else "no drift"}


def _too_few(out: dict, reason: str) -> dict:
    return {"value": None, "p_value": None, **out, "fired": False, "status": NOT_ENOUGH, "reason": reason}


def _rate_sensor(name: str, hits: int, n: int, baseline: float | None, baseline_n: int | None, margin: float,
                 alpha: float, min_n: int, what: str) -> dict:
    out = {"sensor": name, "n": n, "min_n": min_n, "alpha": alpha, "baseline": baseline, "baseline_n": baseline_n,
           "margin": margin, "test": "two-proportion z test (one-sided), H1: rate < baseline - margin"}
    if n < min_n:
        return _too_few({**out, "value": hits / n if n else None}, f"{n} {what}, {min_n} needed")
    if baseline is None:
        return _too_few({**out, "value": hits / n}, "no baseline from the champion's evaluation")
    t = proportion_drop_test(hits, n, float(baseline), baseline_n, margin, confidence=1 - 2 * alpha)
    out.update(value=t["rate"], p_value=t["p_value"], ci=t["ci"], confidence=t["confidence"], z=t["z"],
               difference=t["difference"], test=t["test"])
    return _verdict(out, t["p_value"], alpha)


def divergence(student_labels: Sequence, teacher_labels: Sequence, baseline_agreement: float | None,
               baseline_n: int | None, margin: float, alpha: float, min_samples: int = 100,
               kl: float | None = None) -> dict:
    """Fires when student-teacher agreement on recent traffic is significantly below the baseline.

    Args:
        student_labels, teacher_labels: the champion's and the teacher's labels on the same
            requests (a random sample of recent traffic; None entries are skipped).
        baseline_agreement: agreement at evaluation (registry metric `agreement`).
        baseline_n: holdout rows behind it (`n_holdout`); None treats the baseline as exact.
        margin: drop in agreement tolerated before it counts (the effect size that matters).
        alpha: significance level of the one-sided test.
        min_samples: fewer teacher-labelled requests than this report "not enough data".
        kl: mean KL(teacher || student) on the pairs, reported alongside when known.
    Returns also "disagreement" (1 - agreement) and the interval "ci" of agreement - baseline.
    """
    pairs = [(s, t) for s, t in zip(student_labels, teacher_labels) if s is not None and t is not None]
    hits = sum(s == t for s, t in pairs)
    out = _rate_sensor("divergence", hits, len(pairs), baseline_agreement, baseline_n, margin, alpha, min_samples,
                       "teacher-labelled requests")
    out["disagreement"] = None if out["value"] is None else 1 - out["value"]
    out["kl"] = kl
    return out


def accuracy_drop(predicted: Sequence, gold: Sequence, baseline_accuracy: float | None, baseline_n: int | None,
                  margin: float, alpha: float, min_samples: int = 100) -> dict:
    """Fires when accuracy on recent requests with late gold labels is significantly below the baseline.

    Args:
        predicted: the label the champion served; gold: the label that arrived later (None: none yet).
        baseline_accuracy: accuracy at evaluation (registry metric `student_accuracy`).
        baseline_n: holdout rows behind it; None treats the baseline as exact.
        margin, alpha, min_samples: as for divergence().
    """
    pairs = [(p, g) for p, g in zip(predicted, gold) if p is not None and g not in (None, "")]
    hits = sum(p == g for p, g in pairs)
    return _rate_sensor("accuracy_drop", hits, len(pairs), baseline_accuracy, baseline_n, margin, alpha,
                        min_samples, "requests with gold feedback")


def holdout_regression(baseline_accuracy: float | None, baseline_n: int | None, current_accuracy: float,
                       n: int, margin: float, alpha: float) -> dict:
    """Regression check: the same frozen model on the static holdout, against its registry accuracy.

    Reported apart from the drift sensors; it never starts a re-distillation.
    """
    out = _rate_sensor("holdout_regression", round(current_accuracy * n), n, baseline_accuracy, baseline_n,
                       margin, alpha, 1, "holdout rows")
    out["kind"] = "regression check"
    out["current"] = current_accuracy
    return out


def entropy_collapse(entropies: Sequence[float], accuracies: Sequence[float], min_cycles: int, alpha: float,
                     min_gain: float = 0.0) -> dict:
    """Fires when prediction entropy falls over the last cycles (Mann-Kendall, p < alpha) while
    accuracy over the same cycles does not rise significantly (same test) by more than `min_gain`.

    Re-distilling on its own outputs sharpens a model without making it right; one sharper
    cycle is noise, a significant trend over several is the signal.

    Args:
        entropies: mean prediction entropy (nats) per cycle, oldest first.
        accuracies: accuracy per cycle, aligned with `entropies`.
        min_cycles: fewer cycles than this report "not enough data" (4 is the least that can
            reach p < 0.05: the exact test's smallest p-value with n cycles is 1/n!).
        alpha: significance level of the trend test.
        min_gain: accuracy gain over the window that counts as real improvement.
    """
    if len(entropies) != len(accuracies):
        raise ValueError("entropies and accuracies must have the same length")
    window = max(min_cycles, min(len(entropies), 7))  # the exact test is cheap up to 7 points
    e = [float(x) for x in entropies[-window:]]
    a = [float(x) for x in accuracies[-window:]]
    out = {"sensor": "entropy_collapse", "n": len(entropies), "min_n": min_cycles, "alpha": alpha,
           "entropies": e, "accuracies": a}
    if len(entropies) < max(min_cycles, 2):
        return _too_few({**out, "test": "Mann-Kendall trend test, decreasing (one-sided)"},
                        f"{len(entropies)} cycles, {min_cycles} needed")
    t = mann_kendall_decrease(e)
    gain = a[-1] - a[0]
    # Improvement is judged by the same test on accuracy: a noisy uptick is not a better model.
    rising = mann_kendall_decrease([-x for x in a])["p_value"]
    out.update(value=e[0] - e[-1], p_value=t["p_value"], test=t["test"], kendall_s=t["s"], accuracy_gain=gain,
               accuracy_rise_p=rising)
    out = _verdict(out, t["p_value"], alpha)
    if out["fired"] and rising < alpha and gain > min_gain:
        out.update(fired=False, status="no drift",
                   reason=f"entropy fell, but accuracy rose {gain:+.4f} (trend p = {rising:.3g})")
    return out


def _as_probs(x) -> np.ndarray:
    p = np.asarray(x, dtype=float)
    if p.ndim != 2:
        raise ValueError("probabilities must be a 2-D array [n, labels]")
    return p / p.sum(axis=1, keepdims=True)


def mean_kl(student_probs, teacher_probs) -> float | None:
    """Mean KL(teacher || student) in nats over paired [n, k] distributions; None without pairs."""
    s, t = _as_probs(student_probs), _as_probs(teacher_probs)
    if s.shape != t.shape:
        raise ValueError(f"student {s.shape} and teacher {t.shape} probabilities differ in shape")
    if len(s) == 0:
        return None
    eps = 1e-12
    return float(np.mean(np.sum(t * (np.log(t + eps) - np.log(s + eps)), axis=1)))


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
           "n_recent": len(recent_texts), "n": len(recent_texts), "min_n": max(min_recent, 2),
           "test": f"MMD permutation test ({permutations} permutations)"}
    if len(recent_texts) < max(min_recent, 2) or len(reference_texts) < 2:
        return _too_few(out, f"{len(recent_texts)} recent inputs, {max(min_recent, 2)} needed")
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
    return _verdict({**out, "value": mmd2, "mmd2": mmd2, "p_value": p, "method": method, "psi": psis,
                     "max_psi": max(psis.values()), "test": f"MMD permutation test on {method[4:]} "
                     f"({permutations} permutations)"}, p, p_value)


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


def evidence(r: dict) -> str:
    """The number behind a decision: the p-value against alpha, and the interval where there is one."""
    if r.get("p_value") is None:
        return r.get("reason", "n/a")
    text = f"p = {r['p_value']:.4g} (alpha {r['alpha']:g})"
    if r.get("ci"):
        lo, hi = r["ci"]
        text += f"; {r['confidence']:.0%} CI of rate - baseline [{lo:+.4f}, {hi:+.4f}]"
    return text


def _detail(name: str, r: dict) -> str:
    if r.get("status") == NOT_ENOUGH:
        return r.get("reason", "")
    if name in ("divergence", "accuracy_drop", "holdout_regression"):
        text = f"baseline {r['baseline']:.4f} (n {r['baseline_n'] or 'exact'}), margin {r['margin']:g}"
        return text + (f", KL {r['kl']:.4f}" if r.get("kl") is not None else "")
    if name == "entropy_collapse":
        text = (f"entropies {', '.join(f'{e:.3f}' for e in r['entropies'])}; accuracy gain "
                f"{r['accuracy_gain']:+.4f}")
        return text + (f" ({r['reason']})" if r.get("reason") else "")
    return f"{r.get('method')}, max PSI {r.get('max_psi', 0):.3f}"


def _row(name: str, r: dict) -> str:
    v = r.get("value")
    value = "n/a" if v is None else f"{v:.4f}"
    n = f"{r.get('n')} (min {r.get('min_n')})"
    return (f"| {name} | {'**drift**' if r['fired'] else r.get('status', 'no drift')} | {value} | {n} | "
            f"{r.get('test', '')} | {evidence(r)} | {_detail(name, r)} |")


def render_report(results: dict[str, dict], context: dict, checks: dict[str, dict] | None = None,
                  plot: str | None = None) -> str:
    """Markdown report of one drift watch (the flow's artifact).

    Args:
        results: the drift sensors; checks: regression checks, shown apart (they never fire drift).
        plot: markdown image (a data URI or a path) of every signal over time.
    """
    fired = [n for n, r in results.items() if r["fired"]]
    head = f"**Drift detected: {', '.join(fired)}**" if fired else "No drift detected."
    lines = ["# Drift watch", "", head, ""]
    lines += [f"- {k}: `{v}`" for k, v in context.items()]
    table = ["| sensor | decision | value | n | test | evidence | detail |", "|---|---|---:|---:|---|---|---|"]
    lines += ["", "## Drift sensors", ""] + table + [_row(n, r) for n, r in results.items()]
    if checks:
        lines += ["", "## Regression checks", "",
                  "The frozen model on the static holdout: a regression check of the model and its runtime, "
                  "not a drift measurement (neither the model nor that data changes).", ""]
        lines += table + [_row(n, r) for n, r in checks.items()]
    if plot:
        lines += ["", "## Signals over time", "", f"![signals over time]({plot})"]
    return "\n".join(lines) + "\n"
