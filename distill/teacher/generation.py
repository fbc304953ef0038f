"""`generate(rows, teacher, generation)`: plan the requests, serve what the cache holds, buy the rest.

Online mode runs `distill.teacher.client.Client`; batch mode (generation.mode = "batch")
runs `distill.teacher.batch.run_batch`. Both fill the same records in input order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from distill.config import ConfigError, GenerationConfig, TeacherConfig
from distill.data import check_unique_ids, prompt_prefix, read_table, render_messages, row_id
from distill.teacher.batch import run_batch
from distill.teacher.cache import CHUNK, cache_exists, lookup, open_cache
from distill.teacher.client import (
    Client,
    Job,
    estimate_tokens,
    legacy_cache_key,
    make_record,
    price,
    request_key,
    resolve_api_key,
    sampling_params,
)
from distill.teacher.ratelimit import Budget, Ledger
from distill.teacher.soft_labels import with_label_dists


@dataclass
class GenerationResult:
    records: list[dict]  # one teacher record per (id, sample), input order, final state
    summary: dict  # counts, tokens, cost, wall time, throughput, budget_exhausted


def _validate_rows(rows: list[dict]) -> None:
    seen: dict[Any, Any] = {}
    for i, row in enumerate(rows):
        where = f"line {row['_line']}" if isinstance(row, dict) and "_line" in row else f"row {i}"
        if not isinstance(row, dict) or "id" not in row or "messages" not in row:
            raise ConfigError(f"{where}: a prompt row needs 'id' and 'messages'")
        msgs = row["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs)):
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if row["id"] in seen:
            raise ConfigError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
        seen[row["id"]] = where


def plan(rows: list[dict], teacher: TeacherConfig, generation: GenerationConfig) -> tuple[list[dict], list[Job]]:
    """Output skeleton (one record per (id, sample), in order) and the distinct requests behind it."""
    _validate_rows(rows)
    params = sampling_params(generation)
    records: list[dict] = []
    jobs: dict[str, Job] = {}
    for row in rows:
        messages = [{k: v for k, v in m.items()} for m in row["messages"]]
        est = estimate_tokens(messages)
        for s in range(generation.samples_per_prompt):
            key = request_key(teacher, generation, messages, params, s)
            job = jobs.get(key)
            if job is None:
                body = json.dumps({"model": teacher.model, "messages": messages, **params}).encode()
                job = jobs[key] = Job(key, messages, s, body, est, legacy_key=(
                    lambda m=messages, s=s: legacy_cache_key(teacher.base_url, teacher.model, m, params, s)))
            job.slots.append(len(records))
            records.append(make_record(row["id"], s, messages, params, teacher.model, error="not requested"))
    return records, list(jobs.values())


def estimate_cost(rows: list[dict], teacher: TeacherConfig, generation: GenerationConfig) -> dict:
    """Tokens and USD a run would spend, without any call (for `--dry-run`).

    Completion tokens are bounded by max_tokens, so `cost_usd` is an upper bound
    given the prompt estimate. Requests already in the cache cost nothing.
    """
    _, jobs = plan(rows, teacher, generation)
    cached: set[str] = set()
    if cache_exists(generation):
        cache = open_cache(generation)
        try:
            for i in range(0, len(jobs), CHUNK):
                cached.update(lookup(cache, jobs[i:i + CHUNK]))
        finally:
            cache.close()
    todo = [j for j in jobs if j.key not in cached]
    return {"requests": len(jobs), "cached": len(jobs) - len(todo), "to_send": len(todo),
            "prompt_tokens": sum(j.est_tokens for j in todo), "completion_tokens_max": generation.max_tokens * len(todo),
            "cost_usd": round(upper_cost(todo, teacher, generation), 6), "mode": generation.mode}


def upper_cost(jobs: list[Job], teacher: TeacherConfig, generation: GenerationConfig) -> float:
    """What sending `jobs` can cost at most: their estimated prompts, every completion at max_tokens."""
    factor = teacher.batch_price_factor if generation.mode == "batch" else 1.0
    return price(teacher, sum(j.est_tokens for j in jobs), generation.max_tokens * len(jobs), factor)


def _run_sync(coro_fn: Callable[[], Any]) -> Any:
    """Run a coroutine from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


