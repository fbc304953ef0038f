"""The canary judge on logged rows: a worse challenger is stopped, an equal one kept, and too few
judged requests never stop anything."""

from __future__ import annotations

import random

from distill.drift.canary import judge_canary, render_decision


def rows(arm: str, n: int, agree: float, seed: int, gold: float | None = None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice("abc")
        other = "b" if label == "a" else "a"
        out.append({"served_by": arm, f"{arm}_label": label, f"{arm}_run": f"run-{arm}",
                    "teacher_label": label if rng.random() < agree else other,
                    "gold": None if gold is None else (label if rng.random() < gold else other)})
    return out


def test_a_significantly_worse_challenger_is_stopped():
    window = rows("champion", 300, 0.92, 0) + rows("challenger", 150, 0.6, 1)
    out = judge_canary(window, "run-champion", "run-challenger", min_requests=100, alpha=0.01)
    agree = out["tests"]["agreement"]
    assert out["decision"] == "stop" and agree["worse"] and agree["p_value"] < 1e-6
    assert agree["challenger_n"] == 150 and agree["champion_n"] == 300
    assert agree["ci"][1] < 0  # the whole interval of the difference is below zero
    assert out["tests"]["accuracy"]["status"] == "not enough data"  # no gold feedback yet
    assert "agreement: challenger" in out["reason"]
    md = render_decision(out, {"task": "t"})
    assert "**Canary stopped**" in md and "| agreement with the teacher | worse |" in md


def test_an_equally_good_challenger_is_kept():
    window = rows("champion", 300, 0.9, 2, gold=0.85) + rows("challenger", 300, 0.9, 3, gold=0.85)
    out = judge_canary(window, None, None, min_requests=100, alpha=0.01)
    assert out["decision"] == "keep"
    assert all(t["status"] == "not worse" and t["p_value"] > 0.01 for t in out["tests"].values())


def test_few_requests_report_not_enough_data_and_other_runs_are_not_counted():
    window = rows("champion", 300, 0.95, 4) + rows("challenger", 40, 0.0, 5)
    out = judge_canary(window, "run-champion", "run-challenger", min_requests=100, alpha=0.01)
    assert out["decision"] == "not enough data" and out["tests"]["agreement"]["challenger_n"] == 40
    # requests served by another challenger run are not this canary's
    assert judge_canary(window, "run-champion", "run-other", 10, 0.01)["served"]["challenger"] == 0


def test_error_rate_on_gold_feedback_stops_a_canary_the_teacher_cannot_see():
    window = rows("champion", 200, 0.9, 6, gold=0.9) + rows("challenger", 200, 0.9, 7, gold=0.5)
    out = judge_canary(window, None, None, min_requests=100, alpha=0.01)
    assert out["decision"] == "stop" and out["tests"]["accuracy"]["worse"]
    assert not out["tests"]["agreement"]["worse"]
