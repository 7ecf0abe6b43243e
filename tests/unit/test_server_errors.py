"""Each server error class and the status code the servicer sends for it (one place)."""

from __future__ import annotations

import grpc
import pytest

from defcnn.errors import ConfigError
from defcnn.server import errors
from defcnn.server.errors import status_of


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (errors.ServerError, grpc.StatusCode.INTERNAL),
    ],
)
def test_a_server_error_keeps_its_message_under_its_status(
    error: type[errors.ServerError], code: grpc.StatusCode
) -> None:
    assert status_of(error("input 'input': shape must be [N, 3]")) == (
        code, "input 'input': shape must be [N, 3]",
    )  # fmt: skip


@pytest.mark.parametrize("exc", [RuntimeError("secret path /x"), ConfigError("bad"), KeyError(1)])
def test_anything_else_is_internal_without_its_details(exc: BaseException) -> None:
    code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert message == "internal error (see the server log)"
