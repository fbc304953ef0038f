"""deployments/k8s/gpu-job-template.json, the base job template of the `distill-gpu` Kubernetes work pool:
a real Prefect server accepts it and the job variables of deployments/prefect.yaml, and the
Kubernetes worker's own code (prefect-kubernetes) renders the Job it would create for a flow run."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

from distill.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = json.loads((ROOT / "deployments" / "k8s" / "gpu-job-template.json").read_text())
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


def _cuda_image_tag() -> str:
    """The tag docker/Dockerfile.cuda tells you to build (`docker build ... -t TAG .`)."""
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    return re.search(r"docker build -f docker/Dockerfile\.cuda -t (\S+) \.", text).group(1)


@pytest.fixture
def rendered(prefect_harness):
    """(flow run, the Job manifest the worker would submit) for a run of the train-student deployment, with
    the pool created from the template and the deployment from prefect.yaml on a real server."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    spec = DEPLOYMENTS["train-student"]
    pool = f"{spec['work_pool']['name']}-{uuid.uuid4().hex[:6]}"

    async def register(client):
        await client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=TEMPLATE))
        flow_id = await client.create_flow_from_name("train-student")
        dep_id = await client.create_deployment(flow_id=flow_id, name=spec["name"], entrypoint=spec["entrypoint"],
                                                work_pool_name=pool,
                                                job_variables=spec["work_pool"]["job_variables"],
                                                pull_steps=spec["pull"])
        run = await client.create_flow_run_from_deployment(dep_id)
        return (await client.read_work_pool(pool)), (await client.read_deployment(dep_id)), run

    work_pool, deployment, run = _api(register)
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        work_pool.base_job_template, {**deployment.job_variables, **(run.job_variables or {})}))
    config.prepare_for_flow_run(run, deployment=deployment)
    yield run, config.job_manifest, config
    _api(lambda c: c.delete_work_pool(pool))


def test_gpu_deployments_use_the_kubernetes_pool():
    for name in ("distillation-cycle", "train-student"):
        pool = DEPLOYMENTS[name]["work_pool"]
        assert pool["name"] == "distill-gpu", name
        assert pool["job_variables"]["image"] == _cuda_image_tag(), name
    assert set(DEPLOYMENTS["train-student"]["work_pool"]["job_variables"]) <= set(TEMPLATE["variables"]["properties"])


def test_rendered_job_requests_the_gpu_in_the_cuda_image(rendered):
    run, job, config = rendered
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == _cuda_image_tag() == "distill-cuda:latest"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    # The flow run itself: the worker's command and the run's id reach the pod.
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id)
    assert {k: env.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV  # the template's defaults, as in the images
    # Credentials come from a Kubernetes Secret, never from the template or the deployment.
    assert container["envFrom"] == [{"secretRef": {"name": "distill-shared-storage"}}]
    assert not any(re.search(r"SECRET|PASSWORD|API_KEY", k) for k in env)
    assert container["workingDir"] == "/opt/distill"  # the CUDA image's WORKDIR, where the pull step goes
    pod = job["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert job["metadata"]["namespace"] == config.namespace == "distill"
    assert job["metadata"]["generateName"].endswith("-")


def test_job_variables_override_the_gpu_count_and_image(prefect_harness):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        TEMPLATE, {"gpu_count": 4, "image": "registry.example.com/distill-cuda:1.2", "shm_size": "32Gi"}))
    (container,) = config.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["image"] == "registry.example.com/distill-cuda:1.2"
    assert config.job_manifest["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == "32Gi"


def test_the_server_refuses_a_job_variable_the_template_does_not_take(prefect_harness):
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"gpu-bad-{uuid.uuid4().hex[:6]}"

    async def register(client):
        await client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=TEMPLATE))
        flow_id = await client.create_flow_from_name("train-student")
        return await client.create_deployment(flow_id=flow_id, name="bad", entrypoint="flows/train_student.py:x",
                                              work_pool_name=pool, job_variables={"gpu_count": 0})

    try:
        with pytest.raises(Exception, match="gpu_count|minimum|less than"):
            _api(register)
    finally:
        _api(lambda c: c.delete_work_pool(pool))
