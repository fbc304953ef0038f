"""The training task: dispatches on `train.mode` and publishes the training curves.

A retry of this task resumes from the last checkpoint in the same run directory
(`train.resume`), so a worker lost mid-training costs at most `checkpoint_steps` steps.
`train_where_configured` runs it here, or, when `train.deployment` is set, as the
`train-student` deployment on a (GPU) work pool (flows/train_student.py, deployments/gpu.md).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from distill.config import ConfigError, TrainConfig

# The remote flow's summary in the store, and the summary keys that hold paths under run_dir/train.
RESULT_FILE = "result.json"
RESULT_PATHS = ("model_dir", "adapter_dir", "merged_dir", "curves_png")


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
def train_student(rows_path: str, labels: list[str] | None, train: TrainConfig, run_dir: str) -> dict:
    """Train the student for `train.mode` into run_dir/"train" and attach the curves as an artifact.

    Args:
        rows_path: JSONL training rows (distill.data contract), read here: rows never travel as task
            arguments.
        labels: the label set (classifier_kd only; None for generative modes).
        train: the train section of the config.
        run_dir: the run directory; checkpoints live under run_dir/train/checkpoints.

    Returns:
        the dict of distill.train.classifier.train_classifier or distill.train.lm.train_sft / train_logit_kd;
        with train.distributed enabled, that of rank 0 of distill.train.distributed.train_distributed.
    """
    out_dir = Path(run_dir) / "train"
    if train.mode == "classifier_kd" and not labels:
        raise ConfigError("train.mode classifier_kd needs the task's label set")
    if train.distributed.enabled:
        from distill.train.distributed import train_distributed

        # Every process reads the rows from the same file.
        result = train_distributed(rows_path, labels if train.mode == "classifier_kd" else None, train, out_dir)
    else:
        from distill.data import read_jsonl

        rows = read_jsonl(rows_path)
        if train.mode == "classifier_kd":
            from distill.train.classifier import train_classifier

            result = train_classifier(rows, labels, train, out_dir)
        elif train.mode == "sft":
            from distill.train.lm import train_sft

            result = train_sft(rows, train, out_dir)
        else:
            from distill.train.lm import train_logit_kd

            result = train_logit_kd(rows, train, out_dir)
    create_markdown_artifact(markdown=curves_markdown(result, train.mode), key="training-curves",
                             description="Student training and validation curves")
    return result


def train_where_configured(rows_path: str, labels: list[str] | None, train: TrainConfig, run_dir: str,
                           run_id: str, store: str) -> dict:
    """Train here, or as the `train.deployment` Prefect deployment when one is configured.

    Args:
        rows_path: JSONL training rows (distill.data contract).
        labels: the label set (classifier_kd only; None for generative modes).
        train: the train section of the config.
        run_dir: the local run directory; the student ends up in run_dir/train either way.
        run_id: the run's id, which names its folder in the store.
        store: the store URI; with a deployment it carries the rows out and the student back, so the
            worker must reach it (s3://..., or a directory both machines mount at the same path).

    Returns:
        the dict of `train_student` ({"model_dir", "steps", "history", "best_metric", "curves_png",
        "train_s", ...}); a remote run adds "flow_run_id".
    """
    if train.deployment is None:
        return train_student(rows_path, labels, train, run_dir)
    return train_on_deployment(rows_path, labels, train, run_dir, run_id, store)


def train_on_deployment(rows_path: str, labels: list[str] | None, train: TrainConfig, run_dir: str,
                        run_id: str, store: str) -> dict:
    """Upload the rows, run `train.deployment`, wait for it, and fetch the student into run_dir/train.

    Same arguments and return value as `train_where_configured`. Raises RuntimeError when the
    remote run does not complete (failed, crashed, cancelled, or still waiting at
    `train.deployment_timeout_s`).
    """
    from prefect.deployments import run_deployment

    from distill.store import LocalStore, open_store

    target = open_store(store)
    # The rows are in the store before the remote run is started, so a lost worker never loses them.
    put = target.put_file(Path(rows_path), f"{run_id}/dataset.jsonl")
    parameters = {"dataset_uri": put["key"], "dataset_sha256": put["sha256"], "labels": labels,
                  "train": train.model_dump(mode="json"), "run_id": run_id, "store": store}
    run = run_deployment(train.deployment, parameters=parameters, job_variables=train.job_variables or None,
                         timeout=train.deployment_timeout_s, poll_interval=2)
    state = run.state
    if state is None or not state.is_completed():
        what = state.name if state is not None else "unknown"
        hint = (" (still not finished: is a worker polling the deployment's work pool?)"
                if state is None or not state.is_final() else "")
        raise RuntimeError(f"train.deployment {train.deployment}: flow run {run.name} ({run.id}) is {what}"
                           f"{hint}: {state.message if state is not None else ''}")

    summary = json.loads(target.get_bytes(f"{run_id}/train/{RESULT_FILE}"))
    if summary.get("flow_run_id") != str(run.id):
        # A result.json left by an earlier run of the same run_id must not pass for this one.
        raise RuntimeError(f"{target.url(f'{run_id}/train/{RESULT_FILE}')}: written by flow run "
                           f"{summary.get('flow_run_id')}, not {run.id}")
    out = Path(run_dir) / "train"
    for rel, item in summary["files"].items():
        dest = out / rel
        # A directory store that the run directory lives in already holds the files in place.
        if isinstance(target, LocalStore) and dest.exists() and \
                Path(target.url(item["key"])).resolve() == dest.resolve():
            continue
        target.get_file(item["key"], dest, sha256=item["sha256"])
    result = {k: (str(out / v) if k in RESULT_PATHS and v else v) for k, v in summary["result"].items()}
    return {**result, "flow_run_id": str(run.id)}
