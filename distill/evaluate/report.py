"""The run's report.md: metrics, gate decision and each stage's own section, in reading order.
"""

from __future__ import annotations

from distill.evaluate import latency
from distill.evaluate.gate import CHECKS, format_value


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _v(metrics: dict, key: str, unit: str = "num") -> str:
    return format_value(metrics.get(key), unit)


def render_report(metrics: dict, decision: dict, extra_sections: dict[str, str] | None = None) -> str:
    """The run's report.md: the gate decision, every measure, and the plots by relative path.

    Args:
        metrics: the evaluation metrics; `plots` paths are relative to the report's directory.
        decision: the gate decision from `decide`.
        extra_sections: {title: markdown} added after the gate (run, generation, training...).
    """
    m = metrics
    plots = m.get("plots") or {}
    out = ["# Distillation report", ""]
    out += _gate_section(decision)
    for title, body in (extra_sections or {}).items():
        out += ["", f"## {title}", "", body]
    out += _in_distribution_section(m)
    out += _tail_section(m)
    out += _calibration_section(m, plots)
    out += _robustness_section(m)
    out += _entropy_section(m)
    out += _latency_section(m)
    out += _per_label_section(m, plots)
    out += _scalars_section(m)
    return "\n".join(out)


def _gate_section(decision: dict) -> list[str]:
    verdict = "SHIP" if decision.get("ship") else "DO NOT SHIP"
    out = [f"**Gate decision: {verdict}**", ""]
    out += [f"- {r}" for r in decision.get("reasons", [])]
    out += ["", "## Gate checks", ""]
    units = {key: unit for key, _, _, unit, _ in CHECKS}
    rows = []
    for c in decision.get("checks", []):
        unit = units.get(c["name"], "num")
        result = "skipped" if c.get("skipped") else ("pass" if c["passed"] else "FAIL")
        rows.append([c["name"], format_value(c["value"], unit), f"{c.get('op', '')} {format_value(c['threshold'], unit)}", result])
    out.append(_table(["check", "value", "threshold", "result"], rows))
    return out


def _in_distribution_section(m: dict) -> list[str]:
    return ["", "## In-distribution (gold holdout)", "", _table(["measure", "value"], [
        ["holdout rows", _v(m, "n_holdout")],
        ["teacher accuracy", _v(m, "teacher_accuracy", "pct")],
        ["student accuracy", _v(m, "student_accuracy", "pct")],
        ["retention (student / teacher)", _v(m, "retention", "pct")],
        ["agreement with the teacher", _v(m, "agreement", "pct")],
        ["student macro F1", _v(m, "macro_f1")],
        ["teacher macro F1", _v(m, "teacher_macro_f1")],
        ["holdout rows the teacher did not answer", _v(m, "teacher_unanswered")],
    ])]


def _tail_section(m: dict) -> list[str]:
    out = ["", "## Tail slice (hardest inputs)", "", _table(["measure", "value"], [
        ["rows", _v(m, "tail_size")],
        ["teacher accuracy", _v(m, "tail_teacher_accuracy", "pct")],
        ["student accuracy", _v(m, "tail_student_accuracy", "pct")],
        ["gap (teacher - student)", _v(m, "tail_gap", "points")],
        ["rows the teacher did not answer (counted wrong)", _v(m, "tail_teacher_unanswered")],
    ])]
    by_reason = m.get("tail_by_reason") or {}
    if by_reason:
        out += ["", _table(["selected as", "rows", "teacher", "student"], [
            [k, str(v["n"]), format_value(v["teacher_accuracy"], "pct"), format_value(v["student_accuracy"], "pct")]
            for k, v in by_reason.items()])]
    return out


def _calibration_section(m: dict, plots: dict) -> list[str]:
    out = ["", "## Calibration", ""]
    out.append(f"Temperature {_v(m, 'temperature')} fitted on {_v(m, 'validation_rows')} validation rows "
               f"(validation NLL {_v(m, 'validation_nll_before')} -> {_v(m, 'validation_nll_after')}); "
               f"{_v(m, 'ece_bins')} equal-width bins.")
    out += ["", _table(["measure", "before", "after"], [
        ["ECE", _v(m, "ece_before", "pct"), _v(m, "ece", "pct")],
        ["MCE", _v(m, "mce_before", "pct"), _v(m, "mce", "pct")],
        ["Brier", _v(m, "brier_before"), _v(m, "brier")],
        ["NLL (holdout)", _v(m, "nll_before"), _v(m, "nll")],
    ])]
    for name, path in plots.items():
        if name.startswith("reliability"):
            out += ["", f"![{name.replace('_', ' ')}]({path})"]
    return out


