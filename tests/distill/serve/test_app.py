"""The student server over real HTTP with the real `openai` client: auth, limits, timeouts,
shadow logging, canary split and teacher fallback."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import openai
import pytest

from distill.config import ConfigError, ServeConfig, TeacherConfig
from distill.httpserver import start_in_thread
from distill.serve.app import create_app
from distill.serve.shadow import ShadowLog
from tests.conftest import make_tiny_bert_classifier

LABELS = ["positive", "negative", "neutral"]
KEY = "test-serve-key"
MSG = [{"role": "system", "content": "Classify."}, {"role": "user", "content": "i love my new card"}]


@pytest.fixture(scope="module")
def challenger_dir(tmp_path_factory) -> Path:
    return make_tiny_bert_classifier(tmp_path_factory.mktemp("challenger"), LABELS, seed=1)


@pytest.fixture(scope="module")
def teacher_url(tmp_path_factory):
    """The project's own teacher server over a third tiny classifier: a real OpenAI-compatible endpoint."""
    from distill.teacher.server import create_app as teacher_app

    d = make_tiny_bert_classifier(tmp_path_factory.mktemp("teacher"), LABELS, seed=2)
    with start_in_thread(teacher_app(d, model_name="tiny-teacher")) as srv:
        yield srv.url + "/v1"


