"""The LLM judge against a judge stand-in in its own process (tests/judge_standin.py: free-text
verdicts, position bias, rate limits): both orders cancel the bias, the ledger is charged once,
a rerun pays nothing, and evaluation reports it."""

import json
import math

import httpx
import pytest

from distill.config import EvaluateConfig, GenerationConfig, JudgeConfig, TeacherConfig
from distill.evaluate.judge import judge_messages, parse_verdict
from distill.teacher.ratelimit import Ledger
from judge_standin import sections, start

SYSTEM = {"role": "system", "content": "Answer with the card problem in two words."}
# (request, gold, student answer, teacher answer)
CASES = [
    ("my card is lost", "lost card", "lost card", "stolen card"),            # student right: win
    ("my card was stolen", "stolen card", "Stolen card.", "lost card"),      # win
    ("top up declined", "top up declined", "pending top up", "top up declined"),  # loss
    ("refund pending please", "refund pending", "refund", "Refund pending"),  # loss
    ("exchange rate fees", "exchange rate", "Exchange rate!", "exchange rate."),  # both right, worded apart
    ("how do i top up", "top up", "card top", "top card"),                    # both wrong
    ("verify my identity", "verify identity", "verify identity", "verify identity"),  # identical: no call
    ("change my address", "change address", "new address", "address change"),  # both wrong
    ("an ambiguous request", "close account", "close account", "cancel card"),  # no verdict in the reply
]


def holdout():
    return [{"id": f"r{i}", "messages": [SYSTEM, {"role": "user", "content": q}], "gold": g}
            for i, (q, g, _, _) in enumerate(CASES)]


@pytest.fixture(scope="module")
def judge_url(tmp_path_factory):
    gold = tmp_path_factory.mktemp("judge") / "gold.json"
    gold.write_text(json.dumps({q: g for q, g, _, _ in CASES}))
    proc, url = start(gold)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def requests_seen(url: str) -> int:
    return httpx.get(url.removesuffix("/v1") + "/standin/stats", timeout=10).json()["requests"]


def test_free_text_verdicts_are_read_and_unreadable_ones_are_not_guessed():
    assert parse_verdict("Answer A is right.\n\nVerdict: A") == "A"
    assert parse_verdict("Let me see. **Verdict:** [[B]]") == "B"
    assert parse_verdict("Overall, my decision follows.\nVerdict: Answer B") == "B"
    assert parse_verdict("Equally good.\nVerdict: tie") == "tie"
    assert parse_verdict("At first A, but on reflection... Verdict: A\nVerdict: B") == "B"  # the last one counts
    assert parse_verdict("[[C]]") == "tie" and parse_verdict(" b ") == "B"
    for unreadable in (None, "", "Both answers have their merits.", "A verdict about answers is hard."):
        assert parse_verdict(unreadable) is None
    chat = judge_messages(holdout()[0]["messages"], "x y", "z")
    assert sections(chat[1]["content"]) == {"request": "my card is lost", "a": "x y", "b": "z"}
    assert "Verdict: A" in chat[0]["content"]


def test_both_orders_cancel_position_bias_and_the_ledger_is_charged_once(judge_url, tmp_path):
    from distill.evaluate.judge import judge_answers

    endpoint = TeacherConfig(base_url=judge_url, model="judge-model", input_price_per_1m=1.0,
                             output_price_per_1m=2.0, api_key_env="JUDGE_KEY_UNSET")
    gen = GenerationConfig(cache_path=tmp_path / "cache.sqlite", ledger_path=tmp_path / "ledger.jsonl",
                           budget_usd=1.0, backoff_base_s=0.05)
    student = {f"r{i}": s for i, (_, _, s, _) in enumerate(CASES)}
    teacher = {f"r{i}": t for i, (_, _, _, t) in enumerate(CASES)}
    teacher["r9"] = None
    rows = holdout() + [{"id": "r9", "messages": holdout()[0]["messages"], "gold": "x"}]  # the teacher failed here
    before = requests_seen(judge_url)
    m = judge_answers(rows, student, teacher, JudgeConfig(endpoint=endpoint), None, gen, tmp_path)
    sent = requests_seen(judge_url) - before

    assert m["judge_rows"] == 9 and m["judge_identical"] == 1  # no teacher answer: not judged
    assert m["judge_calls"] == 16 and sent >= 16  # two per row that differs (retried 429s are extra requests)
    assert m["judge_unreadable"] == 2 and m["judge_decided"] == 8
    # Truth: 2 wins, 2 losses; both right / both wrong / identical are ties, whatever the judge's favourite slot.
    assert m["judge_win_rate"] == pytest.approx(2 / 8) and m["judge_loss_rate"] == pytest.approx(2 / 8)
    assert m["judge_tie_rate"] == pytest.approx(4 / 8)
    lines = [json.loads(l) for l in (tmp_path / "judge.jsonl").read_text().splitlines()]
    equal = [l for l in lines if l["id"] in ("r4", "r5", "r7")]
    favoured_first = [l for l in equal if l["verdicts"] == {"student_first": "A", "teacher_first": "A"}]
    # The stand-in favours the first slot on r4 and r5: asked in one order only, those would be wins.
    assert sorted(l["id"] for l in favoured_first) == ["r4", "r5"]
    assert m["judge_agreement"] == pytest.approx(5 / 7)
    assert m["judge_first_position_rate"] > 0.5

    ledger = Ledger(tmp_path / "ledger.jsonl", None)
    charged = ledger.by_purpose()["judge"]
    assert charged == pytest.approx(m["judge_cost_usd"]) and charged > 0
    again = judge_answers(rows, student, teacher, JudgeConfig(endpoint=endpoint), None, gen, tmp_path)
    assert requests_seen(judge_url) - before == sent  # nothing asked twice
    assert again["judge_cached"] == 16 and again["judge_cost_usd"] == 0
    assert Ledger(tmp_path / "ledger.jsonl", None).by_purpose()["judge"] == pytest.approx(charged)
    assert {k: v for k, v in again.items() if k not in ("judge_cached", "judge_cost_usd")} == \
        {k: v for k, v in m.items() if k not in ("judge_cached", "judge_cost_usd")}


