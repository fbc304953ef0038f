"""`distill serve` for a causal-LM student, over real HTTP: whole and streamed answers, the OpenAI
parameters, the key, and the request log that drift reads."""

import json

import httpx
import pytest

from distill.config import ServeConfig
from distill.drift import sensors
from distill.httpserver import start_in_thread
from distill.models.causal import GenerativeStudent, is_causal_lm_dir
from distill.serve.generative import create_generative_app
from distill.serve.shadow import ShadowLog

CHAT = [{"role": "system", "content": "answer"}, {"role": "user", "content": "my card is lost"}]


@pytest.fixture(scope="module")
def served(tiny_causal_lm, tmp_path_factory):
    log_url = f"sqlite:///{tmp_path_factory.mktemp('log')}/log.sqlite"
    student = GenerativeStudent(tiny_causal_lm, max_new_tokens=6, device="cpu")
    app = create_generative_app(student, ServeConfig(log_url=log_url), model_name="s", api_key="k3y")
    with start_in_thread(app) as server:
        yield server.url, student, log_url


def post(url, body, key="k3y", **kw):
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "s", "messages": CHAT, **body},
                      headers={"authorization": f"Bearer {key}"}, timeout=60, **kw)


def test_whole_answer_matches_the_students_greedy_answer(served):
    url, student, _ = served
    r = post(url, {"max_tokens": 6, "temperature": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == student.answer([CHAT])[0]["text"]
    assert len(choice["logprobs"]["content"]) == r.json()["usage"]["completion_tokens"] <= 6
    assert all(t["logprob"] <= 0 for t in choice["logprobs"]["content"])
    short = post(url, {"max_tokens": 2}).json()
    assert short["usage"]["completion_tokens"] <= 2


def test_stream_sends_one_event_per_token_and_the_same_text(served):
    url, student, _ = served
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, headers={"authorization": "Bearer k3y"},
                      json={"model": "s", "messages": CHAT, "stream": True, "max_tokens": 6}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == student.answer([CHAT])[0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_sampling_and_errors(served):
    url, student, _ = served
    full = student.answer([CHAT])[0]["text"]
    stop = full.split()[1] if len(full.split()) > 1 else full[-1]
    cut = post(url, {"stop": [stop]}).json()["choices"][0]
    assert stop not in cut["message"]["content"] and full.startswith(cut["message"]["content"].rstrip())
    a = post(url, {"temperature": 1.5, "seed": 3}).json()["choices"][0]["message"]["content"]
    b = post(url, {"temperature": 1.5, "seed": 3}).json()["choices"][0]["message"]["content"]
    assert a == b  # seeded sampling is reproducible
    assert post(url, {}, key="wrong").status_code == 401
    assert post(url, {"temperature": 5}).status_code == 400
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": "other", "messages": CHAT},
                      headers={"authorization": "Bearer k3y"}, timeout=30).status_code == 404


def test_requests_are_logged_for_drift(served):
    url, _, log_url = served
    for text in ["cat dog red", "blue green cat", "hello thanks"]:
        post(url, {"messages": [{"role": "user", "content": text}], "max_tokens": 3})
    rows = ShadowLog(log_url).recent(limit=1000)
    texts = [r["text"] for r in rows]
    assert {"cat dog red", "blue green cat", "hello thanks"} <= set(texts)
    assert all(r["served_by"] == "champion" and 0 < r["served_confidence"] <= 1 for r in rows)
    # Input drift reads those texts like the classifier path's (text statistics without an embedder).
    train = ["my card is lost", "refund pending please", "top up declined"] * 20
    result = sensors.input_drift(train, texts * 20, 0.05, embed=None, min_recent=10, max_samples=100,
                                 permutations=100)
    assert result["fired"]  # the logged traffic (colours and animals) is not the banking training inputs


def test_causal_lm_directories_are_told_apart(tiny_causal_lm, tiny_classifier):
    assert is_causal_lm_dir(tiny_causal_lm) and not is_causal_lm_dir(tiny_classifier)
