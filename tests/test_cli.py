"""Every command answers --help; the CLI imports without the heavy stack."""

import subprocess
import sys

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
