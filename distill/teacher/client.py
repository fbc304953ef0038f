"""The resilient client for an OpenAI-compatible teacher: nothing lost, nothing paid twice.

`generate(rows, teacher, generation)` sends one chat completion per (row, sample)
with bounded concurrency, client-side request and token rate limits, and retries
with exponential backoff and full jitter on 429, 5xx, timeouts, connection errors
and malformed bodies (honouring `Retry-After`). Permanent errors (other 4xx,
content policy) are recorded on the row with their reason and never stop the run.

This module holds the request side: one `Client` that sends `Job`s, parses replies and
classifies failures; `distill.teacher.generation` plans the jobs and runs it.

Failure reasons start with a stable category ("http_429", "timeout", "connection",
"malformed", "content_policy", "http_401", "budget_exhausted", ...) followed by
": detail"; the summary counts failures by that category.

Rate limits and the spending cap live in distill/teacher/ratelimit.py; the provider Batch
API mode (generation.mode = "batch") in distill/teacher/batch.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable

from distill.config import GenerationConfig, TeacherConfig
from distill.teacher.cache import ResponseCache
from distill.teacher.ratelimit import Budget, RateLimiter
from distill.teacher.signals import compact_fields


def resolve_api_key(teacher: TeacherConfig) -> str | None:
    """The API key from the environment variable the config names, or None (local servers need none)."""
    return os.environ.get(teacher.api_key_env) or None


def sampling_params(generation: GenerationConfig) -> dict[str, Any]:
    """Sampling parameters sent with every request (and part of the cache key)."""
    params: dict[str, Any] = {"temperature": generation.temperature, "max_tokens": generation.max_tokens}
    if generation.logprobs and generation.soft_labels == "trie":  # score mode reads its own requests
        params["logprobs"] = True
        if generation.top_logprobs:
            params["top_logprobs"] = generation.top_logprobs
    params.update(generation.extra_params)
    return params


def cache_key(model: str, messages: list[dict], params: dict, sample: int, route: str = "",
              endpoint: str | None = None) -> str:
    """Stable request identity: the teacher model and the request (messages, params, sample, API route).

    Deliberately excludes the API key (rotating keys must not re-pay) and, unless `endpoint` is
    given (generation.cache_key_endpoint), the address: the same model served elsewhere is the same teacher.
    """
    ident: dict[str, Any] = {"model": model, "messages": messages, "params": params, "sample": sample}
    if route:
        ident["route"] = route
    if endpoint is not None:
        ident["endpoint"] = endpoint
    blob = json.dumps(ident, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(("v2:" + blob).encode()).hexdigest()


def legacy_cache_key(endpoint: str, model: str, messages: list[dict], params: dict, sample: int) -> str:
    """The key caches written before `cache_key` left the address out used (read for migration only)."""
    blob = json.dumps({"endpoint": endpoint, "model": model, "messages": messages, "params": params,
                       "sample": sample}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def request_key(teacher: TeacherConfig, generation: GenerationConfig, messages: list[dict], params: dict,
                sample: int, route: str = "") -> str:
    """The cache key of one request under this config (see cache_key)."""
    endpoint = teacher.base_url if generation.cache_key_endpoint else None
    return cache_key(teacher.model, messages, params, sample, route=route, endpoint=endpoint)


def estimate_tokens(messages: list[dict]) -> int:
    """Approximate prompt tokens (chars/4 plus per-message overhead); good enough for limits and budgets."""
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return chars // 4 + 4 * len(messages) + 3


def price(teacher: TeacherConfig, prompt_tokens: int, completion_tokens: int, factor: float = 1.0) -> float:
    return factor * (prompt_tokens * teacher.input_price_per_1m + completion_tokens * teacher.output_price_per_1m) / 1e6


def redact(text: str, secret: str | None) -> str:
    """Remove the key from text that may echo it (some providers quote the key in 401 messages)."""
    if secret:
        text = text.replace(secret, "***")
    return text


def parse_completion(body: bytes | dict) -> tuple[dict | None, str | None, bool]:
    """(fields, error, retryable) from a chat-completion body.

    Malformed bodies (not JSON, no choices, empty content) are retryable; a
    content-filter stop is permanent; `finish_reason == "length"` is kept and
    flagged truncated.
    """
    if isinstance(body, (bytes, str)):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None, "malformed: body is not valid JSON", True
    else:
        data = body
    if not isinstance(data, dict):
        return None, "malformed: body is not a JSON object", True
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, "malformed: no choices in the response", True
    choice = choices[0]
    finish = choice.get("finish_reason")
    if finish == "content_filter":
        return None, "content_policy: the provider filtered the answer", False
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        return None, "malformed: empty content", True
    lp = choice.get("logprobs")
    logprobs = lp.get("content") if isinstance(lp, dict) and isinstance(lp.get("content"), list) else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return {
        "response": content,
        "finish_reason": finish,
        "truncated": finish == "length",
        "logprobs": logprobs,
        "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                  "completion_tokens": int(usage.get("completion_tokens") or 0)},
        "model": data.get("model"),
    }, None, True


def http_error_reason(status: int, body: bytes) -> str:
    """'http_<status>: message' (or 'content_policy: ...') from an OpenAI-style error body."""
    message = ""
    try:
        data = json.loads(body)
        err = data.get("error") or data.get("detail")  # OpenAI style, or FastAPI's validation detail
        if isinstance(err, dict):
            code = str(err.get("code") or err.get("type") or "")
            message = str(err.get("message") or code)
            if "content_policy" in code or "content_filter" in code:
                return f"content_policy: {message[:200]}"
        elif err:
            message = str(err)
    except (ValueError, AttributeError, UnicodeDecodeError):
        message = body[:200].decode("utf-8", "replace")
    return f"http_{status}: {message[:200] or 'no detail'}"


def retry_after_s(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, `Retry-After` (seconds or an HTTP date), or None."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass
class Job:
    """One distinct request; `slots` are the output positions it fills (identical prompts share one)."""

    key: str
    messages: list[dict]
    sample: int
    body: bytes
    est_tokens: int
    slots: list[int] = field(default_factory=list)
    path: str = "/chat/completions"  # a scoring request goes to /completions
    parse: Callable[[bytes], tuple[dict | None, str | None, bool]] = parse_completion
    max_out: int | None = None  # completion tokens it can cost; None: generation.max_tokens
    legacy_key: Callable[[], str] | None = None  # its key in a cache written before keys left out base_url


def make_record(row_id: Any, sample: int, messages: list[dict], params: dict, model: str, **fields: Any) -> dict:
    """A teacher record with every contract field present."""
    rec = {"id": row_id, "sample": sample, "status": "failed", "error": None, "response": None,
           "finish_reason": None, "truncated": False, "logprobs": None, "topk": None,
           "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "cost_usd": 0.0, "latency_s": None,
           "attempts": 0, "cached": False, "model": model, "messages": messages, "params": params}
    rec.update(fields)
    return rec


class Client:
    """Online mode: a pool of workers over one aiohttp session."""

    def __init__(self, teacher: TeacherConfig, generation: GenerationConfig, api_key: str | None,
                 cache: ResponseCache, budget: Budget, finish: Callable[[Job, dict], None]):
        self.t, self.g, self.key, self.cache, self.budget, self.finish = teacher, generation, api_key, cache, budget, finish
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.rpm = RateLimiter(generation.requests_per_minute) if generation.requests_per_minute else None
        self.tpm = RateLimiter(generation.tokens_per_minute) if generation.tokens_per_minute else None
        self.pause_until = 0.0  # a 429's Retry-After holds back every worker, not just the one that got it
        self.http_requests = 0
        self._unsaved: list[tuple[str, dict]] = []
        self._saved: asyncio.Future | None = None

    async def run(self, jobs: list[Job]) -> None:
        import aiohttp

        queue = list(reversed(jobs))
        connector = aiohttp.TCPConnector(limit=self.g.concurrency, limit_per_host=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=self.t.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def worker() -> None:
                while queue:
                    await self.one(session, queue.pop())
            await asyncio.gather(*(worker() for _ in range(min(self.g.concurrency, len(jobs)))))

    def max_out(self, job: Job) -> int:
        return self.g.max_tokens if job.max_out is None else job.max_out

    async def one(self, session: Any, job: Job) -> None:
        est_cost = price(self.t, job.est_tokens, self.max_out(job))
        if not self.budget.reserve(est_cost):
            self.finish(job, {"status": "failed", "error": self.budget.reason()})
            return
        try:
            fields = await self.request(session, job)
        except Exception as e:  # noqa: BLE001 - one odd request (bad URL, client bug) must not stop the run
            fields = {"status": "failed", "error": redact(f"client_error: {type(e).__name__}: {e}", self.key)[:300]}
        actual = fields.get("cost_usd", 0.0)
        self.budget.settle(est_cost, actual)
        if fields["status"] == "done":
            # Persist first: a response counts as done only once it is committed.
            await self.persist(job.key, fields)
        self.finish(job, fields)

    async def persist(self, key: str, fields: dict) -> None:
        """Group commit: responses that arrive in the same loop iteration share one transaction,
        and each waits for that commit, so throughput does not pay one disk write per response."""
        self._unsaved.append((key, fields))
        if self._saved is None:
            loop = asyncio.get_running_loop()
            self._saved = loop.create_future()
            loop.call_soon(self._commit)
        await asyncio.shield(self._saved)

    def _commit(self) -> None:
        saved, self._saved = self._saved, None
        items, self._unsaved = self._unsaved, []
        try:
            self.cache.put_many(items)
        except Exception as e:  # noqa: BLE001 - every waiter must see the failure, not hang
            saved.set_exception(e)
        else:
            saved.set_result(None)

    async def request(self, session: Any, job: Job) -> dict:
        import aiohttp

        attempts = malformed = 0
        t_start = time.monotonic()
        while True:
            wait = self.pause_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.rpm:
                await self.rpm.acquire(1)
            reserved_tokens = job.est_tokens + self.max_out(job)
            if self.tpm:
                await self.tpm.acquire(reserved_tokens)
            attempts += 1
            self.http_requests += 1
            t0 = time.monotonic()
            status, body, retry_after = None, b"", None
            try:
                async with session.post(self.t.base_url + job.path, data=job.body, headers=self.headers) as resp:
                    status = resp.status
                    body = await resp.read()
                    retry_after = retry_after_s(resp.headers)
            except asyncio.TimeoutError:
                error, retryable = f"timeout: no response within {self.t.timeout_s:g}s", True
            except aiohttp.ClientError as e:
                error, retryable = f"connection: {type(e).__name__}: {redact(str(e), self.key)[:200]}", True
            latency = time.monotonic() - t0
            if status is not None and 200 <= status < 300:
                fields, error, retryable = job.parse(body)
                if fields is not None:
                    usage = fields["usage"]
                    if not usage["prompt_tokens"] and not usage["completion_tokens"]:
                        # No usage reported: charge the estimate rather than nothing.
                        usage.update(prompt_tokens=job.est_tokens, completion_tokens=len(fields["response"]) // 4 + 1)
                    if self.tpm:
                        self.tpm.refund(reserved_tokens - usage["prompt_tokens"] - usage["completion_tokens"])
                    fields.update(status="done", error=None, attempts=attempts, latency_s=round(latency, 4),
                                  cost_usd=price(self.t, usage["prompt_tokens"], usage["completion_tokens"]),
                                  model=fields["model"] or self.t.model)
                    return compact_fields(fields, self.g.keep_raw_logprobs)
                if retryable:
                    malformed += 1
                    if malformed > self.g.malformed_retries:
                        retryable, error = False, f"{error} (gave up after {attempts} attempts)"
            elif status is not None:
                error = redact(http_error_reason(status, body), self.key)
                retryable = status == 429 or status >= 500 or status == 408
                if status == 429 and retry_after:
                    self.pause_until = max(self.pause_until, time.monotonic() + retry_after)
            if not retryable or attempts > self.g.max_retries:
                if retryable:
                    error = f"{error} (gave up after {attempts} attempts)"
                return {"status": "failed", "error": error, "attempts": attempts,
                        "latency_s": round(time.monotonic() - t_start, 4)}
            backoff = random.uniform(0, min(self.g.backoff_max_s, self.g.backoff_base_s * 2 ** (attempts - 1)))
            await asyncio.sleep(retry_after if retry_after is not None else backoff)
