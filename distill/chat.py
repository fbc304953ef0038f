"""The OpenAI chat-completions wire format, shared by both servers.

`distill teacher serve` and `distill serve` answer the same protocol: errors as
`{"error": {"message", "type", "code", "param"}}`, and per-token logprob entries
floored at OpenAI's -9999 so that -inf never reaches JSON.
"""

from __future__ import annotations

import math

MIN_LOGPROB = -9999.0  # OpenAI's floor; keeps -inf out of JSON


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "code", "param"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def token_logprob(text: str, logprob: float) -> dict:
    """One entry of `logprobs.content` (or of its `top_logprobs`)."""
    return {"token": text, "logprob": max(float(logprob), MIN_LOGPROB), "bytes": list(text.encode("utf-8"))}


def safe_log(p: float) -> float:
    return math.log(p) if p > 0 else MIN_LOGPROB
