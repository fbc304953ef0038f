"""AI grader: a second OpenAI-compatible endpoint scores each answer against a rubric.

Prompt building (`format_grader_input`) and reply parsing (`format_grader_output`)
are pure; `grade` sends the prompts through `distill.teacher.generate`, so grading
gets the same retries, rate limits, budget and request cache as generation (a
graded answer is never paid for twice).
"""

from __future__ import annotations

import json
import re
from typing import Any

from distill.config import GenerationConfig, GraderConfig, TeacherConfig
from distill.teacher.generation import generate

_JSON_OBJECT = re.compile(r"\{.*?\}", re.S)
_SCORE_TEXT = re.compile(r"score\W{0,3}\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*\d+)?", re.I)
_FRACTION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*\d+")


def format_grader_input(row: dict[str, Any], rubric: str) -> list[dict[str, str]]:
    """The grading chat for one candidate row.

    Args:
        row: a candidate row; its "messages" (the production prompt) and "response" are shown.
        rubric: grading instructions, including the reply format.
    """
    prompt = row.get("messages") or [{"role": "user", "content": row.get("text") or ""}]
    shown = "\n".join(f"[{m.get('role', 'user')}] {m.get('content', '')}" for m in prompt)
    return [
        {"role": "system", "content": rubric},
        {"role": "user", "content": f"## Task given to the model\n{shown}\n\n## The model's answer\n"
                                    f"{row.get('response') or ''}\n\nGrade the answer."},
    ]


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value) or re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*", value)
        return float(m.group(1)) if m else None
    return None


def format_grader_output(text: str | None) -> tuple[float, str] | None:
    """(score, reason) from a grader reply, or None when no score can be read.

    Accepts a JSON object {"score": ..., "reason": ...} (also inside a ``` fence or surrounded by
    prose; "rationale"/"explanation" also name the reason), else a "Score: 4/5 - because ..." line.
    """
    if not text or not text.strip():
        return None
    candidates = [text.strip()] + _JSON_OBJECT.findall(text)
    for blob in candidates:
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "score" in obj:
            score = _score(obj["score"])
            if score is None:
                return None
            reason = next((obj[k] for k in ("reason", "rationale", "explanation") if isinstance(obj.get(k), str)), "")
            return score, reason.strip()
    m = _SCORE_TEXT.search(text)
    if m:
        rest = text[m.end():].strip(" \t\n.-:;,)")
        return float(m.group(1)), rest[:200]
    return None


def grade(rows: list[dict[str, Any]], config: GraderConfig, teacher: TeacherConfig,
          generation: GenerationConfig, api_key: str | None = None) -> tuple[list[dict], list[dict], dict]:
    """Score every row; drop those below `config.min_score` with the grader's reason.

    Args:
        rows: candidate rows.
        config: grader section; `endpoint` unset means the teacher's endpoint.
        teacher: the teacher endpoint (used when config.endpoint is unset).
        generation: client settings (concurrency, retries, limits, cache); sampling is overridden to
            deterministic, one sample, no logprobs, config.max_tokens.
        api_key: the grader endpoint's key (None: its api_key_env variable, else no header).

    Returns (kept, rejected, summary). Kept rows gain "grade" {"score", "reason"}; rows scoring less
    than one point above the threshold are marked near it. A failed or unreadable grading is
    dropped or kept per `config.on_failure`. `summary` is the generation summary of the grading calls.
    """

    endpoint = config.endpoint or teacher
    settings = generation.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1, "logprobs": False,
                                             "top_logprobs": 0, "max_tokens": config.max_tokens,
                                             "extra_params": {}})  # the teacher's label schema is not the grader's
    # Rows of several samples share an id; the grading request id must be unique per row.
    requests = [{"id": f"{r['id']}#{r.get('sample', 0)}", "messages": format_grader_input(r, config.rubric)}
                for r in rows]
    if not requests:
        return [], [], {}
    result = generate(requests, endpoint, settings, api_key=api_key, purpose="grader")
    by_id = {rec["id"]: rec for rec in result.records}
    kept, rejected = [], []
    for row, req in zip(rows, requests):
        rec = by_id.get(req["id"]) or {}
        parsed = format_grader_output(rec.get("response")) if rec.get("status") == "done" else None
        if parsed is None:
            why = rec.get("error") if rec.get("status") != "done" else "unreadable grader reply"
            if config.on_failure == "keep":
                kept.append({**row, "grade": None})
            else:
                rejected.append({**row, "stage": "grader", "reason": f"grader failed: {why}"})
            continue
        score, reason = parsed
        graded = {**row, "grade": {"score": score, "reason": reason}}
        if score < config.min_score:
            rejected.append({**graded, "stage": "grader",
                             "reason": f"grader: score {score:g} < {config.min_score:g}: {reason[:160]}"})
        else:
            if score < config.min_score + 1:
                graded["near_threshold"] = [*(row.get("near_threshold") or []), "grader"]
            kept.append(graded)
    return kept, rejected, result.summary
