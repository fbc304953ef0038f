"""Exact label distributions from an endpoint that scores given text (`generation.soft_labels: score`).

The trie reading (distill.teacher.soft_labels) sees only the top_logprobs the
answer happened to pass through. Where the endpoint can score a text it is given,
every label is scored instead: the teacher's own answer, with its label cut out,
is the frame (`{"label": "`...`"}`, `Intent: `..., a rationale before the label),
each label is put into that frame, and the label's score is the sum of the
logprobs of the tokens from where the label starts to the end of the answer (the
closing frame included, so a label that is a prefix of another is not confused
with it). The frame before the label is the same for every label and cancels; the
distribution is the normalised product of each label's token probabilities.

Two ways to ask (`generation.score_api`):

- `prompt_logprobs` (vLLM chat completions): the chat plus an assistant turn holding
  the framed label, with `continue_final_message: true`, `add_generation_prompt:
  false`, `prompt_logprobs: 0`, `max_tokens: 1`. The server applies the model's chat
  template, so the label is scored after exactly the prompt the answer was given.
  One request per label.
- `echo` (the completions API): `prompt` is a list of L texts (the chat rendered as
  "Role: content" paragraphs, then "Assistant: " and the framed label), with `echo:
  true`, `logprobs: 1`, `max_tokens: 1`; `text_offset` locates the label's tokens.
  One request per row.

Every scoring response goes through the request cache before it is used (a rerun
sends nothing already scored) and is charged to the run's ledger as "score" (or
"<purpose>-score"). A row whose scoring fails keeps the answer's own reading.
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Any, Callable

from distill.config import ConfigError, GenerationConfig, TeacherConfig
from distill.teacher.client import Job, estimate_tokens, legacy_cache_key, make_record, price, request_key
from distill.teacher.generation import GenerationResult, run_jobs
from distill.teacher.labels import label_span, map_answer

SCORE_MAX_TOKENS = 1  # the servers generate at least one token; only the echoed prompt is read


def answer_frame(response: str | None, labels: list[str], label_key: str = "label") -> tuple[str, str]:
    """(before, after): the teacher's answer around its label, or ("", "") when the label is not spelled verbatim."""
    answer = map_answer(response, labels, label_key)
    if answer and isinstance(response, str):
        at = label_span(response, answer, label_key)
        if at is not None and response[at:at + len(answer)] == answer:
            return response[:at], response[at + len(answer):]
    return "", ""


def chat_text(messages: list[dict]) -> str:
    """The chat as plain text for the completions API (echo): "Role: content" paragraphs, then "Assistant: "."""
    return "".join(f"{m['role'].capitalize()}: {m.get('content') or ''}\n\n" for m in messages) + "Assistant: "


def parse_prompt_logprobs(body: bytes | dict, tail: int = 0) -> tuple[dict | None, str | None, bool]:
    """(fields, error, retryable) from a vLLM chat completion with `prompt_logprobs`.

    Keeps the prompt tokens that cover its last `tail` characters (the framed label; all when 0): the
    part that is read, so the cache holds a few tokens per label, not the whole prompt.
    """
    try:
        data = json.loads(body) if isinstance(body, (bytes, str)) else body
        tokens: list[list] = []
        covered = 0
        for entry in reversed(data["prompt_logprobs"]):
            if entry is None or (tail and covered >= tail):
                break  # the first prompt token has no logprob
            # prompt_logprobs 0 gives the prompt's own token alone; were there more, it is the one ranked last
            own = max(entry.values(), key=lambda v: v.get("rank") or 0)
            tokens.insert(0, [str(own.get("decoded_token") or ""), float(own["logprob"])])
            covered += len(tokens[0][0])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None, "malformed: no prompt_logprobs in the response (does the endpoint score prompts?)", False
    return _fields(data, [tokens]), None, True


