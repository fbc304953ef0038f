"""The `distill` command line: the core commands, which need no Prefect.

The commands that run flows (`run`, `demo`, `generate`) are added by `flows/cli.py`, the
installed entry point, so that the core never imports the orchestration layer. Imports stay
light: each command imports what it needs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from distill.offline import apply_offline_env

app = typer.Typer(help="Distil an expensive teacher into a small, cheap student, and keep it that way.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect and validate configs.", no_args_is_help=True)
teacher_app = typer.Typer(help="Local OpenAI-compatible teacher server.", no_args_is_help=True)
models_app = typer.Typer(help="The local model registry: champion and challenger per task.", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect and compare runs.", no_args_is_help=True)
shadow_app = typer.Typer(help="Shadow-mode logs and disagreement review.", no_args_is_help=True)
export_app = typer.Typer(help="Export a causal-LM student for vLLM: a LoRA adapter or a speculative draft.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(teacher_app, name="teacher")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(shadow_app, name="shadow")
app.add_typer(export_app, name="export")

SET_HELP = "Override a config field, e.g. --set generation.concurrency=64 (repeatable)."


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def load_or_fail(config: Optional[Path], overrides: Optional[List[str]], need_task: bool = True):
    """The validated config, or exit 2 with the error (file and line, or the `--set`, and the field)."""
    from distill.config import ConfigError, load_config

    try:
        return load_config(config, overrides, need_task=need_task)
    except ConfigError as e:
        fail(str(e))


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(..., help="YAML config file."),
                    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                    show: bool = typer.Option(False, help="Print the effective config.")):
    """Validate a config, its names and output paths, and its data files, without calling the teacher."""
    from distill.config import ConfigError, dump_config
    from distill.preflight import check_outputs

    cfg = load_or_fail(config, set_)
    try:
        check_outputs(cfg)
    except ConfigError as e:
        fail(str(e))
    rows, test = check_inputs(cfg)
    if show:
        typer.echo(dump_config(cfg))
    typer.echo(f"ok: {config} ({len(rows)} training rows, {len(test)} holdout rows, config {cfg.digest()[:12]})")


def check_inputs(cfg) -> tuple[list[dict], list[dict]]:
    """(training rows, holdout rows); fails before any teacher call (and before Prefect starts) on bad
    data or labels."""
    from distill.config import ConfigError
    from distill.data import load_task_rows

    try:
        cfg.task.label_set()
        rows = load_task_rows(cfg.task, "train")
        return rows, load_task_rows(cfg.task, "test") if cfg.task.test_path else []
    except ConfigError as e:
        fail(str(e))


# --- teacher (distill/teacher/server.py) ------------------------------------------------------
INSECURE_HELP = ("Serve without authentication when no key is set; refused with a non-loopback --host.")


@teacher_app.command("serve")
def teacher_serve(
    model_path: Path = typer.Argument(..., help="Teacher directory: an embedding-classifier teacher (teacher.json), "
                                      "a HF sequence classifier (e.g. a student) or a HF causal LM."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8765, help="Port to listen on."),
    model_name: Optional[str] = typer.Option(None, help="Model name clients must send; default: the directory name."),
    max_batch: int = typer.Option(64, help="Most concurrent classifier requests answered by one forward pass."),
    batch_wait_ms: float = typer.Option(2.0, help="How long a classifier request waits for others to batch with."),
    files_dir: Optional[Path] = typer.Option(None, help="Where /v1/files and batch results are kept (default: a "
                                             "temporary directory, removed when the server stops)."),
    threads: Optional[int] = typer.Option(None, help="Torch threads for model calls (default: all cores but one)."),
    api_key_env: str = typer.Option("DISTILL_TEACHER_API_KEY", help="Environment variable holding the key clients "
                                    "must send as the Bearer token; without it the server refuses to start."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help=INSECURE_HELP),
    max_request_bytes: int = typer.Option(1024 * 1024, help="Largest request body accepted (413 past it)."),
    max_upload_bytes: int = typer.Option(100 * 1024 * 1024, help="Largest /v1/files upload accepted (streamed to "
                                         "disk; 413 past it)."),
    file_ttl_s: float = typer.Option(86400.0, help="Seconds an uploaded or batch-result file is kept."),
    json_field: Optional[str] = typer.Option(None, help="A classifier answers the JSON object {FIELD: label} "
                                             "(for generative students) instead of the bare label."),
):
    """Serve a local model as an OpenAI-compatible endpoint (/v1/chat/completions, /v1/files, /v1/batches)."""
    apply_offline_env()
    from distill.config import ConfigError
    from distill.teacher.server import serve

    try:
        serve(model_path, host=host, port=port, model_name=model_name, max_batch=max_batch,
              batch_wait_ms=batch_wait_ms, files_dir=files_dir, threads=threads, api_key_env=api_key_env,
              insecure_no_auth=insecure_no_auth, max_request_bytes=max_request_bytes,
              max_upload_bytes=max_upload_bytes, file_ttl_s=file_ttl_s, json_field=json_field)
    except ConfigError as e:
        fail(str(e))



# --- models (distill/serve/registry.py) --------------------------------------------------------

REGISTRY_HELP = "Registry directory or s3://bucket/prefix; defaults to the config's `registry` (or .distill/registry)."
CONFIG_OPT_HELP = "YAML config whose `registry` field names the registry."


def _registry(registry: Optional[str], config: Optional[Path]):
    from distill.config import ConfigError, normalise_store
    from distill.serve.registry import Registry
    from distill.store import StoreError

    if registry is None:
        registry = load_or_fail(config, None, need_task=False).registry if config else ".distill/registry"
    try:
        return Registry(normalise_store(registry))
    except (ValueError, StoreError) as e:
        fail(f"--registry {registry}: {e}")


@models_app.command("list")
def models_list(task: Optional[str] = typer.Option(None, help="Only this task's models."),
                registry: Optional[str] = typer.Option(None, help=REGISTRY_HELP),
                config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_OPT_HELP),
                as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON.")):
    """List registered students with their status (champion, challenger, retired) and headline metrics."""
    import json

    from distill.config import ConfigError
    from distill.store import StoreError

    try:
        entries = _registry(registry, config).list(task)
    except (ConfigError, StoreError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(entries, indent=1))
        return
    if not entries:
        typer.echo("no models registered")
        return

    def num(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.1f}")

    typer.echo(f"{'task':<16} {'run id':<40} {'status':<12} {'acc':>7} {'ret':>7} {'ece':>6} {'p95ms':>7} gate")
    for e in entries:
        m = e.get("metrics", {})
        gate = {True: "ship", False: "no"}.get(m.get("gate_ship"), "-")
        typer.echo(f"{e['task']:<16} {e['run_id']:<40} {e['status']:<12} {num(m.get('student_accuracy'), True):>7} "
                   f"{num(m.get('retention'), True):>7} {num(m.get('ece'), True):>6} "
                   f"{num(m.get('student_p95_ms')):>7} {gate}")


@models_app.command("promote")
def models_promote(task: str = typer.Argument(..., help="Task name."),
                   run_id: str = typer.Argument(..., help="Registered run to make champion."),
                   reason: str = typer.Option(..., "--reason", help="Why (recorded in the registry's event log)."),
                   registry: Optional[str] = typer.Option(None, help=REGISTRY_HELP),
                   config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_OPT_HELP)):
    """Make a registered student the champion of its task; the old champion is kept for rollback."""
    from distill.config import ConfigError
    from distill.store import StoreError

    try:
        entry = _registry(registry, config).promote(task, run_id, reason)
    except (ConfigError, StoreError) as e:
        fail(str(e))
    typer.echo(f"champion of {task}: {entry['run_id']} ({entry['path']})")


@models_app.command("rollback")
def models_rollback(task: str = typer.Argument(..., help="Task name."),
                    registry: Optional[str] = typer.Option(None, help=REGISTRY_HELP),
                    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_OPT_HELP)):
    """Bring back the previous champion of a task."""
    from distill.config import ConfigError
    from distill.store import StoreError

    try:
        entry = _registry(registry, config).rollback(task)
    except (ConfigError, StoreError) as e:
        fail(str(e))
    typer.echo(f"champion of {task}: {entry['run_id']} (rolled back)")


# --- runs (distill/store.py, distill/manifest.py) ----------------------------------------------

STORE_HELP = "Run store: a directory or s3://bucket/prefix (AWS settings from the standard environment)."
_KEY_METRICS = ("student_accuracy", "retention", "ece", "student_p95_ms", "teacher_cost_usd")


def _runs_store(uri: str):
    from distill.store import StoreError, open_store

    try:
        return open_store(uri)
    except StoreError as e:
        fail(str(e))


def _run_with_metrics(store, run_id: str) -> dict:
    """The run's manifest with "metrics" filled from its metrics.json artifact when the manifest lacks them."""
    import json

    from distill.config import check_safe_name
    from distill.store import StoreError, read_manifest

    try:
        check_safe_name(run_id)
    except ValueError as e:
        fail(f"run id: {e}")
    try:
        manifest = read_manifest(store, run_id)
    except StoreError as e:
        fail(str(e))
    art = (manifest.get("artifacts") or {}).get("metrics.json")
    if "metrics" not in manifest and art:
        try:
            manifest["metrics"] = json.loads(store.get_bytes(f"{run_id}/metrics.json", sha256=art.get("sha256")))
        except (StoreError, ValueError) as e:
            typer.secho(f"warning: {run_id}: metrics.json unreadable ({e})", fg=typer.colors.YELLOW, err=True)
    return manifest


