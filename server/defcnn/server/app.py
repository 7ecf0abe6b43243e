"""Assemble and run the server: repository, servicer, health, reflection, auth, TLS,
metrics, and a graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from defcnn.errors import ConfigError
from defcnn.protos import grpc_service_pb2
from defcnn.server.auth import BearerTokenInterceptor, load_token
from defcnn.server.drain import ArrivalClock
from defcnn.server.handlers import Intake, add_health_service, add_inference_service
from defcnn.server.health import SERVING, BoundedHealth
from defcnn.server.inflight import ByteBudget
from defcnn.server.ready import ModelState, ReadyFile, check_writable
from defcnn.server.repository import (
    FailedVersion,
    ModelRepository,
    ServingOptions,
    check_repository,
)
from defcnn.server.servicer import InferenceServicer
from defcnn.server.statistics import (
    Metrics,
    MetricsServer,
    bind_metrics_server,
    serve_in_thread,
)
from defcnn.tokens import read_credential_file

log = logging.getLogger("defcnn.server")
HOLD_S = 0.25  # at most, calls are held this long on each side of the port closing
FINAL_GRACE_S = 1.0  # of the grace period, kept for the calls in flight as the port closes
MIN_READERS = 4  # the byte budget always lets this many of the largest messages in
SAME_SIGNAL_S = 0.2  # a second signal sooner than this is the first one delivered twice
SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass(frozen=True)
class ServerSettings:
    """Everything `defcnn serve` takes."""

    model_repo: str
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int | None = 8002
    metrics_host: str = "127.0.0.1"
    serving: ServingOptions = field(default_factory=ServingOptions)
    auth_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    max_message_mb: int = 64
    max_inflight_mb: int = 256
    grace_s: float = 10.0
    drain_quiet_s: float = 0.25
    ready_file: str | None = None

    @property
    def max_message_bytes(self) -> int:
        """Every size check derives from max_message_mb: gRPC's limits both ways and the
        repository's refusal of a max batch that would not fit."""
        return self.max_message_mb * 2**20

    @property
    def max_inflight_bytes(self) -> int:
        return self.max_inflight_mb * 2**20


