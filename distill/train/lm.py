"""Training a causal-LM student: LoRA SFT on teacher completions, and token-level logit KD.

SFT (`train_sft`): trl's `SFTTrainer` on prompt-completion pairs in the conversational
format, so the prompt is rendered with the tokenizer's chat template exactly as in
production and the loss covers the completion tokens only (trl's completion mask).
Short examples are packed into `max_length` blocks (best-fit decreasing), one block per row
with position ids and, where the attention kernel needs it, a block-diagonal mask, so packed
examples never attend to each other (distill/train/packing.py).

Logit KD (`train_logit_kd`): for a local teacher that shares the student's tokenizer.
The data flow and the on-policy option come from trl's GKD trainer
(`trl.experimental.gkd`): with probability `on_policy_fraction` a batch's completions
are sampled from the student itself (GKD, Agarwal et al. 2024) and the teacher scores
them; otherwise the teacher's completions from the dataset are used. The loss is
`distill.train.losses.token_kd_loss`, forward KL(teacher_T || student_T) * T^2 on completion
tokens, rather than GKD's built-in JSD, so that T means the same thing in every mode.

Output directory layout:
    checkpoints/   Trainer checkpoints (a rerun resumes from the last one)
    adapter/       the LoRA adapter (adapter_model.safetensors + adapter_config.json)
    merged/        the adapter merged into the base model (config.merge_adapter)
    model/         the full model (full fine-tuning, no LoRA)
    history.json, training_curves.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import ConfigError, TrainConfig
from distill.models.encoders import MINILM
from distill.train.losses import token_kd_loss
from distill.train.trainer import (
    resolve_device,
    run_trainer,
    save_history,
    split_of,
    training_kwargs,
)


def check_lm_rows(rows: list[dict[str, Any]]) -> None:
    """Raise ConfigError naming the first row that lacks a chat prompt or a target completion."""
    n_train = 0
    for i, row in enumerate(rows):
        where = f"training row {i} (id {row.get('id')!r})"
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} messages")
        if messages[-1]["role"] == "assistant":
            raise ConfigError(f"{where}: 'messages' is the prompt and must not end with an assistant turn")
        if not isinstance(row.get("target"), str) or not row["target"]:
            raise ConfigError(f"{where}: empty 'target' completion")
        n_train += split_of(row, where) == "train"
    if n_train == 0:
        raise ConfigError("train: no rows with split 'train'")


def resolve_student(config: TrainConfig, out_dir: Path, rows: list[dict] | None = None) -> Path | None:
    """The student's model directory; the packaged MiniLM's name builds its first student_layers
    layers as a causal LM into out_dir/base (distill.models.decoder), once per run directory, with
    the vocabulary trimmed to the word pieces of `rows` (prompts and targets) when given."""
    if str(config.student_model) == MINILM:
        from distill.models.decoder import minilm_decoder

        corpus = [m["content"] for r in rows or [] for m in r["messages"]] + [r["target"] for r in rows or []]
        return minilm_decoder(out_dir / "base", config.student_layers, corpus or None)
    return config.student_model


def load_causal_lm(path: Path | None, field: str, device: str, bf16: bool):
    """(model, tokenizer) from a local directory; a missing pad token falls back to EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None or not (Path(path) / "config.json").exists():
        raise ConfigError(f"train.{field}: {path} is not a local model directory (no config.json); a Hub id "
                          "must be downloaded first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`")
    dtype = torch.bfloat16 if bf16 and device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ConfigError(f"train.{field}: {path} has no chat template; the production chat format needs one")
    return model, tokenizer


def lora_config(config: TrainConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.lora.r, lora_alpha=config.lora.alpha,
                      lora_dropout=config.lora.dropout, target_modules=config.lora.target_modules)


def _split(rows, to_example):
    from datasets import Dataset

    train = [to_example(r) for r in rows if r.get("split", "train") == "train"]
    val = [to_example(r) for r in rows if r.get("split") == "validation"]
    return Dataset.from_list(train), (Dataset.from_list(val) if val else None)


def _prompt_completion(row):
    return {"prompt": row["messages"], "completion": [{"role": "assistant", "content": row["target"]}]}


def _chat(row):
    return {"messages": row["messages"] + [{"role": "assistant", "content": row["target"]}]}


