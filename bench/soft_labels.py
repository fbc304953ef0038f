"""How well the label distribution is recovered from a hosted chat model's multi-token answers.

The stand-in chat model (tests/chat_standin.py) runs in its own process on
127.0.0.1 and answers BANKING77 holdout prompts with a known distribution over
whole answers, cut into sub-word pieces, with exact per-position top_logprobs.
The client is the real code path (`distill.teacher.generate`, fresh cache) and
the recovery is `distill.teacher.soft_labels`. Reported, for top_logprobs 5 and 20
with structured output (a strict json_schema enum):

- argmax agreement: share of rows whose recovered argmax is the teacher's answer (must be 1.0),
- mean total variation between the recovered and the true distribution,
- and the first-token reading it replaces (one position, prefix mass split evenly) as the baseline,

then the share of answers that map to a label with and without structured output
(the prompt lists the labels either way).

Usage: python bench/soft_labels.py [--rows 400]
The last line is machine-readable: argmax_agreement=X tv_top5=Y tv_top20=Z

`--mode score [--score-api echo|prompt_logprobs]` (100 rows unless --rows) measures the exact mode instead
(`generation.soft_labels: score`: every label scored by the stand-in, as vLLM
scores given text) and the scoring requests it sent per row; its last line is
`score_api=A argmax_agreement=X tv=Y requests_per_row=R`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from distill.offline import apply_offline_env  # noqa: E402



def first_token_reading(record: dict, labels: list[str]) -> dict[str, float] | None:
    """The reading this replaces: the first position only, a prefix's mass split evenly over its labels."""
    content = record.get("logprobs") or []
    text = "".join(t["token"] for t in content)
    at = text.find('"label": "')
    pos, offset = 0, 0
    for i, t in enumerate(content):  # the first token of the label value
        if offset >= at + len('"label": "'):
            pos = i
            break
        offset += len(t["token"])
    mass = {l: 0.0 for l in labels}
    seen = 0.0
    for alt in content[pos].get("top_logprobs") or []:
        p = math.exp(alt["logprob"])
        seen += p
        group = [l for l in labels if l.startswith(alt["token"].strip())]
        for l in group:
            mass[l] += p / len(group)
    empty = [l for l in labels if mass[l] == 0]
    for l in empty:
        mass[l] = max((1 - seen) / len(empty), 1e-6)
    total = sum(mass.values())
    return {l: m / total for l, m in mass.items()}


def run(url: str, rows: list[dict], top: int, structured: bool, labels: list[str]) -> list[dict]:
    from distill.config import GenerationConfig, TeacherConfig
    from distill.teacher.generation import generate
    from distill.teacher.structured import structured_params

    with tempfile.TemporaryDirectory() as tmp:
        teacher = TeacherConfig(base_url=url, model="standin-chat", timeout_s=30)
        gen = GenerationConfig(concurrency=16, top_logprobs=top, max_tokens=64, cache_path=Path(tmp) / "c.sqlite",
                               backoff_base_s=0.05,
                               extra_params=structured_params("json_schema", labels) if structured else {})
        return generate(rows, teacher, gen, api_key="").records


