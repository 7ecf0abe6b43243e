"""What a draining server needs from gRPC: when calls last arrived, so it keeps its listener
open until callers are quiet and callers racing the shutdown get a clear UNAVAILABLE; and a
way to end open streams that are only waiting for their next message.

gRPC cancels calls that reached the transport but were not yet handed to a handler when
`server.stop` runs: the client sees CANCELLED, not UNAVAILABLE (grpc/grpc#41785). Until then,
every call is handed to the servicer, which refuses it with UNAVAILABLE while draining.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from defcnn.server.errors import Unavailable

T = TypeVar("T")


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


async def until_set(event: asyncio.Event, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """`items` until `event` is set: a message already waiting is still passed on, but once
    `event` is set the wait for the next one ends with Unavailable."""
    stop = asyncio.ensure_future(event.wait())
    following: asyncio.Future[T] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(items))
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                raise Unavailable("the server is shutting down")
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        if following is not None:
            following.cancel()
