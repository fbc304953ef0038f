"""A loopback OpenAI-compatible server that behaves like a hosted chat model, not like `distill teacher serve`.

- Every input has a known distribution over whole answers (`true_distribution`): the
  gold label most of the time, sometimes another one, with a few confusable labels
  (sharing the first word) and a thin tail over the rest.
- Answers are cut into several sub-word pieces (`pieces`: words split at `_`/space,
  then into chunks of at most four characters), and `logprobs.content` carries, at
  every position, the exact conditional distribution of the next piece under that
  distribution, truncated to `top_logprobs`. Pieces of the JSON frame or of "Intent: "
  are certain (logprob 0).
- It answers in its own words ("arrival card") unless the prompt lists the labels
  (then "Card arrival.", "Intent: card_arrival", ...), a `json_schema` enum is sent
  (then `{"label": ...}`, with a rationale first when the schema asks for one), or a
  vLLM choice is sent (then the label verbatim). A few answers hedge.
- Every 37th request is answered 429 with Retry-After (seconds) and retry-after-ms.
- `--reject-structured` answers 400 to `response_format`, like an endpoint without
  structured outputs.
- `--latency-s S`: each chat completion takes S seconds; `/standin/stats` reports the most
  requests it was answering at once (`max_in_flight`).
- `--free-text-share F` makes it sloppier: that share of inputs is answered in its own
  words even when the prompt lists the labels; a corrective follow-up turn (the
  input is no longer the last user turn) is answered with a label.
- It scores given text as vLLM does, consistently with the same distribution: chat
  completions with `prompt_logprobs` and `continue_final_message` return the prompt's
  tokens (its own chat template, then the assistant turn cut into the same pieces)
  with their logprobs; `/v1/completions` with `echo` and `logprobs` does the same for
  each prompt of a list, with `text_offset`, reading the text after the last
  "Assistant: " as the answer and the last "User: " turn as the input. Inside an
  answer, the frame around a label is certain and the label's pieces carry their
  conditional probabilities, so a label's pieces multiply to its true probability.

Run as its own process: `python tests/chat_standin.py --port P --data a.csv b.csv --labels labels.json`,
or `start()` from a test or benchmark.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import re
import sys
import zlib
from pathlib import Path

MODE_SHARE_GOLD = 0.9  # the stand-in's true accuracy is about this on any split


def pieces(surface: str) -> list[str]:
    """Deterministic sub-word cut: words keep their leading separator, then chunks of <= 4 characters."""
    out = []
    for word in re.findall(r"[_\s]?[^_\s]+|[_\s]+", surface):
        out += [word[i:i + 4] for i in range(0, len(word), 4)]
    return out


def _rng(*parts: object) -> random.Random:
    return random.Random(int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16], 16))


def true_distribution(text: str, gold: str | None, labels: list[str]) -> dict[str, float]:
    """The stand-in's exact distribution over labels for one input (deterministic in the text)."""
    rng = _rng("dist", text)
    mode = gold if gold in labels and rng.random() < MODE_SHARE_GOLD else rng.choice(labels)
    p_mode = rng.uniform(0.45, 0.97)
    first = mode.split("_")[0]
    kin = [l for l in labels if l != mode and l.split("_")[0] == first]
    others = [l for l in labels if l != mode and l not in kin]
    rng.shuffle(kin)
    rng.shuffle(others)
    confusers = (kin[:2] + others)[:4]
    dist = {l: 0.0 for l in labels}
    dist[mode] = p_mode
    rest = 1.0 - p_mode
    shares = [0.4, 0.2, 0.1, 0.05]
    for l, s in zip(confusers, shares):
        dist[l] = rest * s
    tail = [l for l in labels if dist[l] == 0.0]
    for l in tail:
        dist[l] = rest * (1 - sum(shares)) / len(tail)
    return dist


def humanised(label: str) -> str:
    return label.replace("_", " ").capitalize()


def _next_piece_dist(seqs: dict[str, list[str]], dist: dict[str, float], prefix: list[str]) -> dict[str, float]:
    """P(next piece | prefix) under `dist`, over labels whose pieces start with `prefix`."""
    n = len(prefix)
    nxt: dict[str, float] = {}
    total = 0.0
    for label, seq in seqs.items():
        if seq[:n] == prefix and len(seq) > n:
            nxt[seq[n]] = nxt.get(seq[n], 0.0) + dist[label]
            total += dist[label]
    return {t: p / total for t, p in nxt.items()} if total else {}


