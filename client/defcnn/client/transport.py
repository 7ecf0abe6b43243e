"""The wire under the blocking client: gRPC or the REST binding, chosen by the URL.

Both transports take and return the same protobuf messages, with the gRPC stub's method
names and call signature, and fail with a `grpc.RpcError` whose `code()` is a
`grpc.StatusCode`. So everything above the wire (validation, chunking, query counting,
budgets, the retry policy in `client._Attempts`, `ClientError`) is one code path for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import grpc

from defcnn.client.client import _Settings
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc

Metadata = Sequence[tuple[str, str]]


class Transport(Protocol):
    """The four calls the client makes, as `GRPCInferenceServiceStub` spells them."""

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelMetadataResponse: ...

    def ModelConfig(
        self, request: pb.ModelConfigRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelConfigResponse: ...

    def ModelInfer(
        self, request: pb.ModelInferRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelInferResponse: ...

    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelStatisticsResponse: ...

    def close(self) -> None: ...


class GrpcTransport:
    """One channel and its stub; the stub's callables are the transport's methods."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.ModelMetadata: Any = stub.ModelMetadata
        self.ModelConfig: Any = stub.ModelConfig
        self.ModelInfer: Any = stub.ModelInfer
        self.ModelStatistics: Any = stub.ModelStatistics

    def close(self) -> None:
        self._channel.close()


def open_transport(settings: _Settings, channel: Any) -> Transport:
    """The REST transport for an http(s):// URL, else gRPC over `channel()` (called only then)."""
    if settings.rest_url is None:
        return GrpcTransport(channel())
    from defcnn.client.rest import RestTransport

    return RestTransport(settings)
