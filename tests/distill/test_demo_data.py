"""`distill demo` on another intent dataset: the local teacher is fit on that data's train split."""

from __future__ import annotations

import csv
import json

from distill.config import TaskConfig
from distill.demo import demo_config, prepare_demo
from distill.models.encoders import EmbeddingClassifier


def test_the_demo_teacher_learns_the_configured_dataset_not_banking77(tmp_path):
    labels = ["greeting", "goodbye", "weather"]
    texts = {"greeting": ["hello there", "hi, how are you", "good morning", "hey friend", "hiya"],
             "goodbye": ["bye for now", "see you later", "good night", "farewell", "talk soon"],
             "weather": ["will it rain today", "how hot is it", "is it sunny", "forecast please", "any snow"]}
    train = tmp_path / "train.csv"
    with train.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["utterance", "intent"])
        for label, items in texts.items():
            w.writerows([t, label] for t in items)
    (tmp_path / "labels.json").write_text(json.dumps({l: f"the user says {l}" for l in labels}))
    task = TaskConfig(name="greetings", train_path=train, labels_path=tmp_path / "labels.json", system_prompt="",
                      text_field="utterance", label_field="intent")
    prep = prepare_demo(tmp_path / "work", task=task, progress=False)
    teacher = EmbeddingClassifier.load(prep["teacher_dir"])
    assert teacher.labels == labels
    with open(prep["train_path"], newline="") as f:
        student = list(csv.DictReader(f))
    assert {r["utterance"] for r in student} == {t for items in texts.values() for t in items}
    assert set(student[0]) == {"id", "utterance", "intent"}
    # Overriding the task paths does not undo the student split.
    cfg = demo_config("http://127.0.0.1:1", prep["train_path"], False,
                      [f"task.train_path={train}", f"task.labels_path={tmp_path / 'labels.json'}"])
    assert cfg.task.train_path == prep["train_path"]