def slow_teacher_app(delay_s: float):
    """An OpenAI-compatible endpoint that answers "negative" after `delay_s` seconds."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        await asyncio.sleep(delay_s)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": "negative"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


def cfg(tmp_path: Path, **kw) -> ServeConfig:
    return ServeConfig(log_url=f"sqlite:///{tmp_path}/log.sqlite", **kw)


def client(url: str, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=20)


def ask(c: openai.OpenAI, text: str = "i love my new card", **kw):
    messages = [MSG[0], {"role": "user", "content": text}]
    return c.chat.completions.with_raw_response.create(model="distill-student", messages=messages, **kw)


def test_answers_like_the_teacher_and_requires_the_key(tiny_classifier, tmp_path):
    app = create_app(tiny_classifier, cfg(tmp_path), api_key=KEY)
    with start_in_thread(app) as srv:
        with pytest.raises(openai.AuthenticationError):
            ask(client(srv.url, key="wrong"))
        with pytest.raises(openai.AuthenticationError):
            client(srv.url, key="wrong").models.list()
        raw = ask(client(srv.url), logprobs=True, top_logprobs=3)
        resp = raw.parse()
        choice = resp.choices[0]
        assert choice.message.content in LABELS
        assert raw.headers["x-distill-model"] == "champion"
        conf = float(raw.headers["x-distill-confidence"])
        first = choice.logprobs.content[0]
        assert first.token == choice.message.content
        assert [t.token for t in first.top_logprobs][0] == first.token
        assert sorted(t.token for t in first.top_logprobs) == sorted(LABELS)
        assert math.isclose(sum(math.exp(t.logprob) for t in first.top_logprobs), 1.0, rel_tol=1e-4)
        assert math.isclose(math.exp(first.logprob), conf, rel_tol=1e-4)
        assert resp.model_extra["distill"]["served_by"] == "champion"
        assert [m.id for m in client(srv.url).models.list().data] == ["distill-student"]
        import httpx

        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(srv.url + "/metrics").status_code == 401
        metrics = httpx.get(srv.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
        assert 'distill_requests_total{model="champion"} 1' in metrics
        assert 'distill_errors_total{code="401"} 3' in metrics
        app.state.drain()
    rows = ShadowLog(f"sqlite:///{tmp_path}/log.sqlite").recent()
    assert len(rows) == 1 and rows[0]["served_by"] == "champion" and rows[0]["text"] == "i love my new card"


def test_limits_bad_input_and_timeout(tiny_classifier, tmp_path):
    with start_in_thread(create_app(tiny_classifier, cfg(tmp_path, max_request_bytes=2048), api_key=KEY)) as srv:
        with pytest.raises(openai.APIStatusError) as e:
            ask(client(srv.url), text="card " * 1000)
        assert e.value.status_code == 413
        with pytest.raises(openai.BadRequestError):
            client(srv.url).chat.completions.create(model="distill-student", messages=[{"role": "system", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            ask(client(srv.url), stream=True)
        import httpx

        r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json",
                       headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # A deadline no forward pass can meet: the client gets 504, not a hang. The request goes out in
    # one write, so its body is already read when the deadline starts (a body still on its way
    # would be the 408 of a slow body instead, which test_serve_process checks).
    import json
    import socket

    with start_in_thread(create_app(tiny_classifier, cfg(tmp_path, timeout_s=1e-6), api_key=KEY)) as srv:
        payload = json.dumps({"model": "distill-student", "messages": MSG}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])), timeout=20) as sock:
            sock.sendall(head + payload)
            reply = sock.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 504"), reply


def test_refuses_pickled_weights(tiny_classifier, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_classifier, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin"):
        create_app(d, cfg(tmp_path))


def test_shadow_logs_every_model_without_slowing_the_answer(tiny_classifier, challenger_dir, teacher_url, tmp_path):
    teacher = TeacherConfig(base_url=teacher_url, model="tiny-teacher")
    app = create_app(tiny_classifier, cfg(tmp_path, shadow=True), challenger_dir=challenger_dir, teacher=teacher,
                     teacher_api_key="t", api_key=KEY)
    texts = ["i love my new card", "my card was declined", "how do i top up", "the app is terrible", "ok thanks"]
    with start_in_thread(app) as srv:
        for t in texts * 4:
            assert ask(client(srv.url), text=t).headers["x-distill-model"] == "champion"
        assert app.state.drain()
    rows = ShadowLog(f"sqlite:///{tmp_path}/log.sqlite").recent()
    assert len(rows) == 20
    for r in rows:
        assert r["served_by"] == "champion" and r["teacher_error"] is None
        for m in ("champion", "challenger", "teacher"):
            assert r[f"{m}_label"] in LABELS
            assert math.isclose(sum(r[f"{m}_probs"].values()), 1.0, rel_tol=1e-3)
        assert r["teacher_run"] == "tiny-teacher"

    # A slow teacher and then a dead one: the served answer neither waits nor fails.
    slow = start_in_thread(slow_teacher_app(2.0))
    log2 = tmp_path / "slow"
    log2.mkdir()
    app = create_app(tiny_classifier, cfg(log2, shadow=True), teacher=TeacherConfig(
        base_url=slow.url + "/v1", model="slow", timeout_s=0.5), teacher_api_key="t", api_key=KEY)
    with start_in_thread(app) as srv:
        c = client(srv.url)
        ask(c)  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            ask(c)
        assert (time.perf_counter() - t0) / 3 < 0.4
        slow.stop()
        assert ask(c).headers["x-distill-model"] == "champion"
        assert app.state.drain()
    rows = ShadowLog(f"sqlite:///{log2}/log.sqlite").recent()
    assert len(rows) == 5
    assert all(r["teacher_error"] and r["teacher_label"] is None and r["champion_label"] for r in rows)


def test_canary_routes_each_request_by_one_draw_and_reports_who_answered(tiny_classifier, challenger_dir,
                                                                         tmp_path):
    """Without a `user`, each request is routed by exactly one draw of the server's rng.

    The rng is seeded, so the expected routing is known request by request: a retry, a second draw,
    a header naming the wrong model or a batch that mixes the two models' rows all break the match.
    """
    import random

    seed, n = 20261203, 300
    app = create_app(tiny_classifier, cfg(tmp_path, canary_fraction=0.2, log_requests=False),
                     challenger_dir=challenger_dir, api_key=KEY, rng=random.Random(seed))
    twin = random.Random(seed)
    expected = ["challenger" if twin.random() < 0.2 else "champion" for _ in range(n)]
    with start_in_thread(app) as srv:
        c = client(srv.url)
        raws = [ask(c) for _ in range(n)]
    served = [r.headers["x-distill-model"] for r in raws]
    assert served == expected
    # The answer comes from the model the header names: one text, so one confidence per model.
    conf = {m: {r.headers["x-distill-confidence"] for r, s in zip(raws, served) if s == m} for m in set(served)}
    assert all(len(v) == 1 for v in conf.values()) and conf["champion"] != conf["challenger"], conf
    assert [r.parse().model_extra["distill"]["canary"] for r in raws] == [s == "challenger" for s in served]
    with pytest.raises(ConfigError, match="challenger"):
        create_app(tiny_classifier, cfg(tmp_path, canary_fraction=0.1))


def test_canary_share_by_user_is_fair_and_sticky(tiny_classifier, challenger_dir, tmp_path):
    """With a `user`, the route is a hash of it: deterministic, sticky, and a fair share over many users."""
    n = 300
    app = create_app(tiny_classifier, cfg(tmp_path, canary_fraction=0.2, log_requests=False),
                     challenger_dir=challenger_dir, api_key=KEY)
    with start_in_thread(app) as srv:
        c = client(srv.url)
        served = [ask(c, user=f"customer-{i}").headers["x-distill-model"] for i in range(n)]
        again = [ask(c, user=f"customer-{i}").headers["x-distill-model"] for i in range(0, n, 10)]
    assert again == served[::10]  # sticky: the same user meets the same model
    k = served.count("challenger")
    sd = math.sqrt(n * 0.2 * 0.8)
    assert abs(k - n * 0.2) < 3 * sd, k  # the hash of these ids is fixed: no flake, but an unfair hash fails


def test_teacher_fallback_below_confidence(tiny_classifier, teacher_url, tmp_path):
    # A random 3-label model is never 99 % sure: every request falls back to the teacher.
    teacher = TeacherConfig(base_url=teacher_url, model="tiny-teacher")
    app = create_app(tiny_classifier, cfg(tmp_path, fallback_confidence=0.99), teacher=teacher,
                     teacher_api_key="t", api_key=KEY)
    log = ShadowLog(f"sqlite:///{tmp_path}/log.sqlite")
    with start_in_thread(app) as srv:
        raw = ask(client(srv.url), logprobs=True, top_logprobs=2)
        resp = raw.parse()
        assert raw.headers["x-distill-model"] == "teacher"
        assert resp.choices[0].message.content in LABELS
        assert len(resp.choices[0].logprobs.content[0].top_logprobs) == 2
        # persisted before it was returned: no drain needed
        rows = log.recent()
        assert len(rows) == 1 and rows[0]["served_by"] == "teacher" and rows[0]["fallback"] == 1
        assert rows[0]["teacher_label"] == resp.choices[0].message.content and rows[0]["champion_label"] in LABELS

    # A teacher slower than the request deadline: the student's answer is served in time.
    slow = start_in_thread(slow_teacher_app(3.0))
    app = create_app(tiny_classifier, cfg(tmp_path / "s", fallback_confidence=0.99, timeout_s=0.6),
                     teacher=TeacherConfig(base_url=slow.url + "/v1", model="slow"), teacher_api_key="t",
                     api_key=KEY)
    with start_in_thread(app) as srv:
        t0 = time.perf_counter()
        raw = ask(client(srv.url))
        assert time.perf_counter() - t0 < 2.0
        assert raw.headers["x-distill-model"] == "champion"
        assert app.state.drain()
    slow.stop()
    rows = ShadowLog(f"sqlite:///{tmp_path}/s/log.sqlite").recent()
    assert rows[0]["fallback"] == 1 and "Timeout" in rows[0]["teacher_error"]
