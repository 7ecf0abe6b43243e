"""GRPCInferenceService: each method converts, delegates, converts back.

Errors are raised as `ServerError`s, which the handlers (handlers.py) turn into status
codes; anything unexpected becomes INTERNAL in `_handled`. RPCs we do not implement
(shared memory, trace, log settings, model load/unload) keep the generated base class's
UNIMPLEMENTED answer. ModelStreamInfer is answered one message at a time by
`stream_message`: the stream itself (drain, undecodable messages) belongs to handlers.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server import codec
from defcnn.server.codec import INLINE_BYTES
from defcnn.server.errors import (
    InternalError,
    NotFound,
    ServerError,
    Unavailable,
    release_frames,
    status_of,
)
from defcnn.server.repository import FailedVersion, ModelRepository, ModelVersion
from defcnn.server.statistics import Duration, Metrics

log = logging.getLogger("defcnn.server")
SERVER_NAME = "defcnn"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("classification", "model_configuration", "statistics", "binary_tensor_data")

R = TypeVar("R")


def _handled(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Ours keep their class (the handler maps it to a status code); anything else is
    logged and becomes INTERNAL, with no details for the caller."""

    @functools.wraps(method)
    async def wrapper(
        self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext
    ) -> R:
        try:
            return await method(self, request, context)
        except ServerError:
            raise
        except Exception:
            log.exception("internal error in %s", method.__name__)
            raise InternalError("internal error (see the server log)") from None

    return wrapper


def _dims(values: tuple[int, ...] | list[int]) -> list[int]:
    return [-1, *values]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton-compatible service over a loaded model repository."""

    def __init__(
        self, repository: ModelRepository, metrics: Metrics, executor: Executor | None = None
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.executor = executor  # decoding and encoding of large requests (None: the loop's)
        self.accepting = False

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.accepting)

    @_handled
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        try:
            self.repository.lookup(request.name, request.version)
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.accepting)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    @_handled
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        mv = self.repository.find(request.name, request.version)
        cfg = mv.config
        versions = sorted(self.repository.models[request.name])
        response = pb.ModelMetadataResponse(
            name=mv.name, versions=[str(v) for v in versions], platform=cfg.platform
        )
        for t in cfg.input:
            response.inputs.add(name=t.name, datatype="FP32", shape=_dims(list(t.dims)))
        for t in cfg.output:
            response.outputs.add(name=t.name, datatype="FP32", shape=_dims(list(t.dims)))
        return response

    @_handled
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        mv = self.repository.find(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(mv.config)
        if isinstance(mv, ModelVersion):  # the limit in force (--max-batch-size may override)
            response.config.max_batch_size = mv.max_batch_size
        return response

    @_handled
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self.infer(request, deadline)

    async def infer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        """Validate, batch, run and encode one request, counting it either way."""
        start = time.perf_counter_ns()
        if not self.accepting:
            raise Unavailable("the server is not accepting requests (starting or draining)")
        mv = self.repository.lookup(request.model_name, request.model_version)
        try:
            outputs = codec.requested_outputs(request, mv)
            loop = asyncio.get_running_loop()
            large = codec.input_bytes(request) > INLINE_BYTES
            if large:  # work proportional to the request runs off the event loop
                images = await loop.run_in_executor(self.executor, codec.decode_inputs,
                                                    request, mv)  # fmt: skip
            else:
                images = codec.decode_inputs(request, mv)
            logits, timing = await mv.batcher.submit(images, deadline)
            if large or logits.size > INLINE_BYTES // 4:
                response = await loop.run_in_executor(
                    self.executor, codec.answer, request, mv, outputs, logits
                )
            else:
                response = codec.answer(request, mv, outputs, logits)
        except BaseException:
            self.metrics.request_failed(
                mv.name, mv.version, total_ns=time.perf_counter_ns() - start
            )
            raise
        self.metrics.request_ok(
            mv.name, mv.version, total_ns=time.perf_counter_ns() - start,
            queue_ns=timing.queue_ns, compute_ns=timing.compute_ns, rows=len(images),
        )  # fmt: skip
        return response

    async def stream_message(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        """One message of ModelStreamInfer. As Triton: an error answers that request in
        error_message, and the stream goes on."""
        try:
            response = await self.infer(request, None)
        except Exception as exc:
            _, message = status_of(exc)
            if not isinstance(exc, ServerError):
                log.exception("internal error in ModelStreamInfer")
            release_frames(exc)
            return pb.ModelStreamInferResponse(
                error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
            )
        return pb.ModelStreamInferResponse(infer_response=response)

    @_handled
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self.repository.find(request.name, request.version)
        response = pb.ModelStatisticsResponse()
        snapshot = self.metrics.snapshot()
        for mv in self.repository.all_versions():
            if request.name and mv.name != request.name:
                continue
            if request.version and str(mv.version) != request.version:
                continue
            entry = response.model_stats.add(name=mv.name, version=str(mv.version))
            s = snapshot.get((mv.name, mv.version))
            if isinstance(mv, FailedVersion) or s is None:  # never served: all counters zero
                continue
            entry.last_inference = s.last_inference_ms
            entry.inference_count = s.inference_count
            entry.execution_count = s.execution_count
            stats = entry.inference_stats
            for field, value in (
                ("success", s.success), ("fail", s.fail), ("queue", s.queue),
                ("compute_input", s.compute_input), ("compute_infer", s.compute_infer),
                ("compute_output", s.compute_output),
            ):  # fmt: skip
                _fill(getattr(stats, field), value)
            for size, duration in sorted(s.batches.items()):
                batch = entry.batch_stats.add(batch_size=size)
                _fill(batch.compute_infer, duration)
                _fill(batch.compute_input, Duration(duration.count, 0))
                _fill(batch.compute_output, Duration(duration.count, 0))
        return response

    @_handled
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for mv in self.repository.all_versions():
            if isinstance(mv, ModelVersion):
                response.models.add(name=mv.name, version=str(mv.version), state="READY")
            elif not request.ready:
                response.models.add(
                    name=mv.name, version=str(mv.version), state="UNAVAILABLE", reason=mv.reason
                )
        return response


def _fill(target: pb.StatisticDuration, value: Duration) -> None:
    target.count = value.count
    target.ns = value.ns
