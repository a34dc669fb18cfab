"""Errors in OpenAI's JSON shape, and the HTTP status each gRPC status of a decode service maps to."""

from __future__ import annotations

import grpc

# (HTTP status, OpenAI error type, code) per gRPC status of a decode service.
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "context_length_exceeded"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "no_decode_service"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", None),
}
# A message over the decode service's --max-message-mb is RESOURCE_EXHAUSTED too, but it is the
# request that is too large, not the service that is busy.
_TOO_LARGE = ("larger than max", "message larger")


class APIError(Exception):
    """An error returned to the HTTP client as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_grpc(code: grpc.StatusCode, details: str) -> APIError:
    """The HTTP error for a failed decode call. Unexpected statuses are a 502 (the upstream failed)."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(s in details.lower() for s in _TOO_LARGE):
        return APIError(413, f"request too large for the decode service: {details}", "invalid_request_error",
                        code="request_too_large")
    status, kind, err_code = _GRPC_TO_HTTP.get(code, (502, "upstream_error", None))
    param = "model" if code == grpc.StatusCode.NOT_FOUND else \
        "prompt" if code == grpc.StatusCode.OUT_OF_RANGE else None
    return APIError(status, f"{code.name}: {details}", kind, param, err_code)


def check_finish(reason: str) -> None:
    """Raise the 503 of a completion the decode service aborted (it is shutting down)."""
    if reason == "abort":
        raise APIError(503, "the decode service aborted the request (shutting down); retry",
                       "service_unavailable", code="aborted")


def quote(value: object, limit: int = 32) -> str:
    """A short, repr-quoted prefix of user input for an error message (never the whole input)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
