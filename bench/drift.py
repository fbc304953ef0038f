"""Operating characteristics of the drift sensors: false alarms without drift, detection delay with it.

The champion is the demo's shape (the first 2 MiniLM layers, mean pooling, a linear-probe head
on BANKING77 training rows); the teacher is the demo teacher (MiniLM-L6 embeddings and a
softmax head fitted on other training rows), served by `distill teacher serve`. The champion's
baselines come from its evaluation on one half of the BANKING77 test split; every stream is
built from the other half, so no baseline is measured on the traffic it judges.

Streams: a clean prefix of `--prefix` requests (its first `drift.reference_requests` are the
champion's early traffic, the input-drift reference), then `--segment` requests that are
- none: more of the same (20 streams, `--streams`);
- prior: only 8 of the 77 intents (label-prior shift);
- vocab: the robustness suite's rephrasings (typos, casing, punctuation, word order, templates);
- oos10 / oos30: out-of-scope questions mixed in at 10 % / 30 %.
A check runs every `--every` requests of the segment on the `drift.recent_requests` most recent
ones, exactly as the drift watch judges them (the drift config's defaults): shadow mode, so every
request has the teacher's answer; gold feedback arrives for a random `--feedback` share.

Two parts, from one run:
1. Replay (the real serving path): one clean stream and one oos30 stream are sent through a real
   `distill serve` with shadow logging (the teacher answering in the shadow), from a load generator
   in its own process; the drift watch's own tasks then judge the logged traffic. Printed: how
   often the served/logged labels match the precomputed ones, and the sensors' decisions.
2. Statistics: the same sensor functions on many streams, from the student's and teacher's answers
   computed once per distinct text (the replay shows they are what serving logs). False-alarm rate
   = share of checks on clean streams that fired; delay = requests after the change point until
   the first check that fired (median over `--drift-streams` streams; "never" within the segment).
   entropy_collapse judges distillation cycles, not traffic: it is measured on simulated histories
   of holdout entropy (no trend vs a model sharpening each cycle) and reported in cycles.

The last line has the worst traffic sensor's figures (highest false-alarm rate, longest delays):

    false_alarm_rate=F delay_oos30=N delay_oos10=M

    .venv/bin/python bench/drift.py            # a few minutes on 2 cores

Measured (defaults, 2 shared cores; the first run also builds the models, about 5 minutes):

    sensor            test                                false alarms  delay prior  delay vocab  delay oos10  delay oos30
    divergence        two-proportion z (agreement)               0.0%        never        never        never          500
    accuracy_drop     two-proportion z (gold acc.)               0.0%        never        never         1200          700
    input_drift       MMD permutation (embeddings)               1.7%          300          400          900          400
    entropy_collapse  Mann-Kendall exact (cycles)                2.5%   (simulated histories, 80 checks; a model sharpening 0.08 nats per cycle is found after 4 cycles in 100% of histories)
    false_alarm_rate=0.017 delay_oos30=700 delay_oos10=never
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np

from distill.offline import apply_offline_env

apply_offline_env()

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "distill" / "data" / "banking77"
OOS = "__out_of_scope__"  # the gold of an out-of-scope request: no intent is right
TRAFFIC_SENSORS = ("divergence", "accuracy_drop", "input_drift")
KINDS = ("prior", "vocab", "oos10", "oos30")


def extra_ood() -> list[str]:
    """Everyday questions a banking assistant should never see (beyond distill/data/ood.txt)."""
    asks = ["How do I {} {}?", "What is the best way to {} {}?", "Can you explain how to {} {}?",
            "Is it hard to {} {} at home?", "Any tips to {} {} quickly?"]
    things = [("bake", "sourdough bread"), ("grow", "tomatoes on a balcony"), ("train", "a puppy to sit"),
              ("fix", "a squeaky door hinge"), ("learn", "the guitar chords of a pop song"),
              ("plan", "a hiking trip in the Alps"), ("repot", "an orchid"), ("tune", "a bicycle gear"),
              ("paint", "a watercolour sunset"), ("brew", "cold brew coffee"), ("knit", "a wool scarf"),
              ("clean", "an oven without chemicals"), ("memorise", "a chess opening"),
              ("photograph", "the night sky"), ("stretch", "after a long run"), ("cook", "a vegetable curry")]
    return [a.format(*t) for t in things for a in asks]


def build_models(out: Path, train_rows: int, teacher_rows: int, labels: list[str]) -> tuple[Path, Path, list[str]]:
    """The champion (2-layer MiniLM + linear probe) and the demo teacher, on disjoint training rows.

    Returns (student_dir, teacher_dir, the champion's training texts).
    """
    from distill.config import ClassifierKDTrain
    from distill.data import read_table
    from distill.models.encoders import MINILM, EmbeddingClassifier
    from distill.train.classifier import build_student, linear_probe_head

    rows = read_table(DATA / "train.csv", required=["text", "category"])
    random.Random(0).shuffle(rows)
    stud, teach = rows[:train_rows], rows[train_rows:train_rows + teacher_rows]
    config = ClassifierKDTrain(init_from_teacher=MINILM, student_layers=2, pooling="mean")
    model, tokenizer = build_student(config, labels)
    linear_probe_head(model, tokenizer, [{"text": r["text"], "target": r["category"]} for r in stud], labels, config)
    student_dir = out / "student"
    model.eval().save_pretrained(student_dir, safe_serialization=True)
    tokenizer.save_pretrained(student_dir)
    teacher = EmbeddingClassifier.fit(MINILM, [r["text"] for r in teach], [r["category"] for r in teach], labels)
    teacher_dir = teacher.save(out / "teacher")
    return student_dir, teacher_dir, [r["text"] for r in stud]


def corpus(rephrase_rows: int) -> dict:
    """Eval half and stream half of test.csv, rephrasings of stream rows, out-of-scope texts."""
    from distill.data import read_table
    from distill.evaluate.robustness import load_ood, pick_rows, rephrased_rows

    test = read_table(DATA / "test.csv", required=["text", "category"])
    rows = [{"id": f"test-{r['_line']}", "text": r["text"], "gold": r["category"]} for r in test]
    # Alternate rows: both halves cover every intent (the file is sorted by intent).
    evaluation, stream = rows[0::2], rows[1::2]
    vocab = [{"text": v["text"], "gold": v["gold"]} for v in rephrased_rows(pick_rows(stream, rephrase_rows))]
    oos = [{"text": t, "gold": OOS} for t in dict.fromkeys(load_ood() + extra_ood())]
    return {"eval": evaluation, "stream": stream, "vocab": vocab, "oos": oos}


def answers(student_dir: Path, teacher_dir: Path, texts: list[str]) -> dict[str, dict]:
    """{text: {"student", "teacher", "emb"}}: each distinct text through both models once."""
    from distill.models.classifier import ClassifierStudent
    from distill.models.encoders import EmbeddingClassifier

    texts = list(dict.fromkeys(texts))
    student = ClassifierStudent(student_dir)
    s = student.predict_proba(texts).argmax(1)
    teacher = EmbeddingClassifier.load(teacher_dir)
    emb = teacher.encoder.encode(texts)
    t = (emb @ teacher.weight.T + teacher.bias).argmax(1)
    return {x: {"student": student.labels[i], "teacher": teacher.labels[j], "emb": e}
            for x, i, j, e in zip(texts, s, t, emb)}


def prepare(args, labels: list[str]) -> tuple[Path, Path, list[str], dict, dict]:
    """Models, corpus and every distinct text's answers, built once and kept under args.cache."""
    import shutil

    c = corpus(args.rephrase_rows)
    d = args.cache / f"train{args.train_rows}-teacher{args.teacher_rows}-rephrase{args.rephrase_rows}-v1"
    if not (d / "answers.npz").exists():
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        student_dir, teacher_dir, train_texts = build_models(tmp, args.train_rows, args.teacher_rows, labels)
        (tmp / "train_texts.json").write_text(json.dumps(train_texts))
        texts = [r["text"] for part in c.values() for r in part] + train_texts
        ans = answers(student_dir, teacher_dir, texts)
        keys = list(ans)
        np.savez(tmp / "answers.npz", emb=np.stack([ans[k]["emb"] for k in keys]))
        (tmp / "answers.json").write_text(json.dumps([[k, ans[k]["student"], ans[k]["teacher"]] for k in keys]))
        shutil.rmtree(d, ignore_errors=True)
        tmp.replace(d)
    emb = np.load(d / "answers.npz")["emb"]
    ans = {k: {"student": s_, "teacher": t_, "emb": e}
           for (k, s_, t_), e in zip(json.loads((d / "answers.json").read_text()), emb)}
    return d / "student", d / "teacher", json.loads((d / "train_texts.json").read_text()), c, ans


def make_stream(kind: str, c: dict, prefix: int, segment: int, seed: int) -> list[dict]:
    """`prefix` clean requests (the first drift.reference_requests of them are the champion's early
    traffic, the input-drift reference), then `segment` requests of `kind` (none, prior, vocab, oos10, oos30)."""
    rng = random.Random(seed)
    clean = c["stream"]
    out = [dict(rng.choice(clean)) for _ in range(prefix)]
    if kind == "prior":
        intents = rng.sample(sorted({r["gold"] for r in clean}), 8)
        pool = [r for r in clean if r["gold"] in intents]
    for _ in range(segment):
        if kind == "none":
            r = rng.choice(clean)
        elif kind == "prior":
            r = rng.choice(pool)
        elif kind == "vocab":
            r = rng.choice(c["vocab"])
        else:
            r = rng.choice(c["oos"]) if rng.random() < {"oos10": 0.10, "oos30": 0.30}[kind] else rng.choice(clean)
        out.append(dict(r))
    for r in out:
        r["feedback"] = rng.random()  # gold "arrives" for the requests below the feedback share
    return out


def judge(window: list[dict], ans: dict, ref_texts: list[str], base: dict, drift, feedback: float,
          seed: int) -> dict[str, dict]:
    """The three traffic sensors on one window, as the drift watch runs them (DriftConfig values)."""
    from distill.drift import sensors

    sample = window  # shadow mode: every request has the teacher's answer, and every one is used
    fed = [r for r in window if r["feedback"] < feedback]

    def embed(texts):
        return np.stack([ans[t]["emb"] for t in texts])

    return {
        "divergence": sensors.divergence([ans[r["text"]]["student"] for r in sample],
                                         [ans[r["text"]]["teacher"] for r in sample], base["agreement"], base["n"],
                                         drift.max_disagreement_increase, drift.alpha, drift.min_shadow_pairs),
        "accuracy_drop": sensors.accuracy_drop([ans[r["text"]]["student"] for r in fed], [r["gold"] for r in fed],
                                               base["accuracy"], base["n"], drift.accuracy_drop, drift.alpha,
                                               drift.min_feedback),
        "input_drift": sensors.input_drift(ref_texts, [r["text"] for r in window], drift.input_drift_p_value,
                                           embed=embed, min_recent=drift.min_requests,
                                           max_samples=drift.max_samples, permutations=drift.permutations,
                                           seed=seed),
    }


def run_stream(stream: list[dict], ans: dict, ref: list[str], base: dict, drift, args, seed: int,
               stop_when_all_fired: bool) -> list[tuple[int, dict[str, bool]]]:
    """[(requests since the change point, {sensor: fired})] for every check of the segment."""
    checks, seen = [], set()
    early = [r["text"] for r in stream[:drift.reference_requests]]
    ref = early if len(early) >= drift.min_requests else ref
    for k, end in enumerate(range(args.prefix + args.every, len(stream) + 1, args.every)):
        window = stream[max(drift.reference_requests, end - drift.recent_requests):end]
        res = judge(window, ans, ref, base, drift, args.feedback, seed * 1000 + k)
        fired = {n: r["fired"] for n, r in res.items()}
        checks.append((end - args.prefix, fired))
        seen.update(n for n, f in fired.items() if f)
        if stop_when_all_fired and seen >= set(TRAFFIC_SENSORS):
            break
    return checks


def entropy_characteristics(drift, histories: int, seed: int) -> dict:
    """entropy_collapse on simulated cycle histories: false alarms with no trend, delay (cycles) with one."""
    from distill.drift.sensors import entropy_collapse

    rng = np.random.default_rng(seed)
    alarms = checks = 0
    delays = []
    for _ in range(histories):
        ent = list(rng.normal(1.0, 0.05, 7))  # the same quality every cycle, measurement noise only
        acc = list(rng.normal(0.85, 0.01, 7))
        for n in range(1, 8):
            r = entropy_collapse(ent[:n], acc[:n], drift.entropy_window, drift.entropy_alpha)
            checks += r["status"] != "not enough data"
            alarms += r["fired"]
        sharp = [1.0 - 0.08 * i + rng.normal(0, 0.02) for i in range(7)]  # sharper each cycle, no better
        fired = [n for n in range(1, 8) if entropy_collapse(sharp[:n], acc[:n], drift.entropy_window,
                                                            drift.entropy_alpha)["fired"]]
        delays.append(fired[0] if fired else None)
    found = [d for d in delays if d is not None]
    return {"false_alarm_rate": alarms / max(checks, 1), "checks": checks,
            "delay_cycles": float(np.median(found)) if found else None, "detected": len(found) / histories}


def replay(student_dir: Path, teacher_dir: Path, streams: dict[str, list[dict]], tmp: Path) -> dict[str, list[dict]]:
    """Send each stream through `distill serve` (shadow on, the teacher in its own process); the logged rows."""
    import sqlite3

    from distill.demo import TEACHER_KEY_ENV, teacher_process
    from distill.evaluate import latency
    from distill.httpserver import free_port
    from distill.serve.shadow import ShadowLog

    key = secrets.token_urlsafe(12)
    out = {}
    with teacher_process(teacher_dir, free_port(), "bench-teacher") as teacher_url:
        for name, stream in streams.items():
            db = tmp / f"replay-{name}.sqlite"
            overrides = ["serve.shadow=true", f"serve.log_url=sqlite:///{db}", f"teacher.base_url={teacher_url}/v1",
                         "teacher.model=bench-teacher", f"teacher.api_key_env={TEACHER_KEY_ENV}", "serve.runtime=onnx"]
            with latency.serve_process(student_dir, overrides, api_key=key) as url:
                payloads = [{"model": "distill-student", "messages": [{"role": "user", "content": r["text"]}]}
                            for r in stream]
                load = latency.measure_process(url + "/v1/chat/completions", payloads, len(payloads), 4,
                                               api_key=key, warmup=0)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:  # shadow answers are logged in the background
                    with sqlite3.connect(db, timeout=30) as c:
                        done = c.execute("select count(*) from requests where teacher_label is not null "
                                         "or teacher_error is not null").fetchone()[0]
                    if done >= len(stream):
                        break
                    time.sleep(0.5)
            log = ShadowLog(f"sqlite:///{db}")
            out[name] = {"rows": log.recent(), "load": load, "db": db}
            log.close()
    return out


def judge_logged(db: Path, student_dir: Path, stream: list[dict], labels: list[str], base: dict,
                 train_texts: list[str], drift, feedback: float, seed: int) -> dict[str, dict]:
    """The drift watch's own tasks (read-traffic, label-recent-traffic, run-drift-sensors) on a served log."""
    from distill_tasks.drift import label_recent, read_traffic, run_sensors

    from distill.demo import demo_task
    from distill.drift.feedback import apply_feedback
    from distill.serve.shadow import ShadowLog

    recent = len(stream) - drift.reference_requests
    keys = [str(student_dir), str(student_dir.resolve())]
    traffic = read_traffic.fn(f"sqlite:///{db}", recent, keys, drift.reference_requests)
    # Gold "arrives" for a share of the judged requests, through the same code as `distill feedback`.
    gold = {r["text"]: r["gold"] for r in stream if r["feedback"] < feedback}
    log = ShadowLog(f"sqlite:///{db}")
    apply_feedback(log, {r["request_id"]: gold[r["text"]] for r in traffic["rows"] if r["text"] in gold}, str(db))
    log.close()
    traffic = read_traffic.fn(f"sqlite:///{db}", recent, keys, drift.reference_requests)
    # Every judged row carries the shadow teacher's answer; nothing is re-labelled (no paid endpoint here).
    labelled = label_recent.fn(traffic["rows"], demo_task(), drift.model_copy(update={"relabel": False}), None,
                               None, "", seed)
    model = {"model_dir": str(student_dir), "run_id": None,
             "metrics": {"student_accuracy": base["accuracy"], "agreement": base["agreement"], "n_holdout": base["n"]}}
    holdout = {"accuracy": base["accuracy"], "entropy": 1.0, "n": base["n"], "labels": labels}
    out = run_sensors.fn(model, holdout, traffic, labelled, train_texts, drift)["sensors"]
    out["_reference"] = {"n": len(traffic["reference_texts"]), "judged": len(traffic["rows"])}
    return out


def main() -> None:  # long: the benchmark's steps in the order they are printed
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=20, help="Clean streams for the false-alarm rate.")
    p.add_argument("--drift-streams", type=int, default=5, help="Streams per drift kind for the delay.")
    p.add_argument("--prefix", type=int, default=1500, help="Clean requests before the change point (the first "
                   "drift.reference_requests are the champion's early traffic).")
    p.add_argument("--segment", type=int, default=1200, help="Requests after the change point.")
    p.add_argument("--every", type=int, default=100, help="Requests between two checks.")
    p.add_argument("--feedback", type=float, default=0.2, help="Share of requests whose gold label arrives.")
    p.add_argument("--replay", type=int, default=600, help="Judged requests per replayed stream, after the "
                   "champion's early traffic (0: no replay).")
    p.add_argument("--train-rows", type=int, default=2000, help="Training rows of the champion's probe.")
    p.add_argument("--teacher-rows", type=int, default=1500, help="Training rows of the teacher's head.")
    p.add_argument("--rephrase-rows", type=int, default=200, help="Stream rows rephrased for the vocab shift.")
    p.add_argument("--cache", type=Path, default=ROOT / ".distill" / "bench-drift",
                   help="Models and answers are kept here between runs (keyed by the sizes above).")
    p.add_argument("--set", dest="set_", action="append", default=[], help="drift.* override, e.g. drift.alpha=0.005")
    args = p.parse_args()

    from distill.config import load_config

    drift = load_config(None, args.set_, need_task=False).drift
    labels = json.loads((DATA / "categories.json").read_text())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        tmp = Path(tmp)
        student_dir, teacher_dir, train_texts, c, ans = prepare(args, labels)
        ref = train_texts  # the input-drift reference only while a stream has too little early traffic
        ev = c["eval"]
        base = {"agreement": float(np.mean([ans[r["text"]]["student"] == ans[r["text"]]["teacher"] for r in ev])),
                "accuracy": float(np.mean([ans[r["text"]]["student"] == r["gold"] for r in ev])), "n": len(ev)}
        print(f"champion on the eval half ({base['n']} rows): accuracy {base['accuracy']:.4f}, agreement with "
              f"the teacher {base['agreement']:.4f}; models and answers in {time.perf_counter() - t0:.0f} s")

        if args.replay:
            # The champion's early traffic (clean), then the judged requests: clean, or 30 % out of scope.
            served = {name: make_stream(kind, c, drift.reference_requests, args.replay, 900 + i)
                      for i, (name, kind) in enumerate((("none", "none"), ("oos30", "oos30")))}
            logged = replay(student_dir, teacher_dir, served, tmp)
            for name, stream in served.items():
                rows, load = logged[name]["rows"], logged[name]["load"]
                same_s = np.mean([r["champion_label"] == ans[r["text"]]["student"] for r in rows])
                same_t = np.mean([r["teacher_label"] == ans[r["text"]]["teacher"] for r in rows])
                res = judge_logged(logged[name]["db"], student_dir, stream, labels, base, train_texts, drift,
                                   args.feedback, seed=7)
                ref = res.pop("_reference")
                verdicts = ", ".join(f"{n} {'FIRED' if r['fired'] else r['status']} (p={r['p_value']:.3g})"
                                     if r.get("p_value") is not None else f"{n} {r['status']}" for n, r in res.items())
                print(f"replay {name}: {len(rows)} requests served and logged ({load['errors']} errors, "
                      f"{load['throughput_rps']:.0f} req/s); logged labels = precomputed: student {same_s:.3f}, "
                      f"teacher {same_t:.3f}; the drift watch's tasks on the last {ref['judged']} (reference: "
                      f"the {ref['n']} before): {verdicts}")
                if min(same_s, same_t) < 0.99:  # the served path is what is measured: it must log what was answered
                    errors = sorted({r.get("teacher_error") for r in rows if r.get("teacher_error")})[:3]
                    raise SystemExit(f"replay {name}: the shadow log does not hold the served answers "
                                     f"(student {same_s:.3f}, teacher {same_t:.3f}); teacher errors: {errors}")

        alarms = {n: [] for n in TRAFFIC_SENSORS}
        for s in range(args.streams):
            for _, fired in run_stream(make_stream("none", c, args.prefix, args.segment, s), ans, ref, base, drift,
                                       args, s, stop_when_all_fired=False):
                for n in TRAFFIC_SENSORS:
                    alarms[n].append(fired[n])
        delays: dict[str, dict[str, list]] = {k: {n: [] for n in TRAFFIC_SENSORS} for k in KINDS}
        for k, kind in enumerate(KINDS):
            for s in range(args.drift_streams):
                seed = 100 * (k + 1) + s
                checks = run_stream(make_stream(kind, c, args.prefix, args.segment, seed), ans, ref, base, drift,
                                    args, seed, stop_when_all_fired=True)
                for n in TRAFFIC_SENSORS:
                    first = next((at for at, fired in checks if fired[n]), None)
                    delays[kind][n].append(first)
        ent = entropy_characteristics(drift, histories=args.streams, seed=0)

    def median_delay(v: list) -> float | None:
        # "never" counts as longer than any delay: a sensor blind to this drift in most streams has no delay.
        found = sorted(x if x is not None else float("inf") for x in v)
        m = found[len(found) // 2]
        return None if m == float("inf") else float(m)

    def fmt(d):
        return "never" if d is None else f"{d:.0f}"

    print(f"\n{args.streams} clean streams x {args.segment // args.every} checks; {args.drift_streams} streams per "
          f"drift kind; a check every {args.every} requests on the last {drift.recent_requests}; every request's "
          f"shadow teacher answer used; gold on {args.feedback:.0%} of requests; alpha {drift.alpha} "
          f"(input drift {drift.input_drift_p_value})")
    print(f"{'sensor':<17} {'test':<34} {'false alarms':>13} " + " ".join(f"{'delay ' + k:>12}" for k in KINDS))
    tests = {"divergence": "two-proportion z (agreement)", "accuracy_drop": "two-proportion z (gold acc.)",
             "input_drift": "MMD permutation (embeddings)"}
    for n in TRAFFIC_SENSORS:
        rate = float(np.mean(alarms[n]))
        print(f"{n:<17} {tests[n]:<34} {rate:>12.1%} " + " ".join(f"{fmt(median_delay(delays[k][n])):>12}"
                                                                  for k in KINDS))
    print(f"{'entropy_collapse':<17} {'Mann-Kendall exact (cycles)':<34} {ent['false_alarm_rate']:>12.1%} "
          f"  (simulated histories, {ent['checks']} checks; a model sharpening 0.08 nats per cycle is found after "
          f"{fmt(ent['delay_cycles'])} cycles in {ent['detected']:.0%} of histories)")
    for k in KINDS:
        any_d = [min([x for x in (delays[k][n][i] for n in TRAFFIC_SENSORS) if x is not None], default=None)
                 for i in range(args.drift_streams)]
        print(f"first sensor to fire, {k}: median {fmt(median_delay(any_d))} requests after the change")
    print(f"wall {time.perf_counter() - t0:.0f} s")
    worst_rate = max(float(np.mean(alarms[n])) for n in TRAFFIC_SENSORS)

    def worst(kind: str) -> str:
        ds = [median_delay(delays[kind][n]) for n in TRAFFIC_SENSORS]
        return "never" if any(d is None for d in ds) else f"{max(ds):.0f}"

    print(f"false_alarm_rate={worst_rate:.3f} delay_oos30={worst('oos30')} delay_oos10={worst('oos10')}")


if __name__ == "__main__":
    main()
