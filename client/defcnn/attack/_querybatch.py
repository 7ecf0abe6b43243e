"""Running one ART attack per image in threads: a micro-batcher that sends the candidates of
all images in shared predict calls, and the random state each image's ART code runs with.

Why threads: ART's HopSkipJump, Boundary, SimBA, GeoDA and Sign-OPT loop over images
internally, one image to the end before the next, so one `generate` call sends one image's
candidates at a time (Square and SimBA: one candidate per call). With one thread per image,
every image's current candidates wait in the `Batcher` together and leave in one request.

Why results do not depend on how the threads interleave: ART draws from numpy's global
generator (every attack here) and Python's `random` (Square). Only one image runs ART code
at a time in the whole process, in turns that end when it waits for answers or finishes,
and each turn starts by seeding both generators from the image's seed and the turn's
number (`ImageTurn`). So each image draws the same numbers in the same order as it would
alone, whatever the other images do. ART code is plain Python and numpy on one small
image, so running one image's at a time costs little: the time that matters is the
endpoint's, and the GIL would serialise that code anyway.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class _Turns:
    """Whose turn it is to run ART code, in the whole process: one thread at a time, the
    others woken one by one in the order they became ready. (A plain lock wakes every
    answered thread at once to fight for it and for the GIL: a third more CPU per query.)"""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy = False
        self._queue: deque[threading.Event] = deque()

    def offer(self, event: threading.Event) -> None:
        """Set `event` when the turn is free: now, or when the threads ahead are done."""
        with self._mutex:
            if self._busy:
                self._queue.append(event)
                return
            self._busy = True
        event.set()

    def take(self) -> None:
        event = threading.Event()
        self.offer(event)
        event.wait()

    def give_back(self) -> None:
        with self._mutex:
            if not self._queue:
                self._busy = False
                return
            event = self._queue.popleft()
        event.set()


_TURNS = _Turns()


def _mix(seed: int, turn: int) -> int:
    """A 32-bit seed for an image's turn (splitmix64's finaliser: nearby inputs, unrelated
    outputs)."""
    z = (seed * 0x9E3779B97F4A7C15 + turn + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0xFFFFFFFF


class ImageTurn:
    """One image's turns at running ART code.

    `with turn:` waits for the process's turn to run ART code, then seeds numpy's and
    Python's global generators from the image's seed and the number of its turn, so what
    ART draws in a turn depends on nothing but the image's own history. (Saving and
    restoring each image's generator state instead costs about 140 us a turn in numpy 2:
    more than a Square step's own work; seeding costs 10 us.) `Batcher.submit(rows, turn)`
    gives the turn away while the image waits for the endpoint. The global generators are
    left seeded afterwards, as ART's own examples leave them."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.turns = 0

    def __enter__(self) -> ImageTurn:
        _TURNS.take()
        self.started()
        return self

    def __exit__(self, *exc: object) -> None:
        _TURNS.give_back()

    def started(self) -> None:
        """Seed the generators for the turn that begins (the Batcher calls it when it hands
        a waiting image its answers and the turn together)."""
        s = _mix(self.seed, self.turns)
        self.turns += 1
        np.random.seed(s)
        random.seed(s)


