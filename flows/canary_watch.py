"""The canary watch as one Prefect flow (deployment `canary-watch`, scheduled in deployments/prefect.yaml).

It judges the registry challenger on the requests it served as a canary against the champion's
over the same window of the traffic/shadow log (agreement with the teacher's answers, and accuracy
on gold feedback; one-sided two-proportion tests with a minimum sample size, distill/drift/canary.py).
When the challenger is significantly worse it is stopped in the registry, so `distill serve` routes
no more requests to it, and the decision with its numbers becomes the Prefect event
`distill.canary.stopped`. Every watch writes a markdown artifact with the table behind its decision.
"""

from __future__ import annotations

from typing import Any

from distill_tasks.canary import emit_canary_event, judge_canary_window, stop_canary
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from distill.config import load_config
from distill.drift.canary import render_decision


@flow(name="canary-watch", log_prints=True)
def canary_watch(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Judge the canary once; returns {"decision", "challenger", "champion", "result", "stopped", "event_id",
    "report"} ("decision" is "no canary" when the registry has no challenger).

    Args:
        config_path: YAML preset (the one `distill serve` and the cycle use).
        overrides: `key.path=value` strings applied on top of it (e.g. canary.alpha=0.001).
    """
    from distill.serve.registry import Registry

    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    registry = Registry(cfg.registry)
    challenger, champion = registry.challenger(cfg.task.name), registry.champion(cfg.task.name)
    if challenger is None:
        logger.info("task %s has no challenger: no canary to judge", cfg.task.name)
        return {"decision": "no canary", "challenger": None, "champion": champion and champion["run_id"],
                "result": None, "stopped": False, "event_id": None, "report": None}
    chall, champ = challenger["run_id"], champion["run_id"] if champion else None
    log_url = cfg.canary.log_url or cfg.serve.log_url
    result = judge_canary_window(log_url, champ, chall, cfg.canary)
    stopped = result["decision"] == "stop" and cfg.canary.stop
    if stopped:
        stop_canary(str(cfg.registry), cfg.task.name, chall, result["reason"])
    run_id = str(flow_run.get_id() or "") or None
    event_id = emit_canary_event(cfg.task.name, champ, chall, result, stopped, run_id) \
        if result["decision"] == "stop" else None
    report = render_decision(result, {"task": cfg.task.name, "challenger": chall, "champion": champ,
                                      "window": f"{result['window']} most recent logged requests",
                                      "served": f"champion {result['served']['champion']}, challenger "
                                                f"{result['served']['challenger']}",
                                      "stopped in the registry": stopped, "flow run": run_id})
    create_markdown_artifact(key="canary-decision", markdown=report,
                             description=f"canary watch of {cfg.task.name}: {chall}")
    return {"decision": result["decision"], "challenger": chall, "champion": champ, "result": result,
            "stopped": stopped, "event_id": event_id, "report": report}
