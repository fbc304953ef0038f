"""Small helpers over teacher records and chat messages, shared by both evaluations.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def messages_like(sample: dict[str, Any], text: str) -> list[dict[str, str]]:
    """The production chat for `text`, built from a holdout row's chat (same system prompt and template)."""
    messages = []
    for m in sample.get("messages") or []:
        content = m["content"]
        if m["role"] == "user":
            content = content.replace(sample["text"], text) if sample["text"] in content else text
        messages.append({"role": m["role"], "content": content})
    return messages or [{"role": "user", "content": text}]


def clean_json(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None (metrics.json must be strict JSON)."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def first_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Teacher records by id, the first sample of each (self-consistency samples beyond it are not judged)."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("id") not in by_id or r.get("sample", 0) < by_id[r["id"]].get("sample", 0):
            by_id[r["id"]] = r
    return by_id
