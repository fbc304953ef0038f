"""Exports of a causal-LM student: the vLLM LoRA layout (checked against the base and loaded by
PEFT, since vLLM cannot run here), a LoRA student served as an adapter and merged, and the
speculative draft."""

import json

import httpx
import pytest
import torch

from distill.config import ConfigError, SFTTrain
from distill.httpserver import start_in_thread
from distill.models.export import export_draft, export_vllm_lora, same_tokenizer

SYSTEM = {"role": "system", "content": "classify the message"}
PAIRS = [("my card is lost", "lost card"), ("refund pending please", "refund pending")]
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def lora_student(tiny_causal_lm, tmp_path_factory):
    """A LoRA student as train_sft writes it (adapter/ and merged/), a few steps away from its base."""
    from distill.train.lm import train_sft

    rows = [{"id": f"{i}-{j}", "text": t, "target": a, "messages": [SYSTEM, {"role": "user", "content": t}],
             "soft_labels": None, "source": "teacher", "weight": 1.0, "split": "train"}
            for i in range(4) for j, (t, a) in enumerate(PAIRS)]
    cfg = SFTTrain(student_model=tiny_causal_lm, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
                   merge_adapter=True, learning_rate=5e-2, batch_size=4, max_steps=4, max_length=64,
                   eval_steps=4, checkpoint_steps=4, logging_steps=4)
    return train_sft(rows, cfg, tmp_path_factory.mktemp("lora") / "sft", progress=False)


def _logits(model, tok, text: str):
    ids = tok.apply_chat_template([SYSTEM, {"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0, -1]


def test_vllm_lora_layout_matches_the_base_and_loads_in_peft(lora_student, tiny_causal_lm, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_vllm_lora(lora_student["adapter_dir"], tmp_path / "vllm", base_model="org/tiny-base",
                           base_dir=tiny_causal_lm)
    d = tmp_path / "vllm"
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-base" and cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["bias"] == "none"
    assert set(cfg["target_modules"]) == LINEAR  # all-linear, resolved to the base's own module names
    assert out["command"] == f"vllm serve org/tiny-base --enable-lora --max-lora-rank 16 --lora-modules student={d}"

    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    modules = dict(base.named_modules())
    weights = load_file(d / "adapter_model.safetensors")
    layers = base.config.num_hidden_layers
    assert len(weights) == 2 * layers * len(LINEAR)
    for key, w in weights.items():
        module, _, part = key.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".lora_")
        layer = modules[module]  # the base model's own module path
        assert isinstance(layer, torch.nn.Linear)
        assert tuple(w.shape) == ((4, layer.in_features) if part == "A" else (layer.out_features, 4)), key

    tok = AutoTokenizer.from_pretrained(tiny_causal_lm)
    loaded = PeftModel.from_pretrained(base, d).eval()
    original = AutoPeftModelForCausalLM.from_pretrained(lora_student["adapter_dir"]).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    for text, _ in PAIRS:
        assert torch.allclose(_logits(loaded, tok, text), _logits(original, tok, text), atol=1e-5)
        assert not torch.allclose(_logits(loaded, tok, text), _logits(plain, tok, text), atol=1e-3)


def test_vllm_lora_export_refuses_what_vllm_cannot_load(lora_student, tiny_causal_lm, tmp_path):
    import shutil

    for change, words in [({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"use_dora": True}, "DoRA"),
                          ({"bias": "all"}, "bias")]:
        bad = tmp_path / f"bad-{words}"
        shutil.copytree(lora_student["adapter_dir"], bad)
        cfg = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ConfigError, match=words) as e:
            export_vllm_lora(bad, tmp_path / f"out-{words}", base_dir=tiny_causal_lm)
        assert "adapter_config.json" in str(e.value) and not (tmp_path / f"out-{words}").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        export_vllm_lora(lora_student["adapter_dir"], tmp_path / "full", base_dir=tiny_causal_lm)


def test_lora_student_serves_as_adapter_and_merged_alike(lora_student):
    from distill.models.causal import GenerativeStudent
    from distill.serve.generative import create_generative_app

    answers = []
    for d in (lora_student["adapter_dir"], lora_student["merged_dir"]):
        student = GenerativeStudent(d, max_new_tokens=6, device="cpu")
        assert student.model.__class__.__name__.startswith("Peft") == (d == lora_student["adapter_dir"])
        with start_in_thread(create_generative_app(student, model_name="s", api_key="k")) as server:
            r = httpx.post(f"{server.url}/v1/chat/completions", headers={"authorization": "Bearer k"}, timeout=60,
                           json={"model": "s", "logprobs": True,
                                 "messages": [SYSTEM, {"role": "user", "content": PAIRS[0][0]}]})
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0])
    assert answers[0]["message"]["content"] == answers[1]["message"]["content"]
    assert [t["logprob"] for t in answers[0]["logprobs"]["content"]] == pytest.approx(
        [t["logprob"] for t in answers[1]["logprobs"]["content"]], abs=1e-4)


