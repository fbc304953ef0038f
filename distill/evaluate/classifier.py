"""The evaluation of a classification student against gold labels and its teacher.

One call, `evaluate_classifier`, measures everything the readiness gate judges:

- in-distribution: student and teacher accuracy on the gold holdout (never used
  for training), retention, agreement, per-label precision/recall/F1, confusion;
- tail: a deterministic slice of the hardest inputs (rare labels, long or oddly
  formatted inputs, lowest teacher confidence, and user-supplied rows), with the
  teacher-student gap measured there;
- calibration: temperature fitted on the validation split, ECE/MCE/Brier before
  and after, reliability diagrams;
- robustness: accuracy on deterministic rephrasings, abstention on
  out-of-domain inputs;
- output entropy, stored per run to track entropy collapse across cycles;
- latency under concurrent single requests (student over real HTTP, teacher at
  its endpoint) and cost per 1,000 requests.

Teacher predictions come from the teacher records of the holdout (persisted by
the generation stage), so nothing is paid twice here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError, EvaluateConfig, ServeConfig
from distill.data import read_jsonl, write_jsonl, write_text
from distill.evaluate import calibration, gate, latency, metrics, robustness
from distill.evaluate.records import clean_json, first_records
from distill.evaluate.tail import load_tail_rows, select_tail
from distill.models.classifier import ClassifierStudent
from distill.teacher.soft_labels import label_of, soft_labels

log = logging.getLogger("distill.evaluate")


def _ask_teacher(rows: list[dict[str, Any]], path: Path, url: str, model: str, api_key: str | None,
                 concurrency: int, timeout_s: float, labels: list[str]) -> dict[str, str | None]:
    """Teacher labels for rows it has not answered before; every answer is saved before it is used."""
    saved = {r["id"]: r for r in read_jsonl(path)} if path.exists() else {}
    missing = [r for r in rows if r["id"] not in saved or saved[r["id"]]["status"] != "done"]
    if missing:
        res = latency.measure(url, latency.chat_payloads(missing, model), n_requests=len(missing),
                              concurrency=concurrency, api_key=api_key, timeout_s=timeout_s, warmup=0,
                              keep_bodies=True)
        for r, body in zip(missing, res["bodies"]):
            try:
                response = body["choices"][0]["message"]["content"]
                saved[r["id"]] = {"id": r["id"], "status": "done", "error": None, "response": response,
                                  "model": model, "messages": r["messages"]}
            except (TypeError, KeyError, IndexError):
                saved[r["id"]] = {"id": r["id"], "status": "failed", "error": "malformed or failed reply",
                                  "response": None, "model": model, "messages": r["messages"]}
        write_jsonl(path, saved.values())
    return {r["id"]: label_of(saved[r["id"]].get("response"), labels) for r in rows}


def evaluate_classifier(student_dir: str | Path, holdout: list[dict], teacher_records: list[dict],
                        labels: list[str], config: EvaluateConfig, out_dir: str | Path,
                        validation: list[dict] | None = None, teacher_url: str | None = None,
                        teacher_model: str | None = None, teacher_api_key: str | None = None,
                        teacher_price: tuple[float, float] = (0.0, 0.0),
                        train_label_counts: dict[str, int] | None = None) -> dict:
    """Measure a classification student; write calibration.json into it and plots into out_dir.

    Args:
        student_dir: the student directory (see distill.models.classifier).
        holdout: gold task rows, never used for training.
        teacher_records: the teacher's records for the holdout rows (same ids).
        labels: the task's label set.
        config: the evaluate section.
        out_dir: where plots, tail.jsonl and robustness.jsonl go (the run directory).
        validation: training rows with split "validation"; the temperature is fitted there only.
        teacher_url: teacher base URL (…/v1) for latency and for user tail rows it has not answered.
        teacher_model: model name sent to the teacher.
        teacher_api_key: sent as a Bearer token, never written anywhere.
        teacher_price: (input, output) USD per 1M tokens.
        train_label_counts: training-label frequencies, for the rare-label part of the tail.
    Returns:
        A JSON-safe metrics dict (NaN written as null); plot paths are relative to out_dir.
    """

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_holdout(holdout, labels)
    # User files are read before any model work, so a bad line fails in seconds.
    user_tail = load_tail_rows(config.tail_path, holdout, labels) if config.tail_path else []
    ood = robustness.load_ood(config.ood_path)
    student = ClassifierStudent(student_dir)
    if set(student.labels) != set(labels):
        raise ConfigError(f"{student_dir}: the student's labels differ from the task's label set")
    m: dict[str, Any] = {"n_holdout": len(holdout), "n_labels": len(labels)}
    laps = _Laps()

    p = _predict_holdout(student, holdout, teacher_records, labels)
    m.update(_in_distribution(p, labels))
    laps.lap("in_distribution")

    calibrated, probs = _calibration(student, p, validation, config, student_dir, out_dir,
                                     m["confusion"]["matrix"], labels)
    m.update(calibrated)
    laps.lap("calibration")

    # Uncalibrated: a refitted temperature would otherwise mask a collapse from one cycle to the next.
    m.update(output_entropy=metrics.mean_entropy(p.raw), output_entropy_calibrated=metrics.mean_entropy(probs),
             label_entropy=metrics.label_entropy(p.student_pred))

    m.update(_tail(student, holdout, user_tail, labels, config, out_dir, p.teacher_pred, p.student_pred,
                   p.teacher_conf, train_label_counts, teacher_url, teacher_model, teacher_api_key))
    laps.lap("tail")

    if config.robustness:
        m.update(_robustness(student, holdout, p.student_pred, config, out_dir))
    else:
        m.update(robustness_accuracy=None, robustness_drop=None)
    m.update(_out_of_domain(student, ood, probs, m["temperature"], config))
    laps.lap("robustness_ood")

    m.update(_latency(student_dir, holdout, config, out_dir, teacher_url, teacher_model, teacher_api_key,
                      teacher_records))
    m["student_cost_per_1k"] = latency.student_cost_per_1k(config.student_cost_per_hour, m["student_peak_rps"])
    m["teacher_cost_per_1k"] = latency.teacher_cost_per_1k(teacher_records, teacher_price)
    m.update(gate.relative_metrics(m))
    laps.lap("latency")
    m["eval_stage_s"] = laps.stages
    m["eval_s"] = round(time.perf_counter() - started, 2)
    return clean_json(m)


def _check_holdout(holdout: list[dict], labels: list[str]) -> None:
    if not holdout:
        raise ConfigError("task.test_path: the gold holdout is empty; evaluation needs gold labels")
    for r in holdout:
        if r.get("gold") not in labels:
            raise ConfigError(f"holdout line {r.get('_line', '?')}: gold label {r.get('gold')!r} is not in the label set")


class _Laps:
    """Seconds spent in each section, for metrics' eval_stage_s."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self.mark, 2)
        self.mark = now


