"""TensorRT engines from the exported ONNX, named by GPU and TensorRT version.

An engine only runs on the GPU architecture and TensorRT version that built it, so its
file name carries both (``model.sm90.trt10.8.0.fp16.plan``) and `check_engine` refuses a
mismatch with a message that says which. TensorRT 10 takes FP16 as a builder flag;
TensorRT 11 removed it and needs a strongly typed network built from an FP16 ONNX: both
are supported, and FP16 is never silently replaced by FP32.

Not verified here: the development machines have no GPU and no TensorRT (docs/deploy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defcnn.errors import ExportError
from defcnn.names import engine_name, parse_engine_name

PRECISIONS = ("fp32", "fp16")


def _tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError(
            "--tensorrt needs the tensorrt package (pip install tensorrt) and an NVIDIA GPU"
        ) from exc
    return trt


def gpu_compute_capability() -> tuple[int, int]:
    """(major, minor) of GPU 0; raises when there is no usable CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise ExportError("--tensorrt needs an NVIDIA GPU; none is usable here")
    return torch.cuda.get_device_capability(0)


def check_engine(path: Path, capability: tuple[int, int], trt_version: str) -> None:
    """Refuse an engine built for another GPU architecture or TensorRT version."""
    info = parse_engine_name(path.name)
    if info is None:
        raise ExportError(
            f"{path.name} is not a defcnn engine name (model.smNN.trtX.Y.Z.fpNN.plan)"
        )
    here = f"{capability[0]}{capability[1]}"
    if info["sm"] != here or info["trt"] != trt_version:
        raise ExportError(
            f"{path.name} was built for sm{info['sm']} with TensorRT {info['trt']}; this machine "
            f"has sm{here} and TensorRT {trt_version}: rebuild it with defcnn export --tensorrt"
        )


def _fp16_onnx(onnx_bytes: bytes) -> bytes:
    """The same graph with FP16 weights and activations but FP32 inputs and outputs."""
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ExportError("FP16 with TensorRT >= 11 needs onnxconverter-common") from exc
    model = onnx.load_from_string(onnx_bytes)
    return float16.convert_float_to_float16(model, keep_io_types=True).SerializeToString()


def build_engine(
    onnx_bytes: bytes, *, input_size: int, max_batch_size: int, precision: str
) -> tuple[bytes, str]:
    """Serialize an engine with a profile for batch 1..max; returns (engine, file name)."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = _tensorrt()
    capability = gpu_compute_capability()
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if precision == "fp16" and major >= 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        onnx_bytes = _fp16_onnx(onnx_bytes)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16" and major < 11:
        if not builder.platform_has_fast_fp16:
            raise ExportError("this GPU has no fast FP16; refusing to build FP32 instead")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = (3, input_size, input_size)
    profile.set_shape("input", (1, *shape), (max_batch_size, *shape), (max_batch_size, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT failed to build the engine (see its log above)")
    return bytes(engine), engine_name(capability, trt.__version__, precision)


def engine_logits(engine_bytes: bytes, images: np.ndarray, max_batch_size: int) -> np.ndarray:
    """Run a serialized engine on float32 images [N, 3, H, W] (CUDA buffers via torch)."""
    import torch

    trt = _tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ExportError("TensorRT could not deserialize the engine")
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    outputs = []
    for start in range(0, len(images), max_batch_size):
        x = torch.from_numpy(images[start : start + max_batch_size]).cuda().contiguous()
        context.set_input_shape("input", tuple(x.shape))
        y = torch.empty(tuple(context.get_tensor_shape("logits")), device="cuda")
        context.set_tensor_address("input", x.data_ptr())
        context.set_tensor_address("logits", y.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        outputs.append(y.float().cpu().numpy())
    return np.concatenate(outputs)


@dataclass(frozen=True)
class EngineParity:
    """A TensorRT engine against ONNX Runtime (CUDA) on the test images."""

    images: int
    argmax_agreement: float
    max_abs_diff: float
    passed: bool


def engine_parity(
    engine_bytes: bytes, onnx_bytes: bytes, images: np.ndarray, max_batch_size: int
) -> EngineParity:
    """Argmax agreement with ONNX Runtime on the GPU over `images`; >= 99.9% required."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ExportError("TensorRT parity needs onnxruntime-gpu with CUDA")
    session = ort.InferenceSession(onnx_bytes, providers=["CUDAExecutionProvider"])
    reference = np.concatenate(
        [
            session.run(["logits"], {"input": images[i : i + max_batch_size]})[0]
            for i in range(0, len(images), max_batch_size)
        ]
    )
    got = engine_logits(engine_bytes, images, max_batch_size)
    agreement = float((got.argmax(1) == reference.argmax(1)).mean())
    result = EngineParity(
        images=len(images), argmax_agreement=agreement,
        max_abs_diff=float(np.abs(got - reference).max()), passed=agreement >= 0.999,
    )  # fmt: skip
    if not result.passed:
        raise ExportError(
            f"TensorRT engine disagrees with ONNX Runtime: argmax agreement {agreement:.4f} "
            f"(>= 0.999 required), max|diff| {result.max_abs_diff:.2e} on {len(images)} images"
        )
    return result