def _sha256(path: Path) -> str:
    from distill.store import file_sha256

    return file_sha256(path)[0]


def _gate_word(manifest: dict) -> str:
    gate = manifest.get("gate") or (manifest.get("metrics") or {}).get("gate") or {}
    if "ship" not in gate:
        return "-"
    return "SHIP" if gate["ship"] else "NO-SHIP"


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@runs_app.command("list")
def runs_list(store: str = typer.Option("runs", "--store", envvar="DISTILL_STORE", help=STORE_HELP),
              as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List runs: complete ones (with a manifest.json) with their key metrics and gate decision, then those
    still running, crashed (their process is gone), interrupted, failed or abandoned."""
    import json

    from distill.runs import incomplete_runs, runs_root
    from distill.store import list_runs

    st = _runs_store(store)
    rows = []
    for run_id in list_runs(st):
        m = _run_with_metrics(st, run_id)
        metrics = m.get("metrics") or {}
        rows.append({"run_id": run_id, "started_at": m.get("started_at"), "task": (m.get("task") or {}).get("name"),
                     **{k: metrics.get(k) for k in _KEY_METRICS}, "gate": _gate_word(m), "state": "complete"})
    done = {r["run_id"] for r in rows}
    for info in incomplete_runs(runs_root(st.uri), store=st.uri if st.uri.startswith("s3://") else None):
        if info["run_id"] not in done:
            rows.append({"run_id": info["run_id"], "started_at": info["started_at"], "task": info["task"],
                         **{k: None for k in _KEY_METRICS}, "gate": "-", "state": info["state"],
                         "checkpoint_step": info["checkpoint_step"], "pid": info["pid"], "error": info["error"],
                         "run_dir": info["run_dir"]})
    rows.sort(key=lambda r: str(r["started_at"] or ""))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo(f"no runs in {st.uri}")
        return
    header = ["run_id", "started_at", "task", *_KEY_METRICS, "gate", "state"]
    table = [header] + [[_fmt(r[h]) if h != "started_at" else str(r[h] or "-")[:19] for h in header] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    crashed = [r for r in rows if r["state"] in ("crashed", "interrupted", "failed")]
    if crashed:
        typer.echo(f"{len(crashed)} run(s) did not finish: `distill run CONFIG --resume RUN_ID` continues one "
                   "from its last checkpoint; `distill runs gc` lists what it would remove.")


@runs_app.command("gc")
def runs_gc(store: str = typer.Option("runs", "--store", envvar="DISTILL_STORE", help=STORE_HELP),
            registry: Optional[str] = typer.Option(None, help=REGISTRY_HELP),
            config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_OPT_HELP),
            yes: bool = typer.Option(False, "--yes", help="Delete them; without it, only list what would go.")):
    """Remove run directories nobody needs: crashed, interrupted, failed or abandoned runs that no live
    process owns and the model registry does not point to. A dry run unless --yes is given."""
    from distill.config import ConfigError
    from distill.runs import gc_candidates, remove_run, runs_root

    if registry is None:
        registry = load_or_fail(config, None).registry if config else ".distill/registry"
    try:
        found = gc_candidates(runs_root(store), registry, store=store if store.startswith("s3://") else None)
    except ConfigError as e:
        fail(str(e))
    total = sum(r["bytes"] for r in found)
    for r in found:
        typer.echo(f"{'removing' if yes else 'would remove'} {r['run_dir']}  ({r['state']}, {r['bytes']:,} bytes)")
    if not found:
        typer.echo("nothing to remove")
    elif not yes:
        typer.echo(f"{len(found)} run(s), {total:,} bytes; run again with --yes to delete them")
        return
    removed = 0
    for r in found:
        try:
            remove_run(r["run_dir"])
            removed += 1
        except (ConfigError, OSError) as e:
            typer.secho(f"warning: {e}", fg=typer.colors.YELLOW, err=True)
    if found:
        typer.echo(f"removed {removed} run(s), {total:,} bytes")


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(..., help="Run id (its folder name in the store)."),
              store: str = typer.Option("runs", "--store", envvar="DISTILL_STORE", help=STORE_HELP),
              verify: bool = typer.Option(False, "--verify", help="Check every artifact's sha256; exit 1 on problems."),
              as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON.")):
    """Show a run's lineage: config hash, data hashes, teacher, spend, versions, artifacts, reproduce command."""
    import json

    from distill.manifest import reproduce_command
    from distill.store import verify_run

    st = _runs_store(store)
    m = _run_with_metrics(st, run_id)
    if as_json:
        typer.echo(json.dumps(m, indent=1))
    else:
        teacher, git = m.get("teacher") or {}, m.get("git") or {}
        prices = teacher.get("prices") or {}
        lines = [
            ("run", run_id), ("task", (m.get("task") or {}).get("name")),
            ("started", m.get("started_at")), ("finished", m.get("finished_at")),
            ("config hash", m.get("config_hash")),
            ("teacher", f"{teacher.get('model')} at {teacher.get('base_url')} "
                        f"(${prices.get('input_per_1m', 0)}/${prices.get('output_per_1m', 0)} per 1M in/out)"),
            ("spend usd", (m.get("spend") or {}).get("cost_usd")),
            ("parent run", m.get("parent_run")), ("flow run", m.get("flow_run_id")),
            ("git", f"{git.get('revision')}{' (dirty)' if git.get('dirty') else ''}" if git else None),
            ("gate", _gate_word(m)), ("stored at", m.get("store_uri")),
        ]
        metrics = m.get("metrics") or {}
        lines += [(k, metrics[k]) for k in _KEY_METRICS if k in metrics]
        for k, v in lines:
            typer.echo(f"{k:>16}: {_fmt(v)}")
        typer.echo("data (checked against the files on this machine):")
        for path, sha in (m.get("data_hashes") or {}).items():
            here = Path(path)
            state = ("missing here" if not here.is_file()
                     else "same" if _sha256(here) == sha else "CHANGED since the run")
            typer.echo(f"  {sha[:12]}  {path}  ({state})")
        arts = m.get("artifacts") or {}
        typer.echo(f"artifacts ({len(arts)}, {sum(a.get('bytes', 0) for a in arts.values()):,} bytes):")
        for rel, a in arts.items():
            typer.echo(f"  {a.get('sha256', '')[:12]}  {a.get('bytes', 0):>12,}  {rel}")
        typer.echo(f"reproduce: {m.get('reproduce') or reproduce_command(m)}")
    if verify:
        problems = verify_run(st, run_id)
        for p in problems:
            typer.secho(f"verify: {p}", fg=typer.colors.RED, err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"verified: {len(m.get('artifacts') or {})} artifacts match their sha256", err=as_json)


@runs_app.command("diff")
def runs_diff(run_a: str = typer.Argument(..., help="Baseline run id."),
              run_b: str = typer.Argument(..., help="Run id compared with the baseline."),
              store: str = typer.Option("runs", "--store", envvar="DISTILL_STORE", help=STORE_HELP),
              as_json: bool = typer.Option(False, "--json", help="Print the diff as JSON.")):
    """Compare two runs: config fields, input data, teacher, spend, package versions, metrics, gate."""
    import json

    from distill.manifest import diff_manifests

    st = _runs_store(store)
    d = diff_manifests(_run_with_metrics(st, run_a), _run_with_metrics(st, run_b))
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    typer.echo(f"{run_a} -> {run_b}" + ("  (same config)" if d["config_hash_equal"] else ""))
    for section in ("config", "data", "teacher", "spend", "packages", "git"):
        for k, v in d[section].items():
            typer.echo(f"  {section:<8} {k}: {_fmt(v['a'])} -> {_fmt(v['b'])}")
    if d["gate"]:
        typer.echo(f"  gate     {_fmt(d['gate']['a'])} -> {_fmt(d['gate']['b'])}")
    if d["metrics"]:
        typer.echo("metrics:")
        for k, v in d["metrics"].items():
            delta = f"  ({v['delta']:+.4f})" if v["delta"] is not None else ""
            typer.echo(f"  {k}: {_fmt(v['a'])} -> {_fmt(v['b'])}{delta}")



# --- serve and shadow (distill/serve/app.py, distill/serve/shadow.py) --------------------------


def _serving_models(cfg, student: Optional[Path], challenger: Optional[Path], want_challenger: bool):
    """(champion dir, champion run, challenger dir, challenger run): flags, then config, then the registry."""
    from distill.serve.registry import Registry

    champ_dir, champ_run = student or cfg.serve.student_dir, None
    if champ_dir is None and cfg.task is None:
        fail("no student to serve: pass --student DIR, set serve.student_dir, or give a config whose task "
             "names the registry entry")
    reg = Registry(cfg.registry) if cfg.task is not None else None
    if champ_dir is None:
        entry = reg.champion(cfg.task.name)
        if entry is None:
            fail(f"registry {cfg.registry}: task {cfg.task.name!r} has no champion; promote one or pass --student DIR")
        champ_dir, champ_run = reg.local_dir(entry), entry["run_id"]
    chall_dir, chall_run = challenger or cfg.serve.challenger_dir, None
    if chall_dir is None and want_challenger and cfg.task is not None:
        entry = reg.challenger(cfg.task.name)
        if entry is not None:
            chall_dir, chall_run = reg.local_dir(entry), entry["run_id"]
    return champ_dir, champ_run, chall_dir, chall_run


@app.command("serve")
def serve_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config (defaults when omitted)."),
              set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
              student: Optional[Path] = typer.Option(None, help="Champion student directory (default: registry champion)."),
              challenger: Optional[Path] = typer.Option(None, help="Challenger directory for shadow/canary "
                                                                   "(default: registry challenger)."),
              host: Optional[str] = typer.Option(None, help="Bind address (serve.host)."),
              port: Optional[int] = typer.Option(None, help="Port (serve.port)."),
              insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help=INSECURE_HELP)):
    """Serve the champion student as an OpenAI-compatible API (auth key from serve.api_key_env, required)."""
    apply_offline_env()
    # The host quoted: an override value is read as YAML, where `::` is not a string.
    overrides = (list(set_ or []) + ([f"serve.host={json.dumps(host)}"] if host else [])
                 + ([f"serve.port={port}"] if port else []))
    cfg = load_or_fail(config, overrides, need_task=False)
    from distill.config import ConfigError
    from distill.serve.app import serve_forever

    s = cfg.serve
    uses_teacher = (s.fallback_confidence is not None or s.fallback_mean_logprob is not None
                    or (s.shadow and s.shadow_teacher))
    champ_dir, champ_run, chall_dir, chall_run = _serving_models(cfg, student, challenger,
                                                                 s.shadow or s.canary_fraction > 0)
    typer.echo(f"serving {champ_run or champ_dir} on http://{s.host}:{s.port}/v1"
               + (f" (challenger {chall_run or chall_dir})" if chall_dir else ""))
    try:
        # A registry challenger is watched in the registry: once the canary judge stops it, no traffic.
        watch = (str(cfg.registry), cfg.task.name) if chall_run and cfg.task is not None else None
        serve_forever(champ_dir, s, challenger_dir=chall_dir, teacher=cfg.teacher if uses_teacher else None,
                      champion_run=champ_run, challenger_run=chall_run, insecure_no_auth=insecure_no_auth,
                      canary_registry=watch)
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e))


