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


# --- one train section per mode -------------------------------------------------------------------

def test_a_field_of_another_mode_is_refused_naming_field_and_mode(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.packing: not a field of train\.mode=classifier_kd"):
        load_config(None, [*TASK, "train.packing=true"])
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  name: t\n  kind: generation\n  train_path: x.csv\n  system_prompt: ''\n"
                 "train:\n  mode: sft\n  student_model: /models/lm\n  pooling: mean\n")
    with pytest.raises(ConfigError, match=rf"{p}:9: train\.pooling: not a field of train\.mode=sft"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"train\.teacher_model: not a field of train\.mode=sft \(it belongs "
                                          r"to logit_kd\)"):
        load_config(None, [*TASK, "task.kind=generation", "task.labels=null", "train.mode=sft",
                           "train.teacher_model=/models/t"])


def test_each_mode_has_its_own_fields_and_a_missing_mode_is_classifier_kd():
    from distill.config import ClassifierKDTrain, LogitKDTrain, SFTTrain, parse_train

    assert type(load_config(None, TASK).train) is ClassifierKDTrain
    assert type(parse_train({"epochs": 1})) is ClassifierKDTrain
    sft = parse_train({"mode": "sft", "packing": False, "student_model": "/m"})
    assert type(sft) is SFTTrain and sft.packing is False and not hasattr(sft, "pooling")
    kd = parse_train({"mode": "logit_kd", "on_policy_fraction": 0.5})
    assert type(kd) is LogitKDTrain and kd.on_policy_fraction == 0.5 and not hasattr(kd, "packing")
    assert parse_train(kd.model_dump(mode="json")) == kd  # what the remote training flow receives
    with pytest.raises(ConfigError, match=r"--set train\.mode=distil: train\.mode: must be classifier_kd, sft or "
                                          r"logit_kd"):
        load_config(None, [*TASK, "train.mode=distil"])


def test_task_kind_and_train_mode_are_checked_together(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.mode: sft does not train a classification student"):
        load_config(None, [*TASK, "train.mode=sft"])
    with pytest.raises(ConfigError, match=r"train\.mode: classifier_kd does not train a generation student"):
        load_config(None, [*TASK, "task.kind=generation", "task.labels=null"])
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  name: t\n  train_path: x.csv\n  labels: [a]\n  system_prompt: ''\ntrain:\n  mode: logit_kd\n")
    with pytest.raises(ConfigError, match=rf"{p}:7: train\.mode: logit_kd does not train a classification"):
        load_config(p)
    assert load_config(None, [*TASK, "task.kind=generation", "task.labels=null", "train.mode=logit_kd"])


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from distill.config import TRAIN_MODES, DistillConfig

    seen, todo, missing = set(), [DistillConfig, *TRAIN_MODES.values()], []
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            nested = [t for t in getattr(field.annotation, "__args__", (field.annotation,))
                      if isinstance(t, type) and issubclass(t, BaseModel)]
            todo += nested
            if not field.description and not nested:
                missing.append(f"{model.__name__}.{name}")
    assert not missing, missing
    assert len(seen) >= 20  # every section, each train mode and LoRA


# --- the task names its data: no dataset defaults -------------------------------------------------

def test_the_task_has_no_dataset_defaults():
    from distill.config import TaskConfig

    with pytest.raises(ConfigError, match=r"task: missing section"):
        load_config()
    with pytest.raises(ConfigError) as e:
        load_config(None, ["task.labels=[a]"])
    for field in ("task.name: Field required", "task.train_path: Field required", "task.system_prompt: Field required"):
        assert field in str(e.value)
    defaults = {name: f.default for name, f in TaskConfig.model_fields.items() if not f.is_required()}
    assert defaults["label_field"] is None and defaults["labels_path"] is None and defaults["test_path"] is None
    assert "banking" not in repr(defaults).lower()
    # Without a task only the commands that work from a registry or a student directory get a config.
    assert load_config(None, [], need_task=False).task is None


# --- names and paths, before any work -------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "a/b", ".hidden", "a..b", "", "x" * 65])
def test_unsafe_task_names_are_refused_naming_the_set(name):
    with pytest.raises(ConfigError, match=rf"--set task\.name=.*: task\.name: .*not a safe name"):
        load_config(PRESET, [f"task.name={name}"])


def test_unsafe_parent_run_is_refused():
    with pytest.raises(ConfigError, match=r"parent_run: .*not a safe name"):
        load_config(None, [*TASK, "parent_run=../other"])
    assert load_config(None, [*TASK, "parent_run=cards-20260101-000000-abcdef"]).parent_run


def test_store_is_normalised_and_home_expanded(tmp_path):
    from pathlib import Path

    home = str(Path.home())
    assert load_config(None, [*TASK, "store=~/s"]).store == f"{home}/s"
    assert load_config(None, [*TASK, "store=runs//team/"]).store == "runs/team"
    assert load_config(None, [*TASK, "store=s3://distill-runs//team/a/"]).store == "s3://distill-runs/team/a"
    with pytest.raises(ConfigError, match=r"--set store=s3://distill-runs/a/\.\./b: store: .*'\.\.'"):
        load_config(None, [*TASK, "store=s3://distill-runs/a/../b"])
    cfg = load_config(None, [*TASK, "registry=~/reg", "generation.cache_path=~/cache.sqlite",
                             "task.train_path=~/data/train.csv"])
    assert str(cfg.registry) == f"{home}/reg" and str(cfg.generation.cache_path) == f"{home}/cache.sqlite"
    assert str(cfg.task.train_path) == f"{home}/data/train.csv"
    assert load_config(None, [*TASK, "serve.log_url=sqlite:///~/shadow.sqlite"]).serve.log_url == \
        f"sqlite:///{home}/shadow.sqlite"
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  name: t\n  train_path: ~/data/train.csv\n  labels: [a]\n  system_prompt: ''\n")
    assert str(load_config(p).task.train_path) == f"{home}/data/train.csv"  # not <preset dir>/~/data


def test_set_errors_name_the_set_argument_not_a_yaml_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  name: t\n  train_path: x.csv\n  labels: [a]\n  system_prompt: ''\n"
                 "generation:\n  concurrency: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["generation.concurrency=-1"])
    assert "--set generation.concurrency=-1: generation.concurrency:" in str(e.value)
    assert f"{p}:7" not in str(e.value)


def test_a_directory_or_unreadable_file_as_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}: is a directory, not a YAML config file"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"task:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(bad byte at offset 17\)"):
        load_config(tmp_path / "latin1.yaml")


