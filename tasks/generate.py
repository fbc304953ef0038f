"""Prefect task around `distill.teacher.generate`: key lookup, output file, progress and summary artifacts."""

from __future__ import annotations

import sys
import time

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from distill.config import GenerationConfig, TeacherConfig
from distill.data import read_jsonl, write_jsonl
from distill.teacher.client import resolve_api_key
from distill.teacher.generation import generate


def resolve_key(teacher: TeacherConfig) -> str | None:
    """The API key: the environment variable first, else the Prefect Secret block the config names."""
    key = resolve_api_key(teacher)
    if key is None and teacher.api_key_secret_block:
        from prefect.blocks.system import Secret

        key = Secret.load(teacher.api_key_secret_block, _sync=True).get() or None
    return key


def summary_line(s: dict) -> str:
    """One line for logs and the run report: done, cached, failures, tokens, spend, throughput."""
    return (f"{s['done']}/{s['requested']} done ({s['cached']} cached), {s['failed']} failed "
            f"{s['failed_by_reason']}, {s['prompt_tokens']}+{s['completion_tokens']} tokens, "
            f"${s['cost_usd']:.4f}, {s['requests_per_s']:.1f} req/s")


def summary_table(summary: dict) -> list[dict]:
    """The summary as metric/value rows (one row per failure reason), for a Prefect table artifact."""
    rows = [{"metric": k, "value": v} for k, v in summary.items() if k != "failed_by_reason"]
    rows += [{"metric": f"failed: {reason}", "value": n} for reason, n in sorted(summary["failed_by_reason"].items())]
    return rows


class _Progress:
    """Terminal bar plus a Prefect progress artifact, the artifact updated at most once a second."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, unit="req", desc="generate", file=sys.stderr, dynamic_ncols=True,
                        disable=None)
        self.artifact_id = create_progress_artifact(progress=0.0, key="teacher-generation-progress",
                                                    description="Teacher responses in their final state", _sync=True)
        self.last = 0.0

    def __call__(self, finished: int, total: int) -> None:
        self.bar.update(finished - self.bar.n)
        now = time.monotonic()
        if finished == total or now - self.last >= 1.0:
            self.last = now
            # Called from inside the generation event loop: force the blocking client explicitly.
            update_progress_artifact(self.artifact_id, progress=100.0 * finished / max(total, 1), _sync=True)

    def close(self) -> None:
        self.bar.close()


@task(name="generate-completions", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def generate_completions(rows_path: str, teacher: TeacherConfig, generation: GenerationConfig,
                         out_path: str, purpose: str = "generation",
                         labels: list[str] | None = None) -> dict:
    """Teacher records for the rows of `rows_path`, written atomically to `out_path`; their summary.

    Rows go in and records come out as files: only paths and the summary pass through Prefect.
    Retrying the task costs nothing already bought: answers live in the request cache.

    Args:
        rows_path: JSONL task rows with "id" and "messages".
        teacher: endpoint section of the config.
        generation: generation section of the config.
        out_path: JSONL destination for the records.
        purpose: what the spend is charged as in the run's ledger ("generation", "holdout").
        labels: a classification task's labels: each record keeps the label distribution it carries.

    Returns the summary of `distill.teacher.generate`.
    """
    logger = get_run_logger()
    key = resolve_key(teacher)
    rows = read_jsonl(rows_path)
    progress = _Progress(len(rows) * generation.samples_per_prompt)
    try:
        result = generate(rows, teacher, generation, api_key=key, progress=progress, purpose=purpose,
                          labels=labels)
    finally:
        progress.close()
    write_jsonl(out_path, result.records)
    s = result.summary
    create_table_artifact(table=summary_table(s), key="teacher-generation-summary",
                          description=f"Teacher generation: {s['done']}/{s['requested']} done, "
                                      f"{s['cached']} from cache, ${s['cost_usd']:.4f}", _sync=True)
    logger.info("teacher: %s", summary_line(s))
    if s["budget_exhausted"]:
        logger.warning("teacher budget reached: rows not yet bought are marked budget_exhausted")
    return s


@task(name="reask-unmapped", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def reask_unmapped_answers(records_path: str, labels: list[str] | None, teacher: TeacherConfig,
                           generation: GenerationConfig, purpose: str = "reask") -> dict:
    """Re-ask the unmapped classification answers of `records_path` once (generation.reask), rewriting it.

    Returns the re-ask's summary; {} (the file untouched) when re-asking is off, the task is not
    classification, or every answer already names a label. `purpose` is what the ledger charges
    ("reask", "holdout-reask").
    """
    if not generation.reask or not labels:
        return {}
    from distill.teacher.reask import reask_unmapped

    out, summary = reask_unmapped(read_jsonl(records_path), labels, teacher, generation,
                                  api_key=resolve_key(teacher), purpose=purpose)
    if summary:
        write_jsonl(records_path, out)
        fixed = sum(1 for r in out if r.get("reasked"))
        get_run_logger().info("re-ask: %d of %d unmapped answers now name a label; %s", fixed,
                              summary["requested"], summary_line(summary))
    return summary or {}


@task(name="score-labels", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def score_label_answers(records_path: str, labels: list[str] | None, teacher: TeacherConfig,
                        generation: GenerationConfig, purpose: str = "score") -> dict:
    """Give the records of `records_path` their exact label distributions (generation.soft_labels score).

    Rewrites the file and returns the scoring summary; {} (the file untouched) in the other
    soft-label modes or when the task is not classification. Every scoring response is cached
    before use and charged to the ledger as `purpose`.
    """
    if generation.soft_labels != "score" or not labels:
        return {}
    from distill.teacher.scoring import score_labels

    out, summary = score_labels(read_jsonl(records_path), labels, teacher, generation,
                                api_key=resolve_key(teacher), purpose=purpose)
    if summary:
        write_jsonl(records_path, out)
        get_run_logger().info("scoring: %d answers scored over %d labels; %s", summary["scored"], len(labels),
                              summary_line(summary))
    return summary or {}


@task(name="split-prompts", cache_policy=NO_CACHE)
def split_prompt_shards(input_path: str, out_dir: str, shard_rows: int, task_section=None) -> dict:
    """Check every prompt row and write the shards (distill.teacher.shards.split_prompts); ConfigError on a bad row."""
    from distill.teacher.shards import split_prompts

    split = split_prompts(input_path, out_dir, shard_rows, task_section)
    get_run_logger().info("%d prompts in %d shards of %d (%s)", split["rows"], split["shards"], shard_rows,
                          "an earlier split reused" if split["reused"] else "split now")
    return split


# Retried: an interrupted shard resumes from the request cache, so a retry re-pays nothing it bought.
@task(name="answer-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      task_run_name="answer-shard-{index}")
def answer_prompt_shard(out_dir: str, index: int, teacher: TeacherConfig, generation: GenerationConfig,
                        labels: list[str] | None = None, limit: str | None = None) -> dict:
    """Answer one shard unless it is finished (distill.teacher.shards.answer_shard); its summary.

    limit: a Prefect global concurrency limit to hold a slot of while answering (shards at once, job-wide).
    """
    from contextlib import nullcontext

    from prefect.concurrency.sync import concurrency

    from distill.teacher.shards import answer_shard

    # The shortest lease Prefect takes: a worker killed inside it frees its slot a minute later.
    with concurrency(limit, occupy=1, strict=True, lease_duration=60) if limit else nullcontext():
        s = answer_shard(out_dir, index, teacher, generation, api_key=resolve_key(teacher), labels=labels)
    get_run_logger().info("shard %d: %s", index, "finished earlier" if s["skipped"] else summary_line(s))
    return s
