"""The registry store contract: what every store (SQLite now, Consul later) implements.

A store holds the registry's entities at one monotonic revision. The empty store is at
revision 0 and every committed `apply` bumps the revision by exactly 1, whatever the number
of entities it changes (registry.proto, "Revisions"). An apply whose effective diff is empty
(only no-op puts and deletes of absent keys) commits nothing and keeps the revision.

Errors map to gRPC codes in one table at the service edge:
`RevisionMismatch` -> ABORTED, `ValidationError` -> INVALID_ARGUMENT,
`PreconditionFailed` -> FAILED_PRECONDITION, `NotFound` -> NOT_FOUND,
`StoreUnavailable` -> UNAVAILABLE.
"""

from __future__ import annotations

import abc
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import TypeAlias

from spillgate._proto import registry_pb2

EntityKind: TypeAlias = registry_pb2.EntityKind.ValueType
# (kind, id) addresses one entity; the id format is registry.proto's EntityKey comment.
Key: TypeAlias = tuple[EntityKind, str]
# Full registry state: key -> entity. Pure helpers and validation work on this shape.
State: TypeAlias = Mapping[Key, registry_pb2.Entity]

REGION = registry_pb2.ENTITY_KIND_REGION
MODEL = registry_pb2.ENTITY_KIND_MODEL
VERSION = registry_pb2.ENTITY_KIND_VERSION
ALIAS = registry_pb2.ENTITY_KIND_ALIAS
PLACEMENT = registry_pb2.ENTITY_KIND_PLACEMENT
REPLICA = registry_pb2.ENTITY_KIND_REPLICA

# Entity oneof field name per kind; also the Snapshot's field order.
_FIELD_BY_KIND: dict[EntityKind, str] = {
    REGION: "region",
    MODEL: "model",
    VERSION: "version",
    ALIAS: "alias",
    PLACEMENT: "placement",
    REPLICA: "replica",
}
_KIND_BY_FIELD = {name: kind for kind, name in _FIELD_BY_KIND.items()}
_SNAPSHOT_FIELD_BY_KIND: dict[EntityKind, str] = {
    REGION: "regions",
    MODEL: "models",
    VERSION: "versions",
    ALIAS: "aliases",
    PLACEMENT: "placements",
    REPLICA: "replicas",
}


class StoreError(Exception):
    """Base class of all store errors."""


class RevisionMismatch(StoreError):
    """The write's expected revision differs from the store's; nothing was written."""

    def __init__(self, current_revision: int, expected_revision: int) -> None:
        super().__init__(
            f"expected revision {expected_revision} but the store is at revision {current_revision}"
        )
        self.current_revision = current_revision
        self.expected_revision = expected_revision


