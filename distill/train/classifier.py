"""Training the classification student: soft-label KD with the Hugging Face Trainer.

The student is any `AutoModelForSequenceClassification` encoder. It starts either
from `config.student_model` (a local HF directory) or, DistilBERT-style, from the
first `config.student_layers` layers of `config.init_from_teacher` (a local encoder,
or the packaged MiniLM by name) with a fresh classification head for the task's labels.

Loss: `distill.train.losses.soft_label_kd_loss` (alpha * T^2 * KL(teacher_T || student_T)
+ (1 - alpha) * CE), passed to `Trainer` as `compute_loss_func`. The Trainer calls
that function with the popped `labels` only, so the collator packs everything the
loss needs into one float tensor per batch: column 0 the hard label index, column 1
the example weight, columns 2.. the teacher distribution (zeros when a row has no
soft labels, which the loss treats as cross-entropy only).

Output directory layout:
    checkpoints/            Trainer checkpoints (a rerun resumes from the last one)
    student/                the servable model (LoRA merged in), loadable by ClassifierStudent
    adapter/                the LoRA adapter alone (only with LoRA)
    history.json            Trainer log history (losses, validation metrics per step)
    training_curves.png     the same history as a plot
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.config import ConfigError, TrainConfig
from distill.models.classifier import classifier_logits, pooled_features
from distill.models.encoders import MINILM, linear_head, resolve_encoder
from distill.train.losses import soft_label_kd_loss
from distill.train.trainer import (
    last_checkpoint,
    resolve_device,
    run_trainer,
    save_history,
    split_of,
    training_kwargs,
)


def check_rows(rows: list[dict[str, Any]], labels: list[str]) -> None:
    """Raise ConfigError naming the first training row that cannot be trained on."""
    if not labels:
        raise ConfigError("train: the label set is empty")
    if len(set(labels)) != len(labels):
        raise ConfigError("train: the label set has duplicates")
    known = set(labels)
    n_train = 0
    for i, row in enumerate(rows):
        where = f"training row {i} (id {row.get('id')!r})"
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ConfigError(f"{where}: empty 'text'")
        if row.get("target") not in known:
            raise ConfigError(f"{where}: target {row.get('target')!r} is not in the label set")
        soft = row.get("soft_labels")
        if soft is not None:
            unknown = [k for k in soft if k not in known]
            if unknown:
                raise ConfigError(f"{where}: soft_labels name unknown label(s) {unknown[:3]}")
            if any(not isinstance(v, (int, float)) or v < 0 or math.isnan(v) for v in soft.values()):
                raise ConfigError(f"{where}: soft_labels must be non-negative numbers")
        weight = row.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"{where}: weight must be a non-negative number, got {weight!r}")
        n_train += split_of(row, where) == "train"
    if n_train == 0:
        raise ConfigError("train: no rows with split 'train'")


def build_student(config: TrainConfig, labels: list[str]):
    """(model, tokenizer) for a fresh student with a classification head over `labels`.

    Args:
        config: the train section (student_model, or init_from_teacher + student_layers).
        labels: the task's labels, in the order the head's outputs will follow.
    """
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )


    id2label = dict(enumerate(labels))
    label2id = {l: i for i, l in enumerate(labels)}
    if config.student_model is not None:
        source = Path(config.student_model)
        if not (source / "config.json").exists():
            raise ConfigError(f"train.student_model: {source} is not a model directory (no config.json)")
        overrides: dict[str, Any] = {}
    elif config.init_from_teacher is not None:
        ref = config.init_from_teacher
        # A preset's relative paths are resolved against the preset's folder, which turns the
        # packaged encoder's name into a path that does not exist: read it back as the name.
        if not Path(ref).exists() and Path(ref).name == MINILM:
            ref = MINILM
        try:
            source = resolve_encoder(ref)
        except FileNotFoundError as e:
            raise ConfigError(f"train.init_from_teacher: {e}") from None
        overrides = {"num_hidden_layers": config.student_layers}
    else:
        raise ConfigError("train: set student_model or init_from_teacher")
    model_config = AutoConfig.from_pretrained(source, num_labels=len(labels), id2label=id2label,
                                              label2id=label2id, **overrides)
    # Set as an attribute: from_pretrained drops unknown keyword arguments silently.
    model_config.distill_pooling = config.pooling
    have = AutoConfig.from_pretrained(source).to_dict().get("num_hidden_layers")
    if overrides and have is not None and config.student_layers > have:
        raise ConfigError(f"train.student_layers: {config.student_layers} > the {have} layers of {source}")
    # Loading a truncated encoder reports the dropped upper layers and the fresh head as
    # unexpected/missing keys; both are intended here, so the report is silenced.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        # ignore_mismatched_sizes: a student_model trained for another label set gets a fresh head.
        model = AutoModelForSequenceClassification.from_pretrained(
            source, config=model_config, use_safetensors=True, ignore_mismatched_sizes=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def _encode(rows, tokenizer, labels, max_length):
    index = {l: i for i, l in enumerate(labels)}
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    out = []
    for i, row in enumerate(rows):
        soft = row.get("soft_labels")
        item = {k: enc[k][i] for k in enc.keys()}
        item["label"] = index[row["target"]]
        item["weight"] = float(row.get("weight", 1.0))
        item["soft"] = [float(soft.get(l, 0.0)) for l in labels] if soft else None
        out.append(item)
    return out


class _Collator:
    """Dynamic padding plus the packed label tensor described in the module docstring."""

    def __init__(self, tokenizer, num_labels: int):
        self.tokenizer = tokenizer
        self.num_labels = num_labels

    def __call__(self, items):
        import torch

        features = [{k: v for k, v in it.items() if k not in ("label", "weight", "soft")} for it in items]
        batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        packed = torch.zeros(len(items), 2 + self.num_labels)
        for i, it in enumerate(items):
            packed[i, 0] = it["label"]
            packed[i, 1] = it["weight"]
            if it["soft"] is not None:
                total = sum(it["soft"])
                if total > 0:
                    packed[i, 2:] = torch.tensor(it["soft"]) / total
        batch["labels"] = packed
        return dict(batch)


def _optimizer(model, config: TrainConfig):
    """AdamW with the fresh head on its own (larger) learning rate; the Trainer adds the schedule."""
    import torch

    head_lr = config.head_learning_rate or config.learning_rate
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = "classifier" in name or "score" in name
        # Biases and norms are not decayed, as the Trainer's own optimizer does.
        decay = 0.0 if (name.endswith("bias") or "LayerNorm" in name or "norm" in name) else config.weight_decay
        groups.setdefault((head_lr if is_head else config.learning_rate, decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()])


def linear_probe_head(model, tokenizer, rows: list[dict], labels: list[str], config: TrainConfig) -> None:
    """Initialise the fresh head with a logistic regression on the student's own pooled features.

    Linear probing before fine-tuning (LP-FT, Kumar et al. 2022): a random head sends large,
    noisy gradients into the pretrained layers until it has learnt something, which on a
    77-label task and a CPU budget of a few hundred steps costs most of the run. Fitting the
    head first on frozen features starts fine-tuning from a working classifier.
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression


    index = {l: i for i, l in enumerate(labels)}
    texts = [r["text"] for r in rows]
    y = np.array([index[r["target"]] for r in rows])
    w = np.array([float(r.get("weight", 1.0)) for r in rows])
    feats = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(texts), 256):
            enc = tokenizer(texts[i:i + 256], padding=True, truncation=True, max_length=config.max_length,
                            return_tensors="pt")
            feats.append(pooled_features(model, dict(enc)).float().cpu().numpy())
    clf = LogisticRegression(C=1.0, max_iter=300, random_state=config.seed)
    clf.fit(np.concatenate(feats), y, sample_weight=w)
    # Labels never seen start unlikely, not impossible.
    weight, bias = linear_head(clf, len(labels), absent_bias=-10.0)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(weight))
        model.classifier.bias.copy_(torch.from_numpy(bias))
    model.train()


