"""A crashed run resumes: `distill run` killed by a real SIGKILL while training, then run again.

The teacher is `distill teacher serve` on a tiny random classifier, in its own process; the student
is another tiny classifier, so the cycle runs in a minute or two on 2 cores. Also here: a teacher
that dies or answers only errors stops the run in seconds, naming its URL, before the holdout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from distill_flows.cli import app
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from distill.httpserver import free_port, start_in_thread

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import make_tiny_bert_classifier, fresh_prefect_home  # noqa: E402
LABELS = ["positive", "negative", "neutral"]
WORDS = {"positive": "great love good fine thanks", "negative": "terrible hate bad lost declined",
         "neutral": "card account balance app phone"}


def write_rows(path: Path, n: int, prefix: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines, texts = ["id,text,label"], []
    for i in range(n):
        label = LABELS[i % 3]
        words = WORDS[label].split() + "my the a is card".split()
        texts.append(f"{prefix} {' '.join(rng.choice(words) for _ in range(6))} {i}")
        lines.append(f"{prefix}-{i},{texts[-1]},{label}")
    path.write_text("\n".join(lines) + "\n")
    return texts


def write_config(tmp_path: Path, base_url: str, **train: object) -> Path:
    train_lines = "".join(f"  {k}: {v}\n" for k, v in train.items())
    (tmp_path / "cfg.yaml").write_text(f"""\
task:
  name: crashtest
  kind: classification
  train_path: train.csv
  test_path: test.csv
  labels: [positive, negative, neutral]
  labels_path: null
  text_field: text
  label_field: label
  system_prompt: "Classify the message: positive, negative or neutral. Answer with the label only."
teacher:
  base_url: {base_url}
  model: teacher-model
  api_key_env: DISTILL_TEACHER_API_KEY
generation:
  cache_path: cache.sqlite
  concurrency: 8
filter:
  spotcheck:
    auto_approve: true
train:
  mode: classifier_kd
  student_model: student-model
  init_from_teacher: null
  batch_size: 8
{train_lines}evaluate:
  latency_requests: 10
  latency_concurrency: 1
  latency_concurrencies: [1]
  robustness: false
  latency_teacher: false
  export_runtimes: []
  serve_runtime: torch
  tail_size: 10
store: runs
registry: registry
""")
    return tmp_path / "cfg.yaml"


def cli_env(tmp_path: Path, prefect_home: Path | None = None) -> dict:
    return {**os.environ, "PREFECT_HOME": str(fresh_prefect_home(prefect_home or tmp_path / "prefect")),
            "PYTHONUNBUFFERED": "1",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",  # a loaded machine starts it slowly
            "DISTILL_TEACHER_API_KEY": "test-teacher-key-not-a-secret",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def start_teacher(model_dir: Path, port: int, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "teacher", "serve", str(model_dir), "--port",
                             str(port), "--model-name", "teacher-model"], cwd=cwd, env=cli_env(cwd),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "the teacher exited"
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the teacher did not start")


def complete(checkpoint: Path) -> bool:
    """Written to the end: the Trainer saves trainer_state.json last (a kill may cut it short)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def flow_run_state(prefect_home: Path, flow_run_id: str) -> str:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return db.execute("select state_type from flow_run where id = ?", (flow_run_id,)).fetchone()[0]


def task_run_states(prefect_home: Path, flow_run_id: str) -> dict[str, str]:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return dict(db.execute("select name, state_type from task_run where flow_run_id = ?", (flow_run_id,)))


