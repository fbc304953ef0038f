"""The request cache: keyed by the teacher's identity and the request, not by its address; old caches
still found; the same operations on a real PostgreSQL server started by the test."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from distill.config import GenerationConfig, TeacherConfig
from distill.httpserver import start_in_thread
from distill.teacher.cache import ResponseCache
from distill.teacher.client import sampling_params
from distill.teacher.generation import estimate_cost, generate
from tests.distill.serve.test_shadow_postgres import postgres_url  # noqa: F401  (the PostgreSQL fixture)
from tests.distill.teacher.test_client import fault_app, rows_for


def teacher_at(url: str) -> TeacherConfig:
    return TeacherConfig(base_url=url + "/v1", model="fault-teacher", input_price_per_1m=1.0, output_price_per_1m=1.0,
                         timeout_s=5)


def test_same_model_on_another_port_pays_nothing(tmp_path):
    gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", concurrency=4, backoff_base_s=0.01)
    rows = rows_for("alpha", "beta", "gamma")
    with start_in_thread(fault_app()) as first:
        bought = generate(rows, teacher_at(first.url), gen)
    assert bought.summary["done"] == 3 and bought.summary["cost_usd"] > 0
    moved_app = fault_app()
    with start_in_thread(moved_app) as moved:
        again = generate(rows, teacher_at(moved.url), gen)
        assert sum(moved_app.state.counts.values()) == 0  # not one request reached the new address
    assert again.summary["cached"] == 3 and again.summary["cost_usd"] == 0
    assert [r["response"] for r in again.records] == [r["response"] for r in bought.records]

    # With the address in the key, the same model elsewhere counts as another teacher and is asked again.
    by_address = gen.model_copy(update={"cache_key_endpoint": True})
    other_app = fault_app()
    with start_in_thread(other_app) as other:
        paid = generate(rows, teacher_at(other.url), by_address)
        assert sum(other_app.state.counts.values()) == 3
    assert paid.summary["cached"] == 0


def legacy_key(endpoint: str, model: str, messages: list[dict], params: dict, sample: int) -> str:
    """The key as the cache computed it before the address left the key (copied from that version)."""
    blob = json.dumps({"endpoint": endpoint, "model": model, "messages": messages, "params": params,
                       "sample": sample}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def test_a_cache_written_with_the_old_key_is_still_read(tmp_path):
    path = tmp_path / "old.sqlite"
    gen = GenerationConfig(cache_path=path, concurrency=2, backoff_base_s=0.01)
    rows = rows_for("alpha", "beta")
    app = fault_app()
    with start_in_thread(app) as srv:
        teacher = teacher_at(srv.url)
        # A cache as the previous version left it: its own two tables, keys holding base_url.
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, record TEXT NOT NULL, created REAL NOT NULL)")
        conn.execute("CREATE TABLE batches (batch_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, keys TEXT NOT NULL, "
                     "status TEXT NOT NULL, created REAL NOT NULL)")
        params = sampling_params(gen)
        old = legacy_key(teacher.base_url, teacher.model, rows[0]["messages"], params, 0)
        stored = {"response": "stored long ago", "finish_reason": "stop", "truncated": False, "logprobs": None,
                  "usage": {"prompt_tokens": 10, "completion_tokens": 2}, "cost_usd": 1e-5, "model": "fault-teacher",
                  "attempts": 1, "latency_s": 0.1}
        conn.execute("INSERT INTO responses VALUES (?, ?, 0)", (old, json.dumps(stored)))
        conn.commit()
        conn.close()
        assert estimate_cost(rows, teacher, gen)["cached"] == 1
        result = generate(rows, teacher, gen)
        assert dict(app.state.counts) == {"beta": 1}  # alpha came from the old entry
    assert result.records[0]["response"] == "stored long ago" and result.records[0]["cached"]
    cache = ResponseCache(path)
    try:
        assert cache.legacy and cache.size()[0] == 3  # the old entry, its copy under the new key, beta
    finally:
        cache.close()


def test_postgresql_cache_is_shared_by_two_workers(tmp_path, postgres_url):  # noqa: F811
    gen = GenerationConfig(cache_url=postgres_url, cache_path=tmp_path / "unused.sqlite", concurrency=4,
                           backoff_base_s=0.01)
    rows = rows_for("one", "two", "three", "four")
    app = fault_app()
    with start_in_thread(app) as srv:
        teacher = teacher_at(srv.url)
        first = generate(rows[:2], teacher, gen)
        second = generate(rows, teacher, gen)  # another worker, same shared cache
        assert dict(app.state.counts) == {"one": 1, "two": 1, "three": 1, "four": 1}
    assert first.summary["done"] == 2 and second.summary["cached"] == 2 and second.summary["done"] == 4
    assert not (tmp_path / "unused.sqlite").exists()
    cache = ResponseCache(postgres_url)
    try:
        assert not cache.legacy and cache.size()[0] >= 4
        cache.add_batch("batch_1", "http://x/v1", ["k1", "k2"])
        cache.add_batch("batch_1", "http://x/v1", ["k1", "k2", "k3"])  # re-recorded, as SQLite's REPLACE
        assert cache.open_batches("http://x/v1") == [("batch_1", ["k1", "k2", "k3"])]
        cache.close_batch("batch_1", "completed")
        assert cache.open_batches("http://x/v1") == []
    finally:
        cache.close()


def test_a_bad_postgresql_url_names_the_field_without_the_password():
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="generation.cache_url") as err:
        ResponseCache("postgresql://u:hunter2@127.0.0.1:1/none")
    assert "hunter2" not in str(err.value)


def test_workers_opening_a_fresh_sqlite_cache_at_once_all_get_it(tmp_path):
    """Shard workers start together on a new cache and write at once: none sees "database is locked".

    The race is timing-dependent (about one start in five failed before openers took turns), so it
    is run on 30 fresh caches.
    """
    import threading

    errors = []
    for trial in range(30):
        path = tmp_path / f"cache-{trial}.sqlite"
        start = threading.Barrier(4)

        def work(worker: int, path=path, start=start) -> None:
            start.wait()
            try:
                cache = ResponseCache(path)
                for j in range(20):
                    cache.put(f"k{worker}-{j}", {"response": "x" * 100, "usage": {}})
            except Exception as e:  # noqa: BLE001  (the failure under test)
                errors.append(f"trial {trial}: {e}")

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(list(ResponseCache(path).iter_many([f"k{w}-{j}" for w in range(4) for j in range(20)]))) == 80
