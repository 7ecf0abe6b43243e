"""Many images decoded to uint8 CHW, spread over worker processes when there are many.

Each image goes through `defcnn.images.decode_image`, the decoder `defcnn classify` uses too.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from types import TracebackType

import numpy as np
from tqdm import tqdm

from defcnn.images import Source, decode_image

CHUNK_SIZE = 1024


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _decode_chunk(items: list[tuple[str, Source]], size: int) -> np.ndarray:
    out = np.empty((len(items), 3, size, size), dtype=np.uint8)
    for i, (name, src) in enumerate(items):
        out[i] = decode_image(src, size, size, name=name)
    return out


class ImageDecoder:
    """Collects images in order and decodes them, in chunks on a process pool once there are many.

    Chunks are submitted while the caller is still reading, so archive reading overlaps decoding.
    """

    def __init__(
        self,
        size: int,
        *,
        progress: bool = True,
        desc: str = "decoding",
        workers: int | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self._size = size
        self._workers = workers if workers is not None else min(_usable_cpus(), 8)
        self._chunk_size = chunk_size
        self._pending: list[tuple[str, Source]] = []
        self._parts: list[np.ndarray | Future[np.ndarray]] = []
        self._pool: ProcessPoolExecutor | None = None
        self._bar = tqdm(desc=desc, unit="img", disable=not progress)

    def __enter__(self) -> ImageDecoder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._bar.close()

    def add(self, name: str, src: Source) -> None:
        self._pending.append((name, src))
        if len(self._pending) >= self._chunk_size and self._workers > 1:
            self._submit()

    def _submit(self) -> None:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self._workers)
        items, self._pending = self._pending, []
        future = self._pool.submit(_decode_chunk, items, self._size)
        count = len(items)
        future.add_done_callback(lambda _f: self._bar.update(count))
        self._parts.append(future)

    def result(self) -> np.ndarray:
        """All added images, in order, as uint8 [N, 3, size, size]."""
        if self._pending:
            if self._pool is not None:
                self._submit()
            else:
                items, self._pending = self._pending, []
                self._parts.append(self._decode_here(items))
        arrays = [p.result() if isinstance(p, Future) else p for p in self._parts]
        if not arrays:
            return np.empty((0, 3, self._size, self._size), dtype=np.uint8)
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    def _decode_here(self, items: list[tuple[str, Source]]) -> np.ndarray:
        out = np.empty((len(items), 3, self._size, self._size), dtype=np.uint8)
        for i, (name, src) in enumerate(items):
            out[i] = decode_image(src, self._size, self._size, name=name)
            self._bar.update(1)
        return out
