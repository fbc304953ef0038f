import json
import math
import shutil

import pytest

from distill.config import ConfigError, EvaluateConfig, GateConfig
from distill.evaluate.classifier import evaluate_classifier
from distill.evaluate.gate import decide
from distill.evaluate.report import render_report
from distill.evaluate.tail import format_oddity, select_tail
from distill.httpserver import start_in_thread

LABELS = ["positive", "negative", "neutral"]
WORDS = {"positive": "great love good fine", "negative": "terrible hate bad lost", "neutral": "ok one two three"}


def _rows(n, prefix="h"):
    rows = []
    for i in range(n):
        gold = LABELS[i % 3]
        text = f"{WORDS[gold].split()[i % 4]} card {'and money ' * (i % 5)}{'!!' if i % 7 == 0 else ''}"
        rows.append({"id": f"{prefix}{i}", "text": text, "gold": gold, "input": {"text": text, "category": gold},
                     "messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": text}],
                     "_line": i + 2})
    return rows


def _record(row, answer, p):
    tops = [{"token": answer, "logprob": math.log(p)}]
    tops += [{"token": l, "logprob": math.log((1 - p) / 2)} for l in LABELS if l != answer]
    return {"id": row["id"], "sample": 0, "status": "done", "response": answer,
            "logprobs": [{"token": answer, "logprob": math.log(p), "top_logprobs": tops}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 1}, "cost_usd": 0.0}


def _teacher_app(answer="neutral"):
    from fastapi import FastAPI

    app = FastAPI()
    app.state.calls = 0

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        app.state.calls += 1
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}

    return app


def test_select_tail_is_deterministic_and_mixes_criteria():
    rows = _rows(60)
    conf = {r["id"]: 0.99 for r in rows}
    conf["h5"] = 0.2
    counts = {"positive": 100, "negative": 3, "neutral": 100}
    user = [{"id": "u1", "text": "x", "gold": "neutral"}]
    tail = select_tail(rows, conf, 9, counts, user)
    assert tail == select_tail(list(reversed(rows)), conf, 9, counts, user)
    reasons = [why for _, why in tail]
    assert reasons[0] == "user" and len(tail) == 9
    assert set(reasons) == {"user", "rare_label", "long", "format", "low_teacher_confidence"}
    ids = [r["id"] for r, _ in tail]
    assert len(set(ids)) == len(ids)
    assert all(r["gold"] == "negative" for r, why in tail if why == "rare_label")
    assert ("h5", "low_teacher_confidence") in [(r["id"], why) for r, why in tail] or \
        "h5" in ids
    assert len(select_tail(rows, conf, 1000)) == 60
    assert select_tail(rows, conf, 0) == []
    assert format_oddity("HELLO!!! 123 #$%") > format_oddity("hello there") == 0.0


