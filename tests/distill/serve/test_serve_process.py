"""`distill serve` as its own process, over real HTTP: closed by default, load, auth, limits, bad
bodies, slow bodies, client disconnects, unknown models and what /health gives away."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from distill.evaluate import latency

KEY = "process-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_classifier, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-process")
    stderr = tmp / "stderr.log"
    overrides = [f"serve.log_url=sqlite:///{tmp}/log.sqlite", "serve.max_request_bytes=2048", "serve.timeout_s=1.5"]
    with latency.serve_process(tiny_classifier, overrides, api_key=KEY, stderr_path=stderr) as url:
        yield url, stderr


def body(content: str = "my card was declined", model: str = "distill-student") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def post(url: str, raw: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=raw, timeout=10,
                      headers={**AUTH, "content-type": "application/json", **(headers or {})})


def test_load_auth_oversize_and_malformed_bodies(server):
    url, _ = server
    chat = url + "/v1/chat/completions"
    res = latency.sweep(chat, [body(f"question {i}") for i in range(20)], 64, [1, 16], api_key=KEY)
    assert res[1]["ok"] == 64 and res[16]["ok"] == 64 and res[16]["errors"] == 0
    assert latency.measure_process(chat, [body()], 4, 2, api_key="wrong")["error_kinds"] == {"HTTP 401": 4}
    big = post(url, json.dumps(body("card " * 1000)).encode())
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = post(url, b"{not json")
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]


def test_bad_encoding_is_a_400_in_json(server):
    url, _ = server
    surrogate = post(url, b'{"model": "distill-student", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert surrogate.status_code == 400
    assert "Unicode" in surrogate.json()["error"]["message"]
    invalid = post(url, b'{"model": "distill-student", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert invalid.status_code == 400 and invalid.headers["content-type"].startswith("application/json")
    encoded_surrogate = post(url, '{"model": "distill-student", "messages": [{"role": "user", "content": "'.encode()
                             + b"\xed\xa0\x80" + b'"}]}')
    assert encoded_surrogate.status_code == 400 and encoded_surrogate.json()["error"]["param"] == "messages"
    bad_user = post(url, json.dumps({**body(), "user": "\ud800"}).encode())
    assert bad_user.status_code == 400 and bad_user.json()["error"]["param"] == "user"
    assert post(url, json.dumps(body()).encode()).status_code == 200  # the server is still fine


def test_unknown_model_is_404_model_not_found_and_health_shows_no_paths(server, tiny_classifier):
    url, _ = server
    r = post(url, json.dumps(body(model="gpt-4o-mini")).encode())
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "gpt-4o-mini" in err["message"]
    health = httpx.get(url + "/health").text
    assert json.loads(health)["status"] == "ok"
    assert str(tiny_classifier) not in health and Path(tiny_classifier).name not in health and "/" not in health


def _raw(url: str) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    return s


def test_slow_body_times_out_and_disconnects_leave_no_traceback(server):
    url, stderr = server
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n").encode()
    s = _raw(url)
    s.sendall(head + b'{"model": "distill-')  # and then nothing: a client trickling its body
    t0 = time.perf_counter()
    s.settimeout(30)
    reply = ""
    while "request_timeout" not in reply:  # headers and body may arrive in separate segments
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk.decode(errors="replace")
    waited = time.perf_counter() - t0
    s.close()
    assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply
    assert waited < 8  # serve.timeout_s is 1.5: the slot is freed, not held until the client gives up
    before = stderr.read_text() if stderr.exists() else ""
    for _ in range(3):  # half a body, then the client hangs up
        s = _raw(url)
        s.sendall(head + b'{"model": ')
        s.close()
    time.sleep(0.5)
    assert post(url, json.dumps(body()).encode()).status_code == 200
    after = stderr.read_text()[len(before):]
    assert "Traceback" not in after and "Exception in ASGI" not in after


def test_worker_processes_share_the_port(tiny_classifier, tmp_path):
    import subprocess

    overrides = [f"serve.log_url=sqlite:///{tmp_path}/log.sqlite", "serve.workers=2", "serve.runtime=torch"]
    with latency.serve_process(tiny_classifier, overrides, api_key=KEY) as url:
        # forked workers carry the supervisor's command line: supervisor + 2 workers. The first worker
        # may answer /health before the second is forked, so count until both are there (or 20 s).
        deadline = time.monotonic() + 20
        while True:
            procs = subprocess.run(["pgrep", "-f", "--", f"--port {urlparse(url).port}"], capture_output=True,
                                   text=True).stdout.split()
            if len(procs) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        res = latency.measure_process(url + "/v1/chat/completions", [body(f"q {i}") for i in range(8)], 40, 8,
                                      api_key=KEY)
    assert len(procs) == 3, procs
    assert res["ok"] == 40


def _serve_cmd(student: Path, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "distill.cli", "serve", "--student", str(student), *args]


def _no_key_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "DISTILL_SERVE_API_KEY"}


def test_refuses_to_start_without_a_key_or_open_beyond_loopback(tiny_classifier, tmp_path):
    import subprocess

    from distill.httpserver import free_port

    log = [f"--set=serve.log_url=sqlite:///{tmp_path}/log.sqlite"]
    no_key = subprocess.run(_serve_cmd(tiny_classifier, "--port", str(free_port()), *log), env=_no_key_env(),
                            capture_output=True, text=True, timeout=120)
    assert no_key.returncode == 2
    assert "DISTILL_SERVE_API_KEY" in no_key.stderr and "--insecure-no-auth" in no_key.stderr
    for host in ("0.0.0.0", "::"):
        exposed = subprocess.run(_serve_cmd(tiny_classifier, "--insecure-no-auth", "--host", host, "--port",
                                            str(free_port()), *log), env=_no_key_env(),
                                 capture_output=True, text=True, timeout=120)
        assert exposed.returncode == 2 and "refused" in exposed.stderr and host in exposed.stderr, exposed.stderr
    # serve.api_key_env names the variable: a key in the default one does not count.
    other = subprocess.run(_serve_cmd(tiny_classifier, "--set", "serve.api_key_env=MY_SERVE_KEY", *log),
                           env={**_no_key_env(), "DISTILL_SERVE_API_KEY": KEY}, capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 2 and "MY_SERVE_KEY" in other.stderr
    assert not (tmp_path / "log.sqlite").exists()  # refused before anything was opened


@pytest.mark.slow
def test_insecure_no_auth_serves_open_on_loopback_only_when_asked(tiny_classifier, tmp_path):
    import subprocess

    from distill.httpserver import free_port, stop_process, wait_for_health

    port = free_port()
    stderr = tmp_path / "stderr.log"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(_serve_cmd(tiny_classifier, "--insecure-no-auth", "--host", "127.0.0.1", "--port",
                                           str(port), f"--set=serve.log_url=sqlite:///{tmp_path}/log.sqlite"),
                                env=_no_key_env(), stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, 180, "distill serve", exit_detail=lambda: stderr.read_text()[-2000:])
        r = httpx.post(url + "/v1/chat/completions", json=body(), timeout=20)  # no Authorization header
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    finally:
        stop_process(proc)
    assert "unauthenticated" in stderr.read_text()
