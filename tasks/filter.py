"""Prefect tasks around the filter stages, the human spot-check pause, and the filter report.

`filter_rows` is called from inside the distillation flow: the spot-check pauses that flow
run (pause_flow_run with a RunInput form) until a reviewer answers in the Prefect UI, unless
decisions come from a CSV or the sample is auto-approved.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.utilities.annotations import quote
from pydantic import Field

from distill.config import (
    ConfigError,
    FilterConfig,
    GenerationConfig,
    SpotCheckConfig,
    TaskConfig,
    TeacherConfig,
)
from distill.data import read_jsonl, write_jsonl, write_text
from distill.filter import grader, spotcheck
from distill.filter.consistency import consistency
from distill.filter.dedup import dedup
from distill.filter.entropy import entropy_filter
from distill.filter.heuristics import heuristics
from distill.filter.mix import mix_dataset
from distill.filter.rows import answer_report, build_candidates


class ReviewInput(RunInput):
    """What the reviewer submits in the Prefect UI to resume the flow."""

    rejected_ids: list[str] = Field(default_factory=list, description="Ids of sampled rows whose answer is wrong.")
    reason: str = Field("", description="Why those rows are rejected (recorded with each of them).")
    reject_patterns: list[str] = Field(
        default_factory=list, description="Regexes; every answer in the dataset matching one is rejected."
    )
    approve: bool = Field(
        True, description="Switch off to stop the run: the sample is not good enough to train on (say why in reason)."
    )


class SpotCheckRejected(Exception):
    """The reviewer stopped the run at the spot-check; the message carries their reason."""


# The stages are fast, pure and run once per flow run: hashing their inputs for a cache would
# cost more than running them again (the grader's calls are cached by the teacher client).
# Row lists are passed quote()d: otherwise Prefect walks every nested value of every row
# looking for upstream futures, which takes longer than the stage itself at 10k rows.
@task(name="filter-candidates", cache_policy=NO_CACHE)
def candidates_task(task_rows: list[dict], records: list[dict], task_cfg: TaskConfig, label_key: str):
    return build_candidates(task_rows, records, task_cfg, label_key=label_key)


@task(name="filter-heuristics", cache_policy=NO_CACHE)
def heuristics_task(rows: list[dict], config, task_cfg: TaskConfig):
    return heuristics(rows, config, task_cfg)


@task(name="filter-consistency", cache_policy=NO_CACHE)
def consistency_task(rows: list[dict], config, task_cfg: TaskConfig):
    return consistency(rows, config, task_cfg)


@task(name="filter-entropy", cache_policy=NO_CACHE)
def entropy_task(rows: list[dict], config, task_cfg: TaskConfig):
    return entropy_filter(rows, config, task_cfg)


@task(name="filter-dedup", cache_policy=NO_CACHE)
def dedup_task(rows: list[dict], config, task_cfg: TaskConfig, seed: int = 0):
    return dedup(rows, config, task_cfg, seed=seed)


@task(name="filter-grader", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def grader_task(rows: list[dict], config, teacher: TeacherConfig, generation: GenerationConfig,
                api_key: str | None = None):
    return grader.grade(rows, config, teacher, generation, api_key=api_key)


@task(name="filter-mix", cache_policy=NO_CACHE)
def mix_task(rows: list[dict], real_rows: list[dict], labels: list[str] | None, config, seed: int = 0):
    return mix_dataset(rows, real_rows, labels, config, seed=seed)


def _code(reason: str) -> str:
    return reason.split(":", 1)[0]


def stage_report(stage: str, rows_in: int, kept: list[dict], rejected: list[dict], seconds: float,
                 skipped: bool = False, top: int = 5, examples: int = 2) -> dict[str, Any]:
    """One stage's line of the report: counts, top reason codes ({code: count}, most frequent first),
    and example rejections for each of those codes."""
    codes = Counter(_code(r["reason"]) for r in rejected)
    shown = []
    for code, _ in codes.most_common(top):
        shown += [{"id": r["id"], "reason": r["reason"], "text": (r.get("text") or "")[:200],
                   "response": (r.get("response") or "")[:200]}
                  for r in [x for x in rejected if _code(x["reason"]) == code][:examples]]
    return {"stage": stage, "in": rows_in, "kept": len(kept), "dropped": len(rejected), "skipped": skipped,
            "seconds": round(seconds, 3), "top_reasons": dict(codes.most_common(top)),
            "examples": shown}


def report_markdown(report: dict[str, Any], heading: str | None = "# Filter report") -> str:
    """The report as markdown: per-stage counts and top reasons, then the final mix and examples.

    heading: first line; None when the table goes inside another document (the run's report.md).
    """
    lines = ([heading, ""] if heading else []) + ["| stage | in | kept | dropped | top reasons |",
                                                  "|---|---|---|---|---|"]
    for s in report["stages"]:
        reasons = "skipped" if s["skipped"] else ", ".join(f"{code} ({n})" for code, n in s["top_reasons"].items())
        lines.append(f"| {s['stage']} | {s['in']} | {s['kept']} | {s['dropped']} | {reasons or '-'} |")
    lines += answers_markdown(report.get("answers"))
    f = report["final"]
    lines += ["", f"Final dataset: {f['rows']} rows ({f['teacher']} teacher, {f.get('traffic', 0)} traffic, {f['real']} real; "
                  f"real share {f['real_share']:.2f}); {f['train']} train / {f['validation']} validation.",
              "", "Examples of rejections:", ""]
    for s in report["stages"]:
        for e in s["examples"][:3]:
            lines.append(f"- **{s['stage']}** `{e['id']}`: {e['reason']} — answer: {e['response'][:80]!r}")
    return "\n".join(lines)


def _review(rows: list[dict], config: SpotCheckConfig, run_dir: Path, seed: int) -> tuple[list, list, dict]:
    logger = get_run_logger()
    sample = spotcheck.sample_for_review(rows, config.fraction, seed)
    info: dict[str, Any] = {"sampled": len(sample), "mode": None, "rejected_ids": [], "patterns": []}
    if not sample:
        info["mode"] = "empty sample"
        return rows, [], info
    write_text(run_dir / "spotcheck.csv", spotcheck.export_csv(sample))
    create_table_artifact(spotcheck.review_table(sample), key="filter-spotcheck-sample",
                          description=f"Spot-check sample: {len(sample)} of {len(rows)} rows, stratified by "
                                      "label and near-threshold stages. Reject wrong answers by id when resuming.")
    if config.decisions_path is not None:
        decisions, patterns = spotcheck.read_decisions(config.decisions_path)
        rejected_ids = {i: reason for i, (ok, reason) in decisions.items() if not ok}
        info["mode"] = f"decisions file {config.decisions_path}"
    elif config.auto_approve:
        rejected_ids, patterns = {}, []
        info["mode"] = "auto_approve"
    else:
        logger.info("Spot-check: %d rows await review (run_dir/spotcheck.csv, or the table artifact); "
                    "the flow resumes with the reviewer's decisions.", len(sample))
        form = ReviewInput.with_initial_data(
            description=f"Review the {len(sample)} rows of the `filter-spotcheck-sample` artifact. List the ids "
                        "of wrong answers in rejected_ids; add regexes to reject_patterns to remove every "
                        "matching answer in the dataset. Submit with empty lists to approve all.")
        answer = pause_flow_run(wait_for_input=form, timeout=config.timeout_s, poll_interval=config.poll_interval_s)
        if not answer.approve:
            raise SpotCheckRejected(f"spot-check: the reviewer rejected the sample: {answer.reason or 'no reason given'}")
        rejected_ids = {str(i): answer.reason for i in answer.rejected_ids}
        patterns = list(answer.reject_patterns)
        info["mode"] = "reviewer"
    kept, rejected = spotcheck.apply_review(rows, rejected_ids, patterns)
    info["rejected_ids"] = sorted(rejected_ids)
    info["patterns"] = patterns
    return kept, rejected, info


def answers_markdown(answers: dict | None) -> list[str]:
    """Report lines on the teacher's answers: the mapped share and which consistency checks ran."""
    if not answers:
        return []
    lines = [""]
    if answers["mapped_share"] is not None:
        lines.append(f"Answers mapped to a label: {answers['mapped']}/{answers['answered']} "
                     f"({answers['mapped_share']:.1%}); unmapped answers are in rejected.jsonl with their text.")
    checks = answers["checks"]
    ran = [f"rationale vs label on {checks['rationale']} answers"] if checks["rationale"] else []
    ran += [f"agreement across samples on {checks['samples']} prompts"] if checks["samples"] else []
    lines.append("Consistency checks that ran: " + (", ".join(ran) if ran else
                 "none (no answer carried a rationale and every prompt was answered once)") + ".")
    return lines


def filter_rows(prompts_path: str, records_path: str, real_path: str | None, task: TaskConfig,
                filter: FilterConfig, run_dir: str, grader_api_key: str | None = None, seed: int = 0, *,
                teacher: TeacherConfig | None = None, generation: GenerationConfig | None = None
                ) -> tuple[Path, dict]:
    """Run every enabled stage, the spot-check and the mix; write the outputs and the report.

    Must run inside a flow run (the spot-check may pause it). Its input and output are files, as
    between every stage of the cycle; inside, the stages hand each other quote()d lists in this process,
    because near-dedup, the spot-check sample and the mix each need every row at once.

    Args:
        prompts_path: JSONL of the task rows the teacher labelled.
        records_path: JSONL of their teacher records (any samples per id, done or failed).
        real_path: JSONL of the gold task rows reserved for the real-example share (None: none).
        task: the task section.
        filter: the filter section.
        run_dir: where filter_report.json, rejected.jsonl, dataset.jsonl and spotcheck.csv go.
        grader_api_key: key for the grader endpoint (None: resolved like the teacher's key).
        seed: seed for sampling, MinHash and the split.
        teacher, generation: needed only when the grader is enabled (its endpoint and client settings).

    Returns (run_dir/dataset.jsonl, the training rows; report).
    """
    stages = _Stages(get_run_logger())
    out = Path(run_dir)
    labels = task.label_set() if task.kind == "classification" else None
    if filter.grader.enabled and (teacher is None or generation is None):
        raise ConfigError("filter.grader.enabled: the grader needs the teacher and generation sections")
    t0 = time.perf_counter()
    records = read_jsonl(records_path)
    rows, rejected = candidates_task(quote(read_jsonl(prompts_path)), quote(records), task,
                                     filter.consistency.label_key)
    stages.add("generation", len(records), rows, rejected, time.perf_counter() - t0)
    answers = answer_report(rows, task, filter.consistency.rationale_field)
    rows, grading_summary = _run_filters(stages, rows, task, filter, seed, teacher, generation, grader_api_key)
    rows, (review_info,) = stages.run("spotcheck", filter.spotcheck.enabled, rows,
                                      lambda r: _review(r, filter.spotcheck, out, seed), ({"mode": "disabled"},))
    real_rows = read_jsonl(real_path) if real_path else []
    training = mix_task(quote(rows), quote(real_rows), labels, filter.mix, seed)
    report = {
        "stages": stages.reports,
        "spotcheck": review_info,
        "grader": grading_summary,
        "rejected_total": len(stages.rejected),
        "answers": answers,
        "final": _final_counts(training, labels),
    }
    _write_outputs(out, report, stages.rejected, training)
    if not training:
        raise ConfigError("filter: no training rows left after filtering (see filter_report.json and rejected.jsonl)")
    return out / "dataset.jsonl", report


class _Stages:
    """The stages run one after another: each one's report line, and every row any of them rejected."""

    def __init__(self, logger) -> None:
        self.logger = logger
        self.reports: list[dict] = []
        self.rejected: list[dict] = []

    def add(self, name: str, n_in: int, kept: list[dict], rejected: list[dict], seconds: float) -> None:
        self.reports.append(stage_report(name, n_in, kept, rejected, seconds))
        self.rejected.extend(rejected)

    def run(self, name: str, enabled: bool, rows: list[dict], call: Callable[[list[dict]], tuple],
            skipped: tuple = ()) -> tuple[list[dict], tuple]:
        """(kept rows, the stage's extra results) of `call(rows)`; `skipped` stands in for those when disabled."""
        n_in, t0 = len(rows), time.perf_counter()
        if not enabled:
            self.reports.append(stage_report(name, n_in, rows, [], 0.0, skipped=True))
            return rows, skipped
        kept, rejected, *extra = call(rows)
        self.add(name, n_in, kept, rejected, time.perf_counter() - t0)
        self.logger.info("filter %s: %d in, %d kept, %d dropped", name, n_in, len(kept), len(rejected))
        return kept, tuple(extra)


def _run_filters(stages: _Stages, rows: list[dict], task: TaskConfig, filter: FilterConfig, seed: int,
                 teacher: TeacherConfig | None, generation: GenerationConfig | None,
                 grader_api_key: str | None) -> tuple[list[dict], dict]:
    """The automatic stages in order; returns (kept rows, the grader's summary or {})."""
    rows, _ = stages.run("heuristics", filter.heuristics.enabled, rows,
                         lambda r: heuristics_task(quote(r), filter.heuristics, task))
    rows, _ = stages.run("consistency", filter.consistency.enabled, rows,
                         lambda r: consistency_task(quote(r), filter.consistency, task))
    rows, _ = stages.run("entropy", filter.entropy.enabled, rows,
                         lambda r: entropy_task(quote(r), filter.entropy, task))
    # Dedup before the grader: grading a duplicate that is dropped anyway would be paid for nothing.
    rows, _ = stages.run("dedup", filter.dedup.enabled, rows,
                         lambda r: dedup_task(quote(r), filter.dedup, task, seed))
    key = _grader_key(filter, teacher, grader_api_key) if filter.grader.enabled else None
    rows, (grading_summary,) = stages.run("grader", filter.grader.enabled, rows,
                                          lambda r: grader_task(quote(r), filter.grader, teacher, generation, key),
                                          ({},))
    return rows, grading_summary


def _grader_key(filter: FilterConfig, teacher: TeacherConfig, grader_api_key: str | None) -> str | None:
    if grader_api_key is not None:
        return grader_api_key
    from distill_tasks.generate import resolve_key

    return resolve_key(filter.grader.endpoint or teacher)


def _final_counts(training: list[dict], labels: list[str] | None) -> dict[str, Any]:
    n_real = sum(1 for r in training if r["source"] == "real")
    n_traffic = sum(1 for r in training if r["source"] == "traffic")
    return {"rows": len(training), "teacher": len(training) - n_real - n_traffic, "traffic": n_traffic,
            "real": n_real,
            "real_share": n_real / len(training) if training else 0.0,
            "train": sum(1 for r in training if r["split"] == "train"),
            "validation": sum(1 for r in training if r["split"] == "validation"),
            "tail_weighted": sum(1 for r in training if r["weight"] > 1.0),
            "labels": len({r["target"] for r in training}) if labels else None}


def _write_outputs(out: Path, report: dict, rejected: list[dict], training: list[dict]) -> None:
    """rejected.jsonl, dataset.jsonl, filter_report.json and the two artifacts."""
    write_jsonl(out / "rejected.jsonl", rejected)
    write_jsonl(out / "dataset.jsonl", training)
    write_text(out / "filter_report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str))
    create_table_artifact([{k: s[k] for k in ("stage", "in", "kept", "dropped", "skipped", "seconds")}
                           | {"top_reasons": ", ".join(f"{code} ({n})" for code, n in s["top_reasons"].items())}
                           for s in report["stages"]], key="filter-stages",
                          description="Rows in/kept/dropped per filter stage")
    create_markdown_artifact(report_markdown(report), key="filter-report", description="Filter report")


@task(name="filter-shards", cache_policy=NO_CACHE)
def filter_prompt_shards(out_dir: str, shards: int, task_section: TaskConfig, heuristics_section) -> dict:
    """Heuristics and cross-shard exact dedup over answered shards (distill.filter.stream), one shard in memory."""
    from distill.filter.stream import filter_shards

    totals = filter_shards(out_dir, shards, task_section, heuristics_section)
    get_run_logger().info("filter: %d of %d kept (%s)", totals["kept"], totals["candidates"],
                          ", ".join(f"{k} {v}" for k, v in sorted(totals["by_stage"].items())) or "none rejected")
    return totals
