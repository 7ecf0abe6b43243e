"""`defcnn serve --ready-file` and the one launcher built on it: what the file says is true
of the running server, a server that cannot start is reported with its log, a ready file
that could not be written is refused before serving, and the child never outlives the
`with` block."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from defcnn.cli import EXIT_USAGE
from defcnn.errors import DefcnnError
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server.launcher import local_server
from defcnn.server.ready import ModelState
from defcnn.server.scrape import queue_gauges


def _ready(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def _gone(pid: int) -> bool:
    """True once `pid` has ended (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_ready_file_describes_the_running_server(repo, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "defcnn", "serve", "--model-repo", str(repo.root),
           "--port", "0", "--metrics-port", "0", "--log-level", "WARNING",
           "--ready-file", str(ready)]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        doc = json.loads(ready.read_text())
        assert doc["host"] == "127.0.0.1" and doc["port"] > 0 and doc["pid"] == proc.pid
        assert doc["tls"] is False and doc["format"] == 1
        assert _ready(f"127.0.0.1:{doc['port']}")  # the port really answers
        assert queue_gauges(doc["metrics_port"], "digits")["pending"] == 0
        models = {m["name"]: m for m in doc["models"]}
        assert models["digits"] == {"name": "digits", "version": 1, "ready": True, "reason": ""}
        assert models["broken"]["ready"] is False and models["broken"]["reason"]
        assert "defcnn serve: ready" in log.read_text()  # the human line stays
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    assert not ready.exists()  # a stopped server is not ready


def test_the_launcher_returns_the_ready_file_and_stops_the_child(repo, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "serve.log"  # the folder is made
    with local_server(repo.root, log, metrics=True) as server:
        assert server.pid == server.process.pid
        assert server.url == f"127.0.0.1:{server.port}" and _ready(server.url)
        assert server.metrics_port and queue_gauges(server.metrics_port, "digits")["pending"] == 0
        by_name = {m.name: m for m in server.models}
        assert by_name["digits"] == ModelState("digits", 1, True, "")
        assert not by_name["broken"].ready and by_name["broken"].reason
    assert server.process.returncode == 0  # drained and exited cleanly
    assert _gone(server.pid) and log.exists()


def test_the_launcher_stops_the_child_on_an_exception(repo, tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        local_server(repo.root, tmp_path / "serve.log") as server,
    ):
        assert server.metrics_port is None  # metrics off by default
        raise RuntimeError("boom")
    assert server.process.returncode is not None and _gone(server.pid)


def test_a_server_that_cannot_start_is_a_clear_error_with_its_log(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repo"
    with pytest.raises(DefcnnError) as exc, local_server(missing, tmp_path / "serve.log"):
        pytest.fail("the launcher yielded a server that never started")
    message = str(exc.value)
    assert "exited with code 2 before it was ready" in message  # a bad argument
    assert f"{missing} is not a folder" in message  # the log's tail, in the error


@pytest.mark.parametrize(
    "case", ["missing folder", "parent is a file", "is a folder", "folder refuses files"]
)
def test_a_ready_file_that_cannot_be_written_is_refused_before_serving(
    tmp_path: Path, case: str
) -> None:
    if case == "folder refuses files" and sys.platform != "linux":
        pytest.skip("/proc takes no new files, even from root, on Linux")
    (tmp_path / "file").write_text("x")
    path = {
        "missing folder": tmp_path / "missing" / "ready.json",
        "parent is a file": tmp_path / "file" / "ready.json",
        "is a folder": tmp_path,
        "folder refuses files": Path("/proc/defcnn-ready.json"),
    }[case]
    done = _serve(tmp_path, path)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert f"--ready-file {path}" in done.stderr


def _serve(repo: Path, ready_file: Path) -> subprocess.CompletedProcess[str]:
    """`defcnn serve` in a child with a time limit: a check that regressed into serving
    fails the test instead of hanging the suite."""
    argv = ["serve", "--model-repo", str(repo), "--port", "0", "--metrics-port", "-1",
            "--ready-file", str(ready_file)]  # fmt: skip
    return subprocess.run([sys.executable, "-m", "defcnn", *argv], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_a_stale_ready_file_is_removed_before_the_server_starts(tmp_path: Path) -> None:
    """A file left by a killed server must not tell a watcher that this one is ready."""
    ready = tmp_path / "ready.json"
    ready.write_text('{"format": 1, "port": 1}')
    done = _serve(tmp_path / "no-such-repo", ready)  # a server that fails to start
    assert done.returncode != 0
    assert not ready.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_ready_file_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        done = _serve(tmp_path, folder / "ready.json")
        assert done.returncode == EXIT_USAGE, done.stderr
        assert "cannot write in" in done.stderr
    finally:
        folder.chmod(0o700)


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path, repo) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "defcnn", "serve", "--model-repo", str(repo.root),
             "--port", str(port), "--metrics-port", "-1"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