def logprob_content(frame: tuple[str, str], surface_of, label: str, dist: dict[str, float],
                    top: int) -> list[dict]:
    """Per-position logprobs of `frame[0] + surface_of(label) + frame[1]`."""
    seqs = {l: pieces(surface_of(l)) for l in dist}
    content = [_certain(p, top) for p in pieces(frame[0]) if frame[0]]
    chosen = seqs[label]
    for i, piece in enumerate(chosen):
        cond = _next_piece_dist(seqs, dist, chosen[:i])
        ranked = sorted(cond.items(), key=lambda kv: -kv[1])
        entry = {"token": piece, "logprob": max(math.log(cond[piece]), -9999.0), "bytes": list(piece.encode())}
        entry["top_logprobs"] = [{"token": t, "logprob": max(math.log(p), -9999.0), "bytes": list(t.encode())}
                                 for t, p in ranked[:top]] if top else []
        content.append(entry)
    content += [_certain(p, top) for p in pieces(frame[1]) if frame[1]]
    return content


def _certain(piece: str, top: int) -> dict:
    tops = [{"token": piece, "logprob": 0.0, "bytes": list(piece.encode())}] if top else []
    return {"token": piece, "logprob": 0.0, "bytes": list(piece.encode()), "top_logprobs": tops}


def lists_labels(messages: list[dict], labels: list[str]) -> bool:
    prompt = "\n".join(str(m.get("content") or "") for m in messages if m.get("role") != "assistant")
    return sum(1 for l in labels if l in prompt) >= len(labels) // 2


def answer_shape(body: dict, labels: list[str], text: str, label: str, dist: dict[str, float],
                 free_text_share: float = 0.0):
    """(frame, surface function, hedge text or None) for one request, by what the request asks for."""
    fmt = body.get("response_format") or {}
    schema = ((fmt.get("json_schema") or {}).get("schema") or {}) if fmt.get("type") == "json_schema" else {}
    props = schema.get("properties") or {}
    if fmt.get("type") in ("json_schema", "json_object"):
        if "rationale" in props:
            named = label
            if _rng("contradict", text).random() < 0.01:  # a rationale that argues for another label
                named = max((l for l in dist if l != label), key=dist.get)
            why = f"The message is about {named.replace('_', ' ')}."
            return (json.dumps({"rationale": why})[:-1] + ', "label": "', '"}'), (lambda l: l), None
        return ('{"label": "', '"}'), (lambda l: l), None
    if body.get("guided_choice") or (body.get("structured_outputs") or {}).get("choice"):
        return ("", ""), (lambda l: l), None
    rng = _rng("shape", text)
    users = [m.get("content") for m in body.get("messages") or [] if m.get("role") == "user"]
    sloppy = bool(users) and users[-1] == text and _rng("sloppy", text).random() < free_text_share
    if lists_labels(body.get("messages") or [], labels) and not sloppy:
        if rng.random() < 0.01:
            return None, None, "I'm not sure; it could be several things. Could you tell me more?"
        style = rng.randrange(3)
        if style == 0:
            return ("", "."), humanised, None
        if style == 1:
            return ("Intent: ", ""), (lambda l: l), None
        return ('"', '"'), (lambda l: l), None
    # Its own words: the idea of the label, not its name.
    return ("", ""), (lambda l: " ".join(reversed(l.split("_")))), None


def _find_label(answer: str, labels: list[str]) -> tuple[int, str] | None:
    """(offset, label) of the longest label spelled verbatim in `answer` as a whole word, or None."""
    for label in sorted(labels, key=len, reverse=True):
        for m in re.finditer(re.escape(label), answer):
            a, b = m.start(), m.end()
            if (a == 0 or not (answer[a - 1].isalnum() or answer[a - 1] == "_")) and \
                    (b == len(answer) or not (answer[b].isalnum() or answer[b] == "_")):
                return a, label
    return None


