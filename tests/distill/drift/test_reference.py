"""The reference set of a drift watch: a random sample of recent traffic, re-labelled by a hosted-like
teacher (tests/chat_standin.py, its own process) through the cached client, charged to the ledger once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.config import DriftConfig, GenerationConfig, TeacherConfig
from distill.data import read_table
from distill.demo import demo_task
from distill.drift.reference import labelling_sample, relabel
from distill.httpserver import free_port
from distill.teacher.ratelimit import Ledger

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "distill/data/banking77"
LABELS = json.loads((DATA / "categories.json").read_text())


@pytest.fixture(scope="module")
def standin():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/chat_standin.py"), "--port", str(port), "--data",
                             str(DATA / "test.csv"), "--labels", str(DATA / "categories.json")])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("stand-in did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


def test_sample_is_random_sized_and_in_log_order():
    rows = [{"request_id": str(i)} for i in range(1000)]
    s = labelling_sample(rows, 100, seed=1)
    ids = [int(r["request_id"]) for r in s]
    assert len(s) == 100 and ids == sorted(ids)
    assert ids != list(range(900, 1000)) and min(ids) < 300 and max(ids) > 700  # not the newest burst
    assert labelling_sample(rows, 100, seed=2) != s
    assert labelling_sample(rows[:10], 100, seed=1) == rows[:10]


def test_relabel_buys_each_label_once_and_charges_the_ledger(standin, tmp_path):
    test = read_table(DATA / "test.csv", ["text", "category"])[::40][:60]
    rows = [{"request_id": f"r{i}", "text": r["text"]} for i, r in enumerate(test)]
    teacher = TeacherConfig(base_url=standin, model="hosted", input_price_per_1m=1.0, output_price_per_1m=2.0)
    gen = GenerationConfig(cache_path=tmp_path / "cache.sqlite", concurrency=4, backoff_base_s=0.01, max_tokens=16)
    drift = DriftConfig(ledger_path=tmp_path / "drift-ledger.jsonl", relabel_budget_usd=1.0)
    first = relabel(rows, demo_task(), teacher, gen, drift, api_key="sk-standin-not-a-secret")
    ledger = Ledger(drift.ledger_path, None)
    spent = ledger.spent()
    assert spent > 0 and set(ledger.by_purpose()) == {"drift-relabel"}
    got = [first["labels"][r["request_id"]] for r in rows]
    gold = [r["category"] for r in test]
    assert sum(g == l for g, l in zip(gold, got)) / len(gold) > 0.7  # the stand-in is right ~90 % of the time
    again = relabel(rows, demo_task(), teacher, gen, drift, api_key="sk-standin-not-a-secret")
    assert again["labels"] == first["labels"] and again["summary"]["cached"] == len(rows)
    assert Ledger(drift.ledger_path, None).spent() == spent  # nothing paid twice
    assert "sk-standin" not in drift.ledger_path.read_text()


def test_traffic_rows_are_new_distinct_texts_newest_first_with_provenance():
    from distill.config import TaskConfig
    from distill.drift.reference import traffic_rows

    task = TaskConfig(name="t", train_path="unused.csv", labels=["a", "b"], system_prompt="Classify.")
    log = [{"request_id": f"r{i}", "text": t} for i, t in
           enumerate(["known text", "new one", "new two", "new one", "", "new three"])]
    out = traffic_rows(log, task, {"known text"}, cap=2)
    # the two newest distinct new texts (a repeat counts at its latest request), in log order
    assert [r["text"] for r in out] == ["new one", "new three"]
    assert all(r["source"] == "traffic" and r["gold"] is None for r in out)
    assert out[0]["id"] == "traffic-r3" and out[0]["messages"][-1]["content"].endswith("new one")
    assert [r["text"] for r in traffic_rows(log, task, {"known text"}, cap=10)] == ["new two", "new one",
                                                                                     "new three"]
    assert traffic_rows(log, task, set(), cap=0) == []
