"""deployments/prefect.yaml and docker/: what `prefect deploy` and `docker build` will read
points at real flows, parameters, presets and project files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}


def flow_signature(entrypoint: str) -> tuple[str, list[str]]:
    """(flow name from @flow(name=...), parameter names) read from source, without importing it."""
    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    deco = next(d for d in fn.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "flow")
    name = next(k.value.value for k in deco.keywords if k.arg == "name")
    return name, [a.arg for a in fn.args.args + fn.args.kwonlyargs]


def test_deployments_point_at_real_flows_and_parameters():
    assert set(DEPLOYMENTS) >= {"distillation-cycle", "drift-watch"}
    for dep in DEPLOYMENTS.values():
        name, params = flow_signature(dep["entrypoint"])
        assert name == dep["entrypoint"].split(":")[1].replace("_", "-").removesuffix("-flow")
        given = dep.get("parameters") or {}
        assert set(given) <= set(params), dep["name"]
        if "config_path" in given:
            assert (ROOT / given["config_path"]).exists(), given["config_path"]
        for trig in dep.get("triggers", []):
            assert set(trig.get("parameters", {})) <= set(params)


def test_schedules_and_trigger_are_valid_prefect_objects():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentEventTrigger

    cycle, watch = DEPLOYMENTS["distillation-cycle"], DEPLOYMENTS["drift-watch"]
    for dep in (cycle, watch):
        for s in dep["schedules"]:
            CronSchedule(cron=s["cron"], timezone=s["timezone"])
    (trig,) = cycle["triggers"]
    t = DeploymentEventTrigger.model_validate(trig)
    assert t.expect == {"distill.drift.detected"} and t.threshold == 1
    assert t.posture.value == "Reactive"
    assert re.search(r"event\.payload\.cycle_overrides", trig["parameters"]["overrides"])
    assert "triggers" not in watch  # the watch runs on its clock only
    canary = DEPLOYMENTS["canary-watch"]
    for s in canary["schedules"]:
        CronSchedule(cron=s["cron"], timezone=s["timezone"])
    assert "triggers" not in canary and canary["work_pool"]["name"] == "distill-cpu"


def test_work_pools_cpu_and_gpu():
    cycle, watch = DEPLOYMENTS["distillation-cycle"], DEPLOYMENTS["drift-watch"]
    assert watch["work_pool"]["name"] == "distill-cpu"
    gpu = cycle["work_pool"]
    assert gpu["name"] == "distill-gpu"
    jv = gpu["job_variables"]
    assert jv["image"].startswith("distill-cuda") and jv["gpu_count"] >= 1  # the Kubernetes template's variables
    assert "volumes" not in jv  # no container volume holds state: it all lives in the preset's shared storage
    assert DEPLOYMENTS["distillation-cycle-cpu"]["work_pool"]["name"] == "distill-cpu"


def test_scheduled_deployments_read_a_production_preset_on_shared_storage():
    from distill.config import load_config

    paths = {d["parameters"]["config_path"] for d in DEPLOYMENTS.values() if "config_path" in d.get("parameters", {})}
    # One preset for every pool: the cycle registers into the registry drift-watch reads.
    assert paths == {"deployments/configs/production-classification.yaml"}
    (path,) = paths
    cfg = load_config(ROOT / path)
    host = cfg.teacher.base_url.split("://", 1)[1].split("/")[0].split(":")[0]
    assert cfg.teacher.base_url.startswith("https://") and host not in ("127.0.0.1", "localhost", "0.0.0.0")
    assert cfg.store.startswith("s3://") and cfg.registry.startswith("s3://")
    assert cfg.serve.log_url.startswith("postgresql") and cfg.drift.log_url is None
    assert "@" in cfg.serve.log_url and ":" not in cfg.serve.log_url.split("://", 1)[1].split("@")[0]  # no password
    assert cfg.teacher.api_key_env and cfg.gate.auto_promote
    text = (ROOT / path).read_text()
    assert not re.search(r"sk-[A-Za-z0-9]|AKIA[A-Z0-9]{12}|aws_secret|password:", text, re.I)
    for name in ("distillation-cycle", "drift-watch"):
        assert DEPLOYMENTS[name]["schedules"][0]["active"] is True


@pytest.mark.parametrize("dockerfile,torch_index", [("Dockerfile.cpu", "whl/cpu"), ("Dockerfile.cuda", "whl/cu")])
def test_dockerfiles_install_the_project_files(dockerfile, torch_index):
    text = (ROOT / "docker" / dockerfile).read_text()
    assert '"torch==2.13.0"' in text and torch_index in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"
    assert "-c requirements.lock" in text