def parse_echo(body: bytes | dict, start: int = 0) -> tuple[dict | None, str | None, bool]:
    """(fields, error, retryable) from a completions response with `echo`: each prompt's tokens and offsets.

    Keeps the tokens that reach past character `start` (where the labels' frame begins): the part that
    is read, so the cache holds the answers' tokens, not L copies of the prompt.
    """
    try:
        data = json.loads(body) if isinstance(body, (bytes, str)) else body
        choices = sorted(data["choices"], key=lambda c: int(c.get("index") or 0))
        seqs = []
        for c in choices:
            lp = c["logprobs"]
            seqs.append([[t, lp["text_offset"][i], lp["token_logprobs"][i]] for i, t in enumerate(lp["tokens"])
                         if lp["text_offset"][i] + len(t) > start])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None, "malformed: no echoed logprobs in the response (does the endpoint echo prompts?)", False
    return _fields(data, seqs), None, True


def _fields(data: dict, seqs: list) -> dict:
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return {"response": "", "scores": seqs, "finish_reason": "stop", "truncated": False, "logprobs": None,
            "model": data.get("model"),
            "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "completion_tokens": int(usage.get("completion_tokens") or 0)}}


def tail_logprob(tokens: list[list], tail: int) -> float | None:
    """Sum of the logprobs of the last tokens that cover the last `tail` characters (prompt_logprobs)."""
    covered, total = 0, 0.0
    for text, logprob in reversed(tokens):
        if covered >= tail:
            return total
        covered += len(text)
        total += logprob
    return total if covered >= tail else None


def span_logprob(tokens: list[list], start: int, end: int) -> float | None:
    """Sum of the logprobs of the echoed tokens overlapping characters [start, end) (echo)."""
    picked = []
    for text, at, lp in reversed(tokens):  # the span is at the end: stop once a token ends before it
        if at + len(text) <= start:
            break
        if at < end:
            picked.append(lp)
    if not picked or any(lp is None for lp in picked):
        return None
    return float(sum(picked))


def score_jobs(records: list[dict], labels: list[str], teacher: TeacherConfig, generation: GenerationConfig,
               label_key: str = "label") -> tuple[list[dict], list[Job], list[tuple[int, list[int]]]]:
    """(score records, jobs, per answer record: (its index, the score-record slot of each label))."""
    out: list[dict] = []
    jobs: dict[str, Job] = {}
    plan: list[tuple[int, list[int]]] = []
    echo = generation.score_api == "echo"
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": SCORE_MAX_TOKENS}
    params.update({"echo": True, "logprobs": 1} if echo else
                  {"prompt_logprobs": 0, "add_generation_prompt": False, "continue_final_message": True})

    def add(rec: dict, messages: list[dict], body: dict, parse: Callable, path: str) -> int:
        key = request_key(teacher, generation, messages, params, 0, route=path)
        if key not in jobs:
            est = estimate_tokens(messages)  # an echo request's messages already hold all L texts
            jobs[key] = Job(key, messages, 0, json.dumps(body).encode(), est, path=path, parse=parse,
                            max_out=SCORE_MAX_TOKENS * (len(labels) if echo else 1), legacy_key=(
                                lambda m=messages: legacy_cache_key(teacher.base_url + path, teacher.model, m,
                                                                    params, 0)))
        jobs[key].slots.append(len(out))
        out.append(make_record(rec["id"], rec.get("sample", 0), messages, params, teacher.model,
                               error="not requested"))
        return len(out) - 1

    for i, rec in enumerate(records):
        if rec.get("status") != "done":
            continue
        before, after = answer_frame(rec.get("response"), labels, label_key)
        if echo:
            texts = [chat_text(rec["messages"]) + before + l + after for l in labels]
            messages = [{"role": "prompt", "content": t} for t in texts]  # the cache key's input
            body = {"model": teacher.model, "prompt": texts, **params}
            start = len(chat_text(rec["messages"]) + before)
            slot = add(rec, messages, body, partial(parse_echo, start=start), "/completions")
            plan.append((i, [slot] * len(labels)))
            continue
        slots = []
        for l in labels:
            messages = [*rec["messages"], {"role": "assistant", "content": before + l + after}]
            body = {"model": teacher.model, "messages": messages, **params}
            slots.append(add(rec, messages, body, partial(parse_prompt_logprobs, tail=len(l + after)),
                             "/chat/completions"))
        plan.append((i, slots))
    return out, list(jobs.values()), plan


def distribution(records: list[dict], index: int, slots: list[int], labels: list[str], score_records: list[dict],
                 echo: bool, label_key: str = "label") -> dict[str, float] | None:
    """The normalised product of each label's token probabilities for one answer, or None if any score failed."""
    before, after = answer_frame(records[index].get("response"), labels, label_key)
    scores = []
    for n, (label, slot) in enumerate(zip(labels, slots)):
        rec = score_records[slot]
        if rec["status"] != "done":
            return None
        if echo:
            start = len(chat_text(records[index]["messages"]) + before)
            s = span_logprob(rec["scores"][n], start, start + len(label + after))
        else:
            s = tail_logprob(rec["scores"][0], len(label + after))
        if s is None:
            return None
        scores.append(s)
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return {l: w / total for l, w in zip(labels, weights)}


def score_labels(records: list[dict], labels: list[str], teacher: TeacherConfig, generation: GenerationConfig,
                 api_key: str | None = None, purpose: str = "score",
                 label_key: str = "label") -> tuple[list[dict], dict]:
    """(records, summary): each done answer gets "label_scores", its exact distribution over `labels`.

    Args:
        records: teacher records of one generation (done or failed); failed ones are left alone.
        labels: the label set.
        teacher: the endpoint (the same one that answered).
        generation: limits, retries, budget, ledger and cache; score_api picks the request shape.
        api_key: the teacher's key.
        purpose: what the spend is charged as in the run's ledger.
        label_key: the JSON field that holds the label in a structured answer.

    Scoring requests are sent online (no Batch API) with the run's cache, budget and ledger.
    """
    settings = generation.model_copy(update={"mode": "online"})
    score_records, jobs, plan = score_jobs(records, labels, teacher, settings, label_key)
    if not jobs:
        return records, {}
    result: GenerationResult = run_jobs(score_records, jobs, teacher, settings, api_key, purpose=purpose)
    echo = generation.score_api == "echo"
    out = list(records)
    for i, slots in plan:
        dist = distribution(records, i, slots, labels, result.records, echo, label_key)
        if dist is not None:
            out[i] = {**records[i], "label_scores": dist}
    summary = dict(result.summary)
    summary["scored"] = sum(1 for i, _ in plan if "label_scores" in out[i])
    return out, summary


def probe_scoring(teacher: TeacherConfig, generation: GenerationConfig, labels: list[str], messages: list[dict],
                  api_key: str | None, ledger: Any) -> None:
    """One scoring request of two labels before the run pays for answers; charged as "probe".

    Raises ConfigError naming generation.score_api when the endpoint does not score given text
    (an OpenAI-hosted model answers 400 to prompt_logprobs, or ignores it), so a run in score mode
    fails before its first batch instead of after it.
    """
    from distill.teacher.structured import post_chat

    rec = make_record("probe", 0, messages, {}, teacher.model, status="done", response=labels[0])
    _, jobs, _ = score_jobs([rec], labels[:2], teacher, generation)
    job = jobs[0]
    status, raw, error = post_chat(teacher, json.loads(job.body), api_key, path=job.path)
    if error is not None:
        raise ConfigError(f"teacher.base_url: {teacher.base_url} does not answer ({error}); nothing was sent to it")
    fields = job.parse(raw)[0] if status == 200 else None
    if ledger is not None:
        usage = (fields or {}).get("usage") or {}
        ledger.charge("probe", price(teacher, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)), 1)
    if fields is None or not fields["scores"] or not fields["scores"][0]:
        raise ConfigError(f"generation.score_api: {teacher.base_url}{job.path} does not score given text with "
                          f"{generation.score_api} (HTTP {status}); use generation.soft_labels trie, or the other "
                          "score_api; nothing else was sent")


def estimate_score_cost(rows: list[dict], labels: list[str], generation: GenerationConfig) -> dict[str, int]:
    """Scoring requests and prompt tokens for `rows` (the answer frame estimated by max_tokens), no call."""
    echo = generation.score_api == "echo"
    requests = len(rows) * generation.samples_per_prompt * (1 if echo else len(labels))
    per_label = sum(estimate_tokens(r["messages"]) + generation.max_tokens for r in rows)
    return {"requests": requests, "prompt_tokens": per_label * len(labels) * generation.samples_per_prompt,
            "completion_tokens_max": SCORE_MAX_TOKENS * len(rows) * len(labels) * generation.samples_per_prompt}
