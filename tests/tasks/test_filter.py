"""The filter pipeline in real Prefect flow runs, on BANKING77 answers of a classifier teacher.

The teacher records are built the way `distill teacher serve` answers (label as content,
a full label distribution in top_logprobs), with planted failures: refusals, truncations,
failed requests, answers outside the label set and uncertain answers.
"""

from __future__ import annotations

import csv
import json
import math
import random
import threading
import time
from pathlib import Path

import pytest
from distill_tasks.filter import filter_rows, report_markdown, stage_report
from prefect import flow
from starlette.requests import Request

from distill.config import FilterConfig, TaskConfig
from distill.data import load_task_rows, read_jsonl, write_jsonl
from distill.demo import demo_task

TASK = demo_task()
PLANTED = {"refusal": 37, "truncated": 41, "failed": 43, "not_a_label": 47, "uncertain": 29}


def teacher_records(rows, labels, seed=0):
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(rows):
        others = rng.sample([l for l in labels if l != r["gold"]], 19)
        p = 0.02 if i % PLANTED["uncertain"] == 0 else rng.uniform(0.75, 0.99)
        probs = [p] + [(1 - p) * w for w in _weights(rng, 19)]
        tops = [{"token": l, "logprob": math.log(q)} for l, q in zip([r["gold"]] + others, probs)]
        answer = max(zip(probs, [r["gold"]] + others))[1]
        rec = {"id": r["id"], "sample": 0, "status": "done", "error": None, "response": answer,
               "finish_reason": "stop", "truncated": False,
               "logprobs": [{"token": answer, "logprob": math.log(max(probs)), "top_logprobs": tops}],
               "usage": {"prompt_tokens": 30, "completion_tokens": 1}, "cost_usd": 0.0, "latency_s": 0.01,
               "attempts": 1, "cached": False, "model": "banking77-teacher", "messages": r["messages"], "params": {}}
        if i % PLANTED["refusal"] == 0:
            rec.update(response="I'm sorry, I can't help with that request.", logprobs=None)
        elif i % PLANTED["truncated"] == 0:
            rec.update(response=answer[:4], finish_reason="length", truncated=True)
        elif i % PLANTED["failed"] == 0:
            rec.update(status="failed", error="http_503: service unavailable", response=None, logprobs=None)
        elif i % PLANTED["not_a_label"] == 0:
            rec.update(response="account_weather", logprobs=None)
        out.append(rec)
    return out


def _weights(rng, n):
    w = [rng.random() for _ in range(n)]
    return [x / sum(w) for x in w]


def _planted_ids(rows, kind):
    return {r["id"] for i, r in enumerate(rows) if i % PLANTED[kind] == 0 and
            not any(i % PLANTED[k] == 0 for k in list(PLANTED)[:list(PLANTED).index(kind)])}


@pytest.fixture(scope="module")
def banking(tmp_path_factory):
    rows = load_task_rows(TASK, "train")
    rng = random.Random(0)
    rng.shuffle(rows)
    teach, real = rows[:3000], rows[3000:4500]
    d = tmp_path_factory.mktemp("banking")
    write_jsonl(d / "records.jsonl", teacher_records(teach, TASK.label_set()))
    return teach, real, d / "records.jsonl"


SHARED: dict = {}


@flow(name="filter-under-test")
def filter_flow(records_path: str, run_dir: str, overrides: dict) -> dict:
    from prefect.runtime import flow_run

    SHARED["flow_run_id"] = flow_run.id
    # Written where the cycle writes its inputs: the stage reads files, not row lists.
    prompts = str(write_jsonl(Path(run_dir) / "inputs" / "prompts.jsonl", SHARED["teach"]))
    real = str(write_jsonl(Path(run_dir) / "inputs" / "real.jsonl", SHARED["real"]))
    cfg = FilterConfig.model_validate(overrides)
    dataset, report = filter_rows(prompts, records_path, real, TASK, cfg, run_dir, seed=0)
    return {"n": len(read_jsonl(dataset)), "report": report}


def test_stage_report_and_markdown():
    rej = [{"id": f"r{i}", "reason": f"{'format' if i < 3 else 'empty'}: x{i}", "text": "t", "response": "a"}
           for i in range(5)]
    s = stage_report("heuristics", 10, [{}] * 5, rej, 0.01)
    assert list(s["top_reasons"].items()) == [("format", 3), ("empty", 2)]
    assert [e["id"] for e in s["examples"]] == ["r0", "r1", "r3", "r4"]
    md = report_markdown({"stages": [s], "final": {"rows": 5, "teacher": 4, "real": 1, "real_share": 0.2,
                                                   "train": 4, "validation": 1}})
    assert "| heuristics | 10 | 5 | 5 | format (3), empty (2) |" in md