def _common_kwargs(config: TrainConfig, out_dir: Path, device: str, has_val: bool, progress: bool):
    kwargs = training_kwargs(config, out_dir / "checkpoints", device, has_val, progress, "eval_loss")
    kwargs["max_length"] = config.max_length
    if kwargs["activation_checkpointing"]:
        # Non-reentrant checkpointing is the variant that works with frozen base weights (LoRA).
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return kwargs


def _callbacks(config: TrainConfig, has_val: bool, callbacks):
    from transformers import EarlyStoppingCallback

    extra = list(callbacks or [])
    if has_val and config.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    return extra


def _export(trainer, tokenizer, config: TrainConfig, out_dir: Path) -> dict[str, str | None]:
    """Adapter (and optionally the merged model), or the full model without LoRA; safetensors only."""
    import torch

    model = trainer.model
    # train.distributed FSDP: each process holds a shard; gathering the full weights takes them all.
    state = trainer.accelerator.get_state_dict(model) if trainer.is_fsdp_enabled else None
    if not trainer.is_world_process_zero():  # rank 0 writes the student; only its summary is read
        return {"model_dir": None, "adapter_dir": None, "merged_dir": None}
    if not config.lora.enabled:
        model_dir = out_dir / "model"
        (model if state is not None else model.to(torch.device("cpu"))).save_pretrained(model_dir, state_dict=state)
        tokenizer.save_pretrained(model_dir)
        return {"model_dir": str(model_dir), "adapter_dir": None, "merged_dir": None}
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir, state_dict=state)
    tokenizer.save_pretrained(adapter_dir)
    merged_dir = None
    if config.merge_adapter:
        merged_dir = out_dir / "merged"
        if state is not None:  # sharded weights cannot be merged in place: merge a fresh copy
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
        merged = model.merge_and_unload().to(torch.device("cpu"))
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
    return {"model_dir": str(merged_dir or adapter_dir), "adapter_dir": str(adapter_dir),
            "merged_dir": str(merged_dir) if merged_dir else None}


def _finish(trainer, tokenizer, config, out_dir, train_s: float, title) -> dict:
    paths = _export(trainer, tokenizer, config, out_dir)
    history, curves = save_history(trainer, out_dir, title)
    return {**paths, "steps": trainer.state.global_step, "history": history,
            "best_metric": trainer.state.best_metric, "curves_png": str(curves), "train_s": train_s,
            "sharded": bool(trainer.is_fsdp_enabled)}


def _causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """Next-token cross entropy over the completion tokens (labels -100 elsewhere), from the model's logits."""
    import torch.nn.functional as F

    logits, target = outputs.logits[:, :-1].float(), labels[:, 1:].to(outputs.logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch else (target != -100).sum().clamp(min=1))


def _sft_trainer_class(model):
    """trl's SFTTrainer, or for a BERT student one whose loss comes from the model's own logits.

    trl scores tokens by multiplying the backbone's last hidden states with the output layer's
    weight directly; BERT's LM head has a transform (dense, activation, LayerNorm) before that
    layer, which the fused path never trains while generation uses it (the MiniLM decoder student).
    trl's `compute_loss_func` would give that loss too, but then runs a second, fused forward for
    its token metrics on every step; overriding compute_loss, the extension point trl names for a
    custom loss, costs one forward.
    """
    from trl import SFTTrainer

    if model.config.model_type != "bert":
        return SFTTrainer

    class OwnHeadSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            loss = _causal_lm_loss(outputs, inputs["labels"], num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as trl does: DDP averages the gradients across ranks
            return (loss, outputs) if return_outputs else loss

    return OwnHeadSFTTrainer


def sft_trainer(rows: list[dict], config: TrainConfig, out_dir: Path, progress: bool = True,
                callbacks: list | None = None):
    """(trl SFTTrainer ready to train, tokenizer): the student, its rows and the batches train_sft uses.

    With packing, packs go one per row of at most max_length tokens unless the attention kernel reads
    packed position ids (distill.train.packing explains why trl's single-row batches are not used there).
    """
    from transformers import set_seed
    from trl import SFTConfig

    from distill.train.packing import collate_packs, isolate_packed_examples, needs_own_rows

    check_lm_rows(rows)
    device = resolve_device(config)
    set_seed(config.seed)
    model, tokenizer = load_causal_lm(resolve_student(config, out_dir, rows), "student_model", device, config.bf16)
    train_ds, val_ds = _split(rows, _prompt_completion)
    args = SFTConfig(**_common_kwargs(config, out_dir, device, val_ds is not None, progress),
                     packing=config.packing, completion_only_loss=True, eval_packing=False)
    trainer = _sft_trainer_class(model)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        callbacks=_callbacks(config, val_ds is not None, callbacks),
        peft_config=lora_config(config) if config.lora.enabled else None)
    if config.packing and needs_own_rows(model):
        # trl insists on its padding-free collator for packed data at construction; the Trainer reads
        # data_collator only when it builds a dataloader, so it is swapped here, for training and evaluation.
        trainer.data_collator = collate_packs(tokenizer.pad_token_id)
        isolate_packed_examples(trainer.model)
    return trainer, tokenizer


