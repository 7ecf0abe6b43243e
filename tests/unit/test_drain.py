"""The drain's two pieces on their own: ending a stream's wait, and waiting for quiet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from defcnn.server.drain import ArrivalClock, until_set
from defcnn.server.errors import Unavailable


async def _queue_items(queue: asyncio.Queue[int | None]) -> AsyncIterator[int]:
    while (item := await queue.get()) is not None:
        yield item


def test_until_set_passes_items_then_ends_the_wait_when_set() -> None:
    async def run() -> tuple[list[int], bool]:
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        event = asyncio.Event()
        got: list[int] = []
        for i in (1, 2):
            queue.put_nowait(i)

        async def consume() -> None:
            async for item in until_set(event, _queue_items(queue)):
                got.append(item)

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)  # both consumed; now waiting for a third that never comes
        event.set()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(task, 5)
        return got, task.done()

    got, done = asyncio.run(run())
    assert got == [1, 2] and done


def test_until_set_ends_quietly_when_the_items_end() -> None:
    async def run() -> list[int]:
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        for i in (7, None):
            queue.put_nowait(i)
        return [i async for i in until_set(asyncio.Event(), _queue_items(queue))]

    assert asyncio.run(run()) == [7]


def test_quiet_waits_for_a_pause_in_arrivals_but_not_past_the_deadline() -> None:
    async def run() -> tuple[bool, float, float]:
        clock = ArrivalClock()

        async def arrive_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                clock.last_arrival = time.monotonic()
                await asyncio.sleep(0.01)

        arrivals = asyncio.ensure_future(arrive_for(0.3))
        await clock.quiet(0.1, deadline=time.monotonic() + 10)
        returned = time.monotonic()
        arrivals_over, pause = arrivals.done(), returned - clock.last_arrival
        clock.last_arrival = time.monotonic()
        start = time.monotonic()
        await clock.quiet(10, deadline=start + 0.1)
        return arrivals_over, pause, time.monotonic() - start

    arrivals_over, pause, capped = asyncio.run(run())
    assert arrivals_over and pause >= 0.1  # not before the arrivals stopped and a pause followed
    assert capped < 5  # the deadline wins over a long quiet period
