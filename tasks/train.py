"""The training task: dispatches on `train.mode` and publishes the training curves.

A retry of this task resumes from the last checkpoint in the same run directory
(`train.resume`), so a worker lost mid-training costs at most `checkpoint_steps` steps.
To train on a GPU work pool, see deployments/gpu.md.
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from distill.config import ConfigError, TrainConfig


def curves_markdown(result: dict, mode: str) -> str:
    """Markdown for the artifact: the curves PNG inline (base64) and the validation history as a table."""
    png = Path(result["curves_png"])
    lines = [f"## Student training ({mode})", "",
             f"steps: {result['steps']}, best validation metric: {result['best_metric']}, "
             f"train time: {result['train_s']:.1f} s", ""]
    if png.exists():
        lines += [f"![training curves](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})", ""]
    evals = [h for h in result["history"] if "eval_loss" in h]
    if evals:
        lines += ["| step | validation loss | validation accuracy |", "|---:|---:|---:|"]
        for h in evals:
            acc = h.get("eval_accuracy")
            lines.append(f"| {h['step']} | {h['eval_loss']:.4f} | {'' if acc is None else f'{acc:.4f}'} |")
    return "\n".join(lines)


@task(name="train-student", retries=1, retry_delay_seconds=5)
def train_student(rows: list[dict], labels: list[str] | None, train: TrainConfig, run_dir: str) -> dict:
    """Train the student for `train.mode` into run_dir/"train" and attach the curves as an artifact.

    Args:
        rows: training rows (distill.data contract).
        labels: the label set (classifier_kd only; None for generative modes).
        train: the train section of the config.
        run_dir: the run directory; checkpoints live under run_dir/train/checkpoints.

    Returns:
        the dict of distill.train.train_classifier or distill.train_lm.train_sft / train_logit_kd.
    """
    out_dir = Path(run_dir) / "train"
    if train.mode == "classifier_kd":
        if not labels:
            raise ConfigError("train.mode classifier_kd needs the task's label set")
        from distill.train import train_classifier

        result = train_classifier(rows, labels, train, out_dir)
    elif train.mode == "sft":
        from distill.train_lm import train_sft

        result = train_sft(rows, train, out_dir)
    else:
        from distill.train_lm import train_logit_kd

        result = train_logit_kd(rows, train, out_dir)
    create_markdown_artifact(markdown=curves_markdown(result, train.mode), key="training-curves",
                             description="Student training and validation curves")
    return result
