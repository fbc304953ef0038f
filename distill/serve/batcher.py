"""Dynamic micro-batching for the student server, and the request log's batched writer.

`MicroBatcher` takes single texts from the event loop and answers each with its row of
one batched forward pass. Tokenization and the forward run in the batcher's own thread,
so the event loop only parses JSON and writes responses. Whatever queued while the last
batch ran forms the next batch at once; when fewer than `max_batch` are waiting, the
thread waits at most `window_ms` for more. A single client therefore pays nothing for
batching, and concurrent clients share each forward pass instead of queueing behind it.

With `lanes` > 1, that many threads take batches from the same queue and run their forward
passes at once (ONNX Runtime releases the GIL), each on one core. A lane takes its share of
what is waiting, split with every lane, busy ones included, not all of it: on a CPU student
a batch of 4 costs about 4 batches of 1, so one lane holding four texts while another sat
idle doubled their wait, and a lane that took the whole queue because the other was still
busy left that one idle a moment later (at concurrency 4 on 2 cores, splitting with the idle
lanes only left the machine idle 20-21 % of the time, splitting with all 15-18 %; at 32 the
P95 fell from 59-70 to 47-54 ms).

`LogWriter` moves request-log writes off the hot path: rows are queued and written in
one transaction per batch by a thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

logger = logging.getLogger("distill.serve")

Predict = Callable[[list[str]], tuple[np.ndarray, list[int]]]  # texts -> (probs [n, labels], tokens per text)


def _resolve(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if fut.cancelled():  # the request timed out while its batch ran
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class MicroBatcher:
    """Batches concurrent `submit` calls into one `predict` call per batch.

    Args:
        predict: the batched forward (StudentRuntime.predict); called from `lanes` threads at once.
        max_batch: texts per forward at most.
        window_ms: how long a short batch waits for more texts.
        name: thread name.
        lanes: forward passes running at once, one thread each.
    """

    def __init__(self, predict: Predict, max_batch: int = 32, window_ms: float = 1.0, name: str = "distill-batch",
                 lanes: int = 1):
        self.predict = predict
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = 0
        self.items = 0
        self.forward_s = 0.0
        self.lanes = lanes
        self._count = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=name if lanes == 1 else f"{name}-{i}", daemon=True)
                        for i in range(lanes)]
        for t in self.threads:
            t.start()

    async def submit(self, text: str) -> tuple[np.ndarray, int, float]:
        """(probabilities, prompt tokens, forward milliseconds of its batch) for one text."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((text, fut, loop))
        return await fut

    def classify_sync(self, text: str) -> tuple[np.ndarray, int, float]:
        """The same answer from a plain thread (shadow jobs), through the same batches."""
        done = threading.Event()
        box: dict[str, Any] = {}

        class _Fut:  # the minimal future protocol `_run` uses, for a caller without an event loop
            def cancelled(self):
                return False

            def set_result(self, v):
                box["v"] = v
                done.set()

            def set_exception(self, e):
                box["e"] = e
                done.set()

        self.queue.put((text, _Fut(), None))
        done.wait()
        if "e" in box:
            raise box["e"]
        return box["v"]

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)

    def _collect(self, first) -> tuple[list, bool]:
        """The next batch starting with `first`, and whether the queue was closed meanwhile."""
        batch = [first]
        limit = self.max_batch
        if self.lanes > 1:  # this lane's share of the waiting texts
            limit = min(limit, math.ceil((1 + self.queue.qsize()) / self.lanes))
        deadline = time.perf_counter() + self.window_s
        while len(batch) < limit:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    item = self.queue.get(timeout=left)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        closed = False
        while not closed:
            first = self.queue.get()
            if first is None:
                return
            batch, closed = self._collect(first)
            t0 = time.perf_counter()
            try:
                probs, tokens = self.predict([text for text, _, _ in batch])
                error = None
            except Exception as e:  # every waiting request gets the error, the thread keeps serving
                logger.exception("batched forward failed")
                probs, tokens, error = None, None, e
            ms = (time.perf_counter() - t0) * 1000
            with self._count:  # lanes finish at once: a bare += could lose one's figures
                self.forward_s += ms / 1000
                self.batches += 1
                self.items += len(batch)
            for i, (_, fut, loop) in enumerate(batch):
                value = None if error else (probs[i], tokens[i], ms)
                if loop is None:
                    _resolve(fut, value, error)
                    continue
                try:
                    loop.call_soon_threadsafe(_resolve, fut, value, error)
                except RuntimeError:  # the server stopped while this batch ran: nobody waits for it
                    pass


class PendingWork:
    """Shadow and log jobs queued but not finished, bounded by `limit`: beyond it new work is refused
    (shadow work never slows or fails a served answer), and `drain` waits for the rest at shutdown."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.lock = threading.Lock()

    def reserve(self) -> bool:
        """Take one slot; False (nothing taken) when `limit` jobs are already pending."""
        with self.lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def done(self, n: int = 1) -> None:
        with self.lock:
            self.count -= n

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no job is pending (tests, shutdown); False when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.count == 0:
                    return True
            time.sleep(0.01)
        return False


class LogWriter:
    """Appends rows to the request log in batches, from a thread of its own.

    Args:
        append_many: writes a list of rows in one transaction (ShadowLog.append_many).
        on_done: called with the number of rows after each write, failed or not (pending counts).
        max_rows: rows per transaction at most.
        linger_ms: how long the first row of a write waits for more. Rows arrived one or two at a
            time at concurrency 4, and a transaction of one row cost 226 µs of CPU against 69 µs a
            row for 64 (SQLite, WAL): on 2 cores that CPU is taken from the forward passes.
    """

    def __init__(self, append_many: Callable[[list[dict]], None], on_done: Callable[[int], None],
                 max_rows: int = 256, linger_ms: float = 25.0):
        self.append_many = append_many
        self.on_done = on_done
        self.max_rows = max_rows
        self.linger_s = linger_ms / 1000.0
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="distill-log", daemon=True)
        self.thread.start()

    def put(self, row: dict[str, Any]) -> None:
        self.queue.put(row)

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        closed = False
        while not closed:
            first = self.queue.get()
            if first is None:
                return
            # One sleep, not a timed get per row: each get would wake this thread once per request.
            # Skipped when a full write is already queued: under load it would only cap rows per second.
            if self.queue.qsize() < self.max_rows - 1:
                time.sleep(self.linger_s)
            rows = [first]
            while len(rows) < self.max_rows:
                try:
                    row = self.queue.get_nowait()
                except queue.Empty:
                    break
                if row is None:
                    closed = True
                    break
                rows.append(row)
            try:
                self.append_many(rows)
            except Exception:
                self.failures += 1
                logger.exception("request log write of %d rows failed", len(rows))
            finally:
                self.on_done(len(rows))
