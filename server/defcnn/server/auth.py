"""Optional bearer-token auth: every RPC but the health check needs `authorization: Bearer T`."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from defcnn.tokens import read_token_file

TOKEN_ENV = "DEFCNN_AUTH_TOKEN"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def load_token(token_file: str | None) -> str | None:
    """The token from a file (first line) or $DEFCNN_AUTH_TOKEN; None means auth is off."""
    if token_file:
        return read_token_file(token_file, flag="--auth-token-file")
    return os.environ.get(TOKEN_ENV) or None


def _deny(message: str, streaming: bool) -> grpc.RpcMethodHandler:
    """A refusal that never reads the request: registered as client-streaming, its body is
    left unread (a unary client sees no difference), so a caller without the token costs
    the server its headers only."""

    async def abort(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.stream_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects a missing, malformed or wrong token with UNAUTHENTICATED, in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method or ""
        if method.startswith(EXEMPT_PREFIXES):
            return await continuation(details)
        values = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
        given = values[0].encode() if len(values) == 1 and isinstance(values[0], str) else b""
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
        return _deny(message, method.endswith(("/ModelStreamInfer", "/ServerReflectionInfo")))
