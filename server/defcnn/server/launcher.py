"""The one way to run `defcnn serve` as a child process: on a free loopback port, found
from its ready file (never from its log), and stopped on every way out.

The demo, the soak, the benchmarks and the integration tests all start servers with
`local_server`. The child is stopped by the `finally` of the `with` block (a normal end,
an exception, Ctrl-C, and SIGTERM under `sigterm_as_interrupt`); on Linux the kernel also
sends it SIGTERM when the launching process dies, even by SIGKILL. Torch-free, like the
rest of the server package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from defcnn.errors import DefcnnError
from defcnn.server.ready import ModelState, ReadyFile

LOG_TAIL_CHARS = 3000


@dataclass(frozen=True)
class LocalServer:
    """A running server: its address for clients (`url`), what its ready file said, and
    its log file. `process` is the child itself, for tests that signal it."""

    url: str
    host: str
    port: int
    metrics_port: int | None
    pid: int
    log: Path
    models: tuple[ModelState, ...]
    process: subprocess.Popen[bytes] = field(repr=False, compare=False)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the server drains), wait up to `timeout_s`, then SIGKILL; the exit code.
        Safe to call more than once, and after the child has ended by itself."""
        proc = self.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


def log_tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a log file, for an error message ('' when there is none)."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# Runs first in the child, then execs the server in the same process (same pid): asks the
# kernel for SIGTERM when the parent dies (PR_SET_PDEATHSIG survives exec), and gives up if
# the parent already died. Done here rather than in a `preexec_fn`, which would force a
# plain fork() of a parent that runs gRPC threads: gRPC's fork handlers then restart its
# poller in the pre-exec child, which can abort on the descriptors subprocess closes.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(cmd: list[str]) -> list[str]:
    """Linux: `cmd` behind the prelude above. The kernel watches the spawning *thread*, so a
    child started from another thread would be stopped when that thread ends: only the main
    thread asks."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return cmd
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def _url(host: str, port: int) -> str:
    """Where a client on this machine reaches the server (wildcard binds via loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wait_ready(
    proc: subprocess.Popen[bytes], ready_file: Path, log: Path, timeout_s: float
) -> ReadyFile:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError):  # written atomically: all or nothing
            return ReadyFile.read(ready_file)
        if proc.poll() is not None:
            raise DefcnnError(
                f"defcnn serve exited with code {proc.returncode} before it was ready "
                f"(log: {log}):\n{log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise DefcnnError(
                f"defcnn serve was not ready within {timeout_s:g} s (log: {log}):\n{log_tail(log)}"
            )
        time.sleep(0.05)


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
    the duration of the `with` block, logging to `log`. `extra` flags go to `defcnn serve`
    after the defaults, so they win (`--port`, `--grace-seconds`, `--metrics-port`); `env`
    is added to its environment. A server that exits or stays unready for
    `start_timeout_s` raises DefcnnError with the end of its log."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="defcnn-serve-") as tmp:
        ready_file = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "defcnn", "serve", "--model-repo", str(repo),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0" if metrics else "-1",
               "--grace-seconds", str(grace_s), "--log-level", "WARNING", *extra,
               "--ready-file", str(ready_file)]  # fmt: skip
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                _with_parent_death_signal(cmd), stdout=sink, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches the caller, which stops the server
            )  # fmt: skip
        server: LocalServer | None = None
        try:
            ready = _wait_ready(proc, ready_file, log, start_timeout_s)
            server = LocalServer(
                url=_url(ready.host, ready.port), host=ready.host, port=ready.port,
                metrics_port=ready.metrics_port, pid=ready.pid, log=log, models=ready.models,
                process=proc,
            )  # fmt: skip
            yield server
        finally:
            if server is not None:
                server.stop(grace_s + 5)
            elif proc.poll() is None:  # never became ready: nothing to drain
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks (the server's stop) run.
    Main thread only, as Python's signal handlers are."""

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
