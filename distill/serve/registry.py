"""The local model registry: per task, one champion, challengers, and the promotion history.

Layout of the registry directory:

    index.json                 every model, each task's champion and champion history, an event log
    <task>/<run_id>/           a copy of the registered student directory

A model enters as a challenger. It becomes champion only through `promote`,
which needs a reason (a person's, or the gate's when auto-promotion is on), so a
promotion is never silent; the previous champion is kept and `rollback` brings
it back. Every change to the index is made under a file lock and written
atomically, so two runs registering at once cannot lose each other's entry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from distill.config import ConfigError
from distill.data import write_text

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_name(kind: str, value: str) -> None:
    # Names become directory names: no separators, no "..".
    if not value or not set(value) <= _SAFE or value.startswith("."):
        raise ConfigError(f"{kind} {value!r}: use letters, digits, '-', '_' and '.' only")


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers kept in the index (per-label tables and plots stay in the run)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


class Registry:
    """A registry directory (see module doc). All methods return plain dicts (index entries)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index_path = self.root / "index.json"

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read()
            yield index
            write_text(self.index_path, json.dumps(index, indent=1, sort_keys=True))

    def _read(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"version": 1, "tasks": {}, "events": []}
        try:
            return json.loads(self.index_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.index_path}:{e.lineno}: corrupt registry index ({e.msg})") from None

    def _task(self, index: dict[str, Any], task: str, create: bool = False) -> dict[str, Any]:
        if task not in index["tasks"]:
            if not create:
                raise ConfigError(f"registry {self.root}: no models registered for task {task!r}")
            index["tasks"][task] = {"champion": None, "history": [], "models": {}}
        return index["tasks"][task]

    def _event(self, index: dict[str, Any], action: str, task: str, run_id: str | None, reason: str) -> None:
        index["events"].append({"at": _now(), "action": action, "task": task, "run_id": run_id, "reason": reason})

    def register(self, task: str, run_id: str, model_dir: str | Path, metrics: dict, lineage: dict) -> dict:
        """Copy `model_dir` into the registry and add it as a challenger.

        Registering the same run again (a retried flow) returns the existing entry unchanged.
        """
        _check_name("task", task)
        _check_name("run id", run_id)
        model_dir = Path(model_dir)
        if not ((model_dir / "config.json").exists() or (model_dir / "adapter_config.json").exists()):
            raise ConfigError(f"{model_dir}: not a model directory (no config.json or adapter_config.json)")
        with self._locked() as index:
            t = self._task(index, task, create=True)
            if run_id in t["models"]:
                return dict(t["models"][run_id])
            dest = self.root / task / run_id
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Copy beside the destination, then rename: a crash never leaves a half-copied model.
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{run_id}."))
            try:
                shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
                if dest.exists():
                    shutil.rmtree(dest)
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            index["seq"] = index.get("seq", 0) + 1
            entry = {"task": task, "run_id": run_id, "seq": index["seq"], "path": str(dest.resolve()),
                     "source": str(model_dir),
                     "status": "challenger", "registered_at": _now(), "promoted_at": None,
                     "metrics": _scalars(metrics), "lineage": lineage}
            t["models"][run_id] = entry
            self._event(index, "register", task, run_id, "registered as challenger")
            return dict(entry)

    def promote(self, task: str, run_id: str, reason: str) -> dict:
        """Make `run_id` the champion; the current champion is kept for rollback.

        Args:
            task: task name.
            run_id: a registered model of that task.
            reason: why (required: recorded in the event log and the entry).
        """
        if not reason or not reason.strip():
            raise ConfigError("promote: a reason is required (promotion is never silent)")
        with self._locked() as index:
            t = self._task(index, task)
            if run_id not in t["models"]:
                raise ConfigError(f"registry {self.root}: task {task!r} has no model {run_id!r}")
            if t["champion"] == run_id:
                return dict(t["models"][run_id])
            if t["champion"]:
                t["models"][t["champion"]]["status"] = "retired"
                t["history"].append(t["champion"])
            t["champion"] = run_id
            entry = t["models"][run_id]
            entry.update(status="champion", promoted_at=_now(), promotion_reason=reason.strip())
            self._event(index, "promote", task, run_id, reason.strip())
            return dict(entry)

    def rollback(self, task: str) -> dict:
        """Bring the previous champion back; the current one is marked rolled_back."""
        with self._locked() as index:
            t = self._task(index, task)
            if not t["history"]:
                raise ConfigError(f"registry {self.root}: task {task!r} has no previous champion to roll back to")
            previous = t["history"].pop()
            if t["champion"]:
                t["models"][t["champion"]]["status"] = "rolled_back"
            rolled = t["champion"]
            t["champion"] = previous
            entry = t["models"][previous]
            entry.update(status="champion", promoted_at=_now(), promotion_reason=f"rollback from {rolled}")
            self._event(index, "rollback", task, previous, f"rolled back from {rolled}")
            return dict(entry)

    def stop_canary(self, task: str, run_id: str, reason: str) -> dict:
        """Take challenger `run_id` out of the canary: status "stopped", with the reason in the event log.

        A server routing canary traffic to it re-reads this entry (serve.canary_poll_s) and stops
        routing; `challenger()` no longer returns it, so a restarted server does not pick it up.
        Stopping a model that is not a challenger (already stopped, promoted, retired) changes nothing.
        """
        if not reason or not reason.strip():
            raise ConfigError("stop_canary: a reason is required")
        with self._locked() as index:
            t = self._task(index, task)
            if run_id not in t["models"]:
                raise ConfigError(f"registry {self.root}: task {task!r} has no model {run_id!r}")
            entry = t["models"][run_id]
            if entry["status"] != "challenger":
                return dict(entry)
            entry.update(status="stopped", stopped_at=_now(), stop_reason=reason.strip())
            self._event(index, "stop_canary", task, run_id, reason.strip())
            return dict(entry)

    def status(self, task: str, run_id: str) -> str | None:
        """The status of one model ("champion", "challenger", "stopped", ...), None when it is not registered."""
        entry = (self._read()["tasks"].get(task) or {}).get("models", {}).get(run_id)
        return entry["status"] if entry else None

    def champion(self, task: str) -> dict | None:
        """The current champion's entry, or None."""
        t = self._read()["tasks"].get(task)
        if not t or not t["champion"]:
            return None
        return dict(t["models"][t["champion"]])

    def challenger(self, task: str) -> dict | None:
        """The most recently registered model that is still a challenger, or None."""
        waiting = [e for e in self.list(task) if e["status"] == "challenger"]
        return waiting[-1] if waiting else None

    def list(self, task: str | None = None) -> list[dict]:
        """Entries of one task (or all), oldest registration first."""
        tasks = self._read()["tasks"]
        names = [task] if task else sorted(tasks)
        out = [dict(e) for n in names if n in tasks for e in tasks[n]["models"].values()]
        return sorted(out, key=lambda e: e["seq"])

    def events(self, task: str | None = None) -> list[dict]:
        """The audit log: every register, promote, rollback and canary stop, in order."""
        return [e for e in self._read()["events"] if task is None or e["task"] == task]
