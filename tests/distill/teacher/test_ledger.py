"""One budget for the run: every generate() call of a run charges one ledger and is capped by what is left."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import GenerationConfig, GraderConfig, TeacherConfig
from distill.filter.grader import grade
from distill.httpserver import start_in_thread
from distill.teacher.generation import generate
from distill.teacher.ratelimit import Ledger
from tests.distill.serve.test_shadow_postgres import postgres_url  # noqa: F401  (the PostgreSQL fixture)

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import chat_standin as standin  # noqa: E402

LABELS = json.loads((ROOT / "distill/data/banking77/categories.json").read_text())
GOLDS = standin.load_golds([str(ROOT / "distill/data/banking77/test.csv")])
TEXTS = list(GOLDS)[:40]


def rows(texts, tag):
    return [{"id": f"{tag}{i}", "messages": [{"role": "user", "content": t}]} for i, t in enumerate(texts)]


def test_later_calls_get_what_the_run_has_left_not_a_fresh_budget(tmp_path):
    app = standin.build_app(GOLDS, LABELS)
    ledger_path = tmp_path / "ledger.jsonl"
    with start_in_thread(app) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="m", input_price_per_1m=1000.0,
                                output_price_per_1m=1000.0)
        probe = GenerationConfig(cache_path=tmp_path / "probe.sqlite", max_tokens=8, concurrency=1,
                                 backoff_base_s=0.01)
        one = generate(rows(TEXTS[:1], "p"), teacher, probe, api_key=None).records[0]["cost_usd"]
        # The cap covers about 30 of these requests (the estimate reserved per request is higher).
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", max_tokens=8, concurrency=1, backoff_base_s=0.01,
                               budget_usd=30 * one, ledger_path=ledger_path)
        first = generate(rows(TEXTS[:20], "a"), teacher, gen, api_key=None)
        second = generate(rows(TEXTS[20:40], "b"), teacher, gen, api_key=None, purpose="holdout")
    ledger = Ledger(ledger_path, gen.budget_usd)
    assert first.summary["budget_exhausted"] is False
    assert second.summary["budget_exhausted"] is True  # a fresh cap per call would have bought all 20
    assert ledger.spent() <= gen.budget_usd
    assert ledger.spent() == round(first.summary["cost_usd"] + second.summary["cost_usd"], 6)
    assert set(ledger.by_purpose()) == {"generation", "holdout"}


def test_the_graders_spend_is_in_the_ledger(tmp_path):
    from fastapi import FastAPI

    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(body: dict):
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": '{"score": 5, "reason": "ok"}'},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 100, "completion_tokens": 10}}

    ledger_path = tmp_path / "ledger.jsonl"
    with start_in_thread(api) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="m", input_price_per_1m=1.0,
                                output_price_per_1m=1.0)
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", ledger_path=ledger_path,
                               extra_params={"response_format": {"type": "json_object"}})
        candidates = [{"id": "a", "sample": 0, "text": "where is my card", "response": "card_arrival"}]
        kept, rejected, summary = grade(candidates, GraderConfig(enabled=True), teacher, gen)
    assert len(kept) == 1
    assert Ledger(ledger_path, None).by_purpose() == {"grader": summary["cost_usd"]}
    assert summary["cost_usd"] > 0


def test_holds_of_concurrent_spenders_never_add_up_past_the_budget(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", 1.0)
    with ledger.hold(0.8) as first:
        assert first == pytest.approx(0.8) and ledger.remaining() == pytest.approx(0.2)
        with Ledger(tmp_path / "ledger.jsonl", 1.0).hold(0.8) as second:  # another worker, same file
            assert second == pytest.approx(0.2) and ledger.remaining() == 0
        ledger.charge("generation", 0.3, 10)
    assert ledger.remaining() == pytest.approx(0.7) and ledger.by_purpose() == {"generation": 0.3}
    # A worker killed inside its hold: the hold of a process that is gone no longer counts.
    dead = subprocess.Popen(["true"])
    dead.wait()
    with (tmp_path / "ledger.jsonl").open("a") as f:
        f.write(json.dumps({"purpose": "hold", "hold": "x", "cost_usd": 0.5, "host": socket.gethostname(),
                            "pid": dead.pid}) + "\n")
    assert ledger.remaining() == pytest.approx(0.7)
    with Ledger(tmp_path / "ledger.jsonl", None).hold(5.0) as uncapped:
        assert uncapped is None


HOLDER = """
import sys, time
from distill.teacher.ratelimit import Ledger
from tests.distill.serve.test_shadow_postgres import postgres_url  # noqa: F401  (the PostgreSQL fixture)
with Ledger(sys.argv[1], 1.0, sys.argv[2]).hold(0.5) as granted:
    print(granted, flush=True)
    time.sleep(600)
