"""Hostile input: property-based fuzzing of ModelInfer with random and mutated messages.

The server must never crash and must answer only with the status codes documented for bad
input (docs/reliability.md); bytes that are not a ModelInferRequest at all get
INVALID_ARGUMENT saying so.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defcnn.protos import grpc_service_pb2 as pb

from .test_server import images, infer_request, logits_of

pytestmark = pytest.mark.slow

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
DATATYPES = ["FP32", "FP16", "FP64", "INT8", "UINT8", "INT64", "BYTES", "BOOL", "", "fp32", "X"]
dims = st.lists(st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**62, -(2**62)])),
                max_size=5)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Structurally valid protobuf, semantically anything: names, types, shapes, contents."""
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["digits", "broken", "", "nope", "../digits"])),
        model_version=draw(st.sampled_from(["", "1", "2", "-1", "x", "99999999999999999999"])),
        id=draw(st.text(max_size=8)),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["input", "INPUT", "", "x"])),
            datatype=draw(st.sampled_from(DATATYPES)), shape=draw(dims),
        )  # fmt: skip
        if raw:
            size = draw(st.sampled_from([0, 1, 4, 3 * 32 * 32 * 4, 2 * 3 * 32 * 32 * 4, 1000]))
            request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
        else:
            floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
            tensor.contents.fp32_contents.extend(draw(st.lists(floats, max_size=64)))
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-5, 5), max_size=4)))
    if draw(st.booleans()):
        request.raw_input_contents.append(draw(st.binary(max_size=64)))  # a stray buffer
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["logits", "output", "", "x"])))
        if draw(st.booleans()):
            out.parameters["classification"].int64_param = draw(st.integers(-2, 20))
    if draw(st.booleans()):
        request.parameters["binary_data_output"].bool_param = True
    return request


def _call(server, payload: bytes) -> tuple[grpc.StatusCode, str]:
    method = server.channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None, response_deserializer=None,
    )  # fmt: skip
    try:
        method(payload, timeout=20)
    except grpc.RpcError as exc:
        assert exc.details(), "an error without a message"
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _parses(payload: bytes) -> bool:
    try:
        pb.ModelInferRequest.FromString(payload)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def target(server):
    server.channel = grpc.insecure_channel(server.address)
    yield server
    server.channel.close()


def _still_serving(server, repo) -> None:
    x = images(2, seed=5)
    response = server.stub().ModelInfer(infer_request(x), timeout=20)
    assert np.allclose(logits_of(response), repo.reference(x), atol=1e-4)


@FUZZ
@given(request=requests())
def test_random_requests_get_documented_codes(target, repo, request) -> None:
    code, details = _call(target, request.SerializeToString())
    assert code in DOCUMENTED, (code, details)


@FUZZ
@given(data=st.data())
def test_mutated_wire_bytes_never_crash_the_server(target, repo, data) -> None:
    valid = infer_request(images(1)).SerializeToString()
    payload = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "random"]))
        if kind == "flip" and payload:
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            payload = payload[: data.draw(st.integers(0, len(payload)))]
        elif kind == "insert":
            i = data.draw(st.integers(0, len(payload)))
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            payload = bytearray(data.draw(st.binary(max_size=256)))
    code, details = _call(target, bytes(payload))
    assert code in DOCUMENTED, (code, details)
    if not _parses(bytes(payload)):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("malformed request: not a valid inference.ModelInferRequest")


# What a Triton server offers and ours does not (model control, shared memory, trace, log).
UNSUPPORTED = {
    "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
}  # fmt: skip


def test_malformed_bytes_on_every_method_and_in_a_stream(target) -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    garbage = b"\xff\xff\xff\xff"
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        if method.server_streaming:
            call = target.channel.stream_stream(path, request_serializer=None,
                                                response_deserializer=None)  # fmt: skip
            good = infer_request(images(1)).SerializeToString()
            answers = [pb.ModelStreamInferResponse.FromString(b)
                       for b in call(iter([garbage, good]), timeout=20)]  # fmt: skip
            assert answers[0].error_message.startswith("malformed request")
            assert not answers[1].error_message and answers[1].infer_response.outputs
            continue
        call = target.channel.unary_unary(path, request_serializer=None,
                                          response_deserializer=None)  # fmt: skip
        with pytest.raises(grpc.RpcError) as exc:
            call(garbage, timeout=20)
        if method.name in UNSUPPORTED:  # refused before its body is read
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED, method.name
            assert exc.value.details() == f"{method.name} is not supported by this server"
            continue
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
        assert "malformed request" in exc.value.details()


def test_the_server_survives_the_fuzzing(target, repo) -> None:
    _still_serving(target, repo)
    live = target.stub().ServerLive(pb.ServerLiveRequest(), timeout=10)
    assert live.live
