"""Registers the servicer with gRPC, taking over what gRPC would otherwise do on the event
loop or before any check: receiving, parsing and serializing messages.

- Each unary method is registered as client-streaming at the wire (the client sees no
  difference), so that its body is read only after the call has reserved room for it in
  the server's byte budget (`inflight.ByteBudget`), within a time limit.
- Messages arrive as bytes. Only inference requests may be larger than `INLINE_BYTES`;
  a large one has its fields counted before it is parsed (`wire`: parsing holds the GIL,
  so a message built to be slow to parse would stall every thread), then is parsed in a
  worker thread, as large responses are serialized: no request holds the event loop for a
  time proportional to its size.
- Bytes that are not a valid request message get INVALID_ARGUMENT with a plain message.
- RPCs the servicer does not implement (model load/unload, shared memory, trace, log
  settings) answer UNIMPLEMENTED without reading their body and without a traceback.
- ModelStreamInfer is served here message by message with the servicer's
  `stream_message`; setting `closing` ends the streams that are waiting for a message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server import memory
from defcnn.server.codec import INLINE_BYTES
from defcnn.server.drain import ArrivalClock, until_set
from defcnn.server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServerError,
    Unavailable,
    release_frames,
    status_of,
)
from defcnn.server.inflight import ByteBudget
from defcnn.server.wire import check_infer_request

SERVICE_NAME = "inference.GRPCInferenceService"
M = TypeVar("M", bound=Message)


@dataclass
class Intake:
    """How requests come in: the shared byte budget, the largest message, how long a body
    may take to arrive and a call may wait for room, and the threads for large messages."""

    budget: ByteBudget
    max_message_bytes: int
    executor: Executor
    read_timeout_s: float = 10.0
    wait_timeout_s: float = 30.0
    released_since_trim: int = 0
    held: asyncio.Event | None = None
    arrivals: ArrivalClock = field(default_factory=ArrivalClock)

    def hold(self) -> None:
        """From now on, calls wait before they are answered, until `let_go`: while the
        port closes, callers are kept waiting on a call we answer, not sending new ones
        that gRPC would cancel."""
        self.held = asyncio.Event()

    def let_go(self) -> None:
        """Answer the held calls (and every later one) at once."""
        if self.held is not None:
            self.held.set()

    async def parse(self, cls: type[M], data: bytes) -> M:
        """The message in `data`. Only an inference request may be larger than
        INLINE_BYTES; a large one has its fields counted first (`wire`), then is parsed in
        a worker thread."""
        if len(data) <= INLINE_BYTES:
            return _parse(cls, data)
        if cls is not pb.ModelInferRequest:
            raise InvalidArgument(
                f"a {cls.DESCRIPTOR.full_name} of {len(data)} bytes; at most {INLINE_BYTES}"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _checked_parse, cls, data)

    async def serialize(self, message: Message) -> bytes:
        if message.ByteSize() <= INLINE_BYTES:
            return message.SerializeToString()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, message.SerializeToString)

    def release(self, size: int) -> None:
        """Give back `size` bytes of the budget; once no request is held after large ones,
        return the freed memory to the operating system (in a worker thread)."""
        self.budget.release(size)
        self.released_since_trim += size
        if self.budget.used == 0 and self.released_since_trim >= memory.TRIM_AFTER_BYTES:
            self.released_since_trim = 0
            asyncio.get_running_loop().run_in_executor(self.executor, memory.trim)

    @contextlib.contextmanager
    def read_limit(self, what: str) -> Iterator[None]:
        """Cancel the enclosed read if the body has not arrived within the time limit, and
        say so as DEADLINE_EXCEEDED: a client that sends headers and then stalls holds a
        reservation, and must not hold it for ever."""
        task = asyncio.current_task()
        fired = []

        def expire() -> None:
            fired.append(True)
            if task is not None:
                task.cancel()

        timer = asyncio.get_running_loop().call_later(self.read_timeout_s, expire)
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise DeadlineExceeded(
                    f"{what} not received within {self.read_timeout_s:.0f} s"
                ) from None
            raise
        finally:
            timer.cancel()


def _checked_parse(cls: type[M], data: bytes) -> M:
    check_infer_request(data)
    return _parse(cls, data)


def _parse(cls: type[M], data: bytes) -> M:
    try:
        return cls.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidArgument(
            f"malformed request: not a valid {cls.DESCRIPTOR.full_name} "
            f"({str(exc) or type(exc).__name__})"
        ) from None


async def _read_one(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext, intake: Intake
) -> bytes:
    with intake.read_limit("the request"):
        data = await context.read()
    if data is grpc.aio.EOF:
        raise InvalidArgument("the call carried no request message")
    return data


def _unary(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]],
    request_cls: type[Message],
    intake: Intake,
) -> Callable[..., Awaitable[bytes]]:
    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        intake.arrivals.arrived()
        if intake.held is not None:
            await intake.held.wait()
        try:
            return await _answer(behaviour, request_cls, intake, requests, context)
        except ServerError as exc:
            status = status_of(exc)
            release_frames(exc)
        # Aborted here, once the request is gone: gRPC keeps the abort's exception in a
        # reference cycle with the frames it passed through, and a frame that still held
        # the request would keep its bytes until the garbage collector found the cycle.
        await context.abort(*status)
        raise AssertionError("unreachable")

    return handle


async def _answer(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]],
    request_cls: type[Message],
    intake: Intake,
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
) -> bytes:
    """Reserve, read, parse, answer, serialize: the request's bytes count against the
    budget from before they are read until the answer is ready."""
    reserved = intake.max_message_bytes
    await intake.budget.acquire(reserved, intake.wait_timeout_s)
    held = reserved
    try:
        data = await _read_one(requests, context, intake)
        held = intake.budget.shrink(reserved, 2 * len(data))  # the bytes and the message
        request = await intake.parse(request_cls, data)
        del data
        return await intake.serialize(await behaviour(request, context))
    finally:
        intake.release(held)


def _unimplemented(name: str) -> Callable[..., Awaitable[bytes]]:
    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by this server"
        )
        raise AssertionError("unreachable")

    return handle


def _stream(
    answer: Callable[[pb.ModelInferRequest], Awaitable[pb.ModelStreamInferResponse]],
    closing: asyncio.Event,
    intake: Intake,
    streams: asyncio.Semaphore,
) -> Callable[..., AsyncIterator[bytes]]:
    """Each message answered in turn by `answer`; as for every stream error, a malformed
    message is answered in its error_message. Like a unary call, a stream reserves room
    for its next message before reading it, and holds the reservation while it waits (open
    streams are capped so that they can hold at most half the budget). Once `closing` is
    set, a stream waiting for its next message ends with UNAVAILABLE."""

    async def handle(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if streams.locked():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open ModelStreamInfer streams"
            )
        reserved = intake.max_message_bytes
        held = 0
        async with streams:
            try:
                await intake.budget.acquire(reserved, intake.wait_timeout_s)
                held = reserved
                async for data in until_set(closing, aiter(requests)):
                    intake.arrivals.arrived()
                    held = intake.budget.shrink(reserved, 2 * len(data))
                    try:
                        request = await intake.parse(pb.ModelInferRequest, data)
                    except InvalidArgument as exc:
                        reply = pb.ModelStreamInferResponse(error_message=str(exc))
                    else:
                        reply = await answer(request)
                    del data
                    answer_bytes = await intake.serialize(reply)
                    intake.release(held)
                    held = 0
                    yield answer_bytes
                    await intake.budget.acquire(reserved, intake.wait_timeout_s)
                    held = reserved
            except (Unavailable, ResourceExhausted) as exc:
                status = status_of(exc)
            else:
                return
            finally:
                intake.release(held)
        await context.abort(*status)

    return handle


def add_inference_service(
    servicer: Any,
    server: grpc.aio.Server,
    closing: asyncio.Event,
    intake: Intake,
    max_streams: int = 64,
) -> None:
    """Every method of the service, from its descriptor, bound to `servicer`; setting
    `closing` ends the streams that are idle."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    base = pb_grpc.GRPCInferenceServiceServicer
    # Open streams hold a reservation each: at most half the budget's worth of them.
    streams = asyncio.Semaphore(
        max(1, min(max_streams, intake.budget.limit // (2 * intake.max_message_bytes)))
    )
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            if method.name != "ModelStreamInfer":
                raise TypeError(f"no stream handler for {method.name}")
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream(servicer.stream_message, closing, intake, streams)
            )
        elif getattr(type(servicer), method.name) is getattr(base, method.name):
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _unimplemented(method.name)
            )
        else:
            request_cls = getattr(pb, method.input_type.name)
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _unary(getattr(servicer, method.name), request_cls, intake)
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


HEALTH_READS = 8  # health messages read at once (they need no token: no budget for them)


def add_health_service(health: Any, server: grpc.aio.Server, intake: Intake) -> None:
    """grpc.health.v1.Health, open to callers without a token. Its messages are read at
    most HEALTH_READS at a time (more are refused at once, never queued), within the read
    limit, and parsed only up to INLINE_BYTES: a probe's message is a few bytes."""
    reads = asyncio.Semaphore(HEALTH_READS)

    async def read(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckRequest:
        if reads.locked():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health checks")
        try:
            async with reads:
                data = await _read_one(requests, context, intake)
            return await intake.parse(health_pb2.HealthCheckRequest, data)
        except ServerError as exc:
            status = status_of(exc)
        await context.abort(*status)
        raise AssertionError("unreachable")

    async def check(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        return await health.Check(await read(requests, context), context)

    async def watch(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await health.Watch(await read(requests, context), context)

    serialize = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.stream_unary_rpc_method_handler(check, response_serializer=serialize),
        "Watch": grpc.stream_stream_rpc_method_handler(watch, response_serializer=serialize),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("grpc.health.v1.Health", handlers),)
    )
