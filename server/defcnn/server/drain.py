"""What a draining server needs: when calls last arrived, so it keeps its port open until
callers are quiet (they get a clear UNAVAILABLE meanwhile); and a way to end open streams
that are only waiting for their next message.

gRPC cancels the calls that have reached its transport but no handler yet when the port
closes: their callers see CANCELLED, not UNAVAILABLE. Callers that never go quiet are
therefore held on calls a handler already has while the port closes (`Intake.hold` in
handlers.py), and answered once it is closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from defcnn.server.errors import Unavailable

T = TypeVar("T")


class ArrivalClock:
    """Records the time of the most recent call of the inference service (its handlers
    call `arrived`: an interceptor would cost every call an extra coroutine)."""

    def __init__(self) -> None:
        self.last_arrival = time.monotonic()

    def arrived(self) -> None:
        self.last_arrival = time.monotonic()

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
