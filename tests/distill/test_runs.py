"""Run claims, crash detection with real killed processes, `runs list` / `runs gc`, the child watcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.config import ConfigError
from distill.runs import (
    CLAIM_FILE,
    RunClaim,
    check_resumable,
    find_resumable,
    gc_candidates,
    read_claim,
    run_state,
)
from distill.train.trainer import last_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def claim_in_child(run_dir: Path, digest: str = "d" * 64) -> subprocess.Popen:
    """A real process that claims `run_dir` and then waits to be killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from distill.runs import RunClaim
        with RunClaim({str(run_dir)!r}, {run_dir.name!r}, {digest!r}, "toy", "runs", flow_run_id="fr-1"):
            print("claimed", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def test_a_claim_records_how_the_attempt_ended(tmp_path):
    run_dir = tmp_path / "run-a"
    with RunClaim(run_dir, "run-a", "d" * 64, "toy", "runs", flow_run_id="fr-1"):
        assert run_state(run_dir) == "running"
        assert read_claim(run_dir)["pid"] == os.getpid()
    assert not (run_dir / CLAIM_FILE).exists() and run_state(run_dir) == "abandoned"

    with pytest.raises(ValueError):
        with RunClaim(run_dir, "run-a", "d" * 64, "toy", "runs", flow_run_id="fr-2"):
            raise ValueError("teacher gone")
    claim = read_claim(run_dir)
    assert run_state(run_dir) == "failed" and claim["error"] == "ValueError: teacher gone"

    with pytest.raises(KeyboardInterrupt):
        with RunClaim(run_dir, "run-a", "d" * 64, "toy", "runs", flow_run_id="fr-3"):
            raise KeyboardInterrupt
    claim = read_claim(run_dir)
    # Each attempt is counted, and its flow run kept for marking it Crashed later.
    assert run_state(run_dir) == "interrupted" and claim["attempts"] == 2 and claim["flow_runs"] == ["fr-2", "fr-3"]


def test_a_killed_owner_makes_a_crashed_run_that_only_the_same_config_resumes(tmp_path):
    run_dir = tmp_path / "runs" / "run-k"
    proc = claim_in_child(run_dir)
    try:
        assert run_state(run_dir) == "running"
        with pytest.raises(ConfigError, match="the run is running"):
            check_resumable(run_dir.parent, "run-k", "d" * 64)
        with pytest.raises(ConfigError, match="another process is running or resuming it"):
            with RunClaim(run_dir, "run-k", "d" * 64, "toy", "runs"):
                pass
        assert find_resumable(tmp_path / "runs", "d" * 64) is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_state(run_dir) == "crashed"
    assert find_resumable(tmp_path / "runs", "d" * 64)["run_id"] == "run-k"
    assert find_resumable(tmp_path / "runs", "e" * 64) is None
    with pytest.raises(ConfigError, match="made with config dddddddddddd, this config is eeeeeeeeeeee"):
        check_resumable(run_dir.parent, "run-k", "e" * 64)
    assert check_resumable(run_dir.parent, "run-k", "d" * 64)["state"] == "crashed"


def test_a_half_written_checkpoint_is_skipped(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step, state in ((5, '{"global_step": 5}'), (10, '{"global_st')):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (ckpts / "checkpoint-15").mkdir()  # killed before trainer_state.json was written
    assert last_checkpoint(ckpts) == str(ckpts / "checkpoint-5")


def make_runs(tmp_path: Path) -> tuple[Path, dict[str, Path], subprocess.Popen]:
    """A store with one run in each state; the live one's owner is returned to be killed by the caller."""
    root = tmp_path / "runs"
    dirs = {name: root / name for name in ("complete", "crashed", "abandoned", "failed-registered", "live")}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("seed: 0\n")
        (d / "blob.bin").write_bytes(b"x" * 1000)
    (dirs["complete"] / "manifest.json").write_text("{}")
    killed = claim_in_child(dirs["crashed"])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    with pytest.raises(RuntimeError):
        with RunClaim(dirs["failed-registered"], "failed-registered", "d" * 64, "toy", "runs"):
            raise RuntimeError("evaluation broke after registering")
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "index.json").write_text(json.dumps({"tasks": {"toy": {"models": {"failed-registered": {
        "run_id": "failed-registered", "source": str(dirs["failed-registered"] / "train" / "student")}}}}}))
    return root, dirs, claim_in_child(dirs["live"])


def test_runs_list_shows_crashed_runs_and_gc_removes_only_what_nobody_needs(tmp_path):
    root, dirs, live = make_runs(tmp_path)
    runner = CliRunner()
    try:
        listed = runner.invoke(app, ["runs", "list", "--store", str(root), "--json"])
        assert listed.exit_code == 0, listed.output
        states = {r["run_id"]: r["state"] for r in json.loads(listed.output)}
        # "complete" has a bare manifest, which list_runs reads as a finished run.
        assert states == {"complete": "complete", "crashed": "crashed", "abandoned": "abandoned",
                          "failed-registered": "failed", "live": "running"}
        table = runner.invoke(app, ["runs", "list", "--store", str(root)])
        assert "crashed" in table.output and "--resume RUN_ID" in table.output

        before = sorted(p.name for p in root.iterdir())
        dry = runner.invoke(app, ["runs", "gc", "--store", str(root), "--registry", str(tmp_path / "registry")])
        assert dry.exit_code == 0, dry.output
        assert sorted(p.name for p in root.iterdir()) == before  # a dry run by default
        assert f"would remove {dirs['crashed']}" in dry.output and f"would remove {dirs['abandoned']}" in dry.output
        assert "2 run(s)" in dry.output and "--yes" in dry.output

        done = runner.invoke(app, ["runs", "gc", "--store", str(root), "--registry", str(tmp_path / "registry"),
                                   "--yes"])
        assert done.exit_code == 0, done.output
        assert sorted(p.name for p in root.iterdir()) == ["complete", "failed-registered", "live"]
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    # Once its owner is gone the last one is garbage too; the registered and complete ones stay.
    assert [r["run_id"] for r in gc_candidates(root, tmp_path / "registry")] == ["live"]


def test_killing_the_parent_leaves_no_child_alive(tmp_path):
    code = textwrap.dedent("""
        import subprocess, sys, time
        from distill.lifeline import start_lifeline, watch
        start_lifeline(poll_s=0.2)
        registered = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        watch(registered.pid)
        # A grandchild, found by the watcher's own look at the process tree.
        subprocess.Popen(["bash", "-c", "sleep 600 & wait"])
        time.sleep(1.0)
        print("ready", flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    children = psutil.Process(parent.pid).children(recursive=True)
    names = [" ".join(c.cmdline()) for c in children]
    assert len(children) >= 4 and any("distill.lifeline" in n for n in names), names  # watcher, 2 children, sleep
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    t0 = time.monotonic()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], [" ".join(c.cmdline()) for c in alive]
    assert time.monotonic() - t0 < 10
