"""Every YAML preset in deployments/configs/ loads, validates, and names data files that exist."""

from pathlib import Path

import pytest

from distill.config import load_config
from distill.data import load_task_rows

PRESETS = sorted((Path(__file__).resolve().parents[2] / "deployments" / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert any(p.name == "banking77-demo.yaml" for p in PRESETS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_validates(preset):
    cfg = load_config(preset)
    for path in (cfg.task.train_path, cfg.task.test_path, cfg.task.labels_path):
        if path is not None and "${" not in str(path):
            assert Path(path).exists(), f"{preset.name}: {path} does not exist"
    if cfg.task.kind == "classification":
        assert cfg.task.label_set()
    # Bundled data must also pass the row checks the cycle runs before any teacher call.
    if Path(cfg.task.train_path).exists():
        assert load_task_rows(cfg.task.model_copy(update={"max_rows": 50}), "train")
