"""The ONNX Runtime backend never serves on another device than the one asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from defcnn.server.backends import onnxruntime as backend
from defcnn.server.errors import InvalidArgument


@pytest.fixture
def model(tmp_path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path
    )
    return path


def test_cpu_serves_on_the_cpu(model: Path) -> None:
    b = backend.OnnxRuntimeBackend(model, "cpu")
    assert b.device == "cpu"
    x = np.array([[-1.0] * 5 + [2.0] * 5], np.float32)
    assert np.array_equal(b.run(x), np.maximum(x, 0))


def test_cuda_whose_provider_cannot_start_is_refused_not_run_on_the_cpu(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.cuda_usable():
        pytest.skip("a GPU is here: the CUDA provider would start")
    # As on a GPU machine whose CUDA libraries are not on the loader's path: the driver
    # answers, the provider is listed, and ONNX Runtime would quietly fall back to the CPU.
    monkeypatch.setattr(backend, "cuda_usable", lambda: True)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        with pytest.raises(InvalidArgument, match="did not start"):
            backend.OnnxRuntimeBackend(model, "cuda")
    else:
        with pytest.raises(InvalidArgument, match="no usable CUDA"):
            backend.OnnxRuntimeBackend(model, "cuda")


def test_onnx_runtimes_tensorrt_provider_is_never_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """onnxruntime-gpu lists it without TensorRT, and a session asking for it then fails to
    start; TensorRT runs through the tensorrt backend instead."""
    monkeypatch.setattr(backend, "cuda_usable", lambda: True)
    monkeypatch.setattr(
        backend.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert backend.providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert backend.providers_for("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert backend.providers_for("cpu") == ["CPUExecutionProvider"]
