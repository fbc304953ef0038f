"""OpenAI's Batch API (`/v1/files`, `/v1/batches`) for `distill teacher serve`.

Lets batch clients be tested over real HTTP against the same model that answers
live requests. A batch goes validating -> in_progress -> finalizing ->
completed (or failed / cancelled); every request runs through the server's
normal chat handler, so classifier requests share the dynamic batcher with live
traffic. Files and batch objects are kept as JSON under one directory.

Uploads are parsed as they arrive (`MultipartUpload`): the file part goes straight
to a temporary file on disk in chunks, so an upload never sits in memory, and the
server's `Guard` refuses it past the upload limit. Every file expires `file_ttl_s`
after it was written (the upload's `expires_after[seconds]` may shorten that);
expired files are removed on access and by a periodic sweep. A temporary
directory made by the server is removed when the server stops. The parser uses
only the standard library, which keeps `python-multipart` out of the dependency set.
"""

import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, BinaryIO, Callable

from distill.chat import ApiError
from distill.data import write_bytes, write_text

Answer = Callable[[Any], Awaitable[tuple[int, dict]]]  # raw request body -> (status code, response body)
DAY_S = 86400


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


PREFIX, OWNER = "distill-teacher-files-", "owner.pid"


def sweep_orphans(parent: Path) -> list[Path]:
    """Remove the temporary file directories of teacher servers that died without cleaning up (a SIGKILL
    skips every finalizer); a directory whose owner process still runs, or that names no owner, is kept."""
    removed = []
    for d in parent.glob(PREFIX + "*"):
        try:
            pid = int((d / OWNER).read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's live process
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class BatchStore:
    """Uploaded files and batch objects under `directory`.

    Files survive a restart of a server given its directory (until they expire); batch objects are
    written there too, but only the server that runs a batch answers for it.

    Args:
        directory: where files live; None: a fresh temporary directory, removed by `close`
            (or when the store is garbage-collected or the process exits, whichever comes first).
        file_ttl_s: seconds a file is kept after it was written.
    """

    def __init__(self, directory: Path | None = None, file_ttl_s: float = DAY_S):
        if file_ttl_s <= 0:
            raise ValueError("file_ttl_s must be > 0")
        self.owned = directory is None
        if self.owned:
            sweep_orphans(Path(tempfile.gettempdir()))
            self.directory = Path(tempfile.mkdtemp(prefix=PREFIX))
            # Who owns it, so that a later server can remove it once this process is gone.
            (self.directory / OWNER).write_text(f"{os.getpid()}\n")
        else:
            self.directory = Path(directory)
        (self.directory / "batches").mkdir(parents=True, exist_ok=True)
        self.file_ttl_s = file_ttl_s
        self.batches: dict[str, dict] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.directory), True) if self.owned else None
        for stale in self.directory.glob(".upload-*.tmp"):  # uploads cut short by a crash of an earlier server
            stale.unlink(missing_ok=True)
        self.sweep()

    def close(self) -> None:
        """Remove the directory if the store made it; a given directory is left as it is."""
        if self._remove is not None:
            self._remove()

    def _new_meta(self, size: int, filename: str, purpose: str, ttl_s: float | None = None) -> dict:
        now = int(time.time())
        ttl = self.file_ttl_s if ttl_s is None else min(ttl_s, self.file_ttl_s)
        return {"id": new_id("file"), "object": "file", "bytes": size, "created_at": now,
                "expires_at": int(now + ttl), "filename": filename, "purpose": purpose, "status": "processed",
                "status_details": None}

    def save_file(self, content: bytes, filename: str, purpose: str) -> dict:
        meta = self._new_meta(len(content), filename, purpose)
        write_bytes(self.directory / f"{meta['id']}.data", content)
        write_text(self.directory / f"{meta['id']}.json", json.dumps(meta))
        return meta

    async def save_upload(self, content_type: str, chunks: AsyncIterator[bytes]) -> dict:
        """A `POST /v1/files` multipart body, streamed to disk: the File object, or ApiError (nothing kept)."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                upload = MultipartUpload(content_type, f)
                async for chunk in chunks:
                    upload.feed(chunk)
                upload.finish()
                f.flush()
                os.fsync(f.fileno())
            if upload.filename is None or "purpose" not in upload.fields:
                raise ApiError(400, "multipart fields `file` and `purpose` are required")
            purpose = upload.fields["purpose"].decode("utf-8", "replace").strip()
            meta = self._new_meta(upload.file_bytes, upload.filename or "upload.jsonl", purpose,
                                  _expires_after(upload.fields))
            os.replace(tmp, self.directory / f"{meta['id']}.data")
        except BaseException:  # a refused, malformed or abandoned upload leaves nothing behind
            Path(tmp).unlink(missing_ok=True)
            raise
        write_text(self.directory / f"{meta['id']}.json", json.dumps(meta))
        return meta

    def _expired(self, meta: dict, now: float) -> bool:
        return now >= meta.get("expires_at", meta.get("created_at", 0) + self.file_ttl_s)

    def _delete(self, file_id: str) -> None:
        for suffix in (".json", ".data"):
            (self.directory / f"{file_id}{suffix}").unlink(missing_ok=True)

    def sweep(self) -> int:
        """Remove every expired file; returns how many."""
        now, removed = time.time(), 0
        for path in self.directory.glob("file-*.json"):
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if self._expired(meta, now):
                self._delete(path.stem)
                removed += 1
        return removed

    def file_meta(self, file_id: str) -> dict:
        name = Path(file_id).name  # .name: an id can never escape the directory
        path = self.directory / f"{name}.json"
        meta = json.loads(path.read_text()) if path.exists() else None
        if meta is not None and self._expired(meta, time.time()):
            self._delete(name)
            meta = None
        if meta is None:
            raise ApiError(404, f"No such File object: {file_id}", code="file_not_found", param="file_id")
        return meta

    def file_path(self, file_id: str) -> Path:
        """Where the exact bytes uploaded (or written as batch results) are; ApiError 404 when gone."""
        self.file_meta(file_id)
        return self.directory / f"{Path(file_id).name}.data"

    def file_content(self, file_id: str) -> bytes:
        return self.file_path(file_id).read_bytes()

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


def _expires_after(fields: dict[str, bytes]) -> float | None:
    """OpenAI's `expires_after[seconds]` upload field (the anchor is always the upload time here)."""
    raw = fields.get("expires_after[seconds]")
    if raw is None:
        return None
    try:
        seconds = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        seconds = 0
    if seconds < 1:
        raise ApiError(400, "expires_after[seconds] must be a positive integer", param="expires_after")
    return seconds