@pytest.mark.slow
def test_a_run_killed_while_training_resumes_from_its_checkpoint_in_the_same_directory(tmp_path):
    make_tiny_bert_classifier(tmp_path / "teacher-model", LABELS, seed=1)
    make_tiny_bert_classifier(tmp_path / "student-model", LABELS, seed=2)
    write_rows(tmp_path / "train.csv", 240, "train", 0)
    write_rows(tmp_path / "test.csv", 30, "test", 1)
    port = free_port()
    teacher = start_teacher(tmp_path / "teacher-model", port, tmp_path)
    cfg = write_config(tmp_path, f"http://127.0.0.1:{port}/v1", max_steps=60, checkpoint_steps=5, eval_steps=5,
                       save_total_limit=2, early_stopping_patience="null")
    cmd = [sys.executable, "-m", "distill_flows.cli", "run", str(cfg)]
    try:
        log = (tmp_path / "first.log").open("w")
        first = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
        deadline, ckpt = time.monotonic() + 600, None
        while time.monotonic() < deadline and first.poll() is None and ckpt is None:
            ckpt = next((tmp_path / "runs").glob("*/train/checkpoints/checkpoint-*/trainer_state.json"), None)
            time.sleep(0.1)
        assert ckpt is not None, (tmp_path / "first.log").read_text()[-3000:]
        children = psutil.Process(first.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(c.cmdline()) for c in children)  # the temporary Prefect server
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()

        # No child outlives the killed run: the Prefect server and the watcher are gone within seconds.
        _, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], [" ".join(c.cmdline())[:120] for c in alive]

        run_dir = ckpt.parents[3]
        checkpoints = sorted(int(p.name.split("-")[1]) for p in (run_dir / "train/checkpoints").glob("checkpoint-*")
                             if complete(p))
        assert checkpoints and not (run_dir / "manifest.json").exists()
        killed_flow_run = json.loads((run_dir / ".claim.tmp").read_text())["flow_run_id"]
        assert flow_run_state(tmp_path / "prefect", killed_flow_run) == "RUNNING"

        listed = CliRunner().invoke(app, ["runs", "list", "--store", str(tmp_path / "runs"), "--json"])
        assert listed.exit_code == 0, listed.output
        [row] = json.loads(listed.output)
        assert row["run_id"] == run_dir.name and row["state"] == "crashed"
        assert row["checkpoint_step"] == checkpoints[-1]

        second = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True,
                                timeout=900)
    finally:
        teacher.terminate()
        teacher.wait(20)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"run directory: runs/{run_dir.name}" in second.stdout
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]  # no second run directory
    assert f"resuming training from checkpoint-{checkpoints[-1]} (step {checkpoints[-1]})" in out
    resumed = json.loads((run_dir / "train/resume.json").read_text())
    assert resumed["step"] == checkpoints[-1]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == checkpoints[-1]
    history = json.loads((run_dir / "train/history.json").read_text())
    assert max(h["step"] for h in history) == 60
    # The teacher was paid once: every answer of the second attempt came from the request cache.
    outputs = [json.loads(l) for l in (run_dir / "teacher_outputs.jsonl").read_text().splitlines()]
    assert outputs and all(r["cached"] for r in outputs)
    assert not (run_dir / ".claim.tmp").exists()
    # The killed attempt's flow run and its running task are Crashed in Prefect, not RUNNING forever.
    assert flow_run_state(tmp_path / "prefect", killed_flow_run) == "CRASHED"
    states = task_run_states(tmp_path / "prefect", killed_flow_run)
    assert "RUNNING" not in states.values() and "CRASHED" in states.values(), states


def dying_teacher(fail_after: int):
    """A chat endpoint that answers `fail_after` requests and then only 503; it records every request."""
    seen: list[dict] = []
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        seen.append(await request.json())
        if len(seen) > fail_after:
            return JSONResponse({"error": {"message": "backend down"}}, status_code=503)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}

    return api, seen


def flow_seconds(log: str) -> float:
    """Seconds from the flow run's first log line to its last, read from Prefect's HH:MM:SS.mmm stamps."""
    stamps = [line[:12] for line in log.splitlines() if "| Flow run " in line]
    first, last = (datetime.strptime(s, "%H:%M:%S.%f") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds() % 86400


@pytest.fixture(scope="module")
def shared_prefect_home(tmp_path_factory) -> Path:
    """One Prefect database for the dead-teacher runs: it is created (migrated) once."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.mark.parametrize("fail_after", [0, 1], ids=["dead-from-the-start", "dies-after-the-probe"])
def test_a_dead_teacher_stops_the_run_in_seconds_before_the_holdout(tmp_path, shared_prefect_home, fail_after):
    (tmp_path / "student-model").mkdir()  # never trained: the run stops long before
    write_rows(tmp_path / "train.csv", 12, "train", 0)
    holdout = write_rows(tmp_path / "test.csv", 6, "holdout", 1)
    api, seen = dying_teacher(fail_after)
    with start_in_thread(api) as server:
        url = f"{server.url}/v1"
        cfg = write_config(tmp_path, url)
        # Retries kept short so the test stays short: with the default 6 the same stop comes ~16 s later.
        result = subprocess.run([sys.executable, "-m", "distill_flows.cli", "run", str(cfg), "--set",
                                 "teacher.structured_output='off'", "--set", "generation.max_retries=1"],
                                cwd=tmp_path, env=cli_env(tmp_path, shared_prefect_home), capture_output=True, text=True,
                                timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    expected = "answers HTTP 503 to a plain probe" if fail_after == 0 else "answered none of the 8 training requests"
    assert f"error: teacher.base_url: {url}" in out and expected in out, out[-3000:]
    assert flow_seconds(out) < 15, out[-3000:]
    asked = [m["content"] for body in seen for m in body["messages"] if m["role"] == "user"]
    assert asked and not any(text in asked for text in holdout), "a holdout prompt reached the teacher"
    # Nothing half-written: the run directory of a run the teacher never answered is gone.
    assert list((tmp_path / "runs").iterdir()) == []


def test_the_demo_teacher_keeps_its_port_across_runs_of_a_working_directory(tmp_path):
    import socket

    from distill.demo import demo_port

    first = demo_port(tmp_path, wait_s=0)
    assert demo_port(tmp_path, wait_s=0) == first == int((tmp_path / "port").read_text())
    # Taken by another program: a free port, recorded so the next run finds the same URL again.
    with socket.socket() as other:
        other.bind(("127.0.0.1", first))
        other.listen()
        moved = demo_port(tmp_path, wait_s=0)
    assert moved != first and demo_port(tmp_path, wait_s=0) == moved
