"""Candidate rows for the filter stages, and the row shape every stage shares.

Every stage has the shape `(rows, config, task) -> (kept, rejected)`; a rejected
row is the row plus {"stage", "reason"}, where the reason starts with a short
code ("empty", "truncated", "refusal", "format", "length", "contradiction",
"disagreement", "merged", "entropy", ...) followed by ": " and the detail, so
reports can group by code and still show the specifics. Nothing is discarded:
rejected rows are kept for audit and override.

Kept rows may gain `near_threshold` (stages the row passed only narrowly; the
spot-check stratifies on it), `weight` (< 1 when down-weighted) and `agreement`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from distill.config import (
    TaskConfig,
)
from distill.filter.dedup import dedup  # noqa: F401  (the dedup stage lives with its algorithms)
from distill.teacher.soft_labels import entropy as dist_entropy
from distill.teacher.soft_labels import label_of, soft_labels, token_entropy

Rows = list[dict[str, Any]]


def reject_row(row: dict[str, Any], stage: str, reason: str) -> dict[str, Any]:
    return {**row, "stage": stage, "reason": reason}


def near_row(row: dict[str, Any], stage: str) -> dict[str, Any]:
    return {**row, "near_threshold": [*(row.get("near_threshold") or []), stage]}


def parse_json_answer(text: str | None) -> Any:
    """The JSON value of an answer, tolerating a surrounding ``` fence; raises ValueError if not JSON."""
    if text is None:
        raise ValueError("no answer")
    s = text.strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", s, re.S)
    if fence:
        s = fence.group(1)
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at char {e.pos})") from None


def _structured_label(text: str | None, labels: list[str], label_key: str) -> str | None:
    if not text or not text.lstrip().startswith(("{", "`")):
        return None
    try:
        obj = parse_json_answer(text)
    except ValueError:
        return None
    value = obj.get(label_key) if isinstance(obj, dict) else None
    return label_of(value, labels) if isinstance(value, str) else None


def build_candidates(task_rows: Rows, records: Rows, task: TaskConfig,
                     label_key: str = "label") -> tuple[Rows, Rows]:
    """Join teacher records to task rows by id.

    Args:
        task_rows: task rows (see distill/data.py).
        records: teacher records, any number of samples per id.
        task: the task section (kind and label set).
        label_key: JSON field read as the label when a classification answer is a JSON object.

    Returns (candidates, rejected): failed records and records whose id is not a task row come back
    rejected with stage "generation". A candidate's entropy is that of its label distribution
    (classification) or its mean token entropy (generation); None when it cannot be known.
    """
    by_id = {r["id"]: r for r in task_rows}
    labels = task.label_set() if task.kind == "classification" else []
    kept, rejected = [], []
    for rec in records:
        row = by_id.get(rec.get("id"))
        base = {
            "id": rec.get("id"), "sample": rec.get("sample", 0),
            "text": row["text"] if row else None, "gold": row["gold"] if row else None,
            "messages": row["messages"] if row else rec.get("messages"),
            "response": rec.get("response"), "finish_reason": rec.get("finish_reason"),
            "truncated": bool(rec.get("truncated")), "logprobs": rec.get("logprobs"),
            "topk": rec.get("topk"),
            "label": None, "soft_labels": None, "entropy": None, "weight": 1.0, "near_threshold": [],
            # Provenance: a teacher-labelled training input, or recent production traffic (distill.drift).
            "source": (row.get("source") if row else None) or "teacher",
        }
        if row is None:
            rejected.append(reject_row(base, "generation", f"unknown id: {rec.get('id')!r} is not a task row"))
            continue
        if rec.get("status") != "done":
            rejected.append(reject_row(base, "generation", f"teacher failed: {rec.get('error') or 'no reason given'}"))
            continue
        if task.kind == "classification":
            label = label_of(rec.get("response"), labels) or _structured_label(rec.get("response"), labels, label_key)
            base["label"] = label
            dist = soft_labels({**rec, "response": label or rec.get("response")}, labels)
            base["soft_labels"] = dist
            base["entropy"] = dist_entropy(dist) if dist else None
        else:
            base["entropy"] = token_entropy(rec)
        kept.append(base)
    return kept, rejected


def answer_report(candidates: Rows, task: TaskConfig, rationale_field: str | None = None) -> dict[str, Any]:
    """How the teacher's answers read: the share that maps to a label, and which consistency checks can run.

    Args:
        candidates: rows from build_candidates (teacher answers that came back).
        task: the task section.
        rationale_field: the JSON field the consistency stage reads as a rationale.

    Returns {"answered", "mapped", "mapped_share" (None for generation), "checks": {"rationale": rows whose
    answer carries a rationale, "samples": prompts answered more than once}}.
    """
    mapped = sum(1 for r in candidates if r.get("label") is not None)
    with_rationale = 0
    if rationale_field:
        for r in candidates:
            text = r.get("response") or ""
            if text.lstrip().startswith(("{", "`")):
                try:
                    obj = parse_json_answer(text)
                except ValueError:
                    continue
                with_rationale += isinstance(obj, dict) and isinstance(obj.get(rationale_field), str)
    per_id: dict[Any, int] = {}
    for r in candidates:
        per_id[r["id"]] = per_id.get(r["id"], 0) + 1
    classification = task.kind == "classification"
    return {"answered": len(candidates), "mapped": mapped if classification else None,
            "mapped_share": (mapped / len(candidates) if candidates else 0.0) if classification else None,
            "checks": {"rationale": with_rationale, "samples": sum(1 for n in per_id.values() if n > 1)}}
