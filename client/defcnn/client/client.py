"""What the blocking client (`sync.py`) and the asyncio one (`aio.py`) share, written once.

Settings and channel options, the query ledger (counts and budget), input validation and
chunking, and the retry policy (`_Attempts`). The two clients differ only in how they
wait: threads and `time.sleep` there, tasks and `asyncio.sleep` in `aio.py`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from defcnn.client import _codec
from defcnn.client.errors import ClientError, QueryBudgetExceeded
from defcnn.errors import ConfigError
from defcnn.protos import grpc_service_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to send valid images and read the answers, fetched once per model."""

    name: str
    version: str
    input_shape: tuple[int, int, int]
    num_classes: int
    max_batch_size: int
    labels: list[str]
    input_name: str = "input"
    output_name: str = "logits"


@dataclass
class QueryCounter:
    """Queries the server saw from this client for one model: every ModelInfer sent counts,
    retries and failed sends included (the server saw them), as do their images."""

    images: int = 0
    rpcs: int = 0


@dataclass(frozen=True)
class _Settings:
    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, int], ...]
    metadata: tuple[tuple[str, str], ...]
    timeout: float
    retries: int
    backoff: float
    concurrency: int


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def _settings(url: str, **kw: Any) -> _Settings:
    """Validate the constructor's arguments once, for both clients."""
    target, tls = url, bool(kw["tls"])
    for scheme, secure in (("grpc://", False), ("grpcs://", True)):
        if url.startswith(scheme):
            target, tls = url[len(scheme) :], tls or secure
    host, _, port = target.rpartition(":")
    if "://" in target or not host or not port.isdigit():
        raise ConfigError(f"url must be HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT: {url!r}")
    for name, low in (("retries", 0), ("concurrency", 1), ("max_message_mb", 1)):
        if kw[name] < low:
            raise ConfigError(f"{name} must be >= {low}, got {kw[name]}")
    if not kw["timeout"] > 0 or kw["backoff"] < 0:
        raise ConfigError(f"timeout must be > 0 and backoff >= 0: {kw['timeout']}, {kw['backoff']}")
    if (kw["tls_cert"] is None) != (kw["tls_key"] is None):
        raise ConfigError("tls_cert and tls_key go together (a client certificate and its key)")
    credentials = None
    if tls or kw["tls_ca"] or kw["tls_cert"]:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(kw["tls_ca"], "TLS CA"),
            private_key=_read(kw["tls_key"], "TLS key"),
            certificate_chain=_read(kw["tls_cert"], "TLS certificate"),
        )
    size = kw["max_message_mb"] * 1024 * 1024
    options = (
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        # Reconnect soon after a server restart, so retries with backoff find it again.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    )
    metadata = (("authorization", f"Bearer {kw['token']}"),) if kw["token"] else ()
    return _Settings(
        target, credentials, options, metadata, float(kw["timeout"]), int(kw["retries"]),
        float(kw["backoff"]), int(kw["concurrency"]),
    )  # fmt: skip


class _Ledger:
    """Per-model query counts and the lifetime budget, safe across threads.

    Budget is taken before sending: a call reserves all its images up front (so a call that
    does not fit sends nothing), and each send turns one chunk's reservation into counts.
    """

    def __init__(self, budget: int | None) -> None:
        if budget is not None and budget < 0:
            raise ConfigError(f"budget must be >= 0 images, got {budget}")
        self.budget = budget
        self._lock = threading.Lock()
        self._counters: dict[str, QueryCounter] = {}
        self._reserved = 0

    def total(self) -> int:
        with self._lock:
            return sum(c.images for c in self._counters.values())

    def counter(self, model: str) -> QueryCounter:
        with self._lock:
            c = self._counters.get(model, QueryCounter())
            return QueryCounter(c.images, c.rpcs)

    def reserve(self, n: int) -> None:
        with self._lock:
            used = sum(c.images for c in self._counters.values()) + self._reserved
            if self.budget is not None and used + n > self.budget:
                raise QueryBudgetExceeded(
                    f"query budget of {self.budget} images: {used} used or in flight, "
                    f"this needs {n} more"
                )
            self._reserved += n

    def sent(self, model: str, n: int) -> None:
        with self._lock:
            self._reserved -= n
            c = self._counters.setdefault(model, QueryCounter())
            c.images += n
            c.rpcs += 1

    def release(self, n: int) -> None:
        with self._lock:
            self._reserved -= n


def _code(exc: grpc.RpcError) -> tuple[str, str]:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    return (code.name if code is not None else "UNKNOWN"), (details or str(exc))


class _Attempts:
    """One RPC's attempts: counts each ModelInfer send, reserves budget for retries, and
    says how long to wait before retrying an UNAVAILABLE (or raises ClientError)."""

    def __init__(
        self, settings: _Settings, ledger: _Ledger, model: str | None = None, images: int = 0,
        *, reserved: bool = False, abort: threading.Event | None = None,
    ) -> None:  # fmt: skip
        self._settings, self._ledger = settings, ledger
        self._model, self._images = model, images
        self._held = reserved
        self._abort = abort
        self.attempt = -1

    def __enter__(self) -> _Attempts:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._ledger.release(self._images)
            self._held = False

    def next(self) -> bool:
        """Account for the next send; False when another chunk of the call already failed."""
        if self._abort is not None and self._abort.is_set():
            return False
        self.attempt += 1
        if self._model is not None:
            if not self._held:
                try:
                    self._ledger.reserve(self._images)
                except QueryBudgetExceeded:
                    self._stop()
                    raise
            self._ledger.sent(self._model, self._images)
            self._held = False
        return True

    def failed(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before retrying, or raise ClientError at once."""
        code, details = _code(exc)
        if code == "UNAVAILABLE" and self.attempt < self._settings.retries:
            return self._settings.backoff * 2**self.attempt
        self._stop()
        raise ClientError(code, details) from exc

    def _stop(self) -> None:
        if self._abort is not None:
            self._abort.set()


def _decoded(decode: Callable[..., T], *args: Any) -> T:
    try:
        return decode(*args)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError("INTERNAL", f"malformed response from the server: {exc}") from exc


class _ClientBase:
    """What both clients do without waiting on the network."""

    def __init__(
        self, url: str, *, token: str | None = None, tls: bool = False, tls_ca: str | None = None,
        tls_cert: str | None = None, tls_key: str | None = None, timeout: float = 30.0,
        retries: int = 3, backoff: float = 0.1, budget: int | None = None, concurrency: int = 4,
        max_message_mb: int = 64,
    ) -> None:  # fmt: skip
        self._settings = _settings(
            url, token=token, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            timeout=timeout, retries=retries, backoff=backoff, concurrency=concurrency,
            max_message_mb=max_message_mb,
        )  # fmt: skip
        self._ledger = _Ledger(budget)
        self._infos: dict[tuple[str, str], ModelInfo] = {}
        self._open()

    def _open(self) -> None:
        """Set up what the subclass waits with (channel, pool or semaphore)."""
        raise NotImplementedError

    def _new_channel(self, api: Any) -> Any:
        """A channel from `grpc` or `grpc.aio` (same factory signatures) with our settings."""
        s = self._settings
        if s.credentials is None:
            return api.insecure_channel(s.target, options=list(s.options))
        return api.secure_channel(s.target, s.credentials, options=list(s.options))

    def counter(self, model: str) -> QueryCounter:
        """A snapshot of the queries sent for `model` (retries included)."""
        return self._ledger.counter(model)

    @property
    def total_queries(self) -> int:
        """Images sent over all models, the unit the budget is counted in."""
        return self._ledger.total()

    def _attempts(self, model: str | None = None, images: int = 0, **kw: Any) -> _Attempts:
        return _Attempts(self._settings, self._ledger, model, images, **kw)

    @staticmethod
    def _model_info(
        meta: pb.ModelMetadataResponse, config: pb.ModelConfigResponse, version: str
    ) -> ModelInfo:
        if len(meta.inputs) != 1 or len(meta.outputs) != 1:
            raise ConfigError(f"model {meta.name!r} must have one input and one output")
        shape = _codec.dims(meta.inputs[0].shape)
        if len(shape) != 3:
            raise ConfigError(f"model {meta.name!r} takes {list(shape)}, not images [C, H, W]")
        versions = sorted(meta.versions, key=lambda v: int(v) if v.isdigit() else -1)
        return ModelInfo(
            name=meta.name, version=version or (versions[-1] if versions else ""),
            input_shape=(shape[0], shape[1], shape[2]),
            num_classes=_codec.dims(meta.outputs[0].shape)[-1],
            max_batch_size=max(1, config.config.max_batch_size), labels=[],
            input_name=meta.inputs[0].name, output_name=meta.outputs[0].name,
        )  # fmt: skip

    @staticmethod
    def _label_request(
        info: ModelInfo, config: pb.ModelConfigResponse, version: str
    ) -> pb.ModelInferRequest | None:
        """One zero image classified over every class: the only way labels come back (None
        when the config names no label file)."""
        if not any(o.label_filename for o in config.config.output):
            return None
        zero = np.zeros((1, *info.input_shape), np.float32)
        return _codec.infer_request(
            info.name, version, zero, info.input_name, info.output_name, info.num_classes
        )

    @staticmethod
    def _with_labels(info: ModelInfo, response: pb.ModelInferResponse) -> ModelInfo:
        labels = _decoded(_codec.decode_labels, response, info.num_classes)
        return ModelInfo(**{**info.__dict__, "labels": labels})

    def _requests(
        self, info: ModelInfo, images: np.ndarray, version: str, k: int
    ) -> list[tuple[int, pb.ModelInferRequest]]:
        """Validate the images and cut them into max_batch_size requests; reserves the budget."""
        try:
            x = np.asarray(images, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"images must be convertible to float32: {exc}") from exc
        c, h, w = info.input_shape
        if x.ndim != 4 or x.shape[1:] != info.input_shape or x.shape[0] < 1:
            raise ConfigError(
                f"model {info.name!r} takes images as float32 [N, {c}, {h}, {w}] with N >= 1, "
                f"got shape {list(x.shape)}"
            )
        if not np.isfinite(x).all():
            raise ConfigError("images hold NaN or Inf; pixels must be finite")
        size = info.max_batch_size
        chunks = [x[i : i + size] for i in range(0, len(x), size)]
        requests = [
            (len(chunk), _codec.infer_request(
                info.name, version, chunk, info.input_name, info.output_name, k))
            for chunk in chunks
        ]  # fmt: skip
        self._ledger.reserve(len(x))
        return requests

    @staticmethod
    def _check_k(k: int) -> None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")

    @staticmethod
    def _first_error(outcomes: Sequence[object]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
