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
        "drift": {"embedder": None, "min_requests": 100, "min_shadow_pairs": 30, "permutations": 200},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"task": task, "config": str(path), "log": ShadowLog(cfg["serve"]["log_url"]), "tmp": tmp_path}


def log_traffic(log: ShadowLog, texts: list[str], flip_teacher: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for t in texts:
        p = rng.dirichlet(np.ones(3))
        q = np.roll(p, 1) if rng.random() < flip_teacher else p
        rows.append({"request_id": f"r{rng.integers(1e12)}", "text": t, "served_by": "champion",
                     "champion_label": LABELS[int(p.argmax())], "champion_probs": dict(zip(LABELS, p.tolist())),
                     "teacher_label": LABELS[int(q.argmax())], "teacher_probs": dict(zip(LABELS, q.tolist()))})
    log.append_many(rows)


def test_quiet_on_undrifted_traffic(prefect_harness, setup):
    from distill_flows.drift_watch import drift_watch
    from distill_tasks.drift import score_holdout

    from distill.config import load_config

    cfg = load_config(setup["config"])
    now = score_holdout.fn(str(Registry(cfg.registry).champion(setup["task"])["path"]), cfg.task, cfg.drift)
    log_traffic(setup["log"], [t for t, _ in sentences(200, 2)], flip_teacher=0.0, seed=0)
    # promoted at today's accuracy, same inputs as training, a teacher that still agrees
    out = drift_watch(config_path=setup["config"], overrides=[f"drift.baseline_accuracy={now['accuracy']}"])
    assert out["fired"] == [] and out["event_id"] is None
    assert out["results"]["accuracy_drop"]["value"] == 0.0
    assert out["results"]["input_drift"]["p_value"] > 0.01
    assert out["results"]["divergence"]["value"] == 0.0
    history = setup["log"].watch_history()
    assert len(history) == 1 and history[0]["model_run"] == "run-1"


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
    # Two earlier champions with higher holdout entropy and the same accuracy: a third cycle of collapse.
    from distill.config import load_config

    cfg = load_config(setup["config"])
    now = score_holdout.fn(str(Registry(cfg.registry).champion(setup["task"])["path"]), cfg.task, cfg.drift)
    hi = math.log(3)
    for run, ent in (("run-0a", hi - 1e-9), ("run-0b", (hi + now["entropy"]) / 2)):
        setup["log"].record_watch(run, now["accuracy"], ent, None, [])
    # Drifted traffic: shouted, full of reference numbers, and the teacher disagrees half the time.
    texts = [f"{t.upper()} REF {i * 7919} ORDER 55{i}" for i, (t, _) in enumerate(sentences(200, 3))]
    log_traffic(setup["log"], texts, flip_teacher=0.5, seed=1)

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
    assert params["overrides"] == ["drift.baseline_accuracy=0.95", "parent_run=run-1"]

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drift-report"])))

    reports = [a.data for a in asyncio.run(artifacts())]
    assert any("Drift detected" in r and setup["task"] in r for r in reports)
