"""The gateway's one error table: every failure a caller can see, as gRPC and HTTP statuses.

Messages are written for clients and never contain exception text from inside spillgate,
stack traces or keys; unexpected errors are logged and become INTERNAL / 500.
"""

from __future__ import annotations

import logging

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from spillgate.status import RpcError, bad_request, retry_info

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in the gateway (see its log)"

# gRPC code -> (HTTP status, OpenAI-style error type)
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.INTERNAL: (500, "internal_error"),
}


class GatewayError(Exception):
    """A failure with the status the caller gets; `field` names a bad input field."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, retry_after_ms: int = 0, field: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.field = field

    def rpc_error(self) -> RpcError:
        details = []
        if self.field:
            details.append(bad_request(self.field, self.message))
        if self.retry_after_ms:
            details.append(retry_info(self.retry_after_ms))
        return RpcError(self.code, self.message, tuple(details))

    def http(self) -> tuple[int, str]:
        """(HTTP status, OpenAI error type)."""
        return _HTTP.get(self.code, (500, "internal_error"))


def invalid(field: str, message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field=field)


def shed(model: str, reason: str, retry_after_ms: int) -> GatewayError:
    """Admission answered SHED: RESOURCE_EXHAUSTED with its retry-after (1 s when unset)."""
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"no capacity for {model} within the budget ({reason}); retry after {retry_after_ms} ms",
        retry_after_ms=retry_after_ms or 1000,
    )


def _details(exc: grpc.aio.AioRpcError) -> tuple[int, str]:
    """(retry-after ms, bad field) from a dependency's google.rpc details, so a passed-on
    status keeps its RetryInfo and BadRequest."""
    raw = None
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            raw = value
    if raw is None:
        return 0, ""
    retry_after_ms, field = 0, ""
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:  # a malformed trailer only loses the details
        return 0, ""
    for detail in status.details:
        info, bad = error_details_pb2.RetryInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            retry_after_ms = info.retry_delay.ToMilliseconds()
        elif detail.Unpack(bad) and bad.field_violations:
            field = bad.field_violations[0].field
    return retry_after_ms, field


def _envoy_overloaded(exc: grpc.aio.AioRpcError) -> bool:
    """Envoy marks circuit-breaker rejections with `x-envoy-overloaded: true`."""
    for metadata in (exc.initial_metadata(), exc.trailing_metadata()):
        for key, _value in metadata or ():
            if key == "x-envoy-overloaded":
                return True
    return "reset reason: overflow" in (exc.details() or "")


def as_gateway_error(exc: BaseException) -> GatewayError:
    """Map any exception to what the caller sees (the mapping table's last rows)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        # An error from admission or a neighbour gateway: pass through codes that are about
        # the request; anything else means a dependency is down.
        code = exc.code()
        passthrough = {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        }
        if code in passthrough:
            retry_after_ms, field = _details(exc)
            return GatewayError(
                code, exc.details() or code.name, retry_after_ms=retry_after_ms, field=field
            )
        if code == grpc.StatusCode.UNAVAILABLE and _envoy_overloaded(exc):
            # Envoy's circuit breaker refused it: the spill cap to that region is reached.
            return GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the overflow cap to the neighbour region is reached; retry later",
                retry_after_ms=1000,
            )
        log.warning("dependency failed: %s %s", code.name, exc.details())
        return GatewayError(grpc.StatusCode.UNAVAILABLE, "a spillgate dependency is unavailable")
    log.error("unexpected gateway error", exc_info=exc)
    return GatewayError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
