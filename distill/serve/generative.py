"""`distill serve` for a causal-LM student: OpenAI chat completions, streamed or whole.

Served: `/v1/chat/completions` with `stream` (server-sent events, one chunk per
decoded token), `max_tokens` / `max_completion_tokens`, `stop`, `temperature`,
`seed`, `logprobs`; `/v1/models`, `/health`. The student is a full or merged
model, or a LoRA adapter loaded on its base (distill.models.causal). One model
call runs at a time (a lock): torch parallelises inside the call, and a second
caller would only slow the first.

Production modes, as in the classifier server (distill/serve/app.py), from `ServeConfig`:

- canary: `canary_fraction` of requests is answered by the challenger (sticky per
  `user`, random otherwise);
- teacher fallback: when the mean token logprob of the student's answer is below
  `fallback_mean_logprob`, the teacher is asked the same chat (length cap,
  temperature, stop strings) within what is left of `timeout_s`; when it fails the
  student's answer stands. A streamed request is then answered once the student's
  answer is complete, since a token already sent cannot be taken back;
- shadow: the models that did not serve (the other student, the teacher when
  `shadow_teacher`) answer in background threads, dropped beyond `max_pending`.

Which model answered is in the `x-distill-model` header and the `distill` field of
the body (for a stream, of its last chunk), with the confidence. Every request is
logged like the classifier path's (distill/serve/shadow.py, the `requests` table):
the user text, each model's answer as its `*_label` and its mean token probability
as its `*_confidence` (what drift's input test and entropy sensors read); a paid
teacher answer is written before it is returned.
"""

# No `from __future__ import annotations`: FastAPI must see the real Request class of the routes.
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from distill.chat import ApiError, token_logprob
from distill.config import ConfigError, ServeConfig, TeacherConfig
from distill.models.causal import GenerativeStudent
from distill.serve.batcher import PendingWork
from distill.serve.canary import route_to_challenger
from distill.serve.shadow import ShadowLog
from distill.teacher.server_guard import UNAUTHORIZED, bearer_ok

logger = logging.getLogger("distill.serve")


