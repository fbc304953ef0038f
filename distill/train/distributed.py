"""One training run over several processes: DDP for every student, FSDP for causal-LM students.

`train_distributed` starts `torchrun` or `accelerate launch` (train.distributed.launcher) as a
subprocess on this module's `main`, once per process. Every process reads the same rows file and
config section and calls the same trainer as a one-process run (`train_classifier`, `train_sft`,
`train_logit_kd`); the Hugging Face Trainer sees the launcher's RANK/WORLD_SIZE and wraps the
student in DDP (or FSDP2 when train.distributed.strategy is fsdp), and gives each process its
share of every batch. Rank 0 alone writes the student, the history and RESULT_FILE, which the
caller reads back; a process that fails writes its error to `rank-<N>.error.json` first, and the
caller raises the first one it finds, with its rank, so a failure on rank 3 does not read as
"rank 0 was killed".

Files, under `<out_dir>/distributed/`:
    spec.json              what every process trains (rows file, labels, config section)
    result.json            rank 0's training summary (the dict the one-process trainers return)
    rank-<N>.error.json    {"rank", "type", "message", "traceback"} of a failed process
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from distill.config import ConfigError, TrainConfig, parse_train
from distill.data import read_jsonl, write_text

WORK_DIR = "distributed"
SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
# torchrun's own traceback and failure table take about 40 lines; the rank's last words come before them.
OUTPUT_TAIL_LINES = 120


class DistributedTrainingError(RuntimeError):
    """A process of a distributed training run failed; the message names its rank and error."""


def launch_command(config: TrainConfig, spec: Path, port: int) -> list[str]:
    """The launcher's command line that runs `main(spec)` in train.distributed.nproc processes."""
    dist = config.distributed
    if dist.launcher == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                    "--nproc_per_node", str(dist.nproc), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:
        # --multi_gpu selects accelerate's torch.distributed launcher; on a machine without CUDA the
        # Trainer (use_cpu) then runs the processes as MULTI_CPU over gloo.
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                    "--num_processes", str(dist.nproc), "--main_process_ip", "127.0.0.1",
                    "--main_process_port", str(port), "--mixed_precision", "no"]
    return launcher + ["-m", "distill.train.distributed", str(spec)]


def train_distributed(rows_file: str | Path, labels: list[str] | None, config: TrainConfig, out_dir: str | Path,
                      progress: bool = True) -> dict:
    """Train config.mode's student with train.distributed.nproc processes; rank 0's summary comes back.

    Args:
        rows_file: JSONL training rows (distill.data contract), read by every process.
        labels: the label set (classifier_kd) or None (sft, logit_kd).
        config: the train section; its `distributed` part says how many processes and how.
        out_dir: the run directory, the same one a one-process run would use (checkpoints, student).
        progress: pass the launcher's output through to stdout as it comes.

    Returns:
        the dict of train_classifier / train_sft / train_logit_kd, plus "world_size".

    Raises:
        ConfigError: a process rejected the config or the data (the message names the rank).
        DistributedTrainingError: a process failed otherwise, or the launcher did.
    """
    from distill.httpserver import free_port
    from distill.train.trainer import distributed_kwargs, resolve_device

    distributed_kwargs(config, resolve_device(config))  # a setting no rank can run fails here, before any launch
    out_dir = Path(out_dir)
    work = out_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    # Files of an earlier attempt must not pass for this one's result or errors.
    for stale in [work / RESULT_FILE, *work.glob("rank-*.error.json")]:
        stale.unlink(missing_ok=True)
    spec = write_text(work / SPEC_FILE, json.dumps({
        "rows_file": str(Path(rows_file).absolute()), "labels": labels, "out_dir": str(out_dir.absolute()),
        "train": config.model_dump(mode="json"), "progress": progress}, indent=1))
    port = config.distributed.master_port or free_port()
    command = launch_command(config, spec, port)
    tail = _run(command, progress, config.distributed.nproc)
    result_path = work / RESULT_FILE
    if tail is not None or not result_path.exists():
        _raise_failure(work, command, tail or deque(["(exit status 0 but rank 0 wrote no result)"]))
    return json.loads(result_path.read_text())


def _run(command: list[str], progress: bool, nproc: int) -> deque | None:
    """Run the launcher, echoing its output; None when it succeeded, else its last output lines."""
    tail: deque = deque(maxlen=OUTPUT_TAIL_LINES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Each process would otherwise start one thread per core, nproc times over the same cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          bufsize=1) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if progress:
                print(line, end="", flush=True)
        code = proc.wait()
    return None if code == 0 else tail


def _raise_failure(work: Path, command: list[str], tail: deque) -> None:
    errors = sorted(work.glob("rank-*.error.json"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    if errors:
        first = json.loads(errors[0].read_text())
        also = [json.loads(p.read_text())["rank"] for p in errors[1:]]
        message = (f"train.distributed: rank {first['rank']} failed: {first['type']}: {first['message']}"
                   + (f" (ranks {also} failed too)" if also else "") + f"; traceback in {errors[0]}")
        if first["type"] == "ConfigError":
            raise ConfigError(message)
        raise DistributedTrainingError(message)
    raise DistributedTrainingError(
        f"train.distributed: {' '.join(command[1:4])} failed before any process reported an error; "
        "last output:\n" + "\n".join(tail))


def train_rank(spec: dict[str, Any]) -> dict:
    """This process's part of the run in `spec` (see SPEC_FILE); the one-process trainer's summary."""
    config = parse_train(spec["train"])
    rows = read_jsonl(spec["rows_file"])
    # Progress bars of every rank would interleave; rank 0's stand for all.
    progress = spec["progress"] and int(os.environ.get("RANK", "0")) == 0
    if config.mode == "classifier_kd":
        from distill.train.classifier import train_classifier

        return train_classifier(rows, spec["labels"], config, spec["out_dir"], progress=progress)
    if config.mode == "sft":
        from distill.train.lm import train_sft

        return train_sft(rows, config, spec["out_dir"], progress=progress)
    from distill.train.lm import train_logit_kd

    return train_logit_kd(rows, config, spec["out_dir"], progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one launched process: `python -m distill.train.distributed SPEC_FILE`."""
    spec_path = Path((argv if argv is not None else sys.argv[1:])[0])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        result = train_rank(json.loads(spec_path.read_text()))
    except BaseException as e:
        write_text(spec_path.parent / f"rank-{rank}.error.json", json.dumps({
            "rank": rank, "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}))
        raise
    if rank == 0:
        write_text(spec_path.parent / RESULT_FILE, json.dumps({**result, "world_size": world}, default=str))
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """All ranks leave the process group together before the interpreter exits. A rank that exited
    with it still alive was killed now and then by gloo's threads at teardown ("terminate called
    without an active exception", SIGABRT), failing a run whose training had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
