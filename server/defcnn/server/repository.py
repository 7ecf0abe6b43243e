"""Loads every model and version of a Triton-layout repository; a broken one is reported,
never fatal. Names are looked up in what was loaded, never joined into paths."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from defcnn.errors import ConfigError
from defcnn.names import CONFIG_FILE, MODEL_FILE, parse_version
from defcnn.protos import model_config_pb2
from defcnn.protos.model_config_pb2 import ModelConfig
from defcnn.server._external_data import check_external_data
from defcnn.server.backends.base import Backend
from defcnn.server.batching import BatchRecord, DynamicBatcher
from defcnn.server.errors import InvalidArgument, NotFound, ServerError, Unavailable, shown
from defcnn.server.model_files import CONFIG_LIMIT, LABELS_LIMIT, RepositoryFiles
from defcnn.server.statistics import Metrics

log = logging.getLogger("defcnn.server")


@dataclass(frozen=True)
class ServingOptions:
    """Server-wide settings; None means "as config.pbtxt says"."""

    backend: str = "onnxruntime"
    device: str = "auto"
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int = 1024
    threads: int = 0
    spinning: bool = True


@dataclass(frozen=True, eq=False)
class ModelVersion:
    """One loaded, warmed version of one model: what requests are checked against, and the
    batcher that serves them."""

    name: str
    version: int
    config: model_config_pb2.ModelConfig
    labels: list[str]
    input_dims: tuple[int, ...]
    num_classes: int
    max_batch_size: int
    backend: Backend
    batcher: DynamicBatcher


@dataclass(frozen=True, eq=False)
class FailedVersion:
    """A version that did not load: listed as UNAVAILABLE with the reason, never served.
    Its config is what config.pbtxt said (empty when unreadable), for metadata."""

    name: str
    version: int
    reason: str
    config: model_config_pb2.ModelConfig


AnyVersion = ModelVersion | FailedVersion


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    return config


REQUEST_SLACK = 64 * 1024  # names, shapes and parameters beside a full batch's pixels


def request_bytes(max_batch_size: int, input_dims: tuple[int, ...]) -> int:
    """The largest request a model version takes: a full batch of FP32 images."""
    return max_batch_size * int(np.prod(input_dims)) * 4 + REQUEST_SLACK


def check_repository(root: Path) -> None:
    """Refuse, before anything binds, a repository path that is no folder or is one
    model's folder (a common slip: it would serve nothing)."""
    if not root.is_dir():
        raise ConfigError(f"--model-repo {root} is not a folder")
    folders = [p for p in root.iterdir() if p.is_dir()]
    models = any((p / CONFIG_FILE).exists() for p in folders)
    versions = any(parse_version(p.name) is not None and (p / MODEL_FILE).exists()
                   for p in folders)  # fmt: skip
    if (root / CONFIG_FILE).is_file() or (versions and not models):
        raise ConfigError(
            f"--model-repo {root} is one model's folder (it holds {CONFIG_FILE} or version "
            f"folders); pass the folder above it, which holds one folder per model"
        )


def _make_backend(options: ServingOptions, folder: Path) -> Backend:
    if options.backend == "onnxruntime":
        from defcnn.server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            folder / MODEL_FILE, options.device, options.threads, options.spinning
        )
    if options.backend == "tensorrt":
        from defcnn.server.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(folder)
    raise InvalidArgument(f"backend must be onnxruntime or tensorrt, got {options.backend!r}")


