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


# --- files as people have them ------------------------------------------------------------------

def load(tmp_path, name: str, data: bytes, **kw) -> list[dict]:
    p = tmp_path / name
    p.write_bytes(data)
    label_field = kw.pop("label_field", "category" if name.endswith(".csv") else None)
    return load_task_rows(TaskConfig(name="cards", train_path=p, labels=["card_lost", "refund"],
                                     label_field=label_field, system_prompt="Classify the message.", **kw))


def test_unclosed_quote_is_reported_where_it_opens(tmp_path):
    rows = [f"row {i},refund" for i in range(3, 9)]
    body = "text,category\nhello,refund\n\"I lost my card,card_lost\n" + "\n".join(rows) + '\nhe said "hi",refund\n'
    # Before the reader was strict, this was 2 rows: the quoted text swallowed the next 6 rows.
    with pytest.raises(ConfigError, match=r"train.csv:3: unclosed quote: the quoted field opened on line 3 "
                                          r"only closes on line 10"):
        load(tmp_path, "train.csv", body.encode())
    with pytest.raises(ConfigError, match=r"train.csv:3: unclosed quote: .* runs to the end of the file"):
        load(tmp_path, "train.csv", b'text,category\nhello,refund\n"I lost my card,card_lost\nbye,refund\n')
    with pytest.raises(ConfigError, match=r"train.csv:2: malformed CSV .* two quotes"):
        load(tmp_path, "train.csv", b'text,category\n"5" inch screen,refund\n')


def test_a_quoted_field_may_span_lines_and_keeps_its_first_line(tmp_path):
    rows = load(tmp_path, "train.csv", b'text,category\n"line one\nline two, with a comma",refund\nnext,card_lost\n')
    assert [(r["text"], r["_line"]) for r in rows] == [("line one\nline two, with a comma", 2), ("next", 4)]


def test_bad_byte_names_line_and_offset_and_encoding_is_configurable(tmp_path):
    latin1 = "text,category\nhello,refund\ncafé card,card_lost\n".encode("latin-1")
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "train.csv", latin1)
    assert str(e.value).startswith(f"{tmp_path / 'train.csv'}:3: byte 0xe9 at byte offset 30 (byte 4 of the line) "
                                   "is not valid utf-8") and "task.encoding" in str(e.value)
    for encoding in ("latin-1", "cp1252", "auto"):
        assert [r["text"] for r in load(tmp_path, "train.csv", latin1, encoding=encoding)] == ["hello", "café card"]
    utf16 = "text,category\nhello,refund\n".encode("utf-16")
    with pytest.raises(ConfigError, match=r"UTF-16 byte-order mark: set task.encoding: utf-16"):
        load(tmp_path, "train.csv", utf16)
    assert [r["text"] for r in load(tmp_path, "train.csv", utf16, encoding="auto")] == ["hello"]
    with pytest.raises(ValueError, match="unknown text encoding 'base64'"):
        TaskConfig(encoding="base64")


def test_byte_order_mark_is_stripped(tmp_path):
    rows = load(tmp_path, "train.csv", b"\xef\xbb\xbftext,category\nhello,refund\n")
    assert list(rows[0]["input"]) == ["text", "category"] and rows[0]["gold"] == "refund"
    rows = load(tmp_path, "train.jsonl", b'\xef\xbb\xbf{"text": "hello"}\n')
    assert rows[0]["text"] == "hello"


def test_long_fields_up_to_the_configured_limit(tmp_path):
    body = b"text,category\n" + b"a" * 5_000_000 + b",refund\n"
    with pytest.raises(ConfigError, match=r"train.csv:2: field 'text' has 5000000 characters, more than "
                                          r"task.max_field_chars \(1000000\)"):
        load(tmp_path, "train.csv", body)
    assert len(load(tmp_path, "train.csv", body, max_field_chars=5_000_000)[0]["text"]) == 5_000_000
    with pytest.raises(ConfigError, match=r"train.jsonl:1: field 'text' has 11 characters"):
        load(tmp_path, "train.jsonl", b'{"text": "hello world"}\n', max_field_chars=10)


@pytest.mark.parametrize("lines,what", [
    (['{"id": "a", "text": "x"}', '{"id": null, "text": "y"}'], r":2: id must be a non-empty string .* not null"),
    (['{"id": "a", "text": "x"}', '{"id": "", "text": "y"}'], r":2: empty id"),
    (['{"id": "a", "text": "x"}', '{"id": "  ", "text": "y"}'], r":2: empty id"),
    (['{"id": true, "text": "x"}'], r":1: id must be .* not true"),
    (['{"id": 1.5, "text": "x"}'], r":1: id must be .* not 1.5"),
    (['{"id": 1, "text": "x"}', '{"id": "1", "text": "y"}'], r":2: duplicate id '1' \(first at line 1\)"),
    (['{"id": "a", "text": "x"}', '{"id": " a ", "text": "y"}'], r":2: duplicate id 'a' \(first at line 1\)"),
    (['{"id": 7, "text": "x"}', '{"id": 7.0, "text": "y"}'], r":2: duplicate id '7'"),
])
def test_ids_are_non_empty_and_unique_after_normalisation(tmp_path, lines, what):
    with pytest.raises(ConfigError, match="train.jsonl" + what):
        load(tmp_path, "train.jsonl", ("\n".join(lines) + "\n").encode())


def test_ids_are_strings_and_missing_ids_are_numbered(tmp_path):
    assert [r["id"] for r in load(tmp_path, "train.jsonl", b'{"id": 1, "text": "x"}\n{"id": " b ", "text": "y"}\n')
            ] == ["1", "b"]
    assert [r["id"] for r in load(tmp_path, "train.csv", b"text,category\nx,refund\ny,refund\n")] == ["train-2",
                                                                                                     "train-3"]


