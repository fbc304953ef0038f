"""The label set in the teacher's prompt, few-shot turns, and answers read as a person reads them."""

from __future__ import annotations

import json

import pytest

from distill.config import TaskConfig
from distill.data import load_task_rows, prompt_prefix
from distill.teacher.labels import few_shot_rows, label_span, map_answer

LABELS = ["card_arrival", "card_linking", "lost_or_stolen_card", "reverted_card_payment?", "Refund_not_showing_up"]


@pytest.mark.parametrize("answer, label", [
    ("card_arrival", "card_arrival"),
    ("  Card arrival. ", "card_arrival"),
    ("CARD_ARRIVAL", "card_arrival"),
    ('"card_arrival"', "card_arrival"),
    ("'card arrival'", "card_arrival"),
    ("Intent: card_arrival", "card_arrival"),
    ("The intent is: Card Arrival!", "card_arrival"),
    ("label = lost or stolen card", "lost_or_stolen_card"),
    ('{"label": "card_linking"}', "card_linking"),
    ('{"rationale": "about linking", "label": "card_linking"}', "card_linking"),
    ('```json\n{"label": "card_linking"}\n```', "card_linking"),
    ("**card-linking**", "card_linking"),
    ("reverted_card_payment?", "reverted_card_payment?"),
    ("Reverted card payment.", "reverted_card_payment?"),
    ("refund not showing up", "Refund_not_showing_up"),
])
def test_answers_map_like_a_person_would_map_them(answer, label):
    assert map_answer(answer, LABELS) == label


@pytest.mark.parametrize("answer", ["lost card", "arrival card", "I'm not sure", "", None, '{"label": "other"}',
                                    "card_arrival or card_linking", "card"])
def test_answers_naming_no_label_map_to_none(answer):
    assert map_answer(answer, LABELS) is None


def test_label_span_points_at_the_label_value_not_the_rationale():
    text = '{"rationale": "not card_arrival, it is linking", "label": "card_linking"}'
    assert text[label_span(text, "card_linking"):].startswith("card_linking")
    text = '{"rationale": "the card arrival is late", "label": "card_arrival"}'
    assert label_span(text, "card_arrival") == text.index('card_arrival"}')


def _task(tmp_path, **kw) -> TaskConfig:
    train = tmp_path / "train.csv"
    train.write_text("text,category\n" + "".join(f"text {i},{LABELS[i % 3]}\n" for i in range(12)))
    test = tmp_path / "test.csv"
    test.write_text("text,category\nheld out 1,card_arrival\nheld out 2,card_linking\n")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"card_arrival": "the card has not arrived", "card_linking": "linking a card",
                                  "lost_or_stolen_card": "lost or stolen"}))
    kw.setdefault("system_prompt", "Classify the message.")
    return TaskConfig(name="labels", train_path=train, test_path=test, labels_path=labels, label_field="category",
                      **kw)


def test_the_label_list_and_descriptions_reach_the_teacher(tmp_path):
    task = _task(tmp_path, system_prompt="Classify it.")
    system = prompt_prefix(task)[0]["content"]
    assert system.startswith("Classify it.\n\n")
    assert "- card_arrival: the card has not arrived" in system and "- lost_or_stolen_card: lost or stolen" in system
    placed = _task(tmp_path, system_prompt="Labels:\n{labels}\nAnswer with one.")
    assert prompt_prefix(placed)[0]["content"] == ("Labels:\n- card_arrival: the card has not arrived\n- card_linking: "
                                                   "linking a card\n- lost_or_stolen_card: lost or stolen\nAnswer with one.")
    in_user = _task(tmp_path, system_prompt="S", prompt_template="{text}\n\nOne of:\n{labels}")
    row = load_task_rows(in_user, "test")[0]
    assert row["messages"][0]["content"] == "S"  # no appendix when the user template places the list
    assert row["messages"][-1]["content"].startswith("held out 1\n\nOne of:\n- card_arrival")


def test_few_shot_examples_come_from_the_training_split_and_show_different_labels(tmp_path):
    task = _task(tmp_path, few_shot=3)
    holdout = load_task_rows(task, "test")
    msgs = holdout[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    shown = {m["content"] for m in msgs if m["role"] == "user"}
    assert shown - {"held out 1"} <= {f"text {i}" for i in range(12)}  # never a test row
    assert len({m["content"] for m in msgs if m["role"] == "assistant"}) == 3
    train = load_task_rows(task.model_copy(update={"few_shot": 0}), "train")
    assert few_shot_rows(train, 3) == few_shot_rows(train, 3)  # the same draw every run (cache keys hold)
