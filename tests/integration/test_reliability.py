"""Load and faults against the real server: a short soak, overload, cancelled and vanished
clients, SIGKILL and restart, broken model files, external data outside the repository,
path-like model names."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from defcnn.bench.soak import SoakChecks, SoakSettings, run_soak
from defcnn.client.loadtest import run_load
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server.launcher import local_server
from defcnn.server.scrape import queue_gauges

from .conftest import start_server
from .test_server import images, infer_request, logits_of


def _reference(repo, n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = images(n, seed)
    return x, repo.reference(x)


@pytest.mark.slow
def test_short_soak_64_clients_every_answer_right_memory_flat(repo, tmp_path: Path) -> None:
    settings = SoakSettings(model_repo=str(repo.root), model="digits", clients=64, seconds=6,
                            warmup_seconds=2, max_queue_size=256, out=str(tmp_path))  # fmt: skip
    result = run_soak(settings, progress=False)
    soak = result.soak
    assert result.checks == SoakChecks(no_errors=True, every_answer_correct=True,
                                       memory_flat=True, queue_bound_respected=True)  # fmt: skip
    assert result.passed
    assert soak.ok == soak.requests > 100  # everything answered, and right
    assert 1 <= result.queue.max_depth <= 256  # 64 clients really queued together
    assert len(result.timeline) >= 6 and all("rss_mb" in r for r in result.timeline)
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["passed"] and saved["soak"]["ok"] == soak.ok
    assert (tmp_path / "soak.json").exists() and (tmp_path / "soak.png").exists()


def test_overload_is_refused_at_the_queue_bound_never_answered_wrong(repo, tmp_path) -> None:
    x, logits = _reference(repo)
    extra = ["--max-queue-size", "4", "--max-queue-delay-us", "20000", "--max-batch-size", "4"]
    with local_server(repo.root, tmp_path / "log", metrics=True, extra=extra) as srv:
        load = run_load(srv.url, "digits", x, logits, clients=48, seconds=3)
        gauges = queue_gauges(srv.metrics_port or 0, "digits")
    assert load.wrong == 0 and load.ok > 0
    assert load.errors and set(load.errors) == {"RESOURCE_EXHAUSTED"}  # the bound bit
    assert 1 <= gauges["max_depth"] <= 4
    assert gauges["pending"] == 0  # nothing stuck in the queue afterwards


def test_cancelled_and_vanished_clients_leave_nothing_behind(repo, tmp_path: Path) -> None:
    extra = ["--max-queue-delay-us", "300000", "--max-batch-size", "16"]
    with local_server(repo.root, tmp_path / "log", metrics=True, extra=extra) as srv:

        async def cancel_half() -> list[object]:
            async with grpc.aio.insecure_channel(srv.url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                calls = [stub.ModelInfer(infer_request(images(1, seed=i))) for i in range(12)]
                await asyncio.sleep(0.1)  # queued, waiting for the 300 ms batch window
                for call in calls[::2]:
                    call.cancel()
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(cancel_half())
        for i, r in enumerate(results):
            if i % 2:
                assert isinstance(r, pb.ModelInferResponse)
                assert np.allclose(logits_of(r), repo.reference(images(1, seed=i)), atol=1e-4)
            else:
                assert isinstance(r, asyncio.CancelledError)
        # a client process that fires requests and dies without closing its channel
        script = textwrap.dedent(f"""
            import os, grpc, numpy as np
            from defcnn.protos import grpc_service_pb2 as pb, grpc_service_pb2_grpc as g
            stub = g.GRPCInferenceServiceStub(grpc.insecure_channel("{srv.url}"))
            req = pb.ModelInferRequest(model_name="digits")
            req.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
            req.raw_input_contents.append(np.zeros((1, 3, 32, 32), "<f4").tobytes())
            futures = [stub.ModelInfer.future(req) for _ in range(20)]
            import time; time.sleep(0.1)
            os._exit(0)
        """)
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        time.sleep(0.6)  # the batch window closes; dead callers' requests are dropped
        assert queue_gauges(srv.metrics_port or 0, "digits")["pending"] == 0
        x = images(3, seed=99)
        response = srv_stub(srv.url).ModelInfer(infer_request(x), timeout=10)
        assert np.allclose(logits_of(response), repo.reference(x), atol=1e-4)


def srv_stub(url: str) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))


def test_sigkill_then_restart_on_the_same_port_serves_again(repo) -> None:
    first = start_server(repo.root)
    port = first.address.rsplit(":", 1)[1]
    x = images(2)
    assert first.stub().ModelInfer(infer_request(x), timeout=10).outputs
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(timeout=30) == -signal.SIGKILL
    second = start_server(repo.root, "--port", port)  # the later --port wins
    try:
        assert second.address.endswith(f":{port}")
        assert second.stub().ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        response = second.stub().ModelInfer(infer_request(x), timeout=10)
        assert np.allclose(logits_of(response), repo.reference(x), atol=1e-4)
    finally:
        assert second.stop() == 0


def _copy_model(src: Path, dst_repo: Path, name: str) -> Path:
    """A copy of the `digits` model under another name; returns its model.onnx."""
    shutil.copytree(src / "digits", dst_repo / name)
    return dst_repo / name / "1" / "model.onnx"


def test_corrupt_truncated_and_escaping_models_are_not_ready_others_serve(
    repo, tmp_path: Path
) -> None:
    root = tmp_path / "repo"
    _copy_model(repo.root, root, "good")
    truncated = _copy_model(repo.root, root, "truncated")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage = _copy_model(repo.root, root, "garbage")
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = _copy_model(repo.root, root, "empty")
    empty.write_bytes(b"")
    # external data: one model keeps it beside itself (fine), one points outside its folder
    for name in ("external", "escaping"):
        path = _copy_model(repo.root, root, name)
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin",
                        size_threshold=0)  # fmt: skip
    escaping = root / "escaping" / "1"
    secret = tmp_path / "secret.bin"
    shutil.move(escaping / "weights.bin", secret)
    model = onnx.load(str(escaping / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../secret.bin"
    onnx.save_model(model, str(escaping / "model.onnx"))

    srv = start_server(root)
    try:
        stub = srv.stub()
        index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index["good"].state == "READY" and index["external"].state == "READY"
        for name in ("truncated", "garbage", "empty", "escaping"):
            assert index[name].state == "UNAVAILABLE" and index[name].reason, name
            assert not stub.ModelReady(pb.ModelReadyRequest(name=name)).ready
            with pytest.raises(grpc.RpcError) as exc:
                stub.ModelInfer(infer_request(images(1), model=name), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "outside" in index["escaping"].reason
        x = images(4)
        for name in ("good", "external"):
            response = stub.ModelInfer(infer_request(x, model=name), timeout=10)
            assert np.allclose(logits_of(response), repo.reference(x), atol=1e-4)
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize(
    "name", ["../digits", "digits/../digits", "/etc/passwd", "..", ".", "digits/1",
             "digits\\..\\digits", "digits\x00", "", "%2e%2e/digits", "~/digits"],
)  # fmt: skip
def test_path_like_model_names_are_never_found(server, name: str) -> None:
    stub = server.stub()
    calls = [
        lambda: stub.ModelInfer(infer_request(images(1), model=name), timeout=10),
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10),
        lambda: stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10),
        lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name=name or "x"), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready
