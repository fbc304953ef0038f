"""The local teacher server over real HTTP, spoken to by the real `openai` client."""

import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distill.config import ConfigError
from distill.httpserver import start_in_thread
from distill.teacher.server import create_app

LABELS = ["positive", "negative", "neutral"]


def client_for(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def clf_server(tiny_classifier, tmp_path_factory):
    app = create_app(tiny_classifier, "tiny-clf", files_dir=tmp_path_factory.mktemp("files"), batch_wait_ms=5)
    with start_in_thread(app) as server:
        yield server


@pytest.fixture(scope="module")
def lm_server(tiny_causal_lm):
    with start_in_thread(create_app(tiny_causal_lm, "tiny-lm")) as server:
        yield server


def test_classifier_answers_label_with_label_logprobs(clf_server, tiny_classifier):
    from distill.models.classifier import ClassifierStudent
    from distill.teacher.soft_labels import soft_labels

    client = client_for(clf_server.url)
    assert [m.id for m in client.models.list().data] == ["tiny-clf"]
    text = "my card was declined"
    r = client.chat.completions.create(
        model="tiny-clf", messages=[{"role": "system", "content": "Classify."}, {"role": "user", "content": "hello"},
                                    {"role": "user", "content": text}],
        temperature=0, logprobs=True, top_logprobs=5, n=2, max_tokens=8)
    assert r.model == "tiny-clf" and r.id.startswith("chatcmpl-") and r.created > 0
    assert [c.message.content for c in r.choices] == [r.choices[0].message.content] * 2
    first = r.choices[0].logprobs.content[0]
    tops = first.top_logprobs
    assert len(tops) == len(LABELS)  # top_logprobs is capped at the number of labels
    assert {t.token for t in tops} == set(LABELS)
    probs = [math.exp(t.logprob) for t in tops]
    assert sum(probs) <= 1 + 1e-6 and sum(probs) > 0.99
    assert probs == sorted(probs, reverse=True)
    assert first.token == tops[0].token == r.choices[0].message.content
    assert first.bytes == list(first.token.encode())
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 2 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The served distribution is the model's own, on the LAST user message.
    expected = ClassifierStudent(tiny_classifier).predict_proba([text])[0]
    served = {t.token: math.exp(t.logprob) for t in tops}
    for label, p in zip(LABELS, expected):
        assert served[label] == pytest.approx(p, abs=1e-5)
    record = {"response": r.choices[0].message.content, "logprobs": [first.model_dump()]}
    assert max(soft_labels(record, LABELS).items(), key=lambda kv: kv[1])[0] == first.token

    plain = client.chat.completions.create(model="tiny-clf", messages=[{"role": "user", "content": text}])
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == first.token


def test_concurrent_classifier_requests_share_forward_passes(clf_server, tiny_classifier):
    import httpx

    from distill.models.classifier import ClassifierStudent

    texts = [f"{w} card payment {i}" for i, w in enumerate(["refund", "lost", "cash", "good", "bad", "pin"] * 8)]
    expected = ClassifierStudent(tiny_classifier).predict(texts)
    before = httpx.get(clf_server.url + "/health").json()

    def ask(text):
        r = httpx.post(clf_server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny-clf", "messages": [{"role": "user", "content": text}]})
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, texts))
    after = httpx.get(clf_server.url + "/health").json()
    assert answers == expected  # batching never mixes up whose answer is whose
    assert after["batched_requests"] - before["batched_requests"] == len(texts)
    assert after["batches"] - before["batches"] < len(texts)


