"""Prefect tasks of the drift-watch flow: read the model, the holdout and the traffic log, label a
random sample of recent traffic with the teacher, run the pure sensors of distill.drift, remember
the measurement, and emit the event."""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill.config import ConfigError, DistillConfig, DriftConfig, GenerationConfig, TaskConfig, TeacherConfig


def watched_model(cfg: DistillConfig) -> dict[str, Any]:
    """The model under watch: drift.student_dir, or the registry champion of task.name.

    Returns {"model_dir", "run_id" (None for an explicit directory), "metrics"}.
    """
    if cfg.drift.student_dir is not None:
        return {"model_dir": str(cfg.drift.student_dir), "run_id": None, "metrics": {}}
    from distill.serve.registry import Registry

    registry = Registry(cfg.registry)
    entry = registry.champion(cfg.task.name)
    if entry is None:
        raise ConfigError(f"registry {cfg.registry}: task {cfg.task.name!r} has no champion to watch; "
                          "promote one (distill models promote) or set drift.student_dir")
    # An s3:// registry's champion is downloaded (sha256-checked) to this process's cache first.
    return {"model_dir": str(registry.local_dir(entry)), "run_id": entry["run_id"],
            "metrics": entry.get("metrics") or {}}


@task(name="score-holdout", cache_policy=NO_CACHE)
def score_holdout(model_dir: str, task_cfg: TaskConfig, drift: DriftConfig,
                  answer_field: str | None = None) -> dict[str, Any]:
    """The regression check's measurement: accuracy and mean prediction entropy of the model on the
    static holdout (drift.reference_max_rows evenly spaced rows).

    answer_field: for a generative student, the JSON field its answers are judged by (evaluate.answer_field).
    Returns {"accuracy", "entropy", "n", "labels"}.
    """
    import numpy as np

    from distill.data import load_task_rows
    from distill.models.classifier import ClassifierStudent

    path = drift.reference_path or task_cfg.test_path
    if path is None:
        raise ConfigError("drift.reference_path: no reference holdout (and task.test_path is unset)")
    ref_task = task_cfg.model_copy(update={"test_path": path, "max_test_rows": drift.reference_max_rows})
    rows = load_task_rows(ref_task, "test")
    from distill.models.causal import is_causal_lm_dir

    if is_causal_lm_dir(model_dir):  # a generative student: answers judged as in evaluation, token entropy
        from distill.evaluate.generative import score_answers

        return score_answers(model_dir, rows, answer_field)
    student = ClassifierStudent(model_dir)
    probs = student.predict_proba([r["text"] for r in rows])
    pred = [student.labels[i] for i in probs.argmax(1)]
    acc = float(np.mean([p == r["gold"] for p, r in zip(pred, rows)]))
    ent = float(np.mean(-np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=1)))
    return {"accuracy": acc, "entropy": ent, "n": len(rows), "labels": student.labels}


@task(name="read-traffic", cache_policy=NO_CACHE)
def read_traffic(log_url: str, limit: int, champion_keys: list[str] | None = None,
                 reference_limit: int = 0) -> dict[str, Any]:
    """Recent logged requests, the drift-watch history, and the input-drift reference from the shadow log.

    The reference is the champion's own early traffic: the oldest `reference_limit` requests it
    served (`champion_run` in champion_keys), none of them in the recent window. It is what
    production looked like when the baselines still held, which training inputs often are not.
    """
    from sqlalchemy import select

    from distill.serve.shadow import ShadowLog

    log = ShadowLog(log_url)
    try:
        rows = log.recent(limit=limit)
        reference: list[str] = []
        if reference_limit and champion_keys:
            t = log.requests
            first_recent = min((r["id"] for r in rows), default=None)
            q = select(t.c.text).where(t.c.champion_run.in_(champion_keys)).order_by(t.c.id).limit(reference_limit)
            if first_recent is not None:
                q = q.where(t.c.id < first_recent)
            with log.engine.connect() as conn:
                reference = [r[0] for r in conn.execute(q) if r[0]]
        return {"rows": rows, "history": log.watch_history(), "reference_texts": reference}
    finally:
        log.close()


