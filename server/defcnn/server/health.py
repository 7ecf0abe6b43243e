"""grpc.health.v1.Health for probes: open to every caller (it needs no token), so bounded.

grpcio's own servicer keeps one condition per service name any caller asks about, lets any
number of Watch streams stay open, and keeps them open through a drain until the grace
period ends. Here the services are the ones the server registered, at most `max_watches`
Watch streams are open at once (more get RESOURCE_EXHAUSTED), and `close` sends every
watcher NOT_SERVING and ends its stream at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = int  # a HealthCheckResponse.ServingStatus value
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class BoundedHealth(health_pb2_grpc.HealthServicer):
    """Health of a fixed set of services; everything starts NOT_SERVING."""

    def __init__(self, services: tuple[str, ...], max_watches: int = 64) -> None:
        self._status: dict[str, Status] = dict.fromkeys(services, NOT_SERVING)
        self.max_watches = max_watches
        self.watching = 0
        self._changed = asyncio.Event()
        self._closed = False

    def set_all(self, status: Status) -> None:
        """Every service to `status` (ignored once closed), waking the watchers."""
        if self._closed:
            return
        self._status = dict.fromkeys(self._status, status)
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """NOT_SERVING for good; every open Watch stream sends it and ends."""
        self.set_all(NOT_SERVING)
        self._closed = True

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self.watching >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watches} health Watch streams are open already; use Check",
            )
        self.watching += 1
        try:
            last = None
            while True:
                changed = self._changed
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if self._closed:
                    return
                await changed.wait()
        finally:
            self.watching -= 1
