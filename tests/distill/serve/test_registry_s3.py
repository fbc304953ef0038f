"""The registry under s3:// on a real S3-compatible server (moto) on 127.0.0.1: the same operations as a
directory registry, concurrent writers through conditional puts, verified downloads of the models."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from distill_flows.cli import app
from typer.testing import CliRunner

from distill.config import ConfigError, load_config
from distill.serve.registry import Registry
from distill.store import StoreError

# The moto server of the store tests (pytest picks fixtures up by name).
from tests.distill.test_store import BUCKET, s3_client, s3_endpoint  # noqa: F401


@pytest.fixture
def model_dirs(tmp_path):
    out = []
    for i in range(3):
        d = tmp_path / f"student-{i}"
        (d / "onnx").mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"n": i}))
        (d / "model.safetensors").write_bytes(bytes([i]) * 1000)
        (d / "onnx" / "model.onnx").write_bytes(b"onnx" * (i + 1))
        out.append(d)
    return out


@pytest.fixture
def uri(s3_endpoint):
    return f"s3://{BUCKET}/registry-{uuid.uuid4().hex[:8]}"


def test_register_promote_rollback_on_s3(uri, model_dirs, tmp_path, s3_client):
    reg = Registry(uri, cache_dir=tmp_path / "cache-a")
    assert reg.champion("t") is None and reg.list() == []
    e = reg.register("t", "run-1", model_dirs[0], {"student_accuracy": 0.9, "per_label": {}}, {"config_hash": "c"})
    assert e["status"] == "challenger" and e["path"] == f"{uri}/t/run-1" and e["metrics"] == {"student_accuracy": 0.9}
    assert set(e["files"]) == {"config.json", "model.safetensors", "onnx/model.onnx"}
    assert reg.register("t", "run-1", model_dirs[1], {}, {}) == e  # a retried run changes nothing
    reg.promote("t", "run-1", "first model")
    reg.register("t", "run-2", model_dirs[1], {}, {})
    reg.promote("t", "run-2", "better")
    # Another process (no shared disk, its own cache) sees the same index and gets the same files.
    other = Registry(uri, cache_dir=tmp_path / "cache-b")
    champ = other.champion("t")
    assert champ["run_id"] == "run-2" and {x["run_id"]: x["status"] for x in other.list("t")} == {
        "run-1": "retired", "run-2": "champion"}
    local = other.local_dir(champ)
    assert local.is_relative_to(tmp_path / "cache-b")
    for rel in champ["files"]:
        assert (local / rel).read_bytes() == (model_dirs[1] / rel).read_bytes(), rel
    assert other.rollback("t")["run_id"] == "run-1" and reg.champion("t")["run_id"] == "run-1"
    assert [x["action"] for x in reg.events("t")] == ["register", "promote", "register", "promote", "rollback"]
    with pytest.raises(ConfigError, match="no model 'run-9'"):
        reg.promote("t", "run-9", "why not")
    # Nothing was written next to the index but the model copies.
    prefix = uri.split("/", 3)[3] + "/"
    keys = {o["Key"][len(prefix):] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert keys == {"index.json"} | {f"t/run-{i + 1}/{rel}" for i in range(2) for rel in e["files"]}


def test_concurrent_writers_on_s3_lose_nothing(uri, model_dirs, tmp_path):
    # One handle (own boto3 client) per writer, as separate worker processes would have.
    handles = [Registry(uri, cache_dir=tmp_path / f"c{i}") for i in range(8)]
    errors = []

    def register(i):
        try:
            handles[i].register("t", f"run-{i}", model_dirs[i % 3], {}, {})
        except Exception as e:  # pragma: no cover - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = Registry(uri).list("t")
    assert sorted(e["run_id"] for e in entries) == sorted(f"run-{i}" for i in range(8))
    assert sorted(e["seq"] for e in entries) == list(range(1, 9))


def test_a_changed_model_object_is_refused(uri, model_dirs, tmp_path, s3_client):
    reg = Registry(uri, cache_dir=tmp_path / "cache")
    entry = reg.register("t", "run-1", model_dirs[0], {}, {})
    key = uri.split("/", 3)[3] + "/t/run-1/model.safetensors"
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=b"tampered")
    with pytest.raises(StoreError, match="sha256 mismatch"):
        reg.local_dir(entry)
    assert not (tmp_path / "cache" / "t" / "run-1").exists()  # no half-downloaded model under its name


def test_missing_bucket_and_corrupt_index_are_clear_errors(s3_endpoint, s3_client, model_dirs):
    with pytest.raises(StoreError, match="bucket does not exist"):
        Registry("s3://no-such-bucket-here/registry")
    prefix = f"registry-{uuid.uuid4().hex[:8]}"
    s3_client.put_object(Bucket=BUCKET, Key=f"{prefix}/index.json", Body=b"{not json")
    with pytest.raises(ConfigError, match="index.json:1: corrupt"):
        Registry(f"s3://{BUCKET}/{prefix}").list()


def test_cli_and_config_take_an_s3_registry(uri, model_dirs, tmp_path):
    Registry(uri).register("banking77", "run-a", model_dirs[0], {"student_accuracy": 0.91}, {})
    runner = CliRunner()
    r = runner.invoke(app, ["models", "promote", "banking77", "run-a", "--reason", "ok", "--registry", uri + "/"])
    assert r.exit_code == 0 and f"{uri}/banking77/run-a" in r.output, r.output
    (tmp_path / "cfg.yaml").write_text(f"registry: {uri}//\n")
    assert load_config(tmp_path / "cfg.yaml", need_task=False).registry == uri
    r = runner.invoke(app, ["models", "list", "--config", str(tmp_path / "cfg.yaml"), "--json"])
    assert r.exit_code == 0 and [e["status"] for e in json.loads(r.output)] == ["champion"]
    r = runner.invoke(app, ["models", "list", "--registry", "s3://Bad_Bucket/x"])
    assert r.exit_code == 2 and "not a valid S3 bucket name" in r.output
