"""Protobuf <-> numpy for the client, in one place: images encoded as the endpoint's spec
asks (layout, range, mean/std, datatype), scores, labels and classification results decoded.

Kept free of channels and retries so the sync and async clients (and every transport) share
every byte layout. Decoders raise ValueError on a malformed response; the clients turn that
into a ClientError.
"""

from __future__ import annotations

import struct

import numpy as np

from defcnn.client.spec import EndpointSpec
from defcnn.errors import ConfigError
from defcnn.protos import grpc_service_pb2 as pb

CLASSIFICATION = "classification"
_WIRE = {"FP32": "<f4", "FP16": "<f2", "UINT8": "u1"}
_SCORES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8"}
_INTS = {"INT32": "<i4", "INT64": "<i8"}
_TYPED = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents",
          "INT64": "int64_contents", "BYTES": "bytes_contents"}  # fmt: skip


def check_images(spec: EndpointSpec, images: object) -> np.ndarray:
    """The images as float32 [N, 3, H, W] in [0, 1], or a ConfigError saying what is wrong."""
    try:
        x = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"images must be convertible to float32: {exc}") from exc
    c, h, w = spec.input_shape
    if x.ndim != 4 or x.shape[1:] != spec.input_shape or x.shape[0] < 1:
        raise ConfigError(
            f"model {spec.model!r} takes images as float32 [N, {c}, {h}, {w}] in [0, 1] with "
            f"N >= 1, got shape {list(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise ConfigError("images hold NaN or Inf; pixels must be finite, in [0, 1]")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ConfigError(f"images must be in [0, 1], got values in [{low:g}, {high:g}]")
    return x


def encode_images(spec: EndpointSpec, x: np.ndarray) -> np.ndarray:
    """Checked float32 [N, 3, H, W] images as the endpoint takes them (wire dtype and layout;
    without the batch dimension when the endpoint has none)."""
    low, high = spec.input_range
    v: np.ndarray = x
    if (low, high) != (0.0, 1.0) or spec.mean is not None or spec.std is not None:
        v = low + x.astype(np.float64) * (high - low)
        if spec.mean is not None:
            v = v - np.asarray(spec.mean, np.float64).reshape(1, -1, 1, 1)
        if spec.std is not None:
            v = v / np.asarray(spec.std, np.float64).reshape(1, -1, 1, 1)
    if spec.datatype == "UINT8":  # round half to even, in the sent pixel space
        v = np.clip(np.rint(v), 0, 255)
    if spec.layout == "NHWC":
        v = v.transpose(0, 2, 3, 1)
    if not spec.batch_dim:
        if len(v) != 1:
            raise ConfigError(f"model {spec.model!r} takes one image per request, got {len(v)}")
        v = v[0]
    return np.ascontiguousarray(v, dtype=_WIRE[spec.datatype])


def infer_request(spec: EndpointSpec, x: np.ndarray, k: int = 0) -> pb.ModelInferRequest:
    """A ModelInfer request for checked images, raw contents; k > 0 asks for top-k labels."""
    request = pb.ModelInferRequest(model_name=spec.model, model_version=spec.version)
    wire = encode_images(spec, x)
    request.inputs.add(name=spec.input_name, datatype=spec.datatype, shape=list(wire.shape))
    request.raw_input_contents.append(wire.tobytes())
    output = request.outputs.add(name=spec.output_name)
    if k:
        output.parameters[CLASSIFICATION].int64_param = k
    return request


def _output(response: pb.ModelInferResponse, name: str | None) -> tuple[str, bytes | None, int]:
    """(datatype, raw bytes or None when sent as typed contents, index) of the output."""
    outputs = list(response.outputs)
    if name is not None:
        index = next((i for i, o in enumerate(outputs) if o.name == name), -1)
        if index < 0 and len(outputs) == 1:
            index = 0  # servers may rename an output they were asked for by name
    else:
        index = 0 if len(outputs) == 1 else -1
    if index < 0:
        raise ValueError(f"expected output {name!r}, got {[o.name for o in outputs]}")
    raw = response.raw_output_contents
    if raw and len(raw) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(raw)} raw contents")
    return outputs[index].datatype, (raw[index] if raw else None), index


def _array(
    response: pb.ModelInferResponse, name: str, dtypes: dict[str, str]
) -> tuple[np.ndarray, int]:
    """The output's values, flat, and its index (raw contents, or typed ones where they exist)."""
    datatype, raw, index = _output(response, name)
    if datatype not in dtypes:
        raise ValueError(f"expected a {'/'.join(dtypes)} output, got {datatype}")
    if raw is not None:
        return np.frombuffer(raw, dtype=dtypes[datatype]), index
    field = _TYPED.get(datatype)
    if field is None:
        raise ValueError(f"a {datatype} output must come as raw contents")
    return np.asarray(getattr(response.outputs[index].contents, field)), index