def _check_mean_head(model) -> None:
    import torch

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(hf, "classifier", None)
    saved = getattr(head, "modules_to_save", None)  # peft wraps a trainable head copy
    if saved is not None and "default" in saved:
        head = saved["default"]
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"train.pooling: 'mean' needs a model whose head is one linear layer "
                          f"(BERT-style); {type(hf).__name__} has another head, use pooling: cls")


_POOLED = None


def _pooled_classifier_class():
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput


    class PooledClassifier(torch.nn.Module):
        """Runs a sequence classifier with mean pooling (see distill.models.classifier.classifier_logits).

        A thin wrapper rather than a model subclass, so the saved student stays a stock
        `AutoModelForSequenceClassification` checkpoint with `distill_pooling` in its config.
        """

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **_):
            enc = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                enc["token_type_ids"] = token_type_ids
            hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            return SequenceClassifierOutput(logits=classifier_logits(hf, enc))

    return PooledClassifier


def PooledClassifier(model):  # noqa: N802 - reads like the class it builds
    # The class is built on first use so importing this module does not import torch.
    global _POOLED
    if _POOLED is None:
        _POOLED = _pooled_classifier_class()
    return _POOLED(model)


def _metrics(eval_pred) -> dict[str, float]:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    packed = eval_pred.label_ids
    pred = logits.argmax(axis=-1)
    out = {"accuracy": float((pred == packed[:, 0].astype(int)).mean())}
    teacher = packed[:, 2:]
    has = teacher.sum(axis=1) > 0
    if has.any():
        out["teacher_agreement"] = float((pred[has] == teacher[has].argmax(axis=1)).mean())
    return out


