"""An LLM judge for generative students: is the student's answer as good as the teacher's?

Each judged holdout row is shown to an OpenAI-compatible grader twice, once with the
student's answer first and once with the teacher's first, so a judge that favours a
position cancels out: the row is a win when the student is preferred on balance
(+1 per order it wins, -1 per order it loses), a loss when the teacher is, a tie
otherwise. Two answers that are the same after normalisation are a tie without a
call. `judge_agreement` is the share of rows whose two verdicts name the same winner
(or both a tie): the judge's consistency under the swap; `judge_first_position_rate`
is the share of verdicts that picked whichever answer came first (0.5 for a judge
with no position bias, over rows it found a winner in).

The grader's replies are free text; `parse_verdict` reads the last `Verdict: A|B|tie`
line (or `[[A]]`-style brackets), and a reply it cannot read counts as unreadable,
never as a guess. Calls go through the cached teacher client
(distill.teacher.generation.generate): every reply is persisted before it is used, a
rerun pays nothing, and the spend is charged to the run's ledger as `judge`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from distill.config import GenerationConfig, JudgeConfig, TeacherConfig

SYSTEM = ("You are an impartial judge. You compare two answers an assistant could give to the same request. "
          "Judge correctness first, then whether the answer follows the instructions and the requested format. "
          "Neither the order of the answers nor their length may influence you. Explain briefly, then end your "
          "reply with exactly one line: `Verdict: A`, `Verdict: B` or `Verdict: tie`.")

_VERDICT = re.compile(r"verdict\W{0,6}(?:answer\s+)?\[{0,2}\s*(A|B|tie|draw|equal|neither|both)\b", re.IGNORECASE)
_BRACKETS = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:answer\s+)?(A|B|tie)\W*$", re.IGNORECASE)


def judge_messages(messages: list[dict], answer_a: str, answer_b: str) -> list[dict]:
    """The grader's chat for one order (format_input): the task's instructions, the request, two answers."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    users = [m["content"] for m in messages if m["role"] == "user"]
    request = users[-1] if users else ""
    body = (f"[Instructions the assistant was given]\n{system or '(none)'}\n\n[Request]\n{request}\n\n"
            f"[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}\n\nWhich answer is better?")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": body}]


def parse_verdict(reply: str | None) -> str | None:
    """"A", "B" or "tie" from a free-text verdict (format_output); None when it names none."""
    if not isinstance(reply, str) or not reply.strip():
        return None
    found = _VERDICT.findall(reply) or _BRACKETS.findall(reply) or _BARE.findall(reply.strip())
    if not found:
        return None
    word = found[-1].lower()
    return {"a": "A", "b": "B"}.get(word, "tie")


def _outcome(student_first: str | None, teacher_first: str | None) -> str | None:
    """"win", "tie" or "loss" for the student from the verdicts of both orders; None when one is unreadable."""
    if student_first is None or teacher_first is None:
        return None
    score = {"A": 1, "B": -1, "tie": 0}[student_first] + {"A": -1, "B": 1, "tie": 0}[teacher_first]
    return "win" if score > 0 else "loss" if score < 0 else "tie"


def _winner(verdict: str, student_first: bool) -> str:
    if verdict == "tie":
        return "tie"
    return "student" if (verdict == "A") == student_first else "teacher"


