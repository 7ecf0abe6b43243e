"""Registers the servicer with gRPC so that bytes which are not a valid request message get
INVALID_ARGUMENT with a plain message, instead of gRPC's UNKNOWN naming a Python exception.

The generated `add_GRPCInferenceServiceServicer_to_server` hands undecodable bytes to
gRPC's own error path; here each method's deserialiser returns a `Malformed` marker instead,
and the wrapper answers it before the servicer sees anything. The one streaming method,
ModelStreamInfer, is served here message by message with the servicer's `stream_message`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from defcnn.protos import grpc_service_pb2 as pb
from defcnn.server.drain import until_set
from defcnn.server.errors import Unavailable, status_of

SERVICE_NAME = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as the method's message type."""

    type_name: str
    error: str

    @property
    def message(self) -> str:
        return f"malformed request: not a valid {self.type_name} ({self.error})"


def _deserializer(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return Malformed(cls.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)

    return parse


def _unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Message | Malformed, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return handle


def _stream(
    answer: Callable[[Any], Awaitable[pb.ModelStreamInferResponse]],
    closing: asyncio.Event,
) -> Callable[..., AsyncIterator[pb.ModelStreamInferResponse]]:
    """Each message answered in turn by `answer`; as for every stream error, a malformed
    message is answered in its error_message. Once `closing` is set, a stream waiting for its
    next message ends with UNAVAILABLE."""

    async def handle(
        requests: AsyncIterator[Message | Malformed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            async for request in until_set(closing, aiter(requests)):
                if isinstance(request, Malformed):
                    yield pb.ModelStreamInferResponse(error_message=request.message)
                else:
                    yield await answer(request)
        except Unavailable as exc:
            await context.abort(*status_of(exc))

    return handle


def add_inference_service(servicer: Any, server: grpc.aio.Server, closing: asyncio.Event) -> None:
    """Every method of the service, from its descriptor, bound to `servicer`; setting
    `closing` ends the streams that are idle."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        options = {
            "request_deserializer": _deserializer(request_cls),
            "response_serializer": response_cls.SerializeToString,
        }
        if method.client_streaming or method.server_streaming:
            if method.name != "ModelStreamInfer":
                raise TypeError(f"no stream handler for {method.name}")
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream(servicer.stream_message, closing), **options
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(getattr(servicer, method.name)), **options
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
