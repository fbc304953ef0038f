"""Run directories while they are being made: who owns one, whether its owner is still alive,
which one a rerun resumes, and which ones `distill runs gc` may remove.

A run in progress holds CLAIM_FILE in its directory: the owner's host, pid and process start
time, the config digest, the store, the Prefect flow run, a heartbeat refreshed every
HEARTBEAT_S by a thread, and a state. The owner writes how the run ended when it still can
(failed, interrupted); a claim still "running" whose process is gone is a crash. The claim is
local bookkeeping, never an artifact: its name is a temporary one (distill.store.is_temp_name),
so it is never published or listed. manifest.json, written last, marks a run complete.

States: complete, running, crashed, interrupted (Ctrl-C or SIGTERM), failed (an error the run
reported), abandoned (neither a claim nor a manifest: a run from before claims, or one killed
before it could write its claim).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.config import ConfigError, check_safe_name
from distill.data import write_text

CLAIM_FILE = ".claim.tmp"
# Held (flock) by the owner for the whole attempt: two processes picking up the same crashed run at
# once cannot both have it. The kernel drops the lock when its holder dies.
LOCK_FILE = ".lock.tmp"
HEARTBEAT_S = 10.0
# A claim from another host (a shared store) is taken for crashed once its heartbeat is this old;
# on this host the owner's pid and start time decide at once.
STALE_S = 120.0
# What a run started without --fresh picks up by itself; --resume RUN_ID also takes failed and abandoned runs.
AUTO_RESUMABLE = ("crashed", "interrupted")
RESUMABLE = ("crashed", "interrupted", "failed", "abandoned")
# Never removed by gc: a finished run, or one whose owner is alive.
KEPT = ("complete", "running")


def runs_root(store: str) -> Path:
    """Where the runs of `store` are assembled, crashed ones included: the store itself when it is a
    directory, the local staging folder for s3:// (runs are uploaded when they finish)."""
    store = str(store).strip()
    return Path(".distill/staging") if store.startswith("s3://") else Path(store).expanduser()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_start(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return None


def read_claim(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CLAIM_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A claim is written atomically, so this is someone else's file: treat the owner as unknown.
        return {"state": "running", "host": "?", "heartbeat_at": None}


def owner_alive(claim: dict[str, Any]) -> bool:
    """Whether the process that wrote `claim` still runs (same pid and start time on this host; a fresh
    heartbeat for another host)."""
    if claim.get("host") == socket.gethostname() and claim.get("pid"):
        start = process_start(int(claim["pid"]))
        return start is not None and abs(start - float(claim.get("pid_start") or 0)) < 1.0
    beat = claim.get("heartbeat_at")
    if not beat:
        return False
    return time.time() - datetime.fromisoformat(beat).timestamp() < STALE_S


def run_state(run_dir: str | Path) -> str:
    """complete, running, crashed, interrupted, failed or abandoned (see the module docstring)."""
    run_dir = Path(run_dir)
    if (run_dir / "manifest.json").is_file():
        return "complete"
    claim = read_claim(run_dir)
    if claim is None:
        return "abandoned"
    if claim.get("state") == "running":
        return "running" if owner_alive(claim) else "crashed"
    return str(claim.get("state"))


def last_checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the newest complete training checkpoint under run_dir/train/checkpoints, or None."""
    from distill.train.trainer import last_checkpoint

    found = last_checkpoint(Path(run_dir) / "train" / "checkpoints")
    return int(Path(found).name.split("-")[-1]) if found else None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def describe_run(run_dir: Path) -> dict[str, Any]:
    """One run directory as runs list shows it: id, state, owner, digest, last checkpoint step."""
    claim = read_claim(run_dir) or {}
    return {"run_id": run_dir.name, "run_dir": str(run_dir), "state": run_state(run_dir),
            "started_at": claim.get("started_at"), "heartbeat_at": claim.get("heartbeat_at"),
            "task": claim.get("task"), "pid": claim.get("pid"), "host": claim.get("host"),
            "config_digest": claim.get("config_digest"), "store": claim.get("store"),
            "flow_run_id": claim.get("flow_run_id"), "error": claim.get("error"),
            "checkpoint_step": last_checkpoint_step(run_dir)}


def run_dirs(root: str | Path) -> list[Path]:
    """The run directories directly under `root` (a folder with a claim, a config.yaml or a manifest)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and any(
        (p / name).is_file() for name in (CLAIM_FILE, "config.yaml", "manifest.json")))


def incomplete_runs(root: str | Path, store: str | None = None) -> list[dict[str, Any]]:
    """describe_run of every run under `root` that is not complete; only those claimed for `store`
    when given (a staging folder holds the runs of every S3 store)."""
    out = []
    for d in run_dirs(root):
        info = describe_run(d)
        if info["state"] != "complete" and (store is None or str(info["store"] or store).rstrip("/") ==
                                            store.rstrip("/")):
            out.append(info)
    return out


def find_resumable(root: str | Path, config_digest: str, states: tuple[str, ...] = AUTO_RESUMABLE
                   ) -> dict[str, Any] | None:
    """The most recently started run under `root` of this config digest in one of `states`, or None."""
    found = [r for r in incomplete_runs(root) if r["config_digest"] == config_digest and r["state"] in states]
    found.sort(key=lambda r: (r["started_at"] or "", r["run_id"]))
    return found[-1] if found else None


def check_resumable(root: Path, run_id: str, config_digest: str) -> dict[str, Any]:
    """describe_run of run `run_id` under `root` when this config may resume it; else ConfigError saying why not."""
    try:
        check_safe_name(run_id)
    except ValueError as e:
        raise ConfigError(f"--resume: {e}") from None
    run_dir = Path(root) / run_id
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir.name}: no run directory {run_dir}")
    info = describe_run(run_dir)
    if info["state"] not in RESUMABLE:
        raise ConfigError(f"--resume {run_dir.name}: the run is {info['state']}"
                          + (f" (pid {info['pid']} on {info['host']})" if info["state"] == "running" else "")
                          + "; only a crashed, interrupted, failed or abandoned run is resumed")
    digest = info["config_digest"]
    if digest is None and (run_dir / "config.yaml").is_file():
        from distill.config import load_config

        digest = load_config(run_dir / "config.yaml").digest()
    if digest != config_digest:
        raise ConfigError(f"--resume {run_dir.name}: that run was made with config {str(digest)[:12]}, this "
                          f"config is {config_digest[:12]}; resume with the same config and --set values, or "
                          "start a new run with --fresh")
    return info


