"""Structured outputs where the endpoint has them, and the one probe request that decides.

`teacher.structured_output`:

- `json_schema`: OpenAI-style `response_format` with a strict JSON schema whose
  `label` property is an `enum` of the labels (OpenAI, vLLM, Ollama's /v1, llama.cpp
  all accept it; Ollama's /v1 hands `json_schema.schema` on as its native `format`,
  so an Ollama user gets `format` with the label enum, and `auto` picks json_schema
  there: Ollama ignores the vLLM choice fields); with `teacher.rationale`, a short `rationale` string comes first,
  so the consistency filter can check that it argues for the label it gives.
- `choice`: vLLM's guided choice (`guided_choice`, and `structured_outputs.choice`
  of newer vLLM): the answer is one label verbatim.
- `off`: the prompt alone (the label list in the system prompt).
- `auto`: one probe request per candidate, json_schema then choice, keeping the
  first whose answer is what was asked for (not merely a 200: a server that
  ignores unknown fields answers 200 in free text); else off. Every probe is
  charged to the run's ledger.

The probe doubles as the reachability check: an endpoint that does not answer
fails the run within seconds, naming its URL, before any batch of paid calls.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from distill.config import ConfigError, GenerationConfig, TeacherConfig
from distill.teacher.client import parse_completion, price, redact
from distill.teacher.labels import map_answer
from distill.teacher.ratelimit import Ledger

PROBE_TIMEOUT_S = 10.0  # an endpoint that cannot answer one short request in this long is not there


def label_schema(labels: list[str], rationale: bool = False) -> dict[str, Any]:
    """The JSON schema of a classification answer: {"rationale"?: str, "label": one of labels}."""
    props: dict[str, Any] = {}
    if rationale:
        props["rationale"] = {"type": "string", "description": "One short sentence: why this label."}
    props["label"] = {"type": "string", "enum": list(labels)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def structured_params(mode: str, labels: list[str], rationale: bool = False) -> dict[str, Any]:
    """Request body fields for a concrete structured-output mode (json_schema, choice or off)."""
    if mode == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "classification", "strict": True, "schema": label_schema(labels, rationale)}}}
    if mode == "choice":
        return {"guided_choice": list(labels), "structured_outputs": {"choice": list(labels)}}
    return {}


def post_chat(teacher: TeacherConfig, body: dict, api_key: str | None, timeout_s: float = PROBE_TIMEOUT_S,
              path: str = "/chat/completions") -> tuple[int | None, bytes, str | None]:
    """One blocking chat completion (or another POST under base_url): (status, body, transport error or None)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(teacher.base_url + path, data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=min(timeout_s, teacher.timeout_s)) as resp:
            return resp.status, resp.read(), None
    except urllib.error.HTTPError as e:
        return e.code, e.read(), None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        return None, b"", redact(f"{type(reason).__name__}: {reason}", api_key)


def probe(teacher: TeacherConfig, messages: list[dict], extra: dict[str, Any], api_key: str | None,
          ledger: Ledger | None, max_tokens: int) -> tuple[int | None, dict | None]:
    """Send one probe; charge it; (status, parsed fields or None). Raises ConfigError when unreachable."""
    body = {"model": teacher.model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens, **extra}
    for attempt in range(3):  # a 429 or 5xx is the endpoint answering: wait briefly and ask again
        status, raw, error = post_chat(teacher, body, api_key)
        if error is not None:
            raise ConfigError(f"teacher.base_url: {teacher.base_url} does not answer ({error}); "
                              "nothing was sent to it") from None
        if status not in (429, 500, 502, 503) or attempt == 2:
            break
        time.sleep(0.5 * 2 ** attempt)
    fields = parse_completion(raw)[0] if status == 200 else None
    if ledger is not None:
        usage = (fields or {}).get("usage") or {}
        ledger.charge("probe", price(teacher, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)), 1)
    if status in (401, 403):
        raise ConfigError(f"teacher.api_key_env: {teacher.base_url} refused the key (HTTP {status})")
    if status == 404:
        raise ConfigError(f"teacher.model: {teacher.base_url} answers 404 for model {teacher.model!r}")
    if status is not None and status >= 400 and status != 429 and not extra:
        # A plain request refused or failing after the retries (a proxy in front of a dead backend, a
        # request the server cannot take): every training request would fail the same way.
        raise ConfigError(f"teacher.base_url: {teacher.base_url} answers HTTP {status} to a plain probe "
                          f"({redact(raw[:200].decode(errors='replace'), api_key)!r}); nothing else was sent")
    return status, fields


def choose_structured(teacher: TeacherConfig, generation: GenerationConfig, labels: list[str] | None,
                      messages: list[dict], api_key: str | None, ledger: Ledger | None) -> tuple[str, dict]:
    """(mode, request fields): the structured-output mode this run uses, after at most two probes.

    Always sends at least one probe (a plain one when structured outputs are off or the task
    is not classification), so an unreachable teacher fails here.
    """
    wanted = teacher.structured_output if labels else "off"
    candidates = ["json_schema", "choice"] if wanted == "auto" else [wanted]
    max_tokens = max(generation.max_tokens, 64 if teacher.rationale else 16)
    failed_all = True
    for mode in candidates:
        extra = structured_params(mode, labels or [], teacher.rationale)
        status, fields = probe(teacher, messages, extra, api_key, ledger, max_tokens)
        if mode == "off" or wanted != "auto":
            if status is not None and status >= 400 and mode != "off":
                raise ConfigError(f"teacher.structured_output: {teacher.base_url} rejects {mode} (HTTP {status})")
            return mode, extra
        answer = (fields or {}).get("response")
        if mode == "json_schema" and answer and answer.lstrip().startswith("{") and map_answer(answer, labels):
            return mode, extra
        if mode == "choice" and answer and answer.strip() in labels:
            return mode, extra
        failed_all = failed_all and (status is None or status >= 500)
    if failed_all:
        # Both structured probes broke the server: it may dislike the fields, or be down; a plain probe tells.
        probe(teacher, messages, {}, api_key, ledger, max_tokens)
    return "off", {}
