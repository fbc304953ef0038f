"""Provider Batch API mode: the offline path at about half the price.

Follows the OpenAI Batch API: upload a JSONL of requests (POST /files, purpose=batch),
create a batch (POST /batches), poll GET /batches/{id} until it is terminal, then
download the output (and error) files and map each line back by `custom_id`, which
is the request's cache key. Requests are cut into input files of at most
`generation.batch_max_requests` lines and `generation.batch_max_bytes` bytes (OpenAI caps a
batch at 50,000 requests and 200 MB), one batch per file.

A batch id is written to the request cache as soon as the provider returns it, so
a run killed while a batch is in flight collects that batch on the next run
instead of buying it again. Results are committed to the cache before the batch
is marked collected.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from distill.teacher.client import (
    Client,
    Job,
    http_error_reason,
    parse_completion,
    price,
    redact,
    retry_after_s,
)
from distill.teacher.signals import compact_fields

TERMINAL = {"completed", "failed", "expired", "cancelled"}


class BatchError(Exception):
    """A batch control call (upload, create, poll, download) failed permanently."""


async def _call(client: Client, session: Any, method: str, url: str, make_data: Any = None,
                json_body: Any = None) -> bytes:
    """One control call with the online path's retry policy; `make_data` builds a fresh form per attempt."""
    import aiohttp

    headers = {k: v for k, v in client.headers.items() if k != "Content-Type"}
    attempts = 0
    while True:
        attempts += 1
        client.http_requests += 1
        status, body, wait = None, b"", None
        try:
            data = make_data() if make_data else None
            async with session.request(method, url, data=data, json=json_body, headers=headers) as resp:
                status, body, wait = resp.status, await resp.read(), retry_after_s(resp.headers)
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            error, retryable = f"connection: {type(e).__name__}", True
        if status is not None and 200 <= status < 300:
            return body
        if status is not None:
            error = redact(http_error_reason(status, body), client.key)
            retryable = status in (408, 429) or status >= 500
        if not retryable or attempts > client.g.max_retries:
            raise BatchError(f"{error} ({method} {url.rsplit('/v1', 1)[-1]})")
        backoff = random.uniform(0, min(client.g.backoff_max_s, client.g.backoff_base_s * 2 ** (attempts - 1)))
        await asyncio.sleep(wait if wait is not None else backoff)


def _result_fields(client: Client, line: dict, elapsed: float) -> dict:
    """Record fields for one output/error-file line."""
    resp = line.get("response") if isinstance(line.get("response"), dict) else {}
    code = resp.get("status_code")
    body = resp.get("body")
    if line.get("error") and not body:
        err = line["error"] if isinstance(line["error"], dict) else {"message": str(line["error"])}
        return {"status": "failed", "attempts": 1,
                "error": redact(f"batch_error: {err.get('code') or ''} {err.get('message') or ''}".strip()[:240],
                                client.key)}
    if code != 200:
        raw = json.dumps(body).encode() if not isinstance(body, (bytes, str)) else body
        return {"status": "failed", "attempts": 1,
                "error": redact(http_error_reason(int(code or 0), raw if isinstance(raw, bytes) else raw.encode()),
                                client.key)}
    fields, error, _ = parse_completion(body if isinstance(body, dict) else str(body))
    if fields is None:
        return {"status": "failed", "error": error, "attempts": 1}
    usage = fields["usage"]
    fields.update(status="done", error=None, attempts=1, latency_s=round(elapsed, 3),
                  cost_usd=price(client.t, usage["prompt_tokens"], usage["completion_tokens"],
                                 client.t.batch_price_factor),
                  model=fields["model"] or client.t.model)
    return compact_fields(fields, client.g.keep_raw_logprobs)