class RunClaim:
    """Ownership of a run directory for the life of one attempt; a context manager.

    Entering writes the claim ("running") and starts the heartbeat; leaving stops it and records the
    outcome: the claim is removed on success (the manifest marks the run complete), set to
    "interrupted" on KeyboardInterrupt/SystemExit, and to "failed" with the error on any other exception.
    A SIGKILL leaves it "running" with a dead owner, which every reader sees as crashed.
    """

    def __init__(self, run_dir: str | Path, run_id: str, config_digest: str, task: str, store: str,
                 flow_run_id: str | None = None, resumed_from: str | None = None):
        self.path = Path(run_dir) / CLAIM_FILE
        previous = read_claim(run_dir) or {}
        self.data: dict[str, Any] = {
            "run_id": run_id, "state": "running", "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": process_start(os.getpid()), "config_digest": config_digest, "task": task,
            "store": store, "flow_run_id": flow_run_id, "started_at": previous.get("started_at") or _now(),
            "attempt_started_at": _now(), "heartbeat_at": _now(), "attempts": int(previous.get("attempts", 0)) + 1,
            "resumed_from": resumed_from, "error": None,
            # Flow runs of earlier attempts, so the next run can mark them crashed in Prefect.
            "flow_runs": [*previous.get("flow_runs", []), *([flow_run_id] if flow_run_id else [])],
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock: Any = None

    def _write(self) -> None:
        write_text(self.path, json.dumps(self.data, indent=1))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.data["heartbeat_at"] = _now()
            try:
                self._write()
            except OSError:
                pass  # a full disk must not kill the run from a side thread; the next beat tries again

    def __enter__(self) -> "RunClaim":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.parent / LOCK_FILE, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ConfigError(f"run {self.data['run_id']}: another process is running or resuming it "
                              f"({self.path.parent})") from None
        self._write()
        self._thread = threading.Thread(target=self._beat, name="distill-run-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._record(exc_type, exc)
        finally:
            self._lock.close()

    def _record(self, exc_type, exc) -> None:
        if exc_type is None:
            self.path.unlink(missing_ok=True)
            return
        interrupted = issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        self.data.update(state="interrupted" if interrupted else "failed", ended_at=_now(), heartbeat_at=_now(),
                         error=None if interrupted else f"{exc_type.__name__}: {exc}"[:2000])
        if self.path.parent.is_dir():
            self._write()


def registry_references(registry: str | Path) -> set[str]:
    """Run ids and source directories (resolved) that the registry at `registry` points to."""
    if str(registry).startswith("s3://"):
        from distill.serve.registry import Registry

        entries = Registry(str(registry)).list()
        return {e["run_id"] for e in entries} | {str(Path(e["source"]).resolve()) for e in entries if e.get("source")}
    index = Path(registry).expanduser() / "index.json"
    if not index.is_file():
        return set()
    try:
        tasks = json.loads(index.read_text()).get("tasks", {})
    except json.JSONDecodeError as e:
        raise ConfigError(f"{index}:{e.lineno}: corrupt registry index ({e.msg}); gc removes nothing") from None
    refs: set[str] = set()
    for t in tasks.values():
        for run_id, entry in t.get("models", {}).items():
            refs.add(run_id)
            if entry.get("source"):
                refs.add(str(Path(entry["source"]).resolve()))
    return refs


def gc_candidates(root: str | Path, registry: str | Path, store: str | None = None) -> list[dict[str, Any]]:
    """Incomplete runs under `root` (of `store` only, when given) that no process owns and the registry
    does not point to, each with its size in "bytes"."""
    refs = registry_references(registry)
    out = []
    for info in incomplete_runs(root, store=store):
        run_dir = Path(info["run_dir"]).resolve()
        if info["state"] in KEPT or info["run_id"] in refs or \
                any(r.startswith(str(run_dir) + os.sep) or r == str(run_dir) for r in refs):
            continue
        out.append({**info, "bytes": dir_bytes(run_dir)})
    return out


def remove_run(run_dir: str | Path) -> None:
    """Delete a run directory that is not complete and not owned by a live process (checked again here)."""
    import fcntl

    run_dir = Path(run_dir)
    state = run_state(run_dir)
    if state in KEPT:
        raise ConfigError(f"{run_dir}: the run is {state}; not removed")
    with open(run_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{run_dir}: a process holds the run; not removed") from None
    # Renamed first, so a half-deleted folder never passes for a run.
    doomed = run_dir.with_name(f".{run_dir.name}.removing.tmp")
    run_dir.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
