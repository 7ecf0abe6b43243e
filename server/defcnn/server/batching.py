"""Dynamic batching composed around a backend: a bounded queue, one future per request.

Requests wait at most ``max_delay_s`` for company; a batch never exceeds the model's
maximum. The backend runs in an executor thread, never on the event loop. Expired or
cancelled requests are dropped before they are computed, a full queue answers
RESOURCE_EXHAUSTED at once, and every caller gets exactly its own rows back. A failing
batch fails each of its requests with the same error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from defcnn.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, in nanoseconds, and the batch it rode in."""

    queue_ns: int
    compute_ns: int
    batch_size: int


@dataclass(eq=False)
class _Pending:
    images: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, Timing]]
    deadline: float | None  # time.monotonic() seconds
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchRecord:
    """One executed batch, for statistics."""

    size: int
    compute_ns: int
    ok: bool


class DynamicBatcher:
    """Gathers concurrent requests for one model version into batches."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        executor: Executor,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._executor = executor
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self.max_depth = 0  # the most requests ever queued at once (never above max_queue)

    @property
    def depth(self) -> int:
        """Requests waiting now (Triton's pending request count)."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(
        self, images: np.ndarray, deadline: float | None = None
    ) -> tuple[np.ndarray, Timing]:
        """Queue `images` [n, ...]; returns this request's rows of the output and its timing."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        if len(images) > self.max_batch_size:
            raise ResourceExhausted(
                f"batch of {len(images)} exceeds the model's max_batch_size {self.max_batch_size}"
            )
        if len(self._queue) >= self.max_queue:
            raise ResourceExhausted(f"queue full ({self.max_queue} requests); retry later")
        pending = _Pending(images, asyncio.get_running_loop().create_future(), deadline)
        if self.max_delay_s == 0 and self.idle and self._task is not None:
            return await self._run_now(pending)
        self._queue.append(pending)
        self.max_depth = max(self.max_depth, len(self._queue))
        self._wakeup.set()
        return await pending.future

    async def _run_now(self, pending: _Pending) -> tuple[np.ndarray, Timing]:
        """Nothing queued, nothing running and no window to wait for company: run this
        request at once, without the round trip through the worker task (a caller alone
        gains a loop iteration). The worker waits for it like for any batch."""
        if pending.deadline is not None and pending.deadline <= time.monotonic():
            raise DeadlineExceeded("deadline expired while queued")
        self._busy = True
        try:
            await self._execute([pending])
        finally:
            self._busy = False
            if self._queue:
                self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Refuse new requests, finish everything queued, then stop the worker."""
        self._closed = True
        while not self.idle:
            self._wakeup.set()
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _rows_queued(self) -> int:
        return sum(len(p.images) for p in self._queue)

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._busy:  # a request run at once by `submit`: batches go one at a time
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._queue[0].enqueued
            while self._rows_queued() < self.max_batch_size and not self._closed:
                remaining = oldest + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:  # the builtin only from Python 3.11
                    break
            batch = self._take()
            if batch:
                self._busy = True
                try:
                    await self._execute(batch)
                finally:
                    self._busy = False

    def _take(self) -> list[_Pending]:
        """Pop requests in order up to the batch limit, failing expired and skipping cancelled."""
        batch: list[_Pending] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled by the client
                self._queue.popleft()
                continue
            if head.deadline is not None and head.deadline <= now:
                self._queue.popleft()
                head.future.set_exception(DeadlineExceeded("deadline expired while queued"))
                continue
            if rows + len(head.images) > self.max_batch_size:
                break
            batch.append(self._queue.popleft())
            rows += len(head.images)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        start = time.perf_counter_ns()
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, images
            )
        except Exception as exc:  # one failure fails the whole batch, every waiter told
            if self._on_batch:
                self._on_batch(BatchRecord(len(images), time.perf_counter_ns() - start, False))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        compute = time.perf_counter_ns() - start
        if self._on_batch:
            self._on_batch(BatchRecord(len(images), compute, True))
        offset = 0
        for p in batch:
            rows = out[offset : offset + len(p.images)]
            offset += len(p.images)
            if not p.future.done():
                timing = Timing(start - p.enqueued_ns, compute, len(images))
                p.future.set_result((rows, timing))
