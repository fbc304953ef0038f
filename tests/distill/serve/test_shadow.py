"""The shadow log (real SQLite) and the disagreement review: gold, grader and teacher adjudication,
the readiness rule, the grader prompt/reply split, and `distill shadow report`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.config import ConfigError
from distill.serve.shadow import (
    ShadowLog,
    grader_messages,
    load_gold,
    openai_grader,
    parse_grader_reply,
    review,
)


def row(text, champion, teacher=None, challenger=None, gold=None):
    return {"text": text, "champion_label": champion, "teacher_label": teacher, "challenger_label": challenger,
            "gold": gold}


def test_log_round_trip_update_and_schema(tmp_path):
    log = ShadowLog(f"sqlite:///{tmp_path}/a/log.sqlite")
    log.append({"request_id": "r1", "text": "hi", "champion_label": "x", "champion_probs": {"x": 0.9, "y": 0.1}})
    log.append_many([{"request_id": f"r{i}", "text": f"t{i}"} for i in range(2, 5)])
    log.update("r1", {"teacher_label": "y", "teacher_probs": {"x": 0.2, "y": 0.8}})
    rows = log.recent()
    assert [r["request_id"] for r in rows] == ["r1", "r2", "r3", "r4"]
    assert rows[0]["champion_probs"] == {"x": 0.9, "y": 0.1} and rows[0]["teacher_probs"]["y"] == 0.8
    assert [r["request_id"] for r in log.recent(limit=2)] == ["r3", "r4"]
    assert log.count() == 4
    with pytest.raises(ValueError, match="unknown shadow-log column"):
        log.append({"request_id": "r9", "api_key": "leak"})
    assert log.count() == 4
    with pytest.raises(ConfigError, match="PostgreSQL driver"):
        ShadowLog("postgresql+nosuchdriver://u@127.0.0.1/db")


@pytest.mark.parametrize("reply,verdict", [
    ("A", "A"), ("b", "B"), (" B.", "B"), ("Answer: A", "A"), ("(B) because the card was lost", "B"),
    ("N", "N"), ("Neither is correct", "N"), ('{"answer": "B"}', "B"),
    (None, None), ("", None), ("Both look fine", None), ("I cannot tell", None), ("{broken", None), (42, None),
])
def test_parse_grader_reply(reply, verdict):
    assert parse_grader_reply(reply) == verdict


def test_grader_prompt_names_both_answers_and_labels():
    msgs = grader_messages("my card is lost", "lost_card", "card_arrival", ["lost_card", "card_arrival"])
    assert msgs[0]["role"] == "system" and "A: lost_card" in msgs[1]["content"]
    assert "B: card_arrival" in msgs[1]["content"] and "Valid labels" in msgs[1]["content"]


def test_review_applies_the_readiness_rule():
    rows = [row(f"t{i}", "a", teacher="a") for i in range(10)]  # agreements are not reviewed
    rows += [row("w1", "a", teacher="b", gold="b"), row("w2", "a", teacher="b", gold="b"),
             row("r1", "a", teacher="b", gold="a")]
    out = review(rows, max_wrong=0.35)
    assert (out["compared"], out["disagreements"], out["settled"], out["student_wrong"]) == (13, 3, 3, 2)
    assert out["ready"] is False and out["by"]["gold"] == 3 and len(out["examples"]) == 2
    # the same evidence with a looser rule passes
    assert review(rows, max_wrong=0.7)["ready"] is True
    # gold by text (from a file) works like the gold column
    rows2 = [row("g1", "a", teacher="b"), row("g2", "a", teacher="b")]
    assert review(rows2, gold={"g1": "a", "g2": "a"})["ready"] is True
    # nothing to settle it with: undecided, never guessed (the teacher is a party here)
    undecided = review(rows2)
    assert undecided["ready"] is None and undecided["disagreements"] == 2 and undecided["settled"] == 0


def test_review_uses_grader_then_teacher_between_students():
    rows = [row("x1", "a", teacher="b"), row("x2", "a", teacher="b"), row("x3", "a", teacher="b")]
    verdicts = iter(["A", "A", None])  # the third reply is unreadable: unsettled
    out = review(rows, grader=lambda text, s, ref: next(verdicts))
    assert out["settled"] == 2 and out["student_wrong"] == 0 and out["ready"] is True and out["by"]["grader"] == 2
    # champion vs challenger without gold: the teacher, not a party, settles it
    rows = [{"text": "y", "champion_label": "a", "challenger_label": "b", "teacher_label": None}]
    assert review(rows)["settled"] == 0
    rows = [{"text": "y", "champion_label": "a", "challenger_label": "b", "teacher_label": "b"}]
    out = review(rows, student="challenger")
    assert out["disagreements"] == 0  # the challenger's reference is the teacher, and they agree
    with pytest.raises(ValueError):
        review(rows, student="teacher")


def test_openai_grader_over_http():
    from fastapi import FastAPI

    from distill.config import TeacherConfig
    from distill.httpserver import start_in_thread

    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        seen.append(body["messages"][-1]["content"])
        return {"id": "g", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "B. The reference is right."}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    with start_in_thread(app) as srv:
        grade = openai_grader(TeacherConfig(base_url=srv.url + "/v1", model="judge"), "k", ["a", "b"])
        assert grade("some input", "a", "b") == "B"
    assert "some input" in seen[0]
    down = openai_grader(TeacherConfig(base_url=srv.url + "/v1", model="judge", timeout_s=1), "k")
    assert down("x", "a", "b") is None  # the endpoint is gone: unsettled, not a verdict


def seed_disagreements(url: str, tmp_path) -> Path:
    """Two champion/teacher disagreements (gold: the teacher is right on one) and one agreement;
    returns the gold CSV."""
    ShadowLog(url).append_many([
        {"request_id": "1", "text": "one", "champion_label": "positive", "teacher_label": "negative"},
        {"request_id": "2", "text": "two", "champion_label": "positive", "teacher_label": "negative"},
        {"request_id": "3", "text": "three", "champion_label": "neutral", "teacher_label": "neutral"},
    ])
    gold = tmp_path / "gold.csv"
    gold.write_text("text,label\none,negative\ntwo,positive\n")
    return gold


def test_shadow_report_cli(tmp_path):
    from distill_flows.cli import app

    url = f"sqlite:///{tmp_path}/log.sqlite"
    gold = seed_disagreements(url, tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["shadow", "report", "--log-url", url, "--gold", str(gold), "--out",
                              str(tmp_path / "review.md")])
    assert res.exit_code == 1, res.output  # wrong on 1 of 2 settled disagreements: 50 % > 35 %
    assert "NOT READY" in res.output and (tmp_path / "review.json").exists()
    res = runner.invoke(app, ["shadow", "report", "--log-url", url, "--gold", str(gold), "--max-wrong", "0.5"])
    assert res.exit_code == 0 and "READY" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\none,negative,extra\n")
    res = runner.invoke(app, ["shadow", "report", "--log-url", url, "--gold", str(bad)])
    assert res.exit_code == 2 and "bad.csv:2" in res.output
    assert load_gold(gold, "text", "label") == {"one": "negative", "two": "positive"}


def _open_log(path: str, results, start) -> None:
    start.wait(30)  # all openers at once, as when forked workers start together
    try:
        ShadowLog(f"sqlite:///{path}")
        results.put("ok")
    except Exception as e:  # reported to the parent, which asserts on it
        results.put(f"{type(e).__name__}: {e}")


def test_worker_processes_open_a_fresh_log_together(tmp_path):
    """`serve.workers` forks open one new log file at once; every opener must get it (two that both
    found no table both created it, and the loser died with "table requests already exists")."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    # Opened once before the forks, so the children import nothing and open at the same moment.
    ShadowLog(f"sqlite:///{tmp_path}/warm.sqlite").close()
    for trial in range(6):
        results, start = ctx.Queue(), ctx.Barrier(3)
        procs = [ctx.Process(target=_open_log, args=(str(tmp_path / f"log-{trial}.sqlite"), results, start))
                 for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [results.get(timeout=5) for _ in procs] == ["ok"] * 3
