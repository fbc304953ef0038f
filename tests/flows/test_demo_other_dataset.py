"""`distill demo --quick` on another intent dataset, with only the task paths overridden."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fresh_prefect_home

REPO = Path(__file__).resolve().parents[2]
INTENTS = {
    "book_flight": ["book a flight to {c}", "I need a plane ticket to {c}", "find me flights to {c} on {d}",
                    "reserve a seat on a flight to {c}"],
    "check_weather": ["what is the weather in {c} on {d}", "will it rain in {c}", "forecast for {c} please",
                      "how cold is it in {c} {d}"],
    "play_music": ["play some {g} music", "put on a {g} playlist", "I want to hear {g} songs {d}",
                   "start playing {g} {d}"],
    "cancel_order": ["cancel my order from {d}", "I want to cancel the purchase I made {d}",
                     "please stop my order to {c}, it was placed {d}", "undo the order shipping to {c}"],
}


def write_dataset(root: Path, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    cities = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth", "Rome", "Quito", "Seoul", "Dakar"]
    days = ["monday", "today", "friday", "tomorrow", "last week", "this morning"]
    genres = ["jazz", "rock", "classical", "pop", "reggae", "folk", "blues", "techno"]
    rows = {"train": [], "test": []}
    for label, templates in INTENTS.items():
        texts = sorted({t.format(c=c, d=d, g=g) for t in templates for c in cities for d in days for g in genres})
        rng.shuffle(texts)
        rows["test"] += [(t, label) for t in texts[:10]]
        rows["train"] += [(t, label) for t in texts[10:50]]
    paths = {}
    for split, items in rows.items():
        paths[split] = root / f"{split}.csv"
        with paths[split].open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            w.writerows(items)
    paths["labels"] = root / "labels.json"
    paths["labels"].write_text(json.dumps(sorted(INTENTS)))
    return paths


@pytest.mark.slow
def test_quick_demo_fits_its_teacher_on_the_overridden_dataset(tmp_path):
    paths = write_dataset(tmp_path)
    env = {**os.environ, "PREFECT_HOME": str(fresh_prefect_home(tmp_path / "prefect")), "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",  # a loaded CI machine starts it slowly
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "distill_flows.cli", "demo", "--quick",
           "--set", f"task.train_path={paths['train']}", "--set", f"task.test_path={paths['test']}",
           "--set", f"task.labels_path={paths['labels']}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # 40% of each intent's 40 training rows: the teacher saw this data, not BANKING77's 10,003 rows.
    assert "head fit on 64 gold rows" in done.stdout, done.stdout[:2000]
    run_dir = tmp_path / done.stdout.split("run directory:")[-1].strip()
    holdout = [json.loads(l) for l in (run_dir / "teacher_holdout.jsonl").read_text().splitlines()]
    assert len(holdout) == 40 and {r["response"] for r in holdout} <= set(INTENTS)
    gold = {t: l for t, l in csv.reader(paths["test"].open()) if l != "category"}
    correct = sum(r["response"] == gold[r["messages"][-1]["content"]] for r in holdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"\nteacher_accuracy={metrics['teacher_accuracy']:.4f} ({correct}/40) "
          f"student_accuracy={metrics['student_accuracy']:.4f}")
    assert correct >= 36 and abs(metrics["teacher_accuracy"] - correct / 40) < 1e-9
    assert metrics["student_accuracy"] > 0.5  # four intents: chance is 0.25
