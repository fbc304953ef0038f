"""The reference set of a drift watch: what production sees now, labelled by the teacher.

A random sample (seeded by the watch) of the recent logged requests, at most
`drift.label_sample` of them. The teacher's label of a sampled request is the shadow
log's teacher answer where shadow mode logged one; otherwise, when re-labelling is on,
it is bought through the cached teacher client (distill.teacher.generation.generate),
charged to the drift ledger and written back to the log, so it is never paid twice.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from distill.config import DriftConfig, GenerationConfig, TaskConfig, TeacherConfig


def labelling_sample(rows: Sequence[dict], size: int, seed: int) -> list[dict]:
    """A uniform random sample of `size` rows (all of them when fewer), in log order.

    Random, not the newest: a burst of one kind of request must not stand for the whole window.
    """
    idx = list(range(len(rows)))
    if len(idx) > size:
        idx = sorted(random.Random(seed).sample(idx, size))
    return [rows[i] for i in idx]


def served_label(row: dict) -> str | None:
    """The champion's label of a logged request (what the user got when the champion served)."""
    return row.get("champion_label") or (row.get("served_label") if row.get("served_by") == "champion" else None)


def relabel(rows: Sequence[dict], task: TaskConfig, teacher: TeacherConfig, generation: GenerationConfig,
            drift: DriftConfig, api_key: str | None) -> dict[str, Any]:
    """Buy the teacher's label for each row through the cached client, with the task's own prompt.

    The prompt is the one the training data was labelled with (system prompt with the label
    list, template, few-shot turns), so a text the cycle already asked about is a cache hit and
    the answer maps to a label. Returns {"labels": {request_id: label or None}, "summary": the
    generation summary}. New responses are persisted in the request cache before they are used.
    """
    from distill.data import prompt_prefix, render_messages
    from distill.teacher.generation import generate
    from distill.teacher.soft_labels import label_of

    if not rows:
        return {"labels": {}, "summary": {"done": 0, "cost_usd": 0.0, "failed": 0, "cached": 0}}
    labels = task.label_set()
    prefix = prompt_prefix(task)
    prompts = [{"id": r["request_id"], "messages": render_messages(task, {task.text_field: r["text"]},
                                                                   prefix=prefix)} for r in rows]
    gen = generation.model_copy(update={"ledger_path": drift.ledger_path, "budget_usd": drift.relabel_budget_usd,
                                        "samples_per_prompt": 1, "temperature": 0.0})
    result = generate(prompts, teacher, gen, api_key=api_key, purpose="drift-relabel")
    out = {}
    for rec in result.records:
        out[str(rec["id"])] = label_of(rec.get("response"), labels) if rec["status"] == "done" else None
    return {"labels": out, "summary": result.summary}


def traffic_rows(log_rows: Sequence[dict], task: TaskConfig, known_texts: set[str], cap: int) -> list[dict]:
    """Recent traffic as task rows for the training mix, with provenance `traffic`.

    Args:
        log_rows: traffic/shadow log rows, oldest first (ShadowLog.recent()).
        task: the task section; each text is rendered with the task's own prompt, so a text the
            drift watch already re-labelled (or an earlier cycle asked about) is a request-cache hit.
        known_texts: the training inputs; traffic repeating one adds nothing and is skipped.
        cap: at most this many rows, newest first.
    Returns rows shaped like distill.data.load_task_rows's ("id" = "traffic-<request id>", "gold" None:
    the teacher labels them) plus "source": "traffic" and "request_id".
    """
    from distill.data import prompt_prefix, render_messages

    prefix = prompt_prefix(task) if log_rows and cap else []
    seen = set(known_texts)
    out: list[dict] = []
    for r in reversed(log_rows):
        text = r.get("text")
        if len(out) >= cap:
            break
        if not text or not text.strip() or text in seen:
            continue
        seen.add(text)
        fields = {task.text_field: text}
        out.append({"id": f"traffic-{r.get('request_id') or r.get('id')}", "text": text, "gold": None,
                    "input": fields, "messages": render_messages(task, fields, prefix=prefix),
                    "source": "traffic", "request_id": r.get("request_id")})
    return out[::-1]