def _rows(
    response: pb.ModelInferResponse, flat: np.ndarray, index: int, spec: EndpointSpec
) -> np.ndarray:
    """The values per image: as many rows as the response's batch dimension says."""
    shape = [int(d) for d in response.outputs[index].shape]
    n = (shape[0] if shape else 0) if spec.batch_dim else 1
    if n < 1 or flat.size % n or flat.size == 0:
        raise ValueError(f"output {spec.output_name!r} holds {flat.size} values for shape {shape}")
    return flat.reshape(n, -1)


def decode_scores(response: pb.ModelInferResponse, spec: EndpointSpec) -> np.ndarray:
    """The spec's float output (FP32, FP16, FP64) as a writable float32 [N, C] array."""
    flat, index = _array(response, spec.output_name, _SCORES)
    scores = _rows(response, flat, index, spec).astype(np.float32)
    if spec.num_classes is not None and scores.shape[1] != spec.num_classes:
        raise ValueError(f"expected {spec.num_classes} scores per image, got {scores.shape[1]}")
    return scores


def _label_index(item: bytes, labels: tuple[str, ...]) -> int:
    text = item.decode()
    if text.lstrip("-").isascii() and text.lstrip("-").isdigit():
        return int(text)
    parts = text.split(":", 2)  # the classification extension's "value:index[:label]"
    if len(parts) >= 2 and parts[1].isascii() and parts[1].isdigit():
        return int(parts[1])
    if text in labels:
        return labels.index(text)
    raise ValueError(f"cannot read a class index from the label {text!r}")


def decode_label_output(response: pb.ModelInferResponse, spec: EndpointSpec) -> np.ndarray:
    """A label output (INT32, INT64, or BYTES as index, "value:index:label" or label) as
    int64 [n], checked against the spec's class count when it has one."""
    datatype, raw, index = _output(response, spec.output_name)
    if datatype == "BYTES":
        items = (_bytes_elements(raw) if raw is not None
                 else list(response.outputs[index].contents.bytes_contents))  # fmt: skip
        flat = np.array([_label_index(i, spec.labels) for i in items], dtype=np.int64)
    else:
        values, index = _array(response, spec.output_name, _INTS)
        flat = values.astype(np.int64)
    labels = _rows(response, flat, index, spec)
    if labels.shape[1] != 1:
        raise ValueError(f"expected one label per image, got {labels.shape[1]}")
    if spec.num_classes is not None and ((labels < 0) | (labels >= spec.num_classes)).any():
        raise ValueError(f"labels outside 0..{spec.num_classes - 1}: {labels.ravel().tolist()}")
    return labels[:, 0]


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Triton's raw BYTES layout: a 4-byte little-endian length, then the bytes, per element."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError("truncated BYTES tensor: a length prefix is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError("truncated BYTES tensor: an element is cut short")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _classified(response: pb.ModelInferResponse) -> list[list[tuple[str | None, int, float]]]:
    """Per image, the top-k as (label or None, index, value) from "value:index[:label]"."""
    datatype, raw, index = _output(response, None)
    if datatype != "BYTES":
        raise ValueError(f"expected a BYTES output, got {datatype}")
    items = (_bytes_elements(raw) if raw is not None
             else list(response.outputs[index].contents.bytes_contents))  # fmt: skip
    shape = [int(d) for d in response.outputs[index].shape]
    if len(shape) != 2:
        raise ValueError(f"expected a classification output [N, k], got shape {shape}")
    n, k = shape
    if len(items) != n * k:
        raise ValueError(f"BYTES output holds {len(items)} elements for shape {shape}")
    rows = []
    for row in range(n):
        parsed = []
        for item in items[row * k : (row + 1) * k]:
            value, position, *label = item.decode().split(":", 2)
            parsed.append((label[0] if label else None, int(position), float(value)))
        rows.append(parsed)
    return rows


def decode_classification(response: pb.ModelInferResponse) -> list[list[tuple[str, int, float]]]:
    """Per image, the top-k as (label, index, value); a missing label becomes str(index)."""
    return [
        [(str(index) if label is None else label, index, value) for label, index, value in row]
        for row in _classified(response)
    ]


def decode_probe(response: pb.ModelInferResponse, num_classes: int) -> tuple[list[str], np.ndarray]:
    """One image classified over all classes: its labels by index ([] when the server has
    none) and its scores as float32 [num_classes] (as precise as the server's text)."""
    row = _classified(response)[0]
    scores = np.full(num_classes, np.nan, np.float32)
    by_index: dict[int, str] = {}
    for label, index, value in row:
        if not 0 <= index < num_classes:
            raise ValueError(f"class index {index} outside 0..{num_classes - 1}")
        scores[index] = value
        if label is not None:
            by_index[index] = label
    if np.isnan(scores).any():
        raise ValueError(f"classification over {num_classes} classes left some out")
    labels = [by_index.get(i, str(i)) for i in range(num_classes)] if by_index else []
    return labels, scores


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum so large logits cannot overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
