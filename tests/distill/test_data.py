"""Bad input stops before any teacher call, with the file and line in the message."""

import pytest

from distill.config import ConfigError, TaskConfig
from distill.data import load_task_rows, read_jsonl, write_jsonl


def task(tmp_path, body: str, name="train.csv", **kw) -> TaskConfig:
    p = tmp_path / name
    p.write_text(body)
    return TaskConfig(name="cards", train_path=p, labels=["card_lost", "refund"], label_field="category",
                      system_prompt="Classify the message.", **kw)


def test_good_rows_render_the_production_prompt(tmp_path):
    t = task(tmp_path, "text,category\nI lost my card,card_lost\nmoney back please,\n",
             prompt_template="Message: {text}")
    rows = load_task_rows(t)
    assert [r["gold"] for r in rows] == ["card_lost", None]
    assert rows[0]["messages"][0]["role"] == "system"
    assert rows[0]["messages"][1]["content"] == "Message: I lost my card"


@pytest.mark.parametrize("body,where,what", [
    ("txt,category\nhello,refund\n", ":1", "missing column"),
    ("text,category\n", "", "no rows"),
    ("text,category\nhello,refund\nbye,teleport\n", ":3", "not in the task's label set"),
    ("text,category\nhello,refund\n  ,refund\n", ":3", "empty 'text'"),
    ("text,category\nhello,refund,extra\n", ":2", "more fields"),
])
def test_bad_csv_names_file_and_line(tmp_path, body, where, what):
    t = task(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_task_rows(t)
    assert f"train.csv{where}" in str(e.value) and what in str(e.value)


def test_bad_jsonl_and_missing_file(tmp_path):
    t = task(tmp_path, '{"text": "hi", "category": "refund"}\n{not json\n', name="train.jsonl")
    with pytest.raises(ConfigError, match=r"train.jsonl:2: invalid JSON"):
        load_task_rows(t)
    t = TaskConfig(name="t", train_path=tmp_path / "nope.csv", labels=["a"], system_prompt="")
    with pytest.raises(ConfigError, match="nope.csv: file not found"):
        load_task_rows(t)


def test_unknown_template_field_is_named(tmp_path):
    t = task(tmp_path, "text,category\nhello,refund\n", prompt_template="{body}")
    with pytest.raises(ConfigError, match="prompt_template: placeholder 'body'"):
        load_task_rows(t)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(p, rows())
    assert read_jsonl(p) == [{"a": 1}]
    assert [x.name for x in tmp_path.iterdir()] == ["out.jsonl"]
