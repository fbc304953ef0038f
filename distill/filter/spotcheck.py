"""Human spot-check, the pure parts: stratified sampling, the review table, CSV export/import
of decisions, and applying decisions and reviewer rejection patterns to the dataset.

Decisions CSV (headless review): a header with `id` and `approved`, optionally `reason` and
`reject_pattern`. `approved` is yes/no, true/false, y/n, 1/0, approve/reject (any case); an
empty cell means the row was not reviewed (it stays). A non-empty `reject_pattern` cell on any
line adds a regex that rejects every matching answer in the dataset, reviewed or not.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from distill.config import ConfigError

_YES = {"yes", "y", "true", "1", "approve", "approved", "ok"}
_NO = {"no", "n", "false", "0", "reject", "rejected"}
EXPORT_COLUMNS = ["id", "sample", "label", "near_threshold", "text", "answer", "approved", "reason",
                  "reject_pattern"]


def stratum(row: dict[str, Any]) -> tuple[str, str]:
    """The review stratum of a row: its label and the stages it passed near their threshold."""
    near = ",".join(sorted(set(row.get("near_threshold") or []))) or "-"
    return str(row.get("label") if row.get("label") is not None else "-"), near


def sample_for_review(rows: list[dict[str, Any]], fraction: float, seed: int = 0) -> list[dict[str, Any]]:
    """A stratified random sample of about `fraction` of the rows.

    Strata are (label, stages passed near the threshold). Each stratum gets its proportional share
    (largest remainder), so a 5 % sample of a 77-label dataset still spans the labels; then every
    stratum of near-threshold rows that got nothing gets one row, because those are the rows a
    reviewer most needs to see (the sample can exceed the fraction by that many rows).

    Args:
        rows: rows that passed the automatic stages.
        fraction: share to sample, 0..1; 0 gives an empty sample, any positive share at least one row.
        seed: sampling seed.
    """
    if not rows or fraction <= 0:
        return []
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[stratum(r)].append(i)
    total = max(1, round(fraction * len(rows)))
    keys = sorted(groups)
    quotas = {k: total * len(groups[k]) / len(rows) for k in keys}
    alloc = {k: math.floor(q) for k, q in quotas.items()}
    left = total - sum(alloc.values())
    for k in sorted(keys, key=lambda k: (-(quotas[k] - alloc[k]), rng.random()))[:left]:
        alloc[k] += 1
    for k in keys:
        if k[1] != "-" and alloc[k] == 0:
            alloc[k] = 1
    picked = []
    for k in keys:
        picked += rng.sample(groups[k], min(alloc[k], len(groups[k])))
    return [rows[i] for i in sorted(picked)]


def review_table(sample: list[dict[str, Any]], width: int = 160) -> list[dict[str, Any]]:
    """Rows for a table artifact: what the reviewer needs to judge each answer."""
    def cut(s: Any) -> str:
        s = "" if s is None else str(s)
        return s if len(s) <= width else s[: width - 1] + "…"
    return [{"id": r["id"], "sample": r.get("sample", 0), "label": r.get("label") or "",
             "near_threshold": ",".join(r.get("near_threshold") or []), "text": cut(r.get("text")),
             "answer": cut(r.get("response"))} for r in sample]


def export_csv(sample: list[dict[str, Any]]) -> str:
    """CSV text for headless review: the sample with empty approved/reason/reject_pattern columns."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in sample:
        w.writerow({"id": r["id"], "sample": r.get("sample", 0), "label": r.get("label") or "",
                    "near_threshold": ",".join(r.get("near_threshold") or []), "text": r.get("text") or "",
                    "answer": r.get("response") or "", "approved": "", "reason": "", "reject_pattern": ""})
    return buf.getvalue()


def compile_patterns(patterns: list[str], where: str = "reject_patterns") -> list[re.Pattern[str]]:
    """Compile reviewer patterns (case-insensitive); a bad one is a ConfigError naming it."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.I))
        except re.error as e:
            raise ConfigError(f"{where}: {p!r} is not a valid regex ({e})") from None
    return out


def read_decisions(path: str | Path) -> tuple[dict[str, tuple[bool, str]], list[str]]:
    """Read a decisions CSV (module doc). Returns ({id: (approved, reason)}, reject_patterns).

    Raises ConfigError naming the file and line for a missing column, a bad approved value,
    a bad pattern, or an id decided twice differently.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: decisions file not found (filter.spotcheck.decisions_path)")
    decisions: dict[str, tuple[bool, str]] = {}
    patterns: list[str] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("id", "approved") if c not in header]
        if missing:
            raise ConfigError(f"{path}:1: missing column(s) {', '.join(missing)}; the header has "
                              f"{', '.join(header) or 'nothing'}")
        for row in reader:
            line = reader.line_num
            pattern = (row.get("reject_pattern") or "").strip()
            if pattern:
                compile_patterns([pattern], where=f"{path}:{line}: reject_pattern")
                patterns.append(pattern)
            rid = (row.get("id") or "").strip()
            value = (row.get("approved") or "").strip().lower()
            if not value:
                continue
            if value not in _YES | _NO:
                raise ConfigError(f"{path}:{line}: approved must be yes/no (got {row.get('approved')!r})")
            if not rid:
                raise ConfigError(f"{path}:{line}: a decision without an id")
            decision = (value in _YES, (row.get("reason") or "").strip())
            if rid in decisions and decisions[rid][0] != decision[0]:
                raise ConfigError(f"{path}:{line}: id {rid!r} is both approved and rejected")
            decisions[rid] = decision
    return decisions, patterns


def apply_review(rows: list[dict[str, Any]], rejected_ids: dict[str, str], patterns: list[str]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Remove rows the reviewer rejected and every row whose answer matches a rejection pattern.

    Args:
        rows: the rows under review (the whole dataset after the automatic stages).
        rejected_ids: {id: reviewer's reason} for rejected rows (every sample of that id goes).
        patterns: regexes (case-insensitive) searched in each answer.

    Raises ConfigError when a rejected id is not in `rows` (a decision for another dataset).
    """
    compiled = compile_patterns(patterns)
    known = {str(r["id"]) for r in rows}
    unknown = sorted(set(rejected_ids) - known)
    if unknown:
        raise ConfigError(f"spot-check: rejected id(s) not in the reviewed dataset: {', '.join(unknown[:5])}")
    kept, rejected = [], []
    for r in rows:
        rid = str(r["id"])
        if rid in rejected_ids:
            why = rejected_ids[rid] or "no reason given"
            rejected.append({**r, "stage": "spotcheck", "reason": f"reviewer: {why}"})
            continue
        hit = next((p for p in compiled if p.search(r.get("response") or "")), None)
        if hit is not None:
            rejected.append({**r, "stage": "spotcheck", "reason": f"reviewer pattern: {hit.pattern!r}"})
        else:
            kept.append(r)
    return kept, rejected
