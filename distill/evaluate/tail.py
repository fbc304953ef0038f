"""The tail slice: a deterministic set of the hardest holdout inputs (rare labels, long or oddly
formatted inputs, lowest teacher confidence) plus user-supplied rows.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from distill.config import ConfigError
from distill.data import read_table
from distill.evaluate.records import messages_like


def format_oddity(text: str) -> float:
    """How unusually an input is formatted: symbols, digits, shouting, line breaks, repeated punctuation."""
    if not text:
        return 0.0
    n = len(text)
    symbols = sum(1 for c in text if not (c.isalpha() or c.isspace() or c in ".,?!'")) / n
    digits = sum(c.isdigit() for c in text) / n
    words = text.split()
    caps = sum(1 for w in words if len(w) > 1 and w.isupper()) / max(len(words), 1)
    breaks = 1.0 if ("\n" in text or "\t" in text) else 0.0
    repeats = 0.5 if re.search(r"[!?.]{2,}", text) else 0.0
    return symbols + 0.5 * digits + caps + breaks + repeats


def _hash(row_id: str) -> int:
    return zlib.crc32(str(row_id).encode())


def select_tail(rows: Sequence[dict[str, Any]], teacher_confidence: dict[str, float], size: int,
                train_label_counts: dict[str, int] | None = None,
                user_rows: Sequence[dict[str, Any]] = ()) -> list[tuple[dict[str, Any], str]]:
    """The hardest-inputs slice, deterministic for the same inputs.

    Args:
        rows: holdout task rows (with "gold").
        teacher_confidence: row id -> the teacher's top probability (missing: least confident).
        size: slice size; user rows count towards it, but are all kept even beyond it.
        train_label_counts: training-label frequencies; holdout frequencies when None.
        user_rows: rows from evaluate.tail_path, always in the slice.
    Returns:
        [(row, reason)], reason one of "user", "rare_label", "long", "format", "low_teacher_confidence".
        The automatic criteria take turns, each adding its next hardest row not yet taken.
    """
    out = [(r, "user") for r in user_rows]
    quota = size - len(out)
    if quota <= 0 or not rows:
        return out
    freq = train_label_counts if train_label_counts is not None else Counter(r.get("gold") for r in rows)
    ranked = [
        ("rare_label", sorted(rows, key=lambda r: (freq.get(r.get("gold"), 0), _hash(r["id"])))),
        ("long", sorted(rows, key=lambda r: (-len(r["text"]), _hash(r["id"])))),
        ("format", sorted((r for r in rows if format_oddity(r["text"]) > 0),
                          key=lambda r: (-format_oddity(r["text"]), _hash(r["id"])))),
        ("low_teacher_confidence", sorted(rows, key=lambda r: (teacher_confidence.get(r["id"], 0.0),
                                                                 _hash(r["id"])))),
    ]
    taken = {r["id"] for r in user_rows}
    pos = [0] * len(ranked)
    picked: list[tuple[dict[str, Any], str]] = []
    while len(picked) < quota:
        progressed = False
        for k, (reason, lst) in enumerate(ranked):
            while pos[k] < len(lst) and lst[pos[k]]["id"] in taken:
                pos[k] += 1
            if pos[k] < len(lst) and len(picked) < quota:
                row = lst[pos[k]]
                taken.add(row["id"])
                picked.append((row, reason))
                progressed = True
        if not progressed:
            break
    return out + picked


def load_tail_rows(path: str | Path, holdout: Sequence[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Rows of evaluate.tail_path, read with the holdout's column names.

    The text and label columns are the holdout's: the input column whose value is a
    holdout row's text, and the one whose value is its gold label.
    """
    sample = holdout[0]
    text_field = next((k for k, v in sample["input"].items() if v == sample["text"]), "text")
    label_field = next((k for k, v in sample["input"].items() if v == sample["gold"] and k != text_field), "label")
    rows = read_table(path, [text_field, label_field])
    out = []
    for r in rows:
        where = f"{path}:{r['_line']}"
        text, gold = r.get(text_field), r.get(label_field)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: empty {text_field!r} (evaluate.tail_path)")
        if gold not in labels:
            raise ConfigError(f"{where}: label {gold!r} is not in the task's label set (evaluate.tail_path)")
        out.append({"id": str(r.get("id") or f"tail-{r['_line']}"), "text": text, "gold": gold,
                    "messages": messages_like(sample, text), "_line": r["_line"]})
    return out
