"""`distill teacher serve --json-field`: a classifier teacher answering as JSON, over real HTTP."""

import json
import math

import httpx
import numpy as np
import pytest

from distill.httpserver import start_in_thread
from distill.teacher.json_answers import json_answer
from distill.teacher.server import create_app


def test_json_answer_carries_the_label_distribution():
    labels = ["card_lost", "refund", "top_up"]
    logprobs = np.log([0.2, 0.7, 0.1])
    content, lp = json_answer("intent", labels, logprobs, True, 2)
    assert json.loads(content) == {"intent": "refund"}
    tokens = lp["content"]
    assert "".join(t["token"] for t in tokens) == content
    assert math.exp(sum(t["logprob"] for t in tokens)) == pytest.approx(0.7, abs=1e-9)
    assert [t["token"] for t in tokens[1]["top_logprobs"]] == ["refund", "card_lost"]
    assert json_answer("intent", labels, logprobs, False, 0) == (content, None)


def test_teacher_server_answers_json_with_logprobs(tiny_classifier):
    app = create_app(tiny_classifier, "clf", json_field="intent")
    with start_in_thread(app) as server:
        body = {"model": "clf", "messages": [{"role": "user", "content": "great stuff"}], "logprobs": True,
                "top_logprobs": 3, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).json()
        plain = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}, timeout=30).json()
    choice = r["choices"][0]
    answer = json.loads(choice["message"]["content"])
    assert answer["intent"] in ("positive", "negative", "neutral")
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert {t["token"] for t in content[1]["top_logprobs"]} == {"positive", "negative", "neutral"}
    assert plain["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert plain["choices"][0]["logprobs"] is None
