"""PyTorch -> ONNX: BatchNorm folded, each defective mask one `Mul` by a named constant.

The TorchScript exporter (``dynamo=False``) runs in eval mode with constant folding,
which fuses every Conv+BatchNorm pair and leaves each mask as a `Mul` whose second input
is a [1, C, H, W] initializer. We then rename each mask initializer to its checkpoint key
(matched by value, so the match itself proves the fold) and record provenance in
``metadata_props``.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from defcnn.errors import ExportError
from defcnn.layers.defective import mask_buffers
from defcnn.names import INPUT_NAME, OUTPUT_NAME

OPSET = 17
META_PREFIX = "defcnn."


def to_onnx(model: torch.nn.Module, input_size: int) -> onnx.ModelProto:
    """Trace `model` (eval mode) to an ONNX graph with a dynamic batch axis."""
    model = model.eval()
    dummy = torch.rand(2, 3, input_size, input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is on purpose
        torch.onnx.export(
            model, (dummy,), buffer,  # type: ignore[arg-type]  # a file object works; stubs say path
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def mask_muls(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """Every `Mul` by a constant [1, C, H, W] initializer that holds only zeros and ones."""
    inits = {t.name: t for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "Mul":
            continue
        for name in node.input:
            tensor = inits.get(name)
            if tensor is None or len(tensor.dims) != 4 or tensor.dims[0] != 1:
                continue
            values = numpy_helper.to_array(tensor)
            if np.isin(values, (0.0, 1.0)).all():
                found.append((node, tensor))
    return found


def name_masks(model_proto: onnx.ModelProto, model: torch.nn.Module) -> dict[str, str]:
    """Rename each mask initializer to the checkpoint key of the mask it equals.

    Returns {checkpoint key: Mul node name}. Raises unless every checkpoint mask is
    present exactly once and every 0/1 Mul constant is a checkpoint mask.
    """
    expected = {k: v.detach().cpu().numpy() for k, v in mask_buffers(model).items()}
    graph = model_proto.graph
    matched: dict[str, str] = {}
    for node, tensor in mask_muls(graph):
        values = numpy_helper.to_array(tensor)
        key = next(
            (k for k, v in expected.items() if k not in matched and np.array_equal(v, values)),
            None,
        )
        if key is None:
            raise ExportError(f"Mul {node.name!r} multiplies by a 0/1 constant that is no mask")
        old = tensor.name
        tensor.name = key
        for n in graph.node:
            n.input[:] = [key if i == old else i for i in n.input]
        matched[key] = node.name
    missing = sorted(set(expected) - set(matched))
    if missing:
        raise ExportError(f"masks not found as constant Muls in the ONNX graph: {missing}")
    return matched


def set_metadata(model_proto: onnx.ModelProto, props: dict[str, Any]) -> None:
    """Store `props` as metadata_props under the ``defcnn.`` prefix (non-strings as JSON)."""
    del model_proto.metadata_props[:]
    for key, value in sorted(props.items()):
        entry = model_proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def read_metadata(model_proto: onnx.ModelProto) -> dict[str, str]:
    """The ``defcnn.`` metadata_props of a model, prefix stripped."""
    return {
        p.key[len(META_PREFIX) :]: p.value
        for p in model_proto.metadata_props
        if p.key.startswith(META_PREFIX)
    }