# --- outputs checked before the first call (distill/preflight.py) ---------------------------------

def test_outputs_that_cannot_be_written_are_named(tmp_path):
    from distill.preflight import check_outputs, check_run_dir, check_static, check_writable

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ok = load_config(None, [*TASK, f"store={tmp_path}/runs", f"registry={tmp_path}/reg",
                            f"generation.cache_path={tmp_path}/c/cache.sqlite"])
    check_outputs(ok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # checking creates nothing
    for field, value in (("store", f"{blocker}/runs"), ("registry", f"{blocker}/reg"),
                         ("generation.cache_path", f"{blocker}/cache.sqlite")):
        cfg = load_config(None, [*TASK, f"store={tmp_path}/runs", f"{field}={value}"])
        with pytest.raises(ConfigError, match=rf"^{field}: .*{blocker} is a file, not a directory"):
            check_outputs(cfg)
        with pytest.raises(ConfigError, match=rf"^{field}:"):
            check_static(cfg)
    with pytest.raises(ConfigError, match=r"^--output: .* is a directory"):
        check_writable(tmp_path, "--output", directory=False)
    with pytest.raises(ConfigError, match=r"^store: .* is not a directory"):
        check_writable(blocker, "store", directory=True)
    check_run_dir(ok, tmp_path / "runs" / "cards-1")
    with pytest.raises(ConfigError, match=r"lies outside the store"):
        check_run_dir(ok, tmp_path / "runs" / ".." / ".." / "escaped")


def test_generative_modes_need_their_models_before_any_call(tmp_path):
    from distill.preflight import check_static

    gen = [*TASK, "task.kind=generation", "task.labels=null", f"store={tmp_path}/runs",
           f"registry={tmp_path}/reg", f"generation.cache_path={tmp_path}/cache.sqlite"]
    with pytest.raises(ConfigError, match=r"train\.student_model: train\.mode=sft needs a local model"):
        check_static(load_config(None, [*gen, "train.mode=sft"]))
    with pytest.raises(ConfigError, match=r"train\.teacher_model: train\.mode=logit_kd needs"):
        check_static(load_config(None, [*gen, "train.mode=logit_kd", f"train.student_model={tmp_path}"]))
