"""Per-model-version counters (Triton's ModelStatistics) and Prometheus metrics.

Prometheus names follow Triton's where they exist (nv_inference_*, as counters without
prometheus_client's `_total` suffix, exactly as Triton prints them), plus histograms of
latency and batch size.
"""

from __future__ import annotations

import contextlib
import copy
import hmac
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

_LABELS = ("model", "version")
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _us(ns: int) -> int:
    return ns // 1000


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class VersionStats:
    """Triton's InferStatistics for one model version, plus batch statistics."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)


# Triton's counter names, help texts, and how to read each from a VersionStats.
_TRITON_COUNTERS: tuple[tuple[str, str, Callable[[VersionStats], int]], ...] = (
    ("nv_inference_request_success", "Successful inference requests", lambda s: s.success.count),
    ("nv_inference_request_failure", "Failed inference requests", lambda s: s.fail.count),
    ("nv_inference_count", "Inferences performed (images)", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Batch executions", lambda s: s.execution_count),
    (
        "nv_inference_request_duration_us", "Cumulative request duration",
        lambda s: _us(s.success.ns + s.fail.ns),
    ),
    ("nv_inference_queue_duration_us", "Cumulative queue duration", lambda s: _us(s.queue.ns)),
    (
        "nv_inference_compute_infer_duration_us", "Cumulative compute duration",
        lambda s: _us(s.compute_infer.ns),
    ),
)  # fmt: skip


# (name, help, index into the (queued now, most ever queued) pair)
_QUEUE_GAUGES = (
    ("nv_inference_pending_request_count", "Requests waiting in the queue", 0),
    ("defcnn_queue_max_depth", "Most requests ever waiting at once (bounded by the queue)", 1),
)


class Metrics:
    """All counters of a server; thread-safe. The VersionStats are the source of truth:
    ModelStatistics and the Prometheus counters are both rendered from them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, int], VersionStats] = {}
        self._depths: Callable[[], dict[tuple[str, int], tuple[int, int]]] = dict
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "defcnn_request_latency_seconds", "Request latency (end to end in the server)",
            _LABELS, buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "defcnn_batch_size", "Executed batch sizes", _LABELS,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )  # fmt: skip

    def watch_queues(self, depths: Callable[[], dict[tuple[str, int], tuple[int, int]]]) -> None:
        """Where to read each version's (queued now, most ever queued) when rendering."""
        self._depths = depths

    def snapshot(self) -> dict[tuple[str, int], VersionStats]:
        with self._lock:
            return {k: copy.deepcopy(v) for k, v in self._stats.items()}

    def _get(self, model: str, version: int) -> VersionStats:
        return self._stats.setdefault((model, version), VersionStats())

    def request_ok(
        self, model: str, version: int, *, total_ns: int, queue_ns: int, compute_ns: int, rows: int
    ) -> None:
        with self._lock:
            s = self._get(model, version)
            s.success.add(total_ns)
            s.queue.add(queue_ns)
            s.compute_infer.add(compute_ns)
            s.compute_input.add(0)
            s.compute_output.add(0)
            s.inference_count += rows
            s.last_inference_ms = int(time.time() * 1000)
        self.latency.labels(model, str(version)).observe(total_ns / 1e9)

    def request_failed(self, model: str, version: int, *, total_ns: int) -> None:
        with self._lock:
            self._get(model, version).fail.add(total_ns)

    def batch_executed(self, model: str, version: int, size: int, compute_ns: int) -> None:
        with self._lock:
            s = self._get(model, version)
            s.execution_count += 1
            s.batches.setdefault(size, Duration()).add(compute_ns)
        self.batch_size.labels(model, str(version)).observe(size)

    def render(self) -> bytes:
        """Prometheus text: Triton's counters under Triton's exact names, then histograms."""
        snapshot = self.snapshot()
        lines = []
        for name, help_text, value in _TRITON_COUNTERS:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            for (model, version), stats in sorted(snapshot.items()):
                lines.append(f"{name}{_labels(model, version)} {value(stats)}")
        depths = sorted(self._depths().items())
        for name, help_text, k in _QUEUE_GAUGES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for (model, version), values in depths:
                lines.append(f"{name}{_labels(model, version)} {values[k]}")
        return ("\n".join(lines) + "\n").encode() + generate_latest(self.registry)


def _escape(value: str) -> str:
    """A label value in the Prometheus text format: backslash, quote and newline escaped
    (a model folder may be named with any of them)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(model: str, version: int) -> str:
    return f'{{model="{_escape(model)}",version="{version}"}}'


class MetricsServer(ThreadingHTTPServer):
    """At most `max_connections` connections served at once (more are closed at once), each
    with a socket timeout, so half-open connections cannot pile up threads."""

    daemon_threads = True
    max_connections = 16

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, handler)

    serving = False

    def shutdown_and_close(self) -> None:
        """Stop serving (if it started) and release the port."""
        if self.serving:
            self.shutdown()
        self.server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def bind_metrics_server(
    metrics: Metrics, host: str, port: int, token: str | None = None, timeout_s: float = 10.0
) -> MetricsServer:
    """Bind GET /metrics (port 0: any free port), not yet serving: `serve_in_thread` starts
    it. With `token`, a scrape needs `Authorization: Bearer <token>` like the gRPC port."""
    expected = f"Bearer {token}".encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # a connection that sends nothing is closed after this

        def setup(self) -> None:
            super().setup()
            # ... and one that trickles a byte at a time is closed after this in all
            self._cutoff = threading.Timer(timeout_s, self._cut_off)
            self._cutoff.daemon = True
            self._cutoff.start()

        def _cut_off(self) -> None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def finish(self) -> None:
            self._cutoff.cancel()
            with contextlib.suppress(OSError):
                super().finish()

        def do_GET(self) -> None:
            if expected is not None:
                given = (self.headers.get("Authorization") or "").encode()
                if not hmac.compare_digest(given, expected):
                    self.send_error(401, "missing or invalid bearer token")
                    return
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    return MetricsServer((host, port), Handler)


def serve_in_thread(server: MetricsServer) -> None:
    server.serving = True
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
