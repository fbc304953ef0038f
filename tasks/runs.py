"""Prefect's view of runs whose process died: marked Crashed by the next run, against the same API.

A process killed with SIGKILL cannot report its own end, so its flow run, its subflows and its
task runs stay RUNNING in the Prefect database forever. The run directory's claim
(distill/runs.py) records every flow run an attempt used; the next run of the cycle reads the
claims of crashed runs and sets whatever of theirs is still unfinished to Crashed.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill.runs import incomplete_runs, read_claim

# States a run whose process is gone can still be in; everything else is final already.
UNFINISHED = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


@task(name="mark-crashed-runs", cache_policy=NO_CACHE)
def mark_crashed_flow_runs(roots: list[str]) -> list[str]:
    """Set the unfinished flow runs (and their subflows and task runs) of crashed runs under `roots` to Crashed.

    Args:
        roots: folders holding run directories (the local store, the S3 staging folder).

    Returns the ids of the flow runs it marked. A Prefect API problem is logged, never raised: it
    must not stop the run that found it.
    """
    owners: dict[str, dict] = {}
    for root in roots:
        for info in incomplete_runs(root):
            if info["state"] in ("crashed", "interrupted"):
                claim = read_claim(info["run_dir"]) or {}
                owners.update({fr: claim for fr in claim.get("flow_runs", []) if fr})
    if not owners:
        return []
    try:
        return _mark(owners)
    except Exception as e:  # noqa: BLE001 - bookkeeping of dead runs must not fail a live one
        get_run_logger().warning("could not mark the flow runs of crashed runs as Crashed: %s", e)
        return []


def _mark(owners: dict[str, dict]) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    logger = get_run_logger()
    unfinished = [StateType(s) for s in UNFINISHED]
    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))
    marked: list[str] = []
    with get_client(sync_client=True) as client:
        for fr_id, claim in owners.items():
            why = (f"run {claim.get('run_id', '?')}: the process that ran it (pid {claim.get('pid', '?')} on "
                   f"{claim.get('host', '?')}) is gone; marked Crashed by a later run")
            flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr_id]),
                                                                            state=state))
            flow_runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fr_id]), state=state))
            for fr in flow_runs:
                client.set_flow_run_state(fr.id, Crashed(message=why), force=True)
                marked.append(str(fr.id))
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(owners) + marked)),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))))
        for tr in task_runs:
            client.set_task_run_state(tr.id, Crashed(message="its flow run's process is gone"), force=True)
    if marked:
        logger.info("marked %d flow run(s) and %d task run(s) of crashed runs as Crashed", len(marked),
                    len(task_runs))
    return marked
