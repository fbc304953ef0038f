"""The generation task in a real Prefect flow: Secret-block key, output file, progress and summary artifacts."""

from __future__ import annotations

import json
from collections import Counter

from distill_tasks.generate import summary_table
from starlette.requests import Request

from distill.config import GenerationConfig, TeacherConfig
from distill.data import read_jsonl, write_jsonl
from distill.httpserver import start_in_thread

KEY = "sk-block-0123456789-SECRET"


def auth_app():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.counts = Counter()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "missing or wrong key"}}, 401)
        user = (await request.json())["messages"][-1]["content"]
        app.state.counts[user] += 1
        if user == "refuse":
            return JSONResponse({"error": {"message": "bad request"}}, 400)
        return JSONResponse({"model": "m", "choices": [{"message": {"content": user.upper()}, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 1}})

    return app


def test_summary_table_lists_every_metric_and_reason():
    table = summary_table({"done": 3, "failed": 2, "failed_by_reason": {"http_400": 1, "timeout": 1}})
    assert table == [{"metric": "done", "value": 3}, {"metric": "failed", "value": 2},
                     {"metric": "failed: http_400", "value": 1}, {"metric": "failed: timeout", "value": 1}]


def test_task_uses_secret_block_and_publishes_artifacts(prefect_harness, tmp_path, monkeypatch):
    from distill_tasks.generate import generate_completions
    from prefect import flow
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    monkeypatch.delenv("DISTILL_TASK_TEST_KEY", raising=False)
    Secret(value=KEY).save("distill-test-teacher-key", overwrite=True)
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": t}]} for i, t in enumerate(["a", "b", "refuse"])]
    out = tmp_path / "teacher.jsonl"
    with start_in_thread(auth_app()) as srv:
        teacher = TeacherConfig(base_url=srv.url + "/v1", api_key_env="DISTILL_TASK_TEST_KEY",
                                api_key_secret_block="distill-test-teacher-key")
        gen = GenerationConfig(cache_path=tmp_path / "cache.sqlite", logprobs=False)

        @flow
        def one() -> dict:
            return generate_completions(str(write_jsonl(tmp_path / "rows.jsonl", rows)), teacher, gen, str(out))

        state = one(return_state=True)
        summary = state.result()
        counts = srv.server.config.app.state.counts
    records = read_jsonl(out)
    assert [r["response"] for r in records] == ["A", "B", None]
    assert summary["done"] == 2 and summary["failed_by_reason"] == {"http_400": 1}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r1", "r2"]
    assert counts == {"a": 1, "b": 1, "refuse": 1}

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    # This run's artifacts only: the session's Prefect API also holds those of every other test's runs.
    mine = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=mine)
                if a.key and a.key.startswith("teacher-generation")}
    assert arts["teacher-generation-progress"].data == 100.0
    table = arts["teacher-generation-summary"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {"metric": "failed: http_400", "value": 1} in table
    blob = out.read_text() + json.dumps([a.model_dump(mode="json") for a in arts.values()])
    assert KEY not in blob
