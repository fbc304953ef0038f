"""The cycle end to end: bad input stops before any teacher call; the quick demo runs the
whole flow on the real Prefect engine over real HTTP and a re-run pays for nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distill_flows.cli import app
from typer.testing import CliRunner

from distill.httpserver import start_in_thread
from conftest import fresh_prefect_home

REPO = Path(__file__).resolve().parents[2]


def counting_server():
    from fastapi import FastAPI, Request

    hits = []
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        hits.append(await request.json())
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "refund"},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    return api, hits


def test_bad_label_stops_before_any_teacher_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("text,category\nmy card is lost,card_lost\nrefund me,teleport\n")
    (tmp_path / "cfg.yaml").write_text(
        "task:\n  name: cards\n  train_path: train.csv\n  test_path: null\n  labels: [card_lost, refund]\n"
        "  label_field: category\n  system_prompt: Classify the message.\n")
    api, hits = counting_server()
    with start_in_thread(api) as server:
        result = CliRunner().invoke(app, ["run", "cfg.yaml", "--set", f"teacher.base_url={server.url}/v1"])
    assert result.exit_code == 2
    assert "train.csv:3" in result.output and "teleport" in result.output
    assert hits == []
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun_pays_nothing(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(fresh_prefect_home(tmp_path / "prefect")), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "distill_flows.cli", "demo", "--quick"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / first.stdout.split("run directory:")[-1].strip()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy", "retention", "agreement", "ece", "student_p50_ms",
                "student_p95_ms", "teacher_p50_ms", "teacher_p95_ms", "wall_s"):
        assert isinstance(metrics[key], (int, float)), key
    # The demo teacher is a real MiniLM classifier: far above chance (1/77) even on a quick slice.
    assert metrics["teacher_accuracy"] > 0.6
    assert metrics["student_accuracy"] > 1 / 77
    for name in ("config.yaml", "teacher_outputs.jsonl", "dataset.jsonl", "metrics.json", "report.md",
                 "manifest.json"):
        assert (run_dir / name).exists(), name
    assert list(run_dir.rglob("*.safetensors"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config_hash"] and manifest["artifacts"]

    # The re-run trains for two steps and evaluates lightly: what it checks is the teacher's side, and
    # training and evaluation settings are not part of a request's cache key, so the same answers must
    # come back without a paid call.
    light = ["train.max_steps=2", "evaluate.robustness=false", "evaluate.latency_teacher=false",
             "evaluate.latency_requests=10", "evaluate.export_runtimes=[]", "evaluate.serve_runtime=torch"]
    second = subprocess.run(cmd + [a for o in light for a in ("--set", o)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    run2 = tmp_path / second.stdout.split("run directory:")[-1].strip()
    outputs = [json.loads(l) for l in (run2 / "teacher_outputs.jsonl").read_text().splitlines()]
    assert outputs and all(r["cached"] for r in outputs), "a re-run must be served from the request cache"
