"""The drift watch as one Prefect flow (deployment `drift-watch`, scheduled in deployments/prefect.yaml).

It scores the champion on the reference holdout, reads recent traffic from the
shadow log, runs the four sensors of distill.drift, writes a markdown artifact,
and when a sensor fires emits `distill.drift.detected`; the `distillation-cycle`
deployment's trigger turns that event into a re-distillation run.
"""

from __future__ import annotations

from typing import Any

from distill_tasks.drift import (
    emit_drift_event,
    read_traffic,
    record_watch,
    run_sensors,
    score_holdout,
    watched_model,
)
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from distill.config import load_config
from distill.data import load_task_rows
from distill.drift.sensors import render_report


@flow(name="drift-watch", log_prints=True)
def drift_watch(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every drift sensor once and return {"fired", "results", "event_id", "model", "holdout", "report"}.

    Args:
        config_path: YAML preset (the same one the distillation-cycle deployment uses).
        overrides: `key.path=value` strings applied on top of it (e.g. drift.accuracy_drop=0.03).
    """
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    model = watched_model(cfg)
    log_url = cfg.drift.log_url or cfg.serve.log_url
    holdout = score_holdout(model["model_dir"], cfg.task, cfg.drift, cfg.evaluate.answer_field)
    traffic = read_traffic(log_url, cfg.drift.recent_requests)
    train_texts = [r["text"] for r in load_task_rows(cfg.task, "train")]
    results = run_sensors(model, holdout, traffic, train_texts, cfg.drift)
    model_key = model["run_id"] or model["model_dir"]
    record_watch(log_url, model_key, holdout, results)
    fired = [name for name, r in results.items() if r["fired"]]
    run_id = str(flow_run.get_id() or "")
    report = render_report(results, {
        "task": cfg.task.name, "model": model_key, "holdout accuracy": round(holdout["accuracy"], 4),
        "holdout rows": holdout["n"], "logged requests read": len(traffic["rows"]), "flow run": run_id})
    create_markdown_artifact(key="drift-report", markdown=report, description=f"drift watch of {cfg.task.name}")
    event_id = None
    if fired and cfg.drift.emit_events:
        event_id = emit_drift_event(cfg.task.name, model, results, config_path, overrides, run_id or None)
    logger.info("drift watch of %s: %s", model_key, ", ".join(fired) or "no sensor fired")
    return {"fired": fired, "results": results, "event_id": event_id, "model": model, "holdout": holdout,
            "report": report}
