"""Lineage manifest of a run: what went in, what came out, and how to do it again.

`build_manifest` records the effective config and its hash, the sha256 of every
input data file, the teacher endpoint, model and prices (never its key), the spend,
package versions, the git revision, the Prefect flow run id and the parent run.
`distill.store.publish_run` adds the artifacts and writes it as `manifest.json`.
"""

from __future__ import annotations

import json
import platform
import re
import shlex
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from distill.config import ConfigError, DistillConfig, default_values
from distill.store import file_sha256

SCHEMA_VERSION = 1
PACKAGES = ("distill", "torch", "transformers", "tokenizers", "safetensors", "peft", "trl", "accelerate",
            "prefect", "openai", "pydantic", "numpy", "scikit-learn", "datasketch", "boto3")
REDACTED = "***"

_SECRET_NAME = re.compile(r"(^|_)(api_?key|key|secret|token|password|passwd|credentials?)s?(_|$)", re.I)
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Field names that match the secret pattern but never hold a credential.
_NOT_SECRET = {"label_key"}  # the JSON field of a structured answer that holds the label


def _scrub_url(value: str) -> str:
    """A URL without user:password and without credential-like query parameters."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(_SECRET_NAME.search(k) for k, _ in pairs)
    if "@" not in parts.netloc and not secret_query:
        return value  # untouched: re-assembling would normalise it (sqlite:/// loses a slash)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if secret_query:
        query = urlencode([(k, REDACTED if _SECRET_NAME.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret_value_allowed(name: str, value: str) -> bool:
    """Whether a string under a secret-sounding field is only a reference to where the secret lives."""
    if _ENV_NAME.match(value):
        return True
    # Prefect block names are lowercase slugs; an API key never is (and "sk-..." is refused outright).
    return name.endswith("_block") and bool(_BLOCK_NAME.match(value)) and not value.startswith("sk-")


def scrub(value: Any, name: str = "") -> Any:
    """A copy of `value` with secret-looking strings replaced by "***".

    A string is replaced when its field name mentions a key/secret/token/password and the
    value is not merely the name of an environment variable (or Prefect block) holding it.
    URLs lose embedded credentials wherever they appear.
    """
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, name) for v in value]
    if isinstance(value, str):
        if name not in _NOT_SECRET and _SECRET_NAME.search(name) and not _secret_value_allowed(name, value):
            return REDACTED
        return _scrub_url(value)
    return value


def sha256_file(path: str | Path) -> str:

    return file_sha256(path)[0]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path: str | Path | None = None) -> dict[str, Any] | None:
    """{"revision", "dirty"} of the git checkout holding `path` (distill's own source by default),
    else of the working directory; None outside any checkout."""
    candidates = [Path(path)] if path else [Path(__file__).resolve().parent, Path.cwd()]
    for where in candidates:
        try:
            rev = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
            if rev.returncode != 0:
                continue
            # --no-optional-locks: a read-only query must never take the index lock from a concurrent commit.
            status = subprocess.run(["git", "--no-optional-locks", "-C", str(where), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0
                else None}
    return None


def build_manifest(config: DistillConfig, run_id: str, *, data_files: list[str | Path], flow_run_id: str | None,
                   spend: dict | None, started_at: str, finished_at: str | None,
                   extra: dict | None = None) -> dict:
    """The lineage record of one run (artifacts are added by `distill.store.publish_run`).

    Args:
        config: the effective config of the run.
        run_id: the run's folder name.
        data_files: input files to hash (train/test/labels...); a missing one is a ConfigError.
        flow_run_id: the Prefect flow run id, if any.
        spend: teacher usage and cost, e.g. {"cost_usd", "prompt_tokens", ...}.
        started_at / finished_at: ISO timestamps.
        extra: more top-level fields (e.g. "metrics", "gate", "registry"); secret-looking values are scrubbed.
    """
    data_hashes = {}
    for p in data_files:
        if not Path(p).is_file():
            raise ConfigError(f"{p}: data file not found (hashing inputs for the manifest of run {run_id})")
        data_hashes[str(p)] = sha256_file(p)
    teacher = config.teacher
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "task": {"name": config.task.name, "kind": config.task.kind},
        "started_at": started_at,
        "finished_at": finished_at,
        "config": scrub(config.model_dump(mode="json")),
        "config_hash": config.digest(),
        "data_hashes": data_hashes,
        "teacher": {"base_url": _scrub_url(teacher.base_url), "model": teacher.model,
                    "api_key_env": scrub(teacher.api_key_env, "api_key_env"),
                    "prices": {"input_per_1m": teacher.input_price_per_1m,
                               "output_per_1m": teacher.output_price_per_1m}},
        "spend": dict(spend or {}),
        "packages": package_versions(),
        "git": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "flow_run_id": flow_run_id or None,
        "parent_run": config.parent_run,
    }
    for k, v in scrub(dict(extra or {})).items():
        if k in manifest:
            raise ValueError(f"build_manifest: extra field {k!r} would overwrite a lineage field")
        manifest[k] = v
    manifest["reproduce"] = reproduce_command(manifest)
    return manifest


def _flatten(value: Any, default: Any = None, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of a nested dict; recursion follows `default` so free-form dict fields stay whole."""
    if isinstance(value, dict) and (not prefix or isinstance(default, dict)):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, (default or {}).get(k) if isinstance(default, dict) else None,
                                f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _override_value(value: Any) -> str:
    """A --set value that `parse_overrides` (YAML scalars) reads back as exactly `value`."""
    import yaml

    if isinstance(value, str):
        try:
            if value and yaml.safe_load(value) == value and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        text = repr(value)
        # YAML 1.1 (PyYAML) reads "1e-05" as a string: its floats need a dot and a signed exponent.
        if "e" in text and "." not in text.split("e")[0]:
            text = text.replace("e", ".0e", 1)
        return text
    if isinstance(value, float):
        return ".nan" if value != value else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)  # JSON is YAML: quoted strings, null, true, lists and mappings read back unchanged


