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
  answer's label for classification, else None), "soft_labels" ({label: prob} or None), "entropy",
  "source": "teacher"|"traffic" (the task row's provenance)}
- training row (`distill.filter.mix.mix_dataset`): {"id", "text", "messages", "target" (label or
  completion), "soft_labels" ({label: prob} or None), "source": "teacher"|"traffic"|"real", "weight" (float),
  "split": "train"|"validation"}
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from distill.config import ConfigError, TaskConfig
from distill.teacher.labels import (
    few_shot_messages,
    few_shot_rows,
    label_block,
    label_descriptions,
    system_prompt_with_labels,
)


# task.max_field_chars's default, for the callers that read a table without a task (shadow, tail, demo):
# beyond any teacher's context window (about 500k characters for 128k tokens), far below exhausting memory.
DEFAULT_MAX_FIELD_CHARS: int = TaskConfig.model_fields["max_field_chars"].default
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_table(path: str | Path, required: Iterable[str] = (), *, encoding: str = "utf-8",
               max_field_chars: int | None = DEFAULT_MAX_FIELD_CHARS) -> list[dict[str, Any]]:
    """Rows of a CSV or JSONL file, each with `_line`, the 1-based line its record starts on.

    Args:
        path: a .csv file (header row first) or a .jsonl/.ndjson/.json file (one JSON object per line).
        required: columns (fields) every row must have.
        encoding: a Python codec name, or "auto" (byte-order mark, else UTF-8, else cp1252, else latin-1).
            A leading byte-order mark is dropped whatever the encoding.
        max_field_chars: the longest field (JSON: top-level string value) accepted; None: no limit.

    Raises ConfigError naming the file (and line) when the file is missing, a directory, not in
    `encoding`, empty, malformed (an unclosed quote is reported at the line it opens on), holds an
    over-long field, or lacks a required column.
    """
    path = Path(path)
    required = [r for r in required if r]
    text = read_text(path, encoding)
    if path.suffix.lower() in JSON_SUFFIXES:
        rows = _jsonl_rows(path, text, required, max_field_chars)
    else:
        rows = _csv_rows(path, text, required, max_field_chars)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The decoded text of an input file without its byte-order mark; a bad byte is named by line and offset."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a CSV or JSONL file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    codec = _detect_encoding(data) if encoding == "auto" else encoding
    if codec.replace("_", "-").lower() in ("utf-8", "utf8") and data.startswith(codecs.BOM_UTF8):
        codec = "utf-8-sig"
    try:
        text = data.decode(codec)
    except LookupError:
        raise ConfigError(f"{path}: unknown text encoding {codec!r} (task.encoding)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(_decode_error(path, data, codec, e)) from None
    return text[1:] if text.startswith("\ufeff") else text


def _detect_encoding(data: bytes) -> str:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return codec
    for codec in ("utf-8", "cp1252"):
        try:
            data.decode(codec)
            return codec
        except UnicodeDecodeError:
            pass
    return "latin-1"  # decodes any byte


def _decode_error(path: Path, data: bytes, codec: str, e: UnicodeDecodeError) -> str:
    line_start = data.rfind(b"\n", 0, e.start) + 1
    line = data.count(b"\n", 0, e.start) + 1
    where = (f"{path}:{line}: byte 0x{data[e.start]:02x} at byte offset {e.start} (byte {e.start - line_start + 1} "
             f"of the line) is not valid {codec} ({e.reason})")
    for bom, bom_codec in _BOMS:
        if data.startswith(bom) and bom_codec != "utf-8-sig":
            return (f"{where}; the file starts with a {bom_codec.upper()} byte-order mark: "
                    f"set task.encoding: {bom_codec}")
    return f"{where}; set task.encoding to the file's encoding (e.g. cp1252 or latin-1), or to auto"


def _jsonl_row(path: Path, i: int, line: str, required: list[str], max_chars: int | None,
               first: bool) -> dict[str, Any] | None:
    """Line `i` of a JSONL file as a row with `_line`, None when blank; errors name file and line."""
    if not line.strip(" \t\r"):  # JSON's whitespace; str.strip() would also drop "\x1c" and the like
        return None
    try:
        row = json.loads(line)
    except ValueError as e:  # JSONDecodeError, and an integer literal of more than 4300 digits
        hint = ""
        if first and line.lstrip().startswith("["):
            hint = "; expected JSON Lines, one object per line, not a JSON array"
        raise ConfigError(f"{path}:{i}: invalid JSON ({getattr(e, 'msg', e)}){hint}") from None
    except RecursionError:
        raise ConfigError(f"{path}:{i}: invalid JSON (nested too deeply)") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{path}:{i}: expected a JSON object per line")
    missing = [r for r in required if r not in row]
    if missing:
        raise ConfigError(f"{path}:{i}: missing field(s) {', '.join(missing)}")
    try:
        # An escaped lone surrogate ("\\ud800") parses, but no file or request can carry it.
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{path}:{i}: invalid Unicode (an unpaired surrogate escape, {e.object[e.start]!r})"
                          ) from None
    for name, value in row.items():
        _check_field_size(path, i, name, value, max_chars)
    row["_line"] = i
    return row


def _jsonl_rows(path: Path, text: str, required: list[str], max_chars: int | None) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(text.split("\n"), 1):
        row = _jsonl_row(path, i, line, required, max_chars, first=not rows)
        if row is not None:
            rows.append(row)
    return rows


def iter_jsonl(path: str | Path, required: Iterable[str] = (), *, encoding: str = "utf-8",
               max_field_chars: int | None = DEFAULT_MAX_FIELD_CHARS) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file one at a time (read_table's checks and errors), for files too big to hold."""
    path, required = Path(path), list(required)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    first = True
    try:
        codec = "utf-8-sig" if encoding in ("auto", "utf-8") else encoding  # a leading BOM is dropped
        with path.open("r", encoding=codec, newline="\n") as f:
            for i, line in enumerate(f, 1):
                row = _jsonl_row(path, i, line.rstrip("\n"), required, max_field_chars, first)
                if row is not None:
                    first = False
                    yield row
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid {codec} text ({e.reason} at byte {e.start} of a line)") from None


def _csv_rows(path: Path, text: str, required: list[str], max_chars: int | None) -> list[dict[str, Any]]:
    # csv's own limit is process-wide and its error names no field: it is raised out of the way of ours
    # (the text is in memory already, so parsing a long field costs no more than its copy).
    if csv.field_size_limit() < 2**31 - 1:
        csv.field_size_limit(2**31 - 1)
    # strict: a quote that closes and is followed by more text is an error, not silently part of the field;
    # that is how a quote left open on one line shows up a few lines later.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ConfigError(_csv_error(path, str(e), start, reader.line_num, max_chars)) from None
        if not fields or fields == [""]:
            continue
        if header is None:
            header = _csv_header(path, start, fields, required)
            continue
        if len(fields) > len(header):
            raise ConfigError(f"{path}:{start}: more fields than the header names")
        row: dict[str, Any] = dict.fromkeys(header)
        for name, value in zip(header, fields):
            _check_field_size(path, start, name, value, max_chars)
            row[name] = value
        row["_line"] = start
        rows.append(row)
    if header is None and required:
        raise ConfigError(f"{path}:1: missing column(s) {', '.join(required)}; the header has nothing")
    return rows


def _csv_header(path: Path, line: int, fields: list[str], required: list[str]) -> list[str]:
    header = [f.strip() for f in fields]
    missing = [r for r in required if r not in header]
    if missing:
        raise ConfigError(f"{path}:{line}: missing column(s) {', '.join(missing)}; the header has "
                          f"{', '.join(header) or 'nothing'}")
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise ConfigError(f"{path}:{line}: column(s) {', '.join(map(repr, twice))} appear more than once in the header")
    return header


def _csv_error(path: Path, message: str, start: int, end: int, max_chars: int | None) -> str:
    if "field larger than field limit" in message:
        return (f"{path}:{start}: a field is longer than csv.field_size_limit() allows ({message}); "
                f"task.max_field_chars is {max_chars}")
    if "unexpected end of data" in message:
        return (f"{path}:{start}: unclosed quote: the quoted field opened on line {start} runs to the end of the "
                "file; close it, or write a quote inside a field as two quotes (\"\")")
    if end > start:
        return (f"{path}:{start}: unclosed quote: the quoted field opened on line {start} only closes on line {end}, "
                "where more text follows the closing quote; close it on its own line, or write a quote inside a "
                "field as two quotes (\"\")")
    return (f"{path}:{start}: malformed CSV ({message}): text follows a closing quote; "
            "write a quote inside a quoted field as two quotes (\"\")")


def _check_field_size(path: Path, line: int, name: str, value: Any, max_chars: int | None) -> None:
    if max_chars and isinstance(value, str) and len(value) > max_chars:
        raise ConfigError(f"{path}:{line}: field {name!r} has {len(value)} characters, more than "
                          f"task.max_field_chars ({max_chars}); raise it if inputs this long are intended")


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
    except (IndexError, AttributeError, TypeError, ValueError) as e:  # "{0}", "{text.x}", "{text[9]}", "{"
        raise ConfigError(f"{where}task.prompt_template: cannot be filled from the input ({e})") from None
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
    raw = read_table(path, required, encoding=task.encoding, max_field_chars=task.max_field_chars)
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
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"{path}:{line}: {task.text_field!r} must be a string, not {type(text).__name__}")
        if not text or not text.strip():
            raise ConfigError(f"{path}:{line}: empty {task.text_field!r}")
        gold = row.get(task.label_field) if task.label_field else None
        if gold == "":
            gold = None
        if labels is not None and gold is not None and not isinstance(gold, str):
            raise ConfigError(f"{path}:{line}: {task.label_field!r} must be a label name, not {type(gold).__name__}")
        if labels is not None and gold is not None and gold not in labels:
            raise ConfigError(f"{path}:{line}: label {gold!r} is not in the task's label set")
        if need_label and gold is None:
            raise ConfigError(f"{path}:{line}: empty {task.label_field!r} in the gold holdout")
        rid = row_id(row["id"], f"{path}:{line}") if "id" in row else f"{split}-{line}"
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


def row_id(value: Any, where: str) -> str:
    """A row's id as the non-empty string every stage keys on: 1, 1.0 and " 1 " are all "1".

    Raises ConfigError (prefixed by `where`, "file:line") for null, "", a boolean, a fraction or a
    nested value, which cannot name a row.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: id must be a non-empty string or an integer, not {json.dumps(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{where}: id must be a non-empty string or an integer, not {value!r}")
        value = int(value)
    rid = unicodedata.normalize("NFC", str(value)).strip()
    if not rid:
        raise ConfigError(f"{where}: empty id")
    return rid


def check_unique_ids(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Raise ConfigError at the second row (by `_line`) whose `id` repeats an earlier one's after normalisation
    (`row_id`: 1 and "1", "a" and " a " are the same id)."""
    seen: dict[str, tuple[int, Any]] = {}
    for r in rows:
        key = row_id(r["id"], f"{path}:{r['_line']}")
        if key in seen:
            line, first = seen[key]
            same = "" if first == r["id"] else f", written {first!r} there"
            raise ConfigError(f"{path}:{r['_line']}: duplicate id {r['id']!r} (first at line {line}{same})")
        seen[key] = (r["_line"], r["id"])


@contextmanager
def locked_beside(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `<path>.lock` for the block: processes on this host that open or
    change `path` take turns (closing the lock file releases it)."""
    import fcntl

    path = Path(path)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
    rows = read_table(path, max_field_chars=None)  # distill's own output: no limit on what it wrote
    for r in rows:
        r.pop("_line", None)
    return rows
