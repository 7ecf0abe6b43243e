"""The client's REST binding against a real third-party server (KServe, REST and gRPC from
one process), and against small `http.server` handlers for what KServe cannot show (bearer
tokens, TLS with client certificates): parity with ONNX Runtime, the same counting and
budgets as gRPC, and the error mapping."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defcnn.client import (
    AsyncInferenceClient,
    ClientError,
    InferenceClient,
    QueryBudgetExceeded,
    QueryCounter,
)
from defcnn.errors import ConfigError

pytestmark = pytest.mark.slow


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def kserve(foreign, repo) -> Any:
    """One KServe server for the module: the suite's tiny model as FP32 NCHW logits."""
    return foreign.start(repo.onnx_path)


@pytest.fixture(params=["rest", "grpc"])
def url(request, kserve) -> str:
    return kserve.rest_url if request.param == "rest" else kserve.grpc_url


def test_metadata_over_rest_and_grpc_without_a_config(url) -> None:
    """KServe has no ModelConfig (no route, no RPC): the client goes on without one."""
    with InferenceClient(url) as client:
        info = client.info("digits")
        assert (info.name, info.input_shape, info.num_classes) == ("digits", (3, 32, 32), 10)
        assert (info.input_name, info.output_name, info.labels) == ("input", "output", [])
        assert client.spec("digits").output_kind == "logits"


@pytest.mark.parametrize("n", [1, 7])
def test_logits_match_onnx_runtime(url, repo, n: int) -> None:
    x = images(n, seed=n)
    with InferenceClient(url, concurrency=3) as client:
        logits = client.logits("digits", x)
        assert logits.dtype == np.float32 and logits.shape == (n, 10)
        np.testing.assert_allclose(logits, repo.reference(x), atol=1e-5)
        assert client.predict("digits", x).tolist() == repo.reference(x).argmax(1).tolist()


def test_rest_counts_and_budgets_as_grpc_does(kserve) -> None:
    """The same calls give the same counters, and the budget stops the same call."""
    x = images(9, seed=3)
    seen: dict[str, tuple[QueryCounter, int]] = {}
    for url in (kserve.rest_url, kserve.grpc_url):
        with InferenceClient(url, budget=14) as client:
            client.logits("digits", x[:5])
            client.predict("digits", x[5:9])
            with pytest.raises(QueryBudgetExceeded):
                client.logits("digits", x)  # 9 more do not fit: nothing of it is sent
            seen[url] = (client.counter("digits"), client.total_queries)
    rest, grpc = seen[kserve.rest_url], seen[kserve.grpc_url]
    assert rest == grpc and rest[0].images == rest[1] <= 14


def test_unknown_model_is_not_found(url) -> None:
    with InferenceClient(url) as client, pytest.raises(ClientError) as exc:
        client.info("no-such-model")
    assert exc.value.code == "NOT_FOUND"


def test_json_data_answers_are_read_too(foreign, repo) -> None:
    """A KServe model that answers with JSON `data` lists, not binary."""
    server = foreign.start(repo.onnx_path, json_only=True)
    x = images(4, seed=11)
    try:
        with InferenceClient(server.rest_url) as client:
            np.testing.assert_allclose(client.logits("digits", x), repo.reference(x), atol=1e-5)
    finally:
        server.stop()


def test_a_stopped_server_is_unavailable_after_the_retries(foreign, repo) -> None:
    server = foreign.start(repo.onnx_path)
    with InferenceClient(server.rest_url, retries=2, backoff=0.01) as client:
        client.info("digits")
        before = client.counter("digits")
        server.stop()
        with pytest.raises(ClientError) as exc:
            client.logits("digits", images(1))
        assert exc.value.code == "UNAVAILABLE"
        after = client.counter("digits")  # every send counts, retries included
        assert (after.images - before.images, after.rpcs - before.rpcs) == (3, 3)


def test_async_client_refuses_rest_urls(kserve) -> None:
    with pytest.raises(ConfigError, match="gRPC only"):
        AsyncInferenceClient(kserve.rest_url)