def test_causal_lm_generates_with_token_logprobs(lm_server):
    client = client_for(lm_server.url)
    messages = [{"role": "user", "content": "how do i top up my card"}]
    ref = client.chat.completions.create(model="tiny-lm", messages=messages, temperature=0, max_tokens=12,
                                         logprobs=True, top_logprobs=3)
    ref_tokens = [t.token for t in ref.choices[0].logprobs.content]
    assert len(ref_tokens) >= 6, "the fixture model should not emit EOS this early"

    r = client.chat.completions.create(model="tiny-lm", messages=messages, temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=3, n=2)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    for c in r.choices:
        assert c.finish_reason == "length"
        assert [t.token for t in c.logprobs.content] == ref_tokens[:5]
        for t in c.logprobs.content:
            assert len(t.top_logprobs) == 3 and t.logprob <= 0
            assert t.token == t.top_logprobs[0].token  # greedy picks the most likely token
            assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
            assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-6
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 5

    # A stop string ends the answer before it, with finish_reason "stop".
    word = next(t for t in ref_tokens[2:] if t.strip() and not t.startswith("<"))
    cut = client.chat.completions.create(model="tiny-lm", messages=messages, temperature=0, max_tokens=12, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].message.content
    assert ref.choices[0].message.content.startswith(cut.choices[0].message.content)

    # Sampling with a seed is reproducible, and n samples come back.
    kw = dict(model="tiny-lm", messages=messages, temperature=1.5, max_tokens=6, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3 and a.usage.completion_tokens <= 18


def test_causal_lm_stops_at_eos(tiny_causal_lm, tmp_path):
    """EOS ends generation with finish_reason "stop": a copy of the model whose EOS is its 4th greedy token."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    messages = [{"role": "user", "content": "how do i top up my card"}]
    with start_in_thread(create_app(tiny_causal_lm, "lm")) as server:
        ref = client_for(server.url).chat.completions.create(model="lm", messages=messages, temperature=0,
                                                             max_tokens=8, logprobs=True)
    tokens = [t.token for t in ref.choices[0].logprobs.content]
    model_dir = Path(shutil.copytree(tiny_causal_lm, tmp_path / "lm"))
    stop_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(tokens[3])
    gen = GenerationConfig.from_pretrained(model_dir)
    gen.eos_token_id = [gen.eos_token_id, stop_id]
    gen.save_pretrained(model_dir)
    with start_in_thread(create_app(model_dir, "lm")) as server:
        r = client_for(server.url).chat.completions.create(model="lm", messages=messages, temperature=0,
                                                           max_tokens=8, logprobs=True)
    assert r.choices[0].finish_reason == "stop"
    assert [t.token for t in r.choices[0].logprobs.content] == tokens[:3]  # EOS itself is not content
    assert r.usage.completion_tokens == 4


def test_errors_are_openai_shaped(clf_server):
    import httpx
    import openai

    client = client_for(clf_server.url)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-clf", messages=[{"role": "system", "content": "only system"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-clf", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny-clf", messages=[])
    assert "messages" in e.value.body["message"]
    r = httpx.post(clf_server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "code", "param"}
    r = httpx.post(clf_server.url + "/v1/chat/completions", json={"model": "tiny-clf", "messages": [{"role": "x"}]})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("messages")
    assert httpx.get(clf_server.url + "/v1/batches/batch-missing").status_code == 404
    assert httpx.get(clf_server.url + "/v1/files/file-missing").json()["error"]["code"] == "file_not_found"


def wait_batch(client, batch_id: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired") or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


def test_batch_api_round_trip(clf_server):
    client = client_for(clf_server.url)
    texts = ["my card was stolen", "what is the exchange rate", "thanks good app"]
    lines = [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny-clf", "messages": [{"role": "user", "content": t}], "logprobs": True,
                       "top_logprobs": 3}} for i, t in enumerate(texts)]
    lines.append({"custom_id": "row-bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "other-model", "messages": [{"role": "user", "content": "x"}]}})
    data = "".join(json.dumps(l) + "\n" for l in lines).encode()
    f = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.bytes == len(data) and f.purpose == "batch"
    assert client.files.retrieve(f.id).filename == "in.jsonl"
    assert client.files.content(f.id).content == data

    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 3, 1)
    out = [json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["row-0", "row-1", "row-2"]
    live = {t: client.chat.completions.create(model="tiny-clf", messages=[{"role": "user", "content": t}])
            .choices[0].message.content for t in texts}
    for o in out:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and o["error"] is None and o["id"].startswith("batch_req")
        assert body["choices"][0]["message"]["content"] == live[texts[int(o["custom_id"][4:])]]
        assert len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    errors = [json.loads(l) for l in client.files.content(batch.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("row-bad", 404)]

    # A malformed input file fails validation with the offending line named.
    bad = client.files.create(file=("bad.jsonl", io.BytesIO(data + b"{oops\n")), purpose="batch")
    failed = wait_batch(client, client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions",
                                                      completion_window="24h").id)
    assert failed.status == "failed" and failed.errors.data[0].line == 5
    binary = client.files.create(file=("bin.jsonl", io.BytesIO(b"\xff\xfe{}\n")), purpose="batch")
    assert client.files.content(binary.id).content == b"\xff\xfe{}\n"  # stored byte for byte
    failed = wait_batch(client, client.batches.create(input_file_id=binary.id, endpoint="/v1/chat/completions",
                                                      completion_window="24h").id)
    assert failed.status == "failed" and "UTF-8" in failed.errors.data[0].message
    assert client.batches.cancel(batch.id).status == "completed"  # finished batches stay as they are
    import openai

    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")


def test_bad_model_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        create_app(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="neither"):
        create_app(tmp_path)


def test_minilm_embedding_teacher_serves_banking77(tmp_path):
    """The demo path: MiniLM + logistic head fitted on BANKING77 rows, served and queried."""
    import csv

    from distill.config import BUNDLED_DATA
    from distill.models.encoders import MINILM, EmbeddingClassifier

    with open(BUNDLED_DATA / "banking77" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed")
    rows = [r for w in wanted for r in [r for r in rows if r["category"] == w][:50]]  # ~200 rows, 4 intents
    labels = json.loads((BUNDLED_DATA / "banking77" / "categories.json").read_text())
    clf = EmbeddingClassifier.fit(MINILM, [r["text"] for r in rows], [r["category"] for r in rows], labels)
    clf.save(tmp_path / "teacher")
    with start_in_thread(create_app(tmp_path / "teacher", "banking77-teacher")) as server:
        client = client_for(server.url)
        queries = {"My card still has not arrived, it has been two weeks": "card_arrival",
                   "Someone stole my card, please block it": "lost_or_stolen_card",
                   "What exchange rate do you use for euros?": "exchange_rate"}
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda q: client.chat.completions.create(
                model="banking77-teacher", messages=[{"role": "user", "content": q}], temperature=0,
                logprobs=True, top_logprobs=20), queries))
    for reply, want in zip(replies, queries.values()):
        first = reply.choices[0].logprobs.content[0]
        assert reply.choices[0].message.content == want == first.token
        assert len(first.top_logprobs) == 20 and math.exp(first.top_logprobs[0].logprob) > 0.5
        assert sum(math.exp(t.logprob) for t in first.top_logprobs) <= 1 + 1e-6


def test_demo_teacher_process_requires_a_key_and_hands_it_to_the_client(tiny_classifier, port, monkeypatch):
    """`distill teacher serve` as the demo starts it: a real process with a key of its own, which the
    demo's config points the teacher client at, through the environment only."""
    import os

    import httpx
    import openai

    from distill.config import BUNDLED_DATA
    from distill.demo import TEACHER_KEY_ENV, demo_config, teacher_process
    from distill.teacher.client import resolve_api_key

    monkeypatch.setenv(TEACHER_KEY_ENV, "the-user's-own")
    with teacher_process(Path(tiny_classifier), port, "cli-clf") as url:
        cfg = demo_config(url, BUNDLED_DATA / "banking77" / "train.csv", True, [])
        key = resolve_api_key(cfg.teacher)
        assert key and key != "the-user's-own" and cfg.teacher.api_key_env == TEACHER_KEY_ENV
        assert key not in json.dumps(cfg.model_dump(mode="json"))  # the config names the variable only
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["model"] == "cli-clf" and health["labels"] == LABELS
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        c = openai.OpenAI(base_url=cfg.teacher.base_url, api_key=key, max_retries=0)
        r = c.chat.completions.create(model="cli-clf", messages=[{"role": "user", "content": "great app"}])
        assert r.choices[0].message.content in LABELS
    assert os.environ[TEACHER_KEY_ENV] == "the-user's-own"  # put back after the block


def test_thread_setting_stays_inside_the_model_worker(tiny_classifier):
    """The server's torch thread count must not leak into the rest of the process (e.g. training)."""
    import threading

    import torch

    before = torch.get_num_threads()
    app = create_app(tiny_classifier, "t", threads=1)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and seen == [before]
    assert app.state.teacher.executor.submit(torch.get_num_threads).result() == 1
    app.state.teacher.executor.shutdown()


def _multipart(boundary: str, purpose: bytes, filename: str, content: bytes) -> bytes:
    return (f"preamble\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n".encode()
            + purpose + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/jsonl\r\n\r\n".encode()
            + content + f"\r\n--{boundary}--\r\nepilogue".encode())


def test_multipart_upload_parser_is_exact_whatever_the_chunking():
    import random

    from distill.chat import ApiError
    from distill.teacher.server_batches import MultipartUpload

    boundary = "----b0undary"
    # Content that holds almost-delimiters: CRLF, dashes, the boundary without its leading CRLF--.
    content = bytes(random.Random(0).randrange(256) for _ in range(3000)) + b"\r\n--" + b"----b0undar" + b"\r\n-"
    body = _multipart(boundary, b"batch", "in.jsonl", content)
    for size in (1, 2, 7, 13, 64, 4096, len(body)):
        sink = io.BytesIO()
        upload = MultipartUpload(f"multipart/form-data; boundary={boundary}", sink)
        for i in range(0, len(body), size):
            upload.feed(body[i:i + size])
        upload.finish()
        assert sink.getvalue() == content and upload.file_bytes == len(content), size
        assert upload.fields == {"purpose": b"batch"} and upload.filename == "in.jsonl"
        assert len(upload.buf) < len(boundary) + 8  # never more than a delimiter's worth held back
    for bad_type in ("application/json", "multipart/form-data", "multipart/mixed; boundary=x"):
        with pytest.raises(ApiError, match="multipart/form-data"):
            MultipartUpload(bad_type, io.BytesIO())
    cut = MultipartUpload(f"multipart/form-data; boundary={boundary}", io.BytesIO())
    cut.feed(body[: len(body) // 2])
    with pytest.raises(ApiError, match="closing boundary"):
        cut.finish()
    twice = MultipartUpload(f"multipart/form-data; boundary={boundary}", io.BytesIO())
    with pytest.raises(ApiError, match="more than one"):
        twice.feed(body.replace(b'name="purpose"', b'name="file"; filename="a"'))


def test_long_texts_are_cut_without_changing_the_answer(tiny_classifier):
    from distill.teacher.server import CHARS_PER_TOKEN, ClassifierTeacher

    teacher = ClassifierTeacher(Path(tiny_classifier))
    long = "my card was declined at the shop again " * 2000  # ~80,000 characters, far past max_length
    assert len(long) > teacher._max_length * CHARS_PER_TOKEN
    (cut, tokens), = teacher.classify([long])
    import numpy as np

    uncut = teacher._logits([long])[0]  # the whole text through the tokenizer, truncated there
    assert np.allclose(cut, uncut - np.log(np.exp(uncut - uncut.max()).sum()) - uncut.max(), atol=1e-5)
    assert tokens == teacher._max_length


def test_a_temporary_files_directory_is_removed_with_its_store(tmp_path):
    import gc

    from distill.teacher.server_batches import BatchStore

    store = BatchStore(None)
    made = store.directory
    store.save_file(b"x", "a.jsonl", "batch")
    assert made.name.startswith("distill-teacher-files-") and made.exists()
    store.close()
    assert not made.exists()
    forgotten = BatchStore(None).directory  # created, never served, dropped
    gc.collect()
    assert not forgotten.exists()
    given = BatchStore(tmp_path / "files")
    given.close()
    assert (tmp_path / "files").exists()  # a directory the operator named is theirs


def test_a_killed_servers_files_directory_is_swept_by_the_next_one():
    import subprocess
    import sys

    from distill.teacher.server_batches import BatchStore

    # A SIGKILL skips every finalizer: the killed process's directory is left behind ...
    code = ("import os, signal; from distill.teacher.server_batches import BatchStore; s = BatchStore(None); "
            "s.save_file(b'x', 'a.jsonl', 'batch'); print(s.directory, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9
    left = Path(killed.stdout.strip())
    assert left.is_dir()
    alive = BatchStore(None)  # ... and the next store removes it, but never a live server's
    try:
        assert not left.exists()
        BatchStore(None).close()  # its sweep sees this process's directory as alive
        assert alive.directory.exists()
    finally:
        alive.close()


def test_only_loopback_may_be_open_and_a_set_key_always_counts(monkeypatch):
    from distill.teacher.server_guard import is_loopback, server_key

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "192.168.1.2", "example.org",
                                            "127.0.0.1.nip.io"))
    monkeypatch.delenv("SOME_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"no API key in \$SOME_KEY"):
        server_key("SOME_KEY", False, "127.0.0.1", "cmd")
    assert server_key("SOME_KEY", True, "127.0.0.1", "cmd") is None
    monkeypatch.setenv("SOME_KEY", "k")
    assert server_key("SOME_KEY", False, "0.0.0.0", "cmd") == "k"
    assert server_key("SOME_KEY", True, "::1", "cmd") == "k"  # a key that is set is required, flag or not
    with pytest.raises(ConfigError, match="refused with --host 0.0.0.0"):
        server_key("SOME_KEY", True, "0.0.0.0", "cmd")
