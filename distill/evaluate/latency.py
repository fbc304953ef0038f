"""Latency of single requests under concurrent load, and what a request costs.

Batched throughput hides what a user waits for, so the harness sends single
chat-completion requests from `concurrency` closed-loop clients (each sends its
next request as soon as the previous one answered) and reports percentiles of
the per-request wall time. The student and the teacher are measured with the
same harness, the same payloads and the same concurrency, on the same machine.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from distill.config import ServeConfig
from distill.evaluate import metrics
from distill.httpserver import free_port, minimal_chat_app, stop_process, wait_for_health
from distill.models.classifier import ClassifierStudent


class _Connection:
    """One keep-alive HTTP/1.1 connection that POSTs prepared bodies and reads whole responses.

    The load generator shares the machine with the server it measures, so its own CPU per request
    is kept to a minimum: the request head is built once, and a response is read by its
    Content-Length (or chunks), without a client library's per-request machinery (aiohttp spent
    about three times as much CPU per request).
    """

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]):
        self.host, self.port = host, port
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                 *(f"{k}: {v}" for k, v in headers.items())]
        self.head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode()
        self.reader = self.writer = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = None, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(p[:-2] for p in parts)
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:
            data, close = await self.reader.read(), True
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def machine_busy_s() -> float | None:
    """CPU seconds this machine's cores have spent busy (all processes and the kernel), from /proc/stat;
    None where there is none. Differences over a measured window give what each request cost the
    machine, load generator included: by Little's law no server on `cores` cores can answer
    `concurrency` closed-loop clients in less than concurrency x that / cores on average."""
    import os

    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy; steal is another guest's
    return (sum(fields[:3]) + sum(fields[5:7])) / os.sysconf("SC_CLK_TCK")


async def _closed_loop(one, n_requests: int, concurrency: int, warmup: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients sending requests 0..n_requests-1 as `one(client, i)`, each its next as
    soon as its last is answered, after `warmup` unmeasured requests (connection setup, lazy initialisation)."""
    results: list[dict[str, Any] | None] = [None] * n_requests
    next_index = 0
    for i in range(warmup):
        await one(i % concurrency, i)

    async def client(c: int) -> None:
        nonlocal next_index
        while next_index < n_requests:
            i = next_index
            next_index += 1
            results[i] = await one(c, i)

    busy0, t0 = machine_busy_s(), time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall, busy1 = time.perf_counter() - t0, machine_busy_s()
    return {"results": results, "wall_s": wall, "busy_s": None if busy0 is None else busy1 - busy0}


def _timed(t0: float, status: int | None, error: str | None, body: Any) -> dict[str, Any]:
    return {"ms": (time.perf_counter() - t0) * 1000, "status": status, "error": error, "body": body}


