"""The `distill` entry point: the core command line plus the commands that run flows.

`distill/cli.py` holds every command that needs no Prefect; this adapter adds `run` and
`demo`, which start the distillation flow through `_run_cycle` alone, and `generate` (whose
key may come from a Prefect Secret block) on top of it. Keeping them here is what lets the
core stay free of the orchestration layer.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import List, Optional

import typer

from distill.cli import SET_HELP, app, check_inputs, fail, load_or_fail
from distill.offline import apply_offline_env


RESUME_HELP = ("Continue this run (its id) from its last training checkpoint, in its own directory; `last`: "
               "the newest crashed, interrupted or failed run of this config. Without it, a crashed run of the "
               "same config is continued anyway (see --fresh).")
FRESH_HELP = "Start a new run even when a crashed run of the same config could be continued."
SERVER_STARTUP_S = 120


@app.command("run")
def run(config: Path = typer.Argument(..., help="YAML config file (see deployments/configs/)."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN_ID|last", help=RESUME_HELP),
        fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP)):
    """Run the whole distillation cycle (generate, filter, train, evaluate, gate, register)."""
    apply_offline_env()
    if resume and fresh:
        fail("--resume and --fresh contradict each other; pick one")
    cfg = load_or_fail(config, set_)
    rows, holdout = check_inputs(cfg)
    from distill_flows.distillation_cycle import split_real_rows

    from distill.config import ConfigError
    from distill.preflight import budget_estimate, check_outputs, estimate_text, over_budget
    from distill.runs import check_resumable, runs_root

    # Both again in the flow (which deployments call directly); here they fail before Prefect starts.
    try:
        check_outputs(cfg)
        if resume and resume != "last":
            check_resumable(runs_root(str(cfg.store)), resume, cfg.digest())
        # The dry-run estimate on the console; over the budget, the run stops here, before any call.
        estimate = budget_estimate(cfg, split_real_rows(rows, cfg.filter.mix.real_fraction, cfg.seed)[0], holdout)
        typer.echo(estimate_text(cfg, estimate))
        if over_budget(cfg, estimate, cfg.generation.budget_usd):
            fail(over_budget(cfg, estimate, cfg.generation.budget_usd))
    except ConfigError as e:
        fail(str(e))
    _run_cycle(lambda cycle: cycle(config=cfg, resume=resume, fresh=fresh))


def _run_cycle(call) -> None:
    """The one place the CLI starts a flow: `call(distillation_cycle)` inside `guarded_run`, then its figures.

    A config error found inside the flow exits 2 with its message, as one found before it does.
    """
    from distill.config import ConfigError

    with guarded_run():
        from distill_flows.distillation_cycle import distillation_cycle

        try:
            result = call(distillation_cycle)
        except ConfigError as e:
            fail(str(e))
    _print_result(result)


@contextmanager
def guarded_run():
    """The block with no child left behind and SIGTERM handled like Ctrl-C.

    The watcher (distill/lifeline.py) stops every child of this process when it dies, SIGKILL
    included; the temporary Prefect server is started here, before the flow, so it is handed to the
    watcher at once. SIGTERM (a supervisor stopping the run) becomes KeyboardInterrupt, so the run
    records itself as interrupted and stops its children on the way out.
    """
    import signal

    from distill.lifeline import start_lifeline, watch

    start_lifeline()

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            from prefect.server.api.server import SubprocessASGIServer
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP

            server = SubprocessASGIServer()  # the instance every Prefect client of this process then uses
            # Creating a fresh database takes longer than Prefect's default 20 s on a busy 2-core machine.
            server.start(timeout=max(STARTUP.value(), SERVER_STARTUP_S))
            if server.server_process is not None:
                watch(server.server_process.pid)
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_result(result: dict) -> None:
    m = result.get("metrics", {})
    keys = ["teacher_accuracy", "student_accuracy", "retention", "agreement", "json_valid_rate",
            "student_field_accuracy", "teacher_field_accuracy", "field_agreement", "ece", "ece_before",
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
         quick: bool = typer.Option(False, help="A small slice of the data (a minute or two), for smoke tests."),
         resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN_ID|last", help=RESUME_HELP),
         fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
         generative: bool = typer.Option(False, "--generative", help="A causal-LM student answering as JSON "
                                         "{\"intent\": ...} (deployments/configs/banking77-json-demo.yaml).")):
    """Distil BANKING77 intent classification end to end, offline, on CPU."""
    apply_offline_env()
    if resume and fresh:
        fail("--resume and --fresh contradict each other; pick one")
    from distill.demo import run_demo

    _run_cycle(lambda cycle: run_demo(partial(cycle, resume=resume, fresh=fresh), overrides=set_ or [],
                                      quick=quick, generative=generative))


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
    from distill.preflight import check_writable
    from distill.teacher.client import resolve_api_key
    from distill.teacher.generation import estimate_cost, generate, load_prompt_rows

    cfg = load_or_fail(config, set_, need_task=False)  # rows with `messages` need no task
    try:
        rows = load_prompt_rows(input, cfg.task)
        if dry_run:
            est = estimate_cost(rows, cfg.teacher, cfg.generation)
            for k, v in est.items():
                typer.echo(f"{k:>22}: {v}")
            return
        check_writable(output, "--output", directory=False)
        check_writable(cfg.generation.cache_path, "generation.cache_path", directory=False)
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


@app.command("generate-dataset")
def generate_dataset_cmd(config: Path = typer.Argument(..., help="YAML config file (teacher and generation "
                                                       "sections; with a task section the answers are also filtered)."),
                         input: Path = typer.Option(..., "--input", help="CSV/JSONL prompts, any number of rows: "
                                                    "`id` plus `messages` or the task's input fields."),
                         out_dir: Path = typer.Option(..., "--out-dir", help="Shards, records, filtered rows and "
                                                      "summary.json; run again with the same one to resume."),
                         set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Answer a large prompts file shard by shard (the generate-dataset flow), resumable, in bounded memory.

    Exits 0 when every row is done, 1 when some failed (run again to retry them; answers bought are kept).
    """
    from distill.config import ConfigError
    from distill.preflight import check_writable

    apply_offline_env()
    cfg = load_or_fail(config, set_, need_task=False)
    if not input.is_file():
        fail(f"{input}: file not found (--input)")
    try:
        check_writable(cfg.generation.cache_path, "generation.cache_path", directory=False)
        check_writable(out_dir, "--out-dir", directory=True)
        with guarded_run():
            from distill_flows.generate_dataset import generate_dataset, task_runner

            flow = generate_dataset.with_options(task_runner=task_runner(cfg.generation))
            out = flow(teacher=cfg.teacher, generation=cfg.generation, input_path=str(input), out_dir=str(out_dir),
                       task=cfg.task, heuristics=cfg.filter.heuristics)
    except ConfigError as e:
        fail(str(e))
    f = out["filter"]
    typer.echo(f"{out['done']}/{out['requested']} done ({out['cached']} cached), {out['failed']} failed, "
               f"${out['cost_usd']:.4f}, {out['shards']} shards ({out['shards_skipped']} finished earlier), "
               f"{out['wall_s']:.1f} s" + (f"; filter kept {f['kept']} of {f['candidates']}" if f else "")
               + f" -> {out_dir}")
    if out["failed"]:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

