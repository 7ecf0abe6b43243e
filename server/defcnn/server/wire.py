"""The protobuf wire format, read directly: for what must be known before a message is
parsed.

Parsing is done by protobuf's C code while it holds the GIL, so a message built to be slow
to parse (millions of map entries or sub-messages: about 25 ms per MiB here) would stall
every thread of the server, wherever it ran. `check_infer_request` counts the fields
of a ModelInferRequest and its tensors first, stopping at the first count over its limit,
so the refusal costs as much as a request that honest clients send.
"""

from __future__ import annotations

from collections.abc import Iterator

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.server.errors import InvalidArgument

MAX_PARAMETERS = 64  # entries of any one parameters map
MAX_TENSORS = 16  # inputs, outputs and raw_input_contents entries, each
MAX_FIELDS = 256  # fields of the request, or of one of its tensors, counted as they come
MAX_SHAPE_BYTES = 16 * 10  # a packed shape of 16 dimensions, each a 10-byte varint at most


class Malformed(ValueError):
    """Bytes that are not a protobuf message."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one message: ints for varints, views for length-delimited
    fields; fixed-width fields are skipped (cheap to parse, and never needed here)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise Malformed("truncated field")
            yield number, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise Malformed(f"unsupported wire type {wire}")
    if pos != len(buf):
        raise Malformed("truncated fixed-width field")


def _number(message: type, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)  # type: ignore[attr-defined]


_REQUEST = pb.ModelInferRequest
_PARAMETERS = _number(_REQUEST, "parameters")
_TENSORS = {
    _number(_REQUEST, "inputs"): ("inputs", _number(_REQUEST.InferInputTensor, "parameters")),
    _number(_REQUEST, "outputs"): (
        "outputs", _number(_REQUEST.InferRequestedOutputTensor, "parameters"),
    ),
}  # fmt: skip
_RAW = _number(_REQUEST, "raw_input_contents")
_INPUTS = _number(_REQUEST, "inputs")
_SHAPE = _number(_REQUEST.InferInputTensor, "shape")


def _bounded(buf: memoryview, what: str, parameters: int) -> Iterator[tuple[int, int | memoryview]]:
    counts: dict[int, int] = {}
    for n, (number, value) in enumerate(fields(buf)):
        if n >= MAX_FIELDS:
            raise InvalidArgument(f"{what} has more than {MAX_FIELDS} fields; refused")
        counts[number] = counts.get(number, 0) + 1
        if number == parameters and counts[number] > MAX_PARAMETERS:
            raise InvalidArgument(f"{what} has more than {MAX_PARAMETERS} parameters; refused")
        yield number, value


def check_infer_request(data: bytes) -> None:
    """Refuse a ModelInferRequest with more parameters, tensors or fields than any model
    here takes; malformed bytes are left for the parser to describe."""
    counts: dict[int, int] = {}
    try:
        for number, value in _bounded(memoryview(data), "the request", _PARAMETERS):
            counts[number] = counts.get(number, 0) + 1
            if number in _TENSORS or number == _RAW:
                name = _TENSORS[number][0] if number in _TENSORS else "raw_input_contents"
                if counts[number] > MAX_TENSORS:
                    raise InvalidArgument(f"the request has more than {MAX_TENSORS} {name}")
            if number in _TENSORS and isinstance(value, memoryview):
                name, parameters = _TENSORS[number]
                for field, inner in _bounded(value, f"an entry of {name}", parameters):
                    too_long = isinstance(inner, memoryview) and len(inner) > MAX_SHAPE_BYTES
                    if number == _INPUTS and field == _SHAPE and too_long:
                        raise InvalidArgument("an input's shape has more than 16 dimensions")
    except Malformed:
        return
