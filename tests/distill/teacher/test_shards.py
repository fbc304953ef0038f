"""Sharded generation (distill.teacher.shards): checked before any call, resumable, never paying twice."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from distill.config import ConfigError, GenerationConfig, TeacherConfig
from distill.teacher.shards import (
    SPLIT,
    answer_shard,
    finished,
    iter_prompts,
    iter_records,
    records_path,
    split_prompts,
    summary_path,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import chat_standin as standin  # noqa: E402

TEXTS = ["I still have not received my new card", "How do I top up with a cheque?", "my card got stolen",
         "What is the exchange rate?", "Why was I charged a fee for the transfer?"]


def write_prompts(path: Path, n: int, bad_line: int | None = None, duplicate_at: int | None = None) -> Path:
    lines = []
    for i in range(n):
        rid = "p0" if duplicate_at is not None and i == duplicate_at else f"p{i}"
        lines.append(json.dumps({"id": rid, "messages": [{"role": "user", "content": f"{TEXTS[i % 5]} ({i})"}]}))
    if bad_line is not None:
        lines[bad_line - 1] = '{"id": "x", "messages": [ broken'
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_writes_shards_of_the_asked_size_and_reuses_them(tmp_path):
    src = write_prompts(tmp_path / "prompts.jsonl", 8)
    out = tmp_path / "out"
    assert split_prompts(src, out, 3) == {"shards": 3, "rows": 8, "reused": False}
    assert [len(list(iter_prompts(out, i))) for i in range(3)] == [3, 3, 2]
    assert [r["id"] for i in range(3) for r in iter_prompts(out, i)] == [f"p{i}" for i in range(8)]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert split_prompts(src, out, 3)["reused"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = write_prompts(tmp_path / "other.jsonl", 5)
    with pytest.raises(ConfigError, match="holds the shards of"):
        split_prompts(other, out, 3)


@pytest.mark.parametrize("case", ["bad_json", "duplicate"])
def test_a_bad_row_is_named_by_file_and_line_and_nothing_is_written(tmp_path, case):
    if case == "bad_json":
        src, match = write_prompts(tmp_path / "prompts.jsonl", 9, bad_line=7), r"prompts\.jsonl:7: invalid JSON"
    else:
        src, match = (write_prompts(tmp_path / "prompts.jsonl", 9, duplicate_at=8),
                      r"prompts\.jsonl:9: duplicate id 'p0' \(first at line 1\)")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        split_prompts(src, out, 2)  # shards 0-2 were complete when the bad row came
    assert list(out.iterdir()) == []


def stand_in_requests(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/standin/stats", timeout=10) as r:
        return json.loads(r.read())["requests"]


@pytest.fixture(scope="module")
def stand_in():
    """The hosted-chat stand-in in its own process: its base URL."""
    proc, url = standin.start()
    yield url
    proc.terminate()
    proc.wait()


def hosted(url: str, price: float, cache: Path) -> tuple[TeacherConfig, GenerationConfig]:
    return (TeacherConfig(base_url=url, model="hosted-chat", input_price_per_1m=price, output_price_per_1m=4 * price),
            GenerationConfig(concurrency=4, max_tokens=16, top_logprobs=5, backoff_base_s=0.01, cache_path=cache))


def test_a_shard_is_answered_once_and_an_interrupted_one_resumes_from_the_cache(tmp_path, stand_in):
    url = stand_in
    teacher, generation = hosted(url, 0.15, tmp_path / "cache.sqlite")
    out = tmp_path / "out"
    split_prompts(write_prompts(tmp_path / "prompts.jsonl", 60), out, 25)
    first = answer_shard(out, 0, teacher, generation)
    assert first["done"] == 25 and first["skipped"] is False and finished(out, 0) is not None
    assert [r["id"] for r in iter_records(out, 0)] == [f"p{i}" for i in range(25)]
    # The messages stay in the prompt shard only; each record still has its answer and usage.
    assert all("messages" not in r and r["response"] and r["usage"] for r in iter_records(out, 0))
    asked = stand_in_requests(url)
    assert asked >= 25  # every 37th request is answered 429 and retried

    again = answer_shard(out, 0, teacher, generation)
    assert again["skipped"] is True and stand_in_requests(url) == asked

    # Killed after the records were written but before the summary: answered again, all from the cache.
    records = records_path(out, 0).read_bytes()
    summary_path(out, 0).unlink()
    stale = out / ".records-000000.json.k1ll3d.tmp"  # the summary write a kill cut short
    stale.write_text('{"done": 1')
    resumed = answer_shard(out, 0, teacher, generation)
    assert not stale.exists()
    assert resumed["cached"] == 25 and resumed["http_requests"] == 0 and resumed["cost_usd"] == 0
    assert stand_in_requests(url) == asked
    assert [json.loads(x)["response"] for x in records_path(out, 0).read_bytes().splitlines()] == \
        [json.loads(x)["response"] for x in records.splitlines()]
    assert (out / SPLIT).exists()


def test_shard_workers_at_once_share_one_budget(tmp_path, stand_in):
    from concurrent.futures import ThreadPoolExecutor

    from distill.teacher.ratelimit import Ledger

    teacher, one_shard = hosted(stand_in, 150.0, tmp_path / "probe.sqlite")
    out = tmp_path / "out"
    split_prompts(write_prompts(tmp_path / "prompts.jsonl", 40), out, 20)
    split_prompts(write_prompts(tmp_path / "probe.jsonl", 20), tmp_path / "probe", 20)
    # What one shard costs (its own cache: the shards below still pay for theirs).
    budget = 1.5 * answer_shard(tmp_path / "probe", 0, teacher, one_shard)["cost_usd"]
    generation = one_shard.model_copy(update={"cache_path": tmp_path / "cache.sqlite", "budget_usd": budget,
                                              "ledger_path": tmp_path / "ledger.jsonl"})
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: answer_shard(out, i, teacher, generation), [0, 1]))
    spent = Ledger(tmp_path / "ledger.jsonl", budget).spent()
    assert spent <= budget + 1e-9
    assert sum(r["done"] for r in results) < 40 and any(r["budget_exhausted"] for r in results)
    assert sum(r["cost_usd"] for r in results) == pytest.approx(spent, abs=1e-6)