def _stop_cut(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


class _Model:
    """One student behind its lock, answering a parsed request as a stream of text pieces or whole."""

    def __init__(self, student: GenerativeStudent, run: str | None):
        self.student = student
        self.run = run or str(student.path)
        self.lock = threading.Lock()

    def pieces(self, req: dict) -> Iterator[dict]:
        """{"text", "logprob"} per token until EOS, max_tokens or a stop string; then {"finish_reason"}."""
        stop = [req["stop"]] if isinstance(req.get("stop"), str) else list(req.get("stop") or [])
        cap = req.get("max_completion_tokens") or req.get("max_tokens") or self.student.max_new_tokens
        temperature = float(req.get("temperature") or 0.0)
        text, finish, n = "", "stop", 0
        with self.lock:
            for _, piece, logprob in self.student.stream(req["messages"], cap, temperature, req.get("seed")):
                n += 1
                cut = _stop_cut(text + piece, stop)
                if cut is not None:
                    if cut > len(text):
                        yield {"text": (text + piece)[len(text):cut], "logprob": logprob}
                    break
                text += piece
                yield {"text": piece, "logprob": logprob}
            else:
                finish = "length" if n >= cap else "stop"
        yield {"finish_reason": finish, "completion_tokens": n}

    def answer(self, req: dict) -> dict:
        """The whole answer: {"text", "tokens" [{text, logprob}], "finish_reason", "completion_tokens",
        "confidence" (exp of the mean token logprob), "mean_logprob", "latency_ms"}."""
        started = time.perf_counter()
        parts = list(self.pieces(req))
        end, tokens = parts[-1], parts[:-1]
        return {"text": "".join(p["text"] for p in tokens), "tokens": tokens, **_mean([p["logprob"] for p in tokens]),
                "finish_reason": end["finish_reason"], "completion_tokens": end["completion_tokens"],
                "latency_ms": 1000 * (time.perf_counter() - started)}


def _mean(logprobs: list[float]) -> dict:
    """{"mean_logprob", "confidence"} of an answer; an empty answer has neither."""
    if not logprobs:
        return {"mean_logprob": None, "confidence": None}
    mean = sum(logprobs) / len(logprobs)
    return {"mean_logprob": mean, "confidence": math.exp(mean)}


def _teacher_answer(resp: Any, latency_ms: float) -> dict:
    """A teacher chat completion in the shape of _Model.answer()."""
    choice = resp.choices[0]
    content = choice.message.content or ""
    lp = choice.logprobs.model_dump()["content"] if choice.logprobs and choice.logprobs.content else None
    tokens = [{"text": t["token"], "logprob": t["logprob"]} for t in lp] if lp else [{"text": content, "logprob": None}]
    usage = resp.usage.completion_tokens if resp.usage else len(tokens)
    return {"text": content, "tokens": tokens, **_mean([t["logprob"] for t in lp] if lp else []),
            "finish_reason": choice.finish_reason or "stop", "completion_tokens": usage, "latency_ms": latency_ms}


def _parse(body: bytes, model_name: str) -> dict:
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON (UTF-8)") from None
    if not isinstance(req, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if req.get("model") not in (None, model_name):
        raise ApiError(404, f"The model `{req.get('model')}` does not exist; this server serves `{model_name}`.",
                       code="model_not_found", param="model")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        raise ApiError(400, "messages: a non-empty list of {role, content} with text content", param="messages")
    for key in ("max_tokens", "max_completion_tokens"):
        if req.get(key) is not None and (not isinstance(req[key], int) or req[key] < 1):
            raise ApiError(400, f"{key}: must be a positive integer", param=key)
    t = req.get("temperature")
    if t is not None and (not isinstance(t, (int, float)) or not 0 <= t <= 2):
        raise ApiError(400, "temperature: must be between 0 and 2", param="temperature")
    req["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    return req


def _user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


class _Server:
    """What the routes share: champion (and challenger) behind their locks, the key, the teacher, the log.

    Its methods are the steps of a request, in the classifier server's order (distill/serve/app.py):
    route (canary), answer, fall back to the teacher below `fallback_mean_logprob`, log, and queue
    the shadow answers of the models that did not serve.
    """

    def __init__(self, student: GenerativeStudent, serve: ServeConfig, name: str, key: str | None,
                 log_requests: bool, run: str | None, challenger: GenerativeStudent | None = None,
                 challenger_run: str | None = None, teacher: TeacherConfig | None = None,
                 teacher_api_key: str | None = None, rng: random.Random | None = None):
        self.serve, self.name, self.key, self.teacher = serve, name, key, teacher
        self.student = student
        self.champion = _Model(student, run)
        self.challenger = _Model(challenger, challenger_run) if challenger is not None else None
        self._check_modes()
        self.rng = rng or random.Random()
        self.log_all = log_requests or serve.shadow
        # With a teacher configured the log always exists: a paid answer is never dropped.
        self.log = ShadowLog(serve.log_url) if (self.log_all or teacher is not None) else None
        self.background = ThreadPoolExecutor(serve.background_workers, thread_name_prefix="distill-shadow")
        self.pending, self.dropped = PendingWork(serve.max_pending), 0
        self.fallback_client = self.shadow_client = None
        if teacher is not None:
            import openai

            teacher_key = teacher_api_key if teacher_api_key is not None else os.environ.get(teacher.api_key_env)
            # Fallback is on the request's clock: no retries, the time left is the timeout.
            self.fallback_client = openai.OpenAI(base_url=teacher.base_url, api_key=teacher_key or "unused",
                                                 max_retries=0)
            self.shadow_client = openai.OpenAI(base_url=teacher.base_url, api_key=teacher_key or "unused",
                                               timeout=teacher.timeout_s, max_retries=2)

    def _check_modes(self) -> None:
        serve = self.serve
        if serve.canary_fraction > 0 and self.challenger is None:
            raise ConfigError("serve.canary_fraction > 0 needs a challenger (--challenger or the registry challenger)")
        if serve.fallback_mean_logprob is not None and self.teacher is None:
            raise ConfigError("serve.fallback_mean_logprob is set but no teacher endpoint is configured")
        if serve.fallback_confidence is not None:
            raise ConfigError("serve.fallback_confidence applies to classifier students; a generative student "
                              "falls back on its answer's mean token logprob: set serve.fallback_mean_logprob")

    def authorized(self, request) -> bool:
        return not self.key or bearer_ok(request.headers.get("authorization"), self.key)

    # --- request steps -----------------------------------------------------------------------
    def route(self, req: dict) -> tuple[str, _Model]:
        canary = route_to_challenger(self.serve.canary_fraction, req.get("user"), self.rng)
        return ("challenger", self.challenger) if canary else ("champion", self.champion)

    def row(self, req: dict, request_id: str, name: str, model: _Model, ans: dict) -> dict:
        return {"request_id": request_id, "ts": time.time(), "text": _user_text(req["messages"]),
                "canary": int(name == "challenger"), "fallback": 0, **_columns(name, ans, model.run)}

    def needs_teacher(self, ans: dict) -> bool:
        floor = self.serve.fallback_mean_logprob
        return floor is not None and (ans["mean_logprob"] is None or ans["mean_logprob"] < floor)

    def ask_teacher(self, req: dict, row: dict, started: float) -> dict | None:
        """The teacher's answer within what is left of the request's time; None when it cannot answer in time."""
        row["fallback"] = 1
        remaining = self.serve.timeout_s - (time.perf_counter() - started) - 0.05
        t0 = time.perf_counter()
        try:
            if remaining <= 0:
                raise TimeoutError("no time left for the teacher")
            resp = self.fallback_client.chat.completions.create(
                **_teacher_params(self.teacher, req, self.student.max_new_tokens),
                timeout=min(remaining, self.teacher.timeout_s))
            ans = _teacher_answer(resp, 1000 * (time.perf_counter() - t0))
        except Exception as e:  # the student's answer stands when the teacher cannot help in time
            row["teacher_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            logger.warning("teacher fallback failed: %s", row["teacher_error"])
            return None
        row.update(_columns("teacher", ans, self.teacher.model))
        return ans

    def decide(self, req: dict, request_id: str) -> dict:
        """Route, answer, fall back when the answer is unsure, log: {"answer", "served_by", "canary", "fallback"}."""
        started = time.perf_counter()
        name, model = self.route(req)
        ans = model.answer(req)
        row = self.row(req, request_id, name, model, ans)
        served_by, served = name, ans
        if self.needs_teacher(ans):
            t_ans = self.ask_teacher(req, row, started)
            if t_ans is not None:
                served_by, served = "teacher", t_ans
        self.finish(req, row, served_by, served)
        return {"answer": served, "served_by": served_by, "canary": name == "challenger",
                "fallback": bool(row["fallback"])}

    def finish(self, req: dict, row: dict, served_by: str, served: dict) -> None:
        """Log the request (a paid teacher answer at once, in this thread) and queue its shadow answers."""
        row.update({"served_by": served_by, "served_label": served["text"], "served_confidence": served["confidence"]})
        asked = {m for m in ("champion", "challenger", "teacher") if f"{m}_label" in row}
        need = []
        if self.serve.shadow:
            need = [m for m in ("champion", "challenger") if m not in asked and (m == "champion" or self.challenger)]
            if self.teacher is not None and self.serve.shadow_teacher and "teacher" not in asked:
                need.append("teacher")
        if "teacher_label" in row:
            self.log.append(dict(row))  # bought: persisted before it is returned
            if need:
                self.enqueue(row, req, need, update=True)
        elif need or self.log_all:
            self.enqueue(row, req, need)

    # --- background work: shadow answers and log rows ----------------------------------------
    def enqueue(self, row: dict, req: dict, need: list[str], update: bool = False) -> None:
        if not self.pending.reserve():
            self.dropped += 1  # shadow work never slows or fails the served answer
            return
        self.background.submit(self.shadow_job, row, req, need, update)

    def shadow_job(self, row: dict, req: dict, need: list[str], update: bool) -> None:
        """Runs in a background thread: ask the models that did not serve, then log the row."""
        before = set(row)
        try:
            for name in need:
                if name == "teacher":
                    self._shadow_teacher(row, req)
                else:
                    model = self.champion if name == "champion" else self.challenger
                    row.update(_columns(name, model.answer(req), model.run))
            if update:
                self.log.update(row["request_id"], {k: v for k, v in row.items() if k not in before})
            else:
                self.log.append(row)
        except Exception:
            logger.exception("shadow/log job failed for request %s", row.get("request_id"))
        finally:
            self.pending.done()

    def _shadow_teacher(self, row: dict, req: dict) -> None:
        t0 = time.perf_counter()
        try:
            resp = self.shadow_client.chat.completions.create(
                **_teacher_params(self.teacher, req, self.student.max_new_tokens))
            row.update(_columns("teacher", _teacher_answer(resp, 1000 * (time.perf_counter() - t0)),
                                self.teacher.model))
        except Exception as e:  # the shadow path records failures, it never raises them
            row["teacher_error"] = f"{type(e).__name__}: {str(e)[:200]}"

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until queued shadow/log work is done (tests, shutdown)."""
        return self.pending.drain(timeout)

    def close(self) -> None:
        self.drain(timeout=self.serve.timeout_s + (self.teacher.timeout_s if self.teacher else 0))
        self.background.shutdown(wait=False)

    # --- response bodies -----------------------------------------------------------------------
    def usage(self, req: dict, completion_tokens: int) -> dict:
        prompt = self.student.tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"]
        return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens}

    def whole(self, req: dict, request_id: str) -> tuple[dict, dict]:
        """The chat.completion body of a non-streamed request, and its x-distill headers."""
        got = self.decide(req, request_id)
        ans = got["answer"]
        lp = None
        if req.get("logprobs"):
            lp = {"content": [token_logprob(p["text"], p["logprob"]) for p in ans["tokens"]
                              if p["logprob"] is not None], "refusal": None}
        body = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ans["text"]}, "logprobs": lp,
                             "finish_reason": ans["finish_reason"]}],
                "usage": self.usage(req, ans["completion_tokens"]), "distill": _distill_field(got)}
        return body, _headers(request_id, got)

    def events(self, req: dict, request_id: str) -> Iterator[str]:
        """Server-sent chat.completion.chunk events, one per token, then [DONE].

        With a fallback floor the answer is decided first (a streamed token cannot be taken
        back), then sent piece by piece; otherwise each token is sent as it is decoded.
        """
        head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.name}
        yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
        if self.serve.fallback_mean_logprob is not None:
            got = self.decide(req, request_id)
            pieces = [*got["answer"]["tokens"], {"finish_reason": got["answer"]["finish_reason"]}]
        else:
            got, pieces = None, None
        name, model = ("", None) if got else self.route(req)
        started, tokens = time.perf_counter(), []
        for p in pieces if got else model.pieces(req):
            if "finish_reason" in p:
                chunk = {"index": 0, "delta": {}, "finish_reason": p["finish_reason"]}
                if got:
                    chunk["distill"] = _distill_field(got)
            else:
                tokens.append(p)
                chunk = {"index": 0, "delta": {"content": p["text"]}, "finish_reason": None}
                if req.get("logprobs") and p["logprob"] is not None:
                    chunk["logprobs"] = {"content": [token_logprob(p["text"], p["logprob"])]}
            yield f"data: {json.dumps({**head, 'choices': [chunk]})}\n\n"
        if not got:
            ans = {"text": "".join(p["text"] for p in tokens), **_mean([p["logprob"] for p in tokens]),
                   "latency_ms": 1000 * (time.perf_counter() - started)}
            self.finish(req, self.row(req, request_id, name, model, ans), name, ans)
        yield "data: [DONE]\n\n"


def _columns(name: str, ans: dict, run: str) -> dict:
    """One model's answer as its shadow-log columns (the answer text is the `label` of a generative row)."""
    return {f"{name}_label": ans["text"], f"{name}_confidence": ans["confidence"],
            f"{name}_latency_ms": ans["latency_ms"], f"{name}_run": run}


def _teacher_params(teacher: TeacherConfig, req: dict, default_tokens: int) -> dict:
    """The client's request as the teacher is asked it: same chat, length cap, sampling and stop strings."""
    params = {"model": teacher.model, "messages": req["messages"], "logprobs": True,
              "max_tokens": req.get("max_completion_tokens") or req.get("max_tokens") or default_tokens,
              "temperature": float(req.get("temperature") or 0.0)}
    if req.get("stop"):
        params["stop"] = req["stop"]
    return params


def _distill_field(got: dict) -> dict:
    return {"served_by": got["served_by"], "confidence": got["answer"]["confidence"], "canary": got["canary"],
            "fallback": got["fallback"]}


def _headers(request_id: str, got: dict) -> dict:
    headers = {"x-request-id": request_id, "x-distill-model": got["served_by"]}
    if got["answer"]["confidence"] is not None:
        headers["x-distill-confidence"] = f"{got['answer']['confidence']:.6f}"
    return headers


def _add_routes(app, server: _Server) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.name, "kind": "generative", "device": server.student.device,
                "challenger": server.challenger is not None, "teacher": server.teacher is not None}

    @app.get("/v1/models")
    def models(request: Request):
        if not server.authorized(request):
            return error(UNAUTHORIZED)
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                            "owned_by": "distill"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if not server.authorized(request):
            return error(UNAUTHORIZED)
        body = await request.body()
        limit = server.serve.max_request_bytes
        if len(body) > limit:
            return error(ApiError(413, f"request body exceeds the {limit}-byte limit", code="request_too_large"))
        try:
            req = _parse(body, server.name)
        except ApiError as e:
            return error(e)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.get("stream"):
            return StreamingResponse(server.events(req, request_id), media_type="text/event-stream",
                                     headers={"x-request-id": request_id})
        answer, headers = await run_in_threadpool(server.whole, req, request_id)
        return JSONResponse(answer, headers=headers)

    del health, models, chat  # registered on the app


def _loaded(student: GenerativeStudent | str | Path | None) -> GenerativeStudent | None:
    if student is None or isinstance(student, GenerativeStudent):
        return student
    return GenerativeStudent(student)


def create_generative_app(student: GenerativeStudent | str | Path, serve: ServeConfig | None = None, *,
                          model_name: str | None = None, api_key: str | None = None, run: str | None = None,
                          challenger: GenerativeStudent | str | Path | None = None,
                          challenger_run: str | None = None, teacher: TeacherConfig | None = None,
                          teacher_api_key: str | None = None,
                          rng: random.Random | None = None) -> "FastAPI":  # noqa: F821
    """The generative student server as a FastAPI app.

    Args:
        student: a loaded GenerativeStudent, or its directory (full, merged, or a LoRA adapter).
        serve: the serve section (limits, canary, fallback, shadow, log); defaults when None (and then no log).
        model_name: the model clients send; serve.model_name when None.
        api_key: Bearer key clients must send; os.environ[serve.api_key_env] when None; off when neither.
        run: the champion's run id written to the log (its directory when None).
        challenger: the challenger for canary and shadow, loaded or its directory.
        challenger_run: the challenger's run id written to the log.
        teacher: the teacher endpoint for fallback and shadow; None disables both uses.
        teacher_api_key: key for the teacher; os.environ[teacher.api_key_env] when None.
        rng: the canary draw for requests without a `user`; a fresh `random.Random()` when None.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    log_requests = serve is not None and serve.log_requests
    serve = serve or ServeConfig()
    key = api_key if api_key is not None else os.environ.get(serve.api_key_env)
    server = _Server(_loaded(student), serve, model_name or serve.model_name, key, log_requests, run,
                     _loaded(challenger), challenger_run, teacher, teacher_api_key, rng)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="distill generative student", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.log = server.log
    app.state.drain = server.drain
    _add_routes(app, server)
    return app


def serve_generative(student_dir: str | Path, serve: ServeConfig, run: str | None = None,
                     api_key: str | None = None, challenger_dir: str | Path | None = None,
                     challenger_run: str | None = None, teacher: TeacherConfig | None = None) -> None:
    """Run the generative student server in the foreground (what `distill serve` does for a causal LM).

    api_key: as resolved by `serve_forever` ("" only when the command was told --insecure-no-auth).
    """
    import uvicorn

    for d in (student_dir, challenger_dir):
        if d is not None and not any(Path(d).glob("*.safetensors")):
            raise ConfigError(f"{d}: no .safetensors weights (pickled weights are never loaded)")
    app = create_generative_app(student_dir, serve, run=run, api_key=api_key, challenger=challenger_dir,
                                challenger_run=challenger_run, teacher=teacher)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info", access_log=False)
