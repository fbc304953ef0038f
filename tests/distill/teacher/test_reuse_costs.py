"""What a cycle paid against a full cycle: cache hits priced at the teacher's rates."""

from __future__ import annotations

import pytest

from distill.config import TeacherConfig
from distill.evaluate.report import reuse_section
from distill.teacher.generation import reuse_costs


def rec(cached: bool, pt: int, ct: int, cost: float, status: str = "done") -> dict:
    return {"status": status, "cached": cached, "usage": {"prompt_tokens": pt, "completion_tokens": ct},
            "cost_usd": cost}


def test_reused_requests_are_priced_and_counted_apart_from_paid_ones():
    teacher = TeacherConfig(input_price_per_1m=1.0, output_price_per_1m=2.0)
    training = [rec(True, 100, 10, 99.0), rec(True, 200, 10, 99.0), rec(False, 50, 5, 0.00006),
                rec(False, 0, 0, 0.0, status="failed")]
    out = reuse_costs({"training": training, "holdout": [rec(True, 1000, 0, 5.0)]}, teacher)
    t = out["training"]
    assert (t["paid_requests"], t["reused_requests"], t["full_requests"]) == (1, 2, 3)
    assert t["paid_tokens"] == 55 and t["full_tokens"] == 375
    # a cache hit is priced at today's rates, not at whatever its stored record says
    assert t["full_usd"] == pytest.approx(0.00006 + (100 + 20 + 200 + 20) / 1e6)
    assert t["saved_usd"] == pytest.approx(t["full_usd"] - t["paid_usd"])
    total = out["total"]
    assert total["full_requests"] == 4 and total["paid_requests"] == 1 and total["reused_requests"] == 3
    text = reuse_section(out, traffic_rows=7)
    assert "paid for 1 of 4 teacher requests" in text and "7 recent traffic texts" in text
    assert "| holdout | 0 | 0 | $0.0000 | 1 |" in text
