import asyncio
import math

import pytest

from distill.config import ServeConfig
from distill.evaluate import latency
from distill.httpserver import start_in_thread

PAYLOADS = [{"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(7)]


def _app(delay_for):
    """A chat endpoint whose n-th request (0-based, in arrival order) sleeps delay_for(n) seconds."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = {"n": 0, "keys": set()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        n = state["n"]
        state["n"] += 1
        state["keys"].add(request.headers.get("authorization"))
        delay = delay_for(n)
        if delay is None:
            return JSONResponse({"error": "boom"}, status_code=500)
        await asyncio.sleep(delay)
        body = await request.json()
        return {"choices": [{"message": {"role": "assistant", "content": body["messages"][-1]["content"]}}]}

    app.state.counter = state
    return app


def test_percentiles_against_a_server_with_known_delay():
    app = _app(lambda n: 0.05)
    with start_in_thread(app) as server:
        r = latency.measure(f"{server.url}/v1/chat/completions", PAYLOADS, n_requests=40, concurrency=4,
                            api_key="sekret", warmup=2)
    assert r["ok"] == 40 and r["errors"] == 0
    assert app.state.counter["n"] == 42  # 2 warm-up requests + 40 measured
    assert app.state.counter["keys"] == {"Bearer sekret"}
    assert 50 <= r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["p50_ms"] < 150
    # Four clients in parallel: about 40 x 50 ms / 4 = 0.5 s of wall time; one at a time would take 2 s.
    assert r["wall_s"] < 1.6
    assert 25 < r["throughput_rps"] <= 81
    assert "sekret" not in repr(r)


def test_machine_cpu_per_request_counts_cpu_not_waiting():
    """A handler that computes for 4 ms costs the machine at least that per request; one that sleeps
    50 ms costs it little: the figure is CPU, the basis of the bound on mean latency under load."""
    import time

    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        if body["messages"][0]["content"] == "sleep":
            await asyncio.sleep(0.05)
        else:
            t0 = time.thread_time()
            while time.thread_time() - t0 < 0.004:
                pass
        return {"choices": [{"message": {"role": "assistant", "content": "x"}}]}

    burn = [{"model": "m", "messages": [{"role": "user", "content": "burn"}]}]
    sleep = [{"model": "m", "messages": [{"role": "user", "content": "sleep"}]}]
    with start_in_thread(app) as server:
        url = f"{server.url}/v1/chat/completions"
        busy = latency.measure(url, burn, n_requests=100, concurrency=2, lean=True)
        idle = latency.measure(url, sleep, n_requests=20, concurrency=2, lean=True)
    if math.isnan(busy["machine_cpu_ms_per_request"]):
        pytest.skip("no /proc/stat on this machine")
    assert busy["machine_cpu_ms_per_request"] >= 3.6, busy
    assert idle["machine_cpu_ms_per_request"] < 15, idle


def test_tail_latency_is_visible_in_p95():
    # One request in ten is slow: the median stays fast, P95 and P99 are the slow ones.
    app = _app(lambda n: 0.3 if n % 10 == 9 else 0.01)
    with start_in_thread(app) as server:
        r = latency.measure(f"{server.url}/v1/chat/completions", PAYLOADS, n_requests=50, concurrency=5, warmup=0)
    assert r["ok"] == 50
    assert r["p50_ms"] < 150
    assert r["p95_ms"] >= 300 and r["p99_ms"] >= 300


def test_failed_requests_are_counted_not_timed_and_bodies_kept():
    app = _app(lambda n: None if n % 4 == 0 else 0.0)
    with start_in_thread(app) as server:
        r = latency.measure(f"{server.url}/v1/chat/completions", PAYLOADS, n_requests=20, concurrency=1, warmup=0,
                            keep_bodies=True)
    assert r["errors"] == 5 and r["ok"] == 15 and r["error_kinds"] == {"HTTP 500": 5}
    assert r["bodies"][1]["choices"][0]["message"]["content"] == "q1"
    r = latency.measure("http://127.0.0.1:9/v1/chat/completions", PAYLOADS, n_requests=3, concurrency=1,
                        warmup=0, timeout_s=2)
    assert r["errors"] == 3 and math.isnan(r["p50_ms"])


def test_measure_works_inside_a_running_event_loop():
    app = _app(lambda n: 0.0)

    async def inner():
        return latency.measure(f"{server.url}/v1/chat/completions", PAYLOADS, n_requests=10, concurrency=2)

    with start_in_thread(app) as server:
        r = asyncio.run(inner())
    assert r["ok"] == 10


def test_costs():
    # $0.36/hour at 10 req/s: 36,000 requests per hour, so $0.01 per 1,000.
    assert latency.student_cost_per_1k(0.36, 10.0) == pytest.approx(0.01)
    assert math.isnan(latency.student_cost_per_1k(0.36, float("nan")))
    records = [{"status": "done", "usage": {"prompt_tokens": 100, "completion_tokens": 10}, "cost_usd": 0.5},
               {"status": "done", "usage": {"prompt_tokens": 300, "completion_tokens": 30}, "cost_usd": 0.5},
               {"status": "failed", "usage": None}]
    # mean 200 prompt and 20 completion tokens at $1 / $10 per 1M: 0.0004 per request.
    assert latency.teacher_cost_per_1k(records, (1.0, 10.0)) == pytest.approx(0.4)
    assert latency.teacher_cost_per_1k(records, (0.0, 0.0)) == pytest.approx(500.0)
    assert math.isnan(latency.teacher_cost_per_1k([], (1.0, 1.0)))
    assert latency.chat_payloads([{"messages": [1]}, {"messages": [2]}], "m", limit=1) == [
        {"model": "m", "messages": [1], "temperature": 0.0, "max_tokens": 32}]


def test_student_servers_answer_with_a_label(tiny_classifier, tmp_path):
    labels = {"positive", "negative", "neutral"}
    with start_in_thread(latency.minimal_student_app(tiny_classifier)) as server:
        r = latency.measure(f"{server.url}/v1/chat/completions", PAYLOADS, n_requests=10, concurrency=2,
                            keep_bodies=True)
    assert r["ok"] == 10
    assert {b["choices"][0]["message"]["content"] for b in r["bodies"]} <= labels
    served = [{**p, "model": "distill-student"} for p in PAYLOADS]
    # The default log_url is relative (.distill/ under the working directory): this log belongs in tmp_path.
    serve = ServeConfig(log_url=f"sqlite:///{tmp_path}/log.sqlite")
    with latency.student_server(tiny_classifier, serve, api_key="k") as (url, kind):
        r = latency.measure(url, served, n_requests=10, concurrency=2, api_key="k", keep_bodies=True)
        wrong_key = latency.measure_process(url, served, n_requests=4, concurrency=2, api_key="nope")
        by_process = latency.sweep(url, served, 12, [1, 4], api_key="k")
    assert r["ok"] == 10 and kind == "distill serve"
    assert wrong_key["ok"] == 0 and wrong_key["error_kinds"] == {"HTTP 401": 4}
    assert [by_process[c]["ok"] for c in (1, 4)] == [12, 12] and by_process[4]["concurrency"] == 4
    assert {b["choices"][0]["message"]["content"] for b in r["bodies"]} <= labels
