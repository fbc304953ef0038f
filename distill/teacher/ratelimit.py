"""Client-side limits for the teacher: request/token rate limits and the spending cap."""

from __future__ import annotations

import asyncio
import time


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