"""


def test_a_postgresql_ledger_is_one_budget_for_workers_anywhere(tmp_path, postgres_url):  # noqa: F811
    """Workers on several machines share one PostgreSQL ledger: holds add up across connections, and a
    holder killed on any machine stops counting once the server sees its session end (no pid check)."""
    import time

    name = str(tmp_path / "ledger.jsonl")  # the ledger's name; no file is written
    ledger = Ledger(name, 1.0, postgres_url)
    with ledger.hold(0.3) as first:
        assert first == pytest.approx(0.3)
        with Ledger(name, 1.0, postgres_url).hold(0.8) as second:  # another worker's connection
            assert second == pytest.approx(0.7) and ledger.remaining() == 0
        ledger.charge("generation", 0.2, 4)
    assert ledger.remaining() == pytest.approx(0.8) and ledger.by_purpose() == {"generation": 0.2}
    assert not (tmp_path / "ledger.jsonl").exists()
    assert Ledger(str(tmp_path / "other.jsonl"), 1.0, postgres_url).remaining() == 1.0  # ledgers kept apart

    # A worker in another process holds half of what is left, then is SIGKILLed inside its hold.
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, name, postgres_url], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert float(holder.stdout.readline()) == pytest.approx(0.5)
        assert ledger.remaining() == pytest.approx(0.3)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    while ledger.remaining() != pytest.approx(0.8) and time.monotonic() < deadline:
        time.sleep(0.2)  # the server notices the closed connection within moments
    assert ledger.remaining() == pytest.approx(0.8)


def test_generate_charges_and_caps_through_the_postgresql_ledger(tmp_path, postgres_url):  # noqa: F811
    app = standin.build_app(GOLDS, LABELS)
    name = str(tmp_path / "run" / "ledger.jsonl")
    with start_in_thread(app) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="m", input_price_per_1m=1000.0,
                                output_price_per_1m=1000.0)
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", max_tokens=8, concurrency=2, backoff_base_s=0.01,
                               budget_usd=0.1, ledger_path=name, ledger_url=postgres_url)
        result = generate(rows(TEXTS[:20], "g"), teacher, gen, api_key=None)
    ledger = Ledger(name, 0.1, postgres_url)
    assert result.summary["budget_exhausted"] is True and 0 < ledger.spent() <= 0.1
    assert ledger.spent() == pytest.approx(result.summary["cost_usd"], abs=1e-6)
    assert ledger.by_purpose() == {"generation": pytest.approx(result.summary["cost_usd"], abs=1e-6)}


def test_a_ledger_url_with_a_password_is_refused_by_file_and_line(tmp_path):
    from distill.config import ConfigError, load_config

    config = tmp_path / "c.yaml"
    config.write_text("teacher:\n  base_url: http://127.0.0.1:9/v1\n  model: m\n"
                      "generation:\n  ledger_url: postgresql://u:hunter2@db/distill\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: generation.ledger_url: has a password.*PGPASSWORD") as err:
        load_config(config)
    assert "hunter2" not in str(err.value)
