"""Domain errors of the admission policy; the service maps each to one gRPC code at its edge.

UnknownModel -> NOT_FOUND, InvalidRequest -> INVALID_ARGUMENT, NoFleet -> UNAVAILABLE.
Messages are safe to show to clients (no internals).
"""

from __future__ import annotations


class PolicyError(Exception):
    """Base class of every error the policy core raises on purpose."""


class UnknownModel(PolicyError):
    """The alias, model or ``name@version`` is not in the fleet view."""

    def __init__(self, model: str) -> None:
        super().__init__(f"unknown model or alias {model!r}")
        self.model = model


class InvalidRequest(PolicyError):
    """A request field is malformed; ``field`` names it (the RequestContext field name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NoFleet(PolicyError):
    """No fleet view (registry snapshot) has been set yet; retryable."""

    def __init__(self) -> None:
        super().__init__("no registry snapshot yet")
