"""Student runtimes (torch, ONNX, ONNX INT8) and the micro-batcher, on a tiny real student."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest

from distill.serve.batcher import LogWriter, MicroBatcher
from distill.serve.runtime import StudentRuntime, compare_runtimes, export_onnx

TEXTS = ["i love my new card", "my card was declined", "how do i top up", "ok", "the app is terrible today"]


@pytest.fixture()
def student(tiny_classifier, tmp_path):
    d = tmp_path / "student"
    shutil.copytree(tiny_classifier, d, ignore=shutil.ignore_patterns("onnx"))
    return d


def test_onnx_runtimes_match_torch_and_exports_follow_the_weights(student):
    torch_probs, torch_tokens = StudentRuntime(student, "torch").predict(TEXTS)
    onnx_probs, onnx_tokens = StudentRuntime(student, "onnx").predict(TEXTS)
    int8_probs, _ = StudentRuntime(student, "onnx-int8").predict(TEXTS)
    assert onnx_tokens == torch_tokens and all(t > 1 for t in torch_tokens)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)
    np.testing.assert_allclose(int8_probs.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(int8_probs - torch_probs).max() < 0.01
    import onnx

    # The recipe: every encoder MatMul with a weight runs as 8-bit MatMulNBits; the classification head stays fp32.
    q8 = onnx.load(str(export_onnx(student, int8=True))).graph.node
    nbits = [n for n in q8 if n.op_type == "MatMulNBits"]
    assert nbits and all(next(a.i for a in n.attribute if a.name == "bits") == 8 for n in nbits)
    assert not any(n.op_type == "MatMulNBits" and "classifier" in n.name for n in q8)
    assert any(n.op_type in ("MatMul", "Gemm") and "classifier" in n.name for n in q8)
    graph = export_onnx(student)
    before = graph.stat().st_mtime_ns
    assert export_onnx(student).stat().st_mtime_ns == before  # current export: reused
    from safetensors.torch import load_file, save_file

    weights = load_file(str(student / "model.safetensors"))
    head = next(k for k in weights if k.startswith("classifier") and k.endswith("bias"))
    weights[head][0] += 5.0  # a retrained head: label 0 now wins more often
    save_file(weights, str(student / "model.safetensors"), metadata={"format": "pt"})
    assert not list((student / "onnx").glob("*.tmp-*"))
    retrained = StudentRuntime(student, "onnx").predict(TEXTS)[0]
    np.testing.assert_allclose(retrained, StudentRuntime(student, "torch").predict(TEXTS)[0], atol=1e-5)
    assert export_onnx(student).stat().st_mtime_ns != before  # new weights: exported again


def test_compare_runtimes_reports_agreement_accuracy_and_floor(student):
    gold = StudentRuntime(student, "torch").labels[:1] * len(TEXTS)
    out = compare_runtimes(student, TEXTS * 4, gold * 4, ["onnx", "onnx-int8"], floor_calls=5)
    assert set(out) == {"torch", "onnx", "onnx-int8"}
    assert out["torch"]["agreement"] == 1.0 and out["onnx"]["agreement"] == 1.0
    assert out["onnx"]["accuracy_drop"] == pytest.approx(0.0)
    assert 0 <= out["onnx-int8"]["agreement"] <= 1 and out["onnx-int8"]["floor_p50_ms"] > 0
    with pytest.raises(ValueError, match="runtime"):
        StudentRuntime(student, "tensorrt")


def test_batcher_shares_forwards_and_answers_each_request_with_its_own_row(student):
    rt = StudentRuntime(student, "onnx")
    calls = []

    def predict(texts):
        calls.append(len(texts))
        return rt.predict(texts)

    batcher = MicroBatcher(predict, max_batch=8, window_ms=20)

    async def many():
        return await asyncio.gather(*(batcher.submit(t) for t in TEXTS * 4))

    answers = asyncio.run(many())
    single = {t: rt.predict([t])[0][0] for t in TEXTS}
    for t, (probs, tokens, ms) in zip(TEXTS * 4, answers):
        np.testing.assert_allclose(probs, single[t], atol=1e-5)
        assert tokens > 1 and ms > 0
    assert sum(calls) == 20 and max(calls) <= 8 and len(calls) < 20
    assert batcher.classify_sync(TEXTS[0])[1] == answers[0][1]  # the thread path gets the same answer

    def broken(texts):
        raise RuntimeError("forward failed")

    bad = MicroBatcher(broken, window_ms=0)
    with pytest.raises(RuntimeError, match="forward failed"):
        asyncio.run(bad.submit("x"))
    batcher.close()
    bad.close()


@pytest.mark.parametrize("lanes", [1, 2])
def test_lanes_run_forwards_at_once_and_split_what_waits(student, lanes):
    """Each forward waits until another one runs beside it: only lanes that run at once, and that share
    the two waiting texts instead of one lane taking both, get both answers."""
    rt = StudentRuntime(student, "onnx", threads=1)
    beside = threading.Barrier(2, timeout=3)
    sizes = []

    def predict(texts):
        sizes.append(len(texts))
        beside.wait()
        return rt.predict(texts)

    batcher = MicroBatcher(predict, max_batch=8, window_ms=0, lanes=lanes)

    async def two():
        return await asyncio.gather(*(batcher.submit(t) for t in TEXTS[:2]), return_exceptions=True)

    answers = asyncio.run(two())
    batcher.close()
    if lanes == 1:  # one lane: the pair waits in one forward for a partner that never comes
        assert all(isinstance(a, threading.BrokenBarrierError) for a in answers), answers
        return
    assert sorted(sizes) == [1, 1], sizes
    for t, (probs, tokens, _) in zip(TEXTS[:2], answers):
        np.testing.assert_allclose(probs, rt.predict([t])[0][0], atol=1e-5)
    assert batcher.batches == 2 and batcher.items == 2


def test_a_lane_leaves_a_busy_lane_its_share():
    """Two texts wait while one lane is still busy: the lane that frees up takes one, not both, so the
    other is answered by the next free lane instead of waiting behind the first in one forward."""
    sizes, started, lock = [], threading.Semaphore(0), threading.Lock()
    holds = [threading.Event(), threading.Event()]

    def predict(texts):
        with lock:  # both lanes start at once: each needs its own call number
            call = len(sizes)
            sizes.append(len(texts))
        if call < 2:  # the first two forwards hold both lanes until released one by one
            started.release()
            assert holds[call].wait(5)
        n = len(texts)
        return np.full((n, 2), 0.5, dtype=np.float32), [1] * n

    batcher = MicroBatcher(predict, max_batch=8, window_ms=0, lanes=2)

    async def run():
        first = [asyncio.create_task(batcher.submit(t)) for t in TEXTS[:2]]
        for _ in range(2):
            assert await asyncio.to_thread(started.acquire, timeout=5)
        rest = [asyncio.create_task(batcher.submit(t)) for t in TEXTS[2:4]]
        while batcher.queue.qsize() < 2:  # both queued behind the busy lanes
            await asyncio.sleep(0.001)
        holds[0].set()  # one lane frees up; the other stays busy
        while len(sizes) < 3:
            await asyncio.sleep(0.001)
        holds[1].set()
        return await asyncio.gather(*first, *rest)

    answers = asyncio.run(run())
    batcher.close()
    assert len(answers) == 4
    assert sizes == [1, 1, 1, 1], sizes


def test_log_writer_batches_rows_and_reports_each_write():
    written, done = [], []
    gate = threading.Event()

    def append_many(rows):
        gate.wait(5)
        written.append(list(rows))

    w = LogWriter(append_many, done.append)
    for i in range(10):
        w.put({"i": i})
    gate.set()
    w.close()
    w.thread.join(5)
    assert [r["i"] for batch in written for r in batch] == list(range(10))
    assert len(written) < 10 and sum(done) == 10


def test_log_writer_rows_arriving_one_at_a_time_share_one_write():
    """At concurrency 4 rows arrive one or two at a time; each write of one row was a transaction of its own."""
    written = []
    w = LogWriter(lambda rows: written.append(list(rows)), lambda n: None, linger_ms=300)
    for i in range(5):
        w.put({"i": i})
        time.sleep(0.01)
    w.close()
    w.thread.join(5)
    assert [[r["i"] for r in batch] for batch in written] == [[0, 1, 2, 3, 4]]


def test_log_writer_does_not_linger_when_a_full_write_is_queued():
    """Under load the linger would cap the log at max_rows per linger; a full queue is written at once."""
    written, gate = [], threading.Event()

    def append_many(rows):
        gate.wait(5)
        written.append((time.monotonic(), len(rows)))

    w = LogWriter(append_many, lambda n: None, max_rows=4, linger_ms=2000)
    w.put({"i": -1})  # held in append_many while the queue fills
    time.sleep(2.2)
    for i in range(8):
        w.put({"i": i})
    started = time.monotonic()
    gate.set()
    w.close()
    w.thread.join(10)
    assert [n for _, n in written] == [1, 4, 4]
    assert written[-1][0] - started < 1.0  # no 2 s linger before the full writes
