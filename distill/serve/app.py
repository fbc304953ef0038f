"""`distill serve`: the champion student behind an OpenAI-compatible API.

An application switches from the teacher to the student by changing `base_url`
only: `/v1/chat/completions` classifies the last user message and answers with
the label as content (and, with `logprobs`, the label distribution as
`top_logprobs`, exactly like `distill teacher serve`). `/v1/models`,
`/health` (no auth, for probes) and `/metrics` (Prometheus text) complete it.

Production modes, all configured by `ServeConfig`:

- canary: `canary_fraction` of requests is answered by the challenger (sticky
  per `user` field when the client sends one, random otherwise), until the
  registry says the canary judge stopped it (flows/canary_watch.py);
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
import itertools
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distill.chat import ApiError, safe_log, token_logprob
from distill.config import ConfigError, ServeConfig, TeacherConfig
from distill.serve.batcher import LogWriter, MicroBatcher, PendingWork
from distill.serve.canary import route_to_challenger
from distill.serve.shadow import ShadowLog
from distill.teacher.server_guard import UNAUTHORIZED, bearer_ok, server_key
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


def label_logprobs(probs: dict[str, float], top_k: int) -> dict:
    """OpenAI `logprobs` for a one-token label answer, like `distill teacher serve` emits."""
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    tops = [token_logprob(l, safe_log(p)) for l, p in ranked[:top_k]]
    return {"content": [{**token_logprob(ranked[0][0], safe_log(ranked[0][1])), "top_logprobs": tops}],
            "refusal": None}


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


def _teacher_answer(resp: Any, labels: list[str], latency_ms: float) -> dict[str, Any]:
    """A teacher chat completion as {label, confidence, probs, content, logprobs, latency_ms}."""
    choice = resp.choices[0]
    content = choice.message.content
    lp = choice.logprobs.model_dump()["content"] if choice.logprobs and choice.logprobs.content else None
    probs = soft_labels({"response": content, "logprobs": lp}, labels)
    label = label_of(content, labels)
    return {"label": label, "content": content, "probs": probs, "logprobs": lp, "latency_ms": latency_ms,
            "confidence": probs.get(label) if (probs and label) else None}


class _Student:
    """A loaded classifier student, its micro-batcher, and what the server reports about it."""

    def __init__(self, path: str | Path, run: str | None, serve: ServeConfig):
        from distill.serve.runtime import StudentRuntime

        self.path = check_safetensors_only(path)
        # torch's own thread pool, driven from the batcher thread next to a busy event loop, took
        # 156 ms for a 7 ms forward on 2 cores; one thread and one lane are the torch default here
        # (its Python-heavy forward holds the GIL). ONNX Runtime gets this worker's share of the
        # cores as lanes of one thread each: a batch-1 forward on 2 threads cost 1.4x the CPU of one
        # thread, and one lane left a core idle between batches (c4 P50 in alternating runs below).
        share = max(1, (os.cpu_count() or 1) // serve.workers)
        lanes = serve.lanes or (1 if serve.runtime == "torch" else share)
        threads = serve.threads or (1 if serve.runtime == "torch" else max(1, share // lanes))
        self.runtime = StudentRuntime(self.path, serve.runtime, threads=threads)
        self.labels = self.runtime.labels
        self.run = run or str(self.path)
        self.batcher = MicroBatcher(self.runtime.predict, serve.max_batch, serve.batch_window_ms, lanes=lanes)

    def _answer(self, probs, tokens: int, ms: float) -> dict[str, Any]:
        best = int(probs.argmax())
        named = dict(zip(self.labels, probs.tolist()))
        label = self.labels[best]
        return {"label": label, "confidence": named[label], "probs": named, "tokens": tokens, "latency_ms": ms}

    async def classify(self, text: str) -> dict[str, Any]:
        return self._answer(*await self.batcher.submit(text))

    def classify_sync(self, text: str) -> dict[str, Any]:
        return self._answer(*self.batcher.classify_sync(text))


class _Server:
    """Everything one student server holds: models, keys, log, queues, metrics, teacher clients.

    Its methods are the steps of a request; `create_app` wires them to routes.
    """

    def __init__(self, student_dir, serve: ServeConfig, challenger_dir, teacher: TeacherConfig | None,
                 teacher_api_key: str | None, api_key: str | None, champion_run: str | None,
                 challenger_run: str | None, rng: random.Random | None = None,
                 canary_registry: tuple[str, str] | None = None):
        self.serve, self.teacher = serve, teacher
        # (registry dir, task) of a registry challenger: its entry is re-read so a stopped canary gets no traffic.
        self.canary_registry = canary_registry if challenger_run else None
        self.canary_stopped = False
        self._canary_next = 0.0  # when the registry entry is read next, on the monotonic clock
        self.champion = _Student(student_dir, champion_run, serve)
        self.challenger = _Student(challenger_dir, challenger_run, serve) if challenger_dir else None
        self.labels = self.champion.labels
        self._check_modes(student_dir, challenger_dir)
        self.key = api_key if api_key is not None else os.environ.get(serve.api_key_env)
        if not self.key:
            logger.warning("no API key in %s: the student server accepts unauthenticated requests", serve.api_key_env)
        self.log_all = serve.log_requests or serve.shadow
        # With a teacher configured the log always exists: a paid answer is never dropped.
        self.log = ShadowLog(serve.log_url) if (self.log_all or teacher is not None) else None
        self.metrics = Metrics()
        self.rng = rng or random.Random()  # seeded from os.urandom; a test hands in a seeded one
        # Request ids: a random prefix per server process and a counter (uuid4 read os.urandom on
        # every request); workers and restarts draw their own prefix.
        self.id_prefix = os.urandom(6).hex()
        self.id_counter = itertools.count()
        self.background = ThreadPoolExecutor(serve.background_workers, thread_name_prefix="distill-shadow")
        self.pending = PendingWork(serve.max_pending)
        self.writer = LogWriter(self.log.append_many, self.pending.done) if self.log is not None else None
        self.async_teacher = self.sync_teacher = None
        if teacher is not None:
            import openai

            teacher_key = teacher_api_key if teacher_api_key is not None else os.environ.get(teacher.api_key_env)
            if not teacher_key:  # an open local teacher needs none; a hosted one answers every call with 401
                logger.warning("no teacher key in %s: shadow and fallback calls to %s go without one",
                               teacher.api_key_env, teacher.base_url)
            # Fallback is on the request's clock: no retries, the remaining time budget is the timeout.
            self.async_teacher = openai.AsyncOpenAI(base_url=teacher.base_url, api_key=teacher_key or "unused",
                                                    max_retries=0)
            self.sync_teacher = openai.OpenAI(base_url=teacher.base_url, api_key=teacher_key or "unused",
                                              timeout=teacher.timeout_s, max_retries=2)

    def _check_modes(self, student_dir, challenger_dir) -> None:
        serve = self.serve
        if self.challenger is not None and set(self.challenger.labels) != set(self.labels):
            raise ConfigError(f"{challenger_dir}: challenger labels differ from the champion's ({student_dir})")
        if serve.canary_fraction > 0 and self.challenger is None:
            raise ConfigError("serve.canary_fraction > 0 needs a challenger (--challenger or the registry challenger)")
        if serve.fallback_mean_logprob is not None:
            raise ConfigError("serve.fallback_mean_logprob applies to generative students; a classifier student "
                              "falls back on its top-label probability: set serve.fallback_confidence")
        if serve.fallback_confidence is not None and self.teacher is None:
            raise ConfigError("serve.fallback_confidence is set but no teacher endpoint is configured")

    # --- background work: shadow answers and log rows ----------------------------------------
    def _shadow_teacher(self, row: dict[str, Any], messages: list) -> None:
        t0 = time.perf_counter()
        try:
            resp = self.sync_teacher.chat.completions.create(
                model=self.teacher.model, messages=messages, temperature=0, max_tokens=16,
                logprobs=True, top_logprobs=min(20, len(self.labels)))
            ans = _teacher_answer(resp, self.labels, (time.perf_counter() - t0) * 1000)
            row.update({"teacher_label": ans["label"], "teacher_confidence": ans["confidence"],
                        "teacher_probs": ans["probs"], "teacher_latency_ms": ans["latency_ms"],
                        "teacher_run": self.teacher.model})
        except Exception as e:  # the shadow path records failures, it never raises them
            row["teacher_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            self.metrics.inc("distill_shadow_errors_total", 'model="teacher"')

    def shadow_job(self, row: dict[str, Any], text: str, messages: list, need: list[str], update: bool) -> None:
        """Runs in a background thread: ask the models that did not serve, then log the row.

        update: the row is already logged (a teacher answer); only add the shadow answers to it.
        """
        before = set(row)
        handed_to_writer = False
        try:
            for name in need:
                if name == "teacher":
                    self._shadow_teacher(row, messages)
                    continue
                model = self.champion if name == "champion" else self.challenger
                ans = model.classify_sync(text)
                row.update({f"{name}_label": ans["label"], f"{name}_confidence": ans["confidence"],
                            f"{name}_probs": ans["probs"], f"{name}_latency_ms": ans["latency_ms"],
                            f"{name}_run": model.run})
            if update:
                self.log.update(row["request_id"], {k: v for k, v in row.items() if k not in before})
            elif self.writer is not None:
                self.writer.put(row)  # the writer releases the pending slot once the row is written
                handed_to_writer = True
        except Exception:
            logger.exception("shadow/log job failed for request %s", row.get("request_id"))
            self.metrics.inc("distill_shadow_errors_total", 'model="log"')
        finally:
            if not handed_to_writer:
                self.pending.done()

    def enqueue(self, row: dict[str, Any], text: str, messages: list, need: list[str], update: bool = False) -> None:
        if not self.pending.reserve():
            self.metrics.inc("distill_shadow_dropped_total")
            return
        if need:
            self.background.submit(self.shadow_job, row, text, messages, need, update)
        else:  # a plain request-log row: straight to the batched writer, no thread hop
            self.writer.put(row)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until queued shadow/log work is done (tests, shutdown)."""
        return self.pending.drain(timeout)

    def close(self) -> None:
        self.drain(timeout=self.serve.timeout_s + (self.teacher.timeout_s if self.teacher else 0))
        self.background.shutdown(wait=False)
        for s in (self.champion, self.challenger):
            if s is not None:
                s.batcher.close()
        if self.writer is not None:
            self.writer.close()

    def canary_share(self) -> float:
        """The share of requests routed to the challenger now: serve.canary_fraction until the registry
        says the challenger is no longer one (the canary judge stopped it), then 0 for good."""
        if self.canary_stopped:
            return 0.0
        if self.canary_registry is not None and self.serve.canary_fraction > 0:
            now = time.monotonic()
            if now >= self._canary_next:  # one registry read per serve.canary_poll_s, local or s3://
                from distill.serve.registry import Registry

                root, task = self.canary_registry
                status = Registry(root).status(task, self.challenger.run)
                if status != "challenger":
                    self.canary_stopped = True
                    logger.warning("challenger %s is %s in the registry: no more canary traffic",
                                   self.challenger.run, status)
                    return 0.0
                self._canary_next = now + self.serve.canary_poll_s
        return self.serve.canary_fraction

    # --- request steps -----------------------------------------------------------------------
    def authorized(self, request) -> bool:
        if not self.key:
            return True
        return bearer_ok(request.headers.get("authorization"), self.key)

    def error(self, e: ApiError):
        from fastapi.responses import JSONResponse

        self.metrics.inc("distill_errors_total", f'code="{e.status}"')
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(self, request) -> bytes:
        limit = self.serve.max_request_bytes
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

    def parse(self, body: bytes) -> tuple[dict, str]:
        """The request object and the text to classify, or the OpenAI-style error that refuses it."""
        try:
            req = json.loads(body)
        # ValueError: bad JSON or UTF-8, and integers of more than 4300 digits; RecursionError: deep nesting
        except (ValueError, RecursionError):
            raise ApiError(400, "request body is not valid JSON (UTF-8)") from None
        if not isinstance(req, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required", param="model")
        if model != self.serve.model_name:
            raise ApiError(404, f"The model `{_printable(model)}` does not exist or you do not have access to it.",
                           "invalid_request_error", "model_not_found", param="model")
        if req.get("stream"):
            raise ApiError(400, "stream=true is not supported by this server", code="unsupported_value")
        if req.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", code="unsupported_value")
        user = req.get("user")
        if user is not None and not isinstance(user, str):
            raise ApiError(400, "user must be a string", param="user")
        _check_unicode(user, "user")
        text = user_text(req.get("messages"), self.serve.max_text_chars)
        _check_unicode(text, "messages")
        top_k = req.get("top_logprobs") or 0
        if not isinstance(top_k, int) or not 0 <= top_k <= 20:
            raise ApiError(400, "top_logprobs must be an integer between 0 and 20")
        return req, text

    async def chat(self, request):
        from fastapi.responses import JSONResponse
        from starlette.requests import ClientDisconnect

        started = time.perf_counter()
        if not self.authorized(request):
            return self.error(UNAUTHORIZED)
        timeout = self.serve.timeout_s
        body = None
        try:
            # One deadline covers reading the body and answering: a client that trickles its body
            # in cannot hold a slot. asyncio.timeout runs in this task (wait_for made two more).
            async with asyncio.timeout(timeout):
                body = await self.read_body(request)
                req, text = self.parse(body)
                result = await self.answer(req, text, started)
        except ApiError as e:
            return self.error(e)
        except TimeoutError:
            if body is None:
                return self.error(ApiError(408, f"request body not received within {timeout} s", "timeout",
                                           "request_timeout"))
            return self.error(ApiError(504, f"no answer within {timeout} s", "timeout", "timeout"))
        except ClientDisconnect:  # the client left: nobody to answer, nothing went wrong here
            logger.debug("client disconnected before its request body was read")
            self.metrics.inc("distill_client_disconnects_total")
            return JSONResponse({}, status_code=499)
        self.metrics.observe(time.perf_counter() - started)
        return JSONResponse(result["body"], headers=result["headers"])

    async def fallback(self, req: dict, row: dict, started: float) -> dict | None:
        """Ask the teacher within what is left of the request's time; None when it cannot answer in time."""
        row["fallback"] = 1
        self.metrics.inc("distill_fallback_total")
        remaining = self.serve.timeout_s - (time.perf_counter() - started) - 0.05
        t0 = time.perf_counter()
        try:
            if remaining <= 0:
                raise TimeoutError("no time left for the teacher")
            resp = await self.async_teacher.chat.completions.create(
                model=self.teacher.model, messages=req["messages"], temperature=0, max_tokens=16, logprobs=True,
                top_logprobs=min(20, len(self.labels)), timeout=min(remaining, self.teacher.timeout_s))
            t_ans = _teacher_answer(resp, self.labels, (time.perf_counter() - t0) * 1000)
        except Exception as e:  # the student's answer stands when the teacher cannot help in time
            row["teacher_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            self.metrics.inc("distill_fallback_failed_total")
            return None
        row.update({"teacher_label": t_ans["label"], "teacher_confidence": t_ans["confidence"],
                    "teacher_probs": t_ans["probs"], "teacher_latency_ms": t_ans["latency_ms"],
                    "teacher_run": self.teacher.model})
        return t_ans

    async def answer(self, req: dict, text: str, started: float) -> dict:
        serve = self.serve
        canary = route_to_challenger(self.canary_share(), req.get("user"), self.rng)
        served_name = "challenger" if canary else "champion"
        model = self.challenger if canary else self.champion
        ans = await model.classify(text)
        request_id = f"chatcmpl-{self.id_prefix}{next(self.id_counter):012x}"
        row: dict[str, Any] = {
            "request_id": request_id, "ts": time.time(), "text": text, "canary": int(canary), "fallback": 0,
            f"{served_name}_label": ans["label"], f"{served_name}_confidence": ans["confidence"],
            f"{served_name}_probs": ans["probs"], f"{served_name}_latency_ms": ans["latency_ms"],
            f"{served_name}_run": model.run,
        }
        served_by, content, confidence, lp = served_name, ans["label"], ans["confidence"], None
        asked = {served_name}
        t_ans = None
        if serve.fallback_confidence is not None and ans["confidence"] < serve.fallback_confidence:
            asked.add("teacher")
            t_ans = await self.fallback(req, row, started)
            if t_ans is not None:
                served_by, content, confidence, lp = "teacher", t_ans["content"], t_ans["confidence"], t_ans["logprobs"]
        # Only the teacher's free text needs reading into a label; the student's content is its label.
        served_label = (label_of(content, self.labels) or content) if served_by == "teacher" else content
        row.update({"served_by": served_by, "served_label": served_label,
                    "served_confidence": confidence})
        self.metrics.inc("distill_requests_total", f'model="{served_by}"')
        await self._log(row, text, req["messages"], asked, teacher_answered=t_ans is not None)
        body = self.response_body(req, request_id, ans, served_by, content, confidence, lp, canary, row["fallback"])
        headers = {"x-distill-model": served_by, "x-request-id": request_id}
        if confidence is not None:
            headers["x-distill-confidence"] = f"{confidence:.6f}"
        return {"body": body, "headers": headers}

    async def _log(self, row: dict, text: str, messages: list, asked: set, teacher_answered: bool) -> None:
        need = []
        if self.serve.shadow:
            need = [m for m in ("champion", "challenger") if m not in asked and (m == "champion" or self.challenger)]
            if self.teacher is not None and self.serve.shadow_teacher and "teacher" not in asked:
                need.append("teacher")
        if teacher_answered:
            # A paid teacher answer is persisted before it is returned (not behind queued shadow
            # work: its own thread); shadow answers are added to the row later.
            await asyncio.get_running_loop().run_in_executor(None, self.log.append, dict(row))
            if need:
                self.enqueue(row, text, messages, need, update=True)
        elif need or self.log_all:
            self.enqueue(row, text, messages, need)

    def response_body(self, req: dict, request_id: str, ans: dict, served_by: str, content: str,
                      confidence: float | None, lp: list | None, canary: bool, fallback: int) -> dict:
        if req.get("logprobs"):
            k = req.get("top_logprobs") or 0
            if served_by != "teacher":
                logprobs = label_logprobs(ans["probs"], k)
            else:  # the teacher was asked for every label's logprob; the client gets what it asked for
                logprobs = {"content": [{**t, "top_logprobs": (t.get("top_logprobs") or [])[:k]} for t in lp or []],
                            "refusal": None}
        else:
            logprobs = None
        prompt_tokens = ans["tokens"]
        return {
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.serve.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
            "distill": {"served_by": served_by, "confidence": confidence, "canary": canary,
                        "fallback": bool(fallback)},
        }


def _printable(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")[:200]


def _check_unicode(value: str | None, field: str) -> None:
    """A lone surrogate ("\\ud800") parses as JSON but is no text: refuse it before it reaches a model or the log."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{field} holds invalid Unicode (lone surrogate at character {e.start})",
                       param=field) from None


def _unexpected(server: _Server, path: str, exc: Exception):
    """The JSON 500 for an error no handler expected, logged without the stack."""
    logger.error("unexpected error on %s: %s: %s", path, type(exc).__name__, exc)
    return server.error(ApiError(500, "internal server error", "server_error", "internal_error"))


def _add_routes(app, server: _Server) -> None:
    """The HTTP surface: health, metrics, models, chat completions, and JSON for unexpected errors."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    serve = server.serve

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return _unexpected(server, request.url.path, exc)

    @app.get("/health")
    async def health():
        # Run ids only: a directory path tells a prober how the host is laid out.
        return {"status": "ok", "model": serve.model_name, "runtime": serve.runtime,
                "champion": server.champion.run if server.champion.run != str(server.champion.path) else None,
                "challenger": (server.challenger.run if server.challenger.run != str(server.challenger.path)
                               else None) if server.challenger else None,
                "canary_fraction": server.canary_share(), "labels": len(server.labels)}

    @app.get("/metrics")
    async def prometheus(request: Request):
        if not server.authorized(request):
            return server.error(UNAUTHORIZED)
        b = server.champion.batcher
        return PlainTextResponse(server.metrics.render({
            "distill_shadow_pending": server.pending.count, "distill_batches_total": b.batches,
            "distill_batched_requests_total": b.items, "distill_forward_seconds_total": b.forward_s}))

    @app.get("/v1/models")
    async def models(request: Request):
        if not server.authorized(request):
            return server.error(UNAUTHORIZED)
        return {"object": "list", "data": [{"id": serve.model_name, "object": "model", "created": 0,
                                            "owned_by": "distill"}]}

    # A plain Starlette route: the handler reads the request itself, so FastAPI's per-request
    # dependency and signature machinery has nothing to do.
    app.add_route("/v1/chat/completions", server.chat, methods=["POST"], include_in_schema=False)

    del unexpected, health, prometheus, models  # registered on the app; the names are not used here


def create_app(student_dir: str | Path, serve: ServeConfig, *, challenger_dir: str | Path | None = None,
               teacher: TeacherConfig | None = None, teacher_api_key: str | None = None,
               api_key: str | None = None, champion_run: str | None = None,
               challenger_run: str | None = None, rng: random.Random | None = None,
               canary_registry: tuple[str, str] | None = None) -> "FastAPI":  # noqa: F821
    # No `from __future__ import annotations` in this module: FastAPI must see the real Request class.
    """The student server as a FastAPI app (run it with uvicorn or distill.httpserver.start_in_thread).

    Args:
        student_dir: champion classifier directory (safetensors only).
        serve: the serve section (runtime, batching, limits, timeouts, canary, fallback, shadow, log).
        challenger_dir: challenger classifier for canary and shadow.
        teacher: teacher endpoint for fallback and shadow; None disables both uses.
        teacher_api_key: key for the teacher; os.environ[teacher.api_key_env] when None.
        api_key: key clients must send as a Bearer token; os.environ[serve.api_key_env] when None;
            when neither is set (or it is ""), authentication is off, with one warning. In-process use
            only: `serve_forever` (the command) refuses that unless asked, and only on loopback.
        champion_run, challenger_run: run ids written to the log (the directory paths when unset).
        rng: the canary draw for requests without a `user` (one draw per request); a fresh
            `random.Random()` when None.
        canary_registry: (registry dir, task) the challenger `challenger_run` is registered in; its
            entry is re-read every serve.canary_poll_s and a stopped canary gets no more traffic.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    server = _Server(student_dir, serve, challenger_dir, teacher, teacher_api_key, api_key, champion_run,
                     challenger_run, rng, canary_registry)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="distill student", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.drain = server.drain
    app.state.log = server.log
    app.state.server = server
    _add_routes(app, server)
    return app


def direct_chat(app):
    """An ASGI app in front of `app` that hands POST /v1/chat/completions straight to its handler.

    Starlette's middleware stack and router took a third of the event loop's time per request
    at concurrency 4 (profiled); the route does its own authentication, limits and errors, so
    it needs none of them. Every other path, and the lifespan, goes through `app`.
    """
    from starlette.requests import Request

    server = app.state.server

    async def asgi(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            try:
                response = await server.chat(Request(scope, receive, send))
            except Exception as exc:  # what the app's exception handler answers
                response = _unexpected(server, scope["path"], exc)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return asgi


def _serve_socket(sock, student_dir, serve: ServeConfig, kwargs: dict) -> None:
    """One worker: its own app (models, batcher, log writer) on the shared listening socket."""
    import sys

    import uvicorn

    # The batcher thread needs the GIL for a moment before and after each forward; at the default
    # 5 ms switch interval it waited up to that long whenever the event loop was busy parsing.
    sys.setswitchinterval(0.0005)
    app = create_app(student_dir, serve, **kwargs)
    # No proxy-header rewriting: the server reads no client address, and that middleware ran on every request.
    config = uvicorn.Config(direct_chat(app), log_level="info", access_log=False, limit_concurrency=512,
                            timeout_keep_alive=5, proxy_headers=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


def serve_forever(student_dir: str | Path, serve: ServeConfig, *, insecure_no_auth: bool = False,
                  **kwargs: Any) -> None:
    """Run the student server in the foreground (the `distill serve` command).

    Closed by default: without `api_key` in kwargs or in the environment variable
    `serve.api_key_env` it refuses to start (ConfigError), unless `insecure_no_auth`, which is
    refused with a non-loopback `serve.host`. With `serve.workers` > 1, forked worker processes
    share one listening socket (the kernel spreads connections over them); each loads its own
    models, so each has its own GIL.
    """
    import multiprocessing
    import signal
    import socket

    from distill.models.causal import is_causal_lm_dir

    # "" is create_app's word for "no authentication", which only insecure_no_auth can ask for here.
    kwargs["api_key"] = kwargs.get("api_key") or server_key(serve.api_key_env, insecure_no_auth, serve.host,
                                                            "distill serve") or ""
    if is_causal_lm_dir(student_dir):  # a generative student has its own server: distill/serve/generative.py
        from distill.serve.generative import serve_generative

        return serve_generative(student_dir, serve, run=kwargs.get("champion_run"), api_key=kwargs["api_key"],
                                challenger_dir=kwargs.get("challenger_dir"), challenger_run=kwargs.get("challenger_run"),
                                teacher=kwargs.get("teacher"))
    check_safetensors_only(student_dir)  # a bad directory fails here, before any worker starts
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every response (headers, then body) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in serve.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((serve.host, serve.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    if serve.workers == 1:
        _serve_socket(sock, student_dir, serve, kwargs)
        return
    # fork, not spawn: the workers inherit the bound socket; no model is loaded before the fork.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_serve_socket, args=(sock, student_dir, serve, kwargs), name=f"distill-serve-{i}")
             for i in range(serve.workers)]
    for p in procs:
        p.start()

    def stop(*_):
        for p in procs:
            if p.is_alive():
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.join()
