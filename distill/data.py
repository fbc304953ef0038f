"""Reading task data and writing artifacts, with errors that name the file and line.

Row shapes passed between stages (plain dicts, JSON-serialisable):

- task row (`load_task_rows`): {"id", "text" (the input text), "gold" (label/answer or None),
  "input" (all columns), "messages" (the production chat), "_line" (source line)}
- teacher record (`distill.teacher`): {"id", "sample" (0..n-1), "status": "done"|"failed",
  "error" (reason or None), "response" (the teacher's answer text), "finish_reason", "truncated" (bool),
  "logprobs" (OpenAI `choices[0].logprobs.content` list or None), "usage" ({"prompt_tokens",
  "completion_tokens"}), "cost_usd", "latency_s", "attempts", "cached" (bool), "model", "messages",
  "params" (sampling params sent)}
- candidate row (`distill.filter.rows.build_candidates`): a task row joined with one teacher record: {"id", "sample",
  "text", "gold", "messages", "response", "finish_reason", "truncated", "logprobs", "label" (the
  answer's label for classification, else None), "soft_labels" ({label: prob} or None), "entropy"}
- training row (`distill.filter.mix.mix_dataset`): {"id", "text", "messages", "target" (label or
  completion), "soft_labels" ({label: prob} or None), "source": "teacher"|"real", "weight" (float),
  "split": "train"|"validation"}
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from distill.config import ConfigError, TaskConfig
from distill.teacher.labels import (
    few_shot_messages,
    few_shot_rows,
    label_block,
    label_descriptions,
    system_prompt_with_labels,
)


def read_table(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of a CSV or JSONL file, each with `_line`, the 1-based line it came from.

    Raises ConfigError naming the file (and line) when the file is missing, empty,
    malformed, or lacks a required column.
    """
    path = Path(path)
    required = [r for r in required if r]
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{path}:{i}: expected a JSON object per line")
                missing = [r for r in required if r not in row]
                if missing:
                    raise ConfigError(f"{path}:{i}: missing field(s) {', '.join(missing)}")
                row["_line"] = i
                rows.append(row)
    else:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [r for r in required if r not in header]
            if missing:
                raise ConfigError(
                    f"{path}:1: missing column(s) {', '.join(missing)}; the header has {', '.join(header) or 'nothing'}"
                )
            for row in reader:
                if None in row:
                    raise ConfigError(f"{path}:{reader.line_num}: more fields than the header names")
                row["_line"] = reader.line_num
                rows.append(dict(row))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def render_messages(task: TaskConfig, row: dict[str, Any], where: str = "",
                    prefix: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """The production chat for one input: system prompt (with the label list), few-shot turns, the user template.

    Args:
        task: the task section.
        row: the input's columns.
        where: "file:line: " for errors.
        prefix: `prompt_prefix(task)` computed once by a caller rendering many rows; None computes it here.
    """
    if prefix is None:
        prefix = prompt_prefix(task)
    fields = {k: v for k, v in row.items() if not k.startswith("_")}
    if "{labels}" in task.prompt_template and task.kind == "classification":
        fields.setdefault("labels", label_block(task.label_set(), label_descriptions(task)))
    try:
        user = task.prompt_template.format(**fields)
    except KeyError as e:
        raise ConfigError(f"{where}task.prompt_template: placeholder {e} is not a column of the input") from None
    return [*prefix, {"role": "user", "content": user}]


def prompt_prefix(task: TaskConfig) -> list[dict[str, str]]:
    """What precedes every input: the system prompt (classification: with the label list, see
    distill/teacher/labels.py) and the few-shot turns drawn from the training split."""
    system = task.system_prompt
    shots: list[dict[str, str]] = []
    if task.kind == "classification":
        system = system_prompt_with_labels(task, label_block(task.label_set(), label_descriptions(task)))
        if task.few_shot:
            shots = few_shot_messages(few_shot_rows(load_task_rows(task.model_copy(update={"few_shot": 0})),
                                                    task.few_shot), task)
    return ([{"role": "system", "content": system}] if system else []) + shots


def few_shot_ids(task: TaskConfig) -> list[str]:
    """Ids of the training rows shown as few-shot examples (for the manifest); [] when few_shot is 0."""
    if task.kind != "classification" or not task.few_shot:
        return []
    return [r["id"] for r in few_shot_rows(load_task_rows(task.model_copy(update={"few_shot": 0})), task.few_shot)]


def load_task_rows(task: TaskConfig, split: str = "train") -> list[dict[str, Any]]:
    """Task rows for `split` ("train" or "test"), validated against the label set.

    Every problem is reported before any teacher call: missing file, missing
    columns, empty file, empty text, or a gold label outside the label set.
    """
    path = task.train_path if split == "train" else task.test_path
    if path is None:
        raise ConfigError(f"task.{split}_path: not set")
    need_label = split == "test" and task.label_field
    required = [task.text_field] + ([task.label_field] if need_label else [])
    raw = read_table(path, required)
    limit = task.max_rows if split == "train" else task.max_test_rows
    if limit and len(raw) > limit:
        # An evenly spaced slice, not the head: data files are often sorted (BANKING77 is, by
        # label), and the first N rows would cover a handful of labels.
        step = len(raw) / limit
        raw = [raw[int(i * step)] for i in range(limit)]
    labels = set(task.label_set()) if task.kind == "classification" else None
    prefix = prompt_prefix(task)
    out = []
    for row in raw:
        line = row["_line"]
        text = row.get(task.text_field)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}:{line}: empty {task.text_field!r}")
        gold = row.get(task.label_field) if task.label_field else None
        if gold == "":
            gold = None
        if labels is not None and gold is not None and gold not in labels:
            raise ConfigError(f"{path}:{line}: label {gold!r} is not in the task's label set")
        if need_label and gold is None:
            raise ConfigError(f"{path}:{line}: empty {task.label_field!r} in the gold holdout")
        rid = str(row.get("id") or f"{split}-{line}")
        out.append({
            "id": rid,
            "text": text,
            "gold": gold,
            "input": {k: v for k, v in row.items() if not k.startswith("_")},
            "messages": render_messages(task, row, where=f"{path}:{line}: ", prefix=prefix),
            "_line": line,
        })
    check_unique_ids(path, out)
    return out


def check_unique_ids(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Raise ConfigError at the second row (by `_line`) that repeats an `id`."""
    seen: dict[Any, int] = {}
    for r in rows:
        if r["id"] in seen:
            raise ConfigError(f"{path}:{r['_line']}: duplicate id {r['id']!r} (first at line {seen[r['id']]})")
        seen[r["id"]] = r["_line"]


def write_chunks(path: str | Path, chunks: Iterable[bytes]) -> dict[str, Any]:
    """Write byte chunks atomically and return {"sha256", "bytes"} of what was written.

    The one writer behind every artifact: a temporary file beside `path`, fsync, then rename,
    so a crash leaves the old file or none, never half of the new one.
    """
    import hashlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"sha256": h.hexdigest(), "bytes": size}


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows atomically (see write_chunks)."""
    write_chunks(path, ((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows))
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Atomic text write (see write_chunks)."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, content: bytes) -> Path:
    """Atomic binary write (see write_chunks), for bytes that must round-trip exactly."""
    write_chunks(path, (content,))
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL artifact written by distill (errors name file and line)."""
    path = Path(path)
    if path.exists() and path.stat().st_size == 0:
        return []
    rows = read_table(path)
    for r in rows:
        r.pop("_line", None)
    return rows
