"""Client-side limits for the teacher: request/token rate limits, the spending cap and the run's ledger."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path


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
    resumed run sees what was already spent and one `budget_usd` caps them all."""

    def __init__(self, path: str | Path, cap: float | None):
        self.path, self.cap = Path(path), cap

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def spent(self) -> float:
        return round(sum(float(e["cost_usd"]) for e in self.entries()), 6)

    def by_purpose(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.entries():
            out[e["purpose"]] = round(out.get(e["purpose"], 0.0) + float(e["cost_usd"]), 6)
        return out

    def remaining(self) -> float | None:
        return None if self.cap is None else max(0.0, self.cap - self.spent())

    def charge(self, purpose: str, cost_usd: float, requests: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"purpose": purpose, "cost_usd": round(cost_usd, 8), "requests": requests}) + "\n"
        with self.path.open("a", encoding="utf-8") as f:  # one short line, appended and synced: no torn total
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
