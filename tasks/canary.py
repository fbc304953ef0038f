"""Prefect tasks of the canary-watch flow: judge the challenger on the traffic it served, stop it in
the registry when it is significantly worse, and emit the decision as a Prefect event."""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill.config import CanaryConfig


@task(name="judge-canary", cache_policy=NO_CACHE)
def judge_canary_window(log_url: str, champion_run: str | None, challenger_run: str,
                        canary: CanaryConfig) -> dict[str, Any]:
    """distill.drift.canary.judge_canary over the canary.window_requests most recent logged requests."""
    from distill.drift.canary import judge_canary
    from distill.serve.shadow import ShadowLog

    log = ShadowLog(log_url)
    try:
        rows = log.recent(limit=canary.window_requests)
    finally:
        log.close()
    result = judge_canary(rows, champion_run, challenger_run, canary.min_requests, canary.alpha, canary.margin)
    result["window"] = len(rows)
    get_run_logger().info("canary %s: %s (%s)", challenger_run, result["decision"], result["reason"])
    return result


@task(name="stop-canary", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def stop_canary(registry: str, task_name: str, challenger_run: str, reason: str) -> dict[str, Any]:
    """Mark the challenger stopped in the registry; serving processes stop routing to it within
    serve.canary_poll_s. Returns its registry entry."""
    from distill.serve.registry import Registry

    entry = Registry(registry).stop_canary(task_name, challenger_run, f"canary judge: {reason}")
    get_run_logger().warning("canary %s stopped: %s", challenger_run, reason)
    return entry


@task(name="emit-canary-event", cache_policy=NO_CACHE)
def emit_canary_event(task_name: str, champion_run: str | None, challenger_run: str, result: dict[str, Any],
                      stopped: bool, flow_run_id: str | None) -> str | None:
    """Emit `distill.canary.stopped` (or `distill.canary.failed` when canary.stop is off) with the numbers
    behind the decision; returns the event id."""
    from prefect.events import emit_event

    # JSON round trip: the payload must be plain JSON.
    tests = json.loads(json.dumps(result["tests"], default=float))
    event = emit_event(
        event="distill.canary.stopped" if stopped else "distill.canary.failed",
        resource={"prefect.resource.id": f"distill.model.{challenger_run}", "prefect.resource.name": challenger_run,
                  "prefect.resource.role": "challenger"},
        related=[{"prefect.resource.id": f"distill.task.{task_name}", "prefect.resource.role": "task"},
                 {"prefect.resource.id": f"distill.model.{champion_run or 'unregistered'}",
                  "prefect.resource.role": "champion"}],
        payload={"task": task_name, "challenger_run_id": challenger_run, "champion_run_id": champion_run,
                 "decision": result["decision"], "stopped": stopped, "reason": result["reason"],
                 "served": result["served"], "window": result.get("window"), "tests": tests,
                 "canary_flow_run_id": flow_run_id},
    )
    return str(event.id) if event is not None else None
