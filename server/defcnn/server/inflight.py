"""A bound on the request bytes the server holds at once, shared by every caller.

gRPC receives a whole message before a handler sees it, so a burst of large requests can
fill the memory before any check runs. Each call therefore reserves the largest message it
could send before its body is read, keeps only what it really holds once the body is in,
and gives that back when it has been answered. Waiters are served first come, first
served; one that waits longer than its limit is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from defcnn.server.errors import ResourceExhausted


@dataclass(eq=False)
class _Waiter:
    size: int
    future: asyncio.Future[None]


class ByteBudget:
    """At most `limit` bytes reserved at once; a single reservation may be up to `limit`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget needs a positive limit, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiters: deque[_Waiter] = deque()

    async def acquire(self, size: int, timeout_s: float) -> None:
        """Reserve `size` bytes (at most `limit`), waiting up to `timeout_s` seconds."""
        size = min(size, self.limit)
        if not self._waiters and self.used + size <= self.limit:
            self._take(size)
            return
        waiter = _Waiter(size, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
            if waiter.future.done():  # granted as the wait ended: give it back
                self.release(size)
            else:
                self._waiters.remove(waiter)
                self._wake()
            raise ResourceExhausted(
                f"the server holds its limit of {self.limit / 2**20:.0f} MiB of requests; "
                "retry later"
            ) from None
        except BaseException:  # cancelled: the client went away
            if waiter.future.done():
                self.release(size)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._wake()
            raise

    def shrink(self, reserved: int, kept: int) -> int:
        """Keep `kept` of a reservation of `reserved` bytes; returns what is still held."""
        reserved = min(reserved, self.limit)
        kept = min(kept, reserved)
        self.release(reserved - kept)
        return kept

    def release(self, size: int) -> None:
        self.used -= min(size, self.limit)
        self._wake()

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0].size <= self.limit:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                self._take(waiter.size)
                waiter.future.set_result(None)
