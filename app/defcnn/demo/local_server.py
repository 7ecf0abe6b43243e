"""A `defcnn serve` child process that the demo owns: started on a free loopback port,
and stopped on every way out (normal end, an exception, Ctrl-C, SIGTERM, and on Linux
even when the demo itself is killed)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from defcnn.errors import DefcnnError

READY = re.compile(r"ready on (\S+):(\d+) .*?(?:metrics on :(\d+))?\)")


@dataclass(frozen=True)
class LocalServer:
    """A running server: its address for clients, its process and its log file."""

    url: str
    pid: int
    log: Path
    metrics_port: int | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the kernel sends the server SIGTERM when the demo process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_server(
    repo: Path,
    log: Path,
    *,
    metrics: bool = False,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    start_timeout_s: float = 120.0,
    grace_s: float = 5.0,
) -> Iterator[LocalServer]:
    """Serve `repo` on 127.0.0.1 (any free port; with `metrics`, Prometheus on another) for
    the duration of the `with` block. `extra` flags go to `defcnn serve`; `env` is added to
    its environment."""
    cmd = [sys.executable, "-m", "defcnn.cli", "serve", "--model-repo", str(repo),
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0" if metrics else "-1",
           "--grace-seconds", str(grace_s), "--log-level", "WARNING", *extra]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the server itself
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            match = READY.search(log.read_text(errors="replace"))
            if match:
                break
            if proc.poll() is not None:
                raise DefcnnError(f"the server exited with code {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise DefcnnError(f"the server did not start in {start_timeout_s:g} s; see {log}")
            time.sleep(0.1)
        metrics_port = int(match.group(3)) if match.group(3) else None
        yield LocalServer(f"{match.group(1)}:{match.group(2)}", proc.pid, log, metrics_port)
    finally:
        _stop(proc, grace_s)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks (the server's stop) run."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if os.name != "posix":
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
