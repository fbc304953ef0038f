import json
import random

import pytest
import torch

from distill.config import ClassifierKDTrain, ConfigError
from distill.models.classifier import ClassifierStudent
from distill.train.classifier import build_student, train_classifier

LABELS = ["positive", "negative", "neutral"]
KEYWORDS = {"positive": ["great", "love", "good"], "negative": ["terrible", "hate", "bad"],
            "neutral": ["ok", "fine", "neutral"]}
FILLER = "the my card app money transfer account balance is a to of please".split()


def _tiny_bert(directory, labels: list[str] | None = None, num_layers: int = 4, seed: int = 0):
    """A random tiny BERT (encoder, or classifier over `labels`) with a WordPiece vocabulary
    that covers the toy words, saved and reloaded through from_pretrained."""
    from transformers import (
        AutoModel,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizer,
    )

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ws in KEYWORDS.values() for w in ws} | set(FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + list("abcdefghijklmnopqrstuvwxyz")
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    assert tok.tokenize("great card") == ["great", "card"]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    if labels is None:
        BertModel(cfg).save_pretrained(directory)
        AutoModel.from_pretrained(directory)
    else:
        cfg.num_labels, cfg.id2label = len(labels), dict(enumerate(labels))
        cfg.label2id = {l: i for i, l in enumerate(labels)}
        BertForSequenceClassification(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("clf"), labels=LABELS, num_layers=2)


def toy_text(rng: random.Random, label: str) -> str:
    words = [rng.choice(KEYWORDS[label])] + rng.sample(FILLER, rng.randint(3, 6))
    rng.shuffle(words)
    return " ".join(words)


def toy_teacher(text: str, rng: random.Random) -> dict[str, float]:
    """A tiny bag-of-words teacher: confident about the keyword's class, with some noise."""
    scores = {l: sum(w in KEYWORDS[l] for w in text.split()) * 3.0 + rng.gauss(0, 0.3) for l in LABELS}
    z = {l: torch.tensor(s).exp().item() for l, s in scores.items()}
    return {l: v / sum(z.values()) for l, v in z.items()}


def toy_rows(n: int, seed: int, validation_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = toy_text(rng, LABELS[i % 3])
        soft = toy_teacher(text, rng)
        rows.append({"id": f"r{i}", "text": text, "messages": [], "target": max(soft, key=soft.get),
                     "soft_labels": soft, "source": "teacher", "weight": 1.0,
                     "split": "validation" if validation_every and i % validation_every == 0 else "train"})
    return rows


def test_kd_student_reaches_teacher_agreement(tmp_path, tiny_encoder):
    rows = toy_rows(480, seed=0, validation_every=8)
    rows[1]["soft_labels"] = None  # a gold row without a teacher distribution trains on CE only
    # The stock [CLS] head: a random tiny encoder has no sentence features worth mean-pooling
    # (the mean-pooled, linear-probed path is what the BANKING77 demo test trains).
    cfg = ClassifierKDTrain(init_from_teacher=tiny_encoder, student_layers=2, learning_rate=3e-3, batch_size=16,
                      pooling="cls", head_init="random", epochs=8, eval_steps=20, checkpoint_steps=40, logging_steps=5, max_length=16)
    result = train_classifier(rows, LABELS, cfg, tmp_path / "run", progress=False)

    student = ClassifierStudent(result["model_dir"])
    assert student.labels == LABELS
    held_out = toy_rows(150, seed=1)
    predicted = student.predict([r["text"] for r in held_out])
    agreement = sum(p == r["target"] for p, r in zip(predicted, held_out)) / len(held_out)
    assert agreement >= 0.95, agreement

    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    assert not list((tmp_path / "run" / "student").glob("*.bin"))
    assert (tmp_path / "run" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert any("eval_accuracy" in h for h in history) and any("loss" in h for h in history)
    assert result["steps"] > 0 and result["best_metric"] is not None

    from distill_tasks.train import curves_markdown

    markdown = curves_markdown(result, "classifier_kd")
    assert "data:image/png;base64,iVBORw0KGgo" in markdown and "| step | validation loss |" in markdown


def test_student_initialised_from_first_teacher_layers(tiny_encoder):
    from transformers import AutoModel

    model, tokenizer = build_student(ClassifierKDTrain(init_from_teacher=tiny_encoder, student_layers=2), LABELS)
    teacher = AutoModel.from_pretrained(tiny_encoder)
    assert len(model.bert.encoder.layer) == 2
    for i in range(2):
        for (name, a), (_, b) in zip(model.bert.encoder.layer[i].named_parameters(),
                                     teacher.encoder.layer[i].named_parameters()):
            assert torch.equal(a, b), name
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert model.classifier.out_features == 3 and model.config.id2label == dict(enumerate(LABELS))
    with pytest.raises(ConfigError, match="student_layers"):
        build_student(ClassifierKDTrain(init_from_teacher=tiny_encoder, student_layers=9), LABELS)


def test_lora_changes_adapters_only_and_merges_into_saved_student(tmp_path, tiny_classifier):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    cfg = ClassifierKDTrain(student_model=tiny_classifier, lora={"enabled": True, "r": 4, "alpha": 8}, max_steps=12,
                      learning_rate=1e-2, batch_size=8, eval_steps=12, checkpoint_steps=12, max_length=16)
    result = train_classifier(toy_rows(96, seed=2), LABELS, cfg, tmp_path / "run", progress=False)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    base.config.distill_pooling = "mean"  # what training recorded in the student's config
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = load_file(f"{result['adapter_dir']}/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means trained

    peft_model = PeftModel.from_pretrained(base, result["adapter_dir"])
    for name, param in peft_model.named_parameters():
        if ".base_layer." in name:  # frozen base weights under the adapters are untouched
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, before[key]), name

    merged = ClassifierStudent(result["model_dir"])
    texts = ["great card", "terrible app", "ok balance"]
    enc = merged.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        from distill.models.classifier import classifier_logits

        expected = classifier_logits(peft_model.eval().get_base_model(), dict(enc)).numpy()
    assert merged.logits(texts) == pytest.approx(expected, abs=1e-4)
    saved = AutoModelForSequenceClassification.from_pretrained(result["model_dir"])
    assert not any("lora" in k for k in saved.state_dict())


class _Crash:
    """A TrainerCallback that kills the run after a given step, like a lost worker."""

    def __init__(self, step: int):
        self.step = step

    def __getattr__(self, name):  # every other callback event is a no-op
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("worker lost")


def test_resume_after_crash_continues_the_same_run(tmp_path, tiny_encoder):
    rows = toy_rows(64, seed=3)
    cfg = ClassifierKDTrain(init_from_teacher=tiny_encoder, max_steps=10, batch_size=8, eval_steps=4,
                      checkpoint_steps=4, save_total_limit=5, learning_rate=1e-3, max_length=16, logging_steps=1)
    with pytest.raises(RuntimeError, match="worker lost"):
        train_classifier(rows, LABELS, cfg, tmp_path / "crashed", progress=False, callbacks=[_Crash(7)])
    assert (tmp_path / "crashed" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "crashed" / "student").exists()

    resumed = train_classifier(rows, LABELS, cfg, tmp_path / "crashed", progress=False)
    straight = train_classifier(rows, LABELS, cfg, tmp_path / "straight", progress=False)
    assert resumed["steps"] == straight["steps"] == 10
    logged = [h["step"] for h in resumed["history"] if "loss" in h]
    assert logged == list(range(1, 11))  # steps 1-4 restored from the checkpoint, 5-10 trained once more
    a = ClassifierStudent(resumed["model_dir"]).model.state_dict()
    b = ClassifierStudent(straight["model_dir"]).model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_bad_rows_fail_before_training(tmp_path, tiny_encoder):
    rows = toy_rows(6, seed=4)
    rows[3]["target"] = "furious"
    cfg = ClassifierKDTrain(init_from_teacher=tiny_encoder)
    with pytest.raises(ConfigError, match=r"id 'r3'.*furious"):
        train_classifier(rows, LABELS, cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="multiple of eval_steps"):
        ClassifierKDTrain(eval_steps=30, checkpoint_steps=200)