class _SeededRandom:
    """`numpy.random`, except that `RandomState()` without a seed is seeded from numpy's
    global generator instead of the operating system's entropy."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np.random, name)

    @staticmethod
    def RandomState(seed: Any = None) -> np.random.RandomState:
        return np.random.RandomState(np.random.randint(2**31 - 1) if seed is None else seed)


class _NumpyForArt:
    """What the `np` name means inside the ART modules `seed_random_starts` patches."""

    random = _SeededRandom()

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def seed_random_starts() -> None:
    """HopSkipJump and Boundary draw their random starting image from a fresh
    `np.random.RandomState()`, seeded by the OS: those two attacks are not repeatable even
    with numpy seeded. In those two modules `np` becomes numpy with a `RandomState()` that
    takes its seed from numpy's global generator (the image's own state, see `ImageTurn`).
    Idempotent; nothing else in numpy or ART changes."""
    import art.attacks.evasion.boundary as boundary
    import art.attacks.evasion.hop_skip_jump as hop_skip_jump

    for module in (boundary, hop_skip_jump):
        if not isinstance(module.np, _NumpyForArt):
            module.np = _NumpyForArt()


@dataclass(eq=False)
class _Request:
    rows: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    taken: int = 0  # rows handed to a predict call so far
    answered: int = 0
    answer: np.ndarray | None = None
    error: BaseException | None = None
    turn: ImageTurn | None = None  # given back while waiting, handed back with the answer


class Batcher:
    """Gathers the rows that waiting image threads submit and sends them in shared predict
    calls of at most `max_batch` rows, up to `in_flight` calls at a time.

    A call goes out as soon as every live image thread is waiting (nobody can add more), or
    a share of the live images (`live / in_flight`, at most `max_batch` rows) is waiting, or
    no new rows arrived for `window` seconds (an image busy in a long computation does not
    hold the others back). With two calls in flight the images' ART turns for one share run
    while the endpoint answers the other, instead of the two taking turns (measured in
    benchmarks/query_throughput.py). `sizes` records every call's rows. An error from
    predict goes to every request in that call; `abort` fails every request, waiting or
    future, with one error. `predict` must be safe to call from two threads (the client is).
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        window: float,
        in_flight: int = 2,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._predict = predict
        self.max_batch = max_batch
        self.window = window
        self.in_flight = in_flight
        self.sizes: list[int] = []
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()  # requests with rows not yet taken
        self._waiting = 0  # requests submitted and not yet answered
        self._live = 0  # image threads between enter() and leave()
        self._last_arrival = 0.0
        self._closed = False
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"query-batcher-{i}", daemon=True)
            for i in range(in_flight)
        ]
        for thread in self._threads:
            thread.start()

    def enter(self) -> None:
        with self._cond:
            self._live += 1

    def leave(self) -> None:
        with self._cond:
            self._live -= 1
            self._cond.notify()

    def submit(self, rows: np.ndarray, turn: ImageTurn | None = None) -> np.ndarray:
        """The answers for `rows`, in order; blocks until they come back. A caller in its
        `turn` gives it away while it waits and has it again when this returns."""
        req = _Request(np.ascontiguousarray(rows, dtype=np.float32), turn=turn)
        if len(req.rows) == 0:
            raise ValueError("submit needs at least one row")
        with self._cond:
            if self._error is not None:
                raise self._error
            self._pending.append(req)
            self._waiting += 1
            self._last_arrival = time.monotonic()
            self._cond.notify()
        if turn is not None:
            _TURNS.give_back()
        req.done.wait()
        if turn is not None:
            turn.started()
        if req.error is not None:
            raise req.error
        assert req.answer is not None
        return req.answer

    def abort(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            while self._pending:
                self._finish(self._pending.popleft(), error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _finish(self, req: _Request, error: BaseException | None) -> None:
        if req.done.is_set():
            return
        req.error = error
        self._waiting -= 1
        if req.turn is None:
            req.done.set()
        else:
            _TURNS.offer(req.done)

    def _ready(self) -> bool:
        rows = sum(len(r.rows) - r.taken for r in self._pending)
        share = max(1, min(self.max_batch, self._live // self.in_flight))
        return (
            rows >= share
            or self._waiting >= self._live
            or self._closed
            or time.monotonic() - self._last_arrival >= self.window
        )

    def _next_call(self) -> list[tuple[_Request, int, int]] | None:
        """Wait for a call worth sending; take its rows, oldest request first."""
        with self._cond:
            while not (self._pending and self._ready()):
                if self._closed and not self._pending:
                    return None
                timeout = None
                if self._pending:
                    timeout = max(0.0, self._last_arrival + self.window - time.monotonic())
                self._cond.wait(timeout)
            parts, room = [], self.max_batch
            while self._pending and room:
                req = self._pending[0]
                n = min(room, len(req.rows) - req.taken)
                parts.append((req, req.taken, req.taken + n))
                req.taken += n
                room -= n
                if req.taken == len(req.rows):
                    self._pending.popleft()
            return parts

    def _run(self) -> None:
        while (parts := self._next_call()) is not None:
            x = np.concatenate([req.rows[a:b] for req, a, b in parts])
            try:
                out = np.asarray(self._predict(x))
                if out.shape[0] != len(x):
                    raise ValueError(f"predict answered {out.shape[0]} rows for {len(x)}")
            except BaseException as exc:  # handed to the waiting threads, which raise it
                with self._cond:
                    for req, _, _ in parts:
                        if req in self._pending:
                            self._pending.remove(req)
                        self._finish(req, exc)
                continue
            self.sizes.append(len(x))
            with self._cond:
                offset = 0
                for req, a, b in parts:
                    if req.answer is None:
                        req.answer = np.empty((len(req.rows), *out.shape[1:]), dtype=out.dtype)
                    req.answer[a:b] = out[offset : offset + b - a]
                    offset += b - a
                    req.answered += b - a
                    if req.answered == len(req.rows):
                        self._finish(req, None)
