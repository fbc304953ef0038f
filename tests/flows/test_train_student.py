"""Training as the `train-student` deployment on a real Prefect server: a process work pool, a
worker subprocess polling it, and the rows and the student travelling through a directory store
(both processes are on this machine, so a directory is shared storage here)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from distill.config import ClassifierKDTrain
from distill.httpserver import stop_process
from distill.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["positive", "negative", "neutral"]
SPEC = next(d for d in yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
            if d["name"] == "train-student")


def training_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    words = {"positive": "great love good", "negative": "terrible hate bad", "neutral": "ok fine card"}
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        text = " ".join(rng.choice(words[label].split()) for _ in range(4))
        soft = {l: (0.8 if l == label else 0.1) for l in LABELS}
        rows.append({"id": f"r{i}", "text": text, "messages": [{"role": "user", "content": text}],
                     "target": label, "soft_labels": soft, "source": "teacher", "weight": 1.0,
                     "split": "validation" if i % 5 == 4 else "train"})
    return rows


def dataset(run_dir: Path, n: int) -> str:
    """n training rows in run_dir/dataset.jsonl, where the cycle's filter stage leaves them."""
    from distill.data import write_jsonl

    return str(write_jsonl(run_dir / "dataset.jsonl", training_rows(n)))


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


@pytest.fixture
def pool(prefect_harness):
    """A fresh `process` work pool with the process worker's default job template."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    name = f"train-pool-{uuid.uuid4().hex[:8]}"
    _api(lambda c: c.create_work_pool(WorkPoolCreate(
        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())))
    yield name
    _api(lambda c: c.delete_work_pool(name))


def deploy(pool: str, work_dir: Path) -> str:
    """Register train-student as deployments/prefect.yaml does, but on the process pool; returns its name."""
    async def register(client):
        flow_id = await client.create_flow_from_name("train-student")
        await client.create_deployment(
            flow_id=flow_id, name=f"{SPEC['name']}-{pool}", entrypoint=SPEC["entrypoint"], work_pool_name=pool,
            # What `prefect deploy` records without a pull section: the checkout it ran in.
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
            parameters={"work_dir": str(work_dir)}, concurrency_limit=SPEC.get("concurrency_limit"),
            job_variables={"env": dict(OFFLINE_ENV)})

    _api(register)
    return f"train-student/{SPEC['name']}-{pool}"


@pytest.fixture
def worker(pool, tmp_path):
    """`prefect worker start` on the pool, as a subprocess talking to the test server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                             "--limit", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    yield tmp_path / "worker.log"
    # A worker shuts down on SIGINT (Ctrl-C) at once; on SIGTERM it sat out the whole timeout.
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        stop_process(proc, timeout_s=5)
    log.close()


def test_trains_on_the_work_pool_and_brings_the_student_back(pool, worker, tmp_path, tiny_classifier):
    from distill_tasks.train import train_where_configured

    from distill.models.classifier import ClassifierStudent
    from distill.store import open_store

    store = tmp_path / "store"
    run_dir = tmp_path / "caller" / "run-1"  # not inside the store: the files must really come back
    name = deploy(pool, tmp_path / "worker-work")
    train = ClassifierKDTrain(deployment=name, student_model=tiny_classifier, max_steps=3, batch_size=8, eval_steps=3,
                        checkpoint_steps=3, logging_steps=1, device="cpu", deployment_timeout_s=300)
    started = time.monotonic()
    result = train_where_configured(dataset(run_dir, 30), LABELS, train, str(run_dir), run_id="run-1",
                                    store=str(store))
    print(f"remote training round trip: {time.monotonic() - started:.1f} s")

    assert result["steps"] == 3 and result["history"]
    model_dir = Path(result["model_dir"])
    assert model_dir == run_dir / "train" / "student"
    student = ClassifierStudent(model_dir)
    assert student.labels == LABELS
    probs = student.predict_proba(["great love", "bad hate"])
    assert probs.shape == (2, 3)
    assert Path(result["curves_png"]).is_file()

    # Trained by the worker on the pool, in its own work dir, and published to the store.
    run = _api(lambda c: c.read_flow_run(uuid.UUID(result["flow_run_id"])))
    assert run.state.is_completed() and run.work_pool_name == pool
    assert run.parameters["dataset_uri"] == "run-1/dataset.jsonl"
    assert (tmp_path / "worker-work" / "run-1" / "train" / "checkpoints").is_dir()
    target = open_store(str(store))
    keys = target.list("run-1/train/")
    assert "run-1/train/student/model.safetensors" in keys and "run-1/train/result.json" in keys
    assert not any("/checkpoints/" in k for k in keys)
    assert (model_dir / "model.safetensors").read_bytes() == target.get_bytes("run-1/train/student/model.safetensors")
    # The trained head differs from the random one it started from.
    import safetensors.torch

    before = safetensors.torch.load_file(tiny_classifier / "model.safetensors")
    after = safetensors.torch.load_file(model_dir / "model.safetensors")
    assert not all((before[k] == after[k]).all() for k in before if k in after and "classifier" in k)


def test_no_worker_on_the_pool_fails_with_a_clear_error(pool, tmp_path):
    from distill_tasks.train import train_where_configured

    name = deploy(pool, tmp_path / "worker-work")
    train = ClassifierKDTrain(deployment=name, max_steps=3, deployment_timeout_s=3)
    with pytest.raises(RuntimeError, match="is a worker polling"):
        train_where_configured(dataset(tmp_path / "run", 6), LABELS, train, str(tmp_path / "run"), run_id="run-2",
                               store=str(tmp_path / "store"))
    # The rows were persisted before the run was started.
    assert (tmp_path / "store" / "run-2" / "dataset.jsonl").is_file()


@pytest.mark.slow
def test_the_deployment_trains_with_two_processes_when_train_distributed_is_on(pool, worker, tmp_path,
                                                                               tiny_classifier):
    from distill_tasks.train import train_where_configured

    from distill.models.classifier import ClassifierStudent
    from distill.store import open_store

    store = tmp_path / "store"
    run_dir = tmp_path / "caller" / "run-3"
    name = deploy(pool, tmp_path / "worker-work")
    train = ClassifierKDTrain(deployment=name, student_model=tiny_classifier, max_steps=3, batch_size=4, eval_steps=3,
                              checkpoint_steps=3, logging_steps=1, device="cpu", deployment_timeout_s=300,
                              distributed={"enabled": True, "nproc": 2})
    result = train_where_configured(dataset(run_dir, 30), LABELS, train, str(run_dir), run_id="run-3",
                                    store=str(store))

    # Rank 0's summary came back through the store: two processes trained the 3 steps.
    assert result["world_size"] == 2 and result["steps"] == 3
    assert ClassifierStudent(Path(result["model_dir"])).labels == LABELS
    work = tmp_path / "worker-work" / "run-3" / "train"
    assert (work / "distributed" / "result.json").is_file() and not list(work.glob("distributed/rank-*.error.json"))
    # Both processes resumed from / wrote to the same checkpoint folder: one rng state per rank.
    assert sorted(p.name for p in (work / "checkpoints" / "checkpoint-3").glob("rng_state*")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]
    keys = open_store(str(store)).list("run-3/train/")
    assert "run-3/train/student/model.safetensors" in keys and not any("/distributed/" in k for k in keys)