def generate(rows: list[dict], teacher: TeacherConfig, generation: GenerationConfig, *,
             api_key: str | None = None, progress: Callable[[int, int], None] | None = None,
             purpose: str = "generation", labels: list[str] | None = None) -> GenerationResult:
    """Ask the teacher for every row (and sample), resuming from the request cache.

    Args:
        rows: dicts with "id" (unique) and "messages" (an OpenAI chat); other keys are ignored.
        teacher: the endpoint, model, prices and timeout.
        generation: concurrency, limits, retries, sampling, budget, mode and cache path.
        api_key: the key; None reads the teacher.api_key_env variable (no header when unset).
        progress: called as progress(finished, total) after every record reaches its final state.
        purpose: what the spend is charged as in the run's ledger (generation.ledger_path), e.g. "holdout".
        labels: a classification task's label set: each answer also gets "label_dist", the label
            distribution it carries (distill.teacher.soft_labels).

    Returns a GenerationResult whose records follow the teacher-record contract,
    one per (id, sample) in input order, each "done" or "failed" with a reason.
    """
    if api_key is None:
        api_key = resolve_api_key(teacher)
    records, jobs = plan(rows, teacher, generation)
    result = run_jobs(records, jobs, teacher, generation, api_key, progress, purpose)
    if labels:
        with_label_dists(result.records, labels)
    return result


def run_jobs(records: list[dict], jobs: list[Job], teacher: TeacherConfig, generation: GenerationConfig,
             api_key: str | None, progress: Callable[[int, int], None] | None = None,
             purpose: str = "generation") -> GenerationResult:
    """Fill `records` from the request cache, buy the jobs it lacks, charge the ledger; see generate().

    Shared by answer requests (plan) and scoring requests (distill.teacher.scoring): both are
    persisted before use, capped by what the run's budget has left, and charged as `purpose`.
    """
    t0 = time.monotonic()
    total = len(records)
    finished = 0
    ledger = client = None
    cache = open_cache(generation)
    try:

        def fill(job: Job, fields: dict, cached: bool) -> None:
            nonlocal finished
            for n, slot in enumerate(job.slots):
                rec = records[slot]
                rec.update(fields)
                # Only the first copy of a request bought this run carries its cost; the rest are free copies.
                rec["cached"] = fields["status"] == "done" and (cached or n > 0)
                if rec["cached"] and not cached:
                    rec["cost_usd"] = 0.0
                finished += 1
                if progress:
                    progress(finished, total)

        pending = []
        for i in range(0, len(jobs), CHUNK):  # one chunk of stored responses decoded at a time
            chunk = jobs[i:i + CHUNK]
            stored = lookup(cache, chunk)
            for job in chunk:
                if job.key in stored:
                    fill(job, {**stored.pop(job.key), "status": "done", "error": None}, cached=True)
                else:
                    pending.append(job)
        ledger = (Ledger(generation.ledger_path, generation.budget_usd, generation.ledger_url)
                  if generation.ledger_path else None)
        # With a run ledger the cap is what the run has left, not a fresh budget_usd per call; calls
        # spending at once (shard workers) each hold their upper bound of it, so together they stay under.
        need = 1.25 * upper_cost(pending, teacher, generation)
        with ledger.hold(need) if ledger else contextlib.nullcontext(generation.budget_usd) as cap:
            budget = Budget(cap)
            client = Client(teacher, generation, api_key, cache, budget, lambda j, f: fill(j, f, cached=False))
            try:
                if pending and generation.mode == "batch":
                    _run_sync(lambda: run_batch(client, pending))
                elif pending:
                    _run_sync(lambda: client.run(pending))
            finally:
                if ledger is not None:  # also when a run breaks off: bought stays charged, before the hold goes
                    bought = sum(r["cost_usd"] for r in records if r["status"] == "done" and not r["cached"])
                    ledger.charge(purpose, bought, client.http_requests)
    finally:
        cache.close()
    return GenerationResult(records, summarize(records, time.monotonic() - t0, budget.exhausted,
                                               client.http_requests))


