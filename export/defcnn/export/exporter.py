"""`defcnn export`: checkpoint -> verified ONNX (+ optional TensorRT) in a Triton repository."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from defcnn.atomic import atomic_write, write_json
from defcnn.checkpoint import load_model
from defcnn.data import load_dataset
from defcnn.errors import ConfigError, DataError, ExportError
from defcnn.export import repository
from defcnn.export.onnx_graph import name_masks, set_metadata, to_onnx
from defcnn.export.triton_config import LABELS_FILE, TritonModelConfig
from defcnn.export.verify import ort_session, parity, parity_cases, structural_checks

MODEL_FILE = "model.onnx"
REPORT_FILE = "verification.json"


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("defective-cnn")
    except PackageNotFoundError:
        ours = "unknown"
    return {"defcnn": ours, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}  # fmt: skip


def export(settings: ExportSettings) -> dict[str, Any]:
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
        "input_size": size, "source_checkpoint_sha256": sha256_of(ckpt_path),
        "source_checkpoint": ckpt_path.name, "exporter": _versions(), "spec": spec.to_dict(),
    }  # fmt: skip
    set_metadata(proto, props)
    report: dict[str, Any] = {"model": settings.name, "version": version}
    report["structure"] = structural_checks(proto, allow_batchnorm=spec.arch == "densenet121")
    report["masks"] = {"count": len(masks), "mul_nodes": masks}
    model_bytes = proto.SerializeToString()
    large = max(2, min(settings.max_batch_size, 64))
    cases = parity_cases(_real_images(settings, ckpt.meta, size, large), size, large)
    report["parity"] = parity(ort_session(model_bytes), model, cases)

    config = TritonModelConfig(
        name=settings.name, input_size=size, num_classes=len(classes),
        max_batch_size=settings.max_batch_size, max_queue_delay_us=settings.max_queue_delay_us,
    )  # fmt: skip
    with repository.staged_version(model_dir, version) as staging:
        (staging / MODEL_FILE).write_bytes(model_bytes)
        if settings.tensorrt:
            test_images = _real_images(settings, ckpt.meta, size, None).astype(np.float32) / 255
            report["tensorrt"] = _build_engines(model_bytes, staging, settings, size, test_images)
        report["files"] = [*sorted(p.name for p in staging.iterdir()), REPORT_FILE]
        write_json(staging / REPORT_FILE, report)
        text = "\n".join(classes) + "\n"
        atomic_write(model_dir / LABELS_FILE, lambda tmp: tmp.write_text(text))
        atomic_write(model_dir / "config.pbtxt", lambda tmp: tmp.write_text(config.to_pbtxt()))
    return report


def _build_engines(
    model_bytes: bytes, folder: Path, settings: ExportSettings, size: int, images: np.ndarray
) -> list[dict[str, Any]]:
    from defcnn.export.tensorrt_engine import build_engine, engine_parity

    results = []
    for precision in ["fp32", "fp16"] if settings.fp16 else ["fp32"]:
        engine, name = build_engine(
            model_bytes, input_size=size, max_batch_size=settings.max_batch_size,
            precision=precision,
        )  # fmt: skip
        check = engine_parity(engine, model_bytes, images, settings.max_batch_size)
        (folder / name).write_bytes(engine)
        results.append({"file": name, "precision": precision, "bytes": len(engine), **check})
    return results


def summary(report: dict[str, Any]) -> str:
    """A few lines for people; the JSON report holds everything."""
    lines = [f"exported {report['model']} version {report['version']}",
             f"  graph: {report['structure']['checker']}, {report['structure']['shape_inference']}",
             f"  masks folded into constant Muls: {report['masks']['count']}"]  # fmt: skip
    for r in report["parity"]:
        lines.append(
            f"  parity {r['case']:<18} max|diff| {r['max_abs_diff']:.2e}  "
            f"argmax identical: {r['argmax_identical']}"
        )
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
