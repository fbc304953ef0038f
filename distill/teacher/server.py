"""`distill teacher serve`: an OpenAI-compatible server over a local teacher model.

Three kinds of model directory are served, detected from the directory:

- an embedding-classifier teacher (`teacher.json` kind "embedding-classifier",
  `distill.models.encoders.EmbeddingClassifier`): the demo teacher;
- any Hugging Face sequence-classification directory (e.g. a distill student);
- any Hugging Face causal LM: real generation through its chat template.

A classifier answers a chat completion with the label of the LAST user message
as content; with logprobs, `content[0]` holds the label and `top_logprobs` the
top-k labels, each label one "token" (see distill/teacher/soft_labels.py). Classifiers
are deterministic: the answer is always the argmax, whatever the temperature.
Concurrent classifier requests are batched dynamically into one forward pass.

The OpenAI Batch API (`/v1/files`, `/v1/batches`) is served too, from
distill/teacher/server_batches.py, so batch clients are tested over real HTTP.

Closed by default (distill/teacher/server_guard.py): the command requires a key,
every route but /health checks it, bodies are bounded (`max_request_bytes`,
`max_upload_bytes` for uploads, which stream to disk), files expire after
`file_ttl_s`, and a temporary files directory is removed when the server stops.
"""

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.chat import ApiError, token_logprob
from distill.config import ConfigError
from distill.models.classifier import ClassifierStudent
from distill.models.encoders import EmbeddingClassifier
from distill.teacher.json_answers import json_answer
from distill.teacher.server_batches import DAY_S, BatchStore, add_batch_routes
from distill.teacher.server_guard import Guard, server_key

logger = logging.getLogger("distill.teacher")

# A collected batch is encoded in length-sorted chunks of this size: one padded tensor for 64 texts
# of mixed lengths wastes most of its FLOPs on padding (MiniLM on CPU: 148 texts/s in chunks of 8,
# 70 texts/s as one batch of 64, 70 texts/s one at a time).
ENCODE_CHUNK = 8
CHARS_PER_TOKEN = 128  # more characters than any one token of a classifier's tokenizer covers


# ----------------------------------------------------------------------------- request schema

class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    # Unknown OpenAI parameters (user, response_format, ...) are accepted and ignored, like vLLM does.
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=100)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


def _check_unicode(body: Any) -> None:
    """A lone surrogate ("\\ud800") parses as JSON but is no text: no model, reply or log can take it."""
    stack = [body]  # iterative: the body may be nested as deep as the JSON parser allows
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"the request holds invalid Unicode (a lone surrogate at character {e.start} "
                               "of a string)", code="invalid_value") from None


def validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    return ApiError(422, f"{where}: {first['msg']}", code="invalid_value", param=where)


# ----------------------------------------------------------------------------- models

