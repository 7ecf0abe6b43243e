"""Notes when calls arrive, so a draining server keeps its listener open until callers are
quiet, and callers racing the shutdown get a clear UNAVAILABLE.

gRPC cancels calls that reached the transport but were not yet handed to a handler when
`server.stop` runs: the client sees CANCELLED, not UNAVAILABLE (grpc/grpc#41785). Until then,
every call is handed to the servicer, which refuses it with UNAVAILABLE while draining.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc


class ArrivalClock(grpc.aio.ServerInterceptor):
    """Records the time of the most recent call, whatever its method."""

    def __init__(self) -> None:
        self.last_arrival = time.monotonic()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.last_arrival = time.monotonic()
        return await continuation(details)

    async def quiet(self, quiet_s: float, deadline: float) -> None:
        """Return once no call has arrived for `quiet_s` seconds, or at `deadline`."""
        while True:
            now = time.monotonic()
            wait = min(self.last_arrival + quiet_s, deadline) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)