class ModelRepository:
    """Every (name, version) found under a repository folder, ready or not."""

    def __init__(
        self,
        root: Path,
        options: ServingOptions,
        executor: Executor,
        metrics: Metrics,
        *,
        max_message_bytes: int,
    ) -> None:
        self.root = Path(root)
        self.options = options
        self.executor = executor
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes  # a full batch must fit in one message
        self.models: dict[str, dict[int, AnyVersion]] = {}
        self.files = RepositoryFiles(self.root)
        self.stop_loading = threading.Event()

    def load_all(self) -> None:
        """Load and warm every version; failures are logged and kept as not-ready entries.
        Nothing inside one model's folder can stop the others from loading. Setting
        `stop_loading` ends the loading before the next version."""
        if not self.root.is_dir():
            raise NotFound(f"model repository {self.root} is not a folder")
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            name = model_dir.name
            if name.startswith("."):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # no client could name it, and gRPC cannot send it
                log.warning("skipped a model folder whose name is not UTF-8: %r", name)
                continue
            if self.stop_loading.is_set():
                return
            try:
                self.models[name] = self._load_model(model_dir)
            except Exception as exc:  # a bug or an unforeseen file: this model only
                log.exception("model %s not ready", name)
                reason = self.files.scrub(f"{type(exc).__name__}: {exc}")
                try:
                    versions = list(self.files.version_folders(model_dir)) or [0]
                except OSError:
                    versions = [0]
                self.models[name] = {v: FailedVersion(name, v, reason, ModelConfig())
                                     for v in versions}  # fmt: skip

    def _load_model(self, model_dir: Path) -> dict[int, AnyVersion]:
        name = model_dir.name
        versions = self.files.version_folders(model_dir)
        try:
            self.files.inside(self.root, model_dir, "model folder")
            text = self.files.read_text(model_dir, model_dir / CONFIG_FILE, CONFIG_FILE,
                                        CONFIG_LIMIT)  # fmt: skip
            try:
                config = parse_config(text)
            except text_format.ParseError as exc:
                raise InvalidArgument(f"{CONFIG_FILE} does not parse: {exc}") from None
            labels = self._labels(model_dir, config)
        except (InvalidArgument, OSError) as exc:
            reason = self.files.scrub(str(exc))  # an OSError names the absolute path
            log.error("model %s not ready: %s", name, reason)
            return {v: FailedVersion(name, v, reason, ModelConfig()) for v in versions or [0]}
        if not versions:
            log.warning("model %s has no version folder (1, 2, ...)", name)
        loaded: dict[int, AnyVersion] = {}
        for v, folder in versions.items():
            if self.stop_loading.is_set():
                break
            try:
                loaded[v] = self._load_version(name, v, config, labels, model_dir, folder)
            except Exception as exc:
                text = str(exc) if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
                reason = self.files.scrub(text)
                log.error("model %s version %d not ready: %s", name, v, reason)
                loaded[v] = FailedVersion(name, v, reason, config)
        return loaded

    def _labels(self, model_dir: Path, config: ModelConfig) -> list[str]:
        """The output's label file: a plain name in the model's folder, resolving inside
        it; none named, none read."""
        label_name = config.output[0].label_filename if config.output else ""
        if not label_name:
            return []
        if (Path(label_name).name != label_name or label_name in (".", "..")
                or len(label_name) > 255 or "\0" in label_name):  # fmt: skip
            raise InvalidArgument(f"label_filename {shown(label_name)} is not a plain file name")
        path = model_dir / label_name
        if not path.exists() and not path.is_symlink():
            return []
        return self.files.read_text(model_dir, path, label_name, LABELS_LIMIT).splitlines()

    def _load_version(
        self,
        name: str,
        version: int,
        cfg: ModelConfig,
        labels: list[str],
        model_dir: Path,
        folder: Path,
    ) -> ModelVersion:
        folder = self.files.inside(model_dir, folder, "version folder")
        if len(cfg.input) != 1 or len(cfg.output) != 1:
            raise InvalidArgument("expected exactly one input and one output in config.pbtxt")
        input_dims = tuple(int(d) for d in cfg.input[0].dims)
        output_dims = tuple(int(d) for d in cfg.output[0].dims)
        if not input_dims or min(input_dims) < 1 or len(output_dims) != 1 or output_dims[0] < 1:
            raise InvalidArgument(
                f"config.pbtxt dims: input {list(input_dims)} and output {list(output_dims)}; "
                "expected positive sizes and one output dimension (the classes)"
            )
        num_classes = output_dims[0]
        max_batch_size = self.options.max_batch_size or cfg.max_batch_size or 1
        needed = request_bytes(max_batch_size, input_dims)
        if needed > self.max_message_bytes:
            raise InvalidArgument(
                f"a full batch of {max_batch_size} needs {needed / 2**20:.1f} MiB messages; "
                f"raise --max-message-mb above {self.max_message_bytes / 2**20:.0f}"
            )
        delay_us = self.options.max_queue_delay_us
        if delay_us is None:
            delay_us = cfg.dynamic_batching.max_queue_delay_microseconds
        if self.options.backend == "onnxruntime":
            # protobuf cannot hold more than 2 GiB: larger weights are external data
            model = self.files.regular_file(folder, folder / MODEL_FILE, MODEL_FILE, 2 << 30)
            check_external_data(model)
        backend = _make_backend(self.options, folder)
        for n in sorted({1, max_batch_size}):  # warm-up, and a check that it really runs
            out = backend.run(np.zeros((n, *input_dims), dtype=np.float32))
            if out.shape != (n, num_classes):
                raise InvalidArgument(f"warm-up output {out.shape}, expected {(n, num_classes)}")

        def record(b: BatchRecord) -> None:
            if b.ok:
                self.metrics.batch_executed(name, version, b.size, b.compute_ns)

        batcher = DynamicBatcher(
            backend.run, max_batch_size=max_batch_size, max_delay_s=delay_us / 1e6,
            max_queue=self.options.max_queue_size, executor=self.executor, on_batch=record,
        )  # fmt: skip
        log.info("model %s version %d ready on %s", name, version, backend.device)
        return ModelVersion(
            name, version, cfg, labels, input_dims, num_classes, max_batch_size, backend, batcher
        )

    def largest_request(self) -> int:
        """The largest request any model here takes, from the config files alone (read
        before any model loads, to size gRPC's message limit), capped by the message
        limit; REQUEST_SLACK when no model has a readable config."""
        largest = REQUEST_SLACK
        for model_dir in self.root.iterdir():
            try:
                if model_dir.name.startswith(".") or not model_dir.is_dir():
                    continue
                self.files.inside(self.root, model_dir, "model folder")
                config = parse_config(self.files.read_text(
                    model_dir, model_dir / CONFIG_FILE, CONFIG_FILE, CONFIG_LIMIT))  # fmt: skip
                dims = tuple(int(d) for d in config.input[0].dims)
                batch = self.options.max_batch_size or config.max_batch_size or 1
                if dims and min(dims) >= 1:
                    largest = max(largest, request_bytes(batch, dims))
            except (InvalidArgument, OSError, RuntimeError, IndexError, text_format.ParseError):
                continue  # reported when the model loads
        return min(largest, self.max_message_bytes)

    def queue_depths(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(queued now, most ever queued) for every serving version, for the metrics."""
        return {(mv.name, mv.version): (mv.batcher.depth, mv.batcher.max_depth)
                for mv in self.ready_versions()}  # fmt: skip

    def start(self) -> None:
        for mv in self.ready_versions():
            mv.batcher.start()

    async def close(self) -> None:
        for mv in self.ready_versions():
            await mv.batcher.close()

    def all_versions(self) -> list[AnyVersion]:
        """Every version found, loaded or failed, by model name then version."""
        return [mv for versions in self.models.values() for mv in versions.values()]

    def ready_versions(self) -> list[ModelVersion]:
        return [mv for mv in self.all_versions() if isinstance(mv, ModelVersion)]

    def find(self, name: str, version: str = "") -> AnyVersion:
        """The named version (or the newest), loaded or failed: for metadata, config and
        statistics, which describe a model that is not serving too. NOT_FOUND otherwise."""
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"unknown model {shown(name)}")
        if version:
            number = parse_version(version)
            if number is None or number not in versions:
                raise NotFound(f"model {name!r} has no version {shown(version)}")
            return versions[number]
        return versions[max(versions)]

    def lookup(self, name: str, version: str = "") -> ModelVersion:
        """The named version (or the newest ready one) to serve; NOT_FOUND, or UNAVAILABLE
        when it failed to load."""
        found = self.find(name, version)
        if not version:
            ready = [mv for mv in self.models[name].values() if isinstance(mv, ModelVersion)]
            found = max(ready, key=lambda mv: mv.version, default=found)
        if isinstance(found, FailedVersion):
            raise Unavailable(
                f"model {name!r} version {found.version} is not ready: {found.reason}"
            )
        return found
