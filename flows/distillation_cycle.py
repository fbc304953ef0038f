"""The distillation cycle as one Prefect flow: generate -> filter -> train -> evaluate -> gate -> register.

Deployment `distillation-cycle` (deployments/prefect.yaml). The flow takes the
whole config and hands each task only its own section. It runs on the
ephemeral Prefect engine by default, or against a `prefect server` when
PREFECT_API_URL is set.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill_tasks.evaluate import evaluate_student, gate_student, register_student
from distill_tasks.filter import filter_rows, report_markdown
from distill_tasks.generate import generate_completions, reask_unmapped_answers, score_label_answers, summary_line
from distill_tasks.preflight import preflight_run
from distill_tasks.train import train_where_configured
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from distill.config import DistillConfig, dump_config, load_config
from distill.data import load_task_rows, write_text


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


def local_run_dir(config: DistillConfig, run_id: str) -> Path:
    """Where the run is assembled: the store itself when it is a directory, a staging folder for S3."""
    store = str(config.store)
    if store.startswith("s3://"):
        return Path(".distill/staging") / run_id
    return Path(store) / run_id


@flow(name="distillation-cycle", log_prints=True)
def distillation_cycle(config: DistillConfig | None = None, config_path: str | None = None,
                       overrides: list[str] | None = None, run_id: str | None = None) -> dict[str, Any]:  # long: split into named steps is pending
    """Run one full distillation cycle and return {run_id, run_dir, metrics, decision, registry}.

    Args:
        config: the whole typed config (a dict is validated into it); wins over config_path.
        config_path: YAML preset to load when `config` is not given (deployments pass this).
        overrides: `key.path=value` strings applied on top of config_path.
        run_id: name of the run directory; a timestamped id when unset.
    """
    from distill.manifest import build_manifest
    from distill.store import open_store, publish_run

    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat()
    logger = get_run_logger()
    cfg = config if config is not None else load_config(config_path, overrides)
    # Open the store first: a missing bucket must fail before the teacher is paid, not after.
    store = open_store(str(cfg.store))
    run_id = run_id or new_run_id(cfg)
    run_dir = local_run_dir(cfg, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    logger.info("run %s in %s", run_id, run_dir)

    # Every input problem surfaces here, before a single paid teacher call.
    labels = cfg.task.label_set() if cfg.task.kind == "classification" else None
    train_rows = load_task_rows(cfg.task, "train")
    holdout = load_task_rows(cfg.task, "test") if cfg.task.test_path else []
    teacher_rows, real_rows = split_real_rows(train_rows, cfg.filter.mix.real_fraction, cfg.seed)

    # Checks, the estimate against the budget, and the teacher probe; `generation` carries the run's ledger.
    generation, preflight = preflight_run(cfg, teacher_rows, holdout, str(run_dir))
    records, gen_summary = generate_completions(teacher_rows, cfg.teacher, generation,
                                                str(run_dir / "teacher_outputs.jsonl"))
    records = reask_unmapped_answers(records, labels, cfg.teacher, generation, str(run_dir / "teacher_outputs.jsonl"))
    records = score_label_answers(records, labels, cfg.teacher, generation, str(run_dir / "teacher_outputs.jsonl"))
    holdout_records, holdout_summary = ([], {})
    if holdout:
        # The teacher's own answers on the holdout: its accuracy is what retention is measured against.
        holdout_records, holdout_summary = generate_completions.with_options(name="generate-holdout")(
            holdout, cfg.teacher, generation, str(run_dir / "teacher_holdout.jsonl"), purpose="holdout")
        # The same corrective re-ask and label scoring as the training answers: the teacher is measured as it teaches.
        holdout_records = reask_unmapped_answers.with_options(name="reask-holdout")(
            holdout_records, labels, cfg.teacher, generation, str(run_dir / "teacher_holdout.jsonl"),
            purpose="holdout-reask")
        holdout_records = score_label_answers.with_options(name="score-holdout")(
            holdout_records, labels, cfg.teacher, generation, str(run_dir / "teacher_holdout.jsonl"),
            purpose="holdout-score")

    dataset, filter_report = filter_rows(teacher_rows, records, real_rows, cfg.task, cfg.filter, str(run_dir),
                                         teacher=cfg.teacher, generation=generation, seed=cfg.seed)

    trained = train_where_configured(dataset, labels, cfg.train, str(run_dir), run_id=run_id, store=str(cfg.store))
    validation = [r for r in dataset if r.get("split") == "validation"]
    metrics = evaluate_student(trained["model_dir"], holdout, holdout_records, labels, cfg.evaluate, str(run_dir),
                               validation=validation, teacher=cfg.teacher, train_rows=dataset)
    decision = gate_student(metrics, cfg.gate)

    metrics["wall_s"] = round(time.perf_counter() - started, 1)
    spend = {
        "generation": _spend(gen_summary), "holdout": _spend(holdout_summary),
        "cost_usd": round(gen_summary.get("cost_usd", 0.0) + holdout_summary.get("cost_usd", 0.0), 6),
    }
    spend.update(run_spend(generation.ledger_path, preflight))  # the ledger: grader and probes too
    metrics["teacher_cost_usd"] = spend["cost_usd"]
    write_text(run_dir / "metrics.json", json.dumps({"run_id": run_id, **metrics, "gate": decision}, indent=1,
                                                    default=str))

    from distill.evaluate.report import render_report

    report = render_report(metrics, decision, extra_sections={
        "Run": f"run id `{run_id}`, config `{cfg.digest()[:12]}`, task `{cfg.task.name}`, "
               f"{len(train_rows)} training inputs ({len(teacher_rows)} to the teacher, {len(real_rows)} real), "
               f"{len(holdout)} holdout rows, wall {metrics['wall_s']} s",
        "Generation": summary_line(gen_summary) if gen_summary else "no teacher calls",
        "Filtering": report_markdown(filter_report, heading=None),
        "Training": f"{trained.get('steps')} steps in {trained.get('train_s', 0):.0f} s; best validation "
                    f"{trained.get('best_metric')}",
    })
    write_text(run_dir / "report.md", report)
    create_markdown_artifact(key="distill-report", markdown=report, description=f"distill run {run_id}")

    lineage = {"run_id": run_id, "config_hash": cfg.digest(), "parent_run": cfg.parent_run,
               "teacher": {"base_url": cfg.teacher.base_url, "model": cfg.teacher.model}}
    registry = register_student(cfg.task.name, run_id, trained["model_dir"], metrics, decision, lineage,
                                str(cfg.registry), cfg.gate.auto_promote)

    data_files = [p for p in (cfg.task.train_path, cfg.task.test_path, cfg.task.labels_path) if p]
    manifest = build_manifest(cfg, run_id, data_files=data_files, flow_run_id=str(flow_run.get_id() or ""),
                              spend=spend, started_at=started_at,
                              finished_at=datetime.now(timezone.utc).isoformat(),
                              extra={"gate": decision, "registry": registry, "metrics": _scalars(metrics),
                                     "preflight": preflight})
    manifest = publish_run(run_dir, store, run_id, manifest)
    return {"run_id": run_id, "run_dir": str(run_dir), "metrics": metrics, "decision": decision,
            "registry": registry, "store_uri": manifest.get("store_uri")}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def run_spend(ledger_path: Path, preflight: dict) -> dict:
    """The run's whole spend from its ledger ({purpose: usd}, total) plus the preflight's estimate and mode."""
    from distill.teacher.ratelimit import Ledger

    ledger = Ledger(ledger_path, None)
    return {"by_purpose": ledger.by_purpose(), "cost_usd": ledger.spent(), "preflight": preflight}


def _spend(summary: dict) -> dict:
    keys = ("requested", "done", "failed", "cached", "prompt_tokens", "completion_tokens", "cost_usd")
    return {k: summary.get(k) for k in keys if k in summary}
