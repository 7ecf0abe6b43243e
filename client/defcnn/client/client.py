"""What the blocking client (`sync.py`) and the asyncio one (`aio.py`) share, written once.

Settings and channel options, the query ledger (counts and budget), input validation and
chunking, and the retry policy (`_Attempts`). The two clients differ only in how they
wait: threads and `time.sleep` there, tasks and `asyncio.sleep` in `aio.py`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import numpy as np

from defcnn.client import _codec
from defcnn.client.errors import ClientError, QueryBudgetExceeded
from defcnn.client.spec import EndpointSpec, SpecOverrides, build_spec, needs_probe
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

    @classmethod
    def from_spec(cls, spec: EndpointSpec) -> ModelInfo:
        """The legacy view of an `EndpointSpec` (the one source of truth); num_classes is 0
        for a label-only endpoint that does not say how many classes it has."""
        return cls(
            name=spec.model, version=spec.version, input_shape=spec.input_shape,
            num_classes=spec.num_classes or 0, max_batch_size=spec.request_batch,
            labels=list(spec.labels), input_name=spec.input_name, output_name=spec.output_name,
        )  # fmt: skip


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
    # The REST binding's base URL (http[s]://HOST[:PORT][/PREFIX]); None speaks gRPC.
    rest_url: str | None = None
    # (CA, client certificate, key) paths for the REST binding's TLS (httpx wants files).
    tls_files: tuple[str | None, str | None, str | None] = (None, None, None)
    max_message: int = 64 * 1024 * 1024


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


_URL_FORMS = "HOST:PORT, grpc://HOST:PORT, grpcs://HOST:PORT or http[s]://HOST[:PORT][/PREFIX]"


def _rest_url(url: str, tls: bool) -> str:
    """The REST base URL without a trailing slash; TLS options turn http:// into https://,
    as they turn a bare HOST:PORT into TLS for gRPC."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or out of range
        port_ok = False
    if not (parts.hostname and port_ok) or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"url must be {_URL_FORMS}: {url!r}")
    scheme = "https" if tls else parts.scheme
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _settings(url: str, **kw: Any) -> _Settings:
    """Validate the constructor's arguments once, for both clients."""
    target, tls = url, bool(kw["tls"])
    rest_url = None
    if url.startswith(("http://", "https://")):
        rest_url = _rest_url(url, tls or bool(kw["tls_ca"] or kw["tls_cert"]))
        target, tls = urlsplit(rest_url).netloc, rest_url.startswith("https://")
    for scheme, secure in (("grpc://", False), ("grpcs://", True)):
        if url.startswith(scheme):
            target, tls = url[len(scheme) :], tls or secure
    host, _, port = target.rpartition(":")
    if rest_url is None and ("://" in target or not host or not port.isdigit()):
        raise ConfigError(f"url must be {_URL_FORMS}: {url!r}")
    for name, low in (("retries", 0), ("concurrency", 1), ("max_message_mb", 1)):
        if kw[name] < low:
            raise ConfigError(f"{name} must be >= {low}, got {kw[name]}")
    if not kw["timeout"] > 0 or kw["backoff"] < 0:
        raise ConfigError(f"timeout must be > 0 and backoff >= 0: {kw['timeout']}, {kw['backoff']}")
    if (kw["tls_cert"] is None) != (kw["tls_key"] is None):
        raise ConfigError("tls_cert and tls_key go together (a client certificate and its key)")
    credentials = None
    if rest_url is not None:  # the REST transport loads the files; refuse unreadable ones here
        _read(kw["tls_ca"], "TLS CA")
        _read(kw["tls_cert"], "TLS certificate")
        _read(kw["tls_key"], "TLS key")
    elif tls or kw["tls_ca"] or kw["tls_cert"]:
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
        float(kw["backoff"]), int(kw["concurrency"]), rest_url,
        (kw["tls_ca"], kw["tls_cert"], kw["tls_key"]), size,
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
        self._specs: dict[tuple[str, str, SpecOverrides], EndpointSpec] = {}
        self._chosen: dict[tuple[str, str], EndpointSpec] = {}  # the last spec() per model
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

    def _known(self, model: str, version: str) -> EndpointSpec | None:
        """The spec a call on `model` uses: the last `spec()` built for it (with its
        overrides); None when the caller must build the plain one first."""
        return self._chosen.get((model, version))

    def _keep(self, key: tuple[str, str, SpecOverrides], spec: EndpointSpec) -> EndpointSpec:
        self._specs[key] = spec
        self._chosen[key[:2]] = spec
        return spec

    @staticmethod
    def _no_config(exc: ClientError) -> bool:
        """Servers without ModelConfig (KServe, MLServer) answer this; the spec goes without."""
        return exc.code in ("UNIMPLEMENTED", "NOT_FOUND")

    @staticmethod
    def _probe(
        meta: pb.ModelMetadataResponse, config: pb.ModelConfigResponse | None, version: str,
        overrides: SpecOverrides,
    ) -> tuple[EndpointSpec, pb.ModelInferRequest | None]:  # fmt: skip
        """The spec as far as metadata and config go, and the one 1-image probe query (a zero
        image) still needed, or None: classified over every class when the config names a
        label file (labels and scores in one answer), else a plain query when only the
        answer can tell logits from probabilities."""
        unknown = needs_probe(meta, overrides)
        assumed = dataclasses.replace(overrides, output_kind="logits") if unknown else overrides
        draft = build_spec(meta, config, assumed, version=version)
        zero = np.zeros((1, *draft.input_shape), np.float32)
        labelled = config is not None and any(
            o.label_filename for o in config.config.output if o.name == draft.output_name
        )
        if labelled and draft.score_based and draft.num_classes:
            return draft, _codec.infer_request(draft, zero, draft.num_classes)
        return draft, (_codec.infer_request(draft, zero) if unknown else None)

    @staticmethod
    def _probed(
        meta: pb.ModelMetadataResponse, config: pb.ModelConfigResponse | None, version: str,
        overrides: SpecOverrides, draft: EndpointSpec, request: pb.ModelInferRequest | None,
        response: pb.ModelInferResponse | None,
    ) -> EndpointSpec:  # fmt: skip
        """The final spec from the probe's answer (the draft when there was no probe)."""
        if request is None or response is None:
            return draft
        labels: list[str] = []
        if _codec.CLASSIFICATION in request.outputs[0].parameters:
            assert draft.num_classes is not None  # _probe classifies only when it is known
            labels, row = _decoded(_codec.decode_probe, response, draft.num_classes)
        else:
            row = _decoded(_codec.decode_scores, response, draft)[0]
        scores = row if needs_probe(meta, overrides) else None
        return build_spec(meta, config, overrides, version=version, scores=scores, labels=labels)

    def _requests(
        self, spec: EndpointSpec, images: np.ndarray, k: int
    ) -> list[tuple[int, pb.ModelInferRequest]]:
        """Validate the images and cut them into max_batch_size requests; reserves the budget."""
        x = _codec.check_images(spec, images)
        size = spec.request_batch
        chunks = [x[i : i + size] for i in range(0, len(x), size)]
        requests = [(len(chunk), _codec.infer_request(spec, chunk, k)) for chunk in chunks]
        self._ledger.reserve(len(x))
        return requests

    @staticmethod
    def _need_scores(spec: EndpointSpec, kind: str | None = None) -> None:
        """Refuse, before sending anything, a call the endpoint's output cannot answer."""
        if not spec.score_based:
            raise ConfigError(
                f"model {spec.model!r} answers only labels (output {spec.output_name!r}): "
                "scores need a logits or probabilities output"
            )
        if kind is not None and spec.output_kind != kind:
            raise ConfigError(
                f"model {spec.model!r} answers {spec.output_kind}, not {kind}: use scores()"
            )

    @staticmethod
    def _scores(spec: EndpointSpec, responses: Sequence[pb.ModelInferResponse]) -> np.ndarray:
        return np.concatenate([_decoded(_codec.decode_scores, r, spec) for r in responses])

    @staticmethod
    def _labels(spec: EndpointSpec, responses: Sequence[pb.ModelInferResponse]) -> np.ndarray:
        if spec.score_based:
            return _ClientBase._scores(spec, responses).argmax(axis=1).astype(np.int64)
        return np.concatenate([_decoded(_codec.decode_label_output, r, spec) for r in responses])

    @staticmethod
    def _probabilities(spec: EndpointSpec, scores: np.ndarray) -> np.ndarray:
        return scores if spec.output_kind == "probabilities" else _codec.softmax(scores)

    @staticmethod
    def _check_k(k: int) -> None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")

    @staticmethod
    def _first_error(outcomes: Sequence[object]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
