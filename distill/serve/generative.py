"""`distill serve` for a causal-LM student: OpenAI chat completions, streamed or whole.

Served: `/v1/chat/completions` with `stream` (server-sent events, one chunk per
decoded token), `max_tokens` / `max_completion_tokens`, `stop`, `temperature`,
`seed`, `logprobs`; `/v1/models`, `/health`. The student is a full or merged
model, or a LoRA adapter loaded on its base (distill.models.causal). One model
call runs at a time (a lock): torch parallelises inside the call, and a second
caller would only slow the first.

Every request is logged like the classifier path's (distill/serve/shadow.py, the
`requests` table): the user text, the answer as `served_label`, and the answer's
mean token probability as `served_confidence`, which is what drift's input test
and entropy sensors read.
"""

# No `from __future__ import annotations`: FastAPI must see the real Request class of the routes.
import json
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from distill.chat import ApiError, token_logprob
from distill.config import ServeConfig
from distill.models.causal import GenerativeStudent
from distill.teacher.server_guard import UNAUTHORIZED, bearer_ok


def _stop_cut(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


class _Generator:
    """The student behind a lock, answering one parsed request as a stream of text pieces."""

    def __init__(self, student: GenerativeStudent):
        self.student = student
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
    """What the routes share: the student behind its lock, the key, the request log."""

    def __init__(self, student: GenerativeStudent, serve: ServeConfig, name: str, key: str | None,
                 log_requests: bool, run: str | None):
        self.student, self.serve, self.name, self.key, self.run = student, serve, name, key, run
        self.gen = _Generator(student)
        self.log = None
        if log_requests:
            from distill.serve.shadow import ShadowLog

            self.log = ShadowLog(serve.log_url)

    def authorized(self, request) -> bool:
        return not self.key or bearer_ok(request.headers.get("authorization"), self.key)

    def record(self, req: dict, request_id: str, text: str, logprobs: list[float], ms: float) -> None:
        if self.log is None:
            return
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else None
        self.log.append({"request_id": request_id, "ts": time.time(), "text": _user_text(req["messages"]),
                         "served_by": "champion", "served_label": text, "served_confidence": confidence,
                         "fallback": 0, "canary": 0, "champion_label": text, "champion_confidence": confidence,
                         "champion_latency_ms": ms, "champion_run": self.run or str(self.student.path)})

    def whole(self, req: dict, request_id: str) -> dict:
        """The chat.completion body of a non-streamed request."""
        started = time.perf_counter()
        parts = list(self.gen.pieces(req))
        end, tokens = parts[-1], parts[:-1]
        text = "".join(p["text"] for p in tokens)
        lp = None
        if req.get("logprobs"):
            lp = {"content": [token_logprob(p["text"], p["logprob"]) for p in tokens], "refusal": None}
        self.record(req, request_id, text, [p["logprob"] for p in tokens], 1000 * (time.perf_counter() - started))
        prompt = self.student.tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"]
        used = {"prompt_tokens": len(prompt), "completion_tokens": end["completion_tokens"],
                "total_tokens": len(prompt) + end["completion_tokens"]}
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                             "finish_reason": end["finish_reason"]}], "usage": used}

    def events(self, req: dict, request_id: str) -> Iterator[str]:
        """Server-sent chat.completion.chunk events, one per token, then [DONE]."""
        started, text, logprobs = time.perf_counter(), "", []
        head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.name}
        yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
        for p in self.gen.pieces(req):
            if "finish_reason" in p:
                chunk = {"index": 0, "delta": {}, "finish_reason": p["finish_reason"]}
            else:
                text += p["text"]
                logprobs.append(p["logprob"])
                chunk = {"index": 0, "delta": {"content": p["text"]}, "finish_reason": None}
                if req.get("logprobs"):
                    chunk["logprobs"] = {"content": [token_logprob(p["text"], p["logprob"])]}
            yield f"data: {json.dumps({**head, 'choices': [chunk]})}\n\n"
        self.record(req, request_id, text, logprobs, 1000 * (time.perf_counter() - started))
        yield "data: [DONE]\n\n"


def _add_routes(app, server: _Server) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.name, "kind": "generative", "device": server.student.device}

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
        headers = {"x-request-id": request_id}
        if req.get("stream"):
            return StreamingResponse(server.events(req, request_id), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run_in_threadpool(server.whole, req, request_id), headers=headers)

    del health, models, chat  # registered on the app


def create_generative_app(student: GenerativeStudent | str | Path, serve: ServeConfig | None = None, *,
                          model_name: str | None = None, api_key: str | None = None,
                          run: str | None = None) -> "FastAPI":  # noqa: F821
    """The generative student server as a FastAPI app.

    Args:
        student: a loaded GenerativeStudent, or its directory.
        serve: the serve section (limits, log); defaults when None (and then no request log).
        model_name: the model clients send; serve.model_name when None.
        api_key: Bearer key clients must send; os.environ[serve.api_key_env] when None; off when neither.
        run: the run id written to the request log.
    """
    from fastapi import FastAPI

    log_requests = serve is not None and serve.log_requests
    serve = serve or ServeConfig()
    if not isinstance(student, GenerativeStudent):
        student = GenerativeStudent(student)
    key = api_key if api_key is not None else os.environ.get(serve.api_key_env)
    server = _Server(student, serve, model_name or serve.model_name, key, log_requests, run)
    app = FastAPI(title="distill generative student", docs_url=None, redoc_url=None)
    app.state.log = server.log
    _add_routes(app, server)
    return app


def serve_generative(student_dir: str | Path, serve: ServeConfig, run: str | None = None,
                     api_key: str | None = None) -> None:
    """Run the generative student server in the foreground (what `distill serve` does for a causal LM).

    api_key: as resolved by `serve_forever` ("" only when the command was told --insecure-no-auth).
    """
    import uvicorn

    from distill.config import ConfigError

    if not any(Path(student_dir).glob("*.safetensors")):
        raise ConfigError(f"{student_dir}: no .safetensors weights (pickled weights are never loaded)")

    app = create_generative_app(student_dir, serve, run=run, api_key=api_key)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info", access_log=False)