def train_classifier(rows: list[dict], labels: list[str], config: TrainConfig, out_dir: str | Path,
                     progress: bool = True, callbacks: list | None = None) -> dict:
    """Train a classification student on training rows; see the module docstring for the output layout.

    Args:
        rows: training rows ({"text", "target", "soft_labels", "weight", "split", ...}); rows with
            split "validation" drive early stopping and best-checkpoint selection.
        labels: the label set; the student's head follows this order (config.id2label).
        config: the train section.
        out_dir: run directory for checkpoints and outputs; a rerun on the same directory
            resumes from its last checkpoint (config.resume).
        progress: show progress bars.
        callbacks: extra transformers TrainerCallbacks (e.g. to stop or observe a run).

    Returns:
        {"model_dir", "adapter_dir" (or None), "steps", "history", "best_metric", "curves_png", "train_s"}
    """
    from transformers import set_seed

    check_rows(rows, labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config)
    set_seed(config.seed)
    train_rows = [r for r in rows if r.get("split", "train") == "train"]
    val_rows = [r for r in rows if r.get("split") == "validation"]
    model, tokenizer = build_student(config, labels)
    model = _prepare_student(model, tokenizer, train_rows, labels, config, out_dir)
    train_ds = _encode(train_rows, tokenizer, labels, config.max_length)
    val_ds = _encode(val_rows, tokenizer, labels, config.max_length) if val_rows else None
    trainer = _trainer(model, tokenizer, train_ds, val_ds, labels, config, out_dir, device, progress, callbacks)
    train_s = run_trainer(trainer, out_dir, config)
    model_dir, adapter_dir = _save_student(trainer, tokenizer, labels, config, out_dir)
    history, curves = save_history(trainer, out_dir, f"classifier student ({len(train_ds)} rows)")
    return {"model_dir": str(model_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
            "steps": trainer.state.global_step, "history": history, "best_metric": trainer.state.best_metric,
            "curves_png": str(curves), "train_s": train_s}


def _prepare_student(model, tokenizer, train_rows: list[dict], labels: list[str], config: TrainConfig,
                     out_dir: Path):
    """The fresh student made ready to train: head probed, then LoRA adapters or frozen embeddings."""
    resuming = config.resume and last_checkpoint(out_dir / "checkpoints") is not None
    if config.head_init == "linear_probe" and config.pooling == "mean" and not resuming:
        linear_probe_head(model, tokenizer, train_rows, labels, config)
    if config.lora.enabled:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=config.lora.r, lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout, target_modules=config.lora.target_modules,
            # Mean pooling bypasses BERT's [CLS] pooler: adapters there would never train.
            exclude_modules=r".*pooler.*" if config.pooling == "mean" else None))
    elif config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _trainer(model, tokenizer, train_ds: list[dict], val_ds: list[dict] | None, labels: list[str],
             config: TrainConfig, out_dir: Path, device, progress: bool, callbacks: list | None):
    """The Hugging Face Trainer with the KD loss, the packed collator and early stopping on validation."""
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    def loss_func(outputs, packed, num_items_in_batch=None):
        return soft_label_kd_loss(outputs.logits, packed[:, 2:], packed[:, 0].long(), config.temperature,
                                  config.alpha, weights=packed[:, 1])

    metric = "eval_accuracy" if config.early_stopping_metric == "accuracy" else "eval_loss"
    kwargs = training_kwargs(config, out_dir / "checkpoints", device, val_ds is not None, progress, metric)
    # label_names: a PeftModel hides the forward signature the Trainer would read it from.
    args = TrainingArguments(**kwargs, label_names=["labels"], remove_unused_columns=False)
    extra = list(callbacks or [])
    if val_ds is not None and config.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    if config.pooling == "mean":
        _check_mean_head(model)
        model = PooledClassifier(model)
    return Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                   optimizers=(_optimizer(model, config), None),
                   data_collator=_Collator(tokenizer, len(labels)), compute_loss_func=loss_func,
                   compute_metrics=_metrics if val_ds is not None else None, callbacks=extra)


def _save_student(trainer, tokenizer, labels: list[str], config: TrainConfig, out_dir: Path) -> tuple[Path, Path | None]:
    """Write the servable student (LoRA merged in) and, with LoRA, the adapter alone; return both paths."""
    import torch

    if not trainer.is_world_process_zero():  # train.distributed: rank 0 writes the student for all
        return out_dir / "student", (out_dir / "adapter" if config.lora.enabled else None)
    model = trainer.model
    if config.pooling == "mean":
        model = model.model
    adapter_dir = None
    if config.lora.enabled:
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir)
        # Serving loads a plain model: the adapters are folded into the base weights.
        model = model.merge_and_unload()
    model_dir = out_dir / "student"
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {l: i for i, l in enumerate(labels)}
    model.to(torch.device("cpu")).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, adapter_dir
