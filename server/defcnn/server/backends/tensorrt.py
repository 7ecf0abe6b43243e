"""Native TensorRT engines (optional): the engine `defcnn export --tensorrt` built for this
GPU and TensorRT version, run with device buffers from cuda-python (no torch here).

Not verified: the development machines have no GPU and no TensorRT (docs/deploy.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defcnn.names import parse_engine_name
from defcnn.server.errors import Unavailable

PRECISION_ORDER = ("fp16", "fp32")


def _imports() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise Unavailable(
            "--backend tensorrt needs the tensorrt and cuda-python packages and an NVIDIA GPU"
        ) from exc
    return trt, cudart


def _check(result: tuple[Any, ...]) -> Any:
    err, *rest = result
    if int(err) != 0:
        raise Unavailable(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def pick_engine(folder: Path, capability: tuple[int, int], trt_version: str) -> Path:
    """The engine built for this GPU and TensorRT version, FP16 preferred; refuses others."""
    wanted = f"{capability[0]}{capability[1]}"
    found = {}
    others = []
    for path in folder.glob("*.plan"):
        if not path.resolve().is_relative_to(folder.resolve()):
            continue  # an engine must lie in its version folder, not be linked from elsewhere
        info = parse_engine_name(path.name)
        if info and info["sm"] == wanted and info["trt"] == trt_version:
            found[info["precision"]] = path
        elif info:
            others.append(path.name)
    for precision in PRECISION_ORDER:
        if precision in found:
            return found[precision]
    raise Unavailable(
        f"no engine for sm{wanted} and TensorRT {trt_version} in {folder.name} "
        f"(found: {others or 'none'}); rebuild with defcnn export --tensorrt on this machine"
    )


class TensorRTBackend:
    """One engine and execution context; buffers sized for the engine's max batch."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, folder: Path) -> None:
        trt, self._cudart = _imports()
        cudart = self._cudart
        device = _check(cudart.cudaGetDevice())
        props = _check(cudart.cudaGetDeviceProperties(device))
        path = pick_engine(folder, (props.major, props.minor), trt.__version__)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise Unavailable(f"TensorRT could not load {path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.max_batch = int(self.engine.get_tensor_profile_shape("input", 0)[2][0])
        in_shape = tuple(self.engine.get_tensor_shape("input"))[1:]
        out_shape = tuple(self.engine.get_tensor_shape("logits"))[1:]
        self._in_bytes = int(np.prod(in_shape)) * 4
        self._out_shape = out_shape
        self._d_in = _check(cudart.cudaMalloc(self.max_batch * self._in_bytes))
        self._d_out = _check(cudart.cudaMalloc(self.max_batch * int(np.prod(out_shape)) * 4))

    def run(self, images: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        n = len(images)
        x = np.ascontiguousarray(images, dtype=np.float32)
        out = np.empty((n, *self._out_shape), dtype=np.float32)
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, kind_h2d, self.stream))
        self.context.set_input_shape("input", x.shape)
        self.context.set_tensor_address("input", int(self._d_in))
        self.context.set_tensor_address("logits", int(self._d_out))
        if not self.context.execute_async_v3(self.stream):
            raise Unavailable("TensorRT execution failed")
        _check(
            cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, kind_d2h, self.stream)
        )
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out
