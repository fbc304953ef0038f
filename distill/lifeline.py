"""No child outlives the run: a watcher process that stops this process's children when it dies.

`distill run` and `distill demo` start children that must not survive them: the temporary
Prefect server (started by Prefect itself), the demo's `distill teacher serve`, the student
server the latency check starts. A SIGKILL of the parent runs no `finally`, no atexit and no
signal handler, so the cleanup has to live in another process.

Why a watcher and not PR_SET_PDEATHSIG or a process group of their own:
- PR_SET_PDEATHSIG is set by the child on itself before exec, so it cannot cover the Prefect
  server, whose Popen is Prefect's; it is Linux-only; and it fires when the *thread* that forked
  the child ends, not the process, which a child started from a worker thread would trip over.
- A process group of their own needs someone alive to signal it, and it takes the children out of
  the terminal's foreground group, so Ctrl-C would no longer reach them.

The watcher reads a pipe whose only writer is this process: end of file means this process is
gone, however it died. Until then it notes, about once a second, every descendant started after
it (pid and start time, so a reused pid is never hit), plus any pid registered with `watch` at
once; at the end it sends them SIGTERM, and SIGKILL to those still there after a grace period.
The children stay in the caller's process group, so a signal to the group still reaches them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

def _watch(parent: int, parent_start: float, since: float, poll_s: float, grace_s: float) -> None:
    """The watcher's body (`python -m distill.lifeline PID START SINCE POLL GRACE`, stdin the pipe).

    Only descendants started after `since` (when the parent asked for a watcher) are stopped.
    """
    import select
    import signal

    import psutil

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # a Ctrl-C for the whole group must not stop the cleanup first
    me, seen = os.getpid(), {}

    def note(proc, registered: bool = False) -> None:
        try:
            started = proc.create_time()
        except psutil.Error:
            return
        if proc.pid != me and (registered or started >= since):
            seen[proc.pid] = started

    def parent_alive() -> bool:
        try:
            return abs(psutil.Process(parent).create_time() - parent_start) < 1.0
        except psutil.Error:
            return False

    fd, buf = sys.stdin.fileno(), b""
    while True:
        try:
            for child in psutil.Process(parent).children(recursive=True):
                note(child)
        except psutil.Error:
            pass
        ready, _, _ = select.select([fd], [], [], poll_s)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                if line.strip().isdigit():
                    try:
                        note(psutil.Process(int(line)), registered=True)
                    except psutil.Error:
                        pass
        elif not parent_alive():
            break  # a forked child may still hold the pipe open; the parent itself is what counts
    _stop(seen, grace_s)


def _stop(seen: dict[int, float], grace_s: float) -> None:
    """SIGTERM to each process in `seen` that is still the one noted (same start time), SIGKILL after grace_s."""
    import psutil

    left = []
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 0.01:
                proc.terminate()
                left.append(proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


_pipe: int | None = None
_watcher: subprocess.Popen | None = None


def start_lifeline(poll_s: float = 1.0, grace_s: float = 5.0) -> int:
    """Start this process's watcher (once; later calls return the same one). Returns its pid.

    Args:
        poll_s: how often the watcher looks for new descendants.
        grace_s: how long stopped children get between SIGTERM and SIGKILL.
    """
    global _pipe, _watcher
    if _watcher is not None and _watcher.poll() is None:
        return _watcher.pid
    import psutil

    read_end, write_end = os.pipe()  # not inheritable: children started with exec never hold the writer
    me = os.getpid()
    # The package's own folder first: the watcher must run this code, whatever the environment's path.
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "distill.lifeline", str(me), repr(psutil.Process(me).create_time()),
         repr(time.time() - 1.0), str(poll_s), str(grace_s)],
        stdin=read_end, stdout=subprocess.DEVNULL, close_fds=True, env=env)
    os.close(read_end)
    _pipe = write_end
    return _watcher.pid


def watch(pid: int) -> None:
    """Have the watcher stop process `pid` with this one, from now on (no-op without a watcher)."""
    if _pipe is not None:
        try:
            os.write(_pipe, f"{pid}\n".encode())
        except OSError:
            pass  # the watcher is gone; nothing better to do from here


if __name__ == "__main__":
    _watch(int(sys.argv[1]), *(float(a) for a in sys.argv[2:6]))
