"""Property-based tests of everything that parses outside input: the CSV/JSONL readers, and the
chat-completion request parsing of both servers (`distill serve`, `distill teacher serve`) over real
HTTP on 127.0.0.1.

The property everywhere: no input gives a traceback or a 500. A reader returns rows or raises a
ConfigError that names the file; a server answers 200 with a completion or a 4xx with an
OpenAI-shaped JSON error body. Each property runs a bounded number of examples so that the suite
stays within a few seconds per property.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from distill.config import ConfigError, ServeConfig, TaskConfig
from distill.data import load_task_rows, read_table
from distill.httpserver import start_in_thread

# CI (CI=true) runs the same examples every time, so a red run is this change's doing; elsewhere each run
# explores new ones. No example database: a failure prints the example that reproduces it.
_BASE = dict(deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
             suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ = settings(max_examples=150, **_BASE)
ROUND_TRIP = settings(max_examples=100, **_BASE)
HTTP_FUZZ = settings(max_examples=120, **_BASE)
LABELS = ["positive", "negative", "neutral"]  # tests/conftest.py's tiny_classifier
KEY = "fuzz-key"

# Any code point, lone surrogates included: JSON can carry them as "\ud800" escapes.
ANY_CHAR = st.characters(exclude_categories=())
# Text weighted towards what breaks parsers: delimiters, quotes, line ends, BOMs, NULs.
TRICKY = st.lists(st.sampled_from(list(',"\n\r\t \x00\ufeff\\{}[]:') + ["\r\n", '""']) | ANY_CHAR,
                  max_size=40).map("".join)
PRINTABLE = st.text(st.characters(codec="utf-8"), max_size=30)
# Any JSON value, lone surrogates, NaN and infinities included.
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHAR, max_size=12)
ANY_JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(ANY_CHAR, max_size=8), inner, max_size=3), max_leaves=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


def write(directory: Path, suffix: str, data: bytes) -> Path:
    p = directory / f"{uuid.uuid4().hex}{suffix}"
    p.write_bytes(data)
    return p


def read_or_config_error(path: Path, **kw) -> list[dict] | None:
    """The rows, or None after a ConfigError that names the file; anything else fails the property."""
    try:
        rows = read_table(path, **kw)
    except ConfigError as e:
        assert str(e).startswith(str(path)), e
        return None
    assert rows and all(isinstance(r, dict) and isinstance(r["_line"], int) and r["_line"] >= 1 for r in rows)
    return rows


# --- readers -------------------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=300) | TRICKY.map(lambda s: s.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".csv", ".jsonl"]), encoding=st.sampled_from(["utf-8", "auto", "cp1252"]))
@example(data=b'text\n"open\nnext\n', suffix=".csv", encoding="utf-8")
@example(data=b"\xff\xfet\x00", suffix=".csv", encoding="utf-8")
@example(data=b'{"a": "\\ud800"}\n', suffix=".jsonl", encoding="utf-8")
@example(data=b"[" * 5000, suffix=".jsonl", encoding="utf-8")
def test_any_bytes_read_as_rows_or_a_config_error(files, data, suffix, encoding):
    read_or_config_error(write(files, suffix, data), required=["text"], encoding=encoding, max_field_chars=50)


@FUZZ
@given(data=st.binary(max_size=300) | TRICKY.map(lambda s: "text,category\n" + s).map(
    lambda s: s.encode("utf-8", "surrogatepass")), suffix=st.sampled_from([".csv", ".jsonl"]))
def test_any_task_file_loads_or_names_file_and_line(files, data, suffix):
    path = write(files, suffix, data)
    task = TaskConfig(name="fuzz", train_path=path, labels=LABELS, label_field="category", system_prompt="Classify.",
                      max_field_chars=50)
    try:
        rows = load_task_rows(task)
    except ConfigError as e:
        assert str(e).startswith(str(path)) or "task.prompt_template" in str(e), e
        return
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i.strip() == i and i for i in ids)
    assert all(r["gold"] is None or r["gold"] in LABELS for r in rows)
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in rows)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["id", "text", "messages", "category"]), ANY_JSON, max_size=4),
                     min_size=1, max_size=5), ascii_only=st.booleans())
@example(rows=[{"id": 1, "text": "a"}, {"id": "1", "text": "b"}], ascii_only=True)
@example(rows=[{"id": None, "text": "a"}], ascii_only=True)
@example(rows=[{"id": " 7 ", "text": "a"}, {"id": 8.0, "messages": [{"role": "user", "content": "b"}]}],
         ascii_only=False)
def test_any_prompt_file_loads_or_names_file_and_line(files, rows, ascii_only):
    from distill.teacher.generation import load_prompt_rows

    path = write(files, ".jsonl", "".join(encode(r, ascii_only).decode("utf-8", "surrogatepass") + "\n"
                                         for r in rows).encode("utf-8", "surrogatepass"))
    task = TaskConfig(name="fuzz", train_path=path, labels=LABELS, label_field="category", system_prompt="Classify.")
    try:
        got = load_prompt_rows(path, task)
    except ConfigError as e:
        assert str(e).startswith(str(path)) or "task.prompt_template" in str(e), e
        return
    ids = [r["id"] for r in got]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i.strip() == i and i for i in ids)
    assert all(r["messages"] and all(isinstance(m["content"], str) for m in r["messages"]) for r in got)


@FUZZ
@given(value=ANY_JSON)
def test_an_id_is_a_stable_non_empty_string_or_a_clear_error(value):
    from distill.data import row_id

    try:
        rid = row_id(value, "f.jsonl:1")
    except ConfigError as e:
        assert str(e).startswith("f.jsonl:1: ")
        return
    assert isinstance(rid, str) and rid and rid == rid.strip() and row_id(rid, "f.jsonl:1") == rid


CELL = st.lists(st.sampled_from(list(',"\n\r ') + ["\r\n"]) | st.characters(codec="utf-8"), max_size=20).map("".join)


@ROUND_TRIP
@given(rows=st.lists(st.tuples(CELL.filter(lambda s: s.strip()), CELL), min_size=1, max_size=8),
       bom=st.booleans(), crlf=st.booleans())
def test_csv_written_by_a_csv_writer_reads_back_exactly(files, rows, bom, crlf):
    # What spreadsheets and pandas write (quotes doubled, fields with line ends quoted) must not trip the
    # strict reader that catches unclosed quotes.
    assume(all(r != ("", "") for r in rows))
    # A bare "\r" is a line end to every reader; a writer whose lines end in "\n" leaves it unquoted.
    assume(crlf or not any("\r" in c for r in rows for c in r))
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n" if crlf else "\n")
    w.writerow(["text", "note"])
    w.writerows(rows)
    data = ("\ufeff" if bom else "") + buf.getvalue()
    got = read_or_config_error(write(files, ".csv", data.encode("utf-8")), required=["text"])
    assert got is not None
    assert [(r["text"], r["note"]) for r in got] == [tuple(r) for r in rows]


JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | PRINTABLE,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(PRINTABLE, inner, max_size=3),
                          max_leaves=8)


@ROUND_TRIP
@given(rows=st.lists(st.dictionaries(PRINTABLE, JSON_VALUE, min_size=1, max_size=4), min_size=1, max_size=6),
       ascii_only=st.booleans())
def test_jsonl_written_by_json_dumps_reads_back_exactly(files, rows, ascii_only):
    data = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)
    got = read_or_config_error(write(files, ".jsonl", data.encode("utf-8")), max_field_chars=None)
    assert got is not None
    assert [{k: v for k, v in r.items() if k != "_line"} for r in got] == [
        {k: v for k, v in r.items() if k != "_line"} for r in rows]


# --- servers -------------------------------------------------------------------------------------

def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, str, bytes]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"content-type": "application/json", "authorization": f"Bearer {KEY}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read()
    finally:
        conn.close()


def assert_clear_answer(status: int, content_type: str, raw: bytes) -> dict:
    """200 with a chat.completion, or a 4xx whose JSON body says what was wrong; never a 500."""
    assert status < 500, (status, raw[:300])
    assert content_type.startswith("application/json"), (status, content_type, raw[:300])
    body = json.loads(raw)
    if status == 200:
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] in LABELS
    else:
        assert 400 <= status < 500 and isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body


@pytest.fixture(scope="module")
def student_url(tiny_classifier, tmp_path_factory):
    from distill.serve.app import create_app

    log = tmp_path_factory.mktemp("fuzz-serve") / "log.sqlite"
    app = create_app(tiny_classifier, ServeConfig(log_url=f"sqlite:///{log}", runtime="torch"), api_key=KEY)
    with start_in_thread(app) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def teacher_url(tiny_classifier, tmp_path_factory):
    from distill.teacher.server import create_app

    app = create_app(tiny_classifier, "tiny-clf", files_dir=tmp_path_factory.mktemp("fuzz-teacher"), batch_wait_ms=0,
                     api_key=KEY)  # through the same key check a started server has
    with start_in_thread(app) as srv:
        yield srv.url


CONTENT = (st.text(ANY_CHAR, max_size=30) | TRICKY | ANY_JSON
           | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | ANY_JSON},
                                            optional={"text": st.text(ANY_CHAR, max_size=20) | ANY_JSON}),
                      max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | ANY_JSON},
                                optional={"content": CONTENT})


def chat_request(model: str) -> st.SearchStrategy[dict]:
    """Requests near a valid one: every field either right or anything JSON can hold."""
    return st.fixed_dictionaries(
        {"model": st.just(model) | st.text(ANY_CHAR, max_size=10) | ANY_JSON,
         "messages": st.lists(MESSAGE, max_size=4) | ANY_JSON},
        optional={"logprobs": st.booleans() | ANY_JSON, "top_logprobs": st.integers(-5, 30) | ANY_JSON,
                  "n": st.integers(-2, 3) | ANY_JSON, "stream": st.booleans() | ANY_JSON,
                  "temperature": st.floats() | ANY_JSON, "max_tokens": st.integers() | ANY_JSON,
                  "user": st.text(ANY_CHAR, max_size=10) | ANY_JSON, "seed": st.integers() | ANY_JSON,
                  "stop": ANY_JSON})


def encode(req, ascii_only: bool) -> bytes:
    # ensure_ascii writes a lone surrogate as the escape "\ud800"; without it, as the raw code point
    # smuggled through surrogatepass (bytes no UTF-8 decoder accepts).
    return json.dumps(req, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


RAW_BODIES = (st.binary(max_size=200) | TRICKY.map(lambda s: s.encode("utf-8", "surrogatepass"))
              | st.sampled_from([b"[" * 100_000, b'{"model": ' + b"1" * 5000 + b"}", b"NaN", b"", b"\xef\xbb\xbf{}"]))


@HTTP_FUZZ
@given(req=chat_request("distill-student"), ascii_only=st.booleans())
@example(req={"model": "distill-student", "messages": [{"role": "user", "content": "\ud800"}]}, ascii_only=True)
@example(req={"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}, ascii_only=True)
@example(req={"model": "distill-student", "messages": [{"role": "user", "content": "card"}]}, ascii_only=True)
def test_student_server_answers_any_request_clearly(student_url, req, ascii_only):
    assert_clear_answer(*post(student_url, encode(req, ascii_only)))


@HTTP_FUZZ
@given(body=RAW_BODIES)
def test_student_server_answers_any_body_clearly(student_url, body):
    assert_clear_answer(*post(student_url, body))


@HTTP_FUZZ
@given(req=chat_request("tiny-clf"), ascii_only=st.booleans())
@example(req={"model": "tiny-clf", "messages": [{"role": "user", "content": "\ud800"}]}, ascii_only=True)
@example(req={"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}, ascii_only=True)
@example(req={"model": "tiny-clf", "messages": [{"role": "user", "content": "card"}]}, ascii_only=True)
def test_teacher_server_answers_any_request_clearly(teacher_url, req, ascii_only):
    assert_clear_answer(*post(teacher_url, encode(req, ascii_only)))


@HTTP_FUZZ
@given(body=RAW_BODIES)
def test_teacher_server_answers_any_body_clearly(teacher_url, body):
    assert_clear_answer(*post(teacher_url, body))


def test_the_fuzzed_servers_do_answer_valid_requests(student_url, teacher_url):
    # The properties above pass vacuously if every request is refused: one valid request each must get 200.
    for url, model in ((student_url, "distill-student"), (teacher_url, "tiny-clf")):
        body = assert_clear_answer(*post(url, encode({"model": model, "messages": [
            {"role": "user", "content": "my card"}]}, True)))
        assert body["choices"][0]["message"]["content"] in LABELS