@task(name="read-traffic-rows", cache_policy=NO_CACHE)
def read_traffic_rows(log_url: str, task_cfg: TaskConfig, limit: int, cap: int,
                      known_texts: list[str]) -> list[dict]:
    """The most recent `limit` logged requests as training rows with provenance `traffic` (at most `cap`
    distinct texts not among `known_texts`); see distill.drift.reference.traffic_rows."""
    from distill.drift.reference import traffic_rows
    from distill.serve.shadow import ShadowLog

    log = ShadowLog(log_url)
    try:
        rows = traffic_rows(log.recent(limit=limit), task_cfg, set(known_texts), cap)
    finally:
        log.close()
    get_run_logger().info("%d recent traffic rows from the log join the training mix", len(rows))
    return rows


@task(name="label-recent-traffic", cache_policy=NO_CACHE)
def label_recent(rows: list[dict], task_cfg: TaskConfig, drift: DriftConfig, teacher: TeacherConfig,
                 generation: GenerationConfig, log_url: str, seed: int) -> dict[str, Any]:
    """The reference set of what production sees now: recent requests with the teacher's label.

    Every shadow answer is used as logged; of the requests without one, a random sample of at most
    drift.label_sample is re-labelled through the cached teacher client when drift.relabel is on
    (charged to drift.ledger_path, written back to the log so no watch pays twice).
    Returns {"sample": rows with "teacher_label", "from_shadow", "relabelled", "unlabelled", "cost_usd"}.
    """
    from distill.drift.reference import labelling_sample, relabel

    rows = [r for r in rows if r.get("text")]
    shadowed = [r for r in rows if r.get("teacher_label") is not None]
    # Shadow answers are paid for already: every one is used. Only the rest is sampled, to a budget.
    missing = labelling_sample([r for r in rows if r.get("teacher_label") is None], drift.label_sample, seed)
    sample = sorted(shadowed + missing, key=lambda r: r.get("id") or 0)
    info = {"from_shadow": len(shadowed), "relabelled": 0, "cost_usd": 0.0}
    if missing and drift.relabel:
        from distill_tasks.generate import resolve_key

        from distill.serve.shadow import ShadowLog

        bought = relabel(missing, task_cfg, teacher, generation, drift, resolve_key(teacher))
        log = ShadowLog(log_url)
        try:
            for r in missing:
                label = bought["labels"].get(str(r["request_id"]))
                if label is not None:
                    r["teacher_label"] = label
                    log.update(r["request_id"], {"teacher_label": label, "teacher_run": teacher.model})
        finally:
            log.close()
        info["relabelled"] = sum(1 for r in missing if r.get("teacher_label") is not None)
        info["cost_usd"] = float(bought["summary"].get("cost_usd") or 0.0)
        get_run_logger().info("drift re-labelling: %d of %d sampled requests bought ($%.4f)", info["relabelled"],
                              len(missing), info["cost_usd"])
    labelled = [r for r in sample if r.get("teacher_label") is not None]
    return {**info, "sample": labelled, "sampled": len(sample), "unlabelled": len(sample) - len(labelled)}


def baselines(model: dict[str, Any], drift: DriftConfig) -> dict[str, Any]:
    """The champion's evaluated accuracy and agreement, and how many holdout rows stand behind them."""
    metrics = model.get("metrics") or {}
    acc = drift.baseline_accuracy if drift.baseline_accuracy is not None else metrics.get("student_accuracy")
    agree = None if drift.baseline_disagreement is None else 1.0 - drift.baseline_disagreement
    if agree is None and metrics.get("agreement") is not None:
        agree = float(metrics["agreement"])
    n = drift.baseline_n if drift.baseline_n is not None else metrics.get("n_holdout")
    return {"accuracy": acc, "agreement": agree, "n": int(n) if n else None}


