"""The run store against a real directory and a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill.config import ConfigError, load_config
from distill.httpserver import free_port
from distill.manifest import build_manifest
from distill.store import (
    LocalStore,
    S3Store,
    StoreError,
    list_runs,
    open_store,
    publish_run,
    read_manifest,
    verify_run,
)

BUCKET = "distill-runs"
# A minimal task: every config names its own.
TASK = ["task.name=greetings", "task.train_path=train.csv", "task.labels=[greet]", "task.system_prompt="]


@pytest.fixture(scope="module")
def s3_endpoint():
    """One moto S3 server for the module; boto3 finds it through the standard AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield url
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    request.getfixturevalue("s3_endpoint")
    # A fresh prefix per test keeps tests independent on the shared bucket.
    return open_store(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}")


class FaultyClient:
    """The real boto3 client, except that one operation raises: a crash at that point of a write."""

    def __init__(self, client, fail: str):
        self._client, self._fail, self.calls = client, fail, []

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == self._fail:
                raise OSError(f"simulated crash in {name}")
            return attr(*args, **kwargs)

        return call


def test_round_trip(store, tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(3000))
    put = store.put_file(src, "run-1/student/model.safetensors")
    assert put["bytes"] == 3000 and len(put["sha256"]) == 64
    assert store.put_bytes(b'{"a": 1}\n', "run-1/metrics.json")["bytes"] == 9

    assert store.get_bytes("run-1/student/model.safetensors", sha256=put["sha256"]) == src.read_bytes()
    assert store.exists("run-1/metrics.json") and not store.exists("run-1/nothing.json")
    assert store.list() == ["run-1/metrics.json", "run-1/student/model.safetensors"]
    assert store.list("run-1/student/") == ["run-1/student/model.safetensors"]
    assert store.digest("run-1/student/model.safetensors") == (put["sha256"], 3000)
    out = store.get_file("run-1/student/model.safetensors", tmp_path / "back" / "m.bin", sha256=put["sha256"])
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.get_file("run-1/student/model.safetensors", tmp_path / "back" / "bad.bin", sha256="0" * 64)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["m.bin"]  # nothing half-written left
    assert store.url("run-1/metrics.json").endswith("run-1/metrics.json")
    with pytest.raises(StoreError, match="not found"):
        store.get_bytes("run-1/nothing.json")
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_bytes(b"x", "../escape")


def test_overwrite_replaces_whole_object(store):
    store.put_bytes(b"old content", "r/a.txt")
    store.put_bytes(b"new, longer content", "r/a.txt")
    # The recorded checksum follows the new content, so a plain read still verifies.
    assert store.get_bytes("r/a.txt") == b"new, longer content"
    assert store.list("r/") == ["r/a.txt"]


def test_crash_during_local_write_keeps_old_file(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    store.put_bytes(b"old", "r/a.txt")

    def full_disk(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.put_bytes(b"new content never completed", "r/a.txt")
    monkeypatch.undo()
    assert store.get_bytes("r/a.txt") == b"old"
    assert sorted(p.name for p in (tmp_path / "store" / "r").iterdir()) == ["a.txt"]


def test_crash_before_s3_promote_keeps_old_object(s3_client, tmp_path):
    good = S3Store(BUCKET, "crash", client=s3_client)
    good.put_bytes(b"old", "r/a.txt")
    faulty = S3Store(BUCKET, "crash", client=FaultyClient(s3_client, fail="copy"))
    src = tmp_path / "a.txt"
    src.write_bytes(b"new content")
    with pytest.raises(StoreError, match="simulated crash"):
        faulty.put_file(src, "r/a.txt")
    assert good.get_bytes("r/a.txt") == b"old"
    # The half-done temporary object was cleaned up, and would be invisible to list() anyway.
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix="crash/").get("Contents", [])]
    assert keys == ["crash/r/a.txt"]


def test_checksum_mismatch_detected_s3(s3_client):
    store = S3Store(BUCKET, "tamper", client=s3_client)
    put = store.put_bytes(b"weights v1", "r/model.bin")
    # Replaced behind the store's back, keeping the old checksum metadata.
    s3_client.put_object(Bucket=BUCKET, Key="tamper/r/model.bin", Body=b"weights v2",
                         Metadata={"sha256": put["sha256"]})
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.get_bytes("r/model.bin")
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.get_bytes("r/model.bin", sha256=put["sha256"])


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StoreError, match=r"s3://no-such-bucket: bucket does not exist at http://127\.0\.0\.1"):
        open_store("s3://no-such-bucket/runs")


def test_unreachable_endpoint_is_a_clear_error(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        open_store(f"s3://{BUCKET}/x")


def _make_run(run_dir: Path) -> None:
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "student" / "model.safetensors").write_bytes(os.urandom(2048))
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "metrics.json").write_text(json.dumps({"student_accuracy": 0.9, "retention": 0.97}))
    (run_dir / ".teacher_outputs.jsonl.x1.tmp").write_text("half written")