def reproduce_command(manifest: dict, config_file: str | None = None) -> str:
    """The `distill run` command that reproduces the run's configuration.

    Args:
        manifest: a manifest from `build_manifest` (or manifest.json).
        config_file: base YAML for the command; every field that differs from the built-in
            defaults is passed as --set, so the empty default base (/dev/null) is exact.
    Fields redacted as secrets are left out (their defaults, or the user's environment, apply).
    """
    mode = ((manifest.get("config") or {}).get("train") or {}).get("mode", "classifier_kd")
    defaults = default_values(mode)
    want = _flatten(manifest.get("config") or {}, defaults)
    have = _flatten(defaults, defaults)
    sets = []
    for key, value in want.items():
        if value == REDACTED or (key in have and have[key] == value):
            continue
        sets.append(f"--set {shlex.quote(f'{key}={_override_value(value)}')}")
    base = config_file or manifest.get("config_file") or "/dev/null"
    return " ".join(["distill", "run", shlex.quote(str(base))] + sets)


def _pairs(a: dict, b: dict) -> dict[str, dict[str, Any]]:
    return {k: {"a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _numeric_leaves(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in _flatten(metrics, metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def diff_manifests(a: dict, b: dict) -> dict:
    """What changed from run `a` to run `b`.

    Returns {"runs": [id_a, id_b], "config": {field: {"a","b"}}, "data": {path: {"a","b"}},
    "teacher": {...}, "spend": {...}, "packages": {...}, "git": {...},
    "metrics": {name: {"a","b","delta"}}, "gate": {"a","b"} or {}}; unchanged entries are left out,
    except metrics, which are all listed (a comparison wants the unchanged ones too).
    """
    cfg_a, cfg_b = a.get("config") or {}, b.get("config") or {}
    metrics_a, metrics_b = _numeric_leaves(a.get("metrics")), _numeric_leaves(b.get("metrics"))
    metrics = {}
    for k in sorted(set(metrics_a) | set(metrics_b)):
        va, vb = metrics_a.get(k), metrics_b.get(k)
        metrics[k] = {"a": va, "b": vb, "delta": (vb - va) if va is not None and vb is not None else None}
    ship_a = (a.get("gate") or {}).get("ship")
    ship_b = (b.get("gate") or {}).get("ship")
    return {
        "runs": [a.get("run_id"), b.get("run_id")],
        "config_hash_equal": a.get("config_hash") == b.get("config_hash"),
        "config": _pairs(_flatten(cfg_a, cfg_a | cfg_b), _flatten(cfg_b, cfg_a | cfg_b)),
        "data": _pairs(a.get("data_hashes") or {}, b.get("data_hashes") or {}),
        "teacher": _pairs(_flatten(a.get("teacher") or {}, a.get("teacher") or {}),
                          _flatten(b.get("teacher") or {}, b.get("teacher") or {})),
        "spend": _pairs(_numeric_leaves(a.get("spend")), _numeric_leaves(b.get("spend"))),
        "packages": _pairs(a.get("packages") or {}, b.get("packages") or {}),
        "git": _pairs(a.get("git") or {}, b.get("git") or {}),
        "metrics": metrics,
        "gate": {"a": ship_a, "b": ship_b} if ship_a != ship_b else {},
    }