def _credentials(s: ServerSettings) -> grpc.ServerCredentials | None:
    if not (s.tls_cert or s.tls_key or s.tls_ca):
        return None
    if not (s.tls_cert and s.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key (and --tls-ca for mutual TLS)")
    cert = read_credential_file(s.tls_cert, flag="--tls-cert")
    key = read_credential_file(s.tls_key, flag="--tls-key")
    ca = read_credential_file(s.tls_ca, flag="--tls-ca") if s.tls_ca else None
    _check_pem(s.tls_cert, s.tls_key, s.tls_ca)
    return grpc.ssl_server_credentials([(key, cert)], ca, require_client_auth=ca is not None)


def _check_pem(cert: str, key: str, ca: str | None) -> None:
    """Load the TLS files as a TLS library would, so that a bad one is named as such
    (gRPC would only say that it cannot bind the port)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")  # never a prompt
        if ca:
            context.load_verify_locations(ca)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"--tls-cert {cert}, --tls-key {key}{f', --tls-ca {ca}' if ca else ''}: not a "
            f"certificate and its private key in PEM ({exc})"
        ) from None


# Connections: keepalive pings find dead peers, a connection idle for 5 minutes is closed
# (clients reconnect transparently), and one that never completes its handshake is dropped.
_CONNECTION_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_concurrent_streams", 1_000),
    ("grpc.so_reuseport", 0),
    # Without BDP probing, a stream's window stays at the lookahead until its handler asks
    # for the message (the transport then opens it to the message's length), so a body the
    # server has not reserved room for waits in the client, not in our memory. Measured
    # with 32 concurrent 48 MiB calls and a 128 MiB budget: peak 630-790 MiB above the
    # baseline with these two, 700-1590 MiB without them (BDP probing is what matters).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 65536),
]


class InferenceServer:
    """One running server; `start` returns once it serves, `stop` drains it."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="infer")
        self.codec_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="codec")
        self.repository = ModelRepository(
            Path(settings.model_repo), settings.serving, self.executor, self.metrics,
            max_message_bytes=settings.max_message_bytes,
        )  # fmt: skip
        self.metrics.watch_queues(self.repository.queue_depths)
        self.servicer = InferenceServicer(self.repository, self.metrics, self.codec_executor)
        self.health = BoundedHealth(("", SERVICE))
        # Sized in `start`, from the largest request a model takes: at least MIN_READERS
        # of those can be read at once, so that a few callers who stall mid-body (until
        # the read limit cuts them off) cannot hold up everyone else.
        self.budget = ByteBudget(settings.max_inflight_bytes)
        self.arrivals = ArrivalClock()
        self.intake = Intake(
            self.budget, settings.max_message_bytes, self.codec_executor, arrivals=self.arrivals
        )
        self.closing_streams = asyncio.Event()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_server: MetricsServer | None = None

    async def start(self) -> bool:
        """Bind, load every model, then serve; False when `stop_loading` was set while the
        models loaded (a signal during start-up): then nothing was ever served."""
        s = self.settings
        check_repository(Path(s.model_repo))
        token = load_token(s.auth_token_file)
        credentials = _credentials(s)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if token:
            interceptors.append(BearerTokenInterceptor(token))
        # Requests larger than any model takes are refused by gRPC from their length prefix,
        # before their bodies arrive; every call reserves this much before its body is read.
        receive = self.repository.largest_request()
        self.intake.max_message_bytes = receive
        self.budget.limit = max(s.max_inflight_bytes, MIN_READERS * receive)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", receive),
                ("grpc.max_send_message_length", s.max_message_bytes),
                *_CONNECTION_OPTIONS,
            ],
        )
        add_inference_service(self.servicer, server, self.closing_streams, self.intake)
        add_health_service(self.health, server, self.intake)
        reflection.enable_server_reflection(
            [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server,
        )  # fmt: skip
        address = f"{s.host}:{s.port}"
        try:
            self.port = (
                server.add_secure_port(address, credentials) if credentials
                else server.add_insecure_port(address)
            )  # fmt: skip
        except RuntimeError as exc:  # grpc's "Failed to bind": the port is taken or refused
            raise ConfigError(f"cannot bind {address} (in use, or not an address here)") from exc
        if self.port == 0:
            raise ConfigError(f"cannot bind {address}")
        if s.metrics_port is not None:  # bound before loading: a taken port fails at once
            try:
                self._metrics_server = bind_metrics_server(
                    self.metrics, s.metrics_host, s.metrics_port, token
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot bind the metrics endpoint {s.metrics_host}:{s.metrics_port}: "
                    f"{exc.strerror or exc} (--metrics-port, --metrics-host; -1 turns it off)"
                ) from None
            self.metrics_port = self._metrics_server.server_port
        await server.start()
        self._server = server
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.repository.load_all)  # load + warm-up, off-loop
        if self.repository.stop_loading.is_set():
            return False
        self.repository.start()
        if self._metrics_server is not None:
            serve_in_thread(self._metrics_server)
        self.servicer.accepting = True
        self.health.set_all(SERVING)
        return True

    async def stop(self) -> None:
        """Drain within the grace period: refuse new work, answer every accepted request,
        keep refusing until callers are quiet, and only then close the listener."""
        deadline = time.monotonic() + self.settings.grace_s
        self.servicer.accepting = False
        self.health.close()  # probes see NOT_SERVING; Watch streams end now
        try:  # queued requests run now, without waiting out their batch window
            await asyncio.wait_for(self.repository.close(), self.settings.grace_s)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            log.warning("drain: queued requests still running after %.1fs", self.settings.grace_s)
        self.closing_streams.set()  # idle streams end with UNAVAILABLE, not CANCELLED at grace
        if self._server is not None:
            # Callers that never go quiet must not use up the grace: the last part of it is
            # kept for the calls in flight when the port closes, which gRPC would otherwise
            # cancel at once (their callers would see CANCELLED instead of our UNAVAILABLE).
            keep = min(FINAL_GRACE_S, self.settings.grace_s / 2)
            await self.arrivals.quiet(self.settings.drain_quiet_s, deadline - keep)
            # gRPC cancels the calls that reached it but no handler yet when the port closes.
            # So callers are first held on calls a handler has (a closed-loop caller then
            # sends nothing new), the port closes, and only then are they answered.
            self.intake.hold()
            await asyncio.sleep(min(HOLD_S, keep / 4))
            closing = asyncio.ensure_future(
                self._server.stop(max(0.0, deadline - time.monotonic()))
            )
            await asyncio.sleep(min(HOLD_S, keep / 4))
            self.intake.let_go()
            await closing
        if self._metrics_server is not None:
            self._metrics_server.shutdown_and_close()
        self.executor.shutdown(wait=True)
        self.codec_executor.shutdown(wait=True)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def ready_document(self) -> ReadyFile:
        """What the ready file says: the bound ports, this process and every model version."""
        models = tuple(
            ModelState(mv.name, mv.version, False, mv.reason)
            if isinstance(mv, FailedVersion) else ModelState(mv.name, mv.version, True)
            for mv in self.repository.all_versions()
        )  # fmt: skip
        return ReadyFile(
            host=self.settings.host, port=self.port, metrics_port=self.metrics_port or None,
            pid=os.getpid(), tls=bool(self.settings.tls_cert), models=models,
        )  # fmt: skip

    def ready_line(self) -> str:
        models = [
            f"{mv.name}/{mv.version}{' (NOT READY)' if isinstance(mv, FailedVersion) else ''}"
            for mv in self.repository.all_versions()
        ]
        metrics = f", metrics on :{self.metrics_port}" if self.metrics_port else ""
        tls = "TLS" if self.settings.tls_cert else "plaintext"
        return (
            f"defcnn serve: ready on {self.settings.host}:{self.port} ({tls}{metrics}); "
            f"models: {', '.join(models) or 'none'}"
        )


