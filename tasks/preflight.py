"""Prefect task around `distill.preflight`: every check before the first paid call, logged."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill.config import DistillConfig, GenerationConfig
from distill.data import read_jsonl
from distill.preflight import prepare_generation
from distill_tasks.generate import resolve_key


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_run(cfg: DistillConfig, prompts_path: str, holdout_path: str | None,
                  run_dir: str) -> tuple[GenerationConfig, dict]:
    """(generation section for the run, info): static checks, the dry-run estimate against the budget,
    then the teacher probe that decides the structured-output mode (see distill/preflight.py).

    Args:
        cfg: the whole config (the checks span the task, teacher, generation, filter and train sections).
        prompts_path: JSONL of the rows the teacher will label.
        holdout_path: JSONL of the gold holdout rows the teacher will also answer (None: no holdout).
        run_dir: the run directory; the spend ledger lives there.
    """
    logger = get_run_logger()
    holdout = read_jsonl(holdout_path) if holdout_path else []
    generation, info = prepare_generation(cfg, read_jsonl(prompts_path), holdout, run_dir, resolve_key(cfg.teacher))
    budget = f" of ${cfg.generation.budget_usd:.4f}" if cfg.generation.budget_usd is not None else ""
    logger.info("preflight: estimate up to $%.4f%s for %d requests; structured output %s",
                info["estimate_usd"], budget, info["estimate_requests"], info["structured_output"])
    return generation, info
