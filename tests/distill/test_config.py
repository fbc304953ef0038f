"""Config loading: defaults, overrides, and errors that name the file, line and field."""

import pytest

from distill.config import ConfigError, DistillConfig, load_config


def test_defaults_validate_and_hash_is_stable():
    a, b = load_config(), load_config()
    assert a.digest() == b.digest()
    assert a.task.kind == "classification" and len(a.task.label_set()) == 77


def test_set_overrides_are_typed_and_change_the_hash():
    cfg = load_config(None, ["generation.concurrency=64", "train.lora.enabled=true", "teacher.base_url=http://h:1/v1"])
    assert cfg.generation.concurrency == 64 and cfg.train.lora.enabled is True
    assert cfg.teacher.base_url == "http://h:1/v1"
    assert cfg.digest() != DistillConfig().digest()


def test_unknown_field_names_file_line_and_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  name: x\ngeneration:\n  concurency: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:4" in str(e.value) and "generation.concurency" in str(e.value)


def test_bad_value_and_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generation:\n  concurrency: -3\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: generation.concurrency"):
        load_config(p)
    p.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["generation.concurrency"])


def test_relative_paths_resolve_against_the_preset(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("text,category\nhi,a\n")
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  train_path: d/train.csv\n  labels: [a, b]\n  test_path: null\n")
    cfg = load_config(p)
    assert cfg.task.train_path == (tmp_path / "d" / "train.csv").resolve()
