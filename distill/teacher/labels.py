"""The label set as the teacher sees it, and its answers mapped back to labels.

A hosted chat model knows nothing of the task but the prompt. So the label set
(with optional descriptions, from a JSON object `label -> description` in
`task.labels_path`) goes into the prompt: where `{labels}` appears in
`task.system_prompt` or `task.prompt_template`, or as an appendix to the system
prompt when neither names it.

The model then answers as a person would write: "Card arrival.", "Intent:
card_arrival", `{"label": "card_arrival"}`, "'card arrival'". `map_answer`
undoes what a person would undo (case, whitespace, quotes, fences, trailing
punctuation, a leading "Intent:"/"Label:"/"Answer:", spaces for underscores, a
JSON object) and nothing more: an answer that still names no label maps to None
and is rejected with its text, never guessed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from distill.config import ConfigError, TaskConfig

_PREFIX = re.compile(r"^(?:the\s+)?(?:intent|label|category|class|answer|classification)(?:\s+is)?\s*[:=\-]\s*",
                     re.I)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.S)
_EDGE = " \t\r\n\"'`*.,;:!?()[]<>"


def label_descriptions(task: TaskConfig) -> dict[str, str]:
    """{label: description} when `task.labels_path` is a JSON object, else {} (a plain list has none)."""
    if task.labels or task.labels_path is None or not Path(task.labels_path).exists():
        return {}
    try:
        data = json.loads(Path(task.labels_path).read_text())
    except json.JSONDecodeError:
        return {}  # label_set() reports the file and line
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str) and v.strip()}


def label_block(labels: list[str], descriptions: dict[str, str] | None = None) -> str:
    """The label list as the prompt shows it: one label a line, with its description when there is one."""
    descriptions = descriptions or {}
    return "\n".join(f"- {l}: {descriptions[l]}" if l in descriptions else f"- {l}" for l in labels)


def names_labels(task: TaskConfig) -> bool:
    """True when the system prompt or the user template places the label list itself."""
    return "{labels}" in task.system_prompt or "{labels}" in task.prompt_template


def system_prompt_with_labels(task: TaskConfig, block: str) -> str:
    """The system prompt with `{labels}` filled, or with the label list appended when no placeholder names it."""
    if "{labels}" in task.system_prompt:
        return task.system_prompt.replace("{labels}", block)
    if "{labels}" in task.prompt_template:
        return task.system_prompt
    appendix = "Answer with exactly one of these labels:\n" + block
    return f"{task.system_prompt.rstrip()}\n\n{appendix}" if task.system_prompt.strip() else appendix


def few_shot_rows(rows: list[dict[str, Any]], k: int, seed: int = 0) -> list[dict[str, Any]]:
    """k labelled rows for few-shot examples, a fixed hash-ordered draw spread over distinct labels.

    Args:
        rows: task rows of the *training* split ({"id", "text", "gold", ...}); the test split never reaches here.
        k: how many examples (0: none).
        seed: changes the draw.
    """
    if k <= 0:
        return []
    labelled = [r for r in rows if r.get("gold")]
    order = sorted(labelled, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    picked, labels_seen = [], set()
    for r in order:  # first pass: one example per label, so k examples show k different answers
        if r["gold"] not in labels_seen:
            picked.append(r)
            labels_seen.add(r["gold"])
        if len(picked) == k:
            return picked
    rest = [r for r in order if r not in picked]
    return picked + rest[:k - len(picked)]


def few_shot_messages(examples: list[dict[str, Any]], task: TaskConfig) -> list[dict[str, str]]:
    """The examples as user/assistant turns, rendered through the same user template as the real input."""
    out = []
    for r in examples:
        fields = {**(r.get("input") or {}), task.text_field: r["text"]}
        try:
            user = task.prompt_template.replace("{labels}", "").format(**fields)
        except KeyError as e:
            raise ConfigError(f"task.prompt_template: placeholder {e} is not a column of the few-shot row") from None
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": r["gold"]}]
    return out


def _key(text: str) -> str:
    """Case, spaces, hyphens and underscores folded; the form two spellings of one label share."""
    return re.sub(r"[\s_\-]+", "_", text.strip().lower())


def _json_label(text: str, label_key: str) -> str | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, dict):
        value = obj.get(label_key, obj.get("label", obj.get("intent")))
        return value if isinstance(value, str) else None
    return obj if isinstance(obj, str) else None


@functools.lru_cache(maxsize=16)
def _indexes(labels: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """Folded label -> label, as written and without its edge punctuation; built once per label set
    (a million answers against 77 labels folded them 77 million times)."""
    return {_key(l): l for l in labels}, {_key(l.strip(_EDGE)): l for l in labels}


def map_answer(text: str | None, labels: list[str], label_key: str = "label") -> str | None:
    """The label an answer names, read as a person would read it (see module doc), or None."""
    if not isinstance(text, str) or not labels:
        return None
    index, bare = _indexes(tuple(labels))
    s = text.strip()
    fence = _FENCE.match(s)
    if fence:
        s = fence.group(1).strip()
    if s.startswith(("{", '"')):
        value = _json_label(s, label_key)
        if value is not None:
            s = value
    for _ in range(3):  # "Intent: 'card_arrival'." takes a prefix and then edges off
        if _key(s) in index:  # before each strip: a label may itself end in "?" or a quote
            return index[_key(s)]
        s = _PREFIX.sub("", s.strip(_EDGE)).strip(_EDGE)
    return index.get(_key(s)) or bare.get(_key(s))  # bare: "reverted_card_payment?" answered without its "?"


def label_span(text: str, label: str, label_key: str = "label") -> int | None:
    """Character offset in `text` where the answer spells `label` (the label's value in a JSON answer), or None.

    Offsets are those of `text` itself, so they line up with the answer's tokens.
    """
    folded = re.sub(r"[\s\-]", "_", text.lower())
    target = _key(label)
    key_at = re.search(r'"' + re.escape(label_key) + r'"\s*:\s*"', text)
    start = key_at.end() if key_at else 0
    at = folded.find(target, start)
    if at < 0 and start:
        at = folded.find(target)
    return at if at >= 0 else None
