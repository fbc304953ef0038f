"""`distill serve`: the champion student behind an OpenAI-compatible API.

An application switches from the teacher to the student by changing `base_url`
only: `/v1/chat/completions` classifies the last user message and answers with
the label as content (and, with `logprobs`, the label distribution as
`top_logprobs`, exactly like `distill teacher serve`). `/v1/models`,
`/health` (no auth, for probes) and `/metrics` (Prometheus text) complete it.

Production modes, all configured by `ServeConfig`:

- canary: `canary_fraction` of requests is answered by the challenger (sticky
  per `user` field when the client sends one, random otherwise);
- teacher fallback: below `fallback_confidence` the teacher answers instead;
  when the teacher fails or runs out of time the student's answer stands;
- shadow: the models that did not serve (challenger and/or teacher) are asked
  in background threads and everything is logged to the shadow log. That work
  is queued after the answer is computed and dropped when the queue is full,
  so it can neither slow nor fail the served answer.

Which model answered is in the `x-distill-model` header (champion, challenger
or teacher) and in the extra `distill` field of the body, with the confidence.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distill.chat import MIN_LOGPROB, ApiError, token_logprob
from distill.config import ConfigError, ServeConfig, TeacherConfig
from distill.models.classifier import ClassifierStudent
from distill.serve.shadow import ShadowLog
from distill.teacher.soft_labels import label_of, soft_labels

logger = logging.getLogger("distill.serve")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def check_safetensors_only(path: str | Path) -> Path:
    """Refuse a student directory without safetensors weights: pickled weights can run code on load."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: not a student directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        hint = f" (found {', '.join(pickled)}; pickled weights are never loaded)" if pickled else ""
        raise ConfigError(f"{path}: no .safetensors weights{hint}")
    return path


def user_text(messages: Any, max_chars: int) -> str:
    """The text to classify: the last user message (string or text content parts)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(400, "messages holds no user message")
    content = users[-1].get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, "only text content parts are supported")
            parts.append(str(part.get("text", "")))
        content = "".join(parts)
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, "the last user message is empty")
    if len(content) > max_chars:
        raise ApiError(400, f"the user message has {len(content)} characters; the limit is {max_chars}")
    return content


def route_to_challenger(fraction: float, user: str | None, rng: random.Random) -> bool:
    """Canary routing: sticky per user id (hash) when given, otherwise a fresh draw per request."""
    if fraction <= 0:
        return False
    if user:
        h = int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") / 2**64
        return h < fraction
    return rng.random() < fraction


def label_logprobs(probs: dict[str, float], top_k: int) -> dict:
    """OpenAI `logprobs` for a one-token label answer, like `distill teacher serve` emits."""
    import math

    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    lp = lambda p: math.log(p) if p > 0 else MIN_LOGPROB  # noqa: E731
    tops = [token_logprob(l, lp(p)) for l, p in ranked[:top_k]]
    return {"content": [{**token_logprob(ranked[0][0], lp(ranked[0][1])), "top_logprobs": tops}], "refusal": None}


class Metrics:
    """Counters and a latency histogram in Prometheus text format (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, str], float] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def inc(self, name: str, label: str = "", by: float = 1) -> None:
        with self.lock:
            self.counters[(name, label)] = self.counters.get((name, label), 0) + by

    def observe(self, seconds: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(LATENCY_BUCKETS_S) if seconds <= b), len(LATENCY_BUCKETS_S))
            self.buckets[i] += 1
            self.latency_sum += seconds
            self.latency_count += 1

    def render(self, gauges: dict[str, float]) -> str:
        lines = []
        with self.lock:
            for (name, label), v in sorted(self.counters.items()):
                lines.append(f"{name}{{{label}}} {v:g}" if label else f"{name} {v:g}")
            cum = 0
            for b, n in zip(LATENCY_BUCKETS_S, self.buckets):
                cum += n
                lines.append(f'distill_request_seconds_bucket{{le="{b}"}} {cum}')
            lines.append(f'distill_request_seconds_bucket{{le="+Inf"}} {self.latency_count}')
            lines.append(f"distill_request_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"distill_request_seconds_count {self.latency_count}")
        lines += [f"{k} {v:g}" for k, v in gauges.items()]
        return "\n".join(lines) + "\n"


class _Student:
    """A loaded classifier student plus what the server reports about it."""

    def __init__(self, path: str | Path, run: str | None):

        self.path = check_safetensors_only(path)
        self.model = ClassifierStudent(self.path)
        self.run = run or str(self.path)
        self.lock = threading.Lock()  # one forward at a time per model: predictable CPU use and latency

    def classify(self, text: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        with self.lock:
            p = self.model.predict_proba([text])[0]
        probs = {l: float(x) for l, x in zip(self.model.labels, p)}
        label = max(probs, key=probs.get)
        return {"label": label, "confidence": probs[label], "probs": probs,
                "latency_ms": (time.perf_counter() - t0) * 1000}

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, truncation=True, max_length=self.model.max_length)["input_ids"])