@task(name="run-drift-sensors", cache_policy=NO_CACHE)
def run_sensors(model: dict[str, Any], holdout: dict[str, Any], traffic: dict[str, Any], labelled: dict[str, Any],
                train_texts: list[str], drift: DriftConfig) -> dict[str, dict]:
    """The four drift sensors and the holdout regression check.

    Returns {"sensors": {name: result}, "checks": {"holdout_regression": result}}.
    """
    from distill.drift import sensors
    from distill.drift.reference import served_label

    base = baselines(model, drift)
    entropies, accuracies = sensors.cycle_series(traffic["history"], model.get("run_id") or model["model_dir"],
                                                 holdout["entropy"], holdout["accuracy"])
    sample = labelled["sample"]
    student_p, teacher_p = sensors.paired_probs(sample, holdout["labels"])
    embed = None
    if drift.embedder:
        from distill.models.encoders import SentenceEncoder

        embed = SentenceEncoder(drift.embedder).encode
    rows = traffic["rows"]
    recent_texts = [r["text"] for r in rows if r.get("text")]
    early = traffic.get("reference_texts") or []
    reference = early if len(early) >= drift.min_requests else train_texts
    return {"sensors": {
        "accuracy_drop": sensors.accuracy_drop([served_label(r) for r in rows], [r.get("gold") for r in rows],
                                               base["accuracy"], base["n"], drift.accuracy_drop, drift.alpha,
                                               drift.min_feedback),
        "entropy_collapse": sensors.entropy_collapse(entropies, accuracies, drift.entropy_window,
                                                     drift.entropy_alpha),
        "divergence": sensors.divergence([served_label(r) for r in sample], [r["teacher_label"] for r in sample],
                                         base["agreement"], base["n"], drift.max_disagreement_increase,
                                         drift.alpha, drift.min_shadow_pairs,
                                         kl=sensors.mean_kl(student_p, teacher_p)),
        "input_drift": {**sensors.input_drift(reference, recent_texts, drift.input_drift_p_value, embed=embed,
                                              min_recent=drift.min_requests, max_samples=drift.max_samples,
                                              permutations=drift.permutations),
                        "reference": "champion's early traffic" if reference is early else "training inputs"},
    }, "checks": {
        "holdout_regression": sensors.holdout_regression(base["accuracy"], base["n"], holdout["accuracy"],
                                                         holdout["n"], drift.regression_margin, drift.alpha),
    }}


@task(name="record-drift-watch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def record_watch(log_url: str, model_run: str, holdout: dict[str, Any], results: dict[str, dict],
                 checks: dict[str, dict]) -> dict[str, list[dict]]:
    """Append this watch's numbers to the history (entropy collapse reads it next time; the plot reads
    every signal); returns the signal series, oldest first."""
    from distill.drift.history import SignalHistory
    from distill.serve.shadow import ShadowLog

    log = ShadowLog(log_url)
    try:
        log.record_watch(model_run, holdout["accuracy"], holdout["entropy"],
                         results["divergence"].get("disagreement"), [n for n, r in results.items() if r["fired"]])
        history = SignalHistory(log.engine)
        history.record(model_run, {**results, **checks})
        return history.series()
    finally:
        log.close()


@task(name="emit-drift-event", cache_policy=NO_CACHE)
def emit_drift_event(task_name: str, model: dict[str, Any], results: dict[str, dict], config_path: str | None,
                     overrides: list[str] | None, flow_run_id: str | None,
                     traffic_log_url: str | None = None) -> str | None:
    """Emit `distill.drift.detected` for the fired sensors; returns the event id (None if not emitted).

    The payload carries what a re-distillation run needs: the config and overrides the watch
    ran with, plus `parent_run=<champion run id>` and, with traffic_log_url (the log the sensors
    read), `filter.mix.traffic_log_url=<it>` (cycle_overrides), so the deployment trigger starts
    `distillation-cycle` with that lineage and the drifted traffic in its training mix.
    """
    from prefect.events import emit_event

    fired = [name for name, r in results.items() if r["fired"]]
    if not fired:
        return None
    run_id = model.get("run_id")
    cycle_overrides = list(overrides or []) + ([f"parent_run={run_id}"] if run_id else [])
    if traffic_log_url:
        cycle_overrides.append(f"filter.mix.traffic_log_url={json.dumps(traffic_log_url)}")
    # JSON round trip: the payload must be plain JSON (no numpy scalars).
    compact = json.loads(json.dumps({n: {k: v for k, v in results[n].items() if k != "examples"} for n in fired},
                                    default=float))
    event = emit_event(
        event="distill.drift.detected",
        resource={"prefect.resource.id": f"distill.task.{task_name}", "prefect.resource.name": task_name},
        related=[{"prefect.resource.id": f"distill.model.{run_id or 'unregistered'}",
                  "prefect.resource.role": "champion"}],
        payload={"sensor": ",".join(fired), "sensors": fired,
                 "values": {n: compact[n].get("value") for n in fired}, "results": compact,
                 "task": task_name, "champion_run_id": run_id, "model_dir": model["model_dir"],
                 "drift_flow_run_id": flow_run_id, "config_path": config_path, "overrides": list(overrides or []),
                 "cycle_overrides": cycle_overrides},
    )
    get_run_logger().warning("drift detected (%s): emitted distill.drift.detected", ", ".join(fired))
    return str(event.id) if event is not None else None