def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class ClassifierTeacher:
    """Label log-probabilities for a batch of texts, from either classifier kind."""

    def __init__(self, path: Path):
        if (path / "teacher.json").exists():

            try:
                clf = EmbeddingClassifier.load(path)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.kind, self.labels = "embedding-classifier", clf.labels
            # EmbeddingClassifier.logits, with the chunk size that avoids padding waste.
            self._logits = lambda texts: clf.encoder.encode(texts, batch_size=ENCODE_CHUNK) @ clf.weight.T + clf.bias
            self._tokenizer, self._max_length = clf.encoder.tokenizer, clf.encoder.max_length
        else:

            student = ClassifierStudent(path)
            self.kind, self.labels = "sequence-classifier", student.labels
            self._logits = lambda texts: student.logits(texts, batch_size=ENCODE_CHUNK) / student.temperature
            self._tokenizer, self._max_length = student.tokenizer, student.max_length

    def classify(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """(label log-probabilities, prompt tokens read) per text."""
        # Only the first max_length tokens are read, but a tokenizer splits the whole string first:
        # a 1 MB text took 1.5 s per pass and held up every request queued behind it. A WordPiece
        # token covers at most 100 characters (longer words become one [UNK]), so past the cut only
        # a text that is mostly whitespace could still have had tokens the model would have read.
        texts = [t[: self._max_length * CHARS_PER_TOKEN] for t in texts]
        logprobs = _log_softmax(np.asarray(self._logits(texts), dtype=np.float64))
        lengths = [min(len(ids), self._max_length) for ids in self._tokenizer(texts)["input_ids"]]
        return list(zip(logprobs, lengths))


class CausalTeacher:
    """Chat generation with per-token logprobs from a local causal LM."""

    kind = "causal-lm"

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)

    def prompt(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A base model without a template: a plain transcript it can continue.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def generate(self, messages: list[dict[str, str]], *, n: int, temperature: float, top_p: float,
                 max_tokens: int, seed: int | None, top_logprobs: int | None, stop: list[str]) -> dict:
        """Sample `n` completions; returns {"prompt_tokens", "choices": [{"text", "finish_reason",
        "tokens": [(token_id, logprob, [(alt_id, alt_logprob), ...]), ...], "completion_tokens"}]}."""
        import torch

        enc = self.tokenizer(self.prompt(messages), return_tensors="pt", add_special_tokens=False)
        prompt_len = enc["input_ids"].shape[1]
        if seed is not None:
            torch.manual_seed(seed)  # model calls run on one worker thread, so the global RNG is ours
        sample = temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, return_dict_in_generate=True, output_logits=True,
                                      pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None)
        if sample:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
        else:
            kwargs.update(do_sample=False)  # greedy is deterministic: one run serves all n choices
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        seqs = out.sequences[:, prompt_len:]
        # Raw logits (before temperature / top-p), as vLLM reports by default: the model's own distribution.
        logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        k = min(top_logprobs or 0, logp.shape[-1])
        choices = []
        for i in range(seqs.shape[0]):
            tokens, finish = [], "length"
            for t, tid in enumerate(seqs[i].tolist()):
                if tid in self.eos_ids:
                    finish = "stop"
                    break
                alts = []
                if k:
                    vals, ids = torch.topk(logp[i, t], k)
                    alts = list(zip(ids.tolist(), vals.tolist()))
                tokens.append((tid, float(logp[i, t, tid]), alts))
            eos = finish == "stop"
            text = self.tokenizer.decode([tok[0] for tok in tokens], skip_special_tokens=True)
            if stop:
                generated = len(tokens)
                tokens, text, finish = self._cut_at_stop(tokens, text, finish, stop)
                eos = eos and len(tokens) == generated  # cut before the EOS: what follows is not billed
            # The EOS token is generated (and billed) but, as with OpenAI, never part of content or logprobs.
            choices.append({"text": text, "finish_reason": finish, "tokens": tokens,
                            "completion_tokens": len(tokens) + eos})
        while len(choices) < n:
            choices.append(dict(choices[0]))
        return {"prompt_tokens": prompt_len, "choices": choices}

    def _cut_at_stop(self, tokens: list, text: str, finish: str, stop: list[str]) -> tuple[list, str, str]:
        hits = [text.find(s) for s in stop if s and s in text]
        if not hits:
            return tokens, text, finish
        cut = min(hits)
        for j in range(1, len(tokens) + 1):  # the first token whose text reaches the stop string
            if len(self.tokenizer.decode([t[0] for t in tokens[:j]], skip_special_tokens=True)) > cut:
                return tokens[:j], text[:cut], "stop"
        return tokens, text[:cut], "stop"

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def load_teacher(model_path: str | Path) -> ClassifierTeacher | CausalTeacher:
    """Load a teacher directory, detecting its kind (see module doc). Raises ConfigError when it is none."""
    path = Path(model_path)
    if not path.is_dir():
        raise ConfigError(f"{path}: teacher model directory not found")
    if (path / "teacher.json").exists():
        return ClassifierTeacher(path)
    config = path / "config.json"
    if not config.exists():
        raise ConfigError(f"{path}: not a model directory (no teacher.json or config.json)")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config}:{e.lineno}: invalid JSON ({e.msg})") from None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return ClassifierTeacher(path)
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        return CausalTeacher(path)
    raise ConfigError(f"{config}: architectures {architectures} is neither a sequence classifier nor a causal LM")


# ----------------------------------------------------------------------------- dynamic batching

class MicroBatcher:
    """Collects concurrent requests for up to `wait_s` (or `max_batch` items) and runs one call for all.

    `fn(items) -> results` runs on `executor` so the event loop keeps answering
    while the model works; requests arriving meanwhile form the next batch.
    """

    def __init__(self, fn, executor, max_batch: int = 64, wait_s: float = 0.002):
        self.fn, self.executor, self.max_batch, self.wait_s = fn, executor, max_batch, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # skip requests whose client left
            if not live:
                continue
            self.batches += 1
            self.items += len(live)
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in live])
            except Exception as e:  # one bad batch fails its requests, never the server
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)


class ServerState:
    """What the routes share: the model, its worker thread and the dynamic batcher."""

    def __init__(self, teacher: ClassifierTeacher | CausalTeacher, model_name: str, threads: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        self.teacher, self.model_name = teacher, model_name
        default = torch.get_num_threads()
        # All cores but one by default: torch's thread team stalls whenever the event loop (or an
        # in-process client) takes one of its cores; on 2 busy cores that was 4x slower than 1 thread.
        self.threads = threads or max(default - 1, 1)
        # One worker: torch parallelises inside each call, and one caller keeps the RNG seedable.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-model",
                                           initializer=torch.set_num_threads, initargs=(self.threads,))
        self.executor.submit(torch.get_num_threads).result()
        # set_num_threads also changes the default for threads started later; the worker keeps its
        # own setting, everything else in the process gets the old default back.
        torch.set_num_threads(default)
        self.batcher: MicroBatcher | None = None
        self.json_field: str | None = None