def train_sft(rows: list[dict], config: TrainConfig, out_dir: str | Path, progress: bool = True,
              callbacks: list | None = None) -> dict:
    """Supervised fine-tuning of config.student_model on (production prompt, teacher completion) pairs.

    Args:
        rows: training rows with "messages" (the production chat, without the answer) and
            "target" (the teacher's completion); split "validation" rows drive early stopping.
        config: the train section (student_model, lora, packing, bf16, gradient_checkpointing...).
        out_dir: run directory; a rerun on the same directory resumes from its last checkpoint.
        progress: show progress bars.
        callbacks: extra transformers TrainerCallbacks.

    Returns:
        {"model_dir", "adapter_dir", "merged_dir", "steps", "history", "best_metric", "curves_png", "train_s"}
    """
    out_dir = Path(out_dir)
    trainer, tokenizer = sft_trainer(rows, config, out_dir, progress, callbacks)
    train_s = run_trainer(trainer, out_dir, config)
    n_train = len(trainer.train_dataset)
    return _finish(trainer, tokenizer, config, out_dir, train_s, f"SFT student ({n_train} training sequences)")


def _token_kd_trainer(temperature: float):
    """trl's GKD trainer with its loss replaced by distill.train.losses.token_kd_loss.

    Subclassing is the extension point the Trainer documents for a custom loss that
    needs more than the labels (here: a second model's logits).
    """
    from trl.experimental.gkd import GKDTrainer


    class TokenKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            self.teacher_model.eval()
            with torch.no_grad():
                teacher = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            # Logits at position i predict token i + 1; labels are -100 on the prompt and padding.
            mask = inputs["labels"][:, 1:] != -100
            loss = token_kd_loss(outputs.logits[:, :-1, :], teacher.logits[:, :-1, :], mask, temperature)
            return (loss, outputs) if return_outputs else loss

    return TokenKDTrainer


def train_logit_kd(rows: list[dict], config: TrainConfig, out_dir: str | Path, progress: bool = True,
                   callbacks: list | None = None) -> dict:
    """Token-level KD of config.student_model against config.teacher_model's logits.

    Args:
        rows: training rows with "messages" (prompt) and "target" (the teacher's completion,
            used for the off-policy share of batches).
        config: the train section; temperature is the KL temperature, on_policy_fraction the
            share of batches whose completions the student samples itself (max_new_tokens long).
        out_dir: run directory; a rerun on the same directory resumes from its last checkpoint.
        progress: show progress bars.
        callbacks: extra transformers TrainerCallbacks.

    Returns:
        the same dict as train_sft.
    """
    from transformers import set_seed
    from trl.experimental.gkd import GKDConfig

    check_lm_rows(rows)
    out_dir = Path(out_dir)
    device = resolve_device(config)
    set_seed(config.seed)
    model, tokenizer = load_causal_lm(resolve_student(config, out_dir), "student_model", device, config.bf16)
    teacher, teacher_tok = load_causal_lm(config.teacher_model, "teacher_model", device, config.bf16)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError("train.teacher_model: the teacher's tokenizer differs from the student's; "
                          "token-level KD needs a shared vocabulary (use sft on teacher completions instead)")
    train_ds, val_ds = _split(rows, _chat)
    args = GKDConfig(**_common_kwargs(config, out_dir, device, val_ds is not None, progress),
                     lmbda=config.on_policy_fraction, beta=0.0, temperature=1.0,
                     max_new_tokens=config.max_new_tokens, seq_kd=False, disable_dropout=True)
    trainer = _token_kd_trainer(config.temperature)(
        model=model, teacher_model=teacher, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        processing_class=tokenizer, callbacks=_callbacks(config, val_ds is not None, callbacks),
        peft_config=lora_config(config) if config.lora.enabled else None)
    train_s = run_trainer(trainer, out_dir, config)
    return _finish(trainer, tokenizer, config, out_dir, train_s, f"logit-KD student ({len(train_ds)} rows)")
