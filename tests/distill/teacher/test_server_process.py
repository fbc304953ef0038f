"""`distill teacher serve` as its own process over real HTTP: closed by default, bounded bodies,
uploads streamed to disk, files that expire, and no temporary directory left behind."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from distill.httpserver import free_port, stop_process, wait_for_health

KEY = "teacher-process-key"
AUTH = {"authorization": f"Bearer {KEY}"}
UPLOAD_LIMIT = 8 * 1024 * 1024


def _env(tmpdir: Path, key: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_TEACHER_API_KEY"}
    env["TMPDIR"] = str(tmpdir)  # where the server makes its files directory: watched by the tests
    if key:
        env["DISTILL_TEACHER_API_KEY"] = key
    return env


def _cli(model_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "distill.cli", "teacher", "serve", str(model_dir), "--model-name", "clf", *args]


@contextmanager
def teacher(model_dir: Path, tmpdir: Path, key: str | None, *args: str):
    """The server on a free loopback port; yields (base URL, process, stderr path)."""
    port = free_port()
    stderr = tmpdir / f"stderr-{port}.log"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(_cli(model_dir, "--host", "127.0.0.1", "--port", str(port), *args),
                                env=_env(tmpdir, key), stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, 180, "distill teacher serve", exit_detail=lambda: stderr.read_text()[-2000:])
        yield url, proc, stderr
    finally:
        if proc.poll() is None:
            stop_process(proc)


@pytest.fixture(scope="module")
def server(tiny_classifier, tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("teacher-tmp")
    with teacher(tiny_classifier, tmpdir, KEY, "--max-request-bytes", "65536",
                 "--max-upload-bytes", str(UPLOAD_LIMIT)) as (url, proc, stderr):
        files_dirs = list(tmpdir.glob("distill-teacher-files-*"))
        assert len(files_dirs) == 1
        yield url, proc, files_dirs[0], stderr


def chat_body(text: str = "my card was declined") -> dict:
    return {"model": "clf", "messages": [{"role": "user", "content": text}]}


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def raw_request(url: str, head: str, body: bytes = b"") -> str:
    """Send a request head (and maybe part of a body) on a raw socket; the server's reply as text."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _length(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply.decode(errors="replace")


def _length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_refuses_to_start_without_a_key_or_open_beyond_loopback(tiny_classifier, tmp_path):
    no_key = subprocess.run(_cli(tiny_classifier, "--port", str(free_port())), env=_env(tmp_path, None),
                            capture_output=True, text=True, timeout=120)
    assert no_key.returncode == 2 and "DISTILL_TEACHER_API_KEY" in no_key.stderr and "--insecure-no-auth" in no_key.stderr
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        exposed = subprocess.run(_cli(tiny_classifier, "--insecure-no-auth", "--host", host, "--port",
                                      str(free_port())), env=_env(tmp_path, None), capture_output=True, text=True,
                                 timeout=120)
        assert exposed.returncode == 2 and "refused" in exposed.stderr, (host, exposed.stderr)
    # Another variable, as a deployment names it: the key is read from there.
    other = subprocess.run(_cli(tiny_classifier, "--api-key-env", "MY_TEACHER_KEY", "--port", str(free_port())),
                           env=_env(tmp_path, KEY), capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "MY_TEACHER_KEY" in other.stderr
    assert not list(tmp_path.glob("distill-teacher-files-*"))


def test_every_route_but_health_needs_the_key(server):
    url, _, _, _ = server
    assert httpx.get(url + "/health").status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/files"),
                         ("GET", "/v1/files/file-x/content"), ("POST", "/v1/batches"), ("GET", "/docs")):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            r = httpx.request(method, url + path, headers=headers, json=chat_body())
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert c.chat.completions.create(**chat_body()).choices[0].message.content in ("positive", "negative", "neutral")


def test_oversized_chat_bodies_are_refused_before_they_are_read(server):
    url, _, _, _ = server
    # 5 MB announced, 64 KB sent: the 413 comes back while the rest of the body is still unsent.
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n")
    reply = raw_request(url, head, b"{" + b" " * 65535)
    assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply
    # Chunked (no content-length): counted as it arrives.
    big = json.dumps(chat_body("word " * 20000)).encode()
    r = httpx.post(url + "/v1/chat/completions", content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    within = httpx.post(url + "/v1/chat/completions", json=chat_body("word " * 12000), headers=AUTH, timeout=30)
    assert within.status_code == 200


def _upload(url: str, data: bytes, **kw):
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    return c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch", **kw)


def test_uploads_stream_to_disk_and_stop_at_the_limit(server):
    url, proc, files_dir, stderr = server
    _upload(url, b'{"warm": "up"}\n')
    peak = peak_rss_kb(proc.pid)
    # Just under the limit, with CRLFs and dashes that look like the start of a boundary.
    line = b'{"custom_id": "x", "body": "--\\r\\n--=="}\r\n--\r\n'
    data = (line * (UPLOAD_LIMIT // len(line) - 100))
    f = _upload(url, data)
    assert f.bytes == len(data)
    assert (files_dir / f"{f.id}.data").read_bytes() == data
    grew_mb = (peak_rss_kb(proc.pid) - peak) / 1024
    assert grew_mb < len(data) / 2**20 / 2, grew_mb  # held in memory, it would be the whole file at least

    # 200 MB announced: refused before it is read, nothing written.
    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000000\r\n\r\n")
    reply = raw_request(url, head, b"--b\r\n" + b"x" * 65536)
    assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply
    # Chunked past the limit: 413 once the limit is passed, and the partial file is removed.
    before = sorted(p.name for p in files_dir.iterdir())
    boundary = "xyz"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
             f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()]
    parts += [b"y" * 65536] * (UPLOAD_LIMIT // 65536 + 8)
    r = httpx.post(url + "/v1/files", content=iter(parts), timeout=60,
                   headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert sorted(p.name for p in files_dir.iterdir()) == before
    assert peak_rss_kb(proc.pid) - peak < UPLOAD_LIMIT / 1024 / 2
    # A client that hangs up halfway: nothing kept, nothing but a debug line.
    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n")
    host, port = url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head.encode() + parts[0] + b"z" * 50000)
    time.sleep(0.5)
    assert httpx.get(url + "/health").status_code == 200
    assert sorted(p.name for p in files_dir.iterdir()) == before
    log = stderr.read_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def test_files_expire(server):
    url, _, files_dir, _ = server
    f = _upload(url, b'{"a": 1}\n', expires_after={"anchor": "created_at", "seconds": 1})
    assert f.expires_at is not None and f.expires_at - f.created_at == 1
    assert (files_dir / f"{f.id}.data").exists()
    time.sleep(1.5)
    r = httpx.get(url + f"/v1/files/{f.id}/content", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    assert not list(files_dir.glob(f"{f.id}.*"))
    kept = _upload(url, b'{"b": 2}\n')
    assert kept.expires_at - kept.created_at == 86400  # the server's default lifetime


@pytest.mark.slow
def test_open_on_loopback_when_asked_and_no_directory_left_after_shutdown(tiny_classifier, tmp_path):
    with teacher(tiny_classifier, tmp_path, None, "--insecure-no-auth") as (url, proc, stderr):
        made = list(tmp_path.glob("distill-teacher-files-*"))
        assert len(made) == 1
        f = _upload(url, b'{"a": 1}\n')
        assert httpx.get(url + f"/v1/files/{f.id}").json()["bytes"] == 9  # no key needed: it was asked for
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    assert not made[0].exists() and not list(tmp_path.glob("distill-teacher-files-*"))
    assert "unauthenticated" in stderr.read_text()