# ----------------------------------------------------------------------------- chat completions

def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(400, f"content part type {part.get('type')!r} is not supported (text only)",
                           param="messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _check(state: ServerState, req: ChatRequest) -> None:
    if req.model != state.model_name:
        raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{state.model_name}`.",
                       code="model_not_found", param="model")
    if req.stream:
        raise ApiError(400, "stream=true is not supported by this server", code="unsupported_value", param="stream")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs=true", code="invalid_value", param="top_logprobs")


async def chat_completion(state: ServerState, req: ChatRequest) -> dict:
    """The OpenAI chat.completion body for one request (raises ApiError on bad requests)."""
    _check(state, req)
    teacher = state.teacher
    if isinstance(teacher, ClassifierTeacher):
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "a classifier teacher needs at least one user message", param="messages")
        logprobs, prompt_tokens = await state.batcher.submit(_text_of(users[-1].content))
        order = np.argsort(-logprobs, kind="stable")
        label = teacher.labels[order[0]]
        lp = None
        if req.logprobs:
            k = min(req.top_logprobs or 0, len(teacher.labels))
            tops = [token_logprob(teacher.labels[j], logprobs[j]) for j in order[:k]]
            lp = {"content": [{**token_logprob(label, logprobs[order[0]]), "top_logprobs": tops}], "refusal": None}
        content, completion_tokens = label, req.n
        if state.json_field:  # a generative student's teacher: see distill/teacher/json_answers.py
            content, lp = json_answer(state.json_field, teacher.labels, logprobs, req.logprobs, req.top_logprobs or 0)
            completion_tokens = 3 * req.n
        choices = [{"index": i, "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": lp, "finish_reason": "stop"} for i in range(req.n)]
    else:
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        result = await asyncio.get_running_loop().run_in_executor(
            state.executor, lambda: teacher.generate(
                messages, n=req.n, temperature=temperature, top_p=req.top_p or 1.0,
                max_tokens=req.max_completion_tokens or req.max_tokens or 256, seed=req.seed,
                top_logprobs=req.top_logprobs if req.logprobs else 0, stop=stop))
        prompt_tokens = result["prompt_tokens"]
        choices = []
        for i, c in enumerate(result["choices"]):
            lp = None
            if req.logprobs:
                lp = {"content": [{**token_logprob(teacher.token_text(tid), tlp),
                                   "top_logprobs": [token_logprob(teacher.token_text(a), alp) for a, alp in alts]}
                                  for tid, tlp, alts in c["tokens"]], "refusal": None}
            choices.append({"index": i, "message": {"role": "assistant", "content": c["text"], "refusal": None},
                            "logprobs": lp, "finish_reason": c["finish_reason"]})
        completion_tokens = sum(c["completion_tokens"] for c in result["choices"])
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": state.model_name, "choices": choices, "system_fingerprint": None,
            "usage": {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
                      "total_tokens": int(prompt_tokens + completion_tokens)}}


async def answer(state: ServerState, body: Any) -> tuple[int, dict]:
    """(status code, body) for one raw chat request: the HTTP route and the batch runner share this."""
    try:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        _check_unicode(body)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        return 200, await chat_completion(state, req)
    except ApiError as e:
        return e.status, e.body()
    except Exception as e:  # a model failure answers 500 instead of dropping the connection
        return 500, ApiError(500, f"{type(e).__name__}: {e}", type="server_error").body()


# ----------------------------------------------------------------------------- the app

MAX_REQUEST_BYTES = 1024 * 1024  # a chat body; a long causal-LM prompt fits many times over
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # a batch input file (OpenAI allows 200 MB: split larger batches)


def _lifespan(state: ServerState, store: BatchStore, max_batch: int, batch_wait_ms: float):
    """Start the batcher and the file sweep; at shutdown stop them, the batches and the model thread,
    and remove the files directory if the server made it."""
    from contextlib import asynccontextmanager

    async def sweep_files() -> None:
        while True:
            await asyncio.sleep(min(max(store.file_ttl_s / 4, 1.0), 300.0))
            store.sweep()

    @asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(sweep_files())]
        if isinstance(state.teacher, ClassifierTeacher):
            state.batcher = MicroBatcher(state.teacher.classify, state.executor, max_batch, batch_wait_ms / 1000)
            tasks.append(asyncio.create_task(state.batcher.run()))
        try:
            yield
        finally:
            for task in [*tasks, *store.tasks.values()]:
                task.cancel()
            state.executor.shutdown(wait=False, cancel_futures=True)
            store.close()

    return lifespan


def _add_error_handlers(app) -> None:
    """Every error as OpenAI's JSON; a client that leaves mid-body is no error of the server's."""
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return error(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, e: ClientDisconnect):
        logger.debug("client disconnected before its request body was read (%s)", request.url.path)
        return Response(status_code=499)


def _add_model_routes(app, state: ServerState) -> None:
    """/health (no key: for probes), /v1/models and /v1/chat/completions."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    name, teacher = state.model_name, state.teacher

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "kind": teacher.kind, "labels": getattr(teacher, "labels", None),
                "threads": state.threads, "batches": state.batcher.batches if state.batcher else 0,
                "batched_requests": state.batcher.items if state.batcher else 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "distill"}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(404, f"The model `{model_id}` does not exist", code="model_not_found", param="model")
        return {"id": name, "object": "model", "created": 0, "owned_by": "distill"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        # The Guard has already bounded the body's size; what reaches here is parsed in one go.
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise ApiError(400, "the request body is not valid JSON") from None
        status, out = await answer(state, body)
        return JSONResponse(out, status_code=status)


def create_app(model_path: str | Path, model_name: str | None = None, *, max_batch: int = 64,
               batch_wait_ms: float = 2.0, files_dir: str | Path | None = None, threads: int | None = None,
               api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, file_ttl_s: float = DAY_S,
               json_field: str | None = None) -> "FastAPI":  # noqa: F821
    """The FastAPI app serving `model_path` (loaded now, so a bad directory fails here).

    Args:
        model_path: teacher directory (embedding classifier, HF sequence classifier or HF causal LM).
        model_name: the `model` clients must send; defaults to the directory name.
        max_batch: most classifier requests answered by one forward pass.
        batch_wait_ms: how long the first request of a batch waits for company.
        files_dir: where /v1/files and batch results are kept; a fresh temporary directory when None,
            removed when the server stops.
        threads: torch threads for model calls (only the model's worker thread is changed);
            None: all cores but one, which stays free for the event loop and HTTP clients.
        api_key: the Bearer token every route but /health requires; None: no authentication (the
            `distill teacher serve` command allows that only on loopback, when asked to).
        max_request_bytes: the most a request body may hold (413 past it).
        max_upload_bytes: the most a /v1/files upload may hold (413 past it).
        file_ttl_s: seconds an uploaded or result file is kept.
        json_field: a classifier answers {json_field: label} instead of the bare label.
    """
    from fastapi import FastAPI

    if max_batch < 1 or batch_wait_ms < 0 or (threads is not None and threads < 1):
        raise ConfigError("max_batch and threads must be >= 1, batch_wait_ms >= 0")
    if min(max_request_bytes, max_upload_bytes) < 1 or file_ttl_s <= 0:
        raise ConfigError("max_request_bytes, max_upload_bytes and file_ttl_s must be > 0")
    teacher = load_teacher(model_path)
    state = ServerState(teacher, model_name or Path(model_path).resolve().name, threads)
    state.json_field = json_field
    store = BatchStore(Path(files_dir) if files_dir else None, file_ttl_s)
    app = FastAPI(title="distill teacher", lifespan=_lifespan(state, store, max_batch, batch_wait_ms))
    app.state.teacher = state
    app.state.batch_store = store
    _add_error_handlers(app)
    _add_model_routes(app, state)
    add_batch_routes(app, store, lambda body: answer(state, body), concurrency=2 * max_batch)
    app.add_middleware(Guard, api_key=api_key, max_request_bytes=max_request_bytes,
                       max_upload_bytes=max_upload_bytes)
    return app


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8765, model_name: str | None = None,
          max_batch: int = 64, batch_wait_ms: float = 2.0, files_dir: str | Path | None = None,
          threads: int | None = None, api_key_env: str = "DISTILL_TEACHER_API_KEY", insecure_no_auth: bool = False,
          max_request_bytes: int = MAX_REQUEST_BYTES, max_upload_bytes: int = MAX_UPLOAD_BYTES,
          file_ttl_s: float = DAY_S, json_field: str | None = None) -> None:
    """Run the server in the foreground until interrupted (what `distill teacher serve` does).

    The key comes from the environment variable `api_key_env`; without one the server refuses to
    start unless `insecure_no_auth`, which is refused with a non-loopback `host` (see server_guard).
    """
    import uvicorn

    key = server_key(api_key_env, insecure_no_auth, host, "distill teacher serve")
    app = create_app(model_path, model_name, max_batch=max_batch, batch_wait_ms=batch_wait_ms, files_dir=files_dir,
                     threads=threads, api_key=key, max_request_bytes=max_request_bytes,
                     max_upload_bytes=max_upload_bytes, file_ttl_s=file_ttl_s, json_field=json_field)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
