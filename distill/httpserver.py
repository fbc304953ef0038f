"""Loopback HTTP plumbing: an ASGI app (the teacher server, the student server) in a background
thread, a server process waited for and stopped, and the minimal chat-completions app that
evaluation serves a model with.

Used by the demo (the local teacher), the evaluation stage (a student over real HTTP) and the tests.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class RunningServer:
    url: str  # base URL without a trailing slash, e.g. http://127.0.0.1:8765
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0,
                    log_level: str = "warning") -> RunningServer:
    """Start `app` with uvicorn in a daemon thread and return once it accepts connections."""
    import uvicorn

    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"http-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"server on {host}:{port} failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"server on {host}:{port} did not start within {startup_timeout}s")
        time.sleep(0.02)
    return RunningServer(url=f"http://{host}:{port}", server=server, thread=thread)


def wait_for_health(url: str, proc: subprocess.Popen, timeout_s: float, name: str, poll_s: float = 0.2,
                    exit_detail: Callable[[], str] | None = None) -> None:
    """Return once `url`/health answers; raise naming `name` if `proc` exits first or `timeout_s` passes.

    exit_detail: called when the process has exited, for the end of the error (e.g. its stderr).
    """
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            detail = f": {exit_detail()}" if exit_detail else ""
            raise RuntimeError(f"{name} exited with {proc.returncode} before it answered{detail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer /health within {timeout_s} s") from None
            time.sleep(poll_s)


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Terminate `proc` (a server shuts down gracefully on SIGTERM); kill it if it is still there after timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def minimal_chat_app(answer: Callable[[list[dict]], str]) -> Any:
    """A bare OpenAI-compatible `/v1/chat/completions` endpoint: `answer(messages)` is the reply's content.

    No authentication, logging or batching: for measuring a model over real HTTP where the full
    server (`distill serve`) is not what is being measured or cannot be built.
    """
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        content = answer(body.get("messages") or [])
        return {"id": "chatcmpl-student", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "student"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}}

    return app
