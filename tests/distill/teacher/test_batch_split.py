"""Batch mode cuts a large request set into input files the provider accepts (OpenAI: 50,000 requests
and 200 MB per file), against `distill teacher serve`'s Batch API on 127.0.0.1; small limits stand in
for the provider's."""

from __future__ import annotations

import json
import sqlite3

from distill.config import GenerationConfig, TeacherConfig
from distill.teacher.batch import _line, split_batch
from distill.teacher.generation import generate, plan
from tests.distill.teacher.test_client import rows_for, teacher_server  # noqa: F401  (fixture)


def test_split_respects_both_caps():
    rows = rows_for(*[f"prompt {i} " + "x" * (i * 40) for i in range(12)])
    teacher = TeacherConfig(base_url="http://127.0.0.1:9/v1", model="tiny")
    _, jobs = plan(rows, teacher, GenerationConfig())
    sizes = {j.key: len(_line(j)) for j in jobs}
    parts, too_big = split_batch(jobs, max_requests=3, max_bytes=700)
    assert all(len(p) <= 3 and sum(sizes[j.key] for j in p) <= 700 for p in parts)
    assert [j.key for j in too_big] == [j.key for j in jobs if sizes[j.key] > 700] != []
    # Nothing lost, nothing twice, order kept.
    assert [j.key for p in parts for j in p] + [j.key for j in too_big] == \
        [j.key for j in jobs if sizes[j.key] <= 700] + [j.key for j in too_big]
    assert len(split_batch(jobs, 50_000, 200_000_000)[0]) == 1


def test_batch_mode_submits_one_batch_per_file(teacher_server, tmp_path):  # noqa: F811
    store = teacher_server.server.config.app.state.batch_store
    rows = rows_for(*[f"card {i}" for i in range(7)], "y" * 2000)
    teacher = TeacherConfig(base_url=teacher_server.url + "/v1", model="tiny")
    gen = GenerationConfig(mode="batch", batch_poll_s=0.05, top_logprobs=3, cache_path=tmp_path / "b.sqlite",
                           batch_max_requests=3, batch_max_bytes=1024)
    before = set(store.batches)
    res = generate(rows, teacher, gen)
    new = [store.batches[b] for b in store.batches if b not in before]
    assert len(new) == 3  # 7 small requests at 3 per file
    counts = []
    for batch in new:
        lines = store.file_content(batch["input_file_id"]).splitlines()
        assert len(lines) <= 3 and sum(len(l) + 1 for l in lines) <= 1024
        counts.append(len(lines))
        assert all(json.loads(l)["url"] == "/v1/chat/completions" for l in lines)
    assert sorted(counts) == [1, 3, 3]
    assert res.summary["done"] == 7 and res.records[-1]["status"] == "failed"
    assert "batch_max_bytes" in res.records[-1]["error"]
    with sqlite3.connect(tmp_path / "b.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM batches WHERE status = 'completed'").fetchone() == (3,)
