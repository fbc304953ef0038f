"""The model registry: per task, one champion, challengers, and the promotion history.

It lives in a directory or, shared by every work pool, under `s3://bucket/prefix`:

    index.json                 every model, each task's champion and champion history, an event log
    <task>/<run_id>/           a copy of the registered student directory

A model enters as a challenger. It becomes champion only through `promote`,
which needs a reason (a person's, or the gate's when auto-promotion is on), so a
promotion is never silent; the previous champion is kept and `rollback` brings
it back. Every change to the index is a read-modify-write that cannot lose a
concurrent one: under a file lock in a directory, and in S3 a conditional put
(If-Match on the ETag read, If-None-Match for the first index) that is redone
from a fresh read when another writer got there first. An S3 model is copied in
before its entry is added, each file by the store's atomic put with its sha256
in the entry, and `local_dir` downloads (and verifies) it where a process needs
files on disk.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from distill.config import ConfigError
from distill.data import write_text

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
# Conditional puts lost to another writer before giving up; each retry re-reads the index.
_S3_ATTEMPTS = 50


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_name(kind: str, value: str) -> None:
    # Names become directory names: no separators, no "..".
    if not value or not set(value) <= _SAFE or value.startswith("."):
        raise ConfigError(f"{kind} {value!r}: use letters, digits, '-', '_' and '.' only")


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers kept in the index (per-label tables and plots stay in the run)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _empty_index() -> dict[str, Any]:
    return {"version": 1, "tasks": {}, "events": []}


def _parse_index(text: str, where: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}:{e.lineno}: corrupt registry index ({e.msg})") from None


@contextmanager
def _staged_dir(dest: Path) -> Iterator[Path]:
    """A fresh directory beside `dest` to fill; it replaces `dest` when the block ends without an
    error and is removed when it fails, so a crash never leaves a half-written model at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Registry:
    """A registry directory or s3:// prefix (see module doc). All methods return plain dicts (index entries)."""

    def __init__(self, root: str | Path, client: Any = None, cache_dir: str | Path = ".distill/registry-cache"):
        """Args: root: a directory or s3://bucket/prefix; client: a boto3 S3 client for s3:// (the standard
        AWS environment when None); cache_dir: where `local_dir` puts the models of an s3:// registry."""
        from distill.store import S3Store, open_store

        uri = str(root)
        self.s3: S3Store | None = open_store(uri, client=client) if uri.startswith("s3://") else None  # type: ignore[assignment]
        self.root: str | Path = self.s3.uri if self.s3 else Path(root).expanduser()
        self.index_path = f"{self.s3.uri}/index.json" if self.s3 else Path(self.root) / "index.json"
        self.cache_dir = Path(cache_dir)

    def _update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply `change` to the index and store the result without losing a concurrent change."""
        if self.s3 is None:
            with self._locked() as index:
                return change(index)
        from botocore.exceptions import ClientError

        for attempt in range(_S3_ATTEMPTS):
            index, etag = self._read_s3()
            result = change(index)
            body = json.dumps(index, indent=1, sort_keys=True).encode()
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self.s3.client.put_object(Bucket=self.s3.bucket, Key=self.s3._key("index.json"), Body=body,
                                          ContentType="application/json", **cond)
                return result
            except ClientError as e:
                # 412: another writer changed it since our read; 409: a concurrent conditional write is in flight.
                if str(e.response.get("Error", {}).get("Code")) not in (
                        "PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise self.s3._error(e, str(self.index_path)) from None
            time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
        raise ConfigError(f"registry {self.root}: index.json kept changing under {_S3_ATTEMPTS} attempts to "
                          "update it; try again")

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        import fcntl

        root = Path(self.root)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read()
            yield index
            write_text(Path(self.index_path), json.dumps(index, indent=1, sort_keys=True))

    def _read_s3(self) -> tuple[dict[str, Any], str | None]:
        """(index, its ETag) from S3; an empty index and None when there is none yet."""
        from botocore.exceptions import ClientError

        assert self.s3 is not None
        try:
            obj = self.s3.client.get_object(Bucket=self.s3.bucket, Key=self.s3._key("index.json"))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                return _empty_index(), None
            raise self.s3._error(e, str(self.index_path)) from None
        except Exception as e:
            raise self.s3._error(e, str(self.index_path)) from None
        return _parse_index(obj["Body"].read().decode("utf-8"), str(self.index_path)), obj["ETag"]

    def _read(self) -> dict[str, Any]:
        if self.s3 is not None:
            return self._read_s3()[0]
        path = Path(self.index_path)
        if not path.exists():
            return _empty_index()
        return _parse_index(path.read_text(), str(path))

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
        if self.s3 is None:
            with self._locked() as index:
                t = self._task(index, task, create=True)
                if run_id in t["models"]:
                    return dict(t["models"][run_id])
                path = self._copy_local(task, run_id, model_dir)
                return self._add(index, task, run_id, {"path": path}, model_dir, metrics, lineage)
        known = self._read()["tasks"].get(task, {}).get("models", {})
        if run_id in known:
            return dict(known[run_id])
        files = self._upload(task, run_id, model_dir)
        where = {"path": self.s3.url(f"{task}/{run_id}"), "files": files}
        return self._update(lambda index: self._add(index, task, run_id, where, model_dir, metrics, lineage))

    def _add(self, index: dict[str, Any], task: str, run_id: str, where: dict[str, Any], model_dir: Path,
             metrics: dict, lineage: dict) -> dict:
        t = self._task(index, task, create=True)
        if run_id in t["models"]:  # registered by a concurrent retry since our read
            return dict(t["models"][run_id])
        index["seq"] = index.get("seq", 0) + 1
        entry = {"task": task, "run_id": run_id, "seq": index["seq"], **where, "source": str(model_dir),
                 "status": "challenger", "registered_at": _now(), "promoted_at": None,
                 "metrics": _scalars(metrics), "lineage": lineage}
        t["models"][run_id] = entry
        self._event(index, "register", task, run_id, "registered as challenger")
        return dict(entry)

    def _copy_local(self, task: str, run_id: str, model_dir: Path) -> str:
        dest = Path(self.root) / task / run_id
        with _staged_dir(dest) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        return str(dest.resolve())

    def _upload(self, task: str, run_id: str, model_dir: Path) -> dict[str, str]:
        """Every file of `model_dir` under <task>/<run_id>/ in the S3 registry; {relative path: sha256}."""
        assert self.s3 is not None
        files = {}
        for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            rel = f.relative_to(model_dir).as_posix()
            files[rel] = self.s3.put_file(f, f"{task}/{run_id}/{rel}")["sha256"]
        return files

    def local_dir(self, entry: dict) -> Path:
        """A directory holding the entry's model: its registry copy, or for an s3:// registry a verified
        download under cache_dir (reused while complete: a model in the registry never changes)."""
        if self.s3 is None:
            return Path(entry["path"])
        dest = self.cache_dir / entry["task"] / entry["run_id"]
        done = dest / ".complete"
        if done.is_file():
            return dest
        with _staged_dir(dest) as tmp:
            for rel, sha in entry["files"].items():
                self.s3.get_file(f"{entry['task']}/{entry['run_id']}/{rel}", tmp / rel, sha256=sha)
            (tmp / ".complete").write_text(entry["path"] + "\n")
        return dest

    def _model(self, t: dict[str, Any], task: str, run_id: str) -> dict[str, Any]:
        """The entry of `run_id` in task index `t`; ConfigError naming both when it is not registered."""
        if run_id not in t["models"]:
            raise ConfigError(f"registry {self.root}: task {task!r} has no model {run_id!r}")
        return t["models"][run_id]

    def promote(self, task: str, run_id: str, reason: str) -> dict:
        """Make `run_id` the champion; the current champion is kept for rollback.

        Args:
            task: task name.
            run_id: a registered model of that task.
            reason: why (required: recorded in the event log and the entry).
        """
        if not reason or not reason.strip():
            raise ConfigError("promote: a reason is required (promotion is never silent)")

        def change(index: dict[str, Any]) -> dict:
            t = self._task(index, task)
            self._model(t, task, run_id)
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

        return self._update(change)

    def rollback(self, task: str) -> dict:
        """Bring the previous champion back; the current one is marked rolled_back."""
        def change(index: dict[str, Any]) -> dict:
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

        return self._update(change)

    def stop_canary(self, task: str, run_id: str, reason: str) -> dict:
        """Take challenger `run_id` out of the canary: status "stopped", with the reason in the event log.

        A server routing canary traffic to it re-reads this entry (serve.canary_poll_s) and stops
        routing; `challenger()` no longer returns it, so a restarted server does not pick it up.
        Stopping a model that is not a challenger (already stopped, promoted, retired) changes nothing.
        """
        if not reason or not reason.strip():
            raise ConfigError("stop_canary: a reason is required")

        def change(index: dict[str, Any]) -> dict:
            entry = self._model(self._task(index, task), task, run_id)
            if entry["status"] != "challenger":
                return dict(entry)
            entry.update(status="stopped", stopped_at=_now(), stop_reason=reason.strip())
            self._event(index, "stop_canary", task, run_id, reason.strip())
            return dict(entry)

        return self._update(change)

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
