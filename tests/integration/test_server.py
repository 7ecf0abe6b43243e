"""The real server on a loopback port: parity, batching, validation, health, auth, TLS, shutdown."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server.scrape import queue_gauges

SERVICE = "inference.GRPCInferenceService"


def infer_request(
    x: np.ndarray, model: str = "digits", *, typed: bool = False, request_id: str = ""
) -> pb.ModelInferRequest:
    """A ModelInfer request for float32 images, raw (default) or as typed contents."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if typed:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def logits_of(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(shape)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("typed", [False, True])
def test_infer_matches_local_onnx_runtime(server, repo, batch: int, typed: bool) -> None:
    x = images(batch, seed=batch)
    response = server.stub().ModelInfer(infer_request(x, typed=typed, request_id=f"r{batch}"))
    assert response.id == f"r{batch}" and response.model_name == "digits"
    assert response.outputs[0].datatype == "FP32"
    np.testing.assert_allclose(logits_of(response), repo.reference(x), atol=1e-5)


def test_concurrent_clients_each_get_their_own_rows(server, repo) -> None:
    async def run() -> list[tuple[np.ndarray, pb.ModelInferResponse]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            inputs = [images(1 + i % 4, seed=100 + i) for i in range(48)]
            calls = [
                stub.ModelInfer(infer_request(x, request_id=str(i))) for i, x in enumerate(inputs)
            ]
            return list(zip(inputs, await asyncio.gather(*calls), strict=True))

    before = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
    results = asyncio.run(run())
    for i, (x, response) in enumerate(results):
        assert response.id == str(i)
        np.testing.assert_allclose(logits_of(response), repo.reference(x), atol=1e-5)
    after = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
    rows = sum(len(x) for x, _ in results)
    b, a = before.model_stats[0], after.model_stats[0]
    assert a.inference_count - b.inference_count == rows
    assert a.inference_stats.success.count - b.inference_stats.success.count == 48
    assert a.execution_count - b.execution_count < 48  # requests were batched together


def test_requested_outputs_and_classification(server, repo) -> None:
    x = images(2, seed=7)
    request = infer_request(x)
    request.outputs.add(name="logits").parameters["classification"].int64_param = 3
    response = server.stub().ModelInfer(request)
    assert [o.datatype for o in response.outputs] == ["BYTES"]
    assert list(response.outputs[0].shape) == [2, 3]
    raw, items = response.raw_output_contents[0], []
    while raw:
        (length,) = struct.unpack("<I", raw[:4])
        items.append(raw[4 : 4 + length].decode())
        raw = raw[4 + length :]
    reference = repo.reference(x)
    for row in range(2):
        top = np.argsort(-reference[row])[:3]
        for k, item in enumerate(items[row * 3 : row * 3 + 3]):
            value, index, label = item.split(":")
            assert int(index) == top[k] and label == str(top[k])
            assert float(value) == pytest.approx(reference[row, top[k]], abs=1e-4)


def _bad(kind: str) -> pb.ModelInferRequest:
    x = images(1)
    request = infer_request(x)
    if kind == "datatype":
        request.inputs[0].datatype = "FP64"
    elif kind == "shape":
        request.inputs[0].shape[:] = [1, 3, 31, 32]
    elif kind == "rank":
        request.inputs[0].shape[:] = [3, 32, 32]
    elif kind == "bytes":
        request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    elif kind == "missing":
        del request.inputs[:]
        del request.raw_input_contents[:]
    elif kind == "extra":
        request.inputs.add(name="other", datatype="FP32", shape=[1])
        request.raw_input_contents.append(b"\0\0\0\0")
    elif kind == "both":
        request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    elif kind == "typed-count":
        request = infer_request(x, typed=True)
        del request.inputs[0].contents.fp32_contents[-1]
    elif kind == "nan":
        x[0, 0, 0, 0] = np.nan
        request = infer_request(x)
    elif kind == "inf":
        x[0, 1, 2, 3] = np.inf
        request = infer_request(x, typed=True)
    elif kind == "zero-batch":
        request = infer_request(np.zeros((0, 3, 32, 32), np.float32))
    elif kind == "output":
        request.outputs.add(name="probabilities")
    elif kind == "unknown-model":
        request.model_name = "nope"
    elif kind == "path-model":
        request.model_name = "../digits"
    elif kind == "unknown-version":
        request.model_version = "7"
    elif kind == "bad-version":
        request.model_version = "../1"
    elif kind == "too-big":
        request = infer_request(images(17))
    elif kind == "not-ready":
        request.model_name = "broken"
    return request


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("datatype", grpc.StatusCode.INVALID_ARGUMENT),
        ("shape", grpc.StatusCode.INVALID_ARGUMENT),
        ("rank", grpc.StatusCode.INVALID_ARGUMENT),
        ("bytes", grpc.StatusCode.INVALID_ARGUMENT),
        ("missing", grpc.StatusCode.INVALID_ARGUMENT),
        ("extra", grpc.StatusCode.INVALID_ARGUMENT),
        ("both", grpc.StatusCode.INVALID_ARGUMENT),
        ("typed-count", grpc.StatusCode.INVALID_ARGUMENT),
        ("nan", grpc.StatusCode.INVALID_ARGUMENT),
        ("inf", grpc.StatusCode.INVALID_ARGUMENT),
        ("zero-batch", grpc.StatusCode.INVALID_ARGUMENT),
        ("output", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown-model", grpc.StatusCode.NOT_FOUND),
        ("path-model", grpc.StatusCode.NOT_FOUND),
        ("unknown-version", grpc.StatusCode.NOT_FOUND),
        ("bad-version", grpc.StatusCode.NOT_FOUND),
        ("too-big", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("not-ready", grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_malformed_requests_get_the_right_status(server, kind: str, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        server.stub().ModelInfer(_bad(kind), timeout=10)
    assert exc.value.code() == code, exc.value.details()
    assert exc.value.details()  # a message that says what was wrong
    assert server.stub().ServerLive(pb.ServerLiveRequest()).live  # and the server lives on


def test_metadata_config_index_and_broken_models(server) -> None:
    stub = server.stub()
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert list(meta.inputs[0].shape) == [-1, 3, 32, 32] and list(meta.outputs[0].shape) == [-1, 10]
    assert stub.ModelConfig(pb.ModelConfigRequest(name="digits")).config.max_batch_size == 16
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready
    index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index["digits"].state == "READY"
    assert index["broken"].state == "UNAVAILABLE" and index["broken"].reason
    assert "classification" in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
    with pytest.raises(grpc.RpcError) as exc:
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_stream_infer_answers_each_request_and_survives_errors(server, repo) -> None:
    x = images(2, seed=3)
    requests = [infer_request(x, request_id="a"), _bad("nan"), infer_request(x, request_id="c")]
    responses = list(server.stub().ModelStreamInfer(iter(requests)))
    assert [r.error_message == "" for r in responses] == [True, False, True]
    assert "NaN" in responses[1].error_message
    np.testing.assert_allclose(logits_of(responses[2].infer_response), repo.reference(x), atol=1e-5)


def test_health_reflection_and_metrics(server) -> None:
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(
        iter(
            reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
    )
    names = {s.name for s in answer.list_services_response.service}
    assert SERVICE in names and "grpc.health.v1.Health" in names
    server.stub().ModelInfer(infer_request(images(3)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    counts = [line for line in text.splitlines() if line.startswith("nv_inference_count{")]
    assert any('model="digits"' in line and int(line.split()[-1]) >= 3 for line in counts)
    assert (
        "nv_inference_request_failure" in text and "defcnn_request_latency_seconds_bucket" in text
    )


def test_tritonclient_works_unchanged(server, repo, tmp_path: Path) -> None:
    """tritonclient's generated protos collide with ours in one process: use a subprocess."""
    x = images(4, seed=11)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import json, numpy as np, tritonclient.grpc as tc
        c = tc.InferenceServerClient("{server.address}")
        x = np.load("{tmp_path / "x.npy"}")
        inp = tc.InferInput("input", list(x.shape), "FP32"); inp.set_data_from_numpy(x)
        r = c.infer("digits", [inp], outputs=[tc.InferRequestedOutput("logits")], request_id="t1")
        top = c.infer("digits", [inp], outputs=[tc.InferRequestedOutput("logits", class_count=1)])
        stats = c.get_inference_statistics("digits", as_json=True)
        print(json.dumps({{"live": c.is_server_live(), "ready": c.is_model_ready("digits"),
            "id": r.get_response().id, "logits": r.as_numpy("logits").tolist(),
            "top": [t.decode() for t in top.as_numpy("logits").ravel()],
            "versions": list(c.get_model_metadata("digits").versions), "stats": stats}}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["live"] and out["ready"] and out["id"] == "t1" and out["versions"] == ["1"]
    reference = repo.reference(x)
    np.testing.assert_allclose(np.array(out["logits"]), reference, atol=1e-5)
    assert [int(t.split(":")[1]) for t in out["top"]] == reference.argmax(1).tolist()
    assert int(out["stats"]["model_stats"][0]["inference_count"]) >= 8


def test_deadline_expired_while_queued_is_not_computed(repo, launch) -> None:
    srv = launch.start(repo.root, "--max-queue-delay-us", "1500000", "--max-batch-size", "16")
    try:
        stub = srv.stub()
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(infer_request(images(1)), timeout=0.3)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.5)  # the batch window closes; the expired request must be dropped
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits")).model_stats[0]
        assert stats.inference_count == 0 and stats.execution_count == 0
    finally:
        assert srv.stop() == 0


def test_full_queue_answers_resource_exhausted(repo, launch) -> None:
    srv = launch.start(repo.root, "--max-queue-delay-us", "500000", "--max-queue-size", "2")

    async def run() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(infer_request(images(1, seed=i))) for i in range(6)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            return [
                r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK
                for r in results
            ]

    try:
        codes = asyncio.run(run())
        assert codes.count(grpc.StatusCode.OK) >= 2
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        assert srv.stop() == 0


def test_oversized_message_is_refused_but_a_full_batch_fits(repo, launch) -> None:
    srv = launch.start(repo.root, "--max-message-mb", "1")
    try:
        request = infer_request(images(1))
        request.raw_input_contents[0] = b"\0" * (2 * 1024 * 1024)
        with pytest.raises(grpc.RpcError) as exc:
            srv.stub().ModelInfer(request, timeout=10)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(srv.stub().ModelInfer(infer_request(images(16))).outputs) == 1
    finally:
        assert srv.stop() == 0


def test_bearer_token_auth(repo, launch, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    srv = launch.start(repo.root, "--auth-token-file", str(token))
    try:
        stub = srv.stub()
        request = infer_request(images(1))
        for metadata in (
            None,
            [("authorization", "Bearer wrong")],
            [("authorization", "s3cret-token")],
            [("authorization", "Bearer ")],
            [("x-token", "Bearer s3cret-token")],
            [("authorization", "Bearer s3cret-token-and-more")],
            [("authorization", "Bearer s3cret-token"), ("authorization", "Bearer wrong")],
        ):
            with pytest.raises(grpc.RpcError) as exc:
                stub.ModelInfer(request, metadata=metadata, timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as exc:
                stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata, timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = [("authorization", "Bearer s3cret-token")]
        stats = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name="digits"), metadata=good, timeout=10
        ).model_stats[0]
        assert stats.inference_count == 0  # nothing was served to the refused callers
        assert stub.ModelInfer(request, metadata=good, timeout=10).outputs
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.address))
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    finally:
        assert srv.stop() == 0


def test_tls_and_mutual_tls(repo, launch, certificates: dict[str, Path]) -> None:
    f = certificates
    srv = launch.start(
        repo.root, "--tls-cert", str(f["server.crt"]), "--tls-key", str(f["server.key"]),
        "--tls-ca", str(f["ca.crt"]),
    )  # fmt: skip
    try:
        ca = f["ca.crt"].read_bytes()
        client = grpc.ssl_channel_credentials(
            ca, f["client.key"].read_bytes(), f["client.crt"].read_bytes()
        )
        stub = srv.stub(grpc.secure_channel(srv.address, client))
        assert stub.ModelInfer(infer_request(images(2)), timeout=10).outputs
        no_client_cert = srv.stub(
            grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(ca))
        )
        plaintext = srv.stub(grpc.insecure_channel(srv.address))
        for refused in (no_client_cert, plaintext):
            with pytest.raises(grpc.RpcError) as exc:
                refused.ServerLive(pb.ServerLiveRequest(), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert srv.stop() == 0


SERVING = health_pb2.HealthCheckResponse.SERVING


def test_sigterm_under_load_answers_every_accepted_request(repo, launch) -> None:
    # A 60 s batch window against a 20 s grace: accepted requests are answered only if the
    # drain runs them at once instead of waiting out the window.
    srv = launch.start(repo.root, "--max-queue-delay-us", "60000000", "--grace-seconds", "20")

    async def run() -> tuple[list[object], list[object]]:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            accepted = [
                asyncio.ensure_future(stub.ModelInfer(infer_request(images(2, seed=i)), timeout=60))
                for i in range(6)  # 12 rows: below the batch of 16, so they wait in the queue
            ]
            deadline = time.monotonic() + 30
            # the server's own gauge says it holds them all, queued
            while queue_gauges(srv.metrics_port or 0, "digits")["pending"] < len(accepted):
                assert time.monotonic() < deadline and not any(f.done() for f in accepted)
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            check = health_pb2.HealthCheckRequest()
            while (await health.Check(check, timeout=10)).status == SERVING:
                await asyncio.sleep(0.01)
            late = [stub.ModelInfer(infer_request(images(1)), timeout=10) for _ in range(4)]
            late_results = await asyncio.gather(*late, return_exceptions=True)
            return await asyncio.gather(*accepted, return_exceptions=True), late_results

    accepted, late = asyncio.run(run())
    assert all(isinstance(r, pb.ModelInferResponse) for r in accepted), accepted
    for seed, r in enumerate(accepted):  # each caller got its own rows
        assert isinstance(r, pb.ModelInferResponse)
        np.testing.assert_allclose(logits_of(r), repo.reference(images(2, seed=seed)), atol=1e-5)
    for r in late:  # arrived while draining: refused, never cancelled, lost or hung
        assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE, r
    assert srv.proc.wait(timeout=30) == 0


def test_sigterm_ends_idle_streams_with_unavailable_not_at_grace(repo, launch) -> None:
    # A 60 s grace: the server exits well before it only if it ends the idle stream itself.
    srv = launch.start(repo.root, "--grace-seconds", "60")

    async def run() -> tuple[pb.ModelStreamInferResponse, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await call.write(infer_request(images(2), request_id="before"))
            answered = await call.read()  # the stream is open and idle from here on
            srv.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.details() == "the server is shutting down"
            return answered, ended.value.code()

    answered, code = asyncio.run(run())
    assert answered.infer_response.id == "before" and not answered.error_message
    assert code == grpc.StatusCode.UNAVAILABLE
    assert srv.proc.wait(timeout=30) == 0


def test_server_package_never_imports_torch() -> None:
    code = (
        "import sys, defcnn.server.app, defcnn.server.codec, defcnn.server.servicer; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--max-batch-size", "200", "--max-message-mb", "1"], "max-message-mb"),
        (["--backend", "tensorrt"], "tensorrt"),
    ],
)
def test_models_that_cannot_run_are_reported_not_ready(repo, launch, flags, reason) -> None:
    if reason == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    srv = launch.start(repo.root, *flags)
    try:
        index = srv.stub().RepositoryIndex(pb.RepositoryIndexRequest())
        digits = next(m for m in index.models if m.name == "digits")
        assert digits.state == "UNAVAILABLE" and reason in digits.reason
        with pytest.raises(grpc.RpcError) as exc:
            srv.stub().ModelInfer(infer_request(images(1)), timeout=10)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert srv.stop() == 0