class _Recorder(BaseHTTPRequestHandler):
    """A v2 endpoint of one model ("m", FP32 [-1, 3, 32, 32] -> [-1, 10], JSON answers) that
    records each request's headers and refuses a token other than the server's."""

    protocol_version = "HTTP/1.1"
    token: str | None = None
    unavailable = 0  # inference requests to answer 503 before answering
    seen: list[dict[str, str]]

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _allowed(self) -> bool:
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            self._answer(401, {"error": "bad token"})
            return False
        return True

    def do_GET(self) -> None:
        if not self._allowed():
            return
        if self.path == "/v2/models/m":
            x = {"name": "x", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
            y = {"name": "y", "datatype": "FP32", "shape": [-1, 10]}
            self._answer(200, {"name": "m", "versions": ["1"], "inputs": [x], "outputs": [y]})
        else:
            self._answer(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not self._allowed():
            return
        if self.unavailable > 0:
            type(self).unavailable -= 1
            self._answer(503, {"error": "model not ready"})
            return
        header = json.loads(body[: int(self.headers["Inference-Header-Content-Length"])])
        n = header["inputs"][0]["shape"][0]
        data = np.arange(n * 10, dtype=np.float32).tolist()  # logit j of image i: 10 i + j
        out = {"name": "y", "datatype": "FP32", "shape": [n, 10], "data": data}
        self._answer(200, {"model_name": "m", "outputs": [out]})


@pytest.fixture
def recorder() -> Iterator[tuple[ThreadingHTTPServer, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_bearer_token_goes_in_every_request(recorder) -> None:
    server, handler = recorder
    handler.token = "s3cret"
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with InferenceClient(url, token="s3cret") as client:
        # No config, but the metadata allows any batch: both images go in one request
        # (UNCONFIGURED_BATCH), and logit j of image i is 10 i + j.
        expected = np.arange(20, dtype=np.float32).reshape(2, 10)
        np.testing.assert_array_equal(client.logits("m", images(2)), expected)
    assert handler.seen and all(h["authorization"] == "Bearer s3cret" for h in handler.seen)
    with InferenceClient(url, token="wrong") as client, pytest.raises(ClientError) as exc:
        client.info("m")
    assert exc.value.code == "UNAUTHENTICATED" and "bad token" in exc.value.message


def test_http_503_is_retried_and_every_send_counted(recorder) -> None:
    server, handler = recorder
    with InferenceClient(f"http://127.0.0.1:{server.server_address[1]}", backoff=0.01) as client:
        client.info("m")
        before = client.counter("m")
        handler.unavailable = 2
        assert client.logits("m", images(1)).shape == (1, 10)
        after = client.counter("m")
        assert (after.images - before.images, after.rpcs - before.rpcs) == (3, 3)
        handler.unavailable = 9
        with pytest.raises(ClientError) as exc:
            client.logits("m", images(1))
        assert exc.value.code == "UNAVAILABLE" and "model not ready" in exc.value.message


def test_tls_with_a_client_certificate(recorder, certificates: dict[str, Path]) -> None:
    """https with --tls-ca verifying the server and --tls-cert/--tls-key for mutual TLS;
    http:// with TLS options is https, as a bare HOST:PORT is TLS for gRPC."""
    server, _ = recorder
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates["server.crt"], certificates["server.key"])
    context.load_verify_locations(certificates["ca.crt"])
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    ca, cert, key = (str(certificates[f]) for f in ("ca.crt", "client.crt", "client.key"))
    for url in (f"https://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        with InferenceClient(url, tls_ca=ca, tls_cert=cert, tls_key=key) as client:
            assert client.logits("m", images(1)).shape == (1, 10)
    with InferenceClient(f"https://127.0.0.1:{port}", retries=0) as client:
        with pytest.raises(ClientError) as exc:  # a test CA the system does not trust
            client.info("m")
        assert exc.value.code == "UNAVAILABLE" and "CERTIFICATE_VERIFY_FAILED" in str(exc.value)
