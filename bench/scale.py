"""A million prompts through `distill generate-dataset` (generate, then filter) against a zero-latency teacher.

The teacher is a loopback OpenAI-compatible server in its own process that answers at once
(a BANKING77 label with top-5 logprobs and usage) and counts how often it was asked each
prompt. The distill command runs as users run it, as its own process, with a fresh request
cache. This script:

1. writes `--rows` distinct prompts (BANKING77 texts, numbered) as JSONL;
2. starts `distill generate-dataset`, SIGKILLs its process group once the teacher has answered
   half the prompts, and starts it again on the same output directory, which finishes the job;
3. samples the resident memory of the command's whole process tree (Prefect's server included)
   every 0.2 s;
4. answers a `--scaling-rows` slice with 1 and 2 shard workers (threads of the command's process), and
   with 2 Dask worker processes, each with a fresh cache.

Printed, all from this run: end-to-end requests/s (both runs, restart included), peak RSS,
request-cache bytes per record, the requests the teacher answered twice after the kill (the
resume may repeat only what was in flight: at most generation.concurrency), and the
1-versus-2-worker ratio. The last line:

    rows=N rps=R peak_rss_mb=M cache_bytes_per_record=B repaid_after_kill=K

    .venv/bin/python bench/scale.py                      # 1,000,000 prompts (~10 min on 2 cores)
    .venv/bin/python bench/scale.py --rows 50000 --scaling-rows 20000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "distill" / "data" / "banking77"


def teacher(port: int) -> None:
    """The zero-latency teacher (child process): a label per prompt, top-5 logprobs, and a count per prompt."""
    import hashlib

    from aiohttp import web

    labels = json.loads((DATA / "categories.json").read_text())
    counts: dict[bytes, int] = {}
    total = [0]

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        text = body["messages"][-1]["content"]
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        counts[digest] = counts.get(digest, 0) + 1
        total[0] += 1
        n = int.from_bytes(digest[:4], "big")
        top = [labels[(n + i) % len(labels)] for i in range(5)]
        lp = {"content": [{"token": top[0], "logprob": -0.05, "bytes": None,
                           "top_logprobs": [{"token": t, "logprob": -0.05 - 2 * i, "bytes": None}
                                            for i, t in enumerate(top)]}]}
        return web.json_response({
            "id": "chatcmpl-scale", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": top[0]}, "finish_reason": "stop",
                         "logprobs": lp if body.get("logprobs") else None}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": total[0], "distinct": len(counts),
                                  "repeated": total[0] - len(counts)})

    async def reset(request: web.Request) -> web.Response:
        counts.clear()
        total[0] = 0
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def get(url: str, method: str = "GET") -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"" if method == "POST" else None),
                                timeout=10) as r:
        return json.loads(r.read())


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def write_prompts(path: Path, n: int) -> None:
    import csv

    with (DATA / "train.csv").open(newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "text": f"{texts[i % len(texts)]} (request {i})"}) + "\n")


def write_config(path: Path, port: int, cache: Path, workers: int, concurrency: int, shard_rows: int,
                 runner: str = "threads") -> None:
    import yaml

    path.write_text(yaml.safe_dump({
        "task": {"name": "scale-bench", "kind": "classification", "train_path": str(DATA / "train.csv"),
                 "labels_path": str(DATA / "categories.json"), "text_field": "text",
                 "system_prompt": "Classify the banking question. Answer with the label only."},
        "teacher": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "scale-teacher",
                    "input_price_per_1m": 0.15, "output_price_per_1m": 0.6},
        "generation": {"concurrency": concurrency, "max_tokens": 8, "logprobs": True, "top_logprobs": 5,
                       "cache_path": str(cache), "shard_rows": shard_rows, "shard_workers": workers,
                       "max_retries": 2, "task_runner": runner},
    }))


def run_distill(config: Path, prompts: Path, out: Path, env: dict, kill_at: int | None, stats_url: str,
                log: Path) -> dict:
    """One `distill generate-dataset` run; SIGKILL once the teacher has answered `kill_at` requests in total."""
    cmd = [str(Path(sys.executable).with_name("distill")), "generate-dataset", str(config), "--input", str(prompts),
           "--out-dir", str(out)]
    t0 = time.perf_counter()
    with log.open("ab") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=err, start_new_session=True)
    peak, killed = 0.0, False
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        if kill_at is not None and get(stats_url)["requests"] >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            proc.wait()
            break
        time.sleep(0.2)
    if not killed and proc.returncode != 0:
        raise SystemExit(f"distill generate-dataset failed ({proc.returncode}); see {log}:\n"
                         + log.read_text(errors="replace")[-3000:])
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb": peak, "killed": killed}


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.parent.glob(cache.name + "*"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--scaling-rows", type=int, default=100_000, help="Prompts for the 1- vs 2-worker runs.")
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2, help="Shard workers of the main run.")
    p.add_argument("--concurrency", type=int, default=128, help="Requests in flight, over all shard workers.")
    p.add_argument("--keep", type=Path, default=None, help="Work here (kept) instead of a temporary directory.")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from distill.httpserver import free_port
    from distill.offline import OFFLINE_ENV

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--teacher-port", str(port)])
    stats_url = f"http://127.0.0.1:{port}/stats"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(OFFLINE_ENV, PREFECT_HOME=str(work / "prefect"))
    log = work / "distill.log"
    try:
        for _ in range(100):
            try:
                get(stats_url)
                break
            except OSError:
                time.sleep(0.1)
        prompts = work / "prompts.jsonl"
        write_prompts(prompts, args.rows)
        cache = work / "cache.sqlite"
        config = work / "config.yaml"
        write_config(config, port, cache, args.workers, args.concurrency, args.shard_rows)
        first = run_distill(config, prompts, work / "out", env, args.rows // 2, stats_url, log)
        at_kill = get(stats_url)
        second = run_distill(config, prompts, work / "out", env, None, stats_url, log)
        final = get(stats_url)
        summary = json.loads((work / "out" / "summary.json").read_text())
        if summary["done"] != args.rows:
            raise SystemExit(f"only {summary['done']} of {args.rows} prompts done; see {log}")
        wall = first["wall_s"] + second["wall_s"]
        rps = args.rows / wall
        peak = max(first["peak_rss_mb"], second["peak_rss_mb"])
        per_record = cache_bytes(cache) / args.rows
        repaid = final["repeated"]
        in_flight = args.concurrency
        print(f"main run: {args.rows} prompts, {args.workers} shard workers, {args.concurrency} requests in flight, "
              f"shards of {args.shard_rows}")
        print(f"  killed after {at_kill['requests']} teacher requests ({first['wall_s']:.1f} s), resumed: "
              f"{second['wall_s']:.1f} s; teacher asked {final['requests']} times for {final['distinct']} prompts")
        print(f"  repaid after the kill: {repaid} (bound: {in_flight} in flight)  peak RSS {peak:.0f} MB  "
              f"filter kept {summary['filter']['kept']} of {summary['filter']['candidates']}")

        scaling = {}
        slice_prompts = work / "slice.jsonl"
        write_prompts(slice_prompts, args.scaling_rows)
        for w, runner in ((1, "threads"), (2, "threads"), (2, "dask")):
            get(f"http://127.0.0.1:{port}/reset", "POST")
            cfg_w = work / f"config-{w}-{runner}.yaml"
            write_config(cfg_w, port, work / f"cache-{w}-{runner}.sqlite", w, args.concurrency, args.shard_rows,
                         runner)
            r = run_distill(cfg_w, slice_prompts, work / f"out-{w}-{runner}", env, None, stats_url, log)
            scaling[w, runner] = args.scaling_rows / r["wall_s"]
            print(f"  {args.scaling_rows} prompts, {w} shard worker(s) on {runner}: {scaling[w, runner]:.0f} req/s "
                  f"end to end ({r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB)")
        print(f"2 workers / 1 worker on {os.cpu_count()} cores: {scaling[2, 'threads'] / scaling[1, 'threads']:.2f}x "
              f"as threads of one process, {scaling[2, 'dask'] / scaling[1, 'threads']:.2f}x as Dask worker processes")
        print(f"rows={args.rows} rps={rps:.0f} peak_rss_mb={peak:.0f} cache_bytes_per_record={per_record:.0f} "
              f"repaid_after_kill={repaid}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--teacher-port":
        teacher(int(sys.argv[2]))
    else:
        main()
