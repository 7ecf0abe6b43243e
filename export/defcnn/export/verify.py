"""Every export checks itself: ONNX checker, shape inference, no training-only ops, and
parity with PyTorch in ONNX Runtime on random and real inputs. Failure raises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from defcnn.errors import ExportError
from defcnn.names import INPUT_NAME, OUTPUT_NAME

MAX_ABS_DIFF = 1e-4
# On a GPU, both sides run FP32 with TF32 off, but cuDNN picks other convolution algorithms
# (FFT, Winograd) than ONNX Runtime's CPU kernels, and than each other: a wider bound.
CUDA_MAX_ABS_DIFF = 1e-3
CUDA_PROVIDER = "CUDAExecutionProvider"
# Ops that are random, or only meaningful while training, must not survive an export.
FORBIDDEN_OPS = frozenset(
    {"Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
     "Bernoulli", "Multinomial", "BatchNormalization"}
)  # fmt: skip


@dataclass(frozen=True)
class ParityCase:
    """One parity check: a named input batch."""

    name: str
    images: np.ndarray  # float32 [N, 3, H, W] in [0, 1]


@dataclass(frozen=True)
class GraphChecks:
    """What the structural checks found (they raise on any failure)."""

    checker: str
    shape_inference: str
    output_shape: list[int | str]  # a symbolic batch dimension is its name
    ops: dict[str, int]  # op type -> node count


@dataclass(frozen=True)
class ParityResult:
    """One parity case: ONNX Runtime against PyTorch on the same batch."""

    case: str
    batch: int
    max_abs_diff: float
    argmax_identical: bool
    passed: bool

    def line(self) -> str:
        return (f"{self.case}: max|diff| {self.max_abs_diff:.2e}, argmax "
                f"{'identical' if self.argmax_identical else 'differs'}")  # fmt: skip


def structural_checks(model_proto: onnx.ModelProto, *, allow_batchnorm: bool) -> GraphChecks:
    """Checker (full), strict shape inference, and the op inventory."""
    try:
        onnx.checker.check_model(model_proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model_proto, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the ONNX graph is invalid: {exc}") from exc
    ops: dict[str, int] = {}
    for node in model_proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    forbidden = FORBIDDEN_OPS - ({"BatchNormalization"} if allow_batchnorm else set())
    bad = sorted(set(ops) & forbidden)
    if bad:
        raise ExportError(f"the ONNX graph still holds random or training-only ops: {bad}")
    if model_proto.training_info:
        raise ExportError("the ONNX graph carries training_info")
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    return GraphChecks(
        checker="passed (full_check)",
        shape_inference="passed (strict)",
        output_shape=[d.dim_param or d.dim_value for d in out],
        ops=ops,
    )


def ort_session(model_bytes: bytes) -> ort.InferenceSession:
    """A CPU ONNX Runtime session: parity is defined in FP32 on the CPU."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def parity(
    session: ort.InferenceSession,
    model: torch.nn.Module,
    cases: list[ParityCase],
    *,
    device: str = "cpu",
    tolerance: float = MAX_ABS_DIFF,
) -> list[ParityResult]:
    """Max abs logit difference and argmax agreement per case; raises past `tolerance`.
    `device` is where PyTorch runs (the session's provider is the caller's choice)."""
    model = model.eval().to(device)
    results = []
    for case in cases:
        with torch.no_grad():
            expected = model(torch.from_numpy(case.images).to(device)).float().cpu().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: case.images})[0]
        if got.shape != expected.shape:
            raise ExportError(f"{case.name}: ONNX output {got.shape} != PyTorch {expected.shape}")
        diff = float(np.abs(got - expected).max())
        same_argmax = bool((got.argmax(1) == expected.argmax(1)).all())
        results.append(
            ParityResult(case=case.name, batch=len(case.images), max_abs_diff=diff,
                         argmax_identical=same_argmax, passed=diff <= tolerance and same_argmax)
        )  # fmt: skip
    failed = "; ".join(r.line() for r in results if not r.passed)
    if failed:
        raise ExportError(f"ONNX Runtime and PyTorch disagree (tolerance {tolerance}): {failed}")
    return results


def cuda_session(model_bytes: bytes) -> ort.InferenceSession:
    """An ONNX Runtime session on the CUDA provider, FP32 without TF32; raises when the
    provider is missing or did not start (ONNX Runtime would quietly run on the CPU)."""
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise ExportError(
            f"this onnxruntime ({ort.__version__}) has no {CUDA_PROVIDER}: install onnxruntime-gpu"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        model_bytes, opts, providers=[(CUDA_PROVIDER, {"use_tf32": "0"}), "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != CUDA_PROVIDER:
        raise ExportError(
            f"{CUDA_PROVIDER} did not start (the session runs on {session.get_providers()}): "
            "its CUDA and cuDNN libraries were not found; put their folders on LD_LIBRARY_PATH"
        )
    return session


def cuda_parity(
    model_bytes: bytes, model: torch.nn.Module, cases: list[ParityCase]
) -> list[ParityResult]:
    """The export's parity on the GPU: ONNX Runtime CUDA against PyTorch CUDA, both FP32."""
    if not torch.cuda.is_available():
        raise ExportError("the CUDA parity check needs a CUDA device; torch sees none")
    session = cuda_session(model_bytes)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return parity(session, model, cases, device="cuda", tolerance=CUDA_MAX_ABS_DIFF)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        model.to("cpu")


def parity_cases(
    real: np.ndarray, input_size: int, large_batch: int, seed: int = 0
) -> list[ParityCase]:
    """Random and real inputs, each at batch 1 and at `large_batch`."""
    rng = np.random.default_rng(seed)
    random = rng.random((large_batch, 3, input_size, input_size), dtype=np.float32)
    real = real[:large_batch].astype(np.float32) / 255.0
    return [
        ParityCase("random batch 1", random[:1]),
        ParityCase(f"random batch {large_batch}", random),
        ParityCase("real batch 1", real[:1]),
        ParityCase(f"real batch {len(real)}", real),
    ]