@shadow_app.command("report")
def shadow_report(config: Optional[Path] = typer.Argument(None, help="YAML config (defaults when omitted)."),
                  set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                  log_url: Optional[str] = typer.Option(None, help="Shadow log URL (default serve.log_url)."),
                  gold: Optional[Path] = typer.Option(None, help="CSV/JSONL of gold labels (task text/label columns)."),
                  student: str = typer.Option("champion", help="Whose readiness is judged: champion or challenger."),
                  max_wrong: Optional[float] = typer.Option(None, help="Not ready above this share of wrong "
                                                                       "disagreements (serve.review_max_wrong)."),
                  limit: int = typer.Option(5000, help="Most recent logged requests reviewed."),
                  grader: bool = typer.Option(True, help="Ask serve.review_grader about disagreements without gold."),
                  out: Optional[Path] = typer.Option(None, help="Also write the markdown report here.")):
    """Adjudicate champion/challenger/teacher disagreements from the shadow log and decide readiness."""
    apply_offline_env()
    cfg = load_or_fail(config, set_, need_task=False)
    import json as _json

    from distill.config import ConfigError
    from distill.data import write_text
    from distill.serve.shadow import (
        ShadowLog,
        load_gold,
        openai_grader,
        render_review,
        review,
    )

    try:
        task = cfg.task
        gold_map = load_gold(gold, task.text_field if task else "text",
                             (task.label_field if task else None) or "label") if gold else None
        grade = None
        if grader and cfg.serve.review_grader is not None:
            g = cfg.serve.review_grader
            labels = task.label_set() if task and task.kind == "classification" else None
            grade = openai_grader(g, os.environ.get(g.api_key_env), labels)
        log = ShadowLog(log_url or cfg.serve.log_url)
        result = review(log.recent(limit=limit), student=student, gold=gold_map, grader=grade,
                        max_wrong=cfg.serve.review_max_wrong if max_wrong is None else max_wrong)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    report = render_review(result)
    typer.echo(report)
    if out:
        write_text(out, report)
        write_text(out.with_suffix(".json"), _json.dumps(result, indent=1))
    if result["ready"] is False:
        raise typer.Exit(1)


