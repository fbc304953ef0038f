import pytest

from distill.config import GateConfig
from distill.evaluate.gate import decide
from distill.evaluate.report import render_report

GOOD = {"retention": 0.97, "ece": 0.03, "tail_gap": 0.04, "student_p95_ms": 20.0, "robustness_drop": 0.02,
        "teacher_accuracy": 0.9, "student_accuracy": 0.873, "teacher_p95_ms": 120.0,
        "student_cost_per_1k": 0.001, "teacher_cost_per_1k": 0.5, "export_drop": 0.001}


def test_passing_metrics_ship():
    d = decide(GOOD, GateConfig())
    assert d == {"ship": True, "reasons": [], "checks": d["checks"]}
    assert [c["name"] for c in d["checks"]] == ["retention", "ece", "tail_gap", "student_p95_ms", "robustness_drop",
                                                "latency_ratio", "cost_ratio", "export_drop"]
    assert all(c["passed"] and not c["skipped"] for c in d["checks"])


@pytest.mark.parametrize("key,value,needle", [
    ("retention", 0.94, "retention 94.0 % < 95.0 %"),
    ("ece", 0.051, "ece 5.1 % > 5.0 %"),
    ("tail_gap", 0.12, "tail_gap 12.0 points > 10.0 points"),
    ("student_p95_ms", 50.5, "student_p95_ms 50.5 ms > 50.0 ms"),
    ("robustness_drop", 0.08, "robustness_drop 8.0 points > 5.0 points"),
    ("latency_ratio", 0.51, "latency_ratio 0.51x > 0.5x"),
    ("cost_ratio", 0.2, "cost_ratio 0.2x > 0.1x"),
    ("export_drop", 0.006, "export_drop 0.6 points > 0.5 points"),
])
def test_each_failing_check_blocks_with_its_reason(key, value, needle):
    d = decide({**GOOD, key: value}, GateConfig())
    assert d["ship"] is False
    assert len(d["reasons"]) == 1 and d["reasons"][0].startswith(needle)
    assert [c["name"] for c in d["checks"] if not c["passed"]] == [key]


def test_thresholds_are_inclusive_and_configurable():
    edge = {**GOOD, "retention": 0.95, "ece": 0.05, "tail_gap": 0.10, "student_p95_ms": 50.0, "robustness_drop": 0.05,
            "latency_ratio": 0.5, "cost_ratio": 0.1, "export_drop": 0.005}
    assert decide(edge, GateConfig())["ship"] is True
    strict = GateConfig(min_retention=0.99, max_p95_ms=10)
    d = decide(GOOD, strict)
    assert not d["ship"] and len(d["reasons"]) == 2


def test_unmeasured_metrics_fail_unless_the_check_is_off():
    partial = {**GOOD, "robustness_drop": None, "student_p95_ms": float("nan")}
    d = decide(partial, GateConfig())
    # an unmeasured P95 leaves the P95 ratio unmeasured as well
    assert not d["ship"] and len(d["reasons"]) == 3 and all("not measured" in r for r in d["reasons"])
    d = decide(partial, GateConfig(max_robustness_drop=None, max_p95_ms=None, max_latency_ratio=None))
    assert d["ship"] and sum(c["skipped"] for c in d["checks"]) == 3
    assert not decide({}, GateConfig())["ship"]


def test_ratios_against_the_teacher_are_derived_and_judged():
    slow = {**GOOD, "student_p95_ms": 40.0, "teacher_p95_ms": 60.0}  # under the 50 ms bound, but 0.67x the teacher
    d = decide(slow, GateConfig())
    assert not d["ship"] and [c["name"] for c in d["checks"] if not c["passed"]] == ["latency_ratio"]
    assert abs(next(c["value"] for c in d["checks"] if c["name"] == "latency_ratio") - 40 / 60) < 1e-9
    pricey = {**GOOD, "student_cost_per_1k": 0.06, "teacher_cost_per_1k": 0.5}
    assert [r.split()[0] for r in decide(pricey, GateConfig())["reasons"]] == ["cost_ratio"]
    assert decide({**GOOD, "teacher_cost_per_1k": 0.0}, GateConfig())["ship"] is False  # no teacher cost: unmeasured


def test_export_check_does_not_apply_to_a_generative_student():
    gen = {k: v for k, v in GOOD.items() if k != "export_drop"}
    assert not decide(gen, GateConfig())["ship"]
    d = decide({**gen, "student_kind": "generative"}, GateConfig())
    assert d["ship"] and next(c for c in d["checks"] if c["name"] == "export_drop")["skipped"]


def test_report_holds_decision_measures_and_plots():
    metrics = {**GOOD, "agreement": 0.91, "ece_before": 0.12, "temperature": 1.7, "brier": 0.2, "mce": 0.1,
               "tail_size": 300, "tail_teacher_accuracy": 0.8, "tail_student_accuracy": 0.76,
               "tail_by_reason": {"rare_label": {"n": 75, "teacher_accuracy": 0.8, "student_accuracy": 0.7}},
               "robustness_accuracy": 0.85, "robustness_by_kind": {"typos": 0.8}, "ood_abstain_rate": 0.6,
               "output_entropy": 0.42, "student_p50_ms": 8.0, "student_p99_ms": 30.0, "teacher_p95_ms": 90.0,
               "student_cost_per_1k": 0.001, "teacher_cost_per_1k": 0.5,
               "student_latency": {"concurrency": 4, "n": 200, "throughput_rps": 150.0, "errors": 0},
               "per_label": {"card_lost": {"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 40,
                                           "teacher_f1": 0.9}},
               "plots": {"reliability_before": "reliability_before.png", "reliability_after": "reliability_after.png",
                         "confusion": "confusion.png"}}
    d = decide({**metrics, "ece": 0.09}, GateConfig())
    md = render_report({**metrics, "ece": 0.09}, d, extra_sections={"Training": "120 steps"})
    assert "**Gate decision: DO NOT SHIP**" in md and "- ece 9.0 % > 5.0 %" in md
    assert "| ece | 9.0 % | <= 5.0 % | FAIL |" in md
    for needle in ("![reliability before](reliability_before.png)", "![reliability after](reliability_after.png)",
                   "![confusion matrix](confusion.png)", "## Training", "120 steps", "| card_lost |",
                   "| output_entropy | 0.42 |", "| rare_label | 75 |", "accuracy, typos", "| P95 | 20.0 ms | 90.0 ms |"):
        assert needle in md, needle
    assert "SHIP" in render_report(GOOD, decide(GOOD, GateConfig()))
