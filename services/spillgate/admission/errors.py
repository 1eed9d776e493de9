"""The one table that maps admission errors to gRPC statuses (the service edge)."""

from __future__ import annotations

import logging

import grpc

from spillgate.core.errors import InvalidRequest, NoFleet, UnknownModel
from spillgate.status import RpcError, ServiceError, bad_request

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in admission (see its log)"


def to_rpc_error(exc: BaseException) -> RpcError:
    """Map an exception to the status the client sees; unexpected ones are logged only."""
    if isinstance(exc, ServiceError):
        return exc.error
    if isinstance(exc, InvalidRequest):
        return RpcError(
            grpc.StatusCode.INVALID_ARGUMENT, str(exc), (bad_request(exc.field, str(exc)),)
        )
    if isinstance(exc, UnknownModel):
        return RpcError(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, NoFleet):
        return RpcError(grpc.StatusCode.UNAVAILABLE, str(exc))
    log.error("unexpected admission error", exc_info=exc)
    return RpcError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