def run_score(url: str, rows: list[dict], labels: list[str], truth: dict, api: str) -> None:
    """The exact mode: answers with json_schema, then every label scored; TV to the truth and requests per row."""
    import json
    import urllib.request

    from distill.config import GenerationConfig, TeacherConfig
    from distill.teacher.generation import generate
    from distill.teacher.labels import map_answer
    from distill.teacher.scoring import score_labels
    from distill.teacher.soft_labels import soft_labels
    from distill.teacher.structured import structured_params

    def requests() -> int:
        with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/standin/stats") as r:
            return json.loads(r.read())["requests"]

    with tempfile.TemporaryDirectory() as tmp:
        teacher = TeacherConfig(base_url=url, model="standin-chat", timeout_s=60)
        gen = GenerationConfig(concurrency=16, max_tokens=64, cache_path=Path(tmp) / "c.sqlite", backoff_base_s=0.05,
                               soft_labels="score", score_api=api, extra_params=structured_params("json_schema", labels))
        records = generate(rows, teacher, gen, api_key="").records
        before = time.monotonic(), requests()
        records, summary = score_labels(records, labels, teacher, gen, api_key="")
        wall, sent = time.monotonic() - before[0], requests() - before[1]
    agree, tv, n = 0, 0.0, 0
    for rec in records:
        answer = map_answer(rec.get("response"), labels)
        if rec["status"] != "done" or answer is None or "label_scores" not in rec:
            continue
        dist = soft_labels(rec, labels)
        n += 1
        agree += max(dist, key=dist.get) == answer
        tv += 0.5 * sum(abs(dist[l] - truth[rec["id"]][l]) for l in labels)
    print(f"score_api={api}: rows={n} scored={summary['scored']} requests={sent} ({summary['http_requests']} by the "
          f"client, 429s retried) prompt_tokens={summary['prompt_tokens']} wall_s={wall:.1f}", flush=True)
    print(f"score_api={api} argmax_agreement={agree / n:.4f} tv={tv / n:.6f} requests_per_row={sent / len(rows):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None,
                    help="Holdout prompts (an evenly spaced slice); 400, or 100 with --mode score.")
    ap.add_argument("--mode", choices=["trie", "score"], default="trie", help="The soft-label mode measured.")
    ap.add_argument("--score-api", choices=["echo", "prompt_logprobs"], default="echo",
                    help="With --mode score: completions echo (one request per row) or vLLM prompt_logprobs (one per label).")
    args = ap.parse_args()
    args.rows = args.rows or (100 if args.mode == "score" else 400)
    apply_offline_env()
    import chat_standin as standin

    from distill.data import load_task_rows
    from distill.demo import demo_task
    from distill.teacher.labels import map_answer
    from distill.teacher.soft_labels import soft_labels

    task = demo_task(max_test_rows=args.rows)
    labels = task.label_set()
    holdout = load_task_rows(task, "test")
    rows = [{"id": r["id"], "messages": r["messages"]} for r in holdout]
    truth = {r["id"]: standin.true_distribution(r["text"], r["gold"], labels) for r in holdout}
    proc, url = standin.start()
    if args.mode == "score":
        try:
            run_score(url, rows, labels, truth, args.score_api)
        finally:
            proc.terminate()
            proc.wait(10)
        return
    results = {}
    try:
        for top in (5, 20):
            records = run(url, rows, top, True, labels)
            agree, tv, tv_first, n = 0, 0.0, 0.0, 0
            for rec in records:
                answer = map_answer(rec.get("response"), labels)
                dist = soft_labels(rec, labels) if answer else None
                if rec["status"] != "done" or dist is None:
                    continue
                n += 1
                true = truth[rec["id"]]
                agree += max(dist, key=dist.get) == answer
                tv += 0.5 * sum(abs(dist[l] - true[l]) for l in labels)
                first = first_token_reading(rec, labels)
                tv_first += 0.5 * sum(abs(first[l] - true[l]) for l in labels)
            results[top] = (agree / n, tv / n)
            print(f"top_logprobs={top:>2}: rows={n} argmax_agreement={agree / n:.4f} mean_tv={tv / n:.4f} "
                  f"(first-token reading: mean_tv={tv_first / n:.4f})", flush=True)
        for structured in (True, False):
            records = run(url, rows, 5, structured, labels)
            done = [r for r in records if r["status"] == "done"]
            mapped = sum(1 for r in done if map_answer(r["response"], labels))
            print(f"mapped share {'with' if structured else 'without'} structured output: "
                  f"{mapped}/{len(done)} = {mapped / len(done):.4f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    agreement = min(a for a, _ in results.values())
    print(f"argmax_agreement={agreement:.4f} tv_top5={results[5][1]:.4f} tv_top20={results[20][1]:.4f}")


if __name__ == "__main__":
    main()
