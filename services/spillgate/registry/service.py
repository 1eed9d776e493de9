"""The registry's gRPC face: RegistryService over a `Store`, served by grpc.aio.

Store calls block (SQLite), so they run in worker threads. Watchers never trust the wake-up
itself for content: after each wake-up (or idle timeout) they read the store's history from
the last revision they sent, so a stream can have no gap or reordering whatever the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc

from spillgate._proto import common_pb2, registry_pb2, registry_pb2_grpc
from spillgate.registry.directory import ReplicaDirectory
from spillgate.registry.errors import to_rpc_error
from spillgate.registry.leases import Leases
from spillgate.registry.store import (
    PLACEMENT,
    REGION,
    REPLICA,
    EntityKind,
    Key,
    NotFound,
    RevisionMismatch,
    Store,
    ValidationError,
    entity_key,
    entity_kind,
    kind_name,
    state_from_snapshot,
)
from spillgate.registry.validate import plan_apply, validate_entity
from spillgate.status import ServiceError, guard

log = logging.getLogger(__name__)
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ServiceConfig:
    """Service tunables (milliseconds)."""

    default_lease_ms: int = 10_000
    min_lease_ms: int = 100
    max_lease_ms: int = 300_000
    # How often lease expiry is checked; bounds how late a lapsed lease is noticed.
    lease_check_ms: int = 50
    default_progress_ms: int = 5_000
    # Apply with prune_kinds and no expected_revision retries on concurrent writes.
    prune_retries: int = 5
    # Committed revisions kept in memory for watchers, so N watchers following a write cost
    # one store read, not N (older resumes read the store's history).
    recent_events: int = 1024


class RevisionNotifier:
    """Wakes watchers after a committed write; holds only the latest revision."""

    def __init__(self, revision: int) -> None:
        self._revision = revision
        self._cond = asyncio.Condition()

    @property
    def revision(self) -> int:
        """The latest published revision."""
        return self._revision

    async def publish(self, revision: int) -> None:
        """Record that `revision` is committed and wake every waiter."""
        async with self._cond:
            if revision > self._revision:
                self._revision = revision
                self._cond.notify_all()

    async def wait_past(self, revision: int, timeout: float) -> bool:
        """Wait until a revision above `revision` is published; False on timeout."""
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self._revision > revision), timeout
                )
            except TimeoutError:
                return False
        return True


def _key(key: registry_pb2.EntityKey, field: str = "key") -> Key:
    if kind_name(key.kind) == "unknown":
        raise ValidationError(f"{field}.kind", "must be set")
    if not key.id:
        raise ValidationError(f"{field}.id", "must not be empty")
    return key.kind, key.id


def _in_region(entity: registry_pb2.Entity, region: str) -> bool:
    kind = entity_kind(entity)
    if kind == REGION:
        return entity.region.id == region
    if kind == PLACEMENT:
        return entity.placement.region == region
    if kind == REPLICA:
        return entity.replica.region == region
    return True


def _filtered(event: registry_pb2.WatchEvent, kinds: set[EntityKind]) -> registry_pb2.WatchEvent:
    """The event with only changes to `kinds`; a progress event when none remain."""
    if not kinds:
        return event
    kept = [c for c in event.changes.changes if entity_kind(c.entity) in kinds]
    if not kept:
        return registry_pb2.WatchEvent(revision=event.revision)
    return registry_pb2.WatchEvent(
        revision=event.revision, changes=registry_pb2.ChangeSet(changes=kept)
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """RegistryService over `store`. Call `start()` inside the event loop, `close()` after.

    With a `directory`, leased replicas are also announced there (registered, renewed,
    removed) once the store committed; the directory never affects an RPC's outcome. The
    caller owns the directory (the service does not close it).
    """

    def __init__(
        self,
        store: Store,
        config: ServiceConfig | None = None,
        clock: Callable[[], datetime] = _utcnow,
        directory: ReplicaDirectory | None = None,
    ) -> None:
        self._store = store
        self._directory = directory
        self._config = config or ServiceConfig()
        self._clock = clock
        self._leases = Leases(clock)
        self._lease_lock = asyncio.Lock()
        self._registry_id = store.registry_id()
        self._notifier = RevisionNotifier(store.revision())
        self._recent: dict[int, registry_pb2.WatchEvent] = {}
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Give replicas already stored a fresh default lease and start expiring leases."""
        snapshot = await asyncio.to_thread(self._store.snapshot)
        length = timedelta(milliseconds=self._config.default_lease_ms)
        for replica in snapshot.replicas:
            self._leases.grant(replica.id, length)
        self._expiry = asyncio.create_task(self._expire_forever())

    async def close(self) -> None:
        """Stop the lease expiry task."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry

    # -- plumbing ---------------------------------------------------------------------------

    async def _guard(self, context: Context, work: Awaitable[T]) -> T:
        return await guard(context, work, to_rpc_error)

    def _announce(self, tell: Callable[[ReplicaDirectory], None]) -> None:
        """Tell the directory (if any); its failures are logged, never passed on."""
        if self._directory is None:
            return
        try:
            tell(self._directory)
        except Exception:
            log.exception("replica directory failed")

    async def _apply(
        self, mutations: list[registry_pb2.Mutation], expected_revision: int | None
    ) -> tuple[int, list[registry_pb2.Change]]:
        revision, changes = await asyncio.to_thread(self._store.apply, mutations, expected_revision)
        # Every way a replica leaves (lease run out twice, Delete, Apply) comes through here.
        gone = [
            c.entity.replica.id
            for c in changes
            if c.kind == registry_pb2.CHANGE_KIND_DELETE and entity_kind(c.entity) == REPLICA
        ]
        if gone:

            def tell(directory: ReplicaDirectory) -> None:
                for replica in gone:
                    directory.removed(replica)

            self._announce(tell)
        if changes:
            event = registry_pb2.WatchEvent(revision=revision)
            event.changes.changes.extend(changes)
            self._recent[revision] = event
            self._recent.pop(revision - self._config.recent_events, None)
            await self._notifier.publish(revision)
        return revision, changes

    async def _snapshot(self) -> registry_pb2.Snapshot:
        """The store's latest snapshot, stamped with the registry id."""
        snapshot = await asyncio.to_thread(self._store.snapshot)
        snapshot.registry_id = self._registry_id
        return snapshot

    async def _changes_since(self, revision: int) -> list[registry_pb2.WatchEvent] | None:
        """Events after `revision`: from memory when every one is there, else the store."""
        events = []
        latest = self._notifier.revision
        for r in range(revision + 1, latest + 1):
            event = self._recent.get(r)
            if event is None:
                return await asyncio.to_thread(self._store.changes_since, revision)
            events.append(event)
        if revision > latest:
            return await asyncio.to_thread(self._store.changes_since, revision)
        return events

    # -- reads ------------------------------------------------------------------------------

    async def Get(
        self, request: registry_pb2.GetRequest, context: Context
    ) -> registry_pb2.GetResponse:
        """Read one entity with the revision it was read at."""

        async def work() -> registry_pb2.GetResponse:
            entity, revision = await asyncio.to_thread(self._store.read, _key(request.key))
            return registry_pb2.GetResponse(entity=entity, revision=revision)

        return await self._guard(context, work())

    async def List(
        self, request: registry_pb2.ListRequest, context: Context
    ) -> registry_pb2.ListResponse:
        """All entities of one kind (optionally one region's), sorted by key, at one revision."""

        async def work() -> registry_pb2.ListResponse:
            if kind_name(request.kind) == "unknown":
                raise ValidationError("kind", "must be set")
            snapshot = await asyncio.to_thread(self._store.snapshot)
            state = state_from_snapshot(snapshot)
            entities = [
                state[key]
                for key in sorted(state)
                if key[0] == request.kind
                and (not request.region or _in_region(state[key], request.region))
            ]
            return registry_pb2.ListResponse(entities=entities, revision=snapshot.revision)

        return await self._guard(context, work())

    async def GetSnapshot(
        self, request: registry_pb2.GetSnapshotRequest, context: Context
    ) -> registry_pb2.GetSnapshotResponse:
        """The latest snapshot; older revisions are not kept (OUT_OF_RANGE)."""

        async def work() -> registry_pb2.GetSnapshotResponse:
            snapshot = await self._snapshot()
            if request.revision not in (0, snapshot.revision):
                raise ServiceError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"only the latest snapshot is kept (revision {snapshot.revision}); "
                    f"revision {request.revision} is not available",
                )
            return registry_pb2.GetSnapshotResponse(snapshot=snapshot)

        return await self._guard(context, work())

    # -- writes -----------------------------------------------------------------------------

    async def Put(
        self, request: registry_pb2.PutRequest, context: Context
    ) -> registry_pb2.PutResponse:
        """Create or replace one entity (CAS with expected_revision)."""

        async def work() -> registry_pb2.PutResponse:
            expected = request.expected_revision if request.HasField("expected_revision") else None
            mutation = registry_pb2.Mutation(put=request.entity)
            revision, _ = await self._apply([mutation], expected)
            return registry_pb2.PutResponse(revision=revision)

        return await self._guard(context, work())

    async def Delete(
        self, request: registry_pb2.DeleteRequest, context: Context
    ) -> registry_pb2.DeleteResponse:
        """Delete one entity (CAS with expected_revision); found=False when it was absent."""

        async def work() -> registry_pb2.DeleteResponse:
            _key(request.key)
            expected = request.expected_revision if request.HasField("expected_revision") else None
            mutation = registry_pb2.Mutation(delete=request.key)
            revision, changes = await self._apply([mutation], expected)
            return registry_pb2.DeleteResponse(revision=revision, found=bool(changes))

        return await self._guard(context, work())

    async def Apply(
        self, request: registry_pb2.ApplyRequest, context: Context
    ) -> registry_pb2.ApplyResponse:
        """Apply mutations in one transaction; dry_run plans without writing."""
        return await self._guard(context, self._apply_request(request))

    async def _apply_request(
        self, request: registry_pb2.ApplyRequest
    ) -> registry_pb2.ApplyResponse:
        for i, kind in enumerate(request.prune_kinds):
            if kind_name(kind) == "unknown":
                raise ValidationError(f"prune_kinds[{i}]", "must be a known kind")
        expected = request.expected_revision if request.HasField("expected_revision") else None
        attempts = 1 if expected is not None else self._config.prune_retries
        if not request.prune_kinds and not request.dry_run:
            # Nothing to read first: don't pay for a snapshot (O(state)) on every write.
            revision, changes = await self._apply(list(request.mutations), expected)
            return registry_pb2.ApplyResponse(
                revision=revision, changes=changes, committed=bool(changes)
            )
        for attempt in range(attempts):
            snapshot = await asyncio.to_thread(self._store.snapshot)
            mutations = list(request.mutations) + self._prunes(request, snapshot)
            if request.dry_run:
                if expected is not None and expected != snapshot.revision:
                    raise RevisionMismatch(snapshot.revision, expected)
                _, changes = plan_apply(state_from_snapshot(snapshot), mutations, self._clock())
                return registry_pb2.ApplyResponse(
                    revision=snapshot.revision, changes=changes, committed=False
                )
            # Prunes were computed at snapshot.revision, so they only hold at that revision.
            cas = expected if expected is not None or not request.prune_kinds else snapshot.revision
            try:
                revision, changes = await self._apply(mutations, cas)
            except RevisionMismatch:
                if expected is not None or attempt + 1 == attempts:
                    raise
                continue
            return registry_pb2.ApplyResponse(
                revision=revision, changes=changes, committed=bool(changes)
            )
        raise AssertionError("unreachable")

    @staticmethod
    def _prunes(
        request: registry_pb2.ApplyRequest, snapshot: registry_pb2.Snapshot
    ) -> list[registry_pb2.Mutation]:
        """Deletes for entities of the pruned kinds that no mutation puts."""
        if not request.prune_kinds:
            return []
        kinds = set(request.prune_kinds)
        put: set[Key] = set()
        for m in request.mutations:
            if m.WhichOneof("mutation") == "put":
                validate_entity(m.put)
                put.add(entity_key(m.put))
        return [
            registry_pb2.Mutation(delete=registry_pb2.EntityKey(kind=k, id=i))
            for k, i in sorted(state_from_snapshot(snapshot))
            if k in kinds and (k, i) not in put
        ]

    # -- watch ------------------------------------------------------------------------------

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[registry_pb2.WatchResponse]:
        """Snapshot (unless resumable from history), then every revision in order."""
        try:
            async for event in self._watch(request):
                # The constructor copies the event (which may be shared with other watchers).
                response = registry_pb2.WatchResponse(event=event)
                response.event.registry_id = self._registry_id
                yield response
        except Exception as exc:
            error = to_rpc_error(exc)
            await context.abort(error.code, error.message, error.trailing_metadata())

    async def _watch(
        self, request: registry_pb2.WatchRequest
    ) -> AsyncIterator[registry_pb2.WatchEvent]:
        for i, kind in enumerate(request.kinds):
            if kind_name(kind) == "unknown":
                raise ValidationError(f"kinds[{i}]", "must be a known kind")
        kinds = set(request.kinds)
        idle = (request.progress_interval_ms or self._config.default_progress_ms) / 1000
        last = request.from_revision
        # A revision of another registry says nothing about this one's history.
        foreign = request.registry_id not in ("", self._registry_id)
        events = None if last == 0 or foreign else await self._changes_since(last)
        while True:
            if events is None:
                # Not resumable (first watch, another registry's revision, or fell out of
                # the retained history).
                snapshot = await self._snapshot()
                yield registry_pb2.WatchEvent(revision=snapshot.revision, snapshot=snapshot)
                last, events = snapshot.revision, []
            for event in events:
                yield _filtered(event, kinds)
                last = event.revision
            woken = await self._notifier.wait_past(last, idle)
            if woken:
                events = await self._changes_since(last)
            else:
                # Idle: ask the store itself, which also sees writes made by other processes.
                events = await asyncio.to_thread(self._store.changes_since, last)
            if not woken and events == []:
                yield registry_pb2.WatchEvent(revision=last)

    # -- replicas and leases ----------------------------------------------------------------

    def _lease_length(self, lease_ms: int) -> timedelta:
        c = self._config
        ms = min(max(lease_ms or c.default_lease_ms, c.min_lease_ms), c.max_lease_ms)
        return timedelta(milliseconds=ms)

    async def RegisterReplica(
        self, request: registry_pb2.RegisterReplicaRequest, context: Context
    ) -> registry_pb2.RegisterReplicaResponse:
        """Add or replace a replica (no CAS) and start its lease."""

        async def work() -> registry_pb2.RegisterReplicaResponse:
            if not request.HasField("replica"):
                raise ValidationError("replica", "must be set")
            length = self._lease_length(request.lease_ms)
            entity = registry_pb2.Entity(replica=request.replica)
            validate_entity(entity)
            async with self._lease_lock:
                entity.replica.lease_expires_at.FromDatetime(self._clock() + length)
                revision, _ = await self._apply([registry_pb2.Mutation(put=entity)], None)
                self._leases.grant(entity.replica.id, length)
                self._announce(lambda d: d.registered(entity.replica, length))
            return registry_pb2.RegisterReplicaResponse(
                replica=entity.replica,
                revision=revision,
                lease_ms=int(length / timedelta(milliseconds=1)),
            )

        return await self._guard(context, work())

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: Context
    ) -> registry_pb2.HeartbeatResponse:
        """Renew a live lease; writes a revision only when state or loaded changed."""
        return await self._guard(context, self._heartbeat(request))

    async def _heartbeat(
        self, request: registry_pb2.HeartbeatRequest
    ) -> registry_pb2.HeartbeatResponse:
        if not request.replica:
            raise ValidationError("replica", "must not be empty")
        length = self._lease_length(request.lease_ms)
        gone = ServiceError(
            grpc.StatusCode.NOT_FOUND,
            f"replica {request.replica!r} has no live lease; register it again",
        )
        async with self._lease_lock:
            try:
                entity, revision = await asyncio.to_thread(
                    self._store.read, (REPLICA, request.replica)
                )
            except NotFound:
                self._leases.drop(request.replica)
                raise gone from None
            expires_at = self._leases.renew(request.replica, length)
            if expires_at is None:
                raise gone
            updated = registry_pb2.Entity()
            updated.CopyFrom(entity)
            if request.state != common_pb2.REPLICA_STATE_UNSPECIFIED:
                updated.replica.state = request.state
            if request.update_loaded:
                del updated.replica.loaded[:]
                updated.replica.loaded.extend(request.loaded)
            if updated != entity:
                updated.replica.lease_expires_at.FromDatetime(expires_at)
                revision, _ = await self._apply([registry_pb2.Mutation(put=updated)], None)
            self._announce(lambda d: d.renewed(updated.replica, length))
        response = registry_pb2.HeartbeatResponse(revision=revision)
        response.lease_expires_at.FromDatetime(expires_at)
        return response

    async def _expire_forever(self) -> None:
        interval = self._config.lease_check_ms / 1000
        while True:
            try:
                await self.expire_leases()
            except Exception:
                # Keep expiring: one failed write must not stop lease handling for good.
                log.exception("lease expiry failed; retrying")
            await asyncio.sleep(interval)

    async def expire_leases(self) -> None:
        """Mark replicas with a lapsed lease NOT_READY, and remove those lapsed twice.

        Each step is one committed write per replica, so watchers see it as a change event.
        """
        async with self._lease_lock:
            lapsed, dead = self._leases.due()
            for replica in lapsed:
                await self._mark_not_ready(replica)
            for replica in dead:
                delete = registry_pb2.EntityKey(kind=REPLICA, id=replica)
                await self._apply([registry_pb2.Mutation(delete=delete)], None)
                self._leases.drop(replica)
                log.info("replica %s removed: lease expired", replica)

    async def _mark_not_ready(self, replica: str) -> None:
        try:
            entity, _ = await asyncio.to_thread(self._store.read, (REPLICA, replica))
        except NotFound:
            self._leases.drop(replica)
            return
        entity.replica.state = common_pb2.REPLICA_STATE_NOT_READY
        await self._apply([registry_pb2.Mutation(put=entity)], None)
        self._leases.mark_expired(replica)
        log.info("replica %s marked not ready: lease expired", replica)
