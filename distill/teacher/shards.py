"""Teacher generation over shards: a prompts file of any size, answered with memory bounded by one shard.

`split_prompts` streams the prompts file once, checks every row (errors name the file and
line, before any call is paid) and writes it as shard files of `shard_rows` prompts into the
output directory; `answer_shard` answers one shard with `distill.teacher.generate` and writes
its records. Shards are independent, so they can be answered by several workers at once
(the `generate-dataset` flow maps them over Prefect tasks).

Files, all written atomically (temporary name, fsync, rename), so a crash leaves every file
whole or absent:

    <out>/split.json                 the input's size, mtime and shard_rows; written last by the split
    <out>/prompts-000000.jsonl       one shard's prompt rows ({"id", "messages"})
    <out>/records-000000.jsonl       its teacher records, in prompt order
    <out>/records-000000.json        its generation summary; a shard is finished when this exists and
                                     counts no failed row

Resuming: a finished shard is skipped; any other shard is answered again, and every answer
bought before the interruption comes from the request cache, so nothing is paid twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from distill.config import ConfigError, GenerationConfig, TeacherConfig
from distill.data import JSON_SUFFIXES, iter_jsonl, prompt_prefix, read_table, write_chunks, write_jsonl, write_text
from distill.teacher.generation import generate, prompt_row

SPLIT = "split.json"


def prompts_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"prompts-{index:06d}.jsonl"


def records_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"records-{index:06d}.jsonl"


def summary_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"records-{index:06d}.json"


def _rows(path: Path, task: Any) -> Iterator[dict]:
    """Raw rows of the prompts file: JSONL streamed line by line; CSV read whole (its quoting can span lines)."""
    options = {} if task is None else {"encoding": task.encoding, "max_field_chars": task.max_field_chars}
    if path.suffix.lower() in JSON_SUFFIXES:
        yield from iter_jsonl(path, required=["id"], **options)
    else:
        yield from read_table(path, required=["id"], **options)


def _input_stamp(path: Path, shard_rows: int) -> dict:
    st = path.stat()
    return {"input": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "shard_rows": shard_rows}


def split_prompts(path: str | Path, out_dir: str | Path, shard_rows: int, task: Any = None) -> dict:
    """Check every prompt row and write them as shards; reuse an earlier complete split of the same input.

    Args:
        path: CSV/JSONL prompts: `id` plus `messages` or the task's input fields.
        out_dir: the output directory (created).
        shard_rows: prompts per shard.
        task: the task section, which renders rows without `messages`; None: every row needs them.

    Returns:
        {"shards": number of shards, "rows": prompts, "reused": whether an earlier split was kept}.

    Raises ConfigError naming file and line for a bad or duplicate row, and for an output directory
    that holds the split of another input; nothing is written then.
    """
    path, out_dir = Path(path), Path(out_dir)
    if not path.exists():
        raise ConfigError(f"{path}: file not found (--input)")
    stamp = _input_stamp(path, shard_rows)
    done = out_dir / SPLIT
    if done.exists():
        earlier = json.loads(done.read_text())
        if {k: earlier.get(k) for k in stamp} != stamp:
            raise ConfigError(f"{out_dir}: holds the shards of {earlier.get('input')} "
                              f"({earlier.get('bytes')} bytes, shard_rows {earlier.get('shard_rows')}), not of "
                              f"this input; choose another output directory")
        return {"shards": earlier["shards"], "rows": earlier["rows"], "reused": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".split-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    prefix = functools.cache(lambda: prompt_prefix(task))
    # 8 bytes of each id's hash and its line: a duplicate is named at its second line, in bounded memory.
    seen: dict[int, int] = {}
    shards = rows = 0
    try:
        batch: list[dict] = []
        for raw in _rows(path, task):
            row = prompt_row(raw, path, task, prefix)
            h = int.from_bytes(hashlib.blake2b(row["id"].encode(), digest_size=8).digest(), "big")
            if h in seen:
                raise ConfigError(f"{path}:{row['_line']}: duplicate id {row['id']!r} (first at line {seen[h]})")
            seen[h] = row["_line"]
            batch.append({"id": row["id"], "messages": row["messages"]})
            if len(batch) == shard_rows:
                write_jsonl(prompts_path(tmp, shards), batch)
                shards, rows, batch = shards + 1, rows + len(batch), []
        if batch:
            write_jsonl(prompts_path(tmp, shards), batch)
            shards, rows = shards + 1, rows + len(batch)
        if not rows:
            raise ConfigError(f"{path}: no rows")
        for i in range(shards):
            os.replace(prompts_path(tmp, i), prompts_path(out_dir, i))
        write_text(done, json.dumps({**stamp, "shards": shards, "rows": rows}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shards": shards, "rows": rows, "reused": False}


def finished(out_dir: str | Path, index: int) -> dict | None:
    """The summary of a finished shard (answered, no failed row), else None."""
    p = summary_path(Path(out_dir), index)
    if not p.exists():
        return None
    summary = json.loads(p.read_text())
    return summary if summary.get("failed") == 0 and records_path(Path(out_dir), index).exists() else None


def answer_shard(out_dir: str | Path, index: int, teacher: TeacherConfig, generation: GenerationConfig,
                 api_key: str | None = None, labels: list[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Answer shard `index` of `out_dir` unless it is finished; its summary, plus "shard" and "skipped".

    The records go to records-<index>.jsonl, then the summary beside them: a shard killed
    between the two is answered again, all of it from the request cache. A record leaves out
    its request's messages: the prompt shard beside it holds them under the same id, and at a
    77-label system prompt they would be most of the file's bytes a second time.
    """
    out_dir = Path(out_dir)
    earlier = finished(out_dir, index)
    if earlier is not None:
        return {**earlier, "shard": index, "skipped": True}
    for target in (records_path(out_dir, index), summary_path(out_dir, index)):
        # A write cut short by a kill leaves its temporary file (write_chunks' naming); nobody else writes
        # this shard now, so what is there is garbage of an earlier attempt.
        for stale in out_dir.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    rows = list(iter_jsonl(prompts_path(out_dir, index), max_field_chars=None))
    result = generate(rows, teacher, generation, api_key=api_key, progress=progress, labels=labels)
    write_jsonl(records_path(out_dir, index), ({k: v for k, v in r.items() if k != "messages"}
                                               for r in result.records))
    write_chunks(summary_path(out_dir, index), [json.dumps(result.summary).encode()])
    return {**result.summary, "shard": index, "skipped": False}


def iter_records(out_dir: str | Path, index: int) -> Iterator[dict]:
    """The teacher records of one answered shard, streamed."""
    yield from iter_jsonl(records_path(Path(out_dir), index), max_field_chars=None)


def iter_prompts(out_dir: str | Path, index: int) -> Iterator[dict]:
    """The prompt rows of one shard, streamed."""
    yield from iter_jsonl(prompts_path(Path(out_dir), index), max_field_chars=None)
