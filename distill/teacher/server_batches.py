"""OpenAI's Batch API (`/v1/files`, `/v1/batches`) for `distill teacher serve`.

Lets batch clients be tested over real HTTP against the same model that answers
live requests. A batch goes validating -> in_progress -> finalizing ->
completed (or failed / cancelled); every request runs through the server's
normal chat handler, so classifier requests share the dynamic batcher with live
traffic. Files and batch objects are kept as JSON under one directory.

Multipart uploads are parsed with the standard library's email parser, which
keeps `python-multipart` out of the dependency set.
"""

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from distill.chat import ApiError
from distill.data import write_bytes, write_text

Answer = Callable[[Any], Awaitable[tuple[int, dict]]]  # raw request body -> (status code, response body)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class BatchStore:
    """Uploaded files and batch objects under `directory`.

    Files survive a restart; batch objects are written there too, but only the server that runs a
    batch answers for it.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        (self.directory / "batches").mkdir(parents=True, exist_ok=True)
        self.batches: dict[str, dict] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def save_file(self, content: bytes, filename: str, purpose: str) -> dict:
        meta = {"id": new_id("file"), "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        write_bytes(self.directory / f"{meta['id']}.data", content)
        write_text(self.directory / f"{meta['id']}.json", json.dumps(meta))
        return meta

    def file_meta(self, file_id: str) -> dict:
        path = self.directory / f"{Path(file_id).name}.json"  # .name: an id can never escape the directory
        if not path.exists():
            raise ApiError(404, f"No such File object: {file_id}", code="file_not_found", param="file_id")
        return json.loads(path.read_text())

    def file_content(self, file_id: str) -> bytes:
        """The exact bytes uploaded (or written as batch results)."""
        self.file_meta(file_id)
        return (self.directory / f"{Path(file_id).name}.data").read_bytes()

    def batch(self, batch_id: str) -> dict:
        if batch_id not in self.batches:
            raise ApiError(404, f"No such Batch object: {batch_id}", code="batch_not_found", param="batch_id")
        return self.batches[batch_id]

    def update(self, batch: dict, **changes: Any) -> dict:
        batch.update(changes)
        write_text(self.directory / "batches" / f"{batch['id']}.json", json.dumps(batch))
        return batch


def _line_problem(row: Any, seen: set[str], endpoint: str) -> str | None:
    if not isinstance(row, dict) or not isinstance(row.get("custom_id"), str):
        return "expected an object with a string custom_id"
    if row["custom_id"] in seen:
        return f"duplicate custom_id {row['custom_id']!r}"
    if row.get("method") != "POST" or row.get("url") != endpoint:
        return f"method must be POST and url {endpoint!r}"
    if not isinstance(row.get("body"), dict):
        return "body must be an object"
    return None


def parse_batch_input(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """(requests, errors) of a batch input file; each error names its 1-based line, like OpenAI's."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [{"code": "invalid_file", "message": f"the input file is not UTF-8 (byte {e.start})",
                     "param": None, "line": None}]
    requests, errors, seen = [], [], set()
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = _line_problem(row, seen, endpoint)
        except json.JSONDecodeError as e:
            problem = f"invalid JSON ({e.msg})"
        if problem:
            errors.append({"code": "invalid_request", "message": f"line {i}: {problem}", "param": None, "line": i})
        else:
            seen.add(row["custom_id"])
            requests.append(row)
    if not requests and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no requests", "param": None, "line": None})
    return requests, errors