def test_prompt_file_ids_are_checked_the_same_way(tmp_path):
    from distill.teacher.generation import load_prompt_rows

    p = tmp_path / "prompts.jsonl"
    task = TaskConfig(name="cards", train_path=p, labels=["card_lost", "refund"], system_prompt="Classify.")
    p.write_text('{"id": 1, "text": "x"}\n{"id": "1", "text": "y"}\n')
    with pytest.raises(ConfigError, match=r"prompts.jsonl:2: duplicate id '1'"):
        load_prompt_rows(p, task)
    p.write_text('{"id": null, "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"prompts.jsonl:1: id must be a non-empty string"):
        load_prompt_rows(p, task)
    p.write_text('{"id": 3, "text": "x"}\n')
    assert load_prompt_rows(p, task)[0]["id"] == "3"


@pytest.mark.parametrize("name,data,what", [
    ("train.jsonl", b"[" * 100_000 + b"\n", r":1: invalid JSON \(nested too deeply\)"),
    ("train.jsonl", b'{"text": ' + b"1" * 5000 + b"}\n", r":1: invalid JSON \(Exceeds the limit"),
    ("train.jsonl", b'{"text": "a\\ud800"}\n', r":1: invalid Unicode"),
    ("train.json", b'[\n{"text": "a"}\n]\n', r":1: invalid JSON .* not a JSON array"),
    ("train.jsonl", b'{"text": 5}\n', r":1: 'text' must be a string, not int"),
    ("train.csv", b"text,text\nx,y\n", r":1: column\(s\) 'text' appear more than once"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, data, what):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.") + what):
        load(tmp_path, name, data)


def test_a_classification_gold_label_must_be_a_name(tmp_path):
    with pytest.raises(ConfigError, match=r"train.jsonl:1: 'category' must be a label name, not list"):
        load(tmp_path, "train.jsonl", b'{"text": "x", "category": ["refund"]}\n', label_field="category")


def test_a_directory_where_a_file_is_expected(tmp_path):
    (tmp_path / "train.csv").mkdir()
    t = TaskConfig(name="t", train_path=tmp_path / "train.csv", labels=["a"], system_prompt="")
    with pytest.raises(ConfigError, match=r"train.csv: is a directory; expected a CSV or JSONL file"):
        load_task_rows(t)


@pytest.mark.parametrize("name,data,what", [
    ("train.csv", b'text,category\nhello,refund\n"I lost my card,card_lost\nbye,refund\n',
     "train.csv:3: unclosed quote"),
    ("train.csv", "text,category\ncafé,refund\n".encode("latin-1"), "train.csv:2: byte 0xe9 at byte offset 17"),
    ("train.csv", b"text,category\n" + b"a" * 1_000_001 + b",refund\n", "train.csv:2: field 'text' has 1000001"),
    ("train.jsonl", b'{"id": "a", "text": "hi"}\n{"id": null, "text": "yo"}\n', "train.jsonl:2: id must be"),
    ("train.jsonl", b'{"id": 1, "text": "hi"}\n{"id": "1", "text": "yo"}\n', "train.jsonl:2: duplicate id '1'"),
    ("train.csv", None, "train.csv: is a directory"),
])
def test_distill_run_stops_on_a_bad_file_before_the_teacher_is_called(tmp_path, monkeypatch, name, data, what):
    from distill_flows.cli import app
    from fastapi import FastAPI, Request
    from typer.testing import CliRunner

    from distill.httpserver import start_in_thread

    hits = []
    teacher = FastAPI()

    @teacher.post("/v1/chat/completions")
    async def chat(request: Request):
        hits.append(await request.body())
        return {}

    monkeypatch.chdir(tmp_path)
    if data is None:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "cfg.yaml").write_text(f"task:\n  name: cards\n  train_path: {name}\n  labels: [card_lost, refund]\n"
                                       "  system_prompt: Classify the message.\n")
    with start_in_thread(teacher) as server:
        result = CliRunner().invoke(app, ["run", "cfg.yaml", "--set", f"teacher.base_url={server.url}/v1"])
    assert result.exit_code == 2, result.output
    assert what in result.output and "Traceback" not in result.output
    assert hits == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("output,what", [
    ("out", "--output: out is a directory"),
    ("notes.txt/out.jsonl", "notes.txt is a file, not a directory"),
])
def test_distill_generate_checks_its_output_before_the_teacher_is_called(tmp_path, monkeypatch, output, what):
    from distill_flows.cli import app
    from fastapi import FastAPI, Request
    from typer.testing import CliRunner

    from distill.httpserver import start_in_thread

    hits = []
    teacher = FastAPI()

    @teacher.post("/v1/chat/completions")
    async def chat(request: Request):
        hits.append(await request.body())
        return {}

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "notes.txt").write_text("not a folder\n")
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "text": "my card is lost"}\n')
    (tmp_path / "cfg.yaml").write_text("task:\n  name: cards\n  train_path: prompts.jsonl\n"
                                       "  labels: [card_lost, refund]\n  system_prompt: Classify the message.\n")
    with start_in_thread(teacher) as server:
        result = CliRunner().invoke(app, ["generate", "cfg.yaml", "--input", "prompts.jsonl", "--output", output,
                                          "--no-progress", "--set", f"teacher.base_url={server.url}/v1"])
    assert result.exit_code == 2, result.output
    assert what in result.output and "Traceback" not in result.output
    assert hits == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "notes.txt", "out",
                                                                          "prompts.jsonl"]
