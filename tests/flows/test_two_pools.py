"""The cycle on one work pool and drift-watch on another, sharing nothing but shared storage.

A real Prefect server, two `prefect worker start` processes on two process pools, each running its
flow runs in a directory of its own; the deployments are those of deployments/prefect.yaml with the
production preset, whose teacher (the hosted-chat stand-in, its own process) is an external
endpoint. The run store and the registry live in S3 (moto on 127.0.0.1), the shadow log and the
watch history in PostgreSQL (a server the test starts). drift-watch finds no champion before the
cycle and watches the one the cycle promoted after it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from distill.httpserver import stop_process
from distill.offline import OFFLINE_ENV

# Shared-storage servers of the store and shadow-log tests (pytest picks fixtures up by name).
from tests.distill.serve.test_shadow_postgres import postgres_url  # noqa: F401
from tests.distill.test_store import BUCKET, s3_endpoint  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}
sys.path.insert(0, str(ROOT / "tests"))
import chat_standin as standin  # noqa: E402

KEY = "sk-standin-two-pools"
# The quick settings of the other cycle tests: a small slice, every gate check off so the student ships.
QUICK = ["task.max_rows=150", "task.max_test_rows=40", "evaluate.robustness=false", "evaluate.latency_requests=20",
         "evaluate.tail_size=20", "gate.min_retention=null", "gate.max_ece=null", "gate.max_tail_gap=null",
         "gate.max_p95_ms=null", "gate.max_robustness_drop=null", "gate.max_latency_ratio=null",
         "gate.max_cost_ratio=null", "gate.max_export_drop=null"]


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


def _pool(name: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    _api(lambda c: c.create_work_pool(WorkPoolCreate(
        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())))


def _deploy(spec: dict, pool: str, work_dir: Path, parameters: dict) -> str:
    """Register a deployment of prefect.yaml on `pool`, its flow runs working in `work_dir`; returns its name."""
    flow_name = spec["entrypoint"].split(":")[1].replace("_", "-")

    async def register(client):
        flow_id = await client.create_flow_from_name(flow_name)
        await client.create_deployment(
            flow_id=flow_id, name=f"{spec['name']}-{pool}", entrypoint=str(ROOT / spec["entrypoint"]),
            work_pool_name=pool, parameters=parameters, concurrency_limit=spec.get("concurrency_limit"),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(work_dir)}}],
            job_variables={"env": dict(OFFLINE_ENV)})

    _api(register)
    return f"{flow_name}/{spec['name']}-{pool}"


def _worker(pool: str, home: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "worker.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                 "process", "--limit", "1"], env={**env, "PREFECT_HOME": str(home / "prefect")},
                                stdout=log, stderr=subprocess.STDOUT, cwd=home)
    return proc, log_path


@pytest.mark.slow
def test_cycle_and_drift_watch_on_two_pools_share_only_the_store(prefect_harness, s3_endpoint, postgres_url,
                                                                tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from distill.serve.registry import Registry
    from distill.serve.shadow import ShadowLog
    from distill.store import list_runs, open_store

    tag = uuid.uuid4().hex[:8]
    task = f"twopools{tag}"
    shared = [f"store=s3://{BUCKET}/{tag}/runs", f"registry=s3://{BUCKET}/{tag}/registry",
              f"serve.log_url={postgres_url}", f"task.name={task}"]
    preset = str(ROOT / DEPLOYMENTS["distillation-cycle"]["parameters"]["config_path"])
    assert preset == str(ROOT / DEPLOYMENTS["drift-watch"]["parameters"]["config_path"])
    teacher, url = standin.start()
    cycle_dir, watch_dir = tmp_path / "pool-a", tmp_path / "pool-b"
    workers = []
    try:
        pool_a, pool_b = f"cycle-{tag}", f"watch-{tag}"
        _pool(pool_a)
        _pool(pool_b)
        cycle = _deploy(DEPLOYMENTS["distillation-cycle"], pool_a, cycle_dir, {
            "config_path": preset,
            "overrides": [*shared, f"teacher.base_url={url}", "teacher.model=standin-chat", *QUICK]})
        watch = _deploy(DEPLOYMENTS["drift-watch"], pool_b, watch_dir, {
            "config_path": preset,
            "overrides": [*shared, "drift.embedder=null", "drift.reference_max_rows=40", "drift.relabel=false"]})
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        workers.append(_worker(pool_a, cycle_dir, {**env, "OPENAI_API_KEY": KEY}))
        workers.append(_worker(pool_b, watch_dir, env))  # no teacher key: the watch buys no labels

        # Before the cycle the shared registry has no champion: the watch on pool B says so and fails.
        before = run_deployment(watch, timeout=600)
        assert before.state.is_failed(), before.state
        assert Registry(f"s3://{BUCKET}/{tag}/registry").champion(task) is None

        done = run_deployment(cycle, timeout=900)
        logs = "".join(p.read_text()[-3000:] for _, p in workers)
        assert done.state.is_completed(), f"{done.state}\n{logs}"
        assert done.work_pool_name == pool_a
        champion = Registry(f"s3://{BUCKET}/{tag}/registry").champion(task)
        assert champion is not None and champion["promotion_reason"].startswith("gate passed")
        run_id = champion["run_id"]
        assert list_runs(open_store(f"s3://{BUCKET}/{tag}/runs")) == [run_id]

        after = run_deployment(watch, timeout=600)
        logs = "".join(p.read_text()[-3000:] for _, p in workers)
        assert after.state.is_completed(), f"{after.state}\n{logs}"
        assert after.work_pool_name == pool_b
        # The watch judged the champion the cycle promoted: its measurement is in the shared PostgreSQL log.
        history = [h for h in ShadowLog(postgres_url).watch_history() if h["model_run"] == run_id]
        assert len(history) == 1 and history[0]["holdout_accuracy"] is not None
        # ... scoring the model it downloaded from the shared registry into its own directory.
        local = watch_dir / ".distill" / "registry-cache" / task / run_id
        registry = Registry(f"s3://{BUCKET}/{tag}/registry")
        for rel, sha in champion["files"].items():
            assert registry.s3.get_bytes(f"{task}/{run_id}/{rel}", sha256=sha) == (local / rel).read_bytes(), rel
        # The pools' own directories hold no state of the other: no registry, runs or cache in common.
        assert not (cycle_dir / ".distill" / "registry").exists() and not (cycle_dir / "runs").exists()
        assert not (watch_dir / ".distill" / "staging").exists()
        assert not list(watch_dir.rglob("teacher-cache.sqlite"))
    finally:
        for proc, _ in workers:  # a worker obeys SIGINT at once; SIGTERM made it sit out the timeout
            proc.send_signal(signal.SIGINT)
        for proc, _ in workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                stop_process(proc, timeout_s=5)
        stop_process(teacher, timeout_s=10)
