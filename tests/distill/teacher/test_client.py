"""The teacher client against real HTTP servers on 127.0.0.1 that inject faults.

The fault server decides what to do from the user message: "<kind>x<k> ..." makes
the first k attempts for that prompt fail with <kind>; every request is counted
per prompt so the tests can prove what was (not) sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from starlette.requests import Request

from distill.config import ConfigError, GenerationConfig, TeacherConfig
from distill.httpserver import start_in_thread
from distill.offline import OFFLINE_ENV
from distill.teacher.client import parse_completion, retry_after_s, sampling_params
from distill.teacher.generation import estimate_cost, generate, load_prompt_rows
from distill.teacher.signals import token_logprobs

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-test-0123456789-SECRET"


def completion(content: str, finish: str = "stop", logprobs: bool = False) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
              "logprobs": None}
    if logprobs:
        choice["logprobs"] = {"content": [{"token": content, "logprob": -0.1, "bytes": None,
                                           "top_logprobs": [{"token": content, "logprob": -0.1, "bytes": None},
                                                            {"token": "other", "logprob": -2.4, "bytes": None}]}]}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fault-teacher",
            "choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}


def fault_app(latency: float = 0.0, hang_s: float = 1.5):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()
    app.state.counts = Counter()
    app.state.times = defaultdict(list)
    app.state.auth = set()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        user = body["messages"][-1]["content"]
        app.state.counts[user] += 1
        app.state.times[user].append(time.monotonic())
        app.state.auth.add(request.headers.get("authorization"))
        n = app.state.counts[user]
        if latency:
            await asyncio.sleep(latency)
        kind, _, k = user.split(" ")[0].partition("x")
        if k.isdigit() and n <= int(k):
            if kind == "429":
                return JSONResponse({"error": {"message": "Rate limit reached", "type": "rate_limit"}}, 429,
                                    headers={"Retry-After": "0.3"})
            if kind == "500":
                return JSONResponse({"error": {"message": "boom"}}, 500)
            if kind == "hang":
                await asyncio.sleep(hang_s)
            if kind == "badjson":
                return Response(b'{"choices": [', media_type="application/json")
            if kind == "nochoices":
                return JSONResponse({"id": "x", "choices": []})
            if kind == "empty":
                return JSONResponse(completion(""))
            if kind == "400":
                return JSONResponse({"error": {"message": "bad request: messages too long"}}, 400)
            if kind == "401":
                return JSONResponse({"error": {"message": f"Incorrect API key provided: {SECRET}"}}, 401)
            if kind == "policy":
                return JSONResponse({"error": {"message": "flagged", "code": "content_policy_violation"}}, 400)
        finish = "length" if kind == "truncate" else "stop"
        return JSONResponse(completion(f"answer to {user}", finish, bool(body.get("logprobs"))))

    return app


@pytest.fixture
def server():
    with start_in_thread(fault_app()) as srv:
        yield srv


def rows_for(*users: str) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": u}]}
            for i, u in enumerate(users)]


def cfgs(url: str, tmp_path: Path, **gen) -> tuple[TeacherConfig, GenerationConfig]:
    teacher = TeacherConfig(base_url=url + "/v1", model="fault-teacher", timeout_s=0.5, api_key_env="DISTILL_TEST_KEY",
                            input_price_per_1m=1.0, output_price_per_1m=2.0)
    defaults = dict(concurrency=8, max_retries=4, backoff_base_s=0.01, backoff_max_s=0.05, top_logprobs=2,
                    cache_path=tmp_path / "cache.sqlite")
    return teacher, GenerationConfig(**{**defaults, **gen})


@pytest.mark.parametrize("body,expect", [
    (json.dumps(completion("billing")), ("billing", None)),
    (json.dumps(completion("  billing \n", "length")), ("  billing \n", None)),
    (b'{"choices": [', (None, "malformed")),
    (json.dumps({"choices": []}), (None, "malformed")),
    (json.dumps(completion(None)), (None, "malformed")),
    (json.dumps(completion("   ")), (None, "malformed")),
    (json.dumps([1, 2]), (None, "malformed")),
    (json.dumps(completion("x", "content_filter")), (None, "content_policy")),
])
def test_parse_completion(body, expect):
    fields, error, retryable = parse_completion(body)
    assert (fields["response"] if fields else None) == expect[0]
    assert (error.split(":")[0] if error else None) == expect[1]
    assert retryable == (expect[1] != "content_policy")
    if fields:
        assert fields["truncated"] == (fields["finish_reason"] == "length")
        assert fields["usage"] == {"prompt_tokens": 10, "completion_tokens": 2}


def test_retry_after_forms():
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_s({"retry-after": http_date}) <= 31
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None


def test_faults_end_in_one_final_record_each_and_rerun_sends_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", SECRET)
    users = ["ok a", "429x2 b", "500x2 c", "hangx1 d", "badjsonx1 e", "nochoicesx1 f", "emptyx99 g",
             "truncatex0 h", "400x99 i", "401x99 j", "policyx99 k", "500x99 l"]
    rows = rows_for(*users)
    teacher, gen = cfgs(server.url, tmp_path)
    seen = []
    res = generate(rows, teacher, gen, progress=lambda n, total: seen.append((n, total)))
    by = {r["messages"][-1]["content"]: r for r in res.records}
    assert [r["id"] for r in res.records] == [r["id"] for r in rows]
    assert seen[-1] == (len(rows), len(rows)) and len(seen) == len(rows)
    counts = server.server.config.app.state.counts
    for u in ["ok a", "429x2 b", "500x2 c", "hangx1 d", "badjsonx1 e", "nochoicesx1 f", "truncatex0 h"]:
        assert by[u]["status"] == "done", (u, by[u]["error"])
        assert by[u]["response"] == f"answer to {u}" and token_logprobs(by[u])[0]["top_logprobs"]
        assert by[u]["attempts"] == counts[u]
    assert by["429x2 b"]["attempts"] == 3 and by["hangx1 d"]["attempts"] == 2
    t = server.server.config.app.state.times["429x2 b"]
    assert t[1] - t[0] >= 0.29 and t[2] - t[1] >= 0.29  # Retry-After honoured
    assert by["truncatex0 h"]["truncated"] and not by["ok a"]["truncated"]
    assert by["ok a"]["usage"] == {"prompt_tokens": 10, "completion_tokens": 2}
    assert by["ok a"]["cost_usd"] == pytest.approx((10 * 1.0 + 2 * 2.0) / 1e6)
    assert by["ok a"]["params"] == sampling_params(gen) and by["ok a"]["model"] == "fault-teacher"
    # Permanent errors: one attempt, a reason, never retried.
    for u, reason in [("400x99 i", "http_400"), ("401x99 j", "http_401"), ("policyx99 k", "content_policy")]:
        assert by[u]["status"] == "failed" and by[u]["error"].startswith(reason + ":") and counts[u] == 1
    assert by["emptyx99 g"]["error"].startswith("malformed: empty content") and counts["emptyx99 g"] == 3
    assert by["500x99 l"]["error"].startswith("http_500") and counts["500x99 l"] == 5
    s = res.summary
    assert (s["requested"], s["done"], s["failed"], s["cached"], s["truncated"]) == (12, 7, 5, 0, 1)
    assert s["failed_by_reason"] == {"malformed": 1, "http_400": 1, "http_401": 1, "content_policy": 1,
                                     "http_500": 1}
    assert s["prompt_tokens"] == 70 and s["http_requests"] == sum(counts.values())
    assert server.server.config.app.state.auth == {f"Bearer {SECRET}"}
    # The key never lands in records or the cache, even when the server echoes it.
    assert SECRET not in json.dumps(res.records) and SECRET not in json.dumps(s)
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("cache.sqlite*"))

    again = generate(rows, teacher, gen)
    failed = {"emptyx99 g", "400x99 i", "401x99 j", "policyx99 k", "500x99 l"}
    # Only the failed rows are asked again; every stored answer comes from the cache, unpaid.
    resent = {u for u in users if counts[u] > by[u]["attempts"]}
    assert resent == failed
    assert again.summary["cached"] == 7 and again.summary["cost_usd"] == 0
    assert [r["response"] for r in again.records if r["status"] == "done"] == \
           [r["response"] for r in res.records if r["status"] == "done"]


def test_samples_and_identical_prompts_share_the_cache(server, tmp_path):
    rows = rows_for("ok same", "ok same", "ok other")
    teacher, gen = cfgs(server.url, tmp_path, samples_per_prompt=3, temperature=1.0, logprobs=False)
    res = generate(rows, teacher, gen)
    counts = server.server.config.app.state.counts
    assert [(r["id"], r["sample"]) for r in res.records] == [(f"r{i}", s) for i in range(3) for s in range(3)]
    assert all(r["status"] == "done" and r["logprobs"] is None for r in res.records)
    # Three samples per distinct prompt; the duplicate prompt is bought once and copied for free.
    assert counts == {"ok same": 3, "ok other": 3}
    assert res.summary["cached"] == 3 and res.summary["cost_usd"] == pytest.approx(6 * 14 / 1e6)
    assert estimate_cost(rows, teacher, gen)["to_send"] == 0
    more = generate(rows, teacher, gen.model_copy(update={"samples_per_prompt": 4}))
    assert counts == {"ok same": 4, "ok other": 4} and more.summary["cached"] == 12 - 2


def test_budget_cap_stops_new_requests_and_keeps_what_was_bought(server, tmp_path):
    rows = rows_for(*[f"ok {i}" for i in range(20)])
    teacher, gen = cfgs(server.url, tmp_path, concurrency=1)
    teacher = teacher.model_copy(update={"input_price_per_1m": 1e4, "output_price_per_1m": 1e4})
    # A request is sent only if it fits even at its worst case (max_tokens); each really costs 12 tokens.
    worst = estimate_cost(rows[:1], teacher, gen)["cost_usd"]
    actual = 12 * 1e4 / 1e6
    gen = gen.model_copy(update={"budget_usd": 5 * actual + 0.99 * worst})
    res = generate(rows, teacher, gen)
    counts = server.server.config.app.state.counts
    s = res.summary
    assert s["budget_exhausted"] and s["cost_usd"] == pytest.approx(5 * actual) and s["cost_usd"] <= gen.budget_usd
    bought = [r for r in res.records if r["status"] == "done"]
    assert len(bought) == sum(counts.values()) == 5
    assert s["failed_by_reason"] == {"budget_exhausted": 20 - len(bought)}
    again = generate(rows, teacher, gen.model_copy(update={"budget_usd": None}))
    assert again.summary["done"] == 20 and again.summary["cached"] == len(bought)
    assert set(counts.values()) == {1}


def test_rate_limit_spaces_requests(server, tmp_path):
    rows = rows_for(*[f"ok {i}" for i in range(8)])
    teacher, gen = cfgs(server.url, tmp_path, concurrency=8, requests_per_minute=1200)  # one per 50 ms
    res = generate(rows, teacher, gen)
    assert res.summary["done"] == 8
    starts = sorted(t for ts in server.server.config.app.state.times.values() for t in ts)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # Arrival times are read at the server, where a busy machine can bunch two requests the client
    # sent 50 ms apart; an absent limiter bunches all seven gaps and the whole span.
    assert sum(g < 0.03 for g in gaps) <= 2, gaps
    assert starts[-1] - starts[0] >= 0.3, gaps


def test_token_rate_limit_counts_prompt_and_completion_budget(server, tmp_path):
    rows = rows_for(*[f"ok {i}" for i in range(4)])
    # Each request reserves its prompt estimate (12 tokens) plus max_tokens (43): 55 tokens at 60/s = 0.92 s,
    # so four requests sent at once start about 0.92 s apart.
    teacher, gen = cfgs(server.url, tmp_path, concurrency=4, tokens_per_minute=3600, max_tokens=43)
    res = generate(rows, teacher, gen)
    assert res.summary["done"] == 4
    starts = sorted(t for ts in server.server.config.app.state.times.values() for t in ts)
    assert starts[-1] - starts[0] >= 2.5


def test_connection_refused_is_retried_then_recorded(tmp_path):
    from distill.httpserver import free_port

    teacher, gen = cfgs(f"http://127.0.0.1:{free_port()}", tmp_path, max_retries=2)
    res = generate(rows_for("ok a"), teacher, gen)
    r = res.records[0]
    assert r["status"] == "failed" and r["error"].startswith("connection:") and r["attempts"] == 3


def test_bad_rows_are_config_errors(tmp_path):
    teacher, gen = cfgs("http://127.0.0.1:9", tmp_path)
    with pytest.raises(ConfigError, match="duplicate id"):
        generate(rows_for("a") * 2, teacher, gen)
    with pytest.raises(ConfigError, match="line 7: 'messages'"):
        generate([{"id": "x", "messages": "hi", "_line": 7}], teacher, gen)


def test_load_prompt_rows_renders_the_production_prompt(tmp_path):
    from distill.config import TaskConfig

    task = TaskConfig(name="prompts", train_path=tmp_path / "unused.csv", labels=["a", "b"], system_prompt="SYS",
                      prompt_template="Q: {text}")
    p = tmp_path / "in.jsonl"
    p.write_text('{"id": 1, "text": "hello"}\n'
                 '{"id": 2, "messages": [{"role": "user", "content": "raw"}]}\n')
    rows = load_prompt_rows(p, task)
    # A classification teacher is told the label set: appended, since no {labels} placeholder places it.
    system = "SYS\n\nAnswer with exactly one of these labels:\n- a\n- b"
    assert rows[0]["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": "Q: hello"}]
    assert rows[1]["messages"] == [{"role": "user", "content": "raw"}]
    p.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(ConfigError, match=r"in.jsonl:2: duplicate id"):
        load_prompt_rows(p, task)
    p.write_text('{"id": 1, "other": "a"}\n')
    with pytest.raises(ConfigError, match=r"in.jsonl:1: task.prompt_template: placeholder 'text'"):
        load_prompt_rows(p, task)
    p.write_text('{"id": 1, "messages": [{"role": "user"}]}\n')
    with pytest.raises(ConfigError, match=r"in.jsonl:1: 'messages'"):
        load_prompt_rows(p, task)


def _cli(cfg: Path, inp: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distill_flows.cli", "generate", str(cfg), "--input", str(inp), "--output", str(out),
            "--set", f"teacher.base_url={url}/v1", "--no-progress", *extra]


def test_sigkill_mid_run_then_resume_pays_nothing_twice(tmp_path):
    n = 60
    with start_in_thread(fault_app(latency=0.05)) as srv:
        counts = srv.server.config.app.state.counts
        cfg = tmp_path / "gen.yaml"
        cfg.write_text(f"teacher:\n  model: fault-teacher\n  timeout_s: 5\n"
                       f"generation:\n  concurrency: 4\n  cache_path: {tmp_path / 'cache.sqlite'}\n")
        inp = tmp_path / "prompts.jsonl"
        inp.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"ok {i}"}]})
                               + "\n" for i in range(n)))
        out = tmp_path / "out.jsonl"
        env = {**os.environ, **OFFLINE_ENV}
        proc = subprocess.Popen(_cli(cfg, inp, out, srv.url), cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while sum(counts.values()) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not out.exists()
        with sqlite3.connect(tmp_path / "cache.sqlite") as db:
            stored = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        first = Counter(counts)
        assert 0 < stored < n and sum(first.values()) < n
        done = subprocess.run(_cli(cfg, inp, out, srv.url), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        second = counts - first
        records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"p{i}" for i in range(n)]
    assert all(r["status"] == "done" for r in records)
    # Every stored response is reused; only the requests never stored (not sent, or in flight at the kill) go out.
    assert sum(1 for r in records if r["cached"]) == stored
    assert sum(second.values()) == n - stored
    assert all(first[f"ok {i}"] + second[f"ok {i}"] <= 2 for i in range(n))
    assert sum(1 for u in counts if counts[u] == 2) <= 4  # at most the concurrency was in flight


def test_dry_run_calls_nothing(tmp_path):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"teacher:\n  input_price_per_1m: 2.0\n  output_price_per_1m: 8.0\n"
                   f"generation:\n  max_tokens: 10\n  cache_path: {tmp_path / 'c.sqlite'}\n")
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"id": 1, "messages": [{"role": "user", "content": "' + "x" * 400 + '"}]}\n')
    out = subprocess.run(_cli(cfg, inp, tmp_path / "o.jsonl", "http://127.0.0.1:9", "--dry-run"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "prompt_tokens: 107" in out.stdout and "cost_usd: 0.000294" in out.stdout
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "c.sqlite").exists()


@pytest.fixture(scope="module")
def teacher_server(tiny_classifier):
    from distill.teacher.server import create_app

    with start_in_thread(create_app(tiny_classifier, "tiny")) as srv:
        yield srv


def test_batch_mode_over_real_http_matches_online_and_resumes(teacher_server, tmp_path):
    rows = rows_for(*["good card", "bad money", "ok fine", "lost card"])
    teacher = TeacherConfig(base_url=teacher_server.url + "/v1", model="tiny", input_price_per_1m=1.0,
                            output_price_per_1m=1.0)
    gen = GenerationConfig(mode="batch", batch_poll_s=0.05, top_logprobs=3, cache_path=tmp_path / "b.sqlite")
    res = generate(rows, teacher, gen)
    assert res.summary["done"] == 4, res.records
    online = generate(rows, teacher, gen.model_copy(update={"mode": "online", "cache_path": tmp_path / "o.sqlite"}))
    for b, o in zip(res.records, online.records):
        assert b["response"] == o["response"] in ("positive", "negative", "neutral")
        assert len(token_logprobs(b)[0]["top_logprobs"]) == 3 and b["logprobs"] is None  # kept compact
        assert b["cost_usd"] == pytest.approx(o["cost_usd"] * 0.5)
    with sqlite3.connect(tmp_path / "b.sqlite") as db:
        assert db.execute("SELECT status FROM batches").fetchall() == [("completed",)]
    # A batch left open by a killed run is collected, not bought again.
    with sqlite3.connect(tmp_path / "b.sqlite") as db:
        db.execute("DELETE FROM responses")
        db.execute("UPDATE batches SET status = 'open'")
    before = len(teacher_server.server.config.app.state.batch_store.batches)
    again = generate(rows, teacher, gen)
    assert again.summary["done"] == 4 and again.summary["cached"] == 0
    assert len(teacher_server.server.config.app.state.batch_store.batches) == before
