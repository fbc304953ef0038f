"""Cheap checks on each answer: empty, truncated (or unbalanced), refusal, format, length.
"""

from __future__ import annotations

import re

from distill.config import (
    HeuristicsConfig,
    TaskConfig,
)
from distill.filter.dedup import dedup  # noqa: F401  (the dedup stage lives with its algorithms)
from distill.filter.rows import Rows, parse_json_answer, reject_row

_OPEN = {"(": ")", "[": "]", "{": "}"}


def unbalanced(text: str) -> bool:
    """True when brackets don't close in order, a double-quoted string is left open, or a ``` fence
    is unclosed: the usual look of an answer cut off mid-structure. Apostrophes are ignored (prose)."""
    if text.count("```") % 2:
        return True
    stack: list[str] = []
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                return True
    return in_str or bool(stack)


def heuristics(rows: Rows, config: HeuristicsConfig, task: TaskConfig) -> tuple[Rows, Rows]:
    """Drop empty, truncated, refused, malformed and out-of-bounds answers (first failing check wins).

    Args:
        rows: candidate rows.
        config: heuristics section (refusal patterns, length bounds, answer_regex / json_schema).
        task: the task (classification answers must name a label of the label set).
    """
    refusals = [re.compile(p, re.I) for p in config.refusal_patterns]
    pattern = re.compile(config.answer_regex, re.S) if config.answer_regex else None
    validator = None
    if config.json_schema is not None:
        import jsonschema

        validator = jsonschema.validators.validator_for(config.json_schema)(config.json_schema)
    kept, rejected = [], []
    for row in rows:
        answer = row.get("response")
        reason = None
        if not isinstance(answer, str) or not answer.strip():
            reason = "empty: blank answer" if isinstance(answer, str) else "empty: no answer"
        elif row.get("truncated") or row.get("finish_reason") == "length":
            reason = "truncated: finish_reason=length"
        elif task.kind == "generation" and config.check_balance and unbalanced(answer):
            reason = "truncated: unbalanced brackets, quotes or code fence"
        else:
            hit = next((r for r in refusals if r.search(answer)), None)
            stripped = answer.strip()
            if hit is not None:
                reason = f"refusal: matches {hit.pattern!r}"
            elif task.kind == "classification" and row.get("label") is None:
                reason = f"format: {stripped[:60]!r} is not a label of the task"
            elif pattern is not None and not pattern.fullmatch(stripped):
                reason = "format: does not match answer_regex"
            elif validator is not None:
                try:
                    value = parse_json_answer(stripped)
                    err = next(iter(validator.iter_errors(value)), None)
                    if err is not None:
                        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
                        reason = f"format: schema violation at {where}: {err.message[:80]}"
                except ValueError as e:
                    reason = f"format: {e}"
            if reason is None and len(stripped) < config.min_chars:
                reason = f"length: {len(stripped)} chars < min_chars {config.min_chars}"
            if reason is None and config.max_chars is not None and len(stripped) > config.max_chars:
                reason = f"length: {len(stripped)} chars > max_chars {config.max_chars}"
        if reason is None:
            kept.append(row)
        else:
            rejected.append(reject_row(row, "heuristics", reason))
    return kept, rejected
