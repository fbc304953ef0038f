"""Config loading: defaults, overrides, and errors that name the file, line and field."""

import pytest

from distill.config import ConfigError, load_config
from distill.demo import PRESET

# A minimal task: every config names its own.
TASK = ["task.name=cards", "task.train_path=train.csv", "task.labels=[card_lost, refund]", "task.system_prompt="]


def test_demo_preset_validates_and_hash_is_stable():
    a, b = load_config(PRESET), load_config(PRESET)
    assert a.digest() == b.digest()
    assert a.task.kind == "classification" and len(a.task.label_set()) == 77


def test_set_overrides_are_typed_and_change_the_hash():
    cfg = load_config(None, [*TASK, "generation.concurrency=64", "train.lora.enabled=true",
                             "teacher.base_url=http://h:1/v1"])
    assert cfg.generation.concurrency == 64 and cfg.train.lora.enabled is True
    assert cfg.teacher.base_url == "http://h:1/v1"
    assert cfg.digest() != load_config(None, TASK).digest()


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
    p.write_text("task:\n  name: t\n  train_path: d/train.csv\n  labels: [a, b]\n  system_prompt: ''\n")
    cfg = load_config(p)
    assert cfg.task.train_path == (tmp_path / "d" / "train.csv").resolve()
