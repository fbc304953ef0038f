"""The `distill` entry point: the core command line plus the commands that run flows.

`distill/cli.py` holds every command that needs no Prefect; this adapter adds `run`,
`demo` and `generate` (whose key may come from a Prefect Secret block) on top of it.
Keeping them here is what lets the core stay free of the orchestration layer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from distill.cli import SET_HELP, app, check_inputs, fail, load_or_fail
from distill.offline import apply_offline_env


@app.command("run")
def run(config: Path = typer.Argument(..., help="YAML config file (see deployments/configs/)."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Run the whole distillation cycle (generate, filter, train, evaluate, gate, register)."""
    apply_offline_env()
    cfg = load_or_fail(config, set_)
    rows, holdout = check_inputs(cfg)
    from distill_flows.distillation_cycle import distillation_cycle, split_real_rows

    from distill.config import ConfigError
    from distill.preflight import budget_estimate, estimate_text, over_budget

    try:
        # The dry-run estimate on the console; over the budget, the run stops here, before any call.
        estimate = budget_estimate(cfg, split_real_rows(rows, cfg.filter.mix.real_fraction, cfg.seed)[0], holdout)
        typer.echo(estimate_text(cfg, estimate))
        if over_budget(cfg, estimate, cfg.generation.budget_usd):
            fail(over_budget(cfg, estimate, cfg.generation.budget_usd))
        result = distillation_cycle(config=cfg)
    except ConfigError as e:
        fail(str(e))
    _print_result(result)



def _print_result(result: dict) -> None:
    m = result.get("metrics", {})
    keys = ["teacher_accuracy", "student_accuracy", "retention", "agreement", "ece", "ece_before",
            "tail_gap", "robustness_drop", "teacher_p50_ms", "teacher_p95_ms", "student_p50_ms",
            "student_p95_ms", "teacher_cost_usd", "wall_s", "demo_wall_s"]
    for k in keys:
        if k in m and m[k] is not None:
            v = m[k]
            typer.echo(f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}")
    if "decision" in result:
        d = result["decision"]
        typer.echo(f"{'gate':>18}: {'SHIP' if d.get('ship') else 'DO NOT SHIP'}")
        for r in d.get("reasons", []):
            typer.echo(f"{'':>20}- {r}")
    typer.echo(f"run directory: {result['run_dir']}")



@app.command("demo")
def demo(set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
         quick: bool = typer.Option(False, help="A small slice of the data (a minute or two), for smoke tests.")):
    """Distil BANKING77 intent classification end to end, offline, on CPU."""
    apply_offline_env()
    from distill_flows.distillation_cycle import distillation_cycle

    from distill.config import ConfigError
    from distill.demo import run_demo

    try:
        result = run_demo(distillation_cycle, overrides=set_ or [], quick=quick)
    except ConfigError as e:
        fail(str(e))
    _print_result(result)





@app.command("generate")
def generate_cmd(config: Path = typer.Argument(..., help="YAML config file (teacher, generation and task sections)."),
                 input: Path = typer.Option(..., "--input", help="CSV/JSONL prompts: `id` plus `messages` or the "
                                            "task's input fields (rendered with the config's prompt template)."),
                 output: Path = typer.Option(..., "--output", help="JSONL of teacher records, one per id (and "
                                             "sample), each done or failed with a reason; written atomically."),
                 set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Estimate tokens and cost; call nothing."),
                 progress: bool = typer.Option(True, help="Show a progress bar on stderr.")):
    """Ask the teacher for every prompt, with the run's request cache, retries, limits and budget.

    Exits 0 when every row is done, 1 when some rows failed (the output still holds them, with reasons).
    """
    from distill.config import ConfigError
    from distill.data import write_jsonl
    from distill.teacher.client import resolve_api_key
    from distill.teacher.generation import estimate_cost, generate, load_prompt_rows

    cfg = load_or_fail(config, set_)
    try:
        rows = load_prompt_rows(input, cfg.task)
        if dry_run:
            est = estimate_cost(rows, cfg.teacher, cfg.generation)
            for k, v in est.items():
                typer.echo(f"{k:>22}: {v}")
            return
        key = resolve_api_key(cfg.teacher)
        if key is None and cfg.teacher.api_key_secret_block:
            apply_offline_env()
            from distill_tasks.generate import resolve_key

            key = resolve_key(cfg.teacher)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(rows) * cfg.generation.samples_per_prompt, unit="req", desc="generate",
                       file=sys.stderr, dynamic_ncols=True)
        result = generate(rows, cfg.teacher, cfg.generation, api_key=key,
                          progress=(lambda n, total: bar.update(n - bar.n)) if bar else None)
        if bar:
            bar.close()
    except ConfigError as e:
        fail(str(e))
    write_jsonl(output, result.records)
    s = result.summary
    typer.echo(f"{s['done']}/{s['requested']} done ({s['cached']} cached), {s['failed']} failed "
               f"{s['failed_by_reason'] or ''}, {s['prompt_tokens']}+{s['completion_tokens']} tokens, "
               f"${s['cost_usd']:.4f}, {s['requests_per_s']:.1f} req/s -> {output}")
    if s["budget_exhausted"]:
        typer.echo("budget reached: unrequested rows are marked budget_exhausted; raise generation.budget_usd "
                   "and re-run to buy the rest (stored answers are not bought again)")
    if s["failed"]:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
