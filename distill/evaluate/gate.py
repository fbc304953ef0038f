"""The readiness gate: ship or don't ship, with reasons.

The gate is a fixed list of checks on the evaluation metrics, each against a
threshold from `GateConfig`. A threshold set to None switches its check off (the
report says so); a metric that should have been measured but was not fails its
check, because a gate that passes on missing evidence is a silent promotion.
"""

from __future__ import annotations

import math
from typing import Any

from distill.config import GateConfig

# (metric key, GateConfig field, direction, unit, what it means)
CHECKS = (
    ("retention", "min_retention", ">=", "pct", "student accuracy / teacher accuracy on the gold holdout"),
    ("ece", "max_ece", "<=", "pct", "expected calibration error after temperature scaling"),
    ("tail_gap", "max_tail_gap", "<=", "points", "teacher minus student accuracy on the tail slice"),
    ("student_p95_ms", "max_p95_ms", "<=", "ms", "student P95 latency under concurrent single requests"),
    ("robustness_drop", "max_robustness_drop", "<=", "points", "accuracy lost on rephrased inputs"),
    ("latency_ratio", "max_latency_ratio", "<=", "ratio", "student P95 / teacher P95, same harness and concurrency"),
    ("cost_ratio", "max_cost_ratio", "<=", "ratio", "student cost per 1,000 requests / the teacher's"),
    ("export_drop", "max_export_drop", "<=", "points",
     "accuracy lost by the worst exported runtime (evaluate.export_runtimes) against the fp32 student"),
)

# Checks that do not apply to a kind of student (no ONNX export of a generative student yet).
NOT_APPLICABLE = {"generative": {"export_drop"}}


def _ratio(num: Any, den: Any) -> float | None:
    if _missing(num) or _missing(den) or not den:
        return None
    return float(num) / float(den)


def relative_metrics(metrics: dict) -> dict[str, float | None]:
    """The student measured against the teacher: latency_ratio (P95s) and cost_ratio (per 1,000 requests)."""
    return {"latency_ratio": _ratio(metrics.get("student_p95_ms"), metrics.get("teacher_p95_ms")),
            "cost_ratio": _ratio(metrics.get("student_cost_per_1k"), metrics.get("teacher_cost_per_1k"))}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_value(v: Any, unit: str) -> str:
    if _missing(v):
        return "n/a"
    if unit == "pct":
        return f"{100 * v:.1f} %"
    if unit == "points":
        return f"{100 * v:.1f} points"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "ratio":
        return f"{v:.3g}x"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def decide(metrics: dict, gate: GateConfig) -> dict:
    """Ship or not, and why.

    Args:
        metrics: the evaluation metrics (see distill.evaluate.classifier.evaluate_classifier).
        gate: the thresholds.
    Returns:
        {"ship": bool, "reasons": [one line per failing check],
         "checks": [{"name", "value", "threshold", "passed", "skipped", "description"}]}
    """
    checks, reasons = [], []
    derived = {k: v for k, v in relative_metrics(metrics).items() if _missing(metrics.get(k))}
    metrics = {**metrics, **derived}
    not_applicable = NOT_APPLICABLE.get(metrics.get("student_kind"), set())
    for key, field, op, unit, what in CHECKS:
        threshold = getattr(gate, field)
        value = metrics.get(key)
        check = {"name": key, "value": None if _missing(value) else value, "threshold": threshold,
                 "op": op, "passed": True, "skipped": threshold is None or key in not_applicable,
                 "description": what}
        if check["skipped"]:
            checks.append(check)
            continue
        if _missing(value):
            check["passed"] = False
            reasons.append(f"{key} was not measured ({what}); the gate needs it or gate.{field}: null")
        else:
            check["passed"] = value >= threshold if op == ">=" else value <= threshold
            if not check["passed"]:
                bad = "<" if op == ">=" else ">"
                reasons.append(f"{key} {format_value(value, unit)} {bad} {format_value(threshold, unit)} ({what})")
        checks.append(check)
    return {"ship": not reasons, "reasons": reasons, "checks": checks}