@app.command("feedback")
def feedback_cmd(input: Path = typer.Argument(..., help="CSV/JSONL with request_id and label columns: the gold "
                                              "label of requests answered earlier."),
                 config: Optional[Path] = typer.Option(None, "--config", help="YAML config (task labels, "
                                                       "serve.log_url)."),
                 set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                 log_url: Optional[str] = typer.Option(None, help="Traffic log URL (default drift.log_url, then "
                                                       "serve.log_url).")):
    """Record late gold labels in the traffic log; the drift watch's accuracy sensor judges them.

    The whole file is checked before anything is written: an unknown label or request id fails with its line.
    """
    cfg = load_or_fail(config, set_, need_task=False)
    from distill.config import ConfigError
    from distill.drift.feedback import apply_feedback, read_feedback
    from distill.serve.shadow import ShadowLog

    try:
        labels = cfg.task.label_set() if cfg.task is not None and cfg.task.kind == "classification" else None
        gold = read_feedback(input, labels)
        log = ShadowLog(log_url or cfg.drift.log_url or cfg.serve.log_url)
        try:
            n = apply_feedback(log, gold, str(input))
        finally:
            log.close()
    except ConfigError as e:
        fail(str(e))
    typer.echo(f"{n} gold label(s) recorded from {input}")


