"""The REST binding's conversions on their own (no sockets): HTTP status -> gRPC status, the
binary and JSON tensor bodies both ways, malformed answers, and the URL forms."""

from __future__ import annotations

import json
import struct
from typing import Any

import grpc
import numpy as np
import pytest

from defcnn.client import AsyncInferenceClient, ClientError, InferenceClient
from defcnn.client import rest as r
from defcnn.client.client import _settings
from defcnn.errors import ConfigError
from defcnn.protos import grpc_service_pb2 as pb


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"), (429, "RESOURCE_EXHAUSTED"), (501, "UNIMPLEMENTED"),
        (502, "UNAVAILABLE"), (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED"),
        (500, "INTERNAL"), (507, "INTERNAL"), (418, "UNKNOWN"),
    ],
)  # fmt: skip
def test_http_status_maps_to_the_grpc_status(status: int, code: str) -> None:
    error = r.error_for(status, b'{"error": "model is sad"}')
    assert isinstance(error, grpc.RpcError)
    assert error.code().name == code and error.details() == f"HTTP {status}: model is sad"


@pytest.mark.parametrize(
    ("body", "message"),
    [(b'{"detail": "Not Found"}', "Not Found"), (b"<html>oops</html>", "<html>oops</html>"),
     (b"", "no message")],
)  # fmt: skip
def test_error_messages_from_any_body(body: bytes, message: str) -> None:
    assert r.error_for(404, body).details() == f"HTTP 404: {message}"


def _request(n: int = 2, k: int = 0) -> tuple[pb.ModelInferRequest, np.ndarray]:
    x = np.random.default_rng(0).random((n, 3, 4, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="m", id="req-1")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    output = request.outputs.add(name="logits")
    if k:
        output.parameters["classification"].int64_param = k
    return request, x


def test_inputs_go_as_binary_after_the_json_header() -> None:
    request, x = _request(k=3)
    body, length = r.encode_infer(request)
    assert length is not None
    header = json.loads(body[:length])
    assert header == {
        "id": "req-1",
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 4, 4],
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"classification": 3, "binary_data": True}}],
    }  # fmt: skip
    np.testing.assert_array_equal(np.frombuffer(body[length:], "<f4").reshape(x.shape), x)


def test_typed_contents_go_as_json_data() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="input", datatype="INT64", shape=[3])
    tensor.contents.int64_contents.extend([1, -2, 3])
    body, length = r.encode_infer(request)
    assert length is None
    assert json.loads(body)["inputs"][0]["data"] == [1, -2, 3]


def _binary_answer(outputs: list[tuple[dict[str, Any], bytes | None]]) -> tuple[bytes, int]:
    entries, raw = [], b""
    for out, data in outputs:
        if data is not None:
            out = {**out, "parameters": {"binary_data_size": len(data)}}
            raw += data
        entries.append(out)
    header = {"model_name": "m", "model_version": None, "id": "req-1", "outputs": entries}
    head = json.dumps(header).encode()
    return head + raw, len(head)


def test_binary_and_json_outputs_read_into_raw_contents() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    labels = ["0.5:2:cat", "0.25:0:dog"]
    body, length = _binary_answer([
        ({"name": "logits", "datatype": "FP32", "shape": [2, 3]}, logits.tobytes()),
        ({"name": "top", "datatype": "BYTES", "shape": [2, 1], "data": labels}, None),
        ({"name": "nested", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
         None),
    ])  # fmt: skip
    response = r.decode_infer(body, length)
    assert (response.model_name, response.model_version, response.id) == ("m", "", "req-1")
    assert [o.name for o in response.outputs] == ["logits", "top", "nested"]
    assert list(response.outputs[0].shape) == [2, 3] and not response.outputs[0].parameters
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 3)
    np.testing.assert_array_equal(got, logits)
    top = response.raw_output_contents[1]
    assert top == b"".join(struct.pack("<I", len(s)) + s.encode() for s in labels)
    assert np.frombuffer(response.raw_output_contents[2], "<i8").tolist() == [1, 2, 3, 4]


def test_a_json_only_answer_needs_no_length_header() -> None:
    doc = {"model_name": "m", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.5, -1.0]}]}  # fmt: skip
    response = r.decode_infer(json.dumps(doc).encode(), None)
    assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [0.5, -1.0]


@pytest.mark.parametrize(
    "case",
    ["short binary", "wrong count", "length past the end", "no shape", "unknown datatype"],
)
def test_malformed_answers_raise_value_or_key_errors(case: str) -> None:
    logits = np.zeros(4, np.float32).tobytes()
    out = {"name": "y", "datatype": "FP32", "shape": [1, 4]}
    body, binary_length = _binary_answer([(out, logits)])
    length: int | None = binary_length
    if case == "short binary":
        body = body[:-1]
    elif case == "wrong count":
        body, length = json.dumps({"outputs": [{**out, "data": [1.0]}]}).encode(), None
    elif case == "length past the end":
        length = len(body) + 1
    elif case == "no shape":
        body, length = json.dumps({"outputs": [{"name": "y", "datatype": "FP32"}]}).encode(), None
    else:
        bad = {**out, "datatype": "BF16", "data": [1, 2, 3, 4]}
        body, length = json.dumps({"outputs": [bad]}).encode(), None
    with pytest.raises((ValueError, KeyError)):
        r.decode_infer(body, length)


def _kw(**overrides: Any) -> dict[str, Any]:
    kw = dict(token=None, tls=False, tls_ca=None, tls_cert=None, tls_key=None, timeout=30.0,
              retries=3, backoff=0.1, concurrency=4, max_message_mb=64)  # fmt: skip
    return {**kw, **overrides}


@pytest.mark.parametrize(
    ("url", "rest_url"),
    [
        ("http://host:8000", "http://host:8000"), ("https://host", "https://host"),
        ("http://host:8000/", "http://host:8000"),
        ("https://gw.example/serving/ns/", "https://gw.example/serving/ns"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("host:8001", None), ("grpc://host:8001", None), ("grpcs://host:443", None),
    ],
)  # fmt: skip
def test_url_schemes_pick_the_transport(url: str, rest_url: str | None) -> None:
    assert _settings(url, **_kw()).rest_url == rest_url


def test_tls_options_turn_http_into_https(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until the transport opens")
    assert _settings("http://h:8000", **_kw(tls=True)).rest_url == "https://h:8000"
    settings = _settings("http://h:8000", **_kw(tls_ca=str(ca)))
    assert settings.rest_url == "https://h:8000" and settings.credentials is None
    assert settings.tls_files == (str(ca), None, None)


@pytest.mark.parametrize(
    "url",
    ["http://", "http://host:port", "http://host:99999", "http://u:p@host:8000",
     "http://host:8000/?q=1", "http://host:8000/#frag", "ftp://host:21", "host"],
)  # fmt: skip
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="url must be"):
        _settings(url, **_kw())


def test_unreadable_tls_files_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read TLS CA"):
        InferenceClient("https://127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        InferenceClient("https://127.0.0.1:1", tls_ca=str(bad))


def test_the_async_client_is_grpc_only() -> None:
    with pytest.raises(ConfigError, match="gRPC only"):
        AsyncInferenceClient("http://127.0.0.1:8000")


def test_a_closed_port_is_unavailable_and_retried() -> None:
    """Nothing listens on port 1: each of the 1 + retries sends fails to connect."""
    client = InferenceClient("http://127.0.0.1:1", retries=2, backoff=0.0, timeout=2)
    with client, pytest.raises(ClientError) as exc:
        client.info("m")
    assert exc.value.code == "UNAVAILABLE" and "ConnectError" in exc.value.message
