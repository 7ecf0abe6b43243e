"""Client errors: one class for every failed RPC, so callers catch `DefcnnError` as elsewhere."""

from __future__ import annotations

from defcnn.errors import DefcnnError


class ClientError(DefcnnError):
    """An RPC failed; `code` is the gRPC status code's name (e.g. "NOT_FOUND") for branching."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class QueryBudgetExceeded(ClientError):
    """A call would send more images than the client's budget allows; nothing of it was sent."""

    def __init__(self, message: str) -> None:
        super().__init__("RESOURCE_EXHAUSTED", message)
