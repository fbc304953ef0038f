"""The distillation cycle as one Prefect flow: generate -> filter -> train -> evaluate -> gate -> register.

Deployment `distillation-cycle` (deployments/prefect.yaml). The flow takes the
whole config and hands each task only its own section. It runs on the
ephemeral Prefect engine by default, or against a `prefect server` when
PREFECT_API_URL is set.

A run that crashed (its process killed) is continued by the next run of the same config, in the
same run directory, from its last training checkpoint; teacher answers come back from the
request cache (distill/runs.py says how a crash is told from a live run). `fresh=True` starts a
new run instead, `resume=RUN_ID` (or "last") continues a chosen one.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill_tasks.drift import read_traffic_rows
from distill_tasks.evaluate import evaluate_student, gate_student, register_student
from distill_tasks.filter import filter_rows, report_markdown
from distill_tasks.generate import generate_completions, reask_unmapped_answers, score_label_answers, summary_line
from distill_tasks.preflight import preflight_run
from distill_tasks.runs import mark_crashed_flow_runs
from distill_tasks.train import train_where_configured
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from distill.config import ConfigError, DistillConfig, dump_config, load_config
from distill.data import load_task_rows, read_jsonl, write_jsonl, write_text
from distill.runs import RESUMABLE, RunClaim, check_resumable, find_resumable, runs_root


def new_run_id(config: DistillConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{config.task.name}-{stamp}-{config.digest()[:6]}"


def split_real_rows(rows: list[dict], real_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Reserve gold-labelled rows for the real-example share; the teacher labels the rest.

    The real rows are never sent to the teacher: their gold labels are what a team
    already owns, and paying the teacher for them would be wasted money.
    """
    import random

    gold = [r for r in rows if r.get("gold") is not None]
    if not gold or real_fraction <= 0:
        return rows, []
    rng = random.Random(seed)
    picked = set(rng.sample(range(len(gold)), k=min(len(gold), round(real_fraction * len(rows)))))
    real_ids = {gold[i]["id"] for i in picked}
    return [r for r in rows if r["id"] not in real_ids], [r for r in rows if r["id"] in real_ids]


def local_runs_root(config: DistillConfig) -> Path:
    """Where runs are assembled: the store itself when it is a directory, a staging folder for S3."""
    return runs_root(str(config.store))


def local_run_dir(config: DistillConfig, run_id: str) -> Path:
    """The folder run `run_id` is assembled in (see local_runs_root)."""
    return local_runs_root(config) / run_id


