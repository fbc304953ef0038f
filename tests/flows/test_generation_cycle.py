"""`kind: generation` through the real cycle: the Prefect flow, `distill teacher serve` over a tiny
causal LM in its own process, SFT of a tiny causal-LM student, evaluation, gate, registry, manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill.demo import TEACHER_KEY_ENV, teacher_process
from distill.httpserver import free_port
from conftest import fresh_prefect_home

TEXTS = ["my card is lost", "refund pending please", "exchange rate fee", "top up declined", "new card order",
         "cash withdrawal fee", "verify my identity", "change my pin", "card payment declined", "close my account"]
GOLD = ["card lost", "refund pending", "exchange rate", "top up", "card order", "cash fee", "verify identity",
        "change pin", "payment declined", "close account"]


@pytest.mark.slow
def test_generation_cycle_runs_end_to_end(tmp_path, tiny_causal_lm):
    (tmp_path / "train.csv").write_text("text\n" + "\n".join(t for _ in range(3) for t in TEXTS) + "\n")
    (tmp_path / "test.csv").write_text("text,answer\n" + "\n".join(f"{t},{g}" for t, g in zip(TEXTS, GOLD)) + "\n")
    (tmp_path / "cfg.yaml").write_text(f"""
task:
  name: tiny-generation
  kind: generation
  train_path: train.csv
  test_path: test.csv
  labels_path: null
  label_field: answer
  system_prompt: answer in two words
# A random teacher never writes its EOS: a stop string ends its answers (finish_reason stop, not truncated).
generation: {{max_tokens: 4, concurrency: 4, top_logprobs: 2, extra_params: {{stop: [" "]}}}}
filter:
  heuristics: {{check_balance: false, refusal_patterns: []}}
  entropy: {{enabled: false}}
  dedup: {{enabled: false}}
  spotcheck: {{auto_approve: true}}
  mix: {{real_fraction: 0.0, validation_fraction: 0.2}}
train:
  mode: sft
  student_model: {tiny_causal_lm}
  max_steps: 4
  batch_size: 4
  eval_steps: 2
  checkpoint_steps: 2
  learning_rate: 1.0e-3
evaluate: {{latency_requests: 10, latency_concurrency: 2, tail_size: 4, robustness_rows: 2}}
gate: {{auto_promote: true}}
""")
    with teacher_process(tiny_causal_lm, free_port(), "tiny-teacher") as url:
        # Inside the block: the teacher's key is in this process's environment only while it runs.
        # A loaded CI machine can take long to start the ephemeral Prefect API: allow it.
        env = {**os.environ, "PREFECT_HOME": str(fresh_prefect_home(tmp_path / "prefect")), "PYTHONUNBUFFERED": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
        cmd = [sys.executable, "-m", "distill_flows.cli", "run", "cfg.yaml", "--set", f"teacher.base_url={url}/v1",
               "--set", "teacher.model=tiny-teacher", "--set", f"teacher.api_key_env={TEACHER_KEY_ENV}"]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / done.stdout.split("run directory:")[-1].strip()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["student_kind"] == "generative" and metrics["n_holdout"] == len(TEXTS)
    assert metrics["max_new_tokens"] == 4  # the teacher's generation.max_tokens, not a fixed cap
    for key in ("teacher_accuracy", "student_accuracy", "exact_match", "agreement", "mean_token_entropy",
                "student_p95_ms", "teacher_p95_ms", "ece_before"):
        assert isinstance(metrics[key], (int, float)), key
    records = [json.loads(l) for l in (run_dir / "teacher_outputs.jsonl").read_text().splitlines()]
    assert len(records) == len(TEXTS) * 3 and all(r["status"] == "done" for r in records)
    assert (run_dir / "train" / "model" / "model.safetensors").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["gate"]["checks"] and "registry" in manifest
