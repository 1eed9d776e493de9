"""Triton-shaped errors: the status code and message text clients depend on."""

from __future__ import annotations

import grpc


class TritonError(Exception):
    """An error the replica reports to the client with Triton's code and text."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_arg(message: str) -> TritonError:
    return TritonError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> TritonError:
    return TritonError(grpc.StatusCode.UNAVAILABLE, message)


def internal(message: str) -> TritonError:
    return TritonError(grpc.StatusCode.INTERNAL, message)


def unknown_model(name: str) -> TritonError:
    return TritonError(
        grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found"
    )