@flow(name="distillation-cycle", log_prints=True)
def distillation_cycle(config: DistillConfig | None = None, config_path: str | None = None,
                       overrides: list[str] | None = None, run_id: str | None = None,
                       resume: str | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run one full distillation cycle and return {run_id, run_dir, metrics, decision, registry, store_uri}.

    Args:
        config: the whole typed config (a dict is validated into it); wins over config_path.
        config_path: YAML preset to load when `config` is not given (deployments pass this).
        overrides: `key.path=value` strings applied on top of config_path.
        run_id: name of a new run directory (timestamped when unset); an existing crashed,
            interrupted or failed run of the same config under that name is continued.
        resume: continue this run (its id), or "last": the newest crashed, interrupted, failed or
            abandoned run of this config; an error when there is none or it cannot be continued.
        fresh: never continue a crashed run of this config; start a new one.
    """
    from distill.store import open_store

    started, started_at = time.perf_counter(), datetime.now(timezone.utc).isoformat()
    cfg = config if config is not None else load_config(config_path, overrides)
    # Every input problem surfaces here, before a run directory exists and before any teacher call.
    inputs = load_inputs(cfg)
    # Open the store first: a missing bucket must fail before the teacher is paid, not after.
    store = open_store(str(cfg.store))
    mark_crashed_flow_runs([str(local_runs_root(cfg))])
    run_id, run_dir, resumed = choose_run(cfg, run_id, resume, fresh)
    claim = RunClaim(run_dir, run_id, cfg.digest(), cfg.task.name, str(cfg.store),
                     flow_run_id=str(flow_run.get_id() or "") or None, resumed_from=resumed)
    try:
        with claim:
            write_text(run_dir / "config.yaml", dump_config(cfg))
            inputs = write_inputs(inputs, run_dir)
            answers = ask_teacher(cfg, inputs, run_dir)
            outcome = train_and_evaluate(cfg, inputs, answers, run_dir, run_id)
            outcome["metrics"]["wall_s"] = round(time.perf_counter() - started, 1)
            return finish_run(cfg, inputs, answers, outcome, run_dir, run_id, store, started_at)
    except BaseException:
        drop_if_empty(run_dir, resumed)
        raise


def load_inputs(cfg: DistillConfig) -> dict[str, Any]:
    """The task's rows: {labels, train_rows, holdout, teacher_rows, real_rows, traffic_rows}; ConfigError on
    bad input.

    With filter.mix.traffic_log_url set (a drift-triggered cycle), recent traffic from that log joins the
    teacher's prompts with provenance `traffic`; the training prompts are the same as a full cycle's, so
    the request cache answers them and only new texts are paid for.
    """
    train_rows = load_task_rows(cfg.task, "train")
    teacher_rows, real_rows = split_real_rows(train_rows, cfg.filter.mix.real_fraction, cfg.seed)
    mix = cfg.filter.mix
    traffic = read_traffic_rows(mix.traffic_log_url, cfg.task, mix.traffic_requests, mix.traffic_max_rows,
                                [r["text"] for r in train_rows]) if mix.traffic_log_url else []
    return {"labels": cfg.task.label_set() if cfg.task.kind == "classification" else None,
            "train_rows": train_rows, "holdout": load_task_rows(cfg.task, "test") if cfg.task.test_path else [],
            "teacher_rows": teacher_rows + traffic, "real_rows": real_rows, "traffic_rows": traffic}


# The run's input rows, as the stages read them: each task gets a path, never a row list.
INPUT_FILES = {"teacher_rows": "inputs/prompts.jsonl", "real_rows": "inputs/real.jsonl",
               "holdout": "inputs/holdout.jsonl"}


def write_inputs(inputs: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write the checked rows to the run directory and keep only their paths and counts.

    Returns {labels, paths: {teacher_rows, real_rows, holdout}, counts: {the same, train_rows, traffic_rows}}.
    From here on rows move between stages as files: Prefect walks, and a distributed runner would
    ship, every row of a list handed to a task; a path costs nothing either way.
    """
    paths = {k: str(write_jsonl(run_dir / name, inputs[k])) for k, name in INPUT_FILES.items()}
    counts = {k: len(inputs[k]) for k in (*INPUT_FILES, "train_rows", "traffic_rows")}
    return {"labels": inputs["labels"], "paths": paths, "counts": counts}


def choose_run(cfg: DistillConfig, run_id: str | None, resume: str | None, fresh: bool
               ) -> tuple[str, Path, str | None]:
    """(run id, run directory, the state it is resumed from or None for a new run)."""
    logger = get_run_logger()
    root, digest = local_runs_root(cfg), cfg.digest()
    found = None
    if resume == "last":
        found = find_resumable(root, digest, RESUMABLE)
        if found is None:
            raise ConfigError(f"--resume last: no crashed, interrupted or failed run of this config "
                              f"({digest[:12]}) under {root}")
    elif resume or (run_id and (root / run_id).is_dir()):
        found = check_resumable(root, resume or run_id, digest)
    elif not fresh and run_id is None:
        found = find_resumable(root, digest)
    if found is None:
        run_id = run_id or new_run_id(cfg)
        run_dir = root / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.info("run %s in %s", run_id, run_dir)
        return run_id, run_dir, None
    step = found["checkpoint_step"]
    logger.info("resuming %s run %s in %s from %s (start a new run with --fresh)", found["state"], found["run_id"],
                found["run_dir"], f"training checkpoint step {step}" if step else "the start (no checkpoint yet)")
    return found["run_id"], Path(found["run_dir"]), found["state"]


def ask_teacher(cfg: DistillConfig, inputs: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Preflight, the teacher's answers on the training prompts and, only when some came back, on the holdout.

    Returns {generation, preflight, records_path, summary, holdout_records_path (None without a holdout),
    holdout_summary}; the records themselves stay in their files.
    """
    paths, labels = inputs["paths"], inputs["labels"]
    # Checks, the estimate against the budget, and the teacher probe; `generation` carries the run's ledger.
    generation, preflight = preflight_run(cfg, paths["teacher_rows"], paths["holdout"], str(run_dir))
    out = str(run_dir / "teacher_outputs.jsonl")
    summary = generate_completions(paths["teacher_rows"], cfg.teacher, generation, out, labels=labels)
    check_answered(summary, cfg.teacher.base_url)
    reask_unmapped_answers(out, labels, cfg.teacher, generation)
    score_label_answers(out, labels, cfg.teacher, generation)
    held, holdout_summary = None, {}
    if inputs["counts"]["holdout"]:
        # The teacher's own answers on the holdout: its accuracy is what retention is measured against.
        held = str(run_dir / "teacher_holdout.jsonl")
        holdout_summary = generate_completions.with_options(name="generate-holdout")(
            paths["holdout"], cfg.teacher, generation, held, purpose="holdout", labels=labels)
        # The same corrective re-ask and label scoring as the training answers: the teacher is measured as it teaches.
        reask_unmapped_answers.with_options(name="reask-holdout")(
            held, labels, cfg.teacher, generation, purpose="holdout-reask")
        score_label_answers.with_options(name="score-holdout")(
            held, labels, cfg.teacher, generation, purpose="holdout-score")
    return {"generation": generation, "preflight": preflight, "records_path": out, "summary": summary,
            "holdout_records_path": held, "holdout_summary": holdout_summary}


def check_answered(summary: dict, base_url: str) -> None:
    """Stop the run when not one training request came back: a dead teacher must not be asked for the holdout."""
    if summary.get("requested") and not summary.get("done"):
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(summary.get("failed_by_reason", {}).items()))
        raise ConfigError(f"teacher.base_url: {base_url} answered none of the {summary['requested']} training "
                           f"requests ({reasons or 'no reason given'}); stopped before the holdout was sent. "
                           "Check that the teacher is up, then run the same command again.")


def train_and_evaluate(cfg: DistillConfig, inputs: dict[str, Any], answers: dict[str, Any], run_dir: Path,
                       run_id: str) -> dict[str, Any]:
    """Filter the answers, train the student (resuming from a checkpoint), evaluate it and apply the gate.

    Returns {dataset_path, filter_report, trained, metrics, decision}.
    """
    paths = inputs["paths"]
    dataset, filter_report = filter_rows(paths["teacher_rows"], answers["records_path"], paths["real_rows"],
                                         cfg.task, cfg.filter, str(run_dir), teacher=cfg.teacher,
                                         generation=answers["generation"], seed=cfg.seed)
    trained = train_where_configured(str(dataset), inputs["labels"], cfg.train, str(run_dir), run_id=run_id,
                                     store=str(cfg.store))
    resumed = run_dir / "train" / "resume.json"
    trained["resumed_from_step"] = json.loads(resumed.read_text())["step"] if resumed.is_file() else None
    metrics = evaluate_student(trained["model_dir"], paths["holdout"], answers["holdout_records_path"],
                               inputs["labels"], cfg.evaluate, str(run_dir), dataset_path=str(dataset),
                               teacher=cfg.teacher, max_new_tokens=cfg.generation.max_tokens,
                               generation=answers["generation"])
    decision = gate_student(metrics, cfg.gate)
    return {"dataset_path": str(dataset), "filter_report": filter_report, "trained": trained, "metrics": metrics,
            "decision": decision}


def finish_run(cfg: DistillConfig, inputs: dict[str, Any], answers: dict[str, Any], outcome: dict[str, Any],
               run_dir: Path, run_id: str, store, started_at: str) -> dict[str, Any]:
    """Write metrics.json and report.md, register the student, publish the run with its manifest (last)."""
    from distill.manifest import build_manifest
    from distill.store import publish_run

    metrics, decision, trained = outcome["metrics"], outcome["decision"], outcome["trained"]
    gen, hold = answers["summary"], answers["holdout_summary"]
    spend = {"generation": _spend(gen), "holdout": _spend(hold),
             "cost_usd": round(gen.get("cost_usd", 0.0) + hold.get("cost_usd", 0.0), 6)}
    spend.update(run_spend(answers["generation"], answers["preflight"]))  # grader and probes too
    spend["reuse"] = reuse(cfg, answers)
    metrics["teacher_cost_usd"] = spend["cost_usd"]
    outcome["reuse"] = spend["reuse"]
    write_text(run_dir / "metrics.json", json.dumps({"run_id": run_id, **metrics, "gate": decision}, indent=1,
                                                    default=str))
    write_report(cfg, inputs, answers, outcome, run_dir, run_id)

    lineage = {"run_id": run_id, "config_hash": cfg.digest(), "parent_run": cfg.parent_run,
               "teacher": {"base_url": cfg.teacher.base_url, "model": cfg.teacher.model}}
    registry = register_student(cfg.task.name, run_id, trained["model_dir"], metrics, decision, lineage,
                                str(cfg.registry), cfg.gate.auto_promote)

    data_files = [p for p in (cfg.task.train_path, cfg.task.test_path, cfg.task.labels_path) if p]
    manifest = build_manifest(cfg, run_id, data_files=data_files, flow_run_id=str(flow_run.get_id() or ""),
                              spend=spend, started_at=started_at,
                              finished_at=datetime.now(timezone.utc).isoformat(),
                              extra={"gate": decision, "registry": registry, "metrics": _scalars(metrics),
                                     "preflight": answers["preflight"],
                                     "sources": {k: outcome["filter_report"]["final"].get(k, 0)
                                                 for k in ("teacher", "traffic", "real")},
                                     "traffic_log_url": cfg.filter.mix.traffic_log_url,
                                     "resumed_from_step": trained.get("resumed_from_step")})
    manifest = publish_run(run_dir, store, run_id, manifest)
    return {"run_id": run_id, "run_dir": str(run_dir), "metrics": metrics, "decision": decision,
            "registry": registry, "store_uri": manifest.get("store_uri")}


def write_report(cfg: DistillConfig, inputs: dict[str, Any], answers: dict[str, Any], outcome: dict[str, Any],
                 run_dir: Path, run_id: str) -> None:
    """report.md in the run directory, and the same markdown as the run's Prefect artifact."""
    from distill.evaluate.report import render_report, reuse_section

    metrics, trained = outcome["metrics"], outcome["trained"]
    step = trained.get("resumed_from_step")
    n = inputs["counts"]
    report = render_report(metrics, outcome["decision"], extra_sections={
        "Run": f"run id `{run_id}`, config `{cfg.digest()[:12]}`, task `{cfg.task.name}`, "
               f"{n['train_rows']} training inputs ({n['teacher_rows']} to the teacher, "
               f"{n['real_rows']} real) and {n['traffic_rows']} recent traffic rows, "
               f"{n['holdout']} holdout rows, wall {metrics['wall_s']} s",
        "Generation": summary_line(answers["summary"]) if answers["summary"] else "no teacher calls",
        "Teacher cost against a full cycle": reuse_section(outcome["reuse"], n["traffic_rows"]),
        "Filtering": report_markdown(outcome["filter_report"], heading=None),
        "Training": f"{trained.get('steps')} steps in {trained.get('train_s', 0):.0f} s"
                    f"{f' (resumed from the checkpoint at step {step})' if step else ''}; best validation "
                    f"{trained.get('best_metric')}",
    })
    write_text(run_dir / "report.md", report)
    create_markdown_artifact(key="distill-report", markdown=report, description=f"distill run {run_id}")


def drop_if_empty(run_dir: Path, resumed: str | None) -> None:
    """Remove a new run's directory when the run stopped before it held anything worth resuming.

    What counts: a teacher answer in teacher_outputs.jsonl or anything under train/. A run stopped by
    its preflight or a dead teacher leaves nothing behind; one resumed from an earlier attempt is kept.
    """
    if resumed is not None or not run_dir.is_dir() or (run_dir / "train").exists():
        return
    outputs = run_dir / "teacher_outputs.jsonl"
    try:
        answered = outputs.is_file() and any(r.get("status") == "done" for r in read_jsonl(outputs))
    except (ConfigError, OSError):
        answered = True  # unreadable is not the same as empty: keep it for a person to look at
    if answered:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    get_run_logger().info("removed %s: the run stopped before the teacher answered", run_dir)


def reuse(cfg: DistillConfig, answers: dict[str, Any]) -> dict[str, dict]:
    """This cycle's paid and reused teacher requests against a full cycle's (report and manifest)."""
    from distill.data import iter_jsonl
    from distill.teacher.generation import reuse_costs

    def records(path: str | None):
        return iter_jsonl(path, max_field_chars=None) if path else iter(())

    return reuse_costs({"training": records(answers["records_path"]),
                        "holdout": records(answers["holdout_records_path"])}, cfg.teacher)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def run_spend(generation, preflight: dict) -> dict:
    """The run's whole spend from its ledger ({purpose: usd}, total) plus the preflight's estimate and mode."""
    from distill.teacher.ratelimit import Ledger

    ledger = Ledger(generation.ledger_path, None, generation.ledger_url)
    return {"by_purpose": ledger.by_purpose(), "cost_usd": ledger.spent(), "preflight": preflight}


def _spend(summary: dict) -> dict:
    keys = ("requested", "done", "failed", "cached", "prompt_tokens", "completion_tokens", "cost_usd")
    return {k: summary.get(k) for k in keys if k in summary}
