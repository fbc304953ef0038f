"""soft_labels: score — every label scored by the endpoint; exact distributions, cached and charged once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distill.config import GenerationConfig, TeacherConfig
from distill.httpserver import start_in_thread
from distill.teacher.generation import generate
from distill.teacher.labels import label_block, map_answer
from distill.teacher.ratelimit import Ledger
from distill.teacher.scoring import answer_frame, estimate_score_cost, score_labels
from distill.teacher.soft_labels import soft_labels
from distill.teacher.structured import structured_params

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import chat_standin as standin  # noqa: E402

LABELS = json.loads((ROOT / "distill/data/banking77/categories.json").read_text())
GOLDS = standin.load_golds([str(ROOT / "distill/data/banking77/test.csv")])
TEXTS = list(GOLDS)[::400][:8]
SYSTEM = "Classify the customer's message. Answer with exactly one of these labels:\n" + label_block(LABELS)


def tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a[l] - b[l]) for l in LABELS)


@pytest.mark.parametrize("api,structured", [("prompt_logprobs", True), ("echo", True), ("echo", False)])
def test_score_mode_recovers_the_true_distribution_and_a_rerun_buys_nothing(tmp_path, api, structured):
    app = standin.build_app(GOLDS, LABELS)
    rows = [{"id": f"r{i}", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}]}
            for i, t in enumerate(TEXTS)]
    ledger_path = tmp_path / "ledger.jsonl"
    with start_in_thread(app) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="standin-chat", input_price_per_1m=1.0,
                                output_price_per_1m=2.0)
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", ledger_path=ledger_path, soft_labels="score",
                               score_api=api, backoff_base_s=0.01, concurrency=8,
                               extra_params=structured_params("json_schema", LABELS) if structured else {})
        answers = generate(rows, teacher, gen, api_key=None).records
        assert all(r["logprobs"] is None for r in answers)  # score mode does not pay for answer logprobs
        before = app.state.requests
        scored, summary = score_labels(answers, LABELS, teacher, gen, purpose="score")
        sent = app.state.requests - before
        spent = Ledger(ledger_path, None).by_purpose()["score"]
        again, again_summary = score_labels(answers, LABELS, teacher, gen, purpose="score")
        resent = app.state.requests - before - sent
    per_row = 1 if api == "echo" else len(LABELS)
    assert sent >= per_row * len(rows)  # at least one request per label (or per row), a few 429s retried
    assert summary["scored"] == len(rows) and spent > 0
    assert resent == 0 and again_summary["cost_usd"] == 0.0 and again_summary["cached"] == summary["requested"]
    assert Ledger(ledger_path, None).by_purpose()["score"] == spent  # the rerun charged nothing
    worst = 0.0
    for rec, text in zip(scored, TEXTS):
        true = standin.true_distribution(text, GOLDS[text], LABELS)
        dist = soft_labels(rec, LABELS)
        worst = max(worst, tv(dist, true))
        answer = map_answer(rec["response"], LABELS)
        if answer is not None:
            assert max(dist, key=dist.get) == answer
    assert worst < 1e-4, worst
    assert [r["label_scores"] for r in again] == [r["label_scores"] for r in scored]


def test_the_frame_is_the_teachers_own_answer_around_its_label():
    assert answer_frame('{"label": "card_arrival"}', LABELS) == ('{"label": "', '"}')
    assert answer_frame("Intent: card_arrival", LABELS) == ("Intent: ", "")
    assert answer_frame("Card arrival.", LABELS) == ("", "")  # not spelled verbatim: the bare label is scored
    rows = [{"id": "a", "messages": [{"role": "user", "content": "x" * 400}]}]
    chat = estimate_score_cost(rows, LABELS, GenerationConfig(soft_labels="score", max_tokens=10))
    echo = estimate_score_cost(rows, LABELS, GenerationConfig(soft_labels="score", score_api="echo", max_tokens=10))
    assert chat["requests"] == len(LABELS) and echo["requests"] == 1
    assert chat["prompt_tokens"] == echo["prompt_tokens"] > 100 * len(LABELS)


def test_an_echo_request_reserves_its_own_tokens_once():
    from distill.teacher.client import make_record
    from distill.teacher.scoring import score_jobs

    messages = [{"role": "user", "content": "x" * 400}]
    rec = make_record("a", 0, messages, {}, "m", status="done", response=LABELS[0])
    for api, n in (("echo", 1), ("prompt_logprobs", len(LABELS))):
        _, jobs, _ = score_jobs([rec], LABELS, TeacherConfig(), GenerationConfig(score_api=api))
        assert len(jobs) == n
        # What the rate limiter and the budget reserve: about L prompts per row, not L x L.
        assert 100 * len(LABELS) < sum(j.est_tokens for j in jobs) < 200 * len(LABELS)
