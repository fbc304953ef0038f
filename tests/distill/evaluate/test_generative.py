import json
import math

import pytest

from distill.config import ConfigError, EvaluateConfig, GateConfig
from distill.evaluate.gate import decide
from distill.evaluate.generative import (
    GenerativeStudent,
    answer_key,
    evaluate_generative,
    fit_sequence_temperature,
    normalize,
    parse_json_field,
)
from distill.models.causal import TEMPERATURE_GRID
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
    assert m["student_kind"] == "generative" and m["max_new_tokens"] == 4
    # No validation rows, no fitted temperature: no calibrated ECE is claimed, and the gate says so.
    assert m["temperature"] is None and m["ece"] is None
    assert 0 <= m["ece_before"] <= 1 and m["ece_before"] == m["ece_sequence"] and m["ece_label_token"] is not None
    assert any(r.startswith("ece was not measured") for r in decide(m, GateConfig())["reasons"])
    assert m["mean_token_entropy"] >= 0 and "json_valid_rate" not in m
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


def test_json_answers_are_judged_by_their_field():
    assert parse_json_field('{"intent": "card_arrival"}', "intent") == (True, "card_arrival")
    assert parse_json_field('{"intent":"Card_Arrival","x":1}', "intent") == (True, "Card_Arrival")
    assert parse_json_field('{"other": 1}', "intent") == (True, None)
    assert parse_json_field('{"intent": "card', "intent") == (False, None)
    assert parse_json_field('["intent"]', "intent") == (False, None)
    assert answer_key('{"intent":"Card_Arrival"}', "intent") == answer_key(' {"intent": "card_arrival"}', "intent")
    assert answer_key("not json", "intent") is None and answer_key(" A  b ", None) == "a b"


def test_evaluate_generative_json_fields_and_fitted_temperature(tmp_path, tiny_causal_lm):
    """Field accuracy against gold and the teacher, JSON validity, and a temperature fitted on validation rows."""
    holdout = _holdout(6)
    for r in holdout:
        r["gold"] = r["gold"].replace(" ", "_")
    answers = ['{"intent": "%s"}' % r["gold"].upper() if i % 2 else '{"intent": "wrong"' for i, r in enumerate(holdout)]
    records = [{"id": r["id"], "sample": 0, "status": "done", "response": a,
                "logprobs": [{"token": "x", "logprob": math.log(0.9)}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5}} for r, a in zip(holdout, answers)]
    validation = [{"messages": r["messages"], "target": '{"intent": "x"}'} for r in _holdout(4)]
    cfg = EvaluateConfig(latency_requests=10, latency_concurrency=1, tail_size=3, robustness=False,
                         answer_field="intent")
    m = evaluate_generative(tiny_causal_lm, holdout, records, cfg, tmp_path, max_new_tokens=3, validation=validation)
    # The teacher: half valid JSON with the right intent (case does not matter), half malformed.
    assert m["teacher_field_accuracy"] == pytest.approx(0.5) and m["teacher_json_valid_rate"] == pytest.approx(0.5)
    # A random tiny LM writes no JSON: validity and field accuracy 0, and that is what is reported.
    assert m["json_valid_rate"] == 0.0 and m["student_field_accuracy"] == 0.0 and m["retention"] == 0.0
    # Every validation answer is wrong, so the fitted temperature makes the student least confident.
    assert m["temperature"] > 1.0 and m["temperature_rows"] == 4
    assert m["ece"] is not None and m["ece"] <= m["ece_before"] + 1e-9
    assert (tmp_path / m["plots"]["reliability_calibrated"]).exists()


def test_sequence_temperature_follows_correctness():
    # Confident answers that are right should stay confident (T small); wrong ones get softened (T large).
    sure = {"logprob_at": [math.log(0.9) * t for t in TEMPERATURE_GRID]}  # softer with T, as for a greedy token
    assert fit_sequence_temperature([sure] * 5, [True] * 5) == min(TEMPERATURE_GRID)
    assert fit_sequence_temperature([sure] * 5, [False] * 5) == max(TEMPERATURE_GRID)
