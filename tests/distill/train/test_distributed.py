"""train.distributed: two gloo processes on CPU train the same student as one process.

The one-process run gets the global batch (batch_size * 2) and the two-process run batch_size
per process, on the same rows and seed: the Trainer's seeded sampler gives both the same order,
and DDP's gradient mean over two halves equals the one-process mean over the whole batch. What
stays different is floating-point summation order (and padding lengths), hence a tolerance.
Dropout is switched off in the tiny students: each process draws its own masks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from distill.config import ClassifierKDTrain, ConfigError, SFTTrain, parse_train
from distill.data import write_jsonl
from distill.train.distributed import launch_command, train_distributed

LABELS = ["positive", "negative", "neutral", "question"]
KEYWORDS = {"positive": "great love good", "negative": "terrible hate bad", "neutral": "ok fine one",
            "question": "how what why"}
FILLER = "the my card app money transfer account balance is a to of please".split()
# Two processes against one: a bound on float drift, far below what a step changes (asserted too).
TOLERANCE = 1e-4


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _no_dropout(directory: Path) -> Path:
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attention_dropout"):
        if key in cfg or key == "classifier_dropout":
            cfg[key] = 0.0
    cfg_path.write_text(json.dumps(cfg))
    return directory


def _classifier_rows(n: int = 48) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        text = " ".join([rng.choice(KEYWORDS[label].split())] + rng.sample(FILLER, rng.randint(2, 7)))
        soft = {l: (0.7 if l == label else 0.1) for l in LABELS}
        rows.append({"id": str(i), "text": text, "target": label, "soft_labels": soft, "split": "train"})
    return rows


def _classifier_config(student: Path, batch_size: int, nproc: int, **distributed) -> ClassifierKDTrain:
    return ClassifierKDTrain(student_model=student, init_from_teacher=None, batch_size=batch_size, max_steps=6,
                             learning_rate=5e-3, warmup_ratio=0.0, freeze_embeddings=False, device="cpu", logging_steps=1,
                             distributed={"enabled": nproc > 1, "nproc": nproc, **distributed})


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from conftest import make_tiny_bert_classifier

    return _no_dropout(make_tiny_bert_classifier(tmp_path_factory.mktemp("clf"), LABELS))


def test_the_section_is_off_by_default_and_fsdp_is_for_lm_students_only():
    assert ClassifierKDTrain().distributed.enabled is False
    assert SFTTrain().distributed.strategy == "ddp"
    assert parse_train({"mode": "sft", "distributed": {"enabled": True, "strategy": "fsdp"}}).distributed.strategy \
        == "fsdp"
    with pytest.raises(ValueError, match="strategy"):
        parse_train({"mode": "classifier_kd", "distributed": {"strategy": "fsdp"}})


def test_both_launchers_run_this_module_once_per_process(tmp_path):
    config = parse_train({"distributed": {"enabled": True, "nproc": 3}})
    torchrun = launch_command(config, tmp_path / "spec.json", 29511)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in torchrun
    assert torchrun[torchrun.index("--nproc_per_node") + 1] == "3" and "29511" in torchrun
    assert torchrun[-3:] == ["-m", "distill.train.distributed", str(tmp_path / "spec.json")]
    config.distributed.launcher = "accelerate"
    accelerate = launch_command(config, tmp_path / "spec.json", 29511)
    assert accelerate[1:3] == ["-m", "accelerate.commands.launch"]
    assert accelerate[accelerate.index("--num_processes") + 1] == "3" and accelerate[-3:] == torchrun[-3:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun"])
def test_two_gloo_processes_train_the_classifier_one_process_trains(student, tmp_path, launcher):
    from distill.train.classifier import train_classifier

    rows = _classifier_rows()
    one = train_classifier(rows, LABELS, _classifier_config(student, 8, 1), tmp_path / "one", progress=False)
    rows_file = write_jsonl(tmp_path / "rows.jsonl", rows)
    two = train_distributed(rows_file, LABELS, _classifier_config(student, 4, 2, launcher=launcher),
                            tmp_path / "two", progress=False)
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 6
    assert Path(two["model_dir"]) == tmp_path / "two" / "student"
    start, w1, w2 = _weights(student), _weights(Path(one["model_dir"])), _weights(Path(two["model_dir"]))
    moved, apart = _max_diff(start, w1), _max_diff(w1, w2)
    print(f"max |w_1proc - w_2proc| = {apart:.2e}; max |w_1proc - w_start| = {moved:.2e}")
    assert moved > 100 * TOLERANCE  # training changed the weights: equality below is not trivial
    assert apart < TOLERANCE
    # The losses rank 0 logged are the global batch's, step for step.
    loss1 = [h["loss"] for h in one["history"] if "loss" in h]
    loss2 = [h["loss"] for h in two["history"] if "loss" in h]
    assert loss1 and loss2 == pytest.approx(loss1, rel=1e-3)


@pytest.mark.slow
def test_a_failing_rank_is_named_with_its_error(tmp_path):
    rows_file = write_jsonl(tmp_path / "rows.jsonl", _classifier_rows(8))
    config = _classifier_config(tmp_path / "no-such-model", 4, 2)
    with pytest.raises(ConfigError, match=r"rank \d failed: ConfigError: train.student_model: .*no-such-model"):
        train_distributed(rows_file, LABELS, config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "distributed" / "result.json").exists()


# Completions of one length: the loss is a mean over completion tokens, which two processes
# average per process; equal token counts per example make that the one-process mean.
PAIRS = [("my card is lost", "lost card"), ("refund pending please", "refund pending"),
         ("exchange rate fee", "exchange rate"), ("top up declined", "top up")]


def _lm_rows(repeat: int = 4) -> list[dict]:
    return [{"id": f"{i}-{j}", "target": answer, "split": "train",
             "messages": [{"role": "system", "content": "classify the message"}, {"role": "user", "content": text}]}
            for i in range(repeat) for j, (text, answer) in enumerate(PAIRS)]


def _sft_config(student: Path, batch_size: int, nproc: int, **distributed) -> SFTTrain:
    return SFTTrain(student_model=student, packing=False, batch_size=batch_size, max_steps=4, learning_rate=1e-2,
                    warmup_ratio=0.0, device="cpu", logging_steps=1, max_length=64,
                    distributed={"enabled": nproc > 1, "nproc": nproc, **distributed})


@pytest.mark.slow
def test_two_gloo_processes_train_the_lm_student_one_process_trains(tiny_causal_lm, tmp_path):
    from distill.train.lm import train_sft

    rows = _lm_rows()
    one = train_sft(rows, _sft_config(tiny_causal_lm, 4, 1), tmp_path / "one", progress=False)
    rows_file = write_jsonl(tmp_path / "rows.jsonl", rows)
    two = train_distributed(rows_file, None, _sft_config(tiny_causal_lm, 2, 2), tmp_path / "two", progress=False)
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 4
    assert two["sharded"] is False and one["sharded"] is False
    start, w1, w2 = _weights(tiny_causal_lm), _weights(Path(one["model_dir"])), _weights(Path(two["model_dir"]))
    moved, apart = _max_diff(start, w1), _max_diff(w1, w2)
    print(f"ddp: max |w_1proc - w_2proc| = {apart:.2e}; max |w_1proc - w_start| = {moved:.2e}")
    assert moved > 100 * TOLERANCE
    assert apart < TOLERANCE


def test_fsdp_on_cpu_is_refused_before_any_process_starts(tiny_causal_lm, tmp_path):
    # accelerate only builds its FSDP plugin for GPU process groups: on CPU the run would silently be DDP.
    rows_file = write_jsonl(tmp_path / "rows.jsonl", _lm_rows(1))
    with pytest.raises(ConfigError, match="fsdp shards across GPUs only"):
        train_distributed(rows_file, None, _sft_config(tiny_causal_lm, 2, 2, strategy="fsdp"), tmp_path / "run",
                          progress=False)
    assert not (tmp_path / "run" / "distributed").exists()


@pytest.mark.gpu
def test_fsdp_on_two_gpus_shards_the_lm_student_and_matches_one_process(tiny_causal_lm, tmp_path):
    import torch

    from distill.train.lm import train_sft

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    rows = _lm_rows()
    cfg = _sft_config(tiny_causal_lm, 4, 1).model_copy(update={"device": "cuda"})
    one = train_sft(rows, cfg, tmp_path / "one", progress=False)
    two_cfg = _sft_config(tiny_causal_lm, 2, 2, strategy="fsdp", backend="nccl").model_copy(update={"device": "cuda"})
    two = train_distributed(write_jsonl(tmp_path / "rows.jsonl", rows), None, two_cfg, tmp_path / "two", progress=False)
    assert two["sharded"] is True and two["steps"] == one["steps"]
    assert _max_diff(_weights(Path(one["model_dir"])), _weights(Path(two["model_dir"]))) < 1e-3