def test_evaluate_classifier_end_to_end(tmp_path, tiny_classifier):
    student = tmp_path / "student"
    shutil.copytree(tiny_classifier, student)
    holdout = _rows(45)
    wrong = {l: LABELS[(k + 1) % 3] for k, l in enumerate(LABELS)}
    records = [_record(r, r["gold"] if i % 5 else wrong[r["gold"]], 0.6 + 0.3 * (i % 2)) for i, r in enumerate(holdout)]
    records.append({**records[0], "sample": 1, "response": "negative"})  # later samples are ignored
    records[1] = {**records[1], "status": "failed", "response": None, "logprobs": None}  # counts as wrong
    validation = [{"id": f"v{i}", "text": r["text"], "target": r["gold"], "split": "validation"}
                  for i, r in enumerate(_rows(30, "v"))]
    tail_file = tmp_path / "tail.csv"
    tail_file.write_text(f"text,category\nbrand new tail input,negative\n{holdout[3]['text']},{holdout[3]['gold']}\n")
    cfg = EvaluateConfig(ece_bins=5, tail_size=12, tail_path=tail_file, latency_requests=10, latency_concurrency=2,
                         latency_concurrencies=[2], robustness_rows=6, abstain_threshold=0.9)
    teacher_app = _teacher_app()
    out = tmp_path / "run"
    with start_in_thread(teacher_app) as teacher:
        m = evaluate_classifier(student, holdout, records, LABELS, cfg, out, validation=validation,
                                teacher_url=f"{teacher.url}/v1", teacher_model="t", teacher_api_key="sk-secret",
                                teacher_price=(1.0, 2.0), train_label_counts={"positive": 9, "negative": 1})
        calls_after_first = teacher_app.state.calls
        # Again: the new tail row's teacher answer is read back, not bought again.
        evaluate_classifier(student, holdout, records, LABELS, cfg, out, validation=validation,
                            teacher_url=f"{teacher.url}/v1", teacher_model="t", teacher_price=(1.0, 2.0))
        assert teacher_app.state.calls - calls_after_first == 10 + 2  # only the latency requests (+ warm-up)
    required = ["teacher_accuracy", "student_accuracy", "retention", "agreement", "ece", "ece_before", "mce", "brier",
                "temperature", "tail_size", "tail_teacher_accuracy", "tail_student_accuracy", "tail_gap",
                "robustness_accuracy", "robustness_drop", "ood_abstain_rate", "output_entropy", "student_p50_ms",
                "student_p95_ms", "student_p99_ms", "teacher_p50_ms", "teacher_p95_ms", "teacher_p99_ms",
                "student_cost_per_1k", "teacher_cost_per_1k", "per_label", "plots"]
    assert not [k for k in required if k not in m]
    json.dumps(m, allow_nan=False)  # strict JSON: NaN became null
    assert m["teacher_accuracy"] == pytest.approx(35 / 45)  # every fifth answer was wrong, one failed
    assert m["teacher_unanswered"] == 1
    assert m["retention"] == pytest.approx(m["student_accuracy"] / m["teacher_accuracy"])
    assert sum(v["support"] for v in m["per_label"].values()) == 45
    assert sum(map(sum, m["confusion"]["matrix"])) == 45
    # Temperature fitted on validation, stored where ClassifierStudent reads it.
    assert json.loads((student / "calibration.json").read_text()) == {"temperature": m["temperature"]}
    assert m["validation_nll_after"] <= m["validation_nll_before"] + 1e-9
    for name in ("reliability_before", "reliability_after", "confusion"):
        assert (out / m["plots"][name]).read_bytes()[:4] == b"\x89PNG"
    # Tail: both user rows, the holdout one reusing the holdout predictions, the new one asked of the teacher.
    tail = [json.loads(l) for l in (out / "tail.jsonl").read_text().splitlines()]
    assert m["tail_size"] == 12 == len(tail) and [t["reason"] for t in tail[:2]] == ["user", "user"]
    assert tail[0]["teacher"] == "neutral" and tail[1]["teacher"] == records[3]["response"]
    saved = [json.loads(l) for l in (out / "tail_teacher.jsonl").read_text().splitlines()]
    assert [(s["id"], s["response"]) for s in saved] == [("tail-2", "neutral")]
    assert m["tail_gap"] == pytest.approx(m["tail_teacher_accuracy"] - m["tail_student_accuracy"])
    assert m["robustness_rows"] == 6 and len((out / "robustness.jsonl").read_text().splitlines()) == 30
    assert m["robustness_drop"] == pytest.approx(m["robustness_original_accuracy"] - m["robustness_accuracy"])
    assert m["ood_size"] >= 90 and 0 <= m["ood_abstain_rate"] <= 1
    assert 0 < m["output_entropy"] <= math.log(3) + 1e-9
    assert m["student_latency"]["ok"] == 10 and m["teacher_latency"]["ok"] == 10
    assert m["student_p50_ms"] <= m["student_p95_ms"] <= m["student_p99_ms"]
    assert m["teacher_cost_per_1k"] == pytest.approx((20 * 1.0 + 1 * 2.0) / 1e6 * 1000)
    # The teacher is local: timed with the same harness; the ratios the gate reads are stated.
    assert m["teacher_latency"]["source"] == "harness" and set(m["student_latency_sweep"]) == {"2"}
    assert m["latency_ratio"] == pytest.approx(m["student_p95_ms"] / m["teacher_p95_ms"])
    assert m["cost_ratio"] == pytest.approx(m["student_cost_per_1k"] / m["teacher_cost_per_1k"])
    assert 0 < m["student_floor_p50_ms"] and (out / m["latency_plot"]).read_bytes()[:4] == b"\x89PNG"
    assert set(m["runtime_exports"]) == {"torch", "onnx", "onnx-int8"}
    assert m["runtime_exports"]["onnx"]["agreement"] == 1.0
    assert m["export_drop"] == max(m["runtime_exports"][k]["accuracy_drop"] for k in ("onnx", "onnx-int8"))
    everything = json.dumps(m) + "".join(p.read_text(errors="ignore") for p in out.glob("*.jsonl"))
    assert "sk-secret" not in everything
    md = render_report(m, decide(m, GateConfig()))
    assert "Gate decision" in md and "![confusion matrix](confusion.png)" in md
    assert "![latency versus concurrency](latency.png)" in md and "| onnx-int8 |" in md


def test_bad_inputs_are_named(tmp_path, tiny_classifier):
    holdout = _rows(6)
    cfg = EvaluateConfig(latency_requests=10)
    with pytest.raises(ConfigError, match="holdout is empty"):
        evaluate_classifier(tiny_classifier, [], [], LABELS, cfg, tmp_path)
    bad = [dict(holdout[0], gold="spam", _line=7)]
    with pytest.raises(ConfigError, match="line 7: gold label 'spam'"):
        evaluate_classifier(tiny_classifier, bad, [], LABELS, cfg, tmp_path)
    with pytest.raises(ConfigError, match="student's labels differ"):
        evaluate_classifier(tiny_classifier, holdout, [], ["a", "b", "c"] + LABELS, cfg, tmp_path)
    tail = tmp_path / "tail.jsonl"
    tail.write_text('{"text": "hello", "category": "positive"}\n{"text": "x", "category": "spam"}\n')
    cfg = EvaluateConfig(latency_requests=10, tail_path=tail)
    with pytest.raises(ConfigError, match=r"tail.jsonl:2: label 'spam'"):
        evaluate_classifier(tiny_classifier, [dict(r) for r in holdout], [], LABELS, cfg, tmp_path / "o")