def answer_logprobs(answer: str, dist: dict[str, float]) -> list[tuple[str, float]]:
    """(piece, logprob) of an answer under the stand-in's model: frame certain, label pieces conditional."""
    found = _find_label(answer, list(dist))
    if found is None:  # not an answer it would give: every piece unlikely
        return [(p, math.log(1e-6)) for p in pieces(answer)]
    at, label = found
    seqs = {l: pieces(l) for l in dist}
    chosen = seqs[label]
    out = [(p, 0.0) for p in pieces(answer[:at])]
    for i, piece in enumerate(chosen):
        cond = _next_piece_dist(seqs, dist, chosen[:i])
        out.append((piece, max(math.log(cond[piece]), -9999.0)))
    return out + [(p, 0.0) for p in pieces(answer[at + len(label):])]


def _context_pieces(text: str) -> list[tuple[str, float]]:
    return [(p, -1.0) for p in pieces(text)]  # the prompt's own tokens: some fixed, finite logprob


def _input_text(users: list[str], golds: dict[str, str]) -> str:
    return next((u for u in reversed(users) if u in golds), users[-1] if users else "")


def score_chat(body: dict, golds: dict[str, str], labels: list[str], n: int) -> dict:
    """vLLM's chat completion with prompt_logprobs: the templated prompt's tokens and their logprobs."""
    messages = body.get("messages") or []
    *context, last = messages
    text = _input_text([m["content"] for m in context if m.get("role") == "user"], golds)
    dist = true_distribution(text, golds.get(text), labels)
    toks: list[tuple[str, float]] = []
    for m in context:
        toks += _context_pieces(f"<|{m['role']}|>\n{m.get('content') or ''}\n")
    toks += _context_pieces(f"<|{last['role']}|>\n") + answer_logprobs(str(last.get("content") or ""), dist)
    entries = [None] + [{str(zlib.crc32(t.encode()) % 100000): {"logprob": lp, "rank": 1, "decoded_token": t}}
                        for t, lp in toks[1:]]
    choice = {"index": 0, "message": {"role": "assistant", "content": "."}, "finish_reason": "length",
              "logprobs": None}
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [choice], "prompt_logprobs": entries,
            "usage": {"prompt_tokens": len(toks), "completion_tokens": 1, "total_tokens": len(toks) + 1}}


def score_completions(body: dict, golds: dict[str, str], labels: list[str], n: int) -> dict:
    """The completions API with echo: each prompt's tokens, logprobs and offsets, then one generated token."""
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    gen = int(body.get("max_tokens") if body.get("max_tokens") is not None else 16) > 0
    choices, used = [], 0
    seen: dict[str, tuple[list, dict]] = {}  # the labels of one row share their context: cut it once
    for i, prompt in enumerate(prompts):
        cut = prompt.rfind("Assistant: ")
        context, answer = (prompt[:cut + len("Assistant: ")], prompt[cut + len("Assistant: "):]) if cut >= 0 \
            else (prompt, "")
        if context not in seen:
            user_at = context.rfind("User: ")
            text = context[user_at + len("User: "):cut].rstrip("\n") if user_at >= 0 and cut >= 0 else ""
            seen[context] = _context_pieces(context), true_distribution(text, golds.get(text), labels)
        context_toks, dist = seen[context]
        toks = context_toks + (answer_logprobs(answer, dist) if answer else [])
        toks += [("\n", -0.05)] if gen else []
        offsets, at = [], 0
        for t, _ in toks:
            offsets.append(at)
            at += len(t)
        lps: list[float | None] = [None] + [lp for _, lp in toks[1:]]
        logprobs = {"tokens": [t for t, _ in toks], "token_logprobs": lps, "text_offset": offsets,
                    "top_logprobs": [None] + [{t: lp} for t, lp in toks[1:]]}
        choices.append({"index": i, "text": prompt + ("\n" if gen else ""), "logprobs": logprobs,
                        "finish_reason": "length"})
        used += len(toks)
    return {"id": f"cmpl-{n}", "object": "text_completion", "created": 0, "model": body.get("model"),
            "choices": choices, "usage": {"prompt_tokens": used - len(prompts) * gen,
                                          "completion_tokens": len(prompts) * gen, "total_tokens": used}}


