"""`distill serve` for a causal-LM student as its own process, with a hosted-chat teacher
(tests/chat_standin.py) as another: teacher fallback below the mean token logprob floor,
sticky canary routing, and shadow answers, all in the request log drift reads."""

import json
import math
import time

import httpx
import pytest

from chat_standin import start as start_standin
from distill.evaluate import latency
from distill.models.causal import GenerativeStudent
from distill.serve.canary import route_to_challenger
from distill.serve.shadow import ShadowLog

KEY = "gen-modes-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TEXTS = ["my card is lost", "refund pending please", "top up declined", "cat dog red", "how do i verify my identity",
         "exchange rate fee", "hello thanks", "change my address please"]
CAP = 5


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "answer"}, {"role": "user", "content": text}]


def greedy(student: GenerativeStudent, text: str) -> tuple[str, float]:
    """The served student's answer and its mean token logprob, computed here without the server."""
    steps = list(student.stream(chat(text), CAP))
    return "".join(p for _, p, _ in steps), sum(lp for _, _, lp in steps) / len(steps)


def ask(url: str, text: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "distill-student", "messages": chat(text), "max_tokens": CAP, **extra})


def standin_requests(teacher_url: str) -> int:
    return httpx.get(teacher_url.removesuffix("/v1") + "/standin/stats", timeout=10).json()["requests"]


@pytest.fixture(scope="module")
def teacher():
    proc, url = start_standin()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def challenger_lm(tmp_path_factory):
    from conftest import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("challenger-lm"), seed=1)


def test_teacher_answers_below_the_mean_logprob_floor(tiny_causal_lm, teacher, tmp_path):
    student = GenerativeStudent(tiny_causal_lm, device="cpu")
    local = {t: greedy(student, t) for t in TEXTS}
    means = sorted(m for _, m in local.values())
    floor = (means[3] + means[4]) / 2  # half the answers are less sure than this
    unsure = {t for t, (_, m) in local.items() if m < floor}
    assert 0 < len(unsure) < len(TEXTS)
    log_url = f"sqlite:///{tmp_path}/log.sqlite"
    overrides = [f"serve.log_url={log_url}", f"serve.fallback_mean_logprob={floor}",
                 f"teacher.base_url={teacher}", "teacher.model=hosted-chat"]
    with latency.serve_process(tiny_causal_lm, overrides, api_key=KEY) as url:
        before = standin_requests(teacher)
        answers = {}
        for t in TEXTS:
            r = ask(url, t)
            assert r.status_code == 200, r.text
            answers[t] = r
        asked = standin_requests(teacher) - before
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"model": "distill-student", "messages": chat(sorted(unsure)[0]), "max_tokens": CAP,
                                "stream": True}) as s:
            events = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: {")]
    assert asked == len(unsure)  # the teacher is asked for the unsure answers only
    direct = httpx.post(f"{teacher}/chat/completions", timeout=30, json={
        "model": "hosted-chat", "messages": chat(sorted(unsure)[0]), "max_tokens": CAP, "temperature": 0}).json()
    for t, r in answers.items():
        body = r.json()
        content = body["choices"][0]["message"]["content"]
        if t in unsure:
            assert r.headers["x-distill-model"] == "teacher" and body["distill"]["fallback"] is True
            assert content != local[t][0]
        else:
            assert r.headers["x-distill-model"] == "champion" and content == local[t][0]
            assert float(r.headers["x-distill-confidence"]) == pytest.approx(math.exp(local[t][1]), rel=1e-3)
    assert answers[sorted(unsure)[0]].json()["choices"][0]["message"]["content"] == \
        direct["choices"][0]["message"]["content"]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == direct["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["distill"]["served_by"] == "teacher"

    rows = {r["text"]: r for r in ShadowLog(log_url).recent()[:len(TEXTS)]}
    for t in TEXTS:
        row = rows[t]
        assert row["champion_label"] == local[t][0]
        assert row["champion_confidence"] == pytest.approx(math.exp(local[t][1]), rel=1e-3)
        if t in unsure:  # the bought answer is in the log, beside the student's
            assert (row["served_by"], row["fallback"]) == ("teacher", 1)
            assert row["teacher_label"] == row["served_label"] == answers[t].json()["choices"][0]["message"]["content"]
            assert row["teacher_run"] == "hosted-chat" and row["teacher_latency_ms"] > 0
        else:
            assert (row["served_by"], row["fallback"], row["teacher_label"]) == ("champion", 0, None)


def test_canary_is_sticky_and_shadow_logs_every_model(tiny_causal_lm, challenger_lm, teacher, tmp_path):
    champion = GenerativeStudent(tiny_causal_lm, device="cpu")
    challenger = GenerativeStudent(challenger_lm, device="cpu")
    users = [f"user-{i}" for i in range(8)]
    to_challenger = {u: route_to_challenger(0.5, u, None) for u in users}
    assert 0 < sum(to_challenger.values()) < len(users)
    log_url = f"sqlite:///{tmp_path}/log.sqlite"
    overrides = [f"serve.log_url={log_url}", "serve.canary_fraction=0.5", "serve.shadow=true",
                 f"serve.challenger_dir={challenger_lm}", f"teacher.base_url={teacher}", "teacher.model=hosted-chat"]
    with latency.serve_process(tiny_causal_lm, overrides, api_key=KEY) as url:
        served = []
        for round_ in range(2):
            for u, t in zip(users, TEXTS):
                r = ask(url, t, user=u)
                assert r.status_code == 200, r.text
                want = "challenger" if to_challenger[u] else "champion"
                assert r.headers["x-distill-model"] == want  # the same side both rounds
                expected = greedy(challenger if to_challenger[u] else champion, t)[0]
                assert r.json()["choices"][0]["message"]["content"] == expected
                served.append(r.headers["x-request-id"])
        log = ShadowLog(log_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # shadow answers arrive after the served one
            rows = {r["request_id"]: r for r in log.recent()}
            if all(rows.get(i, {}).get("teacher_label") and rows[i].get("challenger_label") for i in served):
                break
            time.sleep(0.2)
    for u, t in zip(users, TEXTS):
        for row in (r for r in rows.values() if r["text"] == t):
            assert row["canary"] == int(to_challenger[u])
            assert row["served_by"] == ("challenger" if to_challenger[u] else "champion")
            assert row["champion_label"] == greedy(champion, t)[0]
            assert row["challenger_label"] == greedy(challenger, t)[0]
            assert row["teacher_label"] and row["teacher_run"] == "hosted-chat"
            assert row["served_label"] == row[f"{row['served_by']}_label"]
    assert len([i for i in served if i in rows]) == 2 * len(users)
