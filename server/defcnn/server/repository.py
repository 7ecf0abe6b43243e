"""Loads every model and version of a Triton-layout repository; a broken one is reported,
never fatal. Names are looked up in what was loaded, never joined into paths."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from defcnn.protos import model_config_pb2
from defcnn.server.backends.base import Backend
from defcnn.server.batching import BatchRecord, DynamicBatcher
from defcnn.server.errors import InvalidArgument, NotFound, Unavailable
from defcnn.server.statistics import Metrics

log = logging.getLogger("defcnn.server")

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ServingOptions:
    """Server-wide settings; None means "as config.pbtxt says"."""

    backend: str = "onnxruntime"
    device: str = "auto"
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int = 1024
    threads: int = 0
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(eq=False)
class ModelVersion:
    """One version of one model: its config, labels and, when ready, its batcher."""

    name: str
    version: int
    config: model_config_pb2.ModelConfig
    labels: list[str]
    platform: str
    ready: bool = False
    reason: str = ""
    backend: Backend | None = None
    batcher: DynamicBatcher | None = None
    input_dims: tuple[int, ...] = ()
    num_classes: int = 0
    max_batch_size: int = 0
    device: str = ""


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def _make_backend(options: ServingOptions, folder: Path) -> Backend:
    if options.backend == "onnxruntime":
        from defcnn.server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder / MODEL_FILE, options.device, options.threads)
    if options.backend == "tensorrt":
        from defcnn.server.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(folder)
    raise InvalidArgument(f"backend must be onnxruntime or tensorrt, got {options.backend!r}")


def check_external_data(model: Path) -> None:
    """Refuse an ONNX file whose external tensor data lies outside its version folder: a
    repository must never make the server read files it was not given."""
    import onnx

    def tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else [])
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    proto = onnx.load(str(model), load_external_data=False)
    folder = model.parent.resolve()
    for tensor in tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise InvalidArgument(
                f"tensor {tensor.name!r} keeps its data at {location!r}, outside the model's "
                "folder; refused"
            )


class ModelRepository:
    """Every (name, version) found under a repository folder, ready or not."""

    def __init__(
        self, root: Path, options: ServingOptions, executor: Executor, metrics: Metrics
    ) -> None:
        self.root = Path(root)
        self.options = options
        self.executor = executor
        self.metrics = metrics
        self.models: dict[str, dict[int, ModelVersion]] = {}

    def load_all(self) -> None:
        """Load and warm every version; failures are logged and kept as not-ready entries."""
        if not self.root.is_dir():
            raise NotFound(f"model repository {self.root} is not a folder")
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            self.models[model_dir.name] = self._load_model(model_dir)

    def _load_model(self, model_dir: Path) -> dict[int, ModelVersion]:
        name = model_dir.name
        try:
            config = parse_config(model_dir / "config.pbtxt")
        except Exception as exc:
            log.error("model %s: unreadable config.pbtxt: %s", name, exc)
            reason = f"unreadable config.pbtxt: {exc}"
            return {0: ModelVersion(name, 0, model_config_pb2.ModelConfig(), [], "", reason=reason)}
        label_name = config.output[0].label_filename if config.output else ""
        labels = []
        if label_name and Path(label_name).name == label_name and label_name != "..":
            labels_file = model_dir / label_name  # a plain name inside the model's folder only
            labels = labels_file.read_text().splitlines() if labels_file.is_file() else []
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        loaded = {}
        for v in versions:
            mv = ModelVersion(name, v, config, labels, config.platform)
            try:
                self._load_version(mv, model_dir / str(v))
            except Exception as exc:
                mv.ready, mv.reason = False, f"{type(exc).__name__}: {exc}"
                log.error("model %s version %d not ready: %s", name, v, mv.reason)
            loaded[v] = mv
        return loaded

    def _load_version(self, mv: ModelVersion, folder: Path) -> None:
        cfg = mv.config
        if len(cfg.input) != 1 or len(cfg.output) != 1:
            raise InvalidArgument("expected exactly one input and one output in config.pbtxt")
        mv.input_dims = tuple(int(d) for d in cfg.input[0].dims)
        mv.num_classes = int(cfg.output[0].dims[0])
        mv.max_batch_size = self.options.max_batch_size or cfg.max_batch_size or 1
        needed = mv.max_batch_size * int(np.prod(mv.input_dims)) * 4 + 64 * 1024
        if needed > self.options.max_message_bytes:
            raise InvalidArgument(
                f"a full batch of {mv.max_batch_size} needs {needed / 2**20:.1f} MiB messages; "
                f"raise --max-message-mb above {self.options.max_message_bytes / 2**20:.0f}"
            )
        delay_us = self.options.max_queue_delay_us
        if delay_us is None:
            delay_us = cfg.dynamic_batching.max_queue_delay_microseconds
        if self.options.backend == "onnxruntime":
            check_external_data(folder / MODEL_FILE)
        backend = _make_backend(self.options, folder)
        for n in sorted({1, mv.max_batch_size}):  # warm-up, and a check that it really runs
            out = backend.run(np.zeros((n, *mv.input_dims), dtype=np.float32))
            if out.shape != (n, mv.num_classes):
                raise InvalidArgument(f"warm-up output {out.shape}, expected {(n, mv.num_classes)}")
        mv.backend, mv.device = backend, backend.device

        def record(b: BatchRecord, name: str = mv.name, version: int = mv.version) -> None:
            if b.ok:
                self.metrics.batch_executed(name, version, b.size, b.compute_ns)

        mv.batcher = DynamicBatcher(
            backend.run, max_batch_size=mv.max_batch_size, max_delay_s=delay_us / 1e6,
            max_queue=self.options.max_queue_size, executor=self.executor, on_batch=record,
        )  # fmt: skip
        mv.ready = True
        log.info("model %s version %d ready on %s", mv.name, mv.version, backend.device)

    def queue_depths(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(queued now, most ever queued) for every serving version, for the metrics."""
        return {(mv.name, mv.version): (mv.batcher.depth, mv.batcher.max_depth)
                for mv in self.all_versions() if mv.batcher is not None}  # fmt: skip

    def start(self) -> None:
        for mv in self.all_versions():
            if mv.batcher is not None:
                mv.batcher.start()

    async def close(self) -> None:
        for mv in self.all_versions():
            if mv.batcher is not None:
                await mv.batcher.close()

    def all_versions(self) -> list[ModelVersion]:
        return [mv for versions in self.models.values() for mv in versions.values()]

    def lookup(self, name: str, version: str = "") -> ModelVersion:
        """The named version (or the newest ready one); NOT_FOUND or UNAVAILABLE otherwise."""
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}")
        if version:
            if not version.isdigit() or int(version) not in versions:
                raise NotFound(f"model {name!r} has no version {version!r}")
            mv = versions[int(version)]
        else:
            ready = [mv for mv in versions.values() if mv.ready]
            mv = ready[-1] if ready else versions[max(versions)]
        if not mv.ready:
            raise Unavailable(f"model {name!r} version {mv.version} is not ready: {mv.reason}")
        return mv
