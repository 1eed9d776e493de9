"""The one table that maps registry store errors to gRPC statuses (the service edge).

Clients get a code, a message written for them and, where it helps a retry, structured
details: ABORTED carries google.rpc.ErrorInfo with the current revision, INVALID_ARGUMENT
carries google.rpc.BadRequest naming the field. Unexpected errors become INTERNAL with a
fixed message; their text and traceback go to the log only.
"""

from __future__ import annotations

import logging

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from spillgate.registry.store import (
    NotFound,
    PreconditionFailed,
    RevisionMismatch,
    StoreUnavailable,
    ValidationError,
)
from spillgate.status import DOMAIN, RpcError, ServiceError, bad_request

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in the registry (see its log)"


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
        bad = bad_request(exc.field, exc.message)
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
