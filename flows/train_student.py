"""The `train-student` flow: the training step as its own deployment, so it can run on a GPU work pool.

`tasks.train.train_where_configured` uploads the training rows to the run store and starts
this deployment (deployments/prefect.yaml, pool `distill-gpu`) when `train.deployment` is set.
The worker fetches the rows, trains with the same `train_student` task as a local run, and
publishes the student back under `<run_id>/train/`. The store is the only channel between the
two machines, so it must be one both can reach (s3://...), see deployments/gpu.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill_tasks.train import RESULT_FILE, RESULT_PATHS, train_student
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from distill.config import parse_train
from distill.train.distributed import WORK_DIR

# Checkpoints stay on the worker: they only serve a retry there, and are the bulk of the bytes. So do
# the files the processes of a train.distributed run share (a copy of the rows, rank 0's summary).
UNPUBLISHED = ("checkpoints", WORK_DIR)


def publish_dir(store: Any, local_dir: Path, prefix: str) -> dict[str, dict[str, Any]]:
    """Upload the files under `local_dir` to `prefix/<relative path>`, checkpoints and temp files excluded.

    Args:
        store: a distill.store LocalStore or S3Store.
        local_dir: the folder to publish.
        prefix: the key prefix, e.g. `<run_id>/train`.

    Returns:
        {relative path: {"key", "sha256", "bytes"}}.
    """
    from distill.store import is_temp_name

    published = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        parts = path.relative_to(local_dir).parts
        if parts[0] in UNPUBLISHED or parts[-1] == RESULT_FILE or any(is_temp_name(p) for p in parts):
            continue
        rel = "/".join(parts)
        published[rel] = store.put_file(path, f"{prefix}/{rel}")
    return published


@flow(name="train-student", log_prints=True)
def train_student_flow(dataset_uri: str, labels: list[str] | None, train: dict, run_id: str, store: str,
                       dataset_sha256: str | None = None, work_dir: str = ".distill/staging") -> dict:
    """Train a student from rows in the run store and publish it back there.

    Args:
        dataset_uri: store key of the training rows (JSONL), e.g. `<run_id>/dataset.jsonl`.
        labels: the label set (classifier_kd) or None.
        train: the train config section as a dict (the mode's `model_dump(mode="json")`).
        run_id: the run the student belongs to; outputs go to `<run_id>/train/...` in the store.
        store: the store URI (`s3://bucket/prefix`, or a directory the worker shares with the caller).
        dataset_sha256: expected sha256 of the rows; a mismatch fails before any training.
        work_dir: where the worker trains; a rerun with the same run_id resumes from its checkpoints
            there (the distill-gpu image keeps `.distill` on a volume).

    Returns:
        {"result_key": key of result.json, "files": {relative path: {"key", "sha256", "bytes"}}}.
        result.json holds the training summary with paths relative to `<run_id>/train`, the same
        file table, and this flow run's id; it is written last, so its presence marks a complete upload.
    """
    from distill.store import open_store

    logger = get_run_logger()
    target = open_store(store)
    config = parse_train(train)
    run_dir = Path(work_dir) / run_id
    rows_path = target.get_file(dataset_uri, run_dir / "dataset.jsonl", sha256=dataset_sha256)
    logger.info("training on %s (%d bytes) for run %s", target.url(dataset_uri), rows_path.stat().st_size, run_id)

    result = train_student(str(rows_path), labels, config, str(run_dir))
    out = run_dir / "train"
    files = publish_dir(target, out, f"{run_id}/train")
    summary = {k: (Path(v).absolute().relative_to(out.absolute()).as_posix() if k in RESULT_PATHS and v else v)
               for k, v in result.items()}
    blob = json.dumps({"flow_run_id": str(flow_run.get_id() or ""), "result": summary, "files": files},
                      indent=1, default=str)
    result_key = target.put_bytes(blob.encode(), f"{run_id}/train/{RESULT_FILE}")["key"]
    logger.info("published %d files to %s", len(files), target.url(f"{run_id}/train"))
    return {"result_key": result_key, "files": files}
