"""Closed-loop load against an endpoint, checking every answer.

C clients, each on its own channel, send a request, wait for the answer, check it against
the expected labels (and logits), and send the next, for a fixed time. Every outcome is
counted: answered right, answered wrong, or failed with a status code. Nothing is retried,
so nothing is hidden. A sampler called once per second records whatever the caller wants
to watch alongside (the server's memory, its queue gauges).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Latency:
    """Milliseconds from send to answer (NaN when nothing was answered)."""

    p50: float
    p99: float
    max: float


@dataclass(frozen=True)
class LoadSummary:
    """A load run in totals."""

    seconds: float
    clients: int
    requests: int
    ok: int
    wrong: int
    errors: dict[str, int]  # status code name -> count
    throughput_rps: float
    latency_ms: Latency

    @property
    def failures(self) -> int:
        return self.wrong + sum(self.errors.values())

    def errors_text(self) -> str:
        """The failed calls by status code, for people: "none" or "UNAVAILABLE 3"."""
        return ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"


@dataclass
class LoadResult:
    """What happened, second by second and in total."""

    seconds: float
    clients: int
    ok: int = 0
    wrong: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # one row per second

    def summary(self) -> LoadSummary:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        return LoadSummary(
            seconds=round(self.seconds, 2), clients=self.clients,
            requests=self.ok + self.wrong + sum(self.errors.values()),
            ok=self.ok, wrong=self.wrong, errors=dict(self.errors),
            throughput_rps=round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            latency_ms=Latency(p50=float(np.percentile(lat, 50)),
                               p99=float(np.percentile(lat, 99)), max=float(lat.max())),
        )  # fmt: skip


def _request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request


async def _client(
    url: str,
    model: str,
    pool: list[tuple[pb.ModelInferRequest, np.ndarray, np.ndarray]],
    stop_at: float,
    result: LoadResult,
    seed: int,
    atol: float,
    timeout: float,
) -> None:
    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < stop_at:
            request, labels, logits = pool[int(rng.integers(len(pool)))]
            start = time.perf_counter()
            try:
                response = await stub.ModelInfer(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                result.errors[exc.code().name] += 1
                continue
            result.latencies_ms.append((time.perf_counter() - start) * 1e3)
            out = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(logits.shape)
            right = np.array_equal(out.argmax(1), labels) and np.allclose(out, logits, atol=atol)
            if right:
                result.ok += 1
            else:
                result.wrong += 1


async def _run(
    url: str,
    model: str,
    pool: list[tuple[pb.ModelInferRequest, np.ndarray, np.ndarray]],
    *,
    clients: int,
    seconds: float,
    sample: Callable[[], dict[str, Any]] | None,
    atol: float,
    timeout: float,
    progress: Callable[[int], None] | None,
) -> LoadResult:
    result = LoadResult(seconds=seconds, clients=clients)
    start = time.monotonic()
    stop_at = start + seconds
    tasks = [
        asyncio.create_task(_client(url, model, pool, stop_at, result, i, atol, timeout))
        for i in range(clients)
    ]
    last_ok = 0
    tick = 0
    while any(not t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=1.0)
        tick += 1
        row = {"t": round(time.monotonic() - start, 2), "ok": result.ok - last_ok,
               "errors": sum(result.errors.values()), "wrong": result.wrong}  # fmt: skip
        last_ok = result.ok
        if sample is not None:
            row.update(await asyncio.to_thread(sample))
        result.timeline.append(row)
        if progress:
            progress(tick)
    for t in tasks:
        t.result()  # a bug in the load generator must not pass silently
    result.seconds = time.monotonic() - start
    return result


def run_load(
    url: str,
    model: str,
    images: np.ndarray,
    logits: np.ndarray,
    *,
    clients: int = 64,
    seconds: float = 60.0,
    batch: int = 1,
    sample: Callable[[], dict[str, Any]] | None = None,
    atol: float = 1e-3,
    timeout: float = 30.0,
    progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Drive `clients` closed loops of `batch`-image requests for `seconds`; `logits` are the
    expected outputs for `images` (computed out of band, e.g. by in-process ONNX Runtime)."""
    pool = []
    for start in range(0, len(images) - batch + 1, batch):
        x, y = images[start : start + batch], logits[start : start + batch]
        pool.append((_request(model, x), y.argmax(1), y))
    if not pool:
        raise ValueError(f"need at least {batch} images, got {len(images)}")
    return asyncio.run(
        _run(url, model, pool, clients=clients, seconds=seconds, sample=sample, atol=atol,
             timeout=timeout, progress=progress)
    )  # fmt: skip
