"""The `distill` command line. Imports stay light: each command imports what it needs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Distil an expensive teacher into a small, cheap student, and keep it that way.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect and validate configs.", no_args_is_help=True)
teacher_app = typer.Typer(help="Local OpenAI-compatible teacher server.", no_args_is_help=True)
models_app = typer.Typer(help="The local model registry: champion and challenger per task.", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect and compare runs.", no_args_is_help=True)
shadow_app = typer.Typer(help="Shadow-mode logs and disagreement review.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(teacher_app, name="teacher")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(shadow_app, name="shadow")

SET_HELP = "Override a config field, e.g. --set generation.concurrency=64 (repeatable)."


def _offline_env() -> None:
    # Nothing may reach a hub or a telemetry endpoint; set before prefect/transformers import.
    for k, v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(config: Optional[Path], overrides: Optional[List[str]]):
    from distill.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(..., help="YAML config file."),
                    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                    show: bool = typer.Option(False, help="Print the effective config.")):
    """Validate a config (and its data files' headers) without calling the teacher."""
    from distill.config import ConfigError, dump_config
    from distill.data import load_task_rows

    cfg = _load(config, set_)
    try:
        cfg.task.label_set()
        rows = load_task_rows(cfg.task, "train")
        test = load_task_rows(cfg.task, "test") if cfg.task.test_path else []
    except ConfigError as e:
        _fail(str(e))
    if show:
        typer.echo(dump_config(cfg))
    typer.echo(f"ok: {config} ({len(rows)} training rows, {len(test)} holdout rows, config {cfg.digest()[:12]})")


def _check_inputs(cfg) -> None:
    """Fail before any teacher call (and before Prefect starts) on bad data or labels."""
    from distill.config import ConfigError
    from distill.data import load_task_rows

    try:
        cfg.task.label_set()
        load_task_rows(cfg.task, "train")
        if cfg.task.test_path:
            load_task_rows(cfg.task, "test")
    except ConfigError as e:
        _fail(str(e))


@app.command("run")
def run(config: Path = typer.Argument(..., help="YAML config file (see deployments/configs/)."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Run the whole distillation cycle (generate, filter, train, evaluate, gate, register)."""
    _offline_env()
    cfg = _load(config, set_)
    _check_inputs(cfg)
    from distill.config import ConfigError
    from flows.distillation_cycle import distillation_cycle

    try:
        result = distillation_cycle(config=cfg)
    except ConfigError as e:
        _fail(str(e))
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
    _offline_env()
    from distill.config import ConfigError
    from distill.demo import run_demo
    from flows.distillation_cycle import distillation_cycle

    try:
        result = run_demo(distillation_cycle, overrides=set_ or [], quick=quick)
    except ConfigError as e:
        _fail(str(e))
    _print_result(result)


# --- teacher (distill/teacher_server.py) ------------------------------------------------------


# --- generate (distill/teacher.py, tasks/generate.py) ------------------------------------------


# --- models (distill/registry.py) --------------------------------------------------------------


# --- runs (distill/store.py, distill/manifest.py) ----------------------------------------------


# --- serve and shadow (distill/serve.py, distill/shadow.py) ------------------------------------


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
