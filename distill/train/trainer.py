"""What the classifier and the causal-LM trainers share: device choice, Trainer arguments,
the resumable train call, checkpoints, and the training history with its curves.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.config import ConfigError, TrainConfig
from distill.data import write_text

HISTORY_FILE = "history.json"
RESUME_FILE = "resume.json"


CURVES_FILE = "training_curves.png"

logger = logging.getLogger("distill.train")


def split_of(row: dict[str, Any], where: str) -> str:
    """The row's split ('train' when unset); anything but train/validation is a ConfigError at `where`."""
    split = row.get("split", "train")
    if split not in ("train", "validation"):
        raise ConfigError(f"{where}: split must be 'train' or 'validation', got {split!r}")
    return split


def run_trainer(trainer, out_dir: Path, config: TrainConfig) -> float:
    """Train, continuing from the last complete checkpoint under out_dir when config.resume; returns seconds.

    A resumed run says so in the log and in out_dir/RESUME_FILE ({"checkpoint", "step", "at"}), which
    the run report and a user checking what a rerun did both read.
    """
    resume = last_checkpoint(out_dir / "checkpoints") if config.resume else None
    if resume is not None:
        step = int(Path(resume).name.split("-")[-1])
        print(f"resuming training from {Path(resume).name} (step {step})", flush=True)
        # Under train.distributed every process resumes; rank 0 alone writes what they share.
        if trainer.is_world_process_zero():
            write_text(out_dir / RESUME_FILE, json.dumps({"checkpoint": str(resume), "step": step,
                                                          "at": datetime.now(timezone.utc).isoformat()}))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return time.perf_counter() - started


def resolve_device(config: TrainConfig) -> str:
    """'cuda' or 'cpu'; asking for cuda on a machine without it is a config error, not a silent fallback."""
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def training_kwargs(config: TrainConfig, checkpoint_dir: Path, device: str, has_validation: bool,
                    progress: bool, metric: str) -> dict[str, Any]:
    """TrainingArguments fields shared by every mode (TrainingArguments, SFTConfig and GKDConfig take them)."""
    on_gpu = device == "cuda"
    return dict(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is read as a share of all steps
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(config.batch_size, 64),
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.checkpoint_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=has_validation,
        metric_for_best_model=metric if has_validation else None,
        greater_is_better=metric.endswith("accuracy") if has_validation else None,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not on_gpu,
        bf16=bool(config.bf16 and on_gpu),
        activation_checkpointing=bool(config.gradient_checkpointing and on_gpu),
        report_to="none",
        disable_tqdm=not progress,
        # Each loss here is already a per-batch mean; scaling by the process count would
        # multiply the effective learning rate under multi-GPU `accelerate launch`.
        average_tokens_across_devices=False,
        **distributed_kwargs(config, device),
    )


def distributed_kwargs(config: TrainConfig, device: str) -> dict[str, Any]:
    """TrainingArguments fields for train.distributed: the DDP backend and, for LM students, FSDP.

    They only take effect in a process started by a launcher (train.distributed, distill.train.distributed);
    a one-process run ignores the backend and gets no FSDP.
    """
    dist = config.distributed
    if not dist.enabled:
        return {}
    backend = dist.backend if dist.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device != "cuda":
        raise ConfigError("train.distributed.backend: nccl needs CUDA; use gloo (or auto) to train on CPU")
    out: dict[str, Any] = {"ddp_backend": backend}
    if getattr(dist, "strategy", "ddp") == "fsdp":
        if device != "cuda":  # accelerate builds its FSDP plugin for GPU process groups only: on CPU it would run DDP
            raise ConfigError("train.distributed.strategy: fsdp shards across GPUs only (accelerate ignores it on "
                              "CPU and would train plain DDP); use strategy ddp on CPU, or train.device cuda")
        out["fsdp"] = "full_shard auto_wrap" + (" offload" if dist.fsdp_cpu_offload else "")
        out["fsdp_config"] = {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                              "cpu_ram_efficient_loading": False}
    return out


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end, or None.

    The Trainer writes trainer_state.json last and not atomically: a process killed while saving
    leaves a folder without it, or with half of it, and resuming from that folder would fail.
    """
    if not checkpoint_dir.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in checkpoint_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _step, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("skipping %s: written only in part (no readable trainer_state.json)", path)
            continue
        return str(path)
    return None


def save_history(trainer, out_dir: Path, title: str) -> tuple[list[dict], Path]:
    """history.json and training_curves.png from the Trainer's log history."""
    history = [dict(h) for h in trainer.state.log_history]
    if not trainer.is_world_process_zero():  # train.distributed: rank 0 writes for all
        return history, out_dir / CURVES_FILE
    write_text(out_dir / HISTORY_FILE, json.dumps(history, indent=1))
    return history, plot_curves(history, out_dir / CURVES_FILE, title)


def plot_curves(history: list[dict], path: Path, title: str) -> Path:
    """Training loss, validation loss and validation accuracy against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    acc = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), marker="s", color="tab:green", label="validation accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
