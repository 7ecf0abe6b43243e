"""Where an ONNX file's tensors keep external data, read from the protobuf wire format.

The server must not depend on the `onnx` package (the base install serves without it), and
ONNX Runtime's own check of external data paths only exists in recent releases, so the
refusal of paths outside a model's folder reads the few fields it needs directly: the
tensors of the graph (initializers, sparse initializers, node attributes, subgraphs and
functions) and each one's `data_location` and `external_data` entries. Field numbers from
onnx/onnx.proto3.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from defcnn.server.errors import InvalidArgument
from defcnn.server.wire import Malformed as _Malformed
from defcnn.server.wire import fields as _fields

# ModelProto.graph, ModelProto.functions
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
# GraphProto.node, .initializer, .sparse_initializer
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
# FunctionProto.node
_FUNCTION_NODE = 7
# NodeProto.attribute
_NODE_ATTRIBUTE = 5
# AttributeProto.t, .g, .tensors, .graphs, .sparse_tensor, .sparse_tensors
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
# SparseTensorProto.values, .indices
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
# TensorProto.name, .external_data, .data_location; DataLocation.EXTERNAL
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1
# StringStringEntryProto.key, .value
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _children(buf: memoryview, numbers: tuple[int, ...]) -> Iterator[memoryview]:
    for number, value in _fields(buf):
        if number in numbers and isinstance(value, memoryview):
            yield value


def _sparse(buf: memoryview) -> Iterator[memoryview]:
    yield from _children(buf, (_SPARSE_VALUES, _SPARSE_INDICES))


def _nodes(buf: memoryview, number: int) -> Iterator[memoryview]:
    for node in _children(buf, (number,)):
        for attr in _children(node, (_NODE_ATTRIBUTE,)):
            for field, value in _fields(attr):
                if not isinstance(value, memoryview):
                    continue
                if field in (_ATTR_T, _ATTR_TENSORS):
                    yield value
                elif field in (_ATTR_G, _ATTR_GRAPHS):
                    yield from _graph_tensors(value)
                elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
                    yield from _sparse(value)


def _graph_tensors(graph: memoryview) -> Iterator[memoryview]:
    yield from _children(graph, (_GRAPH_INITIALIZER,))
    for sparse in _children(graph, (_GRAPH_SPARSE,)):
        yield from _sparse(sparse)
    yield from _nodes(graph, _GRAPH_NODE)


def external_locations(data: bytes) -> Iterator[tuple[str, str]]:
    """(tensor name, location) of every tensor of a serialized ModelProto stored externally."""
    model = memoryview(data)
    tensors = [t for g in _children(model, (_MODEL_GRAPH,)) for t in _graph_tensors(g)]
    for function in _children(model, (_MODEL_FUNCTIONS,)):
        tensors.extend(_nodes(function, _FUNCTION_NODE))
    for tensor in tensors:
        name, location, external = "", "", False
        for number, value in _fields(tensor):
            if number == _TENSOR_NAME and isinstance(value, memoryview):
                name = bytes(value).decode("utf-8", "replace")
            elif number == _TENSOR_DATA_LOCATION:
                external = value == _EXTERNAL
            elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
                entry = {k: bytes(v).decode("utf-8", "replace") for k, v in _fields(value)
                         if isinstance(v, memoryview)}  # fmt: skip
                if entry.get(_ENTRY_KEY) == "location":
                    location = entry.get(_ENTRY_VALUE, "")
        if external:
            yield name, location


def check_external_data(model: Path) -> None:
    """Refuse an ONNX file whose external tensor data lies outside its version folder (or
    is no regular file there): a repository must never make the server read files it was
    not given."""
    folder = model.parent.resolve()
    try:
        found = list(external_locations(model.read_bytes()))
    except _Malformed as exc:
        raise InvalidArgument(f"{model.name} is not a valid ONNX file: {exc}") from None
    for name, location in found:
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise InvalidArgument(
                f"tensor {name!r} keeps its data at {location!r}, outside the model's "
                "folder; refused"
            )
        if target.exists() and not target.is_file():
            raise InvalidArgument(f"tensor {name!r} keeps its data in {location!r}, "
                                  "which is not a regular file; refused")  # fmt: skip
