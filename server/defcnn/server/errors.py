"""Server errors and their gRPC status codes, mapped in exactly one place."""

from __future__ import annotations

import traceback

import grpc

from defcnn.errors import DefcnnError


class ServerError(DefcnnError):
    """An error a client should see: its class decides the gRPC status code."""

    status = grpc.StatusCode.INTERNAL


class InternalError(ServerError):
    """A failure of the server itself; its message never carries details."""


class InvalidArgument(ServerError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServerError):
    status = grpc.StatusCode.NOT_FOUND


class Unavailable(ServerError):
    """Not ready or shutting down: clients may retry."""

    status = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServerError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServerError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ServerError):
    status = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ServerError):
    status = grpc.StatusCode.UNAUTHENTICATED


SHOWN_CHARS = 80  # of a caller's string echoed in an error message


def shown(value: str) -> str:
    """A caller's string as an error message quotes it: repr, cut to SHOWN_CHARS (a 40 MB
    model name must not come back as a 40 MB status message)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(value)} chars)"


def release_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames `exc` passed through. An exception raised
    through an awaited future sits in a reference cycle with them (future, exception,
    traceback, the frame awaiting the future), so a request those frames held would stay
    in memory until the garbage collector ran: under a burst, gigabytes."""
    traceback.clear_frames(exc.__traceback__)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message to send for `exc`; anything unexpected is INTERNAL, no details."""
    if isinstance(exc, ServerError):
        return exc.status, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"