def _summary(rows: list[dict], calls: dict, spend: dict) -> dict[str, Any]:
    decided = [r for r in rows if r["outcome"] is not None]
    both = [r for r in rows if r["verdicts"] and None not in r["verdicts"].values()]
    picks = [v for r in both for v in r["verdicts"].values() if v != "tie"]

    def share(kind: str) -> float | None:
        return sum(r["outcome"] == kind for r in decided) / len(decided) if decided else None

    return {"judge_rows": len(rows), "judge_decided": len(decided),
            "judge_win_rate": share("win"), "judge_tie_rate": share("tie"), "judge_loss_rate": share("loss"),
            "judge_agreement": (sum(_winner(r["verdicts"]["student_first"], True)
                                    == _winner(r["verdicts"]["teacher_first"], False) for r in both) / len(both))
            if both else None,
            "judge_first_position_rate": sum(v == "A" for v in picks) / len(picks) if picks else None,
            "judge_identical": sum(r["identical"] for r in rows),
            "judge_unreadable": sum(v is None for r in rows for v in (r["verdicts"] or {}).values()),
            "judge_calls": calls["requested"], "judge_cached": calls["cached"], "judge_failed": calls["failed"],
            "judge_cost_usd": spend.get("cost_usd", 0.0)}


def judge_answers(holdout: list[dict], student: dict[str, str], teacher: dict[str, str | None], judge: JudgeConfig,
                  teacher_endpoint: TeacherConfig | None, generation: GenerationConfig | None,
                  out_dir: str | Path, api_key: str | None = None) -> dict[str, Any]:
    """Judge the student's answers against the teacher's on a fixed subset of the holdout.

    Args:
        holdout: gold task rows ("id", "messages").
        student: {row id: the student's answer text}.
        teacher: {row id: the teacher's answer text, None when the teacher did not answer}.
        judge: the evaluate.judge section (endpoint, rows, verdict length).
        teacher_endpoint: the judge's endpoint when judge.endpoint is unset.
        generation: the run's generation section (request cache, ledger, budget, retries); defaults when None.
        out_dir: where judge.jsonl (one line per judged row, both verdicts) goes.
        api_key: the judge's key; None reads the endpoint's api_key_env.
    Returns:
        judge_* metrics (see the module docstring); rates are None when nothing was decided.
    """
    from distill.data import write_jsonl
    from distill.evaluate.robustness import pick_rows
    from distill.teacher.generation import generate

    endpoint = judge.endpoint or teacher_endpoint
    if endpoint is None:
        raise ValueError("evaluate.judge needs an endpoint: set evaluate.judge.endpoint or the teacher section")
    rows = [r for r in pick_rows(holdout, judge.max_rows) if teacher.get(r["id"]) is not None]
    prompts, judged = [], []
    for r in rows:
        s, t = student.get(r["id"]) or "", teacher[r["id"]]
        same = " ".join(s.lower().split()) == " ".join(t.lower().split())
        judged.append({"id": r["id"], "student": s, "teacher": t, "identical": same, "verdicts": None,
                       "outcome": "tie" if same else None})
        if not same:
            prompts += [{"id": f"{r['id']}/student_first", "messages": judge_messages(r["messages"], s, t)},
                        {"id": f"{r['id']}/teacher_first", "messages": judge_messages(r["messages"], t, s)}]
    gen = (generation or GenerationConfig()).model_copy(update={
        "samples_per_prompt": 1, "temperature": 0.0, "max_tokens": judge.max_tokens, "logprobs": False,
        "top_logprobs": 0, "extra_params": {}, "mode": "online", "soft_labels": "hard"})
    result = generate(prompts, endpoint, gen, api_key=api_key, purpose="judge") if prompts else None
    replies = {str(rec["id"]): rec.get("response") if rec["status"] == "done" else None
               for rec in (result.records if result else [])}
    for j in judged:
        if j["identical"]:
            continue
        j["replies"] = {o: replies.get(f"{j['id']}/{o}") for o in ("student_first", "teacher_first")}
        j["verdicts"] = {o: parse_verdict(text) for o, text in j["replies"].items()}
        j["outcome"] = _outcome(j["verdicts"]["student_first"], j["verdicts"]["teacher_first"])
    write_jsonl(Path(out_dir) / "judge.jsonl", judged)
    summary = result.summary if result else {}
    calls = {"requested": summary.get("requested", 0), "cached": summary.get("cached", 0),
             "failed": summary.get("failed", 0)}
    return {**_summary(judged, calls, summary), "judge_model": endpoint.model}
