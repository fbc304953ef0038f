"""The `generate-dataset` flow: a prompts file of any size answered by the teacher shard by shard, then filtered.

split-prompts checks every row before anything is paid and writes the shards; answer-shard
is mapped over them (`.map`) on the task runner `generation.task_runner` names: Prefect's
thread pool in this process, or Dask (a local cluster of processes, or the scheduler at
`generation.dask_address`). The limits hold for the whole job, not per worker: the thread
pool or local cluster runs `generation.shard_workers` shard tasks at once, and on a shared
Dask cluster a Prefect global concurrency limit admits that many on all its machines (a
killed worker's slot comes back when its lease lapses, after a minute); each gets an equal share
of `concurrency`, `requests_per_minute` and `tokens_per_minute`, and `budget_usd` is held
in one ledger in the output directory. Workers share the
request cache (`generation.cache_url` for several machines), so a shard that is retried or
moved to another worker re-pays nothing. filter-shards then runs the per-row filter stages
one shard at a time. Nothing but shard numbers and small summaries passes between tasks:
the rows stay in the shard files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from distill_tasks.filter import filter_prompt_shards
from distill_tasks.generate import answer_prompt_shard, split_prompt_shards
from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_table_artifact

from distill.config import GenerationConfig, HeuristicsConfig, TaskConfig, TeacherConfig
from distill.data import write_text


def shard_limit(teacher, generation) -> str:
    """The Prefect global concurrency limit that admits `shard_workers` shard tasks at once, wherever they run."""
    import re

    from prefect import get_client

    name = "distill-shards-" + re.sub(r"[^A-Za-z0-9_-]+", "-", teacher.model)[:80]
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, generation.shard_workers)
    return name


def per_worker(generation):
    """Each shard worker's share of the request limits, so that together they keep the configured ones."""
    w = generation.shard_workers
    return generation.model_copy(update={
        "concurrency": max(1, -(-generation.concurrency // w)),
        "requests_per_minute": generation.requests_per_minute / w if generation.requests_per_minute else None,
        "tokens_per_minute": generation.tokens_per_minute / w if generation.tokens_per_minute else None})


def task_runner(generation):
    """The runner the shard tasks are mapped on."""
    if generation.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if generation.dask_address:
            return DaskTaskRunner(address=generation.dask_address)
        # One single-threaded worker process per shard worker: each runs its own event loop of requests.
        return DaskTaskRunner(cluster_kwargs={"n_workers": generation.shard_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=generation.shard_workers)


@flow(name="generate-dataset", log_prints=False)
def generate_dataset(teacher: TeacherConfig, generation: GenerationConfig, input_path: str, out_dir: str,
                     task: TaskConfig | None = None, heuristics: HeuristicsConfig | None = None) -> dict:
    """Answer every prompt of `input_path` into shards under `out_dir`; filter them when there is a task.

    Args:
        teacher, generation: the config's sections.
        input_path: CSV/JSONL prompts.
        out_dir: shards, records, filtered rows and summary.json.
        task: renders rows without `messages` and defines the filter's checks; None: no filter stage.
        heuristics: the filter's heuristics section (its defaults when None).

    Returns:
        {"rows", "shards", "done", "failed", "cached", "cost_usd", "wall_s", "filter" (totals or None)}.
    """
    logger = get_run_logger()
    started = time.monotonic()
    gen = generation
    if gen.budget_usd is not None and gen.ledger_path is None:
        # One ledger for every shard: budget_usd caps the whole dataset, across workers and resumes.
        gen = gen.model_copy(update={"ledger_path": Path(out_dir) / "ledger.jsonl"})
    split = split_prompt_shards(input_path, out_dir, gen.shard_rows, task)
    labels = task.label_set() if task is not None and task.kind == "classification" else None
    # In this process (threads) or on a local Dask cluster, the runner's own size is the bound; only a
    # shared Dask cluster, whose workers may be many, needs the Prefect server to admit shard tasks.
    limit = shard_limit(teacher, gen) if gen.task_runner == "dask" and gen.dask_address else None
    futures = answer_prompt_shard.map(unmapped(out_dir), range(split["shards"]), unmapped(teacher),
                                      unmapped(per_worker(gen)), unmapped(labels), unmapped(limit))
    summaries = [f.result() for f in futures]
    totals = {k: sum(s.get(k, 0) for s in summaries) for k in ("requested", "done", "failed", "cached")}
    totals["cost_usd"] = round(sum(s.get("cost_usd", 0.0) for s in summaries), 6)
    filtered = None
    if task is not None:
        filtered = filter_prompt_shards(out_dir, split["shards"], task, heuristics or HeuristicsConfig())
    out = {"rows": split["rows"], "shards": split["shards"], **totals,
           "shards_skipped": sum(1 for s in summaries if s.get("skipped")),
           "wall_s": round(time.monotonic() - started, 2), "filter": filtered}
    write_text(Path(out_dir) / "summary.json", json.dumps(out, indent=2))
    create_table_artifact([{"metric": k, "value": v} for k, v in out.items() if k != "filter"],
                          key="generate-dataset", description="Sharded teacher generation")
    logger.info("generate-dataset: %d/%d done (%d cached), %d failed, $%.4f, %d shards (%d finished earlier)",
                totals["done"], totals["requested"], totals["cached"], totals["failed"], totals["cost_usd"],
                split["shards"], out["shards_skipped"])
    return out
