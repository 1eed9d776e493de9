"""spillgate.registry: the fleet's source of truth (stores now; the gRPC service next)."""

from spillgate.registry.client import ClientConfig, ClientStats, RegistryClient
from spillgate.registry.sqlite_store import SQLiteStore
from spillgate.registry.store import (
    NotFound,
    PreconditionFailed,
    RevisionMismatch,
    Store,
    StoreError,
    ValidationError,
    entity_key,
)

__all__ = [
    "ClientConfig",
    "ClientStats",
    "NotFound",
    "PreconditionFailed",
    "RegistryClient",
    "RevisionMismatch",
    "SQLiteStore",
    "Store",
    "StoreError",
    "ValidationError",
    "entity_key",
]