def test_evaluation_reports_the_judge(judge_url, tiny_causal_lm, tmp_path):
    from distill.evaluate.generative import evaluate_generative

    rows = [{**r, "text": r["messages"][1]["content"], "input": {"text": r["messages"][1]["content"]}}
            for r in holdout()[:4]]
    records = [{"id": r["id"], "sample": 0, "status": "done", "response": g, "usage": {"prompt_tokens": 5,
                "completion_tokens": 2}, "logprobs": [{"token": g, "logprob": math.log(0.9)}]}
               for r, (_, g, _, _) in zip(rows, CASES)]
    judge = JudgeConfig(endpoint=TeacherConfig(base_url=judge_url, model="judge-model"), max_rows=3)
    cfg = EvaluateConfig(latency_requests=10, latency_concurrency=2, tail_size=2, robustness=False, judge=judge)
    gen = GenerationConfig(cache_path=tmp_path / "cache.sqlite", ledger_path=tmp_path / "ledger.jsonl")
    m = evaluate_generative(tiny_causal_lm, rows, records, cfg, tmp_path, max_new_tokens=4, generation=gen)
    # A random student against the teacher's gold answers: the judge prefers the teacher in both orders.
    assert m["judge_rows"] == 3 and m["judge_loss_rate"] == 1.0 and m["judge_model"] == "judge-model"
    assert (tmp_path / "judge.jsonl").exists() and "judge" in Ledger(tmp_path / "ledger.jsonl", None).by_purpose()


def test_the_run_estimate_bounds_what_the_judge_spends(judge_url, tmp_path):
    from distill.config import DistillConfig
    from distill.evaluate.judge import judge_answers
    from distill.preflight import run_estimate

    endpoint = TeacherConfig(base_url=judge_url, model="judge-model", input_price_per_1m=1.0,
                             output_price_per_1m=2.0, api_key_env="JUDGE_KEY_UNSET")
    gen = GenerationConfig(cache_path=tmp_path / "cache.sqlite", ledger_path=tmp_path / "ledger.jsonl",
                           budget_usd=1.0, backoff_base_s=0.05, max_tokens=8)
    task = {"name": "cards", "kind": "generation", "train_path": str(tmp_path / "train.csv"),
            "system_prompt": SYSTEM["content"]}
    cfg = DistillConfig.model_validate({"task": task, "teacher": endpoint.model_dump(), "generation": gen.model_dump(),
                                        "train": {"mode": "sft", "student_model": str(tmp_path)}})
    without = run_estimate(cfg, [], holdout(), gen)
    assert "judge" not in without["parts"]
    judge = JudgeConfig(endpoint=endpoint, max_tokens=64)
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"judge": judge})})
    estimate = run_estimate(cfg, [], holdout(), gen)["parts"]["judge"]
    assert estimate["to_send"] == 2 * len(CASES)

    student = {f"r{i}": s for i, (_, _, s, _) in enumerate(CASES)}
    teacher = {f"r{i}": t for i, (_, _, _, t) in enumerate(CASES)}
    judge_answers(holdout(), student, teacher, judge, None, gen, tmp_path)
    spent = Ledger(tmp_path / "ledger.jsonl", None).by_purpose()["judge"]
    assert 0 < spent <= estimate["cost_usd"]
