"""The one error table of the serving core: each error code maps to a gRPC status and an HTTP status.

The core (serving.core), the executor and the auth checks raise or deliver `ServingError` with a
code from `CODES`; the gRPC front aborts the call with `grpc.StatusCode[code]`, the HTTP front
answers `CODES[code].http` with the OpenAI error body `{"error": {"message", "type", "param",
"code"}}`. The code names are gRPC's (a superset of what HTTP distinguishes), so nothing here
imports grpc.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ErrorCode:
    http: int  # HTTP status
    type: str  # the OpenAI error "type"


CODES: dict[str, ErrorCode] = {
    "INVALID_ARGUMENT": ErrorCode(400, "invalid_request_error"),  # a bad field (named)
    "FAILED_PRECONDITION": ErrorCode(400, "invalid_request_error"),  # valid, but not now (a drop running)
    "UNAUTHENTICATED": ErrorCode(401, "authentication_error"),  # no key, or a wrong one
    "PERMISSION_DENIED": ErrorCode(403, "permission_error"),  # a Generation key on Admin
    "NOT_FOUND": ErrorCode(404, "not_found_error"),  # an unknown model or route
    "RESOURCE_EXHAUSTED": ErrorCode(429, "rate_limit_error"),  # the queue is full
    "UNAVAILABLE": ErrorCode(503, "service_unavailable_error"),  # draining (shutdown), executor down
    "ABORTED": ErrorCode(503, "service_unavailable_error"),  # ended by the server (shutting down)
    "DEADLINE_EXCEEDED": ErrorCode(504, "timeout_error"),
    "INTERNAL": ErrorCode(500, "server_error"),  # a bug, never bad input
}


class ServingError(Exception):
    """A request refused or failed; `code` is a key of CODES, `param` the request field at fault."""

    def __init__(self, code: str, message: str, param: Optional[str] = None):
        if code not in CODES:
            raise ValueError(f"unknown serving error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    @property
    def http_status(self) -> int:
        return CODES[self.code].http

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": CODES[self.code].type, "param": self.param,
                          "code": self.code.lower()}}


_FIELD = re.compile(r"^([a-z_][a-z0-9_]*)\b")


def invalid(e: ValueError, fields=()) -> ServingError:
    """INVALID_ARGUMENT from a validation message. The engine's messages begin with the field they
    name ("max_tokens must be > 0", "prompt_token_ids: ..."); that word is the error's `param` when
    it is one of `fields`."""
    message = str(e)
    m = _FIELD.match(message)
    return ServingError("INVALID_ARGUMENT", message, m.group(1) if m and m.group(1) in fields else None)
