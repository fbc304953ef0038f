import json
import math
import shutil
from pathlib import Path

from distill_tasks.evaluate import evaluate_student, gate_student, register_student
from prefect import flow

from distill.config import EvaluateConfig, GateConfig, TeacherConfig
from distill.data import write_jsonl
from distill.httpserver import start_in_thread
from distill.serve.registry import Registry

LABELS = ["positive", "negative", "neutral"]


def _holdout(n):
    rows = []
    for i in range(n):
        gold = LABELS[i % 3]
        text = f"{['good', 'bad', 'ok'][i % 3]} card {i}"
        rows.append({"id": f"h{i}", "text": text, "gold": gold, "input": {"text": text, "category": gold},
                     "messages": [{"role": "user", "content": text}], "_line": i + 2})
    return rows


def _teacher():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "neutral"}}]}

    return app


@flow
def _cycle(student, holdout, records, run_dir, registry, gate, teacher, run_id):
    train_rows = [{"id": "t1", "text": "good card", "target": "positive", "split": "train"},
                  {"id": "v1", "text": "bad card", "target": "negative", "split": "validation"}]
    # The tasks take files, as the cycle hands them over.
    files = {name: str(write_jsonl(Path(run_dir) / f"{name}.jsonl", rows))
             for name, rows in (("holdout", holdout), ("records", records), ("dataset", train_rows))}
    metrics = evaluate_student(student, files["holdout"], files["records"], LABELS,
                               EvaluateConfig(latency_requests=10, latency_concurrency=2, tail_size=6,
                                              robustness_rows=4), run_dir, dataset_path=files["dataset"],
                               teacher=teacher)
    decision = gate_student(metrics, gate)
    entry = register_student("toy", run_id, student, metrics, decision, {"run_id": run_id}, registry, True)
    return metrics, decision, entry


def test_tasks_evaluate_gate_and_register_in_a_flow(tmp_path, tiny_classifier, prefect_harness, monkeypatch):
    student = tmp_path / "student"
    shutil.copytree(tiny_classifier, student)
    holdout = _holdout(12)
    records = [{"id": r["id"], "sample": 0, "status": "done", "response": r["gold"], "logprobs": None,
                "usage": {"prompt_tokens": 10, "completion_tokens": 1}, "cost_usd": 0.0} for r in holdout]
    monkeypatch.setenv("TOY_TEACHER_KEY", "sk-toy")
    registry = str(tmp_path / "registry")
    with start_in_thread(_teacher()) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="toy", api_key_env="TOY_TEACHER_KEY",
                                input_price_per_1m=1.0)
        # Every check switched off: the gate ships, and auto-promotion makes it champion.
        off = GateConfig(min_retention=None, max_ece=None, max_tail_gap=None, max_p95_ms=None,
                         max_robustness_drop=None, max_latency_ratio=None, max_cost_ratio=None,
                         max_export_drop=None)
        metrics, decision, entry = _cycle(str(student), holdout, records, str(tmp_path / "run1"), registry, off,
                                          teacher, "run-1")
        # An impossible bar: not shipped, registered as challenger only.
        strict = GateConfig(min_retention=1.5)
        _, decision2, entry2 = _cycle(str(student), holdout, records, str(tmp_path / "run2"), registry, strict,
                                      teacher, "run-2")
    assert metrics["teacher_accuracy"] == 1.0 and metrics["teacher_p95_ms"] is not None
    assert metrics["teacher_cost_per_1k"] == 10 / 1e6 * 1000
    assert decision["ship"] and entry["promoted"] and entry["champion"] == "run-1"
    assert not decision2["ship"] and decision2["reasons"][0].startswith("retention")
    assert not entry2["promoted"] and entry2["status"] == "challenger" and entry2["champion"] == "run-1"
    reg = Registry(registry)
    assert reg.champion("toy")["run_id"] == "run-1"
    assert reg.list("toy")[1]["metrics"]["gate_ship"] is False
    assert "sk-toy" not in (tmp_path / "registry" / "index.json").read_text()
    assert (tmp_path / "run1" / "reliability_after.png").exists()
    assert not math.isnan(json.loads((student / "calibration.json").read_text())["temperature"])
