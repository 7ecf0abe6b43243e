"""DynamicBatcher's contract on its own: queuing, limits, deadlines, cancellation, fan-out.

The backend is a small numpy function that records every batch it is given and can be held
at a gate, so a test decides what is queued while a batch computes. Nothing here asserts on
elapsed time: every wait is for an event, and bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np
import pytest

from defcnn.server.batching import BatchRecord, DynamicBatcher
from defcnn.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable, status_of

T = TypeVar("T")
WAIT_S = 30.0  # bound on every wait; only reached when something is broken


class Backend:
    """One logit per image: twice the sum of its values; records every batch it computes.
    While `gate` is clear, a call blocks (in the executor thread) after setting `entered`."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on_call = fail_on_call

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(images.copy())
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise RuntimeError("test gate never opened")
        if self.fail_on_call == len(self.batches):
            raise RuntimeError("backend exploded")
        return 2 * images.reshape(len(images), -1).sum(axis=1, keepdims=True)

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def images(n: int, value: float) -> np.ndarray:
    """n images of 2 values each, all equal to `value`, so every row says whose it is."""
    return np.full((n, 2), value, dtype=np.float32)


def run_with(
    backend: Backend,
    body: Callable[[DynamicBatcher], Awaitable[T]],
    *,
    max_batch_size: int = 4,
    max_delay_s: float = 0.0,
    max_queue: int = 16,
    records: list[BatchRecord] | None = None,
) -> T:
    """Run `body` with a started batcher on a fresh event loop; the batcher is closed after."""

    async def main() -> T:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = DynamicBatcher(
                backend, max_batch_size=max_batch_size, max_delay_s=max_delay_s,
                max_queue=max_queue, executor=executor,
                on_batch=records.append if records is not None else None,
            )  # fmt: skip
            batcher.start()
            try:
                return await asyncio.wait_for(body(batcher), WAIT_S)
            finally:
                backend.gate.set()
                await asyncio.wait_for(batcher.close(), WAIT_S)

    return asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded by the caller's wait_for)."""
    while not condition():
        await asyncio.sleep(0.001)


async def entered(backend: Backend) -> None:
    """Wait, without blocking the loop, until the backend is computing a batch."""
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, backend.entered.wait, WAIT_S)
    backend.entered.clear()


async def hold_first(batcher: DynamicBatcher, backend: Backend) -> asyncio.Task:
    """Start one 1-row request and keep it computing (the gate closed), so whatever is
    submitted next stays queued until the test opens the gate."""
    backend.gate.clear()
    first = asyncio.ensure_future(batcher.submit(images(1, -1.0)))
    await entered(backend)
    return first


def test_results_go_back_in_order_to_their_own_callers() -> None:
    backend = Backend()

    async def body(batcher: DynamicBatcher) -> None:
        first = await hold_first(batcher, backend)
        sizes = [1, 2, 1]  # queued together behind the first: one batch of 4
        tasks = [asyncio.ensure_future(batcher.submit(images(n, float(i))))
                 for i, n in enumerate(sizes)]  # fmt: skip
        await until(lambda: batcher.depth == len(sizes))
        backend.gate.set()
        results = await asyncio.gather(*tasks)
        for i, (n, (rows, timing)) in enumerate(zip(sizes, results, strict=True)):
            np.testing.assert_array_equal(rows, np.full((n, 1), 4.0 * i, np.float32))
            assert timing.batch_size == sum(sizes)
        await first
        # the batch holds the requests in arrival order
        np.testing.assert_array_equal(backend.batches[1][:, 0], np.array([0, 1, 1, 2], np.float32))

    run_with(backend, body)
    assert backend.sizes == [1, 4]


def test_a_batch_never_exceeds_max_batch_size_and_keeps_fifo_order() -> None:
    backend = Backend()
    sizes = [3, 2, 1, 4, 1, 2, 2]

    async def body(batcher: DynamicBatcher) -> None:
        first = await hold_first(batcher, backend)
        tasks = [asyncio.ensure_future(batcher.submit(images(n, float(i))))
                 for i, n in enumerate(sizes)]  # fmt: skip
        await until(lambda: batcher.depth == len(sizes))
        with pytest.raises(ResourceExhausted, match="max_batch_size 4"):
            await batcher.submit(images(5, 9.0))  # larger than any batch: refused at once
        backend.gate.set()
        for i, (n, (rows, _)) in enumerate(zip(sizes, await asyncio.gather(*tasks), strict=True)):
            assert rows.shape == (n, 1) and (rows == 4.0 * i).all()
        await first

    run_with(backend, body, max_batch_size=4)
    # greedy in arrival order: a request that does not fit starts the next batch
    assert backend.sizes == [1, 3, 3, 4, 3, 2]
    assert all(size <= 4 for size in backend.sizes)
    order = np.concatenate([b[:, 0] for b in backend.batches[1:]])
    assert order.tolist() == [i for i, n in enumerate(sizes) for _ in range(n)]


