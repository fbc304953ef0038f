"""The drift watch as one Prefect flow (deployment `drift-watch`, scheduled in deployments/prefect.yaml).

It reads recent traffic from the shadow log, has the teacher label a random sample of
it (shadow answers, or bought re-labels), runs the four drift sensors of distill.drift
and the static-holdout regression check, writes a markdown artifact with the evidence
behind each decision and a plot of every signal over time, and when a sensor fires
emits `distill.drift.detected`; the `distillation-cycle` deployment's trigger turns
that event into a re-distillation run.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

from distill_tasks.drift import (
    emit_drift_event,
    label_recent,
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
from distill.drift.history import plot_signals
from distill.drift.sensors import render_report


@flow(name="drift-watch", log_prints=True)
def drift_watch(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every drift sensor once and return {"fired", "results", "checks", "event_id", "model", "holdout",
    "labelled", "report", "plot"}.

    Args:
        config_path: YAML preset (the same one the distillation-cycle deployment uses).
        overrides: `key.path=value` strings applied on top of it (e.g. drift.alpha=0.005).
    """
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    model = watched_model(cfg)
    log_url = cfg.drift.log_url or cfg.serve.log_url
    holdout = score_holdout(model["model_dir"], cfg.task, cfg.drift, cfg.evaluate.answer_field)
    keys = [k for k in (model["run_id"], model["model_dir"]) if k]
    traffic = read_traffic(log_url, cfg.drift.recent_requests, keys, cfg.drift.reference_requests)
    run_id = str(flow_run.get_id() or "")
    # A new sample every watch (seeded by the run), so one unlucky draw is not judged twice.
    labelled = label_recent(traffic["rows"], cfg.task, cfg.drift, cfg.teacher, cfg.generation, log_url,
                            seed=zlib.crc32(f"{cfg.seed}:{run_id}".encode()))
    train_texts = [r["text"] for r in load_task_rows(cfg.task, "train")]
    judged = run_sensors(model, holdout, traffic, labelled, train_texts, cfg.drift)
    results, checks = judged["sensors"], judged["checks"]
    model_key = model["run_id"] or model["model_dir"]
    series = record_watch(log_url, model_key, holdout, results, checks)
    fired = [name for name, r in results.items() if r["fired"]]
    plot = plot_signals(series, cfg.drift.report_dir / f"signals-{run_id or 'local'}.png")
    uri = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode()
    report = render_report(results, {
        "task": cfg.task.name, "model": model_key, "logged requests read": len(traffic["rows"]),
        "teacher-labelled sample": f"{len(labelled['sample'])} of {labelled['sampled']} drawn "
                                   f"({labelled['from_shadow']} shadow answers, {labelled['relabelled']} re-labelled "
                                   f"for ${labelled['cost_usd']:.4f})",
        "flow run": run_id, "plot": str(plot)}, checks=checks, plot=uri)
    create_markdown_artifact(key="drift-report", markdown=report, description=f"drift watch of {cfg.task.name}")
    event_id = None
    if fired and cfg.drift.emit_events:
        event_id = emit_drift_event(cfg.task.name, model, results, config_path, overrides, run_id or None,
                                    traffic_log_url=log_url)
    regressed = [n for n, r in checks.items() if r["fired"]]
    if regressed:
        logger.warning("regression check failed (%s): the model or its runtime changed; not a drift event",
                       ", ".join(regressed))
    logger.info("drift watch of %s: %s", model_key, ", ".join(fired) or "no sensor fired")
    return {"fired": fired, "results": results, "checks": checks, "event_id": event_id, "model": model,
            "holdout": holdout, "labelled": {k: v for k, v in labelled.items() if k != "sample"},
            "report": report, "plot": str(plot)}
