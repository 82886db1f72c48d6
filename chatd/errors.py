"""Error codes of the wire protocol and the one exception that carries them.

Both the HTTP API and the WebSocket handler turn a `ChatError` into the
documented shape, so a code means the same thing on every surface.
"""

from __future__ import annotations

from typing import Literal

Code = Literal[
    "bad_request", "unauthorized", "forbidden", "not_found", "conflict",
    "rate_limited", "too_large", "unavailable", "internal",
]

HTTP_STATUS: dict[Code, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
}


class ChatError(Exception):
    """A failure the client is told about, with a protocol error code."""

    def __init__(self, code: Code, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code: Code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> dict[str, object]:
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            err["retry_after_ms"] = self.retry_after_ms
        return {"error": err}


class TooManyConnections(Exception):
    """The user has `limits.max_connections_per_user` open already (close code 4029)."""
