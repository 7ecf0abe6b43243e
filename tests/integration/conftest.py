"""A real model repository and real `defcnn serve` processes on free loopback ports."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from defcnn.export.exporter import ExportSettings, export
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server.launcher import LocalServer, _with_parent_death_signal, local_server, log_tail
from defcnn.training import TrainConfig, train

_LOGS: list[Path] = []  # the session's folder for server logs, set by _server_logs
_COUNT = itertools.count()
_OPEN: list[contextlib.ExitStack] = []  # servers start_server started and no test stopped


@dataclass
class ServerProcess:
    """A server started by `start_server`, open until `stop` (or the end of the test)."""

    server: LocalServer
    _exit: contextlib.ExitStack

    @property
    def address(self) -> str:
        return self.server.url

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.server.process

    def stub(self, channel: grpc.Channel | None = None) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(channel or grpc.insecure_channel(self.address))

    def stop(self) -> int:
        """SIGTERM and wait; the exit code (0 after a clean drain)."""
        code = self.server.stop(timeout_s=30)
        self._exit.close()
        return code


def start_server(repo: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `defcnn serve` (port 0, metrics on) with the launcher, without a `with` block:
    for tests that stop, kill or restart it themselves. Anything left running is stopped
    when the test ends."""
    srv = _launch(repo, extra, env)
    _OPEN.append(srv._exit)
    return srv


def _launch(repo: Path, extra: tuple[str, ...], env: dict[str, str] | None) -> ServerProcess:
    log = _LOGS[0] / f"server-{next(_COUNT)}.log"
    stack = contextlib.ExitStack()
    server = stack.enter_context(
        local_server(repo, log, metrics=True, extra=extra, env=env, grace_s=10.0)
    )
    return ServerProcess(server, stack)


@pytest.fixture(scope="session", autouse=True)
def _server_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    _LOGS[:] = [tmp_path_factory.mktemp("server-logs")]


@pytest.fixture(autouse=True)
def _stop_leftover_servers() -> Iterator[None]:
    """A test that fails before its `stop` leaves no server behind."""
    before = len(_OPEN)
    yield
    while len(_OPEN) > before:
        _OPEN.pop().close()


@dataclass
class Repo:
    root: Path
    onnx_path: Path
    session: ort.InferenceSession

    def reference(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """Two exported models (defective, max batch 16), and one whose model.onnx is corrupt."""
    root = tmp_path_factory.mktemp("repo")
    run = tmp_path_factory.mktemp("run") / "def"
    cfg = TrainConfig(
        arch="resnet18", width=0.125, defective=True, keep_prob=0.3, dataset="digits",
        epochs=1, max_steps=40, schedule="fast", out=str(run),
    )  # fmt: skip
    train(cfg, progress=False)
    ckpt = str(run / "model.safetensors")
    export(ExportSettings(checkpoint=ckpt, repo=str(root), name="digits", max_batch_size=16))
    export(ExportSettings(checkpoint=ckpt, repo=str(root), name="broken", max_batch_size=16))
    onnx_path = root / "digits" / "1" / "model.onnx"
    (root / "broken" / "1" / "model.onnx").write_bytes(onnx_path.read_bytes()[:5000])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return Repo(root, onnx_path, session)


@pytest.fixture(scope="session")
def surrogate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An independently trained standard surrogate (another seed, no masks), shared by the
    attack tests against our server and against foreign ones."""
    out = tmp_path_factory.mktemp("surrogate") / "run"
    cfg = TrainConfig(
        arch="resnet18", width=0.125, dataset="digits", epochs=1, max_steps=20,
        schedule="fast", seed=7, out=str(out),
    )  # fmt: skip
    train(cfg, progress=False)
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def server(repo: Repo) -> Iterator[ServerProcess]:
    srv = _launch(repo.root, ("--max-queue-delay-us", "5000"), None)
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="session")
def launch() -> type:
    """`launch.start(repo, *flags)` starts another server (for auth, TLS, limits, SIGTERM)."""

    class Launcher:
        start = staticmethod(start_server)

    return Launcher


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all test-made."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer=None, issuer_key=None, ca=False, ip=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if ip:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    ca, ca_key = make("test-ca", ca=True)
    files = {}
    for name, (cert, key) in {
        "ca": (ca, ca_key),
        "server": make("127.0.0.1", ca, ca_key, ip=True),
        "client": make("client", ca, ca_key),
    }.items():
        files[f"{name}.crt"] = tmp_path / f"{name}.crt"
        files[f"{name}.key"] = tmp_path / f"{name}.key"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


@dataclass
class ForeignServer:
    """A KServe ModelServer (tests/integration/foreign_server.py) in a subprocess: a
    third-party Open Inference Protocol endpoint, REST and gRPC on loopback."""

    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log: Path

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


class ForeignServers:
    """`foreign.start(onnx, name=..., **options)` starts a KServe server (options as in
    foreign_server.py's docstring: datatype, layout, output, ...) and waits, at most
    `startup_s`, until REST and gRPC both answer ready; all are stopped at session end."""

    SCRIPT = Path(__file__).with_name("foreign_server.py")

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._started: list[ForeignServer] = []

    def start(
        self, onnx: Path, *, name: str = "digits", startup_s: float = 60.0, **options: object
    ) -> ForeignServer:
        if importlib.util.find_spec("kserve") is None:  # looked up, never imported here
            if os.environ.get("CI"):  # CI installs [test]: a missing server is a failure there
                pytest.fail("kserve is not installed, but CI must test against it")
            pytest.skip("kserve is not installed (pip install -e '.[all,test]')")
        n = next(_COUNT)
        ready, log = self._folder / f"foreign-{n}.json", self._folder / f"foreign-{n}.log"
        config = self._folder / f"foreign-{n}.config.json"
        config.write_text(
            json.dumps({"onnx": str(onnx), "name": name, "ready_file": str(ready), **options})
        )
        with log.open("wb") as out:
            # Stopped by the kernel too, should pytest itself be killed (as `defcnn serve` is).
            cmd = _with_parent_death_signal([sys.executable, str(self.SCRIPT), str(config)])
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_s
        try:
            while not ready.exists():
                self._check(process, log, deadline)
                time.sleep(0.1)
            ports = json.loads(ready.read_text())
            server = ForeignServer(process, ports["http_port"], ports["grpc_port"], log)
            self._started.append(server)
            while not self._ready(server):
                self._check(process, log, deadline)
                time.sleep(0.1)
            return server
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=15)
            raise

    @staticmethod
    def _ready(server: ForeignServer) -> bool:
        try:
            if httpx.get(f"{server.rest_url}/v2/health/ready", timeout=2).status_code != 200:
                return False
            with grpc.insecure_channel(server.grpc_url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                return stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready
        except (httpx.HTTPError, grpc.RpcError):
            return False

    @staticmethod
    def _check(process: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
        code = process.poll()
        if code is not None or time.monotonic() > deadline:
            state = "not ready in time" if code is None else f"exited with {code}"
            pytest.fail(f"KServe server {state}; its log ends:\n{log_tail(log)}")

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


@pytest.fixture(scope="session")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForeignServers]:
    """Starts third-party (KServe) endpoints; see ForeignServers."""
    servers = ForeignServers(tmp_path_factory.mktemp("foreign"))
    try:
        yield servers
    finally:
        servers.stop_all()