@dataclass
class _Holdout:
    """Both models' answers on the holdout, which every later section reads."""

    gold: list[str]
    y: np.ndarray  # gold label indices in the student's label order
    order: list[str]  # the student's label order
    teacher_pred: list[str | None]  # None where the teacher did not answer
    teacher_conf: dict[str, float]  # top teacher probability by row id, where it gave a distribution
    logits: np.ndarray
    raw: np.ndarray  # uncalibrated student probabilities
    student_pred: list[str]


def _predict_holdout(student: ClassifierStudent, holdout: list[dict], teacher_records: list[dict],
                     labels: list[str]) -> _Holdout:
    order = list(student.labels)
    index = {l: i for i, l in enumerate(order)}
    gold = [r["gold"] for r in holdout]
    by_id = first_records(teacher_records)
    teacher_pred: list[str | None] = []
    teacher_conf: dict[str, float] = {}
    for r in holdout:
        rec = by_id.get(r["id"])
        ok = rec is not None and rec.get("status") == "done"
        teacher_pred.append(label_of(rec.get("response"), labels) if ok else None)
        dist = soft_labels(rec, labels) if ok else None
        if dist:
            teacher_conf[r["id"]] = max(dist.values())
    logits = student.logits([r["text"] for r in holdout])
    raw = calibration.softmax(logits)
    return _Holdout(gold=gold, y=np.array([index[g] for g in gold]), order=order, teacher_pred=teacher_pred,
                    teacher_conf=teacher_conf, logits=logits, raw=raw,
                    student_pred=[order[i] for i in raw.argmax(axis=1)])


