"""The drift-watch flow on a real Prefect API: quiet on undrifted traffic; on drifted traffic it
emits distill.drift.detected, writes the artifact, and the deployment trigger from
deployments/prefect.yaml creates a distillation-cycle flow run (no worker needed)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.serve.registry import Registry
from distill.serve.shadow import ShadowLog

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["positive", "negative", "neutral"]
WORDS = {"positive": "great love good fine thanks", "negative": "terrible hate bad declined lost",
         "neutral": "card account balance transfer app"}


def sentences(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = WORDS[label].split()
        out.append((" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))), label))
    return out


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,category\n" + "".join(f"{t},{l}\n" for t, l in rows))
    return path


@pytest.fixture
def setup(tmp_path, tiny_classifier):
    """A task, a registry whose champion is the tiny classifier, and an empty traffic log."""
    task = f"drifttest{random.randrange(10**6)}"
    registry = Registry(tmp_path / "registry")
    registry.register(task, "run-1", tiny_classifier, {"student_accuracy": 0.34, "agreement": 1.0}, {})
    registry.promote(task, "run-1", "test champion")
    cfg = {
        "task": {"name": task, "train_path": str(write_csv(tmp_path / "train.csv", sentences(300, 0))),
                 "test_path": str(write_csv(tmp_path / "test.csv", sentences(60, 1))),
                 "labels": LABELS, "label_field": "category", "system_prompt": "Classify the message."},
        "registry": str(tmp_path / "registry"),
        "serve": {"log_url": f"sqlite:///{tmp_path}/shadow.sqlite"},
        "drift": {"embedder": None, "min_requests": 100, "min_shadow_pairs": 30, "min_feedback": 100,
              "permutations": 200, "report_dir": str(tmp_path / "drift")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"task": task, "config": str(path), "log": ShadowLog(cfg["serve"]["log_url"]), "tmp": tmp_path}


def log_traffic(log: ShadowLog, texts: list[str], flip_teacher: float, seed: int, shadow: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for t in texts:
        p = rng.dirichlet(np.ones(3))
        q = np.roll(p, 1) if rng.random() < flip_teacher else p
        row = {"request_id": f"r{rng.integers(1e12)}", "text": t, "served_by": "champion",
               "champion_label": LABELS[int(p.argmax())], "champion_probs": dict(zip(LABELS, p.tolist()))}
        if shadow:
            row.update(teacher_label=LABELS[int(q.argmax())], teacher_probs=dict(zip(LABELS, q.tolist())))
        rows.append(row)
    log.append_many(rows)
    return rows


def test_quiet_on_undrifted_traffic(prefect_harness, setup):
    from distill_flows.drift_watch import drift_watch

    log_traffic(setup["log"], [t for t, _ in sentences(200, 2)], flip_teacher=0.0, seed=0)
    # Same inputs as training, a teacher that still agrees: no baseline is adjusted to today's value.
    out = drift_watch(config_path=setup["config"])
    assert out["fired"] == [] and out["event_id"] is None
    r = out["results"]
    assert r["divergence"]["status"] == "no drift" and r["divergence"]["value"] == 1.0
    assert r["divergence"]["n"] == 200 and out["labelled"]["from_shadow"] == 200
    assert r["input_drift"]["p_value"] > 0.01
    # no gold feedback yet, one cycle of history: these say so instead of guessing
    assert r["accuracy_drop"]["status"] == "not enough data"
    assert r["entropy_collapse"]["status"] == "not enough data"
    # the static holdout is a regression check, reported apart and never a drift event
    assert "holdout_regression" in out["checks"] and "holdout_regression" not in r
    assert "## Regression checks" in out["report"] and "p = " in out["report"]
    assert Path(out["plot"]).read_bytes()[:4] == b"\x89PNG" and "data:image/png;base64," in out["report"]
    history = setup["log"].watch_history()
    assert len(history) == 1 and history[0]["model_run"] == "run-1"


def test_gold_feedback_from_the_cli_drives_the_accuracy_sensor(prefect_harness, setup):
    from distill_flows.drift_watch import drift_watch
    from typer.testing import CliRunner

    from distill.cli import app

    rows = log_traffic(setup["log"], [t for t, _ in sentences(150, 4)], flip_teacher=0.0, seed=2)
    before = drift_watch(config_path=setup["config"], overrides=["drift.min_feedback=100"])
    assert before["results"]["accuracy_drop"]["status"] == "not enough data"
    # Gold arrives later, and says the champion was wrong on most of these requests.
    wrong = {r["request_id"]: LABELS[(LABELS.index(r["champion_label"]) + 1) % 3] for r in rows[:120]}
    feedback = setup["tmp"] / "gold.csv"
    feedback.write_text("request_id,label\n" + "".join(f"{k},{v}\n" for k, v in wrong.items()))
    bad = setup["tmp"] / "bad.csv"
    bad.write_text("request_id,label\n" + f"{rows[0]['request_id']},positive\nr-unknown,positive\n")
    cli = CliRunner()
    refused = cli.invoke(app, ["feedback", str(bad), "--config", setup["config"]])
    assert refused.exit_code == 2 and "r-unknown" in refused.output and "nothing was written" in refused.output
    assert all(r["gold"] is None for r in setup["log"].recent())
    done = cli.invoke(app, ["feedback", str(feedback), "--config", setup["config"]])
    assert done.exit_code == 0, done.output
    assert "120 gold label(s)" in done.output
    after = drift_watch(config_path=setup["config"], overrides=["drift.min_feedback=100"])
    acc = after["results"]["accuracy_drop"]
    assert acc["fired"] is True and acc["n"] == 120 and acc["p_value"] < 0.01 and acc["value"] == 0.0


def _register_cycle_deployment(task: str) -> str:
    """Register `distillation-cycle` and its triggers exactly as deployments/prefect.yaml defines them."""
    from prefect.client.orchestration import get_client
    from prefect.events import DeploymentEventTrigger

    spec = next(d for d in yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
                if d["name"] == "distillation-cycle")

    async def register() -> str:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("distillation-cycle")
            dep_id = await client.create_deployment(flow_id=flow_id, name=f"distillation-cycle-{task}",
                                                    entrypoint=spec["entrypoint"], parameters=spec["parameters"])
            for t in spec["triggers"]:
                trigger = DeploymentEventTrigger.model_validate(dict(t, name=f"{t['name']}-{task}"))
                trigger.set_deployment_id(dep_id)
                await client.create_automation(trigger.as_automation())
            return str(dep_id)

    return asyncio.run(register())


def _flow_runs(deployment_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    return asyncio.run(read())


def test_drift_fires_event_and_trigger_starts_distillation_cycle(prefect_harness, setup):
    from distill_flows.drift_watch import drift_watch
    from distill_tasks.drift import score_holdout
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    dep_id = _register_cycle_deployment(setup["task"])
    time.sleep(2)  # the trigger service loads new automations periodically
    from distill.config import load_config

    cfg = load_config(setup["config"])
    now = score_holdout.fn(str(Registry(cfg.registry).champion(setup["task"])["path"]), cfg.task, cfg.drift)
    hi = math.log(3)
    # Three earlier champions, each sharper than the last, at the same accuracy: with this one, a
    # significant trend over four cycles (the exact test's p is 1/24).
    for i, run in enumerate(("run-0a", "run-0b", "run-0c")):
        setup["log"].record_watch(run, now["accuracy"], hi - (hi - now["entropy"]) * i / 3 - 1e-9, None, [])
    # Drifted traffic: shouted, full of reference numbers, and the teacher disagrees half the time.
    texts = [f"{t.upper()} REF {i * 7919} ORDER 55{i}" for i, (t, _) in enumerate(sentences(200, 3))]
    rows = log_traffic(setup["log"], texts, flip_teacher=0.5, seed=1)
    from distill.drift.feedback import apply_feedback

    apply_feedback(setup["log"], {r["request_id"]: LABELS[(LABELS.index(r["champion_label"]) + 1) % 3]
                                  for r in rows[:150]}, "gold.csv")

    out = drift_watch(config_path=setup["config"], overrides=["drift.baseline_accuracy=0.95"])
    assert set(out["fired"]) == {"accuracy_drop", "entropy_collapse", "divergence", "input_drift"}
    assert out["event_id"]

    deadline = time.monotonic() + 90
    runs = []
    while time.monotonic() < deadline and not runs:
        runs = _flow_runs(dep_id)
        time.sleep(1)
    assert len(runs) == 1, "the drift event did not create a distillation-cycle flow run"
    params = runs[0].parameters
    assert params["config_path"] == setup["config"]
    log_url = cfg.serve.log_url
    assert params["overrides"] == ["drift.baseline_accuracy=0.95", "parent_run=run-1",
                                   f'filter.mix.traffic_log_url="{log_url}"']
    # the cycle the trigger starts reads its traffic from the log the sensors judged
    assert load_config(setup["config"], params["overrides"]).filter.mix.traffic_log_url == log_url

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drift-report"])))

    reports = [a.data for a in asyncio.run(artifacts())]
    assert any("Drift detected" in r and setup["task"] in r for r in reports)


def test_input_drift_reference_is_the_champions_early_traffic(tmp_path):
    from distill_tasks.drift import read_traffic

    log = ShadowLog(f"sqlite:///{tmp_path}/log.sqlite")
    old = [{"request_id": f"o{i}", "text": f"old {i}", "champion_run": "run-0"} for i in range(50)]
    early = [{"request_id": f"e{i}", "text": f"early {i}", "champion_run": "run-1"} for i in range(300)]
    recent = [{"request_id": f"n{i}", "text": f"new {i}", "champion_run": "run-1"} for i in range(200)]
    log.append_many(old + early + recent)
    out = read_traffic.fn(log.url, 200, ["run-1"], 250)
    assert [r["text"] for r in out["rows"]] == [r["text"] for r in recent]
    # the oldest requests this champion served, none of another champion's and none of the judged window
    assert out["reference_texts"] == [r["text"] for r in early[:250]]
    wide = read_traffic.fn(log.url, 400, ["run-1"], 250)
    assert wide["reference_texts"] == [r["text"] for r in early[:100]]
    assert read_traffic.fn(log.url, 200, None, 250)["reference_texts"] == []
    log.close()


def test_without_shadow_a_sample_is_relabelled_once_and_charged(prefect_harness, setup):
    """Shadow off: the watch buys teacher labels for a random sample from a hosted-like teacher
    (tests/chat_standin.py, its own process), charges the drift ledger, and never buys one twice."""
    import json
    import socket
    import subprocess
    import sys

    from distill_flows.drift_watch import drift_watch

    from distill.httpserver import free_port
    from distill.teacher.ratelimit import Ledger

    tmp = setup["tmp"]
    traffic = sentences(120, 5)
    data = write_csv(tmp / "traffic.csv", traffic)
    (tmp / "labels.json").write_text(json.dumps(LABELS))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/chat_standin.py"), "--port", str(port), "--data",
                             str(data), "--labels", str(tmp / "labels.json")])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "stand-in did not start"
                time.sleep(0.2)
        log_traffic(setup["log"], [t for t, _ in traffic], flip_teacher=0.0, seed=3, shadow=False)
        ledger = tmp / "drift-ledger.jsonl"
        overrides = [f"teacher.base_url=http://127.0.0.1:{port}/v1", "teacher.model=hosted",
                     "teacher.input_price_per_1m=1.0", "teacher.output_price_per_1m=2.0",
                     f"generation.cache_path={tmp / 'cache.sqlite'}", "generation.backoff_base_s=0.01",
                     f"drift.ledger_path={ledger}", "drift.label_sample=80", "drift.min_shadow_pairs=50"]
        first = drift_watch(config_path=setup["config"], overrides=overrides)
        got = first["labelled"]
        assert got["from_shadow"] == 0 and 70 <= got["relabelled"] <= 80 and got["cost_usd"] > 0
        spent = Ledger(ledger, None).by_purpose()
        assert set(spent) == {"drift-relabel"} and spent["drift-relabel"] == pytest.approx(got["cost_usd"], abs=1e-6)
        stored = [r for r in setup["log"].recent() if r["teacher_label"] is not None]
        assert len(stored) == got["relabelled"]  # bought labels are kept in the log
        # A random champion against a teacher that is right ~90 % of the time: agreement is far below 1.0.
        assert first["results"]["divergence"]["fired"] is True
        second = drift_watch(config_path=setup["config"], overrides=overrides)
        assert second["labelled"]["from_shadow"] == len(stored)  # reused, not bought again
        # only requests still without a label were bought the second time: none is labelled twice
        assert got["relabelled"] + second["labelled"]["relabelled"] <= len(traffic)
        assert second["labelled"]["sampled"] == len(stored) + min(80, len(traffic) - len(stored))
    finally:
        proc.terminate()
        proc.wait(10)