def build_app(golds: dict[str, str], labels: list[str], reject_structured: bool = False,
              free_text_share: float = 0.0, latency_s: float = 0.0):
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.requests = 0
    app.state.bodies = []
    app.state.in_flight = app.state.max_in_flight = 0

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        # Requests being answered at once, as a provider's concurrency limit counts them.
        app.state.in_flight += 1
        app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
        try:
            if latency_s:
                await asyncio.sleep(latency_s)
            return answer_chat(body)
        finally:
            app.state.in_flight -= 1

    def answer_chat(body: dict):
        app.state.requests += 1
        app.state.bodies.append(body)
        if app.state.requests % 37 == 0:
            return JSONResponse({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}},
                                status_code=429, headers={"Retry-After": "1", "retry-after-ms": "20"})
        if reject_structured and body.get("response_format"):
            return JSONResponse({"error": {"message": "response_format is not supported", "type":
                                           "invalid_request_error", "param": "response_format"}}, status_code=400)
        if body.get("prompt_logprobs") is not None and body.get("continue_final_message"):
            return JSONResponse(score_chat(body, golds, labels, app.state.requests))
        return completion(body, golds, labels, app.state.requests, free_text_share)

    @app.post("/v1/completions")
    async def completions(body: dict):
        app.state.requests += 1
        app.state.bodies.append(body)
        if app.state.requests % 37 == 0:
            return JSONResponse({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}},
                                status_code=429, headers={"Retry-After": "1", "retry-after-ms": "20"})
        if not body.get("echo"):
            return JSONResponse({"error": {"message": "this stand-in only scores (echo)"}}, status_code=400)
        # A megabyte of nested lists: rendered straight to JSON, not through FastAPI's encoder (seconds).
        return JSONResponse(score_completions(body, golds, labels, app.state.requests))

    @app.get("/standin/stats")
    async def stats():
        return {"requests": app.state.requests, "max_in_flight": app.state.max_in_flight,
                "bodies": app.state.bodies[-50:]}

    return app


def completion(body: dict, golds: dict[str, str], labels: list[str], n: int, free_text_share: float = 0.0) -> dict:
    messages = body.get("messages") or []
    users = [m["content"] for m in messages if m.get("role") == "user"]
    # The input is the last user turn that is a known text (a corrective follow-up is not the input).
    text = next((u for u in reversed(users) if u in golds), users[-1] if users else "")
    dist = true_distribution(text, golds.get(text), labels)
    if float(body.get("temperature") or 0) > 0:
        label = _rng("sample", text, n).choices(list(dist), weights=list(dist.values()))[0]
    else:
        label = max(dist, key=dist.get)
    frame, surface, hedge = answer_shape(body, labels, text, label, dist, free_text_share)
    top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    if hedge is not None:
        content = hedge
        lp = [_certain(p, top) for p in pieces(hedge)]
    else:
        content = frame[0] + surface(label) + frame[1]
        lp = logprob_content(frame, surface, label, dist, top)
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
              "logprobs": {"content": lp} if body.get("logprobs") else None}
    prompt_chars = sum(len(str(m.get("content") or "")) for m in messages)
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [choice], "usage": {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(lp),
                                           "total_tokens": prompt_chars // 4 + 1 + len(lp)}}


def load_golds(paths: list[str], text_field: str = "text", label_field: str = "category") -> dict[str, str]:
    golds = {}
    for p in paths:
        with open(p, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                golds[row[text_field]] = row[label_field]
    return golds


BANKING77 = Path(__file__).resolve().parents[1] / "distill/data/banking77"


def start(*extra: str) -> tuple["subprocess.Popen", str]:
    """This stand-in over BANKING77 in a process of its own on a free loopback port: (process, base URL …/v1).

    extra: more command-line flags (e.g. "--reject-structured").
    """
    return start_script(__file__, ["--data", str(BANKING77 / "train.csv"), str(BANKING77 / "test.csv"),
                                   "--labels", str(BANKING77 / "categories.json"), *extra], "stand-in")


def start_script(script: str, args: list[str], name: str) -> tuple["subprocess.Popen", str]:
    """`python script --port PORT *args` on a free loopback port, once it accepts connections: (process, …/v1)."""
    import socket
    import subprocess
    import sys
    import time

    from distill.httpserver import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, script, "--port", str(port), *args])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not start")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--reject-structured", action="store_true")
    ap.add_argument("--free-text-share", type=float, default=0.0)
    ap.add_argument("--latency-s", type=float, default=0.0, help="time each chat completion takes")
    args = ap.parse_args(argv)
    labels = list(json.loads(Path(args.labels).read_text()))
    app = build_app(load_golds(args.data), labels, args.reject_structured, args.free_text_share, args.latency_s)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    sys.exit(main())