async def run_batch(client: Client, jobs: list[Job]) -> None:
    """Buy `jobs` through the Batch API, first collecting any batch a killed run left open.

    Every job is passed to client.finish exactly once, done or failed with a reason.
    """
    import aiohttp

    t, g, cache, base = client.t, client.g, client.cache, client.t.base_url
    by_key = {j.key: j for j in jobs}
    finished: set[str] = set()
    reserved: dict[str, float] = {}
    t0 = time.monotonic()

    def finish(key: str, fields: dict) -> None:
        if key in by_key and key not in finished:
            finished.add(key)
            client.budget.settle(reserved.pop(key, 0.0), fields.get("cost_usd", 0.0))
            client.finish(by_key[key], fields)

    timeout = aiohttp.ClientTimeout(total=t.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        batches = cache.open_batches(base)
        covered = {k for _, keys in batches for k in keys}
        accepted = []
        for job in jobs:
            if job.key in covered:
                continue
            est = price(t, job.est_tokens, g.max_tokens, t.batch_price_factor)
            if client.budget.reserve(est):
                reserved[job.key] = est
                accepted.append(job)
            else:
                finish(job.key, {"status": "failed", "error": client.budget.reason()})
        parts, too_big = split_batch(accepted, g.batch_max_requests, g.batch_max_bytes)
        for job in too_big:
            finish(job.key, {"status": "failed", "error": f"batch: request larger than generation.batch_max_bytes "
                                                          f"({g.batch_max_bytes} bytes), the most one input file holds"})
        for part in parts:
            created = await _submit(client, session, part)
            if isinstance(created, str):
                for job in part:
                    finish(job.key, {"status": "failed", "error": created})
            else:
                batches.append(created)
        for batch_id, keys in batches:
            try:
                await _collect(client, session, batch_id, keys, finish, t0)
            except (BatchError, ValueError) as e:
                # The batch stays open in the cache: the next run collects it instead of re-buying.
                for key in keys:
                    finish(key, {"status": "failed", "error": f"batch: {batch_id} not collected ({e})"})


def _line(job: Job) -> bytes:
    return (json.dumps({"custom_id": job.key, "method": "POST", "url": "/v1/chat/completions",
                        "body": json.loads(job.body)}) + "\n").encode()


def split_batch(jobs: list[Job], max_requests: int, max_bytes: int) -> tuple[list[list[Job]], list[Job]]:
    """(input files the provider accepts, requests too large for any file): each file holds at most
    `max_requests` lines and `max_bytes` bytes (OpenAI: 50,000 requests, 200 MB)."""
    parts: list[list[Job]] = []
    too_big: list[Job] = []
    part: list[Job] = []
    size = 0
    for job in jobs:
        n = len(_line(job))
        if n > max_bytes:
            too_big.append(job)
            continue
        if part and (len(part) >= max_requests or size + n > max_bytes):
            parts.append(part)
            part, size = [], 0
        part.append(job)
        size += n
    if part:
        parts.append(part)
    return parts, too_big


async def _submit(client: Client, session: Any, jobs: list[Job]) -> tuple[str, list[str]] | str:
    """Upload one input file and create its batch; (batch id, keys), recorded in the cache before anything
    else happens, or the reason it could not be submitted."""
    import aiohttp

    base = client.t.base_url
    lines = b"".join(_line(j) for j in jobs)

    def form() -> Any:
        f = aiohttp.FormData()
        f.add_field("purpose", "batch")
        f.add_field("file", lines, filename="distill-batch.jsonl", content_type="application/jsonl")
        return f

    try:
        file_id = json.loads(await _call(client, session, "POST", f"{base}/files", make_data=form))["id"]
        created = json.loads(await _call(client, session, "POST", f"{base}/batches", json_body={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        keys = [j.key for j in jobs]
        client.cache.add_batch(created["id"], base, keys)
    except (BatchError, KeyError, ValueError, TypeError) as e:
        return f"batch: could not submit ({e})"
    return created["id"], keys


async def _collect(client: Client, session: Any, batch_id: str, keys: list[str], finish: Any, t0: float) -> None:
    base = client.t.base_url
    while True:
        info = json.loads(await _call(client, session, "GET", f"{base}/batches/{batch_id}"))
        status = info.get("status")
        if status in TERMINAL:
            break
        await asyncio.sleep(client.g.batch_poll_s)
    results: dict[str, dict] = {}
    wanted = set(keys)
    elapsed = time.monotonic() - t0
    for file_id in (info.get("output_file_id"), info.get("error_file_id")):
        if not file_id:
            continue
        content = await _call(client, session, "GET", f"{base}/files/{file_id}/content")
        for raw in content.decode("utf-8", "replace").splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # one broken line must not lose the others; its row fails below as missing
            key = line.get("custom_id") if isinstance(line, dict) else None
            if key in wanted and key not in results:
                results[key] = _result_fields(client, line, elapsed)
    for key in keys:
        fields = results.get(key) or {"status": "failed", "attempts": 1,
                                      "error": f"batch_{status}: no result for this request"}
        if fields["status"] == "done":
            client.cache.put(key, fields)
        finish(key, fields)
    client.cache.close_batch(batch_id, status)
