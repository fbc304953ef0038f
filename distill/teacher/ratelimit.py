"""Client-side limits for the teacher: request/token rate limits, the spending cap and the run's ledger."""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class RateLimiter:
    """Bucket refilled continuously at `per_minute`/60 per second, holding at most one unit.

    No burst allowance: requests are spread evenly, so no 60-second window ever
    exceeds the limit (a bucket of B units would allow B over it). `acquire`
    reserves immediately and sleeps off any debt, so concurrent callers queue in
    arrival order without a lock (the event loop is single-threaded).
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = 1.0
        self.level = self.capacity
        self.t = time.monotonic()

    async def acquire(self, amount: float = 1.0) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate) - amount
        self.t = now
        if self.level < 0:
            await asyncio.sleep(-self.level / self.rate)

    def refund(self, amount: float) -> None:
        """Correct an estimate once the real usage is known (negative to charge more)."""
        self.level = min(self.capacity, self.level + amount)


class Budget:
    """Spend so far plus in-flight reservations; refuses a request that could cross the cap."""

    def __init__(self, cap: float | None):
        self.cap, self.spent, self.reserved, self.exhausted = cap, 0.0, 0.0, False

    def reserve(self, amount: float) -> bool:
        if self.cap is not None and (self.exhausted or self.spent + self.reserved + amount > self.cap):
            self.exhausted = True
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved -= reserved
        self.spent += actual

    def reason(self) -> str:
        return f"budget_exhausted: budget ${self.cap:.4f} reached (spent ${self.spent:.4f})"


class Ledger:
    """What one run has spent, across every call that spends: training prompts, holdout, grader, probes,
    re-asks and task retries. An append-only JSONL file in the run directory, so a retried task or a
    resumed run sees what was already spent and one `budget_usd` caps them all.

    Calls that spend at the same time (the shard workers of `generate-dataset`, threads or processes)
    each take a hold on part of what is left (`hold`), under a lock, so their caps together never
    exceed the budget. A hold counts as spent until it is released; the hold of a process that died
    on this host (SIGKILL) no longer counts.

    With `url` (generation.ledger_url, PostgreSQL) the entries live in that database instead, under
    the file's path as the ledger's name, for workers on several machines. A hold then also holds a
    PostgreSQL advisory lock on the holder's connection: the server drops it when the holder dies,
    on whatever machine, and so the hold stops counting."""

    def __init__(self, path: str | Path, cap: float | None, url: str | None = None):
        self.path, self.cap, self.url = Path(path), cap, url
        self.name = str(path)
        self._conn = None
        self._own: set[str] = set()  # this instance's open holds: its own session holds their locks

    def _db(self):
        if self._conn is None:
            from distill.teacher.cache import connect_pg

            def setup(conn):
                conn.execute("CREATE TABLE IF NOT EXISTS ledger_entries (seq BIGSERIAL PRIMARY KEY, "
                             "ledger TEXT NOT NULL, entry TEXT NOT NULL)")
                conn.execute("CREATE INDEX IF NOT EXISTS ledger_entries_by_ledger ON ledger_entries (ledger, seq)")

            self._conn = connect_pg(self.url, "generation.ledger_url", "spend ledger", 7216, setup)
        return self._conn

    def entries(self) -> list[dict]:
        if self.url:
            rows = self._db().execute("SELECT entry FROM ledger_entries WHERE ledger = %s ORDER BY seq",
                                      (self.name,)).fetchall()
            return [json.loads(r[0]) for r in rows]
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _charges(self) -> list[dict]:
        """Charges, plus the holds still open and owned by a live process (a dead owner's hold is void)."""
        entries = self.entries()
        released = {e["hold"] for e in entries if e.get("purpose") == "release"}
        out = []
        for e in entries:
            if e.get("purpose") == "release":
                continue
            if e.get("purpose") == "hold" and (e["hold"] in released or not self._holder_alive(e)):
                continue
            out.append(e)
        return out

    def _holder_alive(self, hold: dict) -> bool:
        if "lock" not in hold:
            return _alive(hold.get("host"), hold.get("pid"))
        if hold["hold"] in self._own:
            return True
        # Free only when the holder's session is gone; taken here, it is given straight back.
        conn = self._db()
        if conn.execute("SELECT pg_try_advisory_lock(%s)", (hold["lock"],)).fetchone()[0]:
            conn.execute("SELECT pg_advisory_unlock(%s)", (hold["lock"],))
            return False
        return True

    def spent(self) -> float:
        return round(sum(float(e["cost_usd"]) for e in self._charges()), 6)

    def by_purpose(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self._charges():
            if e["purpose"] != "hold":
                out[e["purpose"]] = round(out.get(e["purpose"], 0.0) + float(e["cost_usd"]), 6)
        return out

    def remaining(self) -> float | None:
        return None if self.cap is None else max(0.0, self.cap - self.spent())

    def _append(self, entry: dict) -> None:
        if self.url:
            self._db().execute("INSERT INTO ledger_entries (ledger, entry) VALUES (%s, %s)",
                               (self.name, json.dumps(entry)))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:  # one short line, appended and synced: no torn total
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def charge(self, purpose: str, cost_usd: float, requests: int) -> None:
        self._append({"purpose": purpose, "cost_usd": round(cost_usd, 8), "requests": requests})

    @contextmanager
    def hold(self, amount: float) -> Iterator[float | None]:
        """Reserve up to `amount` of what is left for the block; yields the cap it may spend (None: no budget).

        Charge what was spent before the block ends; the hold is released on the way out.
        """
        if self.cap is None:
            yield None
            return
        import uuid

        hold_id = uuid.uuid4().hex
        lock = int(hold_id[:15], 16) if self.url else None
        granted = self._hold_in_db(hold_id, lock, amount) if self.url else self._hold_in_file(hold_id, amount)
        try:
            yield granted
        finally:
            self._append({"purpose": "release", "hold": hold_id, "cost_usd": 0.0})
            if lock is not None:
                self._own.discard(hold_id)
                self._db().execute("SELECT pg_advisory_unlock(%s)", (lock,))

    def _hold_in_file(self, hold_id: str, amount: float) -> float:
        import socket

        from distill.data import locked_beside

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked_beside(self.path):  # the remaining amount is read and held by one spender at a time
            granted = round(min(max(amount, 0.0), self.remaining()), 8)
            self._append({"purpose": "hold", "hold": hold_id, "cost_usd": granted,
                          "host": socket.gethostname(), "pid": os.getpid()})
        return granted

    def _hold_in_db(self, hold_id: str, lock: int, amount: float) -> float:
        conn = self._db()
        conn.execute("SELECT pg_advisory_lock(%s)", (lock,))  # held by this session for as long as the hold
        self._own.add(hold_id)
        with conn.transaction():
            # One spender at a time reads what is left and holds part of it, on any machine.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.name,))
            granted = round(min(max(amount, 0.0), self.remaining()), 8)
            self._append({"purpose": "hold", "hold": hold_id, "cost_usd": granted, "lock": lock})
        return granted


def _alive(host: str | None, pid: int | None) -> bool:
    """Whether a hold's owner may still spend: another host's owner is assumed alive."""
    import socket

    if host != socket.gethostname() or not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        pass
    return True
