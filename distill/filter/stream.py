"""The per-row filter stages over answered shards (distill.teacher.shards), one shard in memory at a time.

Heuristics run row by row; exact dedup runs across all shards in shard order (the first
occurrence is kept), remembering 8 bytes per kept prompt, so ten million prompts hold about
a gigabyte at most. The stages that compare a row with the whole set (near-duplicate
clusters, the entropy percentile, the spot-check sample) need every row at once and run in
`distill run` on the mixed training set instead.

Writes kept-<shard>.jsonl and rejected-<shard>.jsonl (candidate rows, distill.data) beside
the shard's records, atomically.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from distill.config import HeuristicsConfig, TaskConfig
from distill.data import write_jsonl
from distill.filter.dedup import normalize_batch
from distill.filter.heuristics import heuristics
from distill.filter.rows import build_candidates, reject_row
from distill.teacher.shards import iter_prompts, iter_records


def _last_user(messages: list[dict]) -> str:
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


def filter_shards(out_dir: str | Path, shards: int, task: TaskConfig, config: HeuristicsConfig) -> dict[str, Any]:
    """Heuristics and cross-shard exact dedup (on the prompt's last user turn) over shards 0..shards-1.

    Returns:
        {"candidates", "kept", "rejected", "by_stage": {stage: rows rejected}}.
    """
    out_dir = Path(out_dir)
    seen: set[bytes] = set()
    totals = {"candidates": 0, "kept": 0, "rejected": 0, "by_stage": {}}
    for i in range(shards):
        task_rows = [{"id": p["id"], "messages": p["messages"], "text": _last_user(p["messages"]), "gold": None}
                     for p in iter_prompts(out_dir, i)]
        records = list(iter_records(out_dir, i))
        candidates, rejected = build_candidates(task_rows, records, task)
        totals["candidates"] += len(records)
        del task_rows, records
        passed, dropped = heuristics(candidates, config, task)
        rejected += dropped
        kept = []
        for row, norm in zip(passed, normalize_batch([r["text"] for r in passed])):
            digest = hashlib.blake2b(norm.encode(), digest_size=8).digest()
            if digest in seen:
                rejected.append(reject_row(row, "dedup", "exact duplicate of an earlier prompt"))
                continue
            seen.add(digest)
            kept.append(row)
        write_jsonl(out_dir / f"kept-{i:06d}.jsonl", kept)
        write_jsonl(out_dir / f"rejected-{i:06d}.jsonl", rejected)
        totals["kept"] += len(kept)
        totals["rejected"] += len(rejected)
        for r in rejected:
            totals["by_stage"][r.get("stage")] = totals["by_stage"].get(r.get("stage"), 0) + 1
    return totals
