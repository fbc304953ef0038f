import json
import threading

import pytest
from distill_flows.cli import app
from typer.testing import CliRunner

from distill.config import ConfigError
from distill.serve.registry import Registry


@pytest.fixture
def model_dirs(tmp_path):
    out = []
    for i in range(3):
        d = tmp_path / f"student-{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"n": i}))
        (d / "model.safetensors").write_bytes(bytes([i]) * 10)
        out.append(d)
    return out


def test_register_promote_rollback(tmp_path, model_dirs):
    reg = Registry(tmp_path / "reg")
    assert reg.champion("t") is None and reg.list() == []
    e = reg.register("t", "run-1", model_dirs[0], {"student_accuracy": 0.9, "per_label": {"a": {}}},
                     {"config_hash": "abc"})
    assert e["status"] == "challenger" and e["metrics"] == {"student_accuracy": 0.9}
    assert (tmp_path / "reg/t/run-1/model.safetensors").read_bytes() == bytes([0]) * 10
    assert reg.champion("t") is None  # registering never promotes
    reg.promote("t", "run-1", "first model")
    reg.register("t", "run-2", model_dirs[1], {}, {})
    assert reg.challenger("t")["run_id"] == "run-2"
    champ = reg.promote("t", "run-2", "better on the tail")
    assert champ["status"] == "champion" and champ["promotion_reason"] == "better on the tail"
    assert {e["run_id"]: e["status"] for e in reg.list("t")} == {"run-1": "retired", "run-2": "champion"}
    back = reg.rollback("t")
    assert back["run_id"] == "run-1" and reg.champion("t")["run_id"] == "run-1"
    assert {e["run_id"]: e["status"] for e in reg.list("t")} == {"run-1": "champion", "run-2": "rolled_back"}
    with pytest.raises(ConfigError, match="no previous champion"):
        reg.rollback("t")
    assert [e["action"] for e in reg.events("t")] == ["register", "promote", "register", "promote", "rollback"]
    # The index on disk is what a fresh handle sees.
    assert Registry(tmp_path / "reg").champion("t")["path"].endswith("t/run-1")


def test_errors_and_idempotent_register(tmp_path, model_dirs):
    reg = Registry(tmp_path / "reg")
    first = reg.register("t", "run-1", model_dirs[0], {"x": 1}, {})
    assert reg.register("t", "run-1", model_dirs[1], {"x": 2}, {}) == first  # a retried run changes nothing
    assert (tmp_path / "reg/t/run-1/model.safetensors").read_bytes() == bytes([0]) * 10
    with pytest.raises(ConfigError, match="reason is required"):
        reg.promote("t", "run-1", "  ")
    with pytest.raises(ConfigError, match="no model 'run-9'"):
        reg.promote("t", "run-9", "why not")
    with pytest.raises(ConfigError, match="no models registered for task 'u'"):
        reg.rollback("u")
    with pytest.raises(ConfigError, match="letters, digits"):
        reg.register("t", "../escape", model_dirs[0], {}, {})
    with pytest.raises(ConfigError, match="no config.json"):
        reg.register("t", "run-2", tmp_path, {}, {})
    assert [e["run_id"] for e in reg.list()] == ["run-1"]
    (tmp_path / "reg/index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="index.json:1: corrupt"):
        reg.list()


def test_concurrent_registrations_are_all_kept(tmp_path, model_dirs):
    reg = Registry(tmp_path / "reg")
    threads = [threading.Thread(target=reg.register, args=("t", f"run-{i}", model_dirs[i % 3], {}, {}))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e["run_id"] for e in reg.list("t")) == sorted(f"run-{i}" for i in range(8))


def test_cli_list_promote_rollback(tmp_path, model_dirs):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.register("banking77", "run-a", model_dirs[0], {"student_accuracy": 0.91, "gate_ship": True}, {})
    reg.register("banking77", "run-b", model_dirs[1], {"student_accuracy": 0.93}, {})
    runner = CliRunner()
    r = runner.invoke(app, ["models", "promote", "banking77", "run-a", "--reason", "passed", "--registry", str(root)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["models", "promote", "banking77", "run-b", "--reason", "reviewed", "--registry", str(root)])
    assert r.exit_code == 0 and "run-b" in r.output
    r = runner.invoke(app, ["models", "list", "--registry", str(root)])
    assert r.exit_code == 0
    lines = {l.split()[1]: l for l in r.output.splitlines()[1:]}
    assert "retired" in lines["run-a"] and "91.0%" in lines["run-a"] and "ship" in lines["run-a"]
    assert "champion" in lines["run-b"]
    r = runner.invoke(app, ["models", "rollback", "banking77", "--registry", str(root)])
    assert r.exit_code == 0 and "run-a" in r.output
    r = runner.invoke(app, ["models", "list", "--registry", str(root), "--json", "--task", "banking77"])
    assert {e["run_id"]: e["status"] for e in json.loads(r.output)} == {"run-a": "champion", "run-b": "rolled_back"}
    r = runner.invoke(app, ["models", "promote", "banking77", "run-a", "--registry", str(root)])
    assert r.exit_code != 0  # --reason is required
    r = runner.invoke(app, ["models", "rollback", "other", "--registry", str(root)])
    assert r.exit_code == 2 and "no models registered" in r.output


def test_cli_reads_the_registry_from_a_config(tmp_path, model_dirs):
    Registry(tmp_path / "reg").register("banking77", "run-a", model_dirs[0], {}, {})
    (tmp_path / "cfg.yaml").write_text(f"registry: {tmp_path / 'reg'}\n")
    r = CliRunner().invoke(app, ["models", "list", "--config", str(tmp_path / "cfg.yaml"), "--json"])
    assert r.exit_code == 0 and [e["run_id"] for e in json.loads(r.output)] == ["run-a"]
    (tmp_path / "bad.yaml").write_text("registry: [1\n")
    r = CliRunner().invoke(app, ["models", "list", "--config", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 2 and "bad.yaml" in r.output


def test_a_stopped_canary_is_no_challenger_any_more(tmp_path, model_dirs):
    reg = Registry(tmp_path / "reg")
    reg.register("t", "run-1", model_dirs[0], {}, {})
    reg.promote("t", "run-1", "first")
    reg.register("t", "run-2", model_dirs[1], {}, {})
    assert reg.status("t", "run-2") == "challenger" and reg.challenger("t")["run_id"] == "run-2"
    with pytest.raises(ConfigError, match="reason"):
        reg.stop_canary("t", "run-2", " ")
    stopped = reg.stop_canary("t", "run-2", "agreement 0.41 vs 0.93, p = 1e-9")
    assert stopped["status"] == "stopped" and "p = 1e-9" in stopped["stop_reason"]
    assert reg.status("t", "run-2") == "stopped" and reg.challenger("t") is None
    assert reg.events("t")[-1]["action"] == "stop_canary"
    # the champion is not a canary: stopping it changes nothing
    assert reg.stop_canary("t", "run-1", "no")["status"] == "champion"
    assert reg.status("t", "run-9") is None