def test_draft_export_needs_the_teachers_tokenizer(lora_student, tiny_causal_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import build_bert_tokenizer

    out = export_draft(lora_student["adapter_dir"], tmp_path / "draft", teacher_dir=tiny_causal_lm)
    assert (tmp_path / "draft" / "config.json").exists() and not (tmp_path / "draft" / "adapter_config.json").exists()
    assert same_tokenizer(tmp_path / "draft", tiny_causal_lm) is None
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(lora_student["merged_dir"]).state_dict()
    assert all(torch.allclose(draft[k], merged[k], atol=1e-6) for k in merged)  # the adapter is merged in
    assert json.loads(out["vllm_speculative_config"]) == {"model": str(tmp_path / "draft"), "num_speculative_tokens": 5}
    other = build_bert_tokenizer(tmp_path / "bert-tok")
    assert other is not None
    (tmp_path / "bert-tok" / "config.json").write_text((tiny_causal_lm / "config.json").read_text())
    with pytest.raises(ConfigError, match="tokenizer"):
        export_draft(lora_student["merged_dir"], tmp_path / "draft2", teacher_dir=tmp_path / "bert-tok")
    assert not (tmp_path / "draft2").exists()


def test_export_commands_print_the_vllm_commands(lora_student, tiny_causal_lm, tmp_path):
    from typer.testing import CliRunner

    from distill.cli import app

    r = CliRunner().invoke(app, ["export", "lora", lora_student["adapter_dir"], str(tmp_path / "v"),
                                 "--base-model", "org/base", "--base-dir", str(tiny_causal_lm)])
    assert r.exit_code == 0, r.output
    assert f"vllm serve org/base --enable-lora --max-lora-rank 16 --lora-modules student={tmp_path / 'v'}" in r.output
    again = CliRunner().invoke(app, ["export", "lora", lora_student["adapter_dir"], str(tmp_path / "v")])
    assert again.exit_code == 2 and "not empty" in again.output
    d = CliRunner().invoke(app, ["export", "draft", lora_student["merged_dir"], str(tmp_path / "d"),
                                 "--teacher", str(tiny_causal_lm)])
    assert d.exit_code == 0, d.output
    assert "--speculative-config" in d.output and '"num_speculative_tokens": 5' in d.output


def test_greedy_output_with_the_draft_is_the_teachers_alone(lora_student, tiny_causal_lm, tmp_path):
    """Speculative decoding must not change what the teacher says: with the exported draft as
    transformers' assistant_model, greedy output equals the teacher decoding alone, on prompts where
    the draft itself would answer otherwise (so its proposals are really rejected and corrected)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import make_tiny_causal_lm

    teacher_dir = make_tiny_causal_lm(tmp_path / "teacher", seed=3)  # same tokenizer, other weights
    export_draft(lora_student["merged_dir"], tmp_path / "draft", teacher_dir=teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    differs = 0
    for text in ["my card is lost", "refund pending please", "exchange rate fee", "top up declined"]:
        ids = tok.apply_chat_template([SYSTEM, {"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")
        greedy = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12, "pad_token_id": tok.pad_token_id}
        with torch.no_grad():
            alone = teacher.generate(**ids, **greedy)
            assisted = teacher.generate(**ids, assistant_model=draft, **greedy)
            drafted = draft.generate(**ids, **greedy)
        assert assisted.tolist() == alone.tolist(), text
        differs += drafted.tolist() != alone.tolist()
    assert differs > 0