def test_filter_flow_on_banking77_auto_approved(prefect_harness, banking, tmp_path):
    teach, real, records_path = banking
    SHARED.update(teach=teach, real=real)
    overrides = {"spotcheck": {"auto_approve": True, "fraction": 0.05}}
    result = filter_flow(str(records_path), str(tmp_path), overrides)
    report = json.loads((tmp_path / "filter_report.json").read_text())
    assert report == json.loads(json.dumps(result["report"]))
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["generation", "heuristics", "consistency", "entropy", "dedup", "grader", "spotcheck"]
    assert stages["grader"]["skipped"] and not stages["dedup"]["skipped"]
    chain = [s for s in report["stages"] if not s["skipped"]]
    for prev, cur in zip(chain, chain[1:]):
        assert cur["in"] == prev["kept"]
    for s in chain:
        assert s["kept"] + s["dropped"] == s["in"]

    rejected = read_jsonl(tmp_path / "rejected.jsonl")
    assert len(rejected) == report["rejected_total"] == sum(s["dropped"] for s in chain)
    by_id = {r["id"]: r for r in rejected}
    for rid in _planted_ids(teach, "refusal"):
        assert by_id[rid]["stage"] == "heuristics" and by_id[rid]["reason"].startswith("refusal:")
    for rid in _planted_ids(teach, "failed"):
        assert by_id[rid]["stage"] == "generation" and "http_503" in by_id[rid]["reason"]
    for rid in _planted_ids(teach, "truncated"):
        assert by_id[rid]["reason"].startswith("truncated:")
    for rid in _planted_ids(teach, "not_a_label"):
        assert by_id[rid]["reason"].startswith("format:")
    uncertain = _planted_ids(teach, "uncertain")
    assert sum(by_id.get(rid, {}).get("stage") == "entropy" for rid in uncertain) >= 0.9 * len(uncertain)
    assert stages["dedup"]["dropped"] > 0  # BANKING77 repeats some questions nearly verbatim

    dataset = read_jsonl(tmp_path / "dataset.jsonl")
    assert len(dataset) == result["n"] == report["final"]["rows"]
    teacher_ids = {r["id"] for r in dataset if r["source"] == "teacher"}
    assert teacher_ids.isdisjoint(by_id) and len(teacher_ids) + len(rejected) == len(teach)  # nothing lost
    assert report["final"]["real_share"] == pytest.approx(0.3, abs=0.01)
    assert {r["split"] for r in dataset} == {"train", "validation"}
    assert all(r["soft_labels"] and abs(sum(r["soft_labels"].values()) - 1) < 1e-6
               for r in dataset if r["source"] == "teacher")
    assert report["spotcheck"]["mode"] == "auto_approve" and report["spotcheck"]["sampled"] >= 100
    assert (tmp_path / "spotcheck.csv").exists()

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["filter-report"])))
    assert arts and "# Filter report" in arts[0].data


def test_spotcheck_pauses_until_a_reviewer_resumes_with_input(prefect_harness, banking, tmp_path):
    from prefect import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.states import StateType

    teach, real, records_path = banking
    small = teach[:300]
    SHARED.update(teach=small, real=real[:200], flow_run_id=None)
    answer: dict = {}
    errors: list = []

    def reviewer():
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                run_id = SHARED.get("flow_run_id")
                if run_id and (tmp_path / "spotcheck.csv").exists():
                    with get_client(sync_client=True) as client:
                        state = client.read_flow_run(run_id).state
                    if state and state.type == StateType.PAUSED:
                        sampled = list(csv.DictReader((tmp_path / "spotcheck.csv").open()))
                        answer["rejected"] = sampled[0]["id"]
                        resume_flow_run(run_id, run_input={"rejected_ids": [sampled[0]["id"]],
                                                           "reason": "wrong intent",
                                                           "reject_patterns": ["^card_arrival$"]})
                        return
                time.sleep(0.2)
            errors.append("flow never paused")
        except Exception as e:  # surfaced in the main thread
            errors.append(repr(e))

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    overrides = {"spotcheck": {"fraction": 0.1, "poll_interval_s": 1, "timeout_s": 120}}
    result = filter_flow(str(records_path), str(tmp_path), overrides)
    thread.join(5)
    assert not errors
    assert result["report"]["spotcheck"]["mode"] == "reviewer"
    rejected = {r["id"]: r for r in read_jsonl(tmp_path / "rejected.jsonl") if r["stage"] == "spotcheck"}
    assert rejected[answer["rejected"]]["reason"] == "reviewer: wrong intent"
    patterned = [r for r in rejected.values() if r["reason"].startswith("reviewer pattern")]
    assert patterned and all(r["response"] == "card_arrival" for r in patterned)
    dataset = read_jsonl(tmp_path / "dataset.jsonl")
    assert not [r for r in dataset if r["source"] == "teacher" and r["target"] == "card_arrival"]
    assert answer["rejected"] not in {r["id"] for r in dataset}


