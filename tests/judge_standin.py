"""A loopback OpenAI-compatible server that behaves like a hosted chat model asked to judge two answers.

- It reads the judge prompt the way a model would see it: the `[Request]`, `[Answer A]` and
  `[Answer B]` sections of the last user message.
- It knows the right answer of every request (`--gold gold.json`, {request text: answer}) and
  judges loosely, like a reader: case, punctuation and spacing do not matter.
- It answers in free text: a sentence or two of reasoning, then a verdict in one of the
  shapes real judges use ("Verdict: A", "**Verdict:** [[B]]", "Verdict: tie"), chosen per
  prompt.
- Position bias: when both answers are equally good (both right or both wrong) it prefers
  the first one for most requests (a fixed 80 %, by a hash of the request), whichever answer
  that is; for the rest it says tie. When one answer is right it picks that one.
- A request whose text contains "ambiguous" gets a reply without any verdict.
- Every 29th request is answered 429 with Retry-After; usage counts tokens as characters / 4.

Run as its own process: `python tests/judge_standin.py --port P --gold gold.json`, or `start(gold)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

FIRST_WHEN_EQUAL = 0.8


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _share(*parts: str) -> float:
    return int(hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:8], 16) / 16**8


def sections(prompt: str) -> dict[str, str]:
    """{"request", "a", "b"} from the judge prompt's bracketed sections."""
    found = dict(re.findall(r"\[(Request|Answer A|Answer B)\]\n(.*?)(?=\n\n\[|\n\nWhich answer|\Z)", prompt, re.S))
    return {"request": found.get("Request", ""), "a": found.get("Answer A", ""), "b": found.get("Answer B", "")}


def verdict_reply(prompt: str, golds: dict[str, str]) -> str:
    part = sections(prompt)
    request, a, b = part["request"], part["a"], part["b"]
    if "ambiguous" in request:
        return "Both answers have their merits, and the request could be read either way."
    gold = _norm(golds.get(request, ""))
    a_ok, b_ok = _norm(a) == gold, _norm(b) == gold
    if a_ok != b_ok:
        pick, why = ("A", "Answer A gives the right answer; Answer B does not.") if a_ok else \
            ("B", "Answer B is correct, while Answer A misses what was asked.")
    elif _share("bias", request) < FIRST_WHEN_EQUAL:
        pick, why = "A", "Both are close, but Answer A reads slightly better to me."
    else:
        pick, why = "tie", "The two answers are equally good."
    shape = int(_share("shape", request, a, b) * 3)
    if shape == 0:
        return f"{why}\n\nVerdict: {pick}"
    if shape == 1:
        return f"Let me compare them. {why}\n\n**Verdict:** [[{pick}]]"
    return f"{why} Overall, my decision follows.\nVerdict: {'tie' if pick == 'tie' else 'Answer ' + pick}"


def build_app(golds: dict[str, str]):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.requests = 0

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        app.state.requests += 1
        if app.state.requests % 29 == 0:
            return JSONResponse({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}},
                                status_code=429, headers={"Retry-After": "0", "retry-after-ms": "20"})
        messages = body.get("messages") or []
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        reply = verdict_reply(users[-1] if users else "", golds)
        prompt_chars = sum(len(str(m.get("content") or "")) for m in messages)
        used = {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(reply) // 4 + 1}
        return {"id": f"chatcmpl-j{app.state.requests}", "object": "chat.completion", "created": 0,
                "model": body.get("model"), "usage": {**used, "total_tokens": sum(used.values())},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop", "logprobs": None}]}

    @app.get("/standin/stats")
    async def stats():
        return {"requests": app.state.requests}

    return app


def start(gold_path: str | Path) -> tuple["subprocess.Popen", str]:
    """This stand-in in a process of its own on a free loopback port: (process, base URL …/v1)."""
    from chat_standin import start_script

    return start_script(__file__, ["--gold", str(gold_path)], "judge stand-in")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--gold", required=True)
    args = ap.parse_args(argv)
    app = build_app(json.loads(Path(args.gold).read_text()))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    sys.exit(main())
