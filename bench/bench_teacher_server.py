"""Requests/s of `distill teacher serve` with the demo's MiniLM embedding-classifier teacher.

Fits the teacher on a slice of BANKING77, serves it on loopback and fires chat
completions (logprobs, top_logprobs=20) at a fixed concurrency, once with
dynamic batching and once with batching off (max_batch=1) for comparison.

    .venv/bin/python bench/bench_teacher_server.py --requests 2000 --concurrency 32
"""

import argparse
import asyncio
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from distill.offline import apply_offline_env

apply_offline_env()


async def fire(url: str, model: str, texts: list[str], concurrency: int, key: str) -> tuple[float, list[float]]:
    import aiohttp

    queue = list(reversed(texts))
    latencies: list[float] = []

    async def worker(session):
        while queue:
            text = queue.pop()
            t0 = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                    "logprobs": True, "top_logprobs": 20}) as r:
                body = await r.json()
                assert r.status == 200, body
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     headers={"Authorization": f"Bearer {key}"}) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--fit-rows", type=int, default=770, help="BANKING77 rows the teacher head is fitted on.")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, nargs="*", default=[0],
                    help="Torch threads per run (0: the server default, all cores but one).")
    ap.add_argument("--no-baseline", action="store_true", help="Skip the max_batch=1 comparison run.")
    args = ap.parse_args()

    import secrets

    import httpx

    from distill.config import BUNDLED_DATA
    from distill.httpserver import start_in_thread
    from distill.models.encoders import MINILM, EmbeddingClassifier
    from distill.teacher.server import create_app

    with open(BUNDLED_DATA / "banking77" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = json.loads((BUNDLED_DATA / "banking77" / "categories.json").read_text())
    step = max(len(rows) // args.fit_rows, 1)
    fit = rows[::step][: args.fit_rows]
    texts = [rows[(i * 7919) % len(rows)]["text"] for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        EmbeddingClassifier.fit(MINILM, [r["text"] for r in fit], [r["category"] for r in fit], labels).save(
            Path(tmp) / "teacher")
        runs = [("dynamic batching", args.max_batch, t) for t in args.threads]
        runs += [] if args.no_baseline else [("no batching", 1, args.threads[0])]
        key = secrets.token_urlsafe(16)  # served as in production: authenticated
        for name, max_batch, threads in runs:
            app = create_app(Path(tmp) / "teacher", "bench", max_batch=max_batch, batch_wait_ms=args.batch_wait_ms,
                             threads=threads or None, api_key=key)
            with start_in_thread(app) as server:
                asyncio.run(fire(server.url, "bench", texts[:64], args.concurrency, key))  # warm-up
                before = httpx.get(server.url + "/health").json()
                wall, lat = asyncio.run(fire(server.url, "bench", texts, args.concurrency, key))
                after = httpx.get(server.url + "/health").json()
            batches = after["batches"] - before["batches"]
            lat.sort()
            print(f"teacher_server {name:>16} (max_batch={max_batch}, threads={after['threads']}): "
                  f"{len(texts) / wall:8.1f} req/s  "
                  f"concurrency={args.concurrency} requests={len(texts)} "
                  f"mean_batch={len(texts) / max(batches, 1):.1f} "
                  f"p50={statistics.median(lat) * 1000:.1f}ms p95={lat[int(0.95 * (len(lat) - 1))] * 1000:.1f}ms "
                  f"cpus={os.cpu_count()}")


if __name__ == "__main__":
    main()
