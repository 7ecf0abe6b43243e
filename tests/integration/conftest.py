"""A real model repository and real `defcnn serve` processes on free loopback ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from defcnn.export.exporter import ExportSettings, export
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.training import TrainConfig, train

READY = re.compile(r"ready on ([\d.]+):(\d+) .*?(?:metrics on :(\d+))?\)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str
    metrics_port: int | None

    def stub(self, channel: grpc.Channel | None = None) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(channel or grpc.insecure_channel(self.address))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def start_server(repo: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `defcnn serve` on port 0 and wait for its ready line."""
    cmd = [sys.executable, "-m", "defcnn.cli", "serve", "--model-repo", str(repo),
           "--port", "0", "--metrics-port", "0", "--log-level", "WARNING", *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = READY.search(line)
        if match:
            metrics = int(match.group(3)) if match.group(3) else None
            return ServerProcess(proc, f"{match.group(1)}:{match.group(2)}", metrics)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")


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


@pytest.fixture(scope="module")
def server(repo: Repo) -> Iterator[ServerProcess]:
    srv = start_server(repo.root, "--max-queue-delay-us", "5000")
    yield srv
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
