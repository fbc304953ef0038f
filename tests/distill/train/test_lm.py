import pytest
import torch

from distill.config import ConfigError, LogitKDTrain, SFTTrain
from distill.train.lm import train_logit_kd, train_sft
from distill.train.losses import token_kd_loss

SYSTEM = {"role": "system", "content": "classify the message"}
PAIRS = [("my card is lost", "lost card"), ("refund pending please", "refund pending"),
         ("exchange rate fee", "exchange rate"), ("top up declined", "top up declined")]


def sharpen(src, dst, factor: float = 50.0):
    """A copy of a tiny random LM whose output layer has a trained model's logit scale.

    At init scale (std 0.02, hidden 16) every next-token distribution is nearly uniform and
    LoRA cannot sharpen it (the output layer carries no adapter), so nothing could be learnt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def student_lm(tiny_causal_lm, tmp_path_factory):
    return sharpen(tiny_causal_lm, tmp_path_factory.mktemp("student-lm"))


def lm_rows(repeat: int, validation: bool = False) -> list[dict]:
    rows = []
    for i in range(repeat):
        for j, (text, answer) in enumerate(PAIRS):
            rows.append({"id": f"{i}-{j}", "text": text, "target": answer,
                         "messages": [SYSTEM, {"role": "user", "content": text}], "soft_labels": None,
                         "source": "teacher", "weight": 1.0, "split": "train"})
    if validation:
        rows[0]["split"] = "validation"
    return rows


def greedy(model_dir, text: str, tokenizer_dir=None) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok.apply_chat_template([SYSTEM, {"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_lora_sft_learns_completions_and_leaves_base_untouched(tmp_path, student_lm):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(student_lm).state_dict().items()}
    cfg = SFTTrain(student_model=student_lm, lora={"enabled": True, "r": 8, "alpha": 16,
                      "dropout": 0.0}, merge_adapter=True, packing=True, learning_rate=3e-2, batch_size=4,
                      max_steps=80, max_length=64, eval_steps=40, checkpoint_steps=40, logging_steps=10)
    result = train_sft(lm_rows(8, validation=True), cfg, tmp_path / "sft", progress=False)

    assert result["steps"] == 80
    adapter = load_file(f"{result['adapter_dir']}/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_lm),
                                           result["adapter_dir"])
    for name, param in peft_model.named_parameters():
        if ".base_layer." in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_before[key]), name
    # The merged export answers like the teacher did; the random base model does not.
    answers = [greedy(result["merged_dir"], text) for text, _ in PAIRS]
    assert all(got.startswith(want) for got, (_, want) in zip(answers, PAIRS)), answers
    assert not all(greedy(student_lm, text).startswith(want) for text, want in PAIRS)
    assert (tmp_path / "sft" / "training_curves.png").exists()
    assert any("eval_loss" in h for h in result["history"])


def test_sft_trains_on_completion_tokens_only(tiny_causal_lm):
    """The prompt is in the input but never in the loss: labels are -100 over it."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distill.train.lm import _prompt_completion

    tok = AutoTokenizer.from_pretrained(tiny_causal_lm)
    row = lm_rows(1)[0]
    args = SFTConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", completion_only_loss=True,
                     activation_checkpointing=False, max_length=64)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal_lm), args=args,
                         train_dataset=Dataset.from_list([_prompt_completion(row)]), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = tok.decode(ids[labels != -100], skip_special_tokens=False)
    assert trained.split() == ["lost", "card", "<|end|>"] or trained.strip().startswith("lost card")
    assert "my card is lost" in tok.decode(ids[labels == -100])


def _kd_gap(student_dir, teacher_dir, rows) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    total = 0.0
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"], add_generation_prompt=True)["input_ids"]
        full = tok.apply_chat_template(r["messages"] + [{"role": "assistant", "content": r["target"]}])["input_ids"]
        ids = torch.tensor([full])
        mask = torch.zeros(1, len(full) - 1)
        mask[0, len(prompt) - 1:] = 1
        with torch.no_grad():
            total += token_kd_loss(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1], mask, 1.0).item()
    return total / len(rows)


@pytest.mark.parametrize("on_policy", [0.0, 0.5])
def test_logit_kd_pulls_student_towards_teacher(tmp_path, student_lm, on_policy):
    from conftest import make_tiny_causal_lm

    # Same tokenizer, different weights.
    teacher = sharpen(make_tiny_causal_lm(tmp_path / "teacher-raw", seed=7), tmp_path / "teacher")
    rows = lm_rows(4)
    before = _kd_gap(student_lm, teacher, rows[:4])
    cfg = LogitKDTrain(student_model=student_lm, teacher_model=teacher, temperature=1.0,
                      on_policy_fraction=on_policy, max_new_tokens=4, learning_rate=2e-2, batch_size=4,
                      max_steps=40, max_length=64, eval_steps=20, checkpoint_steps=20)
    result = train_logit_kd(rows, cfg, tmp_path / "kd", progress=False)
    after = _kd_gap(result["model_dir"], teacher, rows[:4])
    assert result["steps"] == 40
    assert after < 0.5 * before, (before, after)


def test_logit_kd_rejects_a_teacher_with_another_tokenizer(tmp_path, tiny_causal_lm):
    from conftest import make_tiny_causal_lm
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    make_tiny_causal_lm(other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    cfg = LogitKDTrain(student_model=tiny_causal_lm, teacher_model=other, max_steps=1)
    with pytest.raises(ConfigError, match="tokenizer"):
        train_logit_kd(lm_rows(1), cfg, tmp_path / "kd", progress=False)
    with pytest.raises(ConfigError, match="teacher_model"):
        train_logit_kd(lm_rows(1), cfg.model_copy(update={"teacher_model": tmp_path / "nope"}), tmp_path / "kd2")
    bad = lm_rows(1)
    bad[2]["target"] = ""
    with pytest.raises(ConfigError, match="id '0-2'.*target"):
        train_sft(bad, cfg, tmp_path / "sft")
