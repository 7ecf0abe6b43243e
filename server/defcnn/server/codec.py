"""Protobuf <-> numpy for ModelInfer, with every check a malformed request needs.

Tensors stay numpy arrays throughout (np.frombuffer on raw contents, never Python lists).
NaN/Inf policy: rejected with INVALID_ARGUMENT both ways. A pixel has no such value; and
finite inputs can still overflow float32 inside the model, so an output holding NaN or Inf
is refused too, never returned as an answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.server.errors import InvalidArgument, ResourceExhausted, shown
from defcnn.server.repository import ModelVersion

CLASSIFICATION = "classification"
# Messages are parsed, decoded, encoded and serialized on the event loop up to this size;
# larger ones in a worker thread, so no request holds the loop in proportion to its size.
INLINE_BYTES = 64 * 1024
# Typed-contents fields that must stay empty for an FP32 input.
_OTHER_CONTENTS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
    "fp64_contents", "bytes_contents",
)  # fmt: skip


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    class_count: int  # 0: the raw tensor; K > 0: the top K as BYTES "value:index:label"


def input_bytes(request: pb.ModelInferRequest) -> int:
    """How much input data a request carries, in constant time (for where to decode it)."""
    if len(request.inputs) != 1:
        return 0
    return sum(len(r) for r in request.raw_input_contents[:1]) + 4 * len(
        request.inputs[0].contents.fp32_contents
    )


def decode_inputs(request: pb.ModelInferRequest, mv: ModelVersion) -> np.ndarray:
    """The request's images as float32 [N, *dims]; raises on anything malformed."""
    expected_name = mv.config.input[0].name
    if len(request.inputs) != 1:  # counted before any is looked at: there may be thousands
        raise InvalidArgument(
            f"model {mv.name!r} takes exactly one input {expected_name!r}; the request has "
            f"{len(request.inputs)}"
        )
    if request.inputs[0].name != expected_name:
        raise InvalidArgument(
            f"model {mv.name!r} takes exactly one input {expected_name!r}; got "
            f"{shown(request.inputs[0].name)}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InvalidArgument(
            f"input {tensor.name!r}: datatype must be FP32, got {shown(tensor.datatype)}"
        )
    wanted = f"[N, {', '.join(map(str, mv.input_dims))}]"
    if len(tensor.shape) != 1 + len(mv.input_dims):  # counted before any is looked at
        raise InvalidArgument(
            f"input {tensor.name!r}: shape must be {wanted}, got {len(tensor.shape)} dims"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if shape[1:] != mv.input_dims:
        raise InvalidArgument(f"input {tensor.name!r}: shape must be {wanted}, got {list(shape)}")
    n = shape[0]
    if n < 1:
        raise InvalidArgument(f"input {tensor.name!r}: batch size must be >= 1, got {n}")
    if n > mv.max_batch_size:
        raise ResourceExhausted(
            f"batch of {n} exceeds the model's max_batch_size {mv.max_batch_size}"
        )
    count = int(np.prod(shape))
    typed = tensor.HasField("contents")
    if request.raw_input_contents:
        if typed:
            raise InvalidArgument("give raw_input_contents or typed contents, not both")
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input"
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * 4:
            raise InvalidArgument(
                f"input {tensor.name!r}: {len(raw)} bytes for shape {list(shape)} "
                f"(FP32 needs {count * 4})"
            )
        images = np.frombuffer(raw, dtype="<f4").reshape(shape)
    else:
        contents = tensor.contents
        if any(len(getattr(contents, f)) for f in _OTHER_CONTENTS):
            raise InvalidArgument(f"input {tensor.name!r}: FP32 data belongs in fp32_contents")
        if len(contents.fp32_contents) != count:
            raise InvalidArgument(
                f"input {tensor.name!r}: {len(contents.fp32_contents)} values for shape "
                f"{list(shape)} ({count} expected)"
            )
        images = np.asarray(contents.fp32_contents, dtype=np.float32).reshape(shape)
    if not np.isfinite(images).all():
        raise InvalidArgument(f"input {tensor.name!r} holds NaN or Inf; pixels must be finite")
    return images


def requested_outputs(request: pb.ModelInferRequest, mv: ModelVersion) -> list[RequestedOutput]:
    """The outputs to return, in request order (all of the model's when none are named)."""
    output_name = mv.config.output[0].name
    if not request.outputs:
        return [RequestedOutput(output_name, 0)]
    if len(request.outputs) > len(mv.config.output):  # a name twice, as Triton refuses it
        raise InvalidArgument(
            f"the request names {len(request.outputs)} outputs; model {mv.name!r} has "
            f"{len(mv.config.output)} ({output_name!r}), and each may be named once"
        )
    result = []
    for out in request.outputs:
        if out.name != output_name:
            raise InvalidArgument(f"unknown output {shown(out.name)}; model has {output_name!r}")
        k = 0
        if CLASSIFICATION in out.parameters:
            k = int(out.parameters[CLASSIFICATION].int64_param)
            if k < 1:
                raise InvalidArgument(f"classification count must be >= 1, got {k}")
            k = min(k, mv.num_classes)
        result.append(RequestedOutput(out.name, k))
    return result


def check_finite(logits: np.ndarray) -> None:
    """A NaN or Inf is no answer: refuse it rather than return it as one."""
    if not np.isfinite(logits).all():
        raise InvalidArgument(
            "the model's output for this input holds NaN or Inf (float32 overflow: inputs "
            "far outside the model's range?); no answer given"
        )


def _bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's raw BYTES layout: each element as a 4-byte little-endian length + bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def classify(logits: np.ndarray, k: int, labels: list[str]) -> bytes:
    """Top-k per row as "value:index:label" (Triton's classification extension)."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    items = []
    for row, idx in zip(logits, top, strict=True):
        for i in idx:
            text = f"{row[i]:f}:{i}"
            if i < len(labels):
                text += f":{labels[i]}"
            items.append(text.encode())
    return _bytes_tensor(items)


def answer(
    request: pb.ModelInferRequest,
    mv: ModelVersion,
    outputs: list[RequestedOutput],
    logits: np.ndarray,
) -> pb.ModelInferResponse:
    """The response for `logits`, refused if any of them is not finite."""
    check_finite(logits)
    return encode_response(request, mv, outputs, logits)


def encode_response(
    request: pb.ModelInferRequest,
    mv: ModelVersion,
    outputs: list[RequestedOutput],
    logits: np.ndarray,
) -> pb.ModelInferResponse:
    """Outputs in request order, always in raw_output_contents; the request id echoed."""
    response = pb.ModelInferResponse(
        model_name=mv.name, model_version=str(mv.version), id=request.id
    )
    n = logits.shape[0]
    for out in outputs:
        tensor = response.outputs.add(name=out.name)
        if out.class_count:
            tensor.datatype = "BYTES"
            tensor.shape.extend([n, out.class_count])
            response.raw_output_contents.append(classify(logits, out.class_count, mv.labels))
        else:
            tensor.datatype = "FP32"
            tensor.shape.extend(logits.shape)
            response.raw_output_contents.append(np.ascontiguousarray(logits, "<f4").tobytes())
    return response