# --- export (distill/models/export.py) ---------------------------------------------------------


@export_app.command("lora")
def export_lora(adapter: Path = typer.Argument(..., help="LoRA adapter directory (a run's student/adapter)."),
                output: Path = typer.Argument(..., help="New directory for the vLLM adapter."),
                base_model: Optional[str] = typer.Option(None, help="The base as `vllm serve` is given it (hub id or "
                                                         "path), written as base_model_name_or_path."),
                base_dir: Optional[Path] = typer.Option(None, help="Local copy of the base to check the adapter "
                                                        "against (default: the adapter's base).")):
    """Write a LoRA adapter in the layout `vllm serve BASE --enable-lora --lora-modules NAME=DIR` loads."""
    from distill.config import ConfigError
    from distill.models.export import export_vllm_lora

    apply_offline_env()
    try:
        out = export_vllm_lora(adapter, output, base_model=base_model, base_dir=base_dir)
    except ConfigError as e:
        fail(str(e))
    typer.echo(f"wrote {out['dir']}: r={out['r']}, {out['tensors']} tensors, modules {', '.join(out['target_modules'])}")
    typer.echo(f"serve it with: {out['command']}")


@export_app.command("draft")
def export_draft_cmd(student: Path = typer.Argument(..., help="Student directory (full, merged or LoRA adapter)."),
                     output: Path = typer.Argument(..., help="New directory for the draft model."),
                     teacher: Path = typer.Option(..., help="The open-weights teacher's local model directory.")):
    """Write the student as a speculative-decoding draft for a teacher that shares its tokenizer."""
    from distill.config import ConfigError
    from distill.models.export import export_draft

    apply_offline_env()
    try:
        out = export_draft(student, output, teacher_dir=teacher)
    except ConfigError as e:
        fail(str(e))
    typer.echo(f"wrote {out['dir']} ({out['parameters']:,} parameters)")
    typer.echo(f"serve the teacher with: vllm serve {teacher} --speculative-config '{out['vllm_speculative_config']}'")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
