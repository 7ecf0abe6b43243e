"""`defcnn export`: checkpoint -> verified ONNX (+ optional TensorRT) in a Triton repository."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defcnn.atomic import atomic_write, write_json
from defcnn.checkpoint import load_model
from defcnn.data import load_dataset
from defcnn.digest import sha256_file
from defcnn.errors import ConfigError, DataError, ExportError
from defcnn.export import repository
from defcnn.export.onnx_graph import name_masks, set_metadata, to_onnx
from defcnn.export.triton_config import TritonModelConfig
from defcnn.export.verify import (
    GraphChecks,
    ParityResult,
    ort_session,
    parity,
    parity_cases,
    structural_checks,
)
from defcnn.names import CONFIG_FILE, LABELS_FILE, MODEL_FILE, REPORT_FILE
from defcnn.versions import versions


@dataclass(frozen=True)
class ExportSettings:
    """What `defcnn export` was asked to do."""

    checkpoint: str
    repo: str
    name: str
    version: int | None = None
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    tensorrt: bool = False
    fp16: bool = False
    dataset: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        repository.check_model_name(self.name)
        if not 1 <= self.max_batch_size <= 4096:
            raise ConfigError(f"max_batch_size must be in 1..4096, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.fp16 and not self.tensorrt:
            raise ConfigError("--fp16 applies to TensorRT engines: add --tensorrt")


def _real_images(
    settings: ExportSettings, meta: dict[str, Any], size: int, n: int | None
) -> np.ndarray:
    """Test images of the checkpoint's own data set (or the one named), uint8 NCHW."""
    train_cfg = meta.get("train_config", {})
    name = settings.dataset or train_cfg.get("dataset")
    data_dir = settings.data_dir or train_cfg.get("data_dir")
    if not name:
        raise ExportError("the checkpoint names no data set: pass --dataset for real-input parity")
    try:
        data = load_dataset(name, data_dir, image_size=size, progress=False)
    except DataError as exc:
        raise ExportError(
            f"real-input parity needs the {name} data set ({exc}); pass --dataset/--data-dir"
        ) from exc
    return data.test_x[:n]


@dataclass(frozen=True)
class MaskReport:
    count: int
    mul_nodes: dict[str, str]  # checkpoint key of the mask -> the constant Mul it became


@dataclass(frozen=True)
class EngineReport:
    """One TensorRT engine written beside the ONNX model, and its parity check."""

    file: str
    precision: str
    bytes: int
    images: int
    argmax_agreement: float
    max_abs_diff: float
    passed: bool


@dataclass(frozen=True)
class ExportReport:
    """What an export checked and wrote; verification.json is its `to_dict()`."""

    model: str
    version: int
    structure: GraphChecks
    masks: MaskReport
    parity: tuple[ParityResult, ...]
    files: tuple[str, ...]
    tensorrt: tuple[EngineReport, ...] | None = None  # None: no engines were asked for

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.tensorrt is None:
            del out["tensorrt"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportReport:
        engines = data.get("tensorrt")
        return cls(
            model=data["model"], version=int(data["version"]),
            structure=GraphChecks(**data["structure"]), masks=MaskReport(**data["masks"]),
            parity=tuple(ParityResult(**r) for r in data["parity"]),
            files=tuple(data["files"]),
            tensorrt=None if engines is None else tuple(EngineReport(**e) for e in engines),
        )  # fmt: skip


def export(settings: ExportSettings) -> ExportReport:
    """Export, verify and publish one version; returns the verification report."""
    ckpt_path = Path(settings.checkpoint)
    model, ckpt = load_model(ckpt_path)
    spec = ckpt.spec
    size = spec.resolved_input_size
    classes = ckpt.classes or [str(i) for i in range(spec.num_classes)]
    model_dir = Path(settings.repo) / settings.name
    repository.check_labels(model_dir, classes)
    version = repository.next_version(model_dir, settings.version)

    proto = to_onnx(model, size)
    masks = name_masks(proto, model)
    props = {
        "arch": spec.arch, "width": spec.width, "defective": bool(spec.defective_stages),
        "keep_prob": spec.keep_prob if spec.defective_stages else 1.0,
        "mask_seed": spec.mask_seed, "stages": list(spec.defective_stages),
        "shared_mask": spec.shared_mask, "classes": classes,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "input_size": size, "source_checkpoint_sha256": sha256_file(ckpt_path),
        "source_checkpoint": ckpt_path.name, "spec": spec.to_dict(),
        "exporter": versions("torch", "onnx", "onnxruntime"),
    }  # fmt: skip
    set_metadata(proto, props)
    structure = structural_checks(proto, allow_batchnorm=spec.arch == "densenet121")
    model_bytes = proto.SerializeToString()
    large = max(2, min(settings.max_batch_size, 64))
    cases = parity_cases(_real_images(settings, ckpt.meta, size, large), size, large)
    checks = parity(ort_session(model_bytes), model, cases)

    config = TritonModelConfig(
        name=settings.name, input_size=size, num_classes=len(classes),
        max_batch_size=settings.max_batch_size, max_queue_delay_us=settings.max_queue_delay_us,
    )  # fmt: skip
    with repository.staged_version(model_dir, version) as staging:
        (staging / MODEL_FILE).write_bytes(model_bytes)
        engines = None
        if settings.tensorrt:
            test_images = _real_images(settings, ckpt.meta, size, None).astype(np.float32) / 255
            engines = _build_engines(model_bytes, staging, settings, size, test_images)
        report = ExportReport(
            model=settings.name, version=version, structure=structure,
            masks=MaskReport(count=len(masks), mul_nodes=masks), parity=tuple(checks),
            files=(*sorted(p.name for p in staging.iterdir()), REPORT_FILE), tensorrt=engines,
        )  # fmt: skip
        write_json(staging / REPORT_FILE, report.to_dict())
        text = "\n".join(classes) + "\n"
        atomic_write(model_dir / LABELS_FILE, lambda tmp: tmp.write_text(text))
        atomic_write(model_dir / CONFIG_FILE, lambda tmp: tmp.write_text(config.to_pbtxt()))
    return report


def _build_engines(
    model_bytes: bytes, folder: Path, settings: ExportSettings, size: int, images: np.ndarray
) -> tuple[EngineReport, ...]:
    from defcnn.export.tensorrt_engine import build_engine, engine_parity

    results = []
    for precision in ["fp32", "fp16"] if settings.fp16 else ["fp32"]:
        engine, name = build_engine(
            model_bytes, input_size=size, max_batch_size=settings.max_batch_size,
            precision=precision,
        )  # fmt: skip
        check = engine_parity(engine, model_bytes, images, settings.max_batch_size)
        (folder / name).write_bytes(engine)
        results.append(EngineReport(file=name, precision=precision, bytes=len(engine),
                                    **asdict(check)))  # fmt: skip
    return tuple(results)


def summary(report: ExportReport) -> str:
    """A few lines for people; the JSON report holds everything."""
    lines = [f"exported {report.model} version {report.version}",
             f"  graph: {report.structure.checker}, {report.structure.shape_inference}",
             f"  masks folded into constant Muls: {report.masks.count}"]  # fmt: skip
    for r in report.parity:
        lines.append(
            f"  parity {r.case:<18} max|diff| {r.max_abs_diff:.2e}  "
            f"argmax {'identical' if r.argmax_identical else 'differs'}"
        )
    for e in report.tensorrt or ():
        lines.append(
            f"  TensorRT {e.precision} {e.file}: argmax agreement {e.argmax_agreement:.4f} on "
            f"{e.images} images, max|diff| {e.max_abs_diff:.2e}"
        )
    return "\n".join(lines)