async def _send_all_lean(url: str, payloads: Sequence[dict], n_requests: int, concurrency: int,
                         headers: dict[str, str], timeout_s: float, warmup: int, keep_bodies: bool) -> dict[str, Any]:
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    bodies = [json.dumps(p).encode() for p in payloads]
    conns = [_Connection(parts.hostname, parts.port or 80, path, headers) for _ in range(concurrency)]

    async def one(c: int, i: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                status, data = await conns[c].post(bodies[i % len(bodies)])
        except Exception as e:  # a failed request is counted, never retried: retries would hide latency
            conns[c].close()
            return _timed(t0, None, type(e).__name__, None)
        return _timed(t0, status, None if status == 200 else f"HTTP {status}",
                      json.loads(data) if keep_bodies and data else None)

    try:
        return await _closed_loop(one, n_requests, concurrency, warmup)
    finally:
        for c in conns:
            c.close()


async def _send_all_aiohttp(url: str, payloads: Sequence[dict], n_requests: int, concurrency: int,
                            headers: dict[str, str], timeout_s: float, warmup: int,
                            keep_bodies: bool) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as session:

        async def one(c: int, i: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=payloads[i % len(payloads)]) as resp:
                    body = await resp.json(content_type=None) if keep_bodies else await resp.read()
                    status = resp.status
            except Exception as e:  # a failed request is counted, never retried: retries would hide latency
                return _timed(t0, None, type(e).__name__, None)
            return _timed(t0, status, None if status == 200 else f"HTTP {status}", body if keep_bodies else None)

        return await _closed_loop(one, n_requests, concurrency, warmup)


def _run_coroutine(coro) -> Any:
    """asyncio.run, also from code that already runs inside an event loop (then in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="latency-harness")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def measure(url: str, payloads: Sequence[dict], n_requests: int = 200, concurrency: int = 4,
            api_key: str | None = None, timeout_s: float = 30.0, warmup: int = 2,
            keep_bodies: bool = False, lean: bool = False) -> dict[str, Any]:
    """Send `n_requests` single POST requests from `concurrency` concurrent clients and time each.

    Args:
        url: full endpoint URL, e.g. http://127.0.0.1:8000/v1/chat/completions.
        payloads: JSON bodies, used in order and cycled.
        n_requests: measured requests (warm-up requests come on top).
        concurrency: clients sending at the same time.
        api_key: sent as a Bearer token; never logged or returned.
        timeout_s: per-request timeout; a timed-out request counts as an error.
        warmup: unmeasured requests sent first, one at a time.
        keep_bodies: return the parsed response bodies (index-aligned with the requests).
        lean: for an http:// URL, the load generator's own minimal HTTP/1.1 client (`_Connection`) instead
            of aiohttp, so that less of the machine goes to the client; https:// always uses aiohttp.
    Returns:
        {"n", "ok", "errors", "error_kinds", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms",
         "wall_s", "throughput_rps", "concurrency", "machine_cpu_ms_per_request"} (+ "bodies" when
        keep_bodies); percentiles over successful requests only, NaN when none succeeded. The machine's
        CPU per request counts every process on this machine over the measured window (NaN without
        /proc/stat): for a server on this machine, what a request costs it and the load generator.
    """
    if not payloads:
        raise ValueError("no payloads to send")
    if n_requests < 1 or concurrency < 1:
        raise ValueError("n_requests and concurrency must be >= 1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    send = _send_all_lean if lean and url.startswith("http://") else _send_all_aiohttp
    out = _run_coroutine(send(url, payloads, n_requests, concurrency, headers, timeout_s, warmup, keep_bodies))
    results = out["results"]
    ok = [r["ms"] for r in results if r["error"] is None]
    kinds: dict[str, int] = {}
    for r in results:
        if r["error"]:
            kinds[r["error"]] = kinds.get(r["error"], 0) + 1
    pct = metrics.percentiles(ok)
    report = {
        "n": n_requests, "ok": len(ok), "errors": n_requests - len(ok), "error_kinds": kinds,
        "p50_ms": pct["p50"], "p95_ms": pct["p95"], "p99_ms": pct["p99"],
        "mean_ms": float(np.mean(ok)) if ok else math.nan, "max_ms": float(max(ok)) if ok else math.nan,
        "wall_s": out["wall_s"], "throughput_rps": len(ok) / out["wall_s"] if out["wall_s"] > 0 else math.nan,
        "concurrency": concurrency,
        "machine_cpu_ms_per_request": math.nan if out["busy_s"] is None else out["busy_s"] / n_requests * 1000,
    }
    if keep_bodies:
        report["bodies"] = [r["body"] for r in results]
    return report


def chat_payloads(rows: Sequence[dict[str, Any]], model: str, limit: int | None = None,
                  max_tokens: int = 32) -> list[dict[str, Any]]:
    """Chat-completion bodies from task rows' production `messages` (greedy, short answers)."""
    rows = list(rows)[:limit] if limit else list(rows)
    return [{"model": model, "messages": r["messages"], "temperature": 0.0, "max_tokens": max_tokens}
            for r in rows]


def student_cost_per_1k(cost_per_hour: float, throughput_rps: float) -> float:
    """USD per 1,000 requests for a machine billed by the hour serving at the measured throughput."""
    if not throughput_rps or math.isnan(throughput_rps):
        return math.nan
    return cost_per_hour / (throughput_rps * 3600.0) * 1000.0


def teacher_cost_per_1k(records: Sequence[dict[str, Any]], price_per_1m: tuple[float, float]) -> float:
    """USD per 1,000 teacher requests from the tokens the records used.

    Args:
        records: teacher records (their `usage` token counts, or `cost_usd` when no price is configured).
        price_per_1m: (input, output) USD per 1M tokens.
    """
    done = [r for r in records if r.get("status") == "done"]
    if not done:
        return math.nan
    pin, pout = price_per_1m
    if pin or pout:
        prompt = np.mean([(r.get("usage") or {}).get("prompt_tokens") or 0 for r in done])
        completion = np.mean([(r.get("usage") or {}).get("completion_tokens") or 0 for r in done])
        return float((prompt * pin + completion * pout) / 1e6 * 1000)
    return float(np.mean([r.get("cost_usd") or 0.0 for r in done]) * 1000)


def minimal_student_app(student_dir: str | Path):
    """A bare OpenAI-compatible chat endpoint around a ClassifierStudent (see distill.httpserver).

    Used only when the full server (`distill serve`) cannot be built, so the
    student's latency is still measured over real HTTP.
    """
    student = ClassifierStudent(student_dir)

    def answer(messages: list[dict]) -> str:
        text = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        probs = student.predict_proba([text])[0]
        return student.labels[int(probs.argmax())]

    return minimal_chat_app(answer)


@contextmanager
def serve_process(student_dir: str | Path | None, overrides: Sequence[str] = (), api_key: str | None = None,
                  startup_timeout: float = 180.0, stderr_path: str | Path | None = None,
                  config: str | Path | None = None) -> Iterator[str]:
    """Run `distill serve` as its own process on a free loopback port for the duration of the block.

    Args:
        student_dir: the student directory; None serves the registry champion of `config`'s task.
        overrides: extra `--set` overrides (e.g. "serve.runtime=onnx", "serve.log_url=sqlite:///...").
        api_key: the key clients must send; handed over in the server's environment, never argv.
        startup_timeout: seconds to wait for /health.
        stderr_path: where the server's stderr goes (a temporary file when None).
        config: YAML config handed to `distill serve` (task, registry, serve and teacher sections).
    Yields:
        the base URL, e.g. http://127.0.0.1:PORT.
    """
    import os
    import subprocess
    import sys
    import tempfile

    port = free_port()
    env = dict(os.environ)
    env.pop("DISTILL_SERVE_API_KEY", None)
    if api_key:
        env["DISTILL_SERVE_API_KEY"] = api_key
    cmd = ([sys.executable, "-m", "distill.cli", "serve"] + ([str(config)] if config else [])
           + (["--student", str(student_dir)] if student_dir else []) + ["--host", "127.0.0.1", "--port", str(port)])
    for o in overrides:
        cmd += ["--set", o]
    err = open(stderr_path, "w+b") if stderr_path else tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"

    def stderr_tail() -> str:
        err.seek(0)
        return err.read()[-2000:].decode(errors="replace")

    try:
        wait_for_health(url, proc, startup_timeout, "distill serve", poll_s=0.1, exit_detail=stderr_tail)
        yield url
    finally:
        stop_process(proc)
        err.close()


def measure_process(url: str, payloads: Sequence[dict], n_requests: int = 200, concurrency: int = 4,
                    api_key: str | None = None, timeout_s: float = 30.0, warmup: int = 2) -> dict[str, Any]:
    """`measure` run by a load-generator process of its own, so it shares no GIL with the caller or the server.

    Same arguments and result as `measure` (without bodies); the key travels in the environment.
    """
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("DISTILL_LATENCY_API_KEY", None)
    if api_key:
        env["DISTILL_LATENCY_API_KEY"] = api_key
    spec = {"url": url, "payloads": list(payloads), "n_requests": n_requests, "concurrency": concurrency,
            "timeout_s": timeout_s, "warmup": warmup}
    done = subprocess.run([sys.executable, "-m", "distill.evaluate.latency"], input=json.dumps(spec).encode(),
                          env=env, capture_output=True, timeout=timeout_s * (n_requests + warmup) + 120)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(done.stdout)


def sweep(url: str, payloads: Sequence[dict], n_requests: int, concurrencies: Sequence[int],
          api_key: str | None = None, timeout_s: float = 30.0) -> dict[int, dict[str, Any]]:
    """`measure_process` at each concurrency, in order: {concurrency: result}."""
    return {c: measure_process(url, payloads, n_requests, c, api_key=api_key, timeout_s=timeout_s,
                               warmup=max(2, c)) for c in concurrencies}


@contextmanager
def student_server(student_dir: str | Path, serve_config: Any = None,
                   api_key: str | None = None) -> Iterator[tuple[str, str]]:
    """Serve the student with `distill serve` in its own process for the duration of the block.

    Args:
        student_dir: the student directory.
        serve_config: ServeConfig whose runtime, batching, workers, lanes, threads and log_url the server uses (defaults when None).
        api_key: the key clients must send.
    Yields:
        (chat completions URL, "distill serve").
    """
    s = serve_config or ServeConfig()
    overrides = [f"serve.runtime={s.runtime}", f"serve.workers={s.workers}", f"serve.max_batch={s.max_batch}",
                 f"serve.batch_window_ms={s.batch_window_ms}", f"serve.log_url={s.log_url}",
                 f"serve.model_name={s.model_name}", f"serve.log_requests={str(s.log_requests).lower()}"]
    overrides += [f"serve.{k}={getattr(s, k)}" for k in ("threads", "lanes") if getattr(s, k)]
    with serve_process(student_dir, overrides, api_key=api_key) as url:
        yield f"{url}/v1/chat/completions", "distill serve"


def _main() -> None:
    """The load generator's process: a JSON spec on stdin, the `measure` result as JSON on stdout."""
    import json
    import os
    import sys

    spec = json.loads(sys.stdin.read())
    out = measure(spec["url"], spec["payloads"], spec["n_requests"], spec["concurrency"],
                  api_key=os.environ.get("DISTILL_LATENCY_API_KEY"), timeout_s=spec["timeout_s"],
                  warmup=spec["warmup"], lean=True)
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    _main()


def is_loopback(url: str | None) -> bool:
    """Whether an endpoint runs on this machine (then it is timed with the harness; a remote one is not)."""
    import ipaddress
    from urllib.parse import urlparse

    host = urlparse(url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def latency_from_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Teacher latency from the round trips generation already paid for: no extra calls.

    Only live requests count: cached answers were not waited for, and a Batch API record
    holds the whole batch's time.
    """
    live = [r["latency_s"] * 1000 for r in records if r.get("status") == "done" and not r.get("cached")
            and r.get("mode", "online") == "online" and r.get("latency_s")]
    pct = metrics.percentiles(live)
    return {"n": len(live), "ok": len(live), "errors": 0, "p50_ms": pct["p50"], "p95_ms": pct["p95"],
            "p99_ms": pct["p99"], "throughput_rps": math.nan, "concurrency": None, "source": "generation records"}


def plot_latency(sweeps: dict[str, dict[int, dict[str, Any]]], floor_ms: float | None, path: str | Path) -> Path:
    """Latency (P50 and P95) versus concurrency per model, with the student's forward floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sweep in sweeps.items():
        cs = sorted(sweep, key=int)  # JSON-safe string keys or ints
        for key, style in (("p50_ms", "-o"), ("p95_ms", "--s")):
            ax.plot([int(c) for c in cs], [sweep[c][key] for c in cs], style, label=f"{name} {key[:3].upper()}")
    if floor_ms:
        ax.axhline(floor_ms, color="grey", linestyle=":", label="student forward floor (P50)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("ms per request")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_latency(m: dict[str, Any]) -> list[str]:
    """Markdown for the report: student vs teacher ratios, the concurrency sweep, the plot, exported runtimes."""
    out = ["", f"Student against the teacher: P95 ratio {_fmt(m.get('latency_ratio'), '.3f')}, "
                f"cost ratio {_fmt(m.get('cost_ratio'), '.3f')} (gate.max_latency_ratio, gate.max_cost_ratio). "
                f"Student forward floor (in-process, batch 1): {_fmt(m.get('student_floor_p50_ms'), '.2f')} ms "
                f"at P50. Teacher latency from: {(m.get('teacher_latency') or {}).get('source', 'n/a')}."]
    sweeps = {"student": m.get("student_latency_sweep"), "teacher": m.get("teacher_latency_sweep")}
    rows = []
    for name, sweep in sweeps.items():
        for c, r in sorted((sweep or {}).items(), key=lambda kv: int(kv[0])):
            rows.append(f"| {name} | {c} | {_fmt(r.get('p50_ms'))} | {_fmt(r.get('p95_ms'))} | "
                        f"{_fmt(r.get('p99_ms'))} | {_fmt(r.get('throughput_rps'), '.0f')} | {r.get('errors', 'n/a')} |")
    if rows:
        out += ["", "| model | concurrency | P50 ms | P95 ms | P99 ms | req/s | failed |",
                "|---|---|---|---|---|---|---|", *rows]
    if m.get("latency_plot"):
        out += ["", f"![latency versus concurrency]({m['latency_plot']})"]
    exports = m.get("runtime_exports") or {}
    if exports:
        out += ["", "| runtime | agreement with fp32 | accuracy | drop (points) | floor P50 ms |", "|---|---|---|---|---|"]
        out += [f"| {k} | {_fmt(100 * v['agreement'], '.2f')} % | "
                f"{_fmt(None if v['accuracy'] is None else 100 * v['accuracy'])} % | "
                f"{_fmt(None if v['accuracy_drop'] is None else 100 * v['accuracy_drop'], '.2f')} | "
                f"{_fmt(v['floor_p50_ms'], '.2f')} |" for k, v in exports.items()]
    return out
