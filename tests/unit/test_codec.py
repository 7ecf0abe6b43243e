"""The ModelInfer codec on its own: every check it makes, the error class and status code
each one gives, and a round trip of good requests (raw and typed contents)."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import model_config_pb2
from defcnn.server import codec
from defcnn.server.batching import DynamicBatcher
from defcnn.server.errors import InvalidArgument, ResourceExhausted, ServerError, status_of
from defcnn.server.repository import ModelVersion

DIMS = (3, 2, 2)
CLASSES = 5
MAX_BATCH = 4
LABELS = ["zero", "one", "two", "three"]  # one short: class 4 has no label


class _Backend:
    name = "fake"
    device = "cpu"

    def run(self, images: np.ndarray) -> np.ndarray:
        return np.zeros((len(images), CLASSES), np.float32)


def _version() -> ModelVersion:
    config = model_config_pb2.ModelConfig(name="tiny", platform="onnxruntime_onnx")
    config.input.add(name="input", dims=list(DIMS))
    config.output.add(name="logits", dims=[CLASSES])
    backend = _Backend()
    batcher = DynamicBatcher(  # never started: the codec only reads the version's description
        backend.run, max_batch_size=MAX_BATCH, max_delay_s=0.0, max_queue=1,
        executor=ThreadPoolExecutor(max_workers=1),
    )  # fmt: skip
    return ModelVersion("tiny", 3, config, LABELS, DIMS, CLASSES, MAX_BATCH, backend, batcher)


MV = _version()


def _images(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).random((n, *DIMS), dtype=np.float32)


def _request(x: np.ndarray | None = None, *, typed: bool = False) -> pb.ModelInferRequest:
    x = _images() if x is None else x
    request = pb.ModelInferRequest(model_name="tiny", id="req-7")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if typed:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def _raw(edit: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
    request = _request()
    edit(request)
    return request


def _typed(edit: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
    request = _request(typed=True)
    edit(request)
    return request


def _set_shape(shape: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def edit(r: pb.ModelInferRequest) -> None:
        r.inputs[0].shape[:] = shape

    return edit


def _poison(value: float, *, typed: bool) -> pb.ModelInferRequest:
    x = _images()
    x[1, 2, 1, 0] = value
    return _request(x, typed=typed)


def _drop_inputs(r: pb.ModelInferRequest) -> None:
    del r.inputs[:]
    del r.raw_input_contents[:]


def _second_input(name: str) -> Callable[[pb.ModelInferRequest], None]:
    def edit(r: pb.ModelInferRequest) -> None:
        r.inputs.add(name=name, datatype="FP32", shape=list(r.inputs[0].shape))
        r.raw_input_contents.append(r.raw_input_contents[0])

    return edit


# (case, request, error class, words the message must hold)
BAD_INPUTS = [
    ("missing input", _raw(_drop_inputs), InvalidArgument, "the request has 0"),
    ("unknown input name", _raw(lambda r: setattr(r.inputs[0], "name", "x")), InvalidArgument,
     "got 'x'"),
    ("duplicate input", _raw(_second_input("input")), InvalidArgument, "the request has 2"),
    ("extra input", _raw(_second_input("other")), InvalidArgument, "the request has 2"),
    ("wrong datatype", _raw(lambda r: setattr(r.inputs[0], "datatype", "FP64")),
     InvalidArgument, "datatype must be FP32"),
    ("lower-case datatype", _raw(lambda r: setattr(r.inputs[0], "datatype", "fp32")),
     InvalidArgument, "datatype must be FP32"),
    ("wrong image shape", _raw(_set_shape([2, 3, 2, 3])), InvalidArgument, "[N, 3, 2, 2]"),
    ("missing batch axis", _raw(_set_shape([3, 2, 2])), InvalidArgument, "shape must be"),
    ("extra axis", _raw(_set_shape([1, 2, 3, 2, 2])), InvalidArgument, "shape must be"),
    ("empty batch", _request(np.zeros((0, *DIMS), np.float32)), InvalidArgument, ">= 1"),
    ("negative batch", _raw(_set_shape([-1, *DIMS])), InvalidArgument, ">= 1"),
    ("batch over max", _request(_images(MAX_BATCH + 1)), ResourceExhausted,
     f"max_batch_size {MAX_BATCH}"),
    ("huge batch", _raw(_set_shape([2**40, *DIMS])), ResourceExhausted, "max_batch_size"),
    ("raw contents short", _raw(lambda r: r.raw_input_contents.__setitem__(
        0, r.raw_input_contents[0][:-4])), InvalidArgument, "FP32 needs 96"),
    ("raw contents long", _raw(lambda r: r.raw_input_contents.__setitem__(
        0, r.raw_input_contents[0] + b"\0")), InvalidArgument, "FP32 needs 96"),
    ("two raw contents for one input", _raw(lambda r: r.raw_input_contents.append(b"")),
     InvalidArgument, "2 entries for 1 input"),
    ("raw and typed contents", _raw(lambda r: r.inputs[0].contents.fp32_contents.extend(
        [0.0] * 24)), InvalidArgument, "not both"),
    ("typed count short", _typed(lambda r: r.inputs[0].contents.fp32_contents.pop()),
     InvalidArgument, "23 values"),
    ("typed in the wrong field", _typed(lambda r: r.inputs[0].contents.fp64_contents.append(1.0)),
     InvalidArgument, "fp32_contents"),
    ("typed bytes contents", _typed(lambda r: r.inputs[0].contents.bytes_contents.append(b"x")),
     InvalidArgument, "fp32_contents"),
    ("no contents at all", _raw(lambda r: r.raw_input_contents.pop()), InvalidArgument,
     "0 values"),
    ("NaN in raw contents", _poison(np.nan, typed=False), InvalidArgument, "NaN or Inf"),
    ("Inf in typed contents", _poison(np.inf, typed=True), InvalidArgument, "NaN or Inf"),
    ("-Inf in raw contents", _poison(-np.inf, typed=False), InvalidArgument, "NaN or Inf"),
]  # fmt: skip


def _output(name: str, k: int | None = None) -> pb.ModelInferRequest:
    request = _request()
    out = request.outputs.add(name=name)
    if k is not None:
        out.parameters[codec.CLASSIFICATION].int64_param = k
    return request


BAD_OUTPUTS = [
    ("unknown output", _output("probabilities"), InvalidArgument, "unknown output"),
    ("classification count 0", _output("logits", 0), InvalidArgument, ">= 1, got 0"),
    ("classification count negative", _output("logits", -3), InvalidArgument, ">= 1, got -3"),
]

STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _check_refusal(decode: Callable[[], object], error: type[ServerError], words: str) -> None:
    with pytest.raises(error) as raised:
        decode()
    assert type(raised.value) is error
    code, message = status_of(raised.value)
    assert code == STATUS[error]
    assert words in message, message


@pytest.mark.parametrize(
    ("request_", "error", "words"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_every_bad_input_gets_its_error_and_status(
    request_: pb.ModelInferRequest, error: type[ServerError], words: str
) -> None:
    _check_refusal(lambda: codec.decode_inputs(request_, MV), error, words)


@pytest.mark.parametrize(
    ("request_", "error", "words"),
    [case[1:] for case in BAD_OUTPUTS],
    ids=[case[0] for case in BAD_OUTPUTS],
)
def test_every_bad_requested_output_gets_its_error_and_status(
    request_: pb.ModelInferRequest, error: type[ServerError], words: str
) -> None:
    codec.decode_inputs(request_, MV)  # the input itself is fine
    _check_refusal(lambda: codec.requested_outputs(request_, MV), error, words)


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
@pytest.mark.parametrize("n", [1, MAX_BATCH])
def test_a_good_request_round_trips(n: int, typed: bool) -> None:
    x = _images(n)
    request = _request(x, typed=typed)
    decoded = codec.decode_inputs(request, MV)
    assert decoded.dtype == np.float32 and decoded.shape == (n, *DIMS)
    np.testing.assert_array_equal(decoded, x)

    outputs = codec.requested_outputs(request, MV)
    assert outputs == [codec.RequestedOutput("logits", 0)]  # none named: the model's output
    logits = np.arange(n * CLASSES, dtype=np.float32).reshape(n, CLASSES)
    response = codec.encode_response(request, MV, outputs, logits)
    assert (response.model_name, response.model_version, response.id) == ("tiny", "3", "req-7")
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("logits", "FP32", [n, CLASSES])
    assert not tensor.HasField("contents")  # always raw
    back = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(n, CLASSES)
    np.testing.assert_array_equal(back, logits)


def _bytes_elements(raw: bytes) -> list[str]:
    items, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    return items


def test_classification_is_clamped_to_the_classes_and_ties_keep_index_order() -> None:
    logits = np.array([[0.5, 3.0, -1.0, 3.0, 9.0], [4.0, 0.0, 1.0, 2.0, 0.25]], np.float32)
    for k, expected in ((99, CLASSES), (2, 2)):
        request = _request(_images(2))
        request.outputs.add(name="logits").parameters[codec.CLASSIFICATION].int64_param = k
        outputs = codec.requested_outputs(request, MV)
        assert [o.class_count for o in outputs] == [expected]
        response = codec.encode_response(request, MV, outputs, logits)
        assert [t.datatype for t in response.outputs] == ["BYTES"]
        assert [list(t.shape) for t in response.outputs] == [[2, expected]]
        items = _bytes_elements(response.raw_output_contents[0])
        assert len(items) == 2 * expected
    # ties keep index order; class 4 has no label, so its item has no third part
    assert items == ["9.000000:4", "3.000000:1:one", "4.000000:0:zero", "2.000000:3:three"]


@pytest.mark.parametrize("copies", [2, 3, 10_000])
def test_an_output_named_more_than_once_is_refused_before_any_is_read(copies: int) -> None:
    request = _request(_images(1))
    for i in range(copies):  # mixed raw and classification, as an attacker would send them
        out = request.outputs.add(name="logits")
        if i % 2:
            out.parameters[codec.CLASSIFICATION].int64_param = 3
    _check_refusal(lambda: codec.requested_outputs(request, MV), InvalidArgument,
                   f"names {copies} outputs")  # fmt: skip


def test_a_non_finite_answer_is_refused_not_returned() -> None:
    request = _request(_images(2))
    outputs = codec.requested_outputs(request, MV)
    fine = np.zeros((2, CLASSES), np.float32)
    assert codec.answer(request, MV, outputs, fine).raw_output_contents
    for bad in (np.nan, np.inf, -np.inf):
        logits = fine.copy()
        logits[1, 3] = bad
        _check_refusal(functools.partial(codec.answer, request, MV, outputs, logits),
                       InvalidArgument, "NaN or Inf")  # fmt: skip
