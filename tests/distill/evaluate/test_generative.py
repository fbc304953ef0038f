import json
import math

import pytest

from distill.config import ConfigError, EvaluateConfig, GateConfig
from distill.evaluate.gate import decide
from distill.evaluate.generative import (
    GenerativeStudent,
    evaluate_generative,
    normalize,
)
from distill.evaluate.report import render_report


def _holdout(n):
    rows = []
    for i in range(n):
        text = f"my card is {['lost', 'stolen', 'declined'][i % 3]}"
        gold = ["card lost", "card stolen", "payment declined"][i % 3]
        rows.append({"id": f"g{i}", "text": text, "gold": gold, "input": {"text": text, "answer": gold},
                     "messages": [{"role": "system", "content": "answer"}, {"role": "user", "content": text}]})
    return rows


def test_normalize():
    assert normalize("  Card   LOST \n") == "card lost" and normalize(None) is None


def test_generative_student_answers_with_token_logprobs(tiny_causal_lm):
    student = GenerativeStudent(tiny_causal_lm, max_new_tokens=4)
    chats = [r["messages"] for r in _holdout(3)]
    a = student.answer(chats, batch_size=2)
    again = student.answer(chats, batch_size=3)  # greedy, and left padding does not change answers
    assert len(a) == 3 and [x["text"] for x in a] == [x["text"] for x in again]
    for x, y in zip(a, again):
        assert [t["logprob"] for t in x["logprobs"]] == pytest.approx([t["logprob"] for t in y["logprobs"]], abs=1e-4)
    for x in a:
        assert 1 <= len(x["logprobs"]) <= 4 and all(t["logprob"] <= 0 for t in x["logprobs"])
        assert 0 <= x["first_entropy"] <= math.log(len(student.tokenizer)) + 1e-6


def test_evaluate_generative(tmp_path, tiny_causal_lm):
    holdout = _holdout(9)
    records = [{"id": r["id"], "sample": 0, "status": "done", "response": r["gold"].upper() if i % 3 else "no idea",
                "logprobs": [{"token": "x", "logprob": math.log(0.7)}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3}} for i, r in enumerate(holdout)]
    cfg = EvaluateConfig(latency_requests=10, latency_concurrency=2, tail_size=4, robustness_rows=2)
    m = evaluate_generative(tiny_causal_lm, holdout, records, cfg, tmp_path, teacher_price=(1.0, 1.0),
                            max_new_tokens=4)
    json.dumps(m, allow_nan=False)
    assert m["teacher_accuracy"] == pytest.approx(6 / 9)  # case and spacing do not matter, wrong answers do
    assert m["student_kind"] == "generative" and m["temperature"] is None
    assert 0 <= m["ece"] <= 1 and m["ece"] == m["ece_sequence"] and m["ece_label_token"] is not None
    assert m["tail_size"] == 4 and m["robustness_rows"] == 2 and m["ood_size"] >= 90
    assert m["student_latency"]["ok"] == 10 and m["student_p50_ms"] <= m["student_p99_ms"]
    for path in m["plots"].values():
        assert (tmp_path / path).read_bytes()[:4] == b"\x89PNG"
    md = render_report(m, decide(m, GateConfig()))
    assert "![reliability sequence](reliability_sequence.png)" in md and "DO NOT SHIP" in md
    with pytest.raises(ConfigError, match="gold answer"):
        evaluate_generative(tiny_causal_lm, [dict(holdout[0], gold=None)], [], cfg, tmp_path)
    with pytest.raises(ConfigError, match="not a model directory"):
        evaluate_generative(tmp_path, holdout, records, cfg, tmp_path)
