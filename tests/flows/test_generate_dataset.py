"""`distill generate-dataset`: shards mapped over Prefect tasks (threads, then Dask), resumed without paying twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "distill/data/banking77"
sys.path.insert(0, str(REPO / "tests"))
import chat_standin as standin  # noqa: E402
from conftest import fresh_prefect_home  # noqa: E402


def stand_in_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/standin/stats", timeout=10) as r:
        return json.loads(r.read())


def stand_in_requests(url: str) -> int:
    return stand_in_stats(url)["requests"]


def run(tmp_path: Path, config: Path, prompts: Path, out: Path, *overrides: str,
        env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(fresh_prefect_home(tmp_path / "prefect")), "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    args = [sys.executable, "-m", "distill_flows.cli", "generate-dataset", str(config), "--input", str(prompts),
            "--out-dir", str(out)]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_shards_fan_out_resume_and_run_on_dask(tmp_path):
    import csv

    with (DATA / "test.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:120]
    prompts = tmp_path / "prompts.jsonl"
    # A repeated text: exact dedup keeps its first occurrence, across shards.
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "text": r["text"]}) + "\n" for i, r in enumerate(rows))
                       + json.dumps({"id": "again", "text": rows[3]["text"]}) + "\n")
    proc, url = standin.start()
    try:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "task": {"name": "shards", "kind": "classification", "train_path": str(DATA / "train.csv"),
                     "labels_path": str(DATA / "categories.json"), "text_field": "text",
                     "system_prompt": "Classify the message into one of these labels:\n\n{labels}\n\n"
                                      "Answer with the label only."},
            "teacher": {"base_url": url, "model": "hosted-chat", "input_price_per_1m": 0.15,
                        "output_price_per_1m": 0.6},
            "generation": {"concurrency": 8, "max_tokens": 16, "top_logprobs": 5, "backoff_base_s": 0.01,
                           "cache_path": str(tmp_path / "cache.sqlite"), "shard_rows": 25, "shard_workers": 2},
        }))
        out = tmp_path / "out"
        first = run(tmp_path, config, prompts, out)
        assert first.returncode == 0, first.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rows"] == 121 and summary["shards"] == 5 and summary["done"] == 121
        assert summary["failed"] == 0 and summary["shards_skipped"] == 0
        # Two shard tasks ran at once: their Prefect task runs overlap in the log.
        assert first.stderr.count("answer-shard-") >= 5
        kept = [json.loads(x) for i in range(5) for x in (out / f"kept-{i:06d}.jsonl").read_text().splitlines()]
        rejected = [json.loads(x) for i in range(5) for x in (out / f"rejected-{i:06d}.jsonl").read_text().splitlines()]
        assert len(kept) + len(rejected) == 121
        assert [r["id"] for r in rejected if r["stage"] == "dedup"] == ["again"]
        assert all(r["label"] in json.loads((DATA / "categories.json").read_text()) for r in kept)
        asked = stand_in_requests(url)
        assert asked >= 120  # one request per distinct prompt (the repeated text is one request), plus 429 retries

        again = run(tmp_path, config, prompts, out)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["shards_skipped"] == 5
        assert stand_in_requests(url) == asked

        # The same prompts on Dask worker processes, into a new directory: every answer from the shared cache.
        dask_out = tmp_path / "dask"
        on_dask = run(tmp_path, config, prompts, dask_out, "generation.task_runner=dask")
        assert on_dask.returncode == 0, on_dask.stderr[-3000:]
        s = json.loads((dask_out / "summary.json").read_text())
        assert s["done"] == 121 and s["cached"] == 121 and s["cost_usd"] == 0
        assert stand_in_requests(url) == asked
    finally:
        proc.terminate()
        proc.wait()


def _dask_cluster(workers: int, env: dict, log: Path) -> tuple[str, list[subprocess.Popen]]:
    """A Dask scheduler and `workers` single-threaded worker processes, each a process of its own."""
    import time

    from distill.httpserver import free_port

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    out = log.open("w")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=env, stdout=out, stderr=out)]
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers",
                                   str(workers), "--nthreads", "1", "--no-dashboard"], env=env, stdout=out,
                                  stderr=out))
    from distributed import Client

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with Client(address, timeout=5) as client:
                if len(client.scheduler_info()["workers"]) == workers:
                    return address, procs
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Dask cluster did not come up: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_on_a_shared_dask_cluster_the_global_limit_admits_shard_workers_shards_at_once(prefect_harness, tmp_path):
    """Four Dask workers could take four shards at once; the Prefect limit lets shard_workers (2) hold one."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from distill.httpserver import stop_process

    import csv

    prompts = tmp_path / "prompts.jsonl"
    with (DATA / "test.csv").open(newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in list(csv.DictReader(f))[:160]]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": t}]}) + "\n"
                               for i, t in enumerate(texts)))
    config = tmp_path / "config.yaml"
    proc, url = standin.start("--latency-s", "0.1")  # a hosted model takes time: shards overlap for real
    # The flow and every Dask worker talk to the same Prefect server, as on a shared cluster.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cluster = []
    try:
        address, cluster = _dask_cluster(4, env, tmp_path / "dask.log")
        config.write_text(yaml.safe_dump({
            "teacher": {"base_url": url, "model": "hosted-chat"},
            "generation": {"concurrency": 4, "max_tokens": 16, "logprobs": False, "backoff_base_s": 0.01,
                           "cache_path": str(tmp_path / "cache.sqlite"), "shard_rows": 20, "shard_workers": 2,
                           "task_runner": "dask", "dask_address": address}}))
        out = tmp_path / "out"
        done = run(tmp_path, config, prompts, out, env={"PREFECT_API_URL": env["PREFECT_API_URL"]})
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["shards"] == 8 and summary["done"] == 160 and summary["failed"] == 0
        # Each shard worker sends concurrency / shard_workers = 2 requests at once. Two shards at a time
        # reach 4 in flight; the four Dask workers unchecked would have reached 8.
        most = stand_in_stats(url)["max_in_flight"]
        assert 2 < most <= 4, most
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name("distill-shards-hosted-chat")
        assert limit.limit == 2 and limit.active_slots == 0  # every slot handed back
    finally:
        for p in reversed(cluster):
            stop_process(p, timeout_s=10)
        proc.terminate()
        proc.wait()


def test_a_bad_prompt_row_stops_it_by_file_and_line_before_any_request(tmp_path):
    config = tmp_path / "config.yaml"
    # No teacher listens at this port: a request would fail the run differently, and later.
    config.write_text(yaml.safe_dump({"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
                                      "generation": {"cache_path": str(tmp_path / "cache.sqlite")}}))
    missing = run(tmp_path, config, tmp_path / "nope.jsonl", tmp_path / "out")
    assert missing.returncode == 2 and "nope.jsonl: file not found (--input)" in missing.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n{"id": "b"}\n')
    bad = run(tmp_path, config, prompts, tmp_path / "out")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "prompts.jsonl:2: no 'messages'" in bad.stderr
    assert not (tmp_path / "cache.sqlite").exists() and list((tmp_path / "out").glob("prompts-*")) == []
