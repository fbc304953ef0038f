"""Lineage manifest: contents, secret scrubbing, exact reproduce command, diffs."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest

from distill.config import ConfigError, load_config
from distill.manifest import (
    REDACTED,
    build_manifest,
    diff_manifests,
    reproduce_command,
    scrub,
)

SECRET = "sk-live-Zx9SuperSecretValue123"
# A minimal task: every config names its own.
TASK = ["task.name=greetings", "task.train_path=train.csv", "task.labels=[greet, leave]", "task.system_prompt="]


def _build(cfg, tmp_path, run_id="run-1", **kw):
    data = tmp_path / "train.csv"
    if not data.exists():
        data.write_text("text,category\nhello,greet\n")
    args = dict(data_files=[data], flow_run_id="0b1c", spend={"cost_usd": 1.25, "prompt_tokens": 100},
                started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T01:00:00+00:00")
    args.update(kw)
    return build_manifest(cfg, run_id, **args)


def test_manifest_records_lineage(tmp_path):
    cfg = load_config(None, [*TASK, "teacher.model=gpt-4o-mini", "teacher.input_price_per_1m=0.15",
                             "parent_run=banking77-20260101-000000-abcdef"])
    m = _build(cfg, tmp_path, extra={"gate": {"ship": False}})
    assert m["config_hash"] == cfg.digest()
    assert m["config"]["teacher"]["model"] == "gpt-4o-mini"
    assert m["data_hashes"] == {str(tmp_path / "train.csv"):
                                hashlib.sha256((tmp_path / "train.csv").read_bytes()).hexdigest()}
    assert m["teacher"]["model"] == "gpt-4o-mini" and m["teacher"]["prices"]["input_per_1m"] == 0.15
    assert m["spend"]["cost_usd"] == 1.25 and m["flow_run_id"] == "0b1c"
    assert m["parent_run"] == "banking77-20260101-000000-abcdef"
    assert m["packages"]["distill"] and m["packages"]["torch"] and m["packages"]["prefect"]
    assert m["git"] is None or (len(m["git"]["revision"]) == 40 and isinstance(m["git"]["dirty"], bool))
    assert m["gate"] == {"ship": False}
    assert m["reproduce"].startswith("distill run /dev/null ")
    json.dumps(m)  # the manifest is plain JSON


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.csv: data file not found"):
        _build(load_config(None, TASK), tmp_path, data_files=[tmp_path / "nope.csv"])


def test_no_secret_reaches_the_manifest(tmp_path):
    cfg = load_config(None, [*TASK, f"teacher.base_url=https://user:{SECRET}@llm.example.com/v1?api_key={SECRET}",
                             "teacher.api_key_env=TEAM_OPENAI_KEY", "teacher.api_key_secret_block=openai-prod"])
    m = _build(cfg, tmp_path, extra={"registry": {"client_secret": SECRET, "token_env": "HF_TOKEN"}})
    blob = json.dumps(m)
    assert SECRET not in blob
    assert m["teacher"]["base_url"] == "https://***@llm.example.com/v1?api_key=***"
    assert m["config"]["teacher"]["api_key_env"] == "TEAM_OPENAI_KEY"  # a name, not a key: kept
    assert m["config"]["teacher"]["api_key_secret_block"] == "openai-prod"
    assert m["registry"] == {"client_secret": REDACTED, "token_env": "HF_TOKEN"}


@pytest.mark.parametrize("name, value, kept", [
    ("api_key_env", "OPENAI_API_KEY", True),
    ("api_key", SECRET, False),
    ("password", "hunter2", False),
    ("api_key_secret_block", "openai-prod", True),
    ("api_key_secret_block", "sk-abcdef", False),
    ("label_key", "label", True),       # a JSON field name, not a credential
    ("max_tokens", 64, True),
    ("log_url", "postgresql://app:pw@db:5432/logs", False),
])
def test_scrub(name, value, kept):
    assert (scrub({name: value})[name] == value) is kept


def test_reproduce_command_rebuilds_the_exact_config(tmp_path):
    cfg = load_config(None, [
        "task.name=yesno", "train.epochs=1", "train.learning_rate=0.00002", "generation.concurrency=64",
        f"task.train_path={tmp_path / 'my data' / 'train.csv'}", "task.system_prompt='Answer: true or null?'",
        "task.labels=['yes', 'no', 'true']", "store=s3://distill-runs/team", "parent_run=run-0",
        "filter.heuristics.json_schema={type: object, required: [label]}", "task.max_rows=500",
        "gate.max_p95_ms=null", "serve.canary_fraction=0.1",
    ])
    cmd = reproduce_command(_build(cfg, tmp_path))
    argv = shlex.split(cmd)
    assert argv[:3] == ["distill", "run", "/dev/null"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert len(sets) == 13, sets
    rebuilt = load_config("/dev/null", sets)
    assert rebuilt.digest() == cfg.digest()
    # A base preset is honoured as given.
    assert reproduce_command({"config": cfg.model_dump(mode="json")}, config_file="my preset.yaml").startswith(
        "distill run 'my preset.yaml' --set ")


def test_reproduce_of_defaults_has_only_the_task():
    cfg = load_config(None, TASK)
    argv = shlex.split(reproduce_command({"config": cfg.model_dump(mode="json")}))
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert argv[:3] == ["distill", "run", "/dev/null"] and len(argv) == 3 + 2 * len(TASK)
    assert sorted(s.split("=", 1)[0] for s in sets) == sorted(t.split("=", 1)[0] for t in TASK)
    assert load_config("/dev/null", sets).digest() == cfg.digest()


def test_reproduce_keeps_the_train_mode():
    cfg = load_config(None, [*TASK, "task.kind=generation", "task.labels=null", "train.mode=sft",
                             "train.student_model=/models/lm", "train.packing=false"])
    cmd = reproduce_command({"config": cfg.model_dump(mode="json")})
    argv = shlex.split(cmd)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert "train.mode=sft" in sets and "train.packing=false" in sets
    assert load_config("/dev/null", sets).digest() == cfg.digest()


def test_diff_manifests(tmp_path):
    a = _build(load_config(None, [*TASK, "train.epochs=3"]), tmp_path, "run-a", extra={"gate": {"ship": True},
                                                                              "metrics": {"student_accuracy": 0.9,
                                                                                          "ece": 0.03}})
    (tmp_path / "train.csv").write_text("text,category\nhello,greet\nbye,leave\n")
    b = _build(load_config(None, [*TASK, "train.epochs=1"]), tmp_path, "run-b", extra={"gate": {"ship": False},
                                                                              "metrics": {"student_accuracy": 0.85,
                                                                                          "ece": 0.03}})
    d = diff_manifests(a, b)
    assert d["runs"] == ["run-a", "run-b"] and d["config_hash_equal"] is False
    assert d["config"] == {"train.epochs": {"a": 3.0, "b": 1.0}}
    assert list(d["data"]) == [str(tmp_path / "train.csv")]
    assert d["metrics"]["student_accuracy"]["delta"] == pytest.approx(-0.05)
    assert d["metrics"]["ece"] == {"a": 0.03, "b": 0.03, "delta": 0.0}
    assert d["gate"] == {"a": True, "b": False}

    same = diff_manifests(a, a)
    assert same["config_hash_equal"] and not same["config"] and not same["data"] and not same["gate"]
