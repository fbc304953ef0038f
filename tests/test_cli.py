"""Every command answers --help; the CLI imports without the heavy stack."""

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from distill_flows.cli import app
from typer.testing import CliRunner


def commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    stack = [(prefix, group)]
    while stack:
        path, cmd = stack.pop()
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append((path + (name,), sub))


@pytest.mark.parametrize("path", sorted(commands(app)), ids=lambda p: " ".join(p) or "distill")
def test_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_required_commands_exist():
    names = {" ".join(p) for p in commands(app)}
    for want in ("run", "demo", "generate", "teacher serve", "config validate", "serve", "models list",
                 "models promote", "models rollback", "runs list", "runs show", "runs diff", "shadow report"):
        assert want in names


def test_cli_import_stays_light():
    code = "import sys, distill.cli; bad = [m for m in ('torch', 'transformers', 'prefect') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_entry_point_import_stays_light():
    code = ("import sys, distill_flows.cli; bad = [m for m in ('torch', 'transformers', 'prefect') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- names and paths are checked before any work (config validate, run, generate) -----------------

PRESET = Path(__file__).resolve().parents[1] / "deployments" / "configs" / "banking77-demo.yaml"


@contextmanager
def counting_teacher():
    """A chat endpoint on 127.0.0.1 that records every request it gets."""
    from fastapi import FastAPI, Request

    from distill.httpserver import start_in_thread

    hits, api = [], FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        hits.append(await request.json())
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "refund"},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    with start_in_thread(api) as server:
        yield server.url, hits


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/distill-escaped"])
def test_config_validate_refuses_a_task_name_outside_the_store(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("config", "validate", PRESET, "--set", f"task.name={name}")
    assert result.exit_code == 2, result.output
    assert f"--set task.name={name}: task.name:" in result.output and "not a safe name" in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/distill-escaped"])
def test_run_refuses_a_task_name_outside_the_store_before_any_call(name, tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with counting_teacher() as (url, hits):
        result = invoke("run", PRESET, "--set", f"task.name={name}", "--set", f"teacher.base_url={url}/v1")
    assert result.exit_code == 2 and "task.name" in result.output, result.output
    assert hits == []
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/distill-escaped").exists()
    assert list(work.iterdir()) == []


def test_store_under_home_is_the_home_directory(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = invoke("config", "validate", PRESET, "--set", "store=~/s", "--show")
    assert result.exit_code == 0, result.output
    assert f"store: {home}/s\n" in result.output
    assert not (work / "~").exists()


def test_config_path_that_is_a_directory_or_missing(tmp_path):
    result = invoke("config", "validate", tmp_path)
    assert result.exit_code == 2 and f"{tmp_path}: is a directory, not a YAML config file" in result.output
    assert "Traceback" not in result.output
    result = invoke("config", "validate", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "missing.yaml: config file not found" in result.output


def test_set_errors_name_the_set_argument():
    result = invoke("config", "validate", PRESET, "--set", "generation.concurrency=-1")
    assert result.exit_code == 2
    assert "--set generation.concurrency=-1: generation.concurrency:" in result.output
    assert f"{PRESET}:" not in result.output
    result = invoke("config", "validate", PRESET, "--set", "train.packing=true")
    assert result.exit_code == 2
    assert "--set train.packing=true: train.packing: not a field of train.mode=classifier_kd" in result.output
    result = invoke("config", "validate", PRESET, "--set", "train.mode=sft")
    assert result.exit_code == 2 and "train.init_from_teacher: not a field of train.mode=sft" in result.output


def test_unwritable_outputs_fail_before_any_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke("config", "validate", PRESET, "--set", f"store={blocker}/runs")
    assert result.exit_code == 2 and f"store: {blocker}/runs cannot be created: {blocker} is a file" in result.output
    with counting_teacher() as (url, hits):
        result = invoke("run", PRESET, "--set", f"teacher.base_url={url}/v1", "--set", f"registry={blocker}/reg")
        assert result.exit_code == 2 and "registry:" in result.output, result.output
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"id": "p1", "messages": [{"role": "user", "content": "hi"}]}\n')
        result = invoke("generate", PRESET, "--input", prompts, "--output", blocker / "out.jsonl", "--no-progress",
                        "--set", f"teacher.base_url={url}/v1", "--set", f"generation.cache_path={tmp_path}/c.sqlite")
        assert result.exit_code == 2 and "--output:" in result.output, result.output
    assert hits == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "prompts.jsonl"]


def test_run_ids_on_the_command_line_are_checked(tmp_path):
    result = invoke("runs", "show", "../../etc", "--store", tmp_path)
    assert result.exit_code == 2 and "run id:" in result.output and "not a safe name" in result.output


def test_serve_without_a_task_needs_a_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("serve")
    assert result.exit_code == 2 and "no student to serve: pass --student DIR" in result.output
    assert "Traceback" not in result.output