class ValidationError(StoreError):
    """A mutation or entity is malformed (INVALID_ARGUMENT); `field` names the bad field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PreconditionFailed(StoreError):
    """The write is well-formed but the state forbids it (FAILED_PRECONDITION).

    Raised for references to missing entities (the message names what is missing), for
    deletes that leave references dangling, and for changes to immutable versions.
    """


class StoreUnavailable(StoreError):
    """The store's backend (e.g. the Consul agent) cannot be reached; retrying may succeed.

    Whether the failed write was committed is unknown: callers read the revision again.
    """


class NotFound(StoreError):
    """The entity does not exist."""

    def __init__(self, key: Key) -> None:
        super().__init__(f"{kind_name(key[0])} {key[1]!r} not found")
        self.key = key


def new_registry_id() -> str:
    """A fresh random registry id (32 hex digits), drawn once when a store is created."""
    return uuid.uuid4().hex


def kind_name(kind: EntityKind) -> str:
    """Short lower-case name of an entity kind ("region", "version", ...)."""
    return _FIELD_BY_KIND.get(kind, "unknown")


def entity_kind(entity: registry_pb2.Entity) -> EntityKind:
    """Kind of the entity; ENTITY_KIND_UNSPECIFIED when its oneof is empty."""
    name = entity.WhichOneof("entity")
    return _KIND_BY_FIELD[name] if name else registry_pb2.ENTITY_KIND_UNSPECIFIED


def entity_key(entity: registry_pb2.Entity) -> Key:
    """The entity's (kind, id) key; ids are joined as in registry.proto's EntityKey comment."""
    kind = entity_kind(entity)
    if kind == REGION:
        return kind, entity.region.id
    if kind == MODEL:
        return kind, entity.model.id
    if kind == VERSION:
        return kind, version_id(entity.version.model, entity.version.version)
    if kind == ALIAS:
        return kind, entity.alias.name
    if kind == PLACEMENT:
        p = entity.placement
        return kind, f"{version_id(p.model, p.version)}/{p.region}/{p.pool}"
    if kind == REPLICA:
        return kind, entity.replica.id
    raise ValidationError("entity", "exactly one entity kind must be set")


def version_id(model: str, version: str) -> str:
    """Key of a version: "<model>@<version>"."""
    return f"{model}@{version}"


def to_proto_key(key: Key) -> registry_pb2.EntityKey:
    """The wire form of a key."""
    return registry_pb2.EntityKey(kind=key[0], id=key[1])


def snapshot_from_state(state: State, revision: int) -> registry_pb2.Snapshot:
    """A Snapshot of `state` at `revision`, each kind sorted by key (as registry.proto says)."""
    snapshot = registry_pb2.Snapshot(revision=revision)
    for key in sorted(state):
        entity = state[key]
        field = _FIELD_BY_KIND[key[0]]
        getattr(snapshot, _SNAPSHOT_FIELD_BY_KIND[key[0]]).append(getattr(entity, field))
    return snapshot


def state_from_snapshot(snapshot: registry_pb2.Snapshot) -> dict[Key, registry_pb2.Entity]:
    """The state a Snapshot describes (inverse of `snapshot_from_state`)."""
    entities: list[registry_pb2.Entity] = []
    entities += (registry_pb2.Entity(region=e) for e in snapshot.regions)
    entities += (registry_pb2.Entity(model=e) for e in snapshot.models)
    entities += (registry_pb2.Entity(version=e) for e in snapshot.versions)
    entities += (registry_pb2.Entity(alias=e) for e in snapshot.aliases)
    entities += (registry_pb2.Entity(placement=e) for e in snapshot.placements)
    entities += (registry_pb2.Entity(replica=e) for e in snapshot.replicas)
    return {entity_key(e): e for e in entities}


def apply_changes(
    state: dict[Key, registry_pb2.Entity], changes: Iterable[registry_pb2.Change]
) -> None:
    """Apply committed changes to `state` in place (how watchers follow the store)."""
    for change in changes:
        key = entity_key(change.entity)
        if change.kind == registry_pb2.CHANGE_KIND_DELETE:
            state.pop(key, None)
        else:
            state[key] = change.entity


class Store(abc.ABC):
    """A versioned registry store. Implementations must be safe to call from many threads."""

    @abc.abstractmethod
    def registry_id(self) -> str:
        """The store's identity: random, fixed when the store was created, never empty.

        Reopening the same store gives the same id; a store created anew (a new SQLite file,
        an emptied Consul prefix) gets a new one. Watchers use it to tell whether a revision
        they hold belongs to this store (registry.proto, "Identity").
        """

    @abc.abstractmethod
    def revision(self) -> int:
        """The current revision (0 for an empty store)."""

    @abc.abstractmethod
    def get(self, key: Key) -> registry_pb2.Entity:
        """The entity at `key`; raises NotFound when absent."""

    def read(self, key: Key) -> tuple[registry_pb2.Entity, int]:
        """The entity at `key` with the revision it was read at (one consistent read).

        Raises NotFound when absent. Callers doing read-modify-write pass the revision as
        `expected_revision`. This default reads a full snapshot; stores should override it.
        """
        snapshot = self.snapshot()
        entity = state_from_snapshot(snapshot).get(key)
        if entity is None:
            raise NotFound(key)
        return entity, snapshot.revision

    @abc.abstractmethod
    def snapshot(self) -> registry_pb2.Snapshot:
        """The full state at the current revision, consistent (one revision)."""

    @abc.abstractmethod
    def apply(
        self, mutations: list[registry_pb2.Mutation], expected_revision: int | None = None
    ) -> tuple[int, list[registry_pb2.Change]]:
        """Apply `mutations` in order, atomically, at one new revision.

        Returns (revision, effective changes). No-op puts and deletes of absent keys are
        left out of the changes; when none remain nothing is committed and the current
        revision is returned. Raises RevisionMismatch when `expected_revision` is set and
        differs from the current revision, ValidationError / PreconditionFailed when the
        mutations or the resulting state are invalid; on any error nothing is written.
        """

    @abc.abstractmethod
    def changes_since(self, revision: int) -> list[registry_pb2.WatchEvent] | None:
        """One changes event per revision after `revision`, in order and without gaps.

        Returns [] when `revision` is current, and None when the history no longer reaches
        back to `revision` (or it is ahead of the store): the caller must take a snapshot.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; the store must not be used afterwards."""


class MemoryCachedStore(Store):
    """A store that keeps the whole state in memory and brings it up to date from its
    backend (`_refresh`) before every read, under `_lock`. Subclasses set `_lock`, `_state`
    and `_revision` and implement `_refresh`; reads are answered from memory."""

    _lock: threading.Lock
    _state: dict[Key, registry_pb2.Entity]
    _revision: int

    @abc.abstractmethod
    def _refresh(self) -> None:
        """Bring `_state`/`_revision` up to the backend's latest (caller holds `_lock`)."""

    def revision(self) -> int:
        """The current revision."""
        with self._lock:
            self._refresh()
            return self._revision

    def get(self, key: Key) -> registry_pb2.Entity:
        """The entity at `key` (a copy); raises NotFound when absent."""
        return self.read(key)[0]

    def read(self, key: Key) -> tuple[registry_pb2.Entity, int]:
        """The entity at `key` (a copy) and the revision it was read at; raises NotFound."""
        with self._lock:
            self._refresh()
            entity, revision = self._state.get(key), self._revision
        if entity is None:
            raise NotFound(key)
        copy = registry_pb2.Entity()
        copy.CopyFrom(entity)
        return copy, revision
