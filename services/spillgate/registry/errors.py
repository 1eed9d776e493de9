"""The one table that maps registry store errors to gRPC statuses (the service edge).

Clients get a code, a message written for them and, where it helps a retry, structured
details: ABORTED carries google.rpc.ErrorInfo with the current revision, INVALID_ARGUMENT
carries google.rpc.BadRequest naming the field. Unexpected errors become INTERNAL with a
fixed message; their text and traceback go to the log only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from spillgate.registry.store import (
    NotFound,
    PreconditionFailed,
    RevisionMismatch,
    StoreUnavailable,
    ValidationError,
)

log = logging.getLogger(__name__)

DOMAIN = "spillgate"
INTERNAL_MESSAGE = "internal error in the registry (see its log)"
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class RpcError:
    """A status to send: code, client-facing message and google.rpc detail messages."""

    code: grpc.StatusCode
    message: str
    details: Sequence[error_details_pb2.ErrorInfo | error_details_pb2.BadRequest] = field(
        default_factory=tuple
    )

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


class ServiceError(Exception):
    """An error raised by the service layer itself, already carrying its status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.error = RpcError(code, message)


def to_rpc_error(exc: BaseException) -> RpcError:
    """Map an exception to the status the client sees (the mapping table)."""
    if isinstance(exc, ServiceError):
        return exc.error
    if isinstance(exc, RevisionMismatch):
        info = error_details_pb2.ErrorInfo(
            reason="REVISION_MISMATCH",
            domain=DOMAIN,
            metadata={"current_revision": str(exc.current_revision)},
        )
        return RpcError(grpc.StatusCode.ABORTED, str(exc), (info,))
    if isinstance(exc, ValidationError):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.message
        )
        bad = error_details_pb2.BadRequest(field_violations=[violation])
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), (bad,))
    if isinstance(exc, PreconditionFailed):
        return RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, NotFound):
        return RpcError(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, StoreUnavailable):
        # The text names the backend's address, which is not for clients: log it only.
        log.warning("registry store unavailable: %s", exc)
        return RpcError(grpc.StatusCode.UNAVAILABLE, "registry store unavailable, retry later")
    log.error("unexpected registry error", exc_info=exc)
    return RpcError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