async def run_batch(store: BatchStore, batch: dict, answer: Answer, concurrency: int) -> None:
    """Validate the input file, answer every request and write the output and error files."""
    requests, errors = parse_batch_input(store.file_content(batch["input_file_id"]), batch["endpoint"])
    if errors:
        store.update(batch, status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
        return
    counts = {"total": len(requests), "completed": 0, "failed": 0}
    store.update(batch, status="in_progress", in_progress_at=int(time.time()), request_counts=counts)
    limit = asyncio.Semaphore(concurrency)

    async def one(row: dict) -> tuple[int, dict]:
        async with limit:
            status, body = await answer(row["body"])
        counts["completed" if status == 200 else "failed"] += 1
        return status, {"id": new_id("batch_req"), "custom_id": row["custom_id"],
                        "response": {"status_code": status, "request_id": new_id("req"), "body": body},
                        "error": None}

    results = await asyncio.gather(*(one(r) for r in requests))
    store.update(batch, status="finalizing", finalizing_at=int(time.time()))
    files = {}
    for key, kind, lines in (("output_file_id", "output", [l for s, l in results if s == 200]),
                             ("error_file_id", "error", [l for s, l in results if s != 200])):
        if lines:
            text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            files[key] = store.save_file(text.encode("utf-8"), f"{batch['id']}_{kind}.jsonl", "batch_output")["id"]
    store.update(batch, status="completed", completed_at=int(time.time()), **files)


async def _guarded(store: BatchStore, batch: dict, answer: Answer, concurrency: int) -> None:
    try:
        await run_batch(store, batch, answer, concurrency)
    except Exception as e:  # the batch fails visibly instead of staying in_progress forever
        store.update(batch, status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
            {"code": "server_error", "message": f"{type(e).__name__}: {e}", "param": None, "line": None}]})


def start_batch(store: BatchStore, body: Any, answer: Answer, concurrency: int) -> dict:
    """Check a `POST /v1/batches` body, register the batch and start it in the background."""
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
        raise ApiError(400, "input_file_id is required", param="input_file_id")
    if body.get("endpoint") != "/v1/chat/completions":
        raise ApiError(400, "endpoint must be /v1/chat/completions", code="invalid_value", param="endpoint")
    if body.get("completion_window") != "24h":
        raise ApiError(400, "completion_window must be 24h", code="invalid_value", param="completion_window")
    store.file_meta(body["input_file_id"])
    now = int(time.time())
    batch = {"id": new_id("batch"), "object": "batch", "endpoint": body["endpoint"], "errors": None,
             "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
             "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
             "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
             "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
    store.batches[batch["id"]] = store.update(batch)
    task = asyncio.create_task(_guarded(store, batch, answer, concurrency))
    store.tasks[batch["id"]] = task

    def done(t: asyncio.Task) -> None:
        store.tasks.pop(batch["id"], None)
        if t.cancelled():  # also covers a task cancelled before it ever ran
            store.update(batch, status="cancelled", cancelled_at=int(time.time()))

    task.add_done_callback(done)
    return dict(batch)


def cancel_batch(store: BatchStore, batch_id: str) -> dict:
    batch = store.batch(batch_id)
    if batch_id in store.tasks and batch["status"] in ("validating", "in_progress", "finalizing"):
        store.update(batch, status="cancelling", cancelling_at=int(time.time()))
        store.tasks[batch_id].cancel()
    return dict(batch)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Fields of a multipart/form-data body: {name: (filename or None, bytes)}."""
    from email import policy
    from email.parser import BytesParser

    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "expected multipart/form-data with fields file and purpose")
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ApiError(400, "malformed multipart body")
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def add_batch_routes(app: Any, store: BatchStore, answer: Answer, concurrency: int = 128) -> None:
    """Register /v1/files and /v1/batches on a FastAPI `app`; `answer` handles one chat request body."""
    from fastapi import Request
    from fastapi.responses import Response

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None

    @app.post("/v1/files")
    async def upload(request: Request):
        fields = parse_multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in fields or "purpose" not in fields:
            raise ApiError(400, "multipart fields `file` and `purpose` are required")
        purpose = fields["purpose"][1].decode("utf-8", "replace").strip()
        return store.save_file(fields["file"][1], fields["file"][0] or "upload.jsonl", purpose)

    @app.get("/v1/files/{file_id}")
    async def file_meta(file_id: str):
        return store.file_meta(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        return Response(store.file_content(file_id), media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create(request: Request):
        return start_batch(store, await json_body(request), answer, concurrency)

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str):
        return dict(store.batch(batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str):
        return cancel_batch(store, batch_id)
