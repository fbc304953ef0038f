"""Prefect tasks of the drift-watch flow: read the model, the holdout and the traffic log,
run the pure sensors of distill.drift, remember the measurement, and emit the event."""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill.config import ConfigError, DistillConfig, DriftConfig, TaskConfig


def watched_model(cfg: DistillConfig) -> dict[str, Any]:
    """The model under watch: drift.student_dir, or the registry champion of task.name.

    Returns {"model_dir", "run_id" (None for an explicit directory), "metrics"}.
    """
    if cfg.drift.student_dir is not None:
        return {"model_dir": str(cfg.drift.student_dir), "run_id": None, "metrics": {}}
    from distill.serve.registry import Registry

    entry = Registry(cfg.registry).champion(cfg.task.name)
    if entry is None:
        raise ConfigError(f"registry {cfg.registry}: task {cfg.task.name!r} has no champion to watch; "
                          "promote one (distill models promote) or set drift.student_dir")
    return {"model_dir": entry["path"], "run_id": entry["run_id"], "metrics": entry.get("metrics") or {}}


@task(name="score-holdout", cache_policy=NO_CACHE)
def score_holdout(model_dir: str, task_cfg: TaskConfig, drift: DriftConfig,
                  answer_field: str | None = None) -> dict[str, Any]:
    """Accuracy and mean prediction entropy of the model on the reference holdout.

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
def read_traffic(log_url: str, limit: int) -> dict[str, Any]:
    """Recent logged requests and the drift-watch history from the shadow log."""
    from distill.serve.shadow import ShadowLog

    log = ShadowLog(log_url)
    try:
        return {"rows": log.recent(limit=limit), "history": log.watch_history()}
    finally:
        log.close()


@task(name="run-drift-sensors", cache_policy=NO_CACHE)
def run_sensors(model: dict[str, Any], holdout: dict[str, Any], traffic: dict[str, Any],
                train_texts: list[str], drift: DriftConfig) -> dict[str, dict]:
    """All four sensors; returns {sensor name: result dict}."""
    from distill.drift import sensors as sensors

    metrics = model.get("metrics") or {}
    baseline_acc = drift.baseline_accuracy if drift.baseline_accuracy is not None else metrics.get("student_accuracy")
    baseline_dis = drift.baseline_disagreement
    if baseline_dis is None and metrics.get("agreement") is not None:
        baseline_dis = 1.0 - float(metrics["agreement"])
    entropies, accuracies = sensors.cycle_series(traffic["history"], model.get("run_id") or model["model_dir"],
                                                 holdout["entropy"], holdout["accuracy"])
    student_p, teacher_p = sensors.paired_probs(traffic["rows"], holdout["labels"])
    embed = None
    if drift.embedder:
        from distill.models.encoders import SentenceEncoder

        embed = SentenceEncoder(drift.embedder).encode
    recent_texts = [r["text"] for r in traffic["rows"] if r.get("text")]
    return {
        "accuracy_drop": sensors.accuracy_drop(baseline_acc, holdout["accuracy"], drift.accuracy_drop),
        "entropy_collapse": sensors.entropy_collapse(entropies, accuracies, drift.entropy_window),
        "divergence": sensors.divergence(student_p, teacher_p, baseline_dis, drift.max_disagreement_increase,
                                         min_samples=drift.min_shadow_pairs),
        "input_drift": sensors.input_drift(train_texts, recent_texts, drift.input_drift_p_value, embed=embed,
                                           min_recent=drift.min_requests, max_samples=drift.max_samples,
                                           permutations=drift.permutations),
    }


@task(name="record-drift-watch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def record_watch(log_url: str, model_run: str, holdout: dict[str, Any], results: dict[str, dict]) -> None:
    """Append this watch's numbers to the history the entropy-collapse sensor reads next time."""
    from distill.serve.shadow import ShadowLog

    log = ShadowLog(log_url)
    try:
        log.record_watch(model_run, holdout["accuracy"], holdout["entropy"], results["divergence"].get("value"),
                         [name for name, r in results.items() if r["fired"]])
    finally:
        log.close()


@task(name="emit-drift-event", cache_policy=NO_CACHE)
def emit_drift_event(task_name: str, model: dict[str, Any], results: dict[str, dict], config_path: str | None,
                     overrides: list[str] | None, flow_run_id: str | None) -> str | None:
    """Emit `distill.drift.detected` for the fired sensors; returns the event id (None if not emitted).

    The payload carries what a re-distillation run needs: the config and overrides the watch
    ran with, plus `parent_run=<champion run id>` (cycle_overrides), so the deployment trigger
    can start `distillation-cycle` with exactly that lineage.
    """
    from prefect.events import emit_event

    fired = [name for name, r in results.items() if r["fired"]]
    if not fired:
        return None
    run_id = model.get("run_id")
    cycle_overrides = list(overrides or []) + ([f"parent_run={run_id}"] if run_id else [])
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