def _manifest(cfg, run_id, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("text,category\nhello,greet\n")
    return build_manifest(cfg, run_id, data_files=[data], flow_run_id="fr-1", spend={"cost_usd": 0.5},
                          started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:10:00+00:00",
                          extra={"gate": {"ship": True, "reasons": []}})


def test_publish_run_to_s3_writes_manifest_last(s3_endpoint, s3_client, tmp_path):
    cfg = load_config(None, [*TASK, f"store=s3://{BUCKET}/published"])
    run_dir = tmp_path / "staging" / "run-a"
    _make_run(run_dir)
    recording = FaultyClient(s3_client, fail="")
    store = open_store(cfg.store, client=recording)

    manifest = publish_run(run_dir, store, "run-a", _manifest(cfg, "run-a", tmp_path))

    assert sorted(manifest["artifacts"]) == ["config.yaml", "metrics.json", "student/model.safetensors"]
    assert manifest["store_uri"] == f"s3://{BUCKET}/published/run-a"
    copies = [c[1][2] for c in recording.calls if c[0] == "copy"]
    assert copies[-1] == "published/run-a/manifest.json" and len(copies) == 4
    assert json.loads((run_dir / "manifest.json").read_text()) == manifest
    assert read_manifest(store, "run-a") == manifest
    assert verify_run(store, "run-a") == []
    assert list_runs(store) == ["run-a"]
    art = manifest["artifacts"]["student/model.safetensors"]
    assert art["uri"] == f"s3://{BUCKET}/published/run-a/student/model.safetensors"
    assert store.get_bytes("run-a/student/model.safetensors", sha256=art["sha256"]) == \
        (run_dir / "student" / "model.safetensors").read_bytes()

    s3_client.put_object(Bucket=BUCKET, Key="published/run-a/metrics.json", Body=b"{}")
    problems = verify_run(store, "run-a")
    assert len(problems) == 1 and problems[0].startswith("metrics.json: sha256 mismatch")
    with pytest.raises(StoreError, match="failed verification"):
        read_manifest(store, "run-a", verify=True)


def test_publish_in_place_local_store_hashes_without_copying(tmp_path):
    root = tmp_path / "runs"
    run_dir = root / "run-b"
    _make_run(run_dir)
    model = run_dir / "student" / "model.safetensors"
    before = model.stat()
    store = open_store(str(root))
    cfg = load_config(None, [*TASK, f"store={root}"])
    manifest = publish_run(run_dir, store, "run-b", _manifest(cfg, "run-b", tmp_path))
    after = model.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert read_manifest(store, "run-b")["artifacts"] == manifest["artifacts"]
    assert verify_run(store, "run-b") == []
    model.write_bytes(b"truncated")
    assert verify_run(store, "run-b") == [
        f"student/model.safetensors: sha256 mismatch (manifest {manifest['artifacts']['student/model.safetensors']['sha256']}, "
        f"stored {__import__('hashlib').sha256(b'truncated').hexdigest()})"]


def test_incomplete_run_is_not_listed(tmp_path):
    store = open_store(str(tmp_path / "runs"))
    store.put_bytes(b"{}", "half-run/metrics.json")
    assert list_runs(store) == []
    with pytest.raises(StoreError, match="no manifest.json.*did not finish"):
        read_manifest(store, "half-run")
    assert verify_run(store, "half-run")[0].startswith("run 'half-run': no manifest.json")


def test_store_setting_validated():
    assert load_config(None, [*TASK, f"store=s3://{BUCKET}/team/a"]).store == f"s3://{BUCKET}/team/a"
    with pytest.raises(ConfigError, match="store: .*not a valid S3 bucket name"):
        load_config(None, [*TASK, "store=s3://Bad_Bucket/x"])
    with pytest.raises(ConfigError, match="store: .*unsupported scheme gs://"):
        load_config(None, [*TASK, "store=gs://bucket/x"])


def test_runs_cli_list_show_diff(s3_endpoint, s3_client, tmp_path):
    from distill_flows.cli import app
    from typer.testing import CliRunner

    uri = f"s3://{BUCKET}/cli"
    store = open_store(uri)
    for run_id, epochs, acc in (("run-1", 3.0, 0.81), ("run-2", 1.0, 0.78)):
        run_dir = tmp_path / run_id
        _make_run(run_dir)
        (run_dir / "metrics.json").write_text(json.dumps({"student_accuracy": acc, "retention": 0.9,
                                                          "gate": {"ship": acc > 0.8}}))
        cfg = load_config(None, [*TASK, f"store={uri}", f"train.epochs={epochs}"])
        m = _manifest(cfg, run_id, tmp_path)
        m["started_at"] = f"2026-01-0{run_id[-1]}T00:00:00+00:00"
        publish_run(run_dir, store, run_id, m)
    runner = CliRunner()

    out = runner.invoke(app, ["runs", "list", "--store", uri])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[0].split()[:3] == ["run_id", "started_at", "task"]
    assert lines[1].startswith("run-1") and "0.8100" in lines[1] and "SHIP" in lines[1]
    assert lines[2].startswith("run-2") and "0.7800" in lines[2]

    out = runner.invoke(app, ["runs", "show", "run-2", "--store", uri, "--verify"])
    assert out.exit_code == 0, out.output
    assert "reproduce: distill run /dev/null" in out.output and "train.epochs=1.0" in out.output
    assert "verified: 3 artifacts" in out.output

    out = runner.invoke(app, ["runs", "diff", "run-1", "run-2", "--store", uri])
    assert out.exit_code == 0, out.output
    assert "config   train.epochs: 3.0000 -> 1.0000" in out.output
    assert "student_accuracy: 0.8100 -> 0.7800  (-0.0300)" in out.output

    s3_client.put_object(Bucket=BUCKET, Key="cli/run-1/config.yaml", Body=b"seed: 1\n")
    out = runner.invoke(app, ["runs", "show", "run-1", "--store", uri, "--verify"])
    assert out.exit_code == 1 and "config.yaml: sha256 mismatch" in out.output

    out = runner.invoke(app, ["runs", "show", "run-9", "--store", uri])
    assert out.exit_code == 2 and "no manifest.json" in out.output