def test_requests_wait_in_the_window_and_go_as_soon_as_the_batch_is_full() -> None:
    backend = Backend()

    async def body(batcher: DynamicBatcher) -> None:
        waiting = [asyncio.ensure_future(batcher.submit(images(1, float(i)))) for i in range(3)]
        await until(lambda: batcher.depth == 3)
        for _ in range(20):  # the loop runs, but the window (an hour) holds them
            await asyncio.sleep(0)
        assert backend.batches == [] and batcher.depth == 3
        last = await batcher.submit(images(1, 3.0))  # the fourth row fills the batch
        assert last[1].batch_size == 4
        await asyncio.gather(*waiting)

    run_with(backend, body, max_batch_size=4, max_delay_s=3600.0)
    assert backend.sizes == [4]


def test_a_part_batch_goes_when_the_window_ends() -> None:
    backend = Backend()

    async def body(batcher: DynamicBatcher) -> list[int]:
        # submitted in one loop turn, so all three are queued before the batcher looks
        results = await asyncio.gather(*(batcher.submit(images(1, 1.0)) for _ in range(3)))
        return [timing.batch_size for _, timing in results]

    assert run_with(backend, body, max_batch_size=8, max_delay_s=0.05) == [3, 3, 3]
    assert backend.sizes == [3]


def test_close_runs_what_is_queued_without_waiting_out_the_window_then_refuses() -> None:
    backend = Backend()

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = DynamicBatcher(
                backend, max_batch_size=8, max_delay_s=3600.0, max_queue=8, executor=executor
            )
            batcher.start()
            tasks = [asyncio.ensure_future(batcher.submit(images(1, 1.0))) for _ in range(2)]
            await until(lambda: batcher.depth == 2)
            await asyncio.wait_for(batcher.close(), WAIT_S)
            assert all(t.done() and t.exception() is None for t in tasks)
            with pytest.raises(Unavailable):
                await batcher.submit(images(1, 1.0))

    asyncio.run(main())
    assert backend.sizes == [2]


def test_a_deadline_that_expires_while_queued_fails_it_without_computing_it() -> None:
    backend = Backend()

    async def body(batcher: DynamicBatcher) -> None:
        first = await hold_first(batcher, backend)
        deadline = time.monotonic() + 0.01
        doomed = asyncio.ensure_future(batcher.submit(images(2, 5.0), deadline))
        kept = asyncio.ensure_future(batcher.submit(images(1, 6.0), None))
        await until(lambda: batcher.depth == 2 and time.monotonic() > deadline)
        backend.gate.set()
        with pytest.raises(DeadlineExceeded, match="expired while queued"):
            await doomed
        rows, _ = await kept
        assert rows.tolist() == [[24.0]]
        await first

    run_with(backend, body)
    assert backend.sizes == [1, 1]  # the expired request's two rows were never computed
    assert all((b != 5.0).all() for b in backend.batches)


def test_a_cancelled_waiting_request_is_dropped_before_it_is_computed() -> None:
    backend = Backend()

    async def body(batcher: DynamicBatcher) -> None:
        first = await hold_first(batcher, backend)
        cancelled = asyncio.ensure_future(batcher.submit(images(2, 7.0)))
        kept = asyncio.ensure_future(batcher.submit(images(1, 8.0)))
        await until(lambda: batcher.depth == 2)
        cancelled.cancel()
        backend.gate.set()
        assert (await kept)[0].tolist() == [[32.0]]
        assert cancelled.cancelled()
        await first

    run_with(backend, body)
    assert backend.sizes == [1, 1]
    assert all((b != 7.0).all() for b in backend.batches)


def test_a_full_queue_refuses_at_once_with_resource_exhausted() -> None:
    backend = Backend()

    async def body(batcher: DynamicBatcher) -> None:
        first = await hold_first(batcher, backend)  # computing: not in the queue
        queued = [asyncio.ensure_future(batcher.submit(images(1, float(i)))) for i in range(2)]
        await until(lambda: batcher.depth == 2)
        with pytest.raises(ResourceExhausted, match="queue full") as refused:
            await batcher.submit(images(1, 9.0))
        assert status_of(refused.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert batcher.max_depth == 2
        backend.gate.set()
        await asyncio.gather(first, *queued)  # the queued ones are still answered

    run_with(backend, body, max_queue=2)
    assert all((b != 9.0).all() for b in backend.batches)


def test_a_failing_batch_fails_every_request_in_it_and_no_other() -> None:
    backend = Backend(fail_on_call=2)
    records: list[BatchRecord] = []

    async def body(batcher: DynamicBatcher) -> None:
        first = await hold_first(batcher, backend)
        in_batch = [asyncio.ensure_future(batcher.submit(images(n, 1.0))) for n in (1, 2)]
        await until(lambda: batcher.depth == 2)
        backend.gate.set()
        outcomes = await asyncio.gather(*in_batch, return_exceptions=True)
        assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in outcomes)
        assert outcomes[0] is outcomes[1]  # the same error, told to each waiter
        await first  # the batch before it was fine
        after = await batcher.submit(images(1, 3.0))  # and the batcher goes on
        assert after[0].tolist() == [[12.0]]

    run_with(backend, body, records=records)
    assert backend.sizes == [1, 3, 1]
    assert [(r.size, r.ok) for r in records] == [(1, True), (3, False), (1, True)]