def _teacher_answer(resp: Any, labels: list[str], latency_ms: float) -> dict[str, Any]:
    """A teacher chat completion as {label, confidence, probs, content, logprobs, latency_ms}."""
    choice = resp.choices[0]
    content = choice.message.content
    lp = choice.logprobs.model_dump()["content"] if choice.logprobs and choice.logprobs.content else None
    probs = soft_labels({"response": content, "logprobs": lp}, labels)
    label = label_of(content, labels)
    return {"label": label, "content": content, "probs": probs, "logprobs": lp, "latency_ms": latency_ms,
            "confidence": probs.get(label) if (probs and label) else None}


def create_app(student_dir: str | Path, serve: ServeConfig, *, challenger_dir: str | Path | None = None,
               teacher: TeacherConfig | None = None, teacher_api_key: str | None = None,
               api_key: str | None = None, champion_run: str | None = None,
               challenger_run: str | None = None) -> "FastAPI":  # noqa: F821  long: split into named steps is pending
    # No `from __future__ import annotations` in this module: FastAPI must see the real Request class.
    """The student server as a FastAPI app (run it with uvicorn or distill.httpserver.start_in_thread).

    Args:
        student_dir: champion classifier directory (safetensors only).
        serve: the serve section (limits, timeouts, canary, fallback, shadow, log).
        challenger_dir: challenger classifier for canary and shadow.
        teacher: teacher endpoint for fallback and shadow; None disables both uses.
        teacher_api_key: key for the teacher; os.environ[teacher.api_key_env] when None.
        api_key: key clients must send as a Bearer token; os.environ[serve.api_key_env] when None;
            when neither is set, authentication is off (with one warning).
        champion_run, challenger_run: run ids written to the log (the directory paths when unset).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse


    champion = _Student(student_dir, champion_run)
    challenger = _Student(challenger_dir, challenger_run) if challenger_dir else None
    labels = champion.model.labels
    if challenger is not None and set(challenger.model.labels) != set(labels):
        raise ConfigError(f"{challenger_dir}: challenger labels differ from the champion's ({student_dir})")
    if serve.canary_fraction > 0 and challenger is None:
        raise ConfigError("serve.canary_fraction > 0 needs a challenger (--challenger or the registry challenger)")
    if serve.fallback_confidence is not None and teacher is None:
        raise ConfigError("serve.fallback_confidence is set but no teacher endpoint is configured")

    key = api_key if api_key is not None else os.environ.get(serve.api_key_env)
    if not key:
        logger.warning("no API key in %s: the student server accepts unauthenticated requests", serve.api_key_env)
    teacher_key = teacher_api_key if teacher_api_key is not None else (
        os.environ.get(teacher.api_key_env) if teacher else None)
    log_all = serve.log_requests or serve.shadow
    # With a teacher configured the log always exists: a paid answer is never dropped.
    log = ShadowLog(serve.log_url) if (log_all or teacher is not None) else None
    metrics = Metrics()
    rng = random.Random()
    background = ThreadPoolExecutor(serve.background_workers, thread_name_prefix="distill-shadow")
    inference = ThreadPoolExecutor(4, thread_name_prefix="distill-infer")
    pending = [0]
    pending_lock = threading.Lock()
    async_teacher = sync_teacher = None
    if teacher is not None:
        import openai

        # Fallback is on the request's clock: no retries, the remaining time budget is the timeout.
        async_teacher = openai.AsyncOpenAI(base_url=teacher.base_url, api_key=teacher_key or "unused", max_retries=0)
        sync_teacher = openai.OpenAI(base_url=teacher.base_url, api_key=teacher_key or "unused",
                                     timeout=teacher.timeout_s, max_retries=2)

    def shadow_job(row: dict[str, Any], text: str, messages: list, need: list[str], update: bool) -> None:
        """Runs in a background thread: ask the models that did not serve, then log the row.

        update: the row is already logged (a teacher answer); only add the shadow answers to it.
        """
        before = set(row)
        try:
            for name in need:
                if name == "teacher":
                    t0 = time.perf_counter()
                    try:
                        resp = sync_teacher.chat.completions.create(
                            model=teacher.model, messages=messages, temperature=0, max_tokens=16,
                            logprobs=True, top_logprobs=min(20, len(labels)))
                        ans = _teacher_answer(resp, labels, (time.perf_counter() - t0) * 1000)
                        row.update({"teacher_label": ans["label"], "teacher_confidence": ans["confidence"],
                                    "teacher_probs": ans["probs"], "teacher_latency_ms": ans["latency_ms"],
                                    "teacher_run": teacher.model})
                    except Exception as e:  # the shadow path records failures, it never raises them
                        row["teacher_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        metrics.inc("distill_shadow_errors_total", 'model="teacher"')
                else:
                    model = champion if name == "champion" else challenger
                    ans = model.classify(text)
                    row.update({f"{name}_label": ans["label"], f"{name}_confidence": ans["confidence"],
                                f"{name}_probs": ans["probs"], f"{name}_latency_ms": ans["latency_ms"],
                                f"{name}_run": model.run})
            if log is not None:
                if update:
                    log.update(row["request_id"], {k: v for k, v in row.items() if k not in before})
                else:
                    log.append(row)
        except Exception:
            logger.exception("shadow/log job failed for request %s", row.get("request_id"))
            metrics.inc("distill_shadow_errors_total", 'model="log"')
        finally:
            with pending_lock:
                pending[0] -= 1

    def enqueue(row: dict[str, Any], text: str, messages: list, need: list[str], update: bool = False) -> None:
        with pending_lock:
            if pending[0] >= serve.max_pending:
                metrics.inc("distill_shadow_dropped_total")
                return
            pending[0] += 1
        background.submit(shadow_job, row, text, messages, need, update)

    def drain(timeout: float = 30.0) -> bool:
        """Wait until queued shadow/log work is done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with pending_lock:
                if pending[0] == 0:
                    return True
            time.sleep(0.01)
        return False

    @asynccontextmanager
    async def lifespan(app):
        yield
        drain(timeout=serve.timeout_s + (teacher.timeout_s if teacher else 0))
        background.shutdown(wait=False)
        inference.shutdown(wait=False)

    app = FastAPI(title="distill student", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.drain = drain
    app.state.log = log

    def authorized(request: Request) -> bool:
        if not key:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def error(e: ApiError) -> JSONResponse:
        metrics.inc("distill_errors_total", f'code="{e.status}"')
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request: Request) -> bytes:
        limit = serve.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads have no content-length: count as we read
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the {limit}-byte limit", code="request_too_large")
        return bytes(body)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": serve.model_name, "champion": champion.run,
                "challenger": challenger.run if challenger else None, "labels": len(labels)}

    @app.get("/metrics")
    async def prometheus(request: Request):
        if not authorized(request):
            return error(ApiError(401, "missing or invalid API key", "authentication_error", "invalid_api_key"))
        with pending_lock:
            queued = pending[0]
        return PlainTextResponse(metrics.render({"distill_shadow_pending": queued}))

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return error(ApiError(401, "missing or invalid API key", "authentication_error", "invalid_api_key"))
        return {"object": "list", "data": [{"id": serve.model_name, "object": "model", "created": 0,
                                            "owned_by": "distill"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        started = time.perf_counter()
        if not authorized(request):
            return error(ApiError(401, "missing or invalid API key", "authentication_error", "invalid_api_key"))
        try:
            body = await read_body(request)
            try:
                req = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "request body is not valid JSON") from None
            if not isinstance(req, dict):
                raise ApiError(400, "request body must be a JSON object")
            if req.get("stream"):
                raise ApiError(400, "stream=true is not supported by this server", code="unsupported_value")
            if req.get("n", 1) != 1:
                raise ApiError(400, "only n=1 is supported", code="unsupported_value")
            text = user_text(req.get("messages"), serve.max_text_chars)
            top_k = req.get("top_logprobs") or 0
            if not isinstance(top_k, int) or not 0 <= top_k <= 20:
                raise ApiError(400, "top_logprobs must be an integer between 0 and 20")
            result = await asyncio.wait_for(_answer(req, text, started), timeout=serve.timeout_s)
        except ApiError as e:
            return error(e)
        except asyncio.TimeoutError:
            return error(ApiError(504, f"no answer within {serve.timeout_s} s", "timeout", "timeout"))
        metrics.observe(time.perf_counter() - started)
        return JSONResponse(result["body"], headers=result["headers"])

    async def _answer(req: dict, text: str, started: float) -> dict:
        loop = asyncio.get_running_loop()
        canary = route_to_challenger(serve.canary_fraction, req.get("user"), rng)
        served_name = "challenger" if canary else "champion"
        model = challenger if canary else champion
        ans = await loop.run_in_executor(inference, model.classify, text)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        row: dict[str, Any] = {
            "request_id": request_id, "ts": time.time(), "text": text, "canary": int(canary), "fallback": 0,
            f"{served_name}_label": ans["label"], f"{served_name}_confidence": ans["confidence"],
            f"{served_name}_probs": ans["probs"], f"{served_name}_latency_ms": ans["latency_ms"],
            f"{served_name}_run": model.run,
        }
        served_by, content, confidence, lp = served_name, ans["label"], ans["confidence"], None
        asked = {served_name}
        if serve.fallback_confidence is not None and ans["confidence"] < serve.fallback_confidence:
            asked.add("teacher")
            row["fallback"] = 1
            metrics.inc("distill_fallback_total")
            remaining = serve.timeout_s - (time.perf_counter() - started) - 0.05
            t0 = time.perf_counter()
            try:
                if remaining <= 0:
                    raise TimeoutError("no time left for the teacher")
                resp = await async_teacher.chat.completions.create(
                    model=teacher.model, messages=req["messages"], temperature=0, max_tokens=16, logprobs=True,
                    top_logprobs=min(20, len(labels)), timeout=min(remaining, teacher.timeout_s))
                t_ans = _teacher_answer(resp, labels, (time.perf_counter() - t0) * 1000)
                row.update({"teacher_label": t_ans["label"], "teacher_confidence": t_ans["confidence"],
                            "teacher_probs": t_ans["probs"], "teacher_latency_ms": t_ans["latency_ms"],
                            "teacher_run": teacher.model})
                served_by, content, confidence, lp = "teacher", t_ans["content"], t_ans["confidence"], t_ans["logprobs"]
                row["teacher_answered"] = True
            except Exception as e:  # the student's answer stands when the teacher cannot help in time
                row["teacher_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                metrics.inc("distill_fallback_failed_total")
        row.update({"served_by": served_by, "served_label": label_of(content, labels) or content,
                    "served_confidence": confidence})
        metrics.inc("distill_requests_total", f'model="{served_by}"')
        need = []
        if serve.shadow:
            need = [m for m in ("champion", "challenger") if m not in asked and (m == "champion" or challenger)]
            if teacher is not None and serve.shadow_teacher and "teacher" not in asked:
                need.append("teacher")
        if row.pop("teacher_answered", False):
            # A paid teacher answer is persisted before it is returned (not behind queued shadow
            # work: its own thread); shadow answers are added to the row later.
            await loop.run_in_executor(None, log.append, dict(row))
            if need:
                enqueue(row, text, req["messages"], need, update=True)
        elif need or log_all:
            enqueue(row, text, req["messages"], need)

        if req.get("logprobs"):
            k = req.get("top_logprobs") or 0
            if served_by != "teacher":
                logprobs = label_logprobs(ans["probs"], k)
            else:  # the teacher was asked for every label's logprob; the client gets what it asked for
                logprobs = {"content": [{**t, "top_logprobs": (t.get("top_logprobs") or [])[:k]} for t in lp or []],
                            "refusal": None}
        else:
            logprobs = None
        prompt_tokens = champion.count_tokens(text)
        body = {
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": serve.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
            "distill": {"served_by": served_by, "confidence": confidence, "canary": canary,
                        "fallback": bool(row["fallback"])},
        }
        headers = {"x-distill-model": served_by, "x-request-id": request_id}
        if confidence is not None:
            headers["x-distill-confidence"] = f"{confidence:.6f}"
        return {"body": body, "headers": headers}

    return app


def serve_forever(student_dir: str | Path, serve: ServeConfig, **kwargs: Any) -> None:
    """Run the student server in the foreground (the `distill serve` command)."""
    import uvicorn

    app = create_app(student_dir, serve, **kwargs)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info", access_log=False,
                limit_concurrency=512, timeout_keep_alive=5)