def test_headless_decisions_file(prefect_harness, banking, tmp_path):
    teach, real, records_path = banking
    SHARED.update(teach=teach[:300], real=real[:100])
    first = tmp_path / "first"
    filter_flow(str(records_path), str(first), {"spotcheck": {"auto_approve": True, "fraction": 0.1}})
    sampled = list(csv.DictReader((first / "spotcheck.csv").open()))
    decisions = tmp_path / "decisions.csv"
    with decisions.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "approved", "reason"])
        w.writerow([sampled[0]["id"], "no", "ambiguous question"])
        w.writerow([sampled[1]["id"], "yes", ""])
    second = tmp_path / "second"
    result = filter_flow(str(records_path), str(second), {"spotcheck": {"decisions_path": str(decisions)}})
    assert result["report"]["spotcheck"]["rejected_ids"] == [sampled[0]["id"]]
    rejected = [r for r in read_jsonl(second / "rejected.jsonl") if r["stage"] == "spotcheck"]
    assert [(r["id"], r["reason"]) for r in rejected] == [(sampled[0]["id"], "reviewer: ambiguous question")]
    assert Path(second / "dataset.jsonl").exists()


def strict_grader_app(seen):
    """Scores card_arrival answers 1 (say it is always wrong), everything else 4."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        seen.append(request.headers.get("authorization"))
        answer = body["messages"][-1]["content"].split("## The model's answer\n", 1)[1].split("\n\n", 1)[0]
        score = 1 if answer == "card_arrival" else 4
        content = json.dumps({"score": score, "reason": "always wrong" if score == 1 else "fine"})
        return {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "model": body["model"]}

    return app


def test_grader_stage_in_the_flow_uses_its_endpoint_and_key(prefect_harness, banking, tmp_path, monkeypatch):
    from distill.config import GenerationConfig, TeacherConfig
    from distill.httpserver import start_in_thread

    teach, real, records_path = banking
    small = teach[:200]
    monkeypatch.setenv("GRADER_TEST_KEY", "sk-grader-SECRET-42")
    seen: list = []

    @flow(name="filter-with-grader")
    def graded(run_dir: str, url: str) -> dict:
        cfg = FilterConfig.model_validate({
            "spotcheck": {"enabled": False},
            "grader": {"enabled": True, "min_score": 3,
                       "endpoint": {"base_url": url, "model": "judge", "api_key_env": "GRADER_TEST_KEY"}}})
        gen = GenerationConfig(cache_path=tmp_path / "cache.sqlite", max_retries=0)
        _, report = filter_rows(str(write_jsonl(tmp_path / "small.jsonl", small)), str(records_path),
                                str(write_jsonl(tmp_path / "real.jsonl", real[:50])), TASK, cfg, run_dir,
                                teacher=TeacherConfig(base_url="http://127.0.0.1:9/v1"), generation=gen)
        return report

    with start_in_thread(strict_grader_app(seen)) as server:
        report = graded(str(tmp_path / "run"), server.url + "/v1")
    stage = next(s for s in report["stages"] if s["stage"] == "grader")
    assert stage["dropped"] > 0 and stage["top_reasons"] == {"grader": stage["dropped"]}
    assert report["grader"]["done"] == stage["in"] and seen and set(seen) == {"Bearer sk-grader-SECRET-42"}
    rejected = [r for r in read_jsonl(tmp_path / "run" / "rejected.jsonl") if r["stage"] == "grader"]
    assert all(r["response"] == "card_arrival" and r["reason"].endswith("always wrong") for r in rejected)
    for f in (tmp_path / "run").iterdir():
        assert "sk-grader-SECRET-42" not in f.read_text()
