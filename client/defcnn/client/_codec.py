"""Protobuf <-> numpy for the client: requests from float32 images, logits and
classification results from responses, ModelInfo fields from metadata and config.

Kept free of channels and retries so the sync and async clients share every byte layout.
"""

from __future__ import annotations

import struct

import numpy as np

from defcnn.protos import grpc_service_pb2 as pb

CLASSIFICATION = "classification"


def infer_request(
    model: str, version: str, images: np.ndarray, input_name: str, output_name: str, k: int = 0
) -> pb.ModelInferRequest:
    """A ModelInfer request with the images as raw little-endian FP32; k > 0 asks for top-k."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(np.ascontiguousarray(images, dtype="<f4").tobytes())
    output = request.outputs.add(name=output_name)
    if k:
        output.parameters[CLASSIFICATION].int64_param = k
    return request


def _raw_output(response: pb.ModelInferResponse, datatype: str) -> tuple[bytes, list[int]]:
    if len(response.outputs) != 1 or len(response.raw_output_contents) != 1:
        raise ValueError(
            f"expected one output in raw_output_contents, got {len(response.outputs)} outputs "
            f"and {len(response.raw_output_contents)} raw contents"
        )
    output = response.outputs[0]
    if output.datatype != datatype:
        raise ValueError(f"expected a {datatype} output, got {output.datatype}")
    return response.raw_output_contents[0], [int(d) for d in output.shape]


def decode_logits(response: pb.ModelInferResponse) -> np.ndarray:
    """The FP32 output as a writable float32 [N, C] array."""
    raw, shape = _raw_output(response, "FP32")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


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
    raw, shape = _raw_output(response, "BYTES")
    items = _bytes_elements(raw)
    n, k = shape
    if len(items) != n * k:
        raise ValueError(f"BYTES output holds {len(items)} elements for shape {shape}")
    rows = []
    for row in range(n):
        parsed = []
        for item in items[row * k : (row + 1) * k]:
            value, index, *label = item.decode().split(":", 2)
            parsed.append((label[0] if label else None, int(index), float(value)))
        rows.append(parsed)
    return rows


def decode_classification(response: pb.ModelInferResponse) -> list[list[tuple[str, int, float]]]:
    """Per image, the top-k as (label, index, value); a missing label becomes str(index)."""
    return [
        [(str(index) if label is None else label, index, value) for label, index, value in row]
        for row in _classified(response)
    ]


def decode_labels(response: pb.ModelInferResponse, num_classes: int) -> list[str]:
    """Labels by index from one image classified over all classes; [] when the server has none."""
    by_index = {index: label for label, index, _ in _classified(response)[0] if label is not None}
    if not by_index:
        return []
    return [by_index.get(i, str(i)) for i in range(num_classes)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum so large logits cannot overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def dims(shape: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """A metadata shape without its leading batch dimension (-1)."""
    return tuple(int(d) for d in shape[1:])
