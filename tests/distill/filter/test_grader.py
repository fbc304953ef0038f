import json
import threading

import pytest

from distill.config import GenerationConfig, GraderConfig, TeacherConfig
from distill.filter.grader import format_grader_input, format_grader_output, grade


@pytest.mark.parametrize("reply,expected", [
    ('{"score": 4, "reason": "correct intent"}', (4.0, "correct intent")),
    ('```json\n{"score": 2.5, "reason": "vague"}\n```', (2.5, "vague")),
    ('Sure! Here is my grade: {"score": "5", "rationale": "exact"} Hope it helps.', (5.0, "exact")),
    ('{"score": "3/5", "explanation": "partly"}', (3.0, "partly")),
    ("Score: 4/5 - the label matches the question.", (4.0, "the label matches the question")),
    ("score 1", (1.0, "")),
])
def test_format_grader_output_clean_and_noisy(reply, expected):
    assert format_grader_output(reply) == expected


@pytest.mark.parametrize("reply", [None, "", "   ", "I think it is fine.", '{"score": }', '{"reason": "no score"}',
                                   '{"score": true, "reason": "bool"}', '{"score": "high"}', '{"score": null}'])
def test_format_grader_output_none_and_malformed(reply):
    assert format_grader_output(reply) is None


def test_format_grader_input_shows_prompt_answer_and_rubric():
    row = {"id": "a", "text": "where is my card", "response": "card_arrival",
           "messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "where is my card"}]}
    msgs = format_grader_input(row, "RUBRIC")
    assert msgs[0] == {"role": "system", "content": "RUBRIC"}
    assert "[user] where is my card" in msgs[1]["content"] and "card_arrival" in msgs[1]["content"]
    fallback = format_grader_input({"id": "b", "text": "hi", "response": None, "messages": None}, "R")
    assert "[user] hi" in fallback[1]["content"]


def grading_app(hits):
    """A grader endpoint: scores 5 when the answer is card_arrival, 1 otherwise, prose for 'weird'."""
    from fastapi import FastAPI, Request

    app = FastAPI()
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        user = body["messages"][-1]["content"]
        answer = user.split("## The model's answer\n", 1)[1].split("\n\n", 1)[0]
        with lock:
            hits.append({"answer": answer, "max_tokens": body.get("max_tokens"), "auth": request.headers.get("authorization")})
        if answer == "weird":
            content = "I would rather not grade this."
        elif answer == "card_arrival":
            content = json.dumps({"score": 5, "reason": "matches the question"})
        else:
            content = json.dumps({"score": 1, "reason": f"{answer} does not fit"})
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 8}}

    return app


def test_grade_against_a_real_local_server(tmp_path):
    from distill.httpserver import start_in_thread

    hits = []
    rows = [{"id": f"r{i}", "sample": 0, "text": f"q{i}", "response": a, "near_threshold": [],
             "messages": [{"role": "user", "content": f"q{i}"}]}
            for i, a in enumerate(["card_arrival", "top_up_failed", "weird", "card_arrival"])]
    rows.append({**rows[0], "sample": 1})  # a second sample of the same prompt is graded on its own
    generation = GenerationConfig(cache_path=tmp_path / "cache.sqlite", max_retries=0, concurrency=4)
    with start_in_thread(grading_app(hits)) as server:
        endpoint = TeacherConfig(base_url=server.url + "/v1", model="grader", api_key_env="GRADER_KEY_UNSET")
        cfg = GraderConfig(enabled=True, endpoint=endpoint, min_score=3, max_tokens=64)
        teacher = TeacherConfig(base_url="http://127.0.0.1:9/v1")  # not used: the grader has its own endpoint
        kept, rejected, summary = grade(rows, cfg, teacher, generation, api_key="sk-grader")
        assert [(r["id"], r["sample"]) for r in kept] == [("r0", 0), ("r3", 0), ("r0", 1)]
        assert kept[0]["grade"] == {"score": 5.0, "reason": "matches the question"}
        why = {r["id"]: r["reason"] for r in rejected}
        assert why == {"r1": "grader: score 1 < 3: top_up_failed does not fit",
                       "r2": "grader failed: unreadable grader reply"}
        assert len(hits) == 4 and hits[0]["max_tokens"] == 64 and hits[0]["auth"] == "Bearer sk-grader"
        assert summary["done"] == 5

        # Graded answers come from the request cache: nothing is asked (or paid) twice.
        kept2, rejected2, summary2 = grade(rows, cfg, teacher, generation, api_key="sk-grader")
        assert len(hits) == 4 and summary2["cached"] == 5
        assert [r["id"] for r in kept2] == [r["id"] for r in kept]

        keep_cfg = cfg.model_copy(update={"on_failure": "keep"})
        kept3, _, _ = grade(rows, keep_cfg, teacher, generation, api_key="sk-grader")
        assert {r["id"] for r in kept3} == {"r0", "r2", "r3"}
    assert grade([], cfg, teacher, generation) == ([], [], {})
