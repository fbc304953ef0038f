"""Training and evaluation on a CUDA device, where one is present (marker `gpu`; skipped elsewhere).

Each test compares the GPU path with the CPU path on the same tiny model, so a device
mix-up (a tensor left on the CPU, a dtype the GPU path does not cast) fails here.
"""

import math

import pytest

pytestmark = pytest.mark.gpu

CHAT = [{"role": "system", "content": "answer"}, {"role": "user", "content": "my card is lost"}]


def _lm_rows(n: int) -> list[dict]:
    pairs = [("my card is lost", "lost card"), ("refund pending please", "refund pending")]
    return [{"id": f"{i}", "text": t, "target": a, "messages": [CHAT[0], {"role": "user", "content": t}],
             "soft_labels": None, "source": "teacher", "weight": 1.0, "split": "train"}
            for i in range(n) for t, a in pairs]


def test_generative_student_answers_alike_on_cuda_and_cpu(tiny_causal_lm):
    from distill.models.causal import GenerativeStudent

    cpu = GenerativeStudent(tiny_causal_lm, max_new_tokens=6, device="cpu").answer([CHAT])[0]
    gpu_student = GenerativeStudent(tiny_causal_lm, max_new_tokens=6, device="cuda")
    assert next(gpu_student.model.parameters()).device.type == "cuda"
    gpu = gpu_student.answer([CHAT])[0]
    assert gpu["text"] == cpu["text"]
    assert [t["logprob"] for t in gpu["logprobs"]] == pytest.approx([t["logprob"] for t in cpu["logprobs"]],
                                                                     abs=1e-3)


def test_evaluate_generative_runs_on_the_training_device(tmp_path, tiny_causal_lm):
    from distill.config import EvaluateConfig
    from distill.evaluate.generative import evaluate_generative

    holdout = [{"id": f"g{i}", "text": "my card is lost", "gold": "lost card", "messages": CHAT,
                "input": {"text": "my card is lost"}} for i in range(6)]
    records = [{"id": r["id"], "sample": 0, "status": "done", "response": "lost card",
                "logprobs": [{"token": "x", "logprob": math.log(0.9)}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2}} for r in holdout]
    cfg = EvaluateConfig(latency_requests=10, latency_concurrency=2, tail_size=2, robustness_rows=2)
    m = evaluate_generative(tiny_causal_lm, holdout, records, cfg, tmp_path, max_new_tokens=4)
    assert m["device"] == "cuda" and m["teacher_accuracy"] == 1.0


def test_sft_trains_on_cuda(tmp_path, tiny_causal_lm):
    from distill.config import SFTTrain
    from distill.train.lm import train_sft

    cfg = SFTTrain(student_model=tiny_causal_lm, device="cuda", bf16=True, lora={"enabled": True, "r": 4},
                   merge_adapter=True, learning_rate=1e-2, batch_size=4, max_steps=6, max_length=64,
                   eval_steps=3, checkpoint_steps=3, logging_steps=3)
    result = train_sft(_lm_rows(8), cfg, tmp_path / "sft", progress=False)
    assert result["steps"] == 6
    assert all(math.isfinite(h["loss"]) for h in result["history"] if "loss" in h)
    from distill.models.causal import GenerativeStudent

    assert GenerativeStudent(result["merged_dir"], max_new_tokens=2, device="cuda").answer([CHAT])


def test_classifier_trains_on_cuda(tmp_path, tiny_encoder):
    from distill.config import ClassifierKDTrain
    from distill.train.classifier import train_classifier

    labels = ["lost", "refund"]
    rows = [{"id": f"{i}", "text": t, "target": l, "soft_labels": {l: 0.9, ("refund" if l == "lost" else "lost"): 0.1},
             "source": "teacher", "weight": 1.0, "split": "train"}
            for i in range(8) for t, l in [("my card is lost", "lost"), ("refund pending please", "refund")]]
    cfg = ClassifierKDTrain(student_model=tiny_encoder, device="cuda", max_steps=4, batch_size=4,
                            eval_steps=2, checkpoint_steps=2, logging_steps=2)
    result = train_classifier(rows, labels, cfg, tmp_path / "clf", progress=False)
    assert result["steps"] == 4