def _in_distribution(p: _Holdout, labels: list[str]) -> dict[str, Any]:
    m: dict[str, Any] = {"teacher_unanswered": sum(t is None for t in p.teacher_pred)}
    m["teacher_accuracy"] = metrics.accuracy(p.gold, p.teacher_pred)
    m["student_accuracy"] = metrics.accuracy(p.gold, p.student_pred)
    m["retention"] = m["student_accuracy"] / m["teacher_accuracy"] if m["teacher_accuracy"] else math.nan
    m["agreement"] = metrics.agreement(p.student_pred, p.teacher_pred)
    per_label = metrics.per_label_scores(p.gold, p.student_pred, labels)
    teacher_per_label = metrics.per_label_scores(p.gold, [t or "" for t in p.teacher_pred], labels)
    for l in labels:
        per_label[l]["teacher_f1"] = teacher_per_label[l]["f1"]
    m["macro_f1"] = metrics.macro_f1(per_label)
    m["teacher_macro_f1"] = metrics.macro_f1(teacher_per_label)
    m["per_label"] = per_label
    m["confusion"] = {"labels": labels, "matrix": metrics.confusion(p.gold, p.student_pred, labels)}
    return m


def _calibration(student: ClassifierStudent, p: _Holdout, validation: list[dict] | None, config: EvaluateConfig,
                 student_dir: str | Path, out_dir: Path, conf_matrix: np.ndarray,
                 labels: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """Calibration measures, the reliability and confusion plots, and the calibrated holdout probabilities.

    The temperature is fitted on the validation rows only, never on the holdout.
    """
    index = {l: i for i, l in enumerate(p.order)}
    m: dict[str, Any] = {}
    val = [r for r in (validation or []) if r.get("target") in index]
    if val:
        v_logits = student.logits([r["text"] for r in val])
        v_y = np.array([index[r["target"]] for r in val])
        temperature = calibration.fit_temperature(v_logits, v_y)
        m["validation_nll_before"] = metrics.nll(calibration.softmax(v_logits), v_y)
        m["validation_nll_after"] = metrics.nll(calibration.softmax(v_logits, temperature), v_y)
    else:
        log.warning("no validation rows: temperature left at 1.0 (never fitted on the holdout)")
        temperature = 1.0
    m["temperature"] = temperature
    m["validation_rows"] = len(val)
    write_text(Path(student_dir) / "calibration.json", json.dumps({"temperature": temperature}))
    probs = calibration.softmax(p.logits, temperature)
    n_bins, raw, y = config.ece_bins, p.raw, p.y
    conf_b, corr_b = metrics.top_label(raw, y)
    conf_a, corr_a = metrics.top_label(probs, y)
    m.update(ece_bins=n_bins,
             ece_before=metrics.ece(conf_b, corr_b, n_bins), ece=metrics.ece(conf_a, corr_a, n_bins),
             mce_before=metrics.mce(conf_b, corr_b, n_bins), mce=metrics.mce(conf_a, corr_a, n_bins),
             brier_before=metrics.brier(raw, y), brier=metrics.brier(probs, y),
             nll_before=metrics.nll(raw, y), nll=metrics.nll(probs, y))
    calibration.reliability_diagram(conf_b, corr_b, out_dir / "reliability_before.png", n_bins,
                                    "Before temperature scaling")
    calibration.reliability_diagram(conf_a, corr_a, out_dir / "reliability_after.png", n_bins,
                                    f"After temperature scaling (T={temperature:.2f})")
    calibration.confusion_plot(conf_matrix, labels, out_dir / "confusion.png", "Student confusion (holdout)")
    m["plots"] = {"reliability_before": "reliability_before.png", "reliability_after": "reliability_after.png",
                  "confusion": "confusion.png"}
    return m, probs


def _out_of_domain(student: ClassifierStudent, ood: list[str], probs: np.ndarray, temperature: float,
                   config: EvaluateConfig) -> dict[str, Any]:
    ood_probs = calibration.softmax(student.logits(ood), temperature)
    return dict(ood_size=len(ood), abstain_threshold=config.abstain_threshold,
                ood_abstain_rate=robustness.abstain_rate(ood_probs, config.abstain_threshold),
                ood_mean_confidence=float(ood_probs.max(axis=1).mean()),
                holdout_abstain_rate=robustness.abstain_rate(probs, config.abstain_threshold))


def _tail(student, holdout, user, labels, config, out_dir, teacher_pred, student_pred, teacher_conf,
          train_label_counts, teacher_url, teacher_model, teacher_api_key) -> dict[str, Any]:
    position = {r["id"]: i for i, r in enumerate(holdout)}
    by_text = {r["text"]: i for i, r in enumerate(holdout)}
    slice_ = select_tail(holdout, teacher_conf, config.tail_size, train_label_counts, user)
    if not slice_:
        return {"tail_size": 0, "tail_teacher_accuracy": None, "tail_student_accuracy": None, "tail_gap": None}
    # User rows that are holdout rows reuse the holdout predictions; the rest need both models.
    fresh = [r for r, why in slice_ if why == "user" and r["id"] not in position and r["text"] not in by_text]
    fresh_student = dict(zip([r["id"] for r in fresh], student.predict(
        [r["text"] for r in fresh]) if fresh else []))
    fresh_teacher: dict[str, str | None] = {}
    if fresh and teacher_url and teacher_model:
        fresh_teacher = _ask_teacher(fresh, out_dir / "tail_teacher.jsonl", f"{teacher_url}/chat/completions",
                                     teacher_model, teacher_api_key, config.latency_concurrency,
                                     config.latency_timeout_s, labels)
    rows_out = []
    for r, why in slice_:
        i = position.get(r["id"], by_text.get(r["text"]))
        if i is not None:
            t, s = teacher_pred[i], student_pred[i]
        else:
            t, s = fresh_teacher.get(r["id"]), fresh_student[r["id"]]
        rows_out.append({"id": r["id"], "text": r["text"], "gold": r["gold"], "reason": why,
                         "teacher": t, "student": s})
    write_jsonl(out_dir / "tail.jsonl", rows_out)
    gold = [r["gold"] for r in rows_out]
    t_acc = metrics.accuracy(gold, [r["teacher"] for r in rows_out])
    s_acc = metrics.accuracy(gold, [r["student"] for r in rows_out])
    reasons = Counter(r["reason"] for r in rows_out)
    by_reason = {}
    for why in reasons:
        part = [r for r in rows_out if r["reason"] == why]
        g = [r["gold"] for r in part]
        by_reason[why] = {"n": len(part), "teacher_accuracy": metrics.accuracy(g, [r["teacher"] for r in part]),
                          "student_accuracy": metrics.accuracy(g, [r["student"] for r in part])}
    return {"tail_size": len(rows_out), "tail_teacher_accuracy": t_acc, "tail_student_accuracy": s_acc,
            "tail_gap": t_acc - s_acc, "tail_by_reason": by_reason,
            # Counted as teacher errors: rows the teacher never answered (no endpoint, or it failed).
            "tail_teacher_unanswered": sum(r["teacher"] is None for r in rows_out)}


def _robustness(student, holdout, student_pred, config, out_dir) -> dict[str, Any]:
    subset = robustness.pick_rows(holdout, config.robustness_rows)
    position = {r["id"]: i for i, r in enumerate(holdout)}
    variants = robustness.rephrased_rows(subset)
    preds = student.predict([v["text"] for v in variants])
    original = metrics.accuracy([r["gold"] for r in subset], [student_pred[position[r["id"]]] for r in subset])
    rephrased = metrics.accuracy([v["gold"] for v in variants], preds)
    by_kind = {}
    for kind in robustness.KINDS:
        idx = [i for i, v in enumerate(variants) if v["kind"] == kind]
        by_kind[kind] = metrics.accuracy([variants[i]["gold"] for i in idx], [preds[i] for i in idx])
    write_jsonl(out_dir / "robustness.jsonl", [{**v, "student": p} for v, p in zip(variants, preds)])
    return {"robustness_rows": len(subset), "robustness_original_accuracy": original,
            "robustness_accuracy": rephrased, "robustness_drop": original - rephrased,
            "robustness_by_kind": by_kind}


def _latency(student_dir, holdout, config, out_dir, teacher_url, teacher_model, teacher_api_key,
             teacher_records=()) -> dict[str, Any]:
    """Student (and local teacher) latency from `distill serve` and load generator processes, the
    forward floor, the exported runtimes against fp32, and the ratios the gate reads."""
    import secrets
    import tempfile

    from distill.serve.runtime import StudentRuntime, compare_runtimes, forward_floor_ms

    n, c = config.latency_requests, config.latency_concurrency
    levels = sorted(set(config.latency_concurrencies) | {c})
    out: dict[str, Any] = {}
    texts = [r["text"] for r in holdout]
    # Served as in production (authentication, request log), but the evaluation's own
    # traffic goes to a throwaway log, never the production one, and the key lives only here.
    key = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="distill-latency-") as tmp:
        serve_cfg = ServeConfig(log_url=f"sqlite:///{Path(tmp) / 'requests.sqlite'}", runtime=config.serve_runtime)
        with latency.student_server(student_dir, serve_cfg, api_key=key) as (url, kind):
            student = latency.sweep(url, latency.chat_payloads(holdout, serve_cfg.model_name, limit=n), n, levels,
                                    api_key=key, timeout_s=config.latency_timeout_s)
    res = student[c]
    out.update(student_server=kind, student_latency=res, student_latency_sweep={str(k): v for k, v in student.items()},
               student_peak_rps=max(r["throughput_rps"] for r in student.values()))
    out.update(student_p50_ms=res["p50_ms"], student_p95_ms=res["p95_ms"], student_p99_ms=res["p99_ms"])
    out["student_floor_p50_ms"] = forward_floor_ms(StudentRuntime(student_dir, config.serve_runtime), texts)["p50_ms"]
    if res["errors"]:
        log.warning("student latency: %d of %d requests failed (%s)", res["errors"], n, res["error_kinds"])
    exports = compare_runtimes(student_dir, texts, [r["gold"] for r in holdout], config.export_runtimes)
    out["runtime_exports"] = exports
    drops = [v["accuracy_drop"] for k, v in exports.items() if k != "torch"]
    out["export_drop"] = max(drops) if drops else None
    sweeps = {"student": student}
    if teacher_url and teacher_model and config.latency_teacher and latency.is_loopback(teacher_url):
        teacher = latency.sweep(f"{teacher_url}/chat/completions", latency.chat_payloads(holdout, teacher_model, limit=n),
                                n, levels, api_key=teacher_api_key, timeout_s=config.latency_timeout_s)
        t = {**teacher[c], "source": "harness"}
        out.update(teacher_latency=t, teacher_latency_sweep={str(k): v for k, v in teacher.items()})
        sweeps["teacher"] = teacher
    else:  # a paid or remote teacher is never called again just to be timed
        t = latency.latency_from_records(teacher_records)
        out.update(teacher_latency=t, teacher_latency_sweep=None)
    out.update(teacher_p50_ms=t["p50_ms"], teacher_p95_ms=t["p95_ms"], teacher_p99_ms=t["p99_ms"])
    latency.plot_latency(sweeps, out["student_floor_p50_ms"], Path(out_dir) / "latency.png")
    out["latency_plot"] = "latency.png"
    return out