def _exit_now(code: int) -> None:
    """Leave at once, without waiting for threads (a model still loading in C code)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def serve(settings: ServerSettings) -> int:
    """Run until SIGTERM or SIGINT, then drain; returns the exit code. A signal while the
    models load stops the loading (the server never announces ready); a second signal
    exits at once, without draining."""
    ready_file = Path(settings.ready_file) if settings.ready_file else None
    if ready_file is not None:
        check_writable(ready_file)
    server = InferenceServer(settings)
    written = False
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    first: list[float] = []

    def on_signal(signum: int) -> None:
        if first:
            if time.monotonic() - first[0] < SAME_SIGNAL_S:
                return  # one request delivered twice (as `timeout` does: to us and our group)
            log.warning("second %s: exiting now, without draining", signal.Signals(signum).name)
            _exit_now(128 + signum)
        first.append(time.monotonic())
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()
        server.repository.stop_loading.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal while loading: give the loader the grace period
            try:
                await asyncio.wait_for(asyncio.shield(starting), settings.grace_s)
            except asyncio.TimeoutError:
                log.warning("model loading did not stop within %.1fs; exiting", settings.grace_s)
                _exit_now(1)
        if starting.result():
            if ready_file is not None:
                await loop.run_in_executor(None, server.ready_document().write, ready_file)
                written = True
            print(server.ready_line(), flush=True)
            await stopping
            log.info("draining in-flight requests")
        else:
            log.info("stopped while loading models; nothing was served")
    finally:
        stopping.cancel()
        if ready_file is not None and written:  # a stopping server is no longer ready
            with contextlib.suppress(OSError):
                ready_file.unlink(missing_ok=True)
        await server.stop()
    print("defcnn serve: stopped", file=sys.stderr, flush=True)
    return 0


def configure_logging(level: str = "INFO") -> None:
    """Structured one-line logs: time, level, logger, message as key=value. `level` is a
    level name in any case ("debug", "INFO")."""
    wanted = logging.getLevelName(level.upper())
    if not isinstance(wanted, int):
        raise ConfigError(f"unknown log level {level!r}")
    logging.basicConfig(  # other libraries' debug output (gRPC logs every call) stays out
        level=max(wanted, logging.INFO),
        format='ts=%(asctime)s level=%(levelname)s logger=%(name)s msg="%(message)s"',
        stream=sys.stderr,
    )
    logging.getLogger("defcnn").setLevel(wanted)