def _boundary(content_type: str) -> bytes:
    from email.message import Message

    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary") if msg.get_content_type() == "multipart/form-data" else None
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 200:
        raise ApiError(400, "expected multipart/form-data with fields file and purpose")
    return boundary.encode("latin-1")


def _readable(text: str) -> str:
    """A header value the email parser decoded with surrogate escapes, as the UTF-8 text it was."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class MultipartUpload:
    """An incremental multipart/form-data parser: `feed` it the body in chunks of any size.

    The `file` part is written to `sink` as it arrives; the other fields (purpose, expires_after)
    are kept in memory up to FIELD_LIMIT bytes each. Only the last len(delimiter) - 1 bytes are
    ever held back, so memory stays at one chunk whatever the upload's size.
    """

    FIELD_LIMIT = 64 * 1024
    HEADER_LIMIT = 16 * 1024

    def __init__(self, content_type: str, sink: BinaryIO):
        self.delimiter = b"\r\n--" + _boundary(content_type)
        self.buf = bytearray(b"\r\n")  # the first boundary line then reads like every later delimiter
        self.state = "preamble"
        self.sink = sink
        self.fields: dict[str, bytes] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self.part: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self.state == "done":  # the epilogue is ignored
            return
        self.buf += chunk
        while self._step():
            pass

    def finish(self) -> None:
        if self.state != "done":
            raise ApiError(400, "malformed multipart body: it ends before its closing boundary")

    def _step(self) -> bool:
        """Advance the state machine once; False when it needs more bytes."""
        buf, delim = self.buf, self.delimiter
        if self.state == "preamble":
            i = buf.find(delim)
            if i < 0:
                del buf[: max(len(buf) - len(delim) + 1, 0)]
                return False
            del buf[: i + len(delim)]
            self.state = "delimiter"
        elif self.state == "delimiter":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.state = "done"
                buf.clear()
                return False
            i = buf.find(b"\r\n")
            if i < 0 or buf[:i].strip(b" \t"):  # RFC 2046 allows only padding before the line break
                if i >= 0 or len(buf) > 256:
                    raise ApiError(400, "malformed multipart body: bad boundary line")
                return False
            del buf[: i + 2]
            self.state = "headers"
        elif self.state == "headers":
            i = 0 if buf.startswith(b"\r\n") else buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > self.HEADER_LIMIT:
                    raise ApiError(400, "malformed multipart body: part headers too long")
                return False
            self._start_part(bytes(buf[:i]))
            del buf[: i + (2 if i == 0 else 4)]
            self.state = "body"
        else:  # body
            i = buf.find(delim)
            if i < 0:
                n = len(buf) - len(delim) + 1  # the tail may be the start of a delimiter
                if n > 0:
                    self._write(buf[:n])
                    del buf[:n]
                return False
            self._write(buf[:i])
            del buf[: i + len(delim)]
            self.part = None
            self.state = "delimiter"
        return True

    def _start_part(self, headers: bytes) -> None:
        from email import policy
        from email.parser import BytesParser

        msg = BytesParser(policy=policy.HTTP).parsebytes(headers + b"\r\n\r\n", headersonly=True)
        name = msg.get_param("name", header="content-disposition")
        self.part = _readable(str(name)) if name else None
        if self.part == "file":
            if self.filename is not None:
                raise ApiError(400, "more than one `file` field", param="file")
            self.filename = _readable(msg.get_filename() or "") or "upload.jsonl"
        elif self.part is not None:
            self.fields[self.part] = b""

    def _write(self, data: bytearray) -> None:
        if self.part == "file":
            self.sink.write(data)
            self.file_bytes += len(data)
        elif self.part is not None:
            value = self.fields[self.part] + bytes(data)
            if len(value) > self.FIELD_LIMIT:
                raise ApiError(400, f"multipart field `{self.part}` exceeds {self.FIELD_LIMIT} bytes")
            self.fields[self.part] = value


def add_batch_routes(app: Any, store: BatchStore, answer: Answer, concurrency: int = 128) -> None:
    """Register /v1/files and /v1/batches on a FastAPI `app`; `answer` handles one chat request body."""
    from fastapi import Request
    from fastapi.responses import FileResponse

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None

    @app.post("/v1/files")
    async def upload(request: Request):
        return await store.save_upload(request.headers.get("content-type", ""), request.stream())

    @app.get("/v1/files/{file_id}")
    async def file_meta(file_id: str):
        return store.file_meta(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        # Sent from disk in chunks: a large result file is never read into memory whole.
        return FileResponse(store.file_path(file_id), media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create(request: Request):
        return start_batch(store, await json_body(request), answer, concurrency)

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str):
        return dict(store.batch(batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str):
        return cancel_batch(store, batch_id)