def _robustness_section(m: dict) -> list[str]:
    rob = [["rephrased rows (source rows x 5 kinds)", _v(m, "robustness_rows")],
           ["accuracy on the source rows", _v(m, "robustness_original_accuracy", "pct")],
           ["accuracy on rephrasings", _v(m, "robustness_accuracy", "pct")],
           ["drop", _v(m, "robustness_drop", "points")]]
    rob += [[f"accuracy, {k}", format_value(v, "pct")] for k, v in (m.get("robustness_by_kind") or {}).items()]
    return ["", "## Robustness", "", _table(["measure", "value"], rob),
            "", "### Out-of-domain inputs", "", _table(["measure", "value"], [
                ["out-of-domain inputs", _v(m, "ood_size")],
                ["abstain threshold (top probability)", _v(m, "abstain_threshold")],
                ["abstained on out-of-domain inputs", _v(m, "ood_abstain_rate", "pct")],
                ["mean top probability on out-of-domain inputs", _v(m, "ood_mean_confidence")],
                ["abstained on holdout inputs", _v(m, "holdout_abstain_rate", "pct")],
            ])]


def _entropy_section(m: dict) -> list[str]:
    return ["", "## Output entropy", "", _table(["measure", "value"], [
        ["mean prediction entropy, uncalibrated (nats)", _v(m, "output_entropy")],
        ["mean prediction entropy, calibrated (nats)", _v(m, "output_entropy_calibrated")],
        ["entropy of the predicted-label histogram (nats)", _v(m, "label_entropy")],
    ])]


def _latency_section(m: dict) -> list[str]:
    sl, tl = m.get("student_latency") or {}, m.get("teacher_latency") or {}
    out = ["", "## Latency and cost", ""]
    out.append(f"Single requests from {sl.get('concurrency', 'n/a')} concurrent clients, "
               f"{sl.get('n', 'n/a')} requests per model, same machine; student served by "
               f"`{m.get('student_server', 'n/a')}`.")
    out += ["", _table(["measure", "student", "teacher"], [
        ["P50", _v(m, "student_p50_ms", "ms"), _v(m, "teacher_p50_ms", "ms")],
        ["P95", _v(m, "student_p95_ms", "ms"), _v(m, "teacher_p95_ms", "ms")],
        ["P99", _v(m, "student_p99_ms", "ms"), _v(m, "teacher_p99_ms", "ms")],
        ["throughput (req/s)", format_value(sl.get("throughput_rps"), "num"), format_value(tl.get("throughput_rps"), "num")],
        ["failed requests", format_value(sl.get("errors"), "num"), format_value(tl.get("errors"), "num")],
        ["USD per 1,000 requests", _v(m, "student_cost_per_1k"), _v(m, "teacher_cost_per_1k")],
    ])]
    return out + latency.render_latency(m)


def _per_label_section(m: dict, plots: dict) -> list[str]:
    out = []
    per_label = m.get("per_label") or {}
    if per_label:
        out += ["", "## Per label (student)", ""]
        out.append(_table(["label", "precision", "recall", "F1", "teacher F1", "support"], [
            [l, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}",
             format_value(v.get("teacher_f1"), "num"), str(v["support"])] for l, v in per_label.items()]))
    if "confusion" in plots:
        out += ["", f"![confusion matrix]({plots['confusion']})"]
    return out


def _scalars_section(m: dict) -> list[str]:
    scalars = [[k, format_value(v, "num")] for k, v in sorted(m.items()) if isinstance(v, (int, float)) or v is None]
    return ["", "## All scalar measures", "", _table(["key", "value"], scalars), ""]


def reuse_section(costs: dict[str, dict], traffic_rows: int = 0) -> str:
    """Markdown: this cycle's teacher requests, tokens and dollars against a full cycle's (see
    distill.teacher.generation.reuse_costs), per part and in total."""
    rows = [[name, str(c["paid_requests"]), str(c["paid_tokens"]), f"${c['paid_usd']:.4f}",
             str(c["reused_requests"]), str(c["full_requests"]), str(c["full_tokens"]), f"${c['full_usd']:.4f}",
             f"${c['saved_usd']:.4f}"] for name, c in costs.items()]
    t = costs["total"]
    share = t["saved_usd"] / t["full_usd"] if t["full_usd"] else 0.0
    head = (f"This cycle paid for {t['paid_requests']} of {t['full_requests']} teacher requests "
            f"(${t['paid_usd']:.4f}); a full cycle, with nothing in the request cache, would pay "
            f"${t['full_usd']:.4f} (saved ${t['saved_usd']:.4f}, {share:.0%}). Cache hits are priced at "
            f"the teacher's rates.")
    if traffic_rows:
        head += (f" {traffic_rows} recent traffic texts joined the training prompts (provenance `traffic`; "
                 "the filter's final counts say how many stayed in the mix).")
    return head + "\n\n" + _table(["part", "paid requests", "paid tokens", "paid $", "reused requests",
                                     "full-cycle requests", "full-cycle tokens", "full-cycle $", "saved $"], rows)
