"""ONNX Runtime backend: the CUDA execution provider on a GPU, else the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from defcnn.server.backends.base import cuda_usable
from defcnn.server.errors import InvalidArgument

# Not ONNX Runtime's TensorRT provider: onnxruntime-gpu lists it whether or not TensorRT is
# installed, a session asked for it then fails to start without TensorRT's libraries, and
# with them it builds engines at every start. TensorRT runs through the tensorrt backend,
# from the engines `defcnn export --tensorrt` built and checked.
GPU_PROVIDERS = ("CUDAExecutionProvider",)


def providers_for(device: str) -> list[str]:
    """Execution providers for `device` (auto, cpu, cuda), most preferred first."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidArgument(f"device must be auto, cpu or cuda, got {device!r}")
    available = set(ort.get_available_providers())
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if device == "cuda" and not (gpu and cuda_usable()):
        raise InvalidArgument("device cuda asked for, but no usable CUDA GPU / provider")
    if device == "cpu" or not (gpu and cuda_usable()):
        return ["CPUExecutionProvider"]
    return [*gpu, "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """One InferenceSession per model version; `run` is called from one worker thread."""

    name = "onnxruntime"

    def __init__(
        self, model_path: Path, device: str = "auto", threads: int = 0, spinning: bool = True
    ) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        # Spinning idle intra-op threads (ONNX Runtime's default) answer a lone request
        # sooner; sleeping ones leave the cores to the gRPC threads between batches. Which
        # is faster depends on the CPU (docs/benchmarks.md); --ort-spinning chooses.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(model_path), opts, providers=providers_for(device))
        self.device = "cuda" if self.session.get_providers()[0] in GPU_PROVIDERS else "cpu"
        if device == "cuda" and self.device != "cuda":
            # ONNX Runtime falls back to the CPU when a GPU provider cannot load its libraries.
            raise InvalidArgument(
                "device cuda asked for, but ONNX Runtime's GPU providers did not start (the "
                f"session runs on {self.session.get_providers()}): its CUDA and cuDNN libraries "
                "were not found; put their folders on LD_LIBRARY_PATH"
            )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]