def summarize(records: list[dict], wall_s: float, budget_exhausted: bool, http_requests: int) -> dict:
    """The run's generation summary; tokens and cost count only what this run bought."""
    done = [r for r in records if r["status"] == "done"]
    bought = [r for r in done if not r["cached"]]
    by_reason: dict[str, int] = {}
    for r in records:
        if r["status"] == "failed":
            reason = str(r["error"]).split(":", 1)[0]
            by_reason[reason] = by_reason.get(reason, 0) + 1
    return {
        "requested": len(records),
        "done": len(done),
        "failed": len(records) - len(done),
        "failed_by_reason": by_reason,
        "cached": sum(1 for r in done if r["cached"]),
        "truncated": sum(1 for r in done if r["truncated"]),
        "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in bought),
        "completion_tokens": sum(r["usage"]["completion_tokens"] for r in bought),
        "cost_usd": round(sum(r["cost_usd"] for r in bought), 6),
        "cache_saved_usd": round(sum(r["cost_usd"] for r in done if r["cached"]), 6),
        "http_requests": http_requests,
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(len(bought) / wall_s, 2) if wall_s > 0 else 0.0,
        "budget_exhausted": budget_exhausted,
    }


def reuse_costs(parts: dict[str, list[dict]], teacher: TeacherConfig) -> dict[str, dict]:
    """What a cycle paid against what a full cycle (an empty request cache) would pay for the same requests.

    Args:
        parts: {name: teacher records} (e.g. training, holdout); a record served from the request
            cache carries the usage it was bought with.
        teacher: the endpoint's prices: a cache hit is priced at today's rates (the ledger's), a
            bought request at what it was charged.
    Returns {name and "total": {"paid_requests", "paid_tokens", "paid_usd", "reused_requests",
    "reused_tokens", "full_requests", "full_tokens", "full_usd", "saved_usd"}}.
    """
    out: dict[str, dict] = {}
    total = dict.fromkeys(("paid_requests", "paid_tokens", "paid_usd", "reused_requests", "reused_tokens",
                           "full_requests", "full_tokens", "full_usd", "saved_usd"), 0)
    for name, records in parts.items():
        row = dict.fromkeys(total, 0)
        for r in records:
            if r.get("status") != "done":
                continue
            usage = r.get("usage") or {}
            pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            kind = "reused" if r.get("cached") else "paid"
            usd = price(teacher, pt, ct) if kind == "reused" else float(r.get("cost_usd") or 0.0)
            row[f"{kind}_requests"] += 1
            row[f"{kind}_tokens"] += pt + ct
            row["full_requests"] += 1
            row["full_tokens"] += pt + ct
            row["full_usd"] += usd
            row["paid_usd"] += usd if kind == "paid" else 0.0
        row["saved_usd"] = row["full_usd"] - row["paid_usd"]
        out[name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
        total = {k: total[k] + row[k] for k in total}
    out["total"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in total.items()}
    return out


def prompt_row(row: dict, path: Path, task: Any, prefix: Callable[[], list]) -> dict:
    """One prompt row ({"id", "messages", "_line"}) of a prompts file row; errors name the file and line.

    A row without messages is rendered through task.system_prompt and task.prompt_template, after
    `prefix()` (prompt_prefix(task), asked for only when a row needs it: it may read the few-shot rows).
    """
    where = f"{path}:{row['_line']}"
    msgs = row.get("messages")
    if msgs is None and task is None:
        raise ConfigError(f"{where}: no 'messages', and the config has no task section whose prompt would "
                          "render the row")
    if msgs is None:
        msgs = render_messages(task, row, where=f"{where}: ", prefix=prefix())
    elif (not isinstance(msgs, list) or not msgs
          or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                     and isinstance(m.get("content"), str) for m in msgs)):
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    return {"id": row_id(row["id"], where), "messages": msgs, "_line": row["_line"]}


def load_prompt_rows(path: str | Path, task: Any) -> list[dict]:
    """Prompt rows from CSV/JSONL: each needs `id` and either `messages` or the task's input fields.

    Rows without messages are rendered through task.system_prompt and task.prompt_template,
    exactly as in production. Errors name the file and line.
    """
    path = Path(path)
    options = {} if task is None else {"encoding": task.encoding, "max_field_chars": task.max_field_chars}
    prefix = functools.cache(lambda: prompt_prefix(task))
    out = [prompt_row(row, path, task, prefix) for row in read_table(path, required=["id"], **options)]
    check_unique_ids(path, out)
    return out
