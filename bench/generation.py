"""Teacher-client throughput against a fixed-latency OpenAI-compatible server on 127.0.0.1.

The server runs in its own process (so its CPU is not counted as the client's) and
answers every chat completion after `--latency-ms`. For each concurrency C the
client (`distill.teacher.generate`, with a fresh request cache, so every answer is
also committed to SQLite) sends C * waves distinct requests. Reported:

- achieved requests/s as a ratio of the server-limited rate min(C / latency, rate limit),
- the sequential loop baseline (one request at a time: 1/C of that limit),
- client CPU per request (process CPU time of the client / requests).

Usage: python bench/generation.py [--latency-ms 200] [--concurrency 1 16 64 256] [--rpm N] [--waves 10]
The last line is machine-readable: ratio_c64=<float> cpu_ms_per_request=<float>
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.offline import apply_offline_env  # noqa: E402


def serve(port: int, latency_s: float) -> None:
    """The fixed-latency server (child process): a label with top-5 logprobs, like a classifier teacher."""
    import asyncio

    from aiohttp import web

    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pending_transfer"]
    lp = {"content": [{"token": labels[0], "logprob": -0.05, "bytes": None,
                       "top_logprobs": [{"token": l, "logprob": -0.05 - i, "bytes": None} for i, l in enumerate(labels)]}]}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(latency_s)
        return web.json_response({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": body.get("model", "bench"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": labels[0]}, "finish_reason": "stop",
                         "logprobs": lp if body.get("logprobs") else None}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


def start_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    from distill.httpserver import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency-ms", str(latency_s * 1000)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("bench server did not start")
            time.sleep(0.05)


def run_once(url: str, concurrency: int, n: int, rpm: float | None, tag: str) -> tuple[float, float, int]:
    """(requests/s, client CPU ms per request, done) for n distinct requests at this concurrency."""
    from distill.config import GenerationConfig, TeacherConfig
    from distill.teacher.generation import generate

    rows = [{"id": f"{tag}-{i}", "messages": [
        {"role": "system", "content": "Classify the customer's message into exactly one banking intent."},
        {"role": "user", "content": f"my card has not arrived yet, order {tag}-{i}"}]} for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = TeacherConfig(base_url=url + "/v1", model="bench", timeout_s=30)
        gen = GenerationConfig(concurrency=concurrency, requests_per_minute=rpm, top_logprobs=5, max_tokens=8,
                               cache_path=Path(tmp) / "cache.sqlite")
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = generate(rows, teacher, gen, api_key="")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = result.summary["done"]
    return done / wall, 1000 * cpu / max(done, 1), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--latency-ms", type=float, default=200.0, help="Server latency per request.")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256], help="Concurrencies to measure.")
    ap.add_argument("--rpm", type=float, default=None, help="Client rate limit in requests/min (none by default).")
    ap.add_argument("--waves", type=int, default=10, help="Requests per run = concurrency * waves (at least 20).")
    args = ap.parse_args()
    latency = args.latency_ms / 1000
    if args.serve:
        serve(args.serve, latency)
        return
    apply_offline_env()
    proc, url = start_server(latency)
    try:
        run_once(url, 8, 16, None, "warmup")  # imports, first connections
        seq_rps = None
        c64 = None
        print(f"server latency {args.latency_ms:.0f} ms, rate limit "
              f"{'none' if not args.rpm else f'{args.rpm:g}/min'}, client pid {os.getpid()}")
        print(f"{'C':>5} {'requests':>8} {'req/s':>8} {'limit/s':>8} {'ratio':>6} {'seq_ratio':>9} {'cpu_ms/req':>10}")
        for c in args.concurrency:
            limit = c / latency if not args.rpm else min(c / latency, args.rpm / 60)
            n = max(20, c * args.waves)
            rps, cpu_ms, done = run_once(url, c, n, args.rpm, f"c{c}")
            if c == 1:
                seq_rps = rps
            seq = (seq_rps if seq_rps else 1 / latency) / limit
            print(f"{c:>5} {done:>8} {rps:>8.1f} {limit:>8.1f} {rps / limit:>6.3f} {seq:>9.3f} {cpu_ms:>10.3f}",
                  flush=True)
            if c == 64:
                c64 = (rps / limit, cpu_ms)
        print("sequential loop baseline: one request at a time reaches 1/latency requests/s, i.e. 1/C of the limit "
              "(seq_ratio column)")
        if c64:
            print(f"ratio_c64={c64[0]:.3f} cpu_ms_per_request={c64[1]:.3f}")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
