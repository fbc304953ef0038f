"""The canary watch against a real `distill serve` process and a real Prefect API.

The teacher is another `distill serve` process serving the champion's weights (an OpenAI-compatible
endpoint that answers with a label and logprobs), so the champion agrees with it on every request.
The server under test serves the registry champion and, as a 50 % canary, the registry challenger,
in shadow mode: every request gets the teacher's answer in the log. A challenger with the champion's
weights but its labels rotated disagrees everywhere and must be stopped: no request reaches it
afterwards, and the decision is a Prefect event and an artifact with its numbers. A challenger as
good as the champion keeps its traffic.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml

from distill.evaluate import latency
from distill.serve.registry import Registry
from distill.serve.shadow import ShadowLog

KEY = "canary-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
WORDS = "great love good fine thanks terrible hate bad declined lost card account balance transfer app".split()


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + f" {i}" for i in range(n)]


def rotated_copy(model_dir: Path, dest: Path) -> Path:
    """The same weights with every label renamed to the next one: a canary that is wrong everywhere."""
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    names = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
    cfg["id2label"] = {str(i): names[(i + 1) % len(names)] for i in range(len(names))}
    cfg["label2id"] = {v: int(k) for k, v in cfg["id2label"].items()}
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def teacher(tiny_classifier, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary-teacher")
    with latency.serve_process(tiny_classifier, [f"serve.log_url=sqlite:///{tmp}/teacher-log.sqlite"],
                               api_key=KEY) as url:
        yield url


def setup_canary(tmp: Path, champion_dir: Path, challenger_dir: Path, teacher_url: str) -> dict:
    task = f"canarytest{random.randrange(10**6)}"
    registry = Registry(tmp / "registry")
    registry.register(task, "run-champion", champion_dir, {"agreement": 1.0}, {})
    registry.promote(task, "run-champion", "test champion")
    registry.register(task, "run-challenger", challenger_dir, {}, {})
    (tmp / "train.csv").write_text("text,category\n" + "".join(f"{t},positive\n" for t in texts(20, 9)))
    cfg = {
        "task": {"name": task, "train_path": str(tmp / "train.csv"), "test_path": None,
                 "labels": ["positive", "negative", "neutral"], "label_field": "category",
                 "system_prompt": "Classify the message."},
        "registry": str(tmp / "registry"),
        # The teacher endpoint is a student server: same key variable, its model name.
        "teacher": {"base_url": f"{teacher_url}/v1", "model": "distill-student", "api_key_env": "DISTILL_SERVE_API_KEY"},
        "serve": {"log_url": f"sqlite:///{tmp}/shadow.sqlite", "shadow": True, "shadow_teacher": True,
                  "canary_fraction": 0.5, "canary_poll_s": 0.2},
        "canary": {"window_requests": 1000, "min_requests": 40, "alpha": 0.01},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"task": task, "config": str(path), "log_url": cfg["serve"]["log_url"], "registry": registry}


def send(url: str, batch: list[str]) -> list[str]:
    """Who served each request (x-distill-model), from a client of its own over HTTP."""
    served = []
    with httpx.Client(timeout=30, headers=AUTH) as client:
        for t in batch:
            r = client.post(url + "/v1/chat/completions",
                            json={"model": "distill-student", "messages": [{"role": "user", "content": t}]})
            assert r.status_code == 200, r.text
            served.append(r.headers["x-distill-model"])
    return served


def wait_for_shadow(log_url: str, n: int, timeout: float = 120.0) -> list[dict]:
    """The logged rows once all n requests carry the teacher's shadow answer."""
    log = ShadowLog(log_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = log.recent()
            if len(rows) >= n and all(r.get("teacher_label") for r in rows):
                return rows
            assert time.monotonic() < deadline, f"{len(rows)} rows, shadow answers missing"
            time.sleep(0.3)
    finally:
        log.close()


def prefect_records(challenger_run: str) -> tuple[list, list]:
    """(canary events of this challenger, canary-decision artifacts) from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    async def read():
        async with get_client() as client:
            page = await client.read_events(EventFilter(
                event=EventNameFilter(prefix=["distill.canary."]),
                resource=EventResourceFilter(id=[f"distill.model.{challenger_run}"])), limit=50)
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["canary-decision"])))
            return page.events, arts

    return asyncio.run(read())


@pytest.mark.slow
def test_a_worse_canary_is_stopped_and_gets_no_more_traffic(prefect_harness, teacher, tiny_classifier, tmp_path):
    from distill_flows.canary_watch import canary_watch

    s = setup_canary(tmp_path, tiny_classifier, rotated_copy(tiny_classifier, tmp_path / "bad"), teacher)
    with latency.serve_process(None, api_key=KEY, config=s["config"], stderr_path=tmp_path / "serve.log") as url:
        assert httpx.get(url + "/health").json()["canary_fraction"] == 0.5
        before = send(url, texts(160, 1))
        assert before.count("challenger") >= 50 and before.count("champion") >= 50
        wait_for_shadow(s["log_url"], 160)

        out = canary_watch(config_path=s["config"])
        agreement = out["result"]["tests"]["agreement"]
        assert out["decision"] == "stop" and out["stopped"] is True and out["event_id"]
        assert agreement["champion_rate"] == 1.0 and agreement["challenger_rate"] == 0.0
        assert agreement["challenger_n"] == before.count("challenger") and agreement["p_value"] < 0.01
        assert s["registry"].status(s["task"], "run-challenger") == "stopped"

        time.sleep(1.0)  # > serve.canary_poll_s: the server has re-read the registry entry
        after = send(url, texts(80, 2))
        assert after == ["champion"] * 80, "a stopped canary still got traffic"
        assert httpx.get(url + "/health").json()["canary_fraction"] == 0.0
    assert "no more canary traffic" in (tmp_path / "serve.log").read_text()

    deadline, events = time.monotonic() + 30, []
    while not events and time.monotonic() < deadline:  # events reach the API through a background worker
        events, artifacts = prefect_records("run-challenger")
        time.sleep(0.5)
    [event] = [e for e in events if e.payload.get("task") == s["task"]]
    assert event.event == "distill.canary.stopped" and str(event.id) == out["event_id"]
    tests = event.payload["tests"]["agreement"]
    assert tests["challenger_rate"] == 0.0 and tests["champion_rate"] == 1.0 and tests["p_value"] < 0.01
    assert event.payload["served"]["challenger"] == before.count("challenger")
    mine = [a.data for a in artifacts if s["task"] in (a.data or "")]
    assert len(mine) == 1 and "**Canary stopped**" in mine[0]
    assert f"0.0000 (0/{before.count('challenger')})" in mine[0]  # the challenger's numbers in the table


@pytest.mark.slow
def test_a_canary_as_good_as_the_champion_keeps_its_traffic(prefect_harness, teacher, tiny_classifier, tmp_path):
    from distill_flows.canary_watch import canary_watch

    twin = shutil.copytree(tiny_classifier, tmp_path / "twin")
    s = setup_canary(tmp_path, tiny_classifier, twin, teacher)
    with latency.serve_process(None, api_key=KEY, config=s["config"]) as url:
        before = send(url, texts(160, 3))
        wait_for_shadow(s["log_url"], 160)
        out = canary_watch(config_path=s["config"])
        assert out["decision"] == "keep" and out["stopped"] is False and out["event_id"] is None
        assert out["result"]["tests"]["agreement"]["p_value"] > 0.01
        assert s["registry"].status(s["task"], "run-challenger") == "challenger"
        time.sleep(1.0)
        after = send(url, texts(80, 4))
        assert 15 <= after.count("challenger") <= 65 and before.count("challenger") >= 50
    events, artifacts = prefect_records("run-challenger")
    assert not [e for e in events if e.payload.get("task") == s["task"]]
    assert any(s["task"] in (a.data or "") and "Canary kept" in a.data for a in artifacts)
