"""gRPC statuses with google.rpc details, shared by every service's error table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

DOMAIN = "spillgate"
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class RpcError:
    """A status to send: code, client-facing message and google.rpc detail messages."""

    code: grpc.StatusCode
    message: str
    details: Sequence[Message] = field(default_factory=tuple)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The grpc-status-details-bin trailer (google.rpc.Status), empty without details."""
        if not self.details:
            return ()
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return ((_DETAILS_KEY, status.SerializeToString()),)


def bad_request(field_name: str, description: str) -> Message:
    """google.rpc.BadRequest naming one field."""
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=field_name, description=description
    )
    bad: Message = error_details_pb2.BadRequest(field_violations=[violation])
    return bad


def retry_info(retry_after_ms: int) -> Message:
    """google.rpc.RetryInfo with retry_delay = `retry_after_ms`."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(retry_after_ms)
    info: Message = error_details_pb2.RetryInfo(retry_delay=delay)
    return info


class ServiceError(Exception):
    """An error raised by a service layer itself, already carrying its status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.error = RpcError(code, message)


T = TypeVar("T")


async def guard(
    context: grpc.aio.ServicerContext[Any, Any],
    work: Awaitable[T],
    to_rpc_error: Callable[[BaseException], RpcError],
) -> T:
    """Run one RPC's work; any exception ends the call with the status `to_rpc_error` maps
    it to (the service's one error table). Cancellation passes through."""
    try:
        return await work
    except Exception as exc:
        error = to_rpc_error(exc)
    await context.abort(error.code, error.message, error.trailing_metadata())
    raise AssertionError("unreachable: abort raises")
