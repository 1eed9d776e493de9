"""RegistryClient: a local, always-readable copy of the registry, kept current by Watch.

Admission, gateway and control plane read the registry through this client. Reads never
touch the network: they see the last state the client holds, at one revision. A background
task follows `RegistryService.Watch` and, after any disconnect, reconnects with jittered
exponential backoff and resumes from the held revision (the registry replays its history,
or sends a fresh snapshot when the history no longer reaches back). A registry outage only
makes the state stale (`staleness_s()` grows); it never makes reads fail (DESIGN.md,
Principles 1 and 6).

Every event is checked against the ordering registry.proto guarantees (one changes event
per revision, contiguous, after a snapshot); an event that breaks it is never applied: the
client drops the stream and resumes from the revision it holds.

Revisions are only comparable within one registry (registry.proto, "Identity"): the client
keeps the registry_id of the state it holds (in the cache too) and resumes with it, so a
registry that was recreated, or another one at the same address, answers with a fresh
snapshot instead of changes the held state never saw. A changes or progress event from
another registry is a protocol error and is never applied.

With `ClientConfig.cache_path` the state is also persisted (atomically) so a process that
restarts while the registry is down starts from the last known state.

The client is not thread-safe: use it from the event loop it was started in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from spillgate._proto import registry_pb2, registry_pb2_grpc
from spillgate.registry.store import (
    EntityKind,
    Key,
    StoreError,
    apply_changes,
    entity_key,
    kind_name,
    snapshot_from_state,
    state_from_snapshot,
)

log = logging.getLogger(__name__)

# First line of a cache file; the format number changes with any incompatible change.
_CACHE_MAGIC = b"spillgate-registry-cache 1\n"
# A snapshot of 3 regions x 10,000 replicas is ~4.1 MiB, over gRPC's 4 MiB default; the
# server (app.py) and every registry channel allow this much.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

Listener = Callable[[int], None]
_WatchCall = grpc.aio.UnaryStreamCall[registry_pb2.WatchRequest, registry_pb2.WatchResponse]


@dataclass(frozen=True)
class ClientConfig:
    """RegistryClient tunables (milliseconds unless named otherwise).

    Reconnect delays start at `reconnect_initial_ms`, grow by `reconnect_multiplier` per
    failed attempt up to `reconnect_max_ms`, and each is shortened by a random fraction of
    up to `reconnect_jitter` (so a fleet restarted together does not reconnect in step).
    The delay resets once a stream delivers a valid event.
    """

    reconnect_initial_ms: int = 100
    reconnect_max_ms: int = 5_000
    reconnect_multiplier: float = 2.0
    reconnect_jitter: float = 0.2
    # Asked of the server: an idle stream sends a progress event this often, so a healthy
    # client's staleness stays below about this interval.
    progress_interval_ms: int = 1_000
    # A stream silent for this long (not even progress) is dropped and reconnected: it
    # catches half-open connections that would otherwise look connected forever.
    idle_timeout_ms: int = 5_000
    # Where the last state is persisted (None = nowhere). Loaded by `start()` when the file
    # is readable and was written for compatible `kinds`.
    cache_path: str | Path | None = None
    # Minimum time between two cache writes; `close()` writes the latest state regardless.
    cache_interval_ms: int = 1_000

    def __post_init__(self) -> None:
        if self.reconnect_initial_ms <= 0:
            raise ValueError("reconnect_initial_ms must be positive")
        if self.reconnect_max_ms < self.reconnect_initial_ms:
            raise ValueError("reconnect_max_ms must be at least reconnect_initial_ms")
        if self.reconnect_multiplier < 1:
            raise ValueError("reconnect_multiplier must be at least 1")
        if not 0 <= self.reconnect_jitter < 1:
            raise ValueError("reconnect_jitter must be in [0, 1)")
        if self.progress_interval_ms <= 0:
            raise ValueError("progress_interval_ms must be positive")
        if self.idle_timeout_ms <= self.progress_interval_ms:
            raise ValueError("idle_timeout_ms must exceed progress_interval_ms")
        if self.cache_interval_ms < 0:
            raise ValueError("cache_interval_ms must not be negative")


@dataclass
class ClientStats:
    """Counters since the client was created (for metrics and tests)."""

    snapshots: int = 0
    change_events: int = 0
    progress_events: int = 0
    stream_failures: int = 0
    protocol_errors: int = 0
    cache_loads: int = 0
    cache_writes: int = 0
    # Snapshots that replaced state held from another registry (another registry_id).
    registry_changes: int = 0


class ProtocolError(Exception):
    """The server sent an event that breaks the Watch ordering contract."""


class _StreamDropped(Exception):
    """The call was cancelled locally (`_drop_stream`) while the client keeps running."""


@dataclass(frozen=True)
class _Cached:
    snapshot: registry_pb2.Snapshot
    kinds: frozenset[EntityKind]
    # Wall-clock time (seconds since the epoch) the state was last confirmed by the registry.
    heard_at: float


class RegistryClient:
    """A watched, local copy of the registry (or of some entity kinds of it).

    `target` is the registry's gRPC address ("host:port"). With `kinds`, only entities of
    those kinds are held (the server filters changes; snapshots are filtered here), and
    `revision` still follows the registry's revision. `clock` (monotonic seconds) measures
    staleness; `wall_clock` (seconds since the epoch) only dates the cache file; `rng` draws
    reconnect jitter.
    """

    def __init__(
        self,
        target: str,
        *,
        kinds: Sequence[EntityKind] = (),
        config: ClientConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        for kind in kinds:
            if kind_name(kind) == "unknown":
                raise ValueError(f"unknown entity kind {kind}")
        self._target = target
        self._kinds = frozenset(kinds)
        self._config = config or ClientConfig()
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        # Copy-on-write: a published dict is never mutated, so readers get a consistent
        # view at one revision for free and may keep it as long as they like.
        self._state: Mapping[Key, registry_pb2.Entity] = types.MappingProxyType({})
        self._revision = 0
        # registry_id of the held state; "" = unknown (none held, or from an older registry
        # or cache that had none: such state resumes unchecked once).
        self._registry_id = ""
        self._has_state = False
        self._from_cache = False
        self._heard_at: float | None = None
        self._connected = False
        self._stats = ClientStats()
        self._listeners: list[Listener] = []
        # Replaced (after being set) on every update: waiters wake, then re-check.
        self._updated = asyncio.Event()
        self._dirty = asyncio.Event()
        # (revision, registry_id) last written to the cache.
        self._persisted: tuple[int, str] | None = None
        self._pending_write: asyncio.Future[None] | None = None
        self._call: _WatchCall | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._persist_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the cache (if configured and usable) and start following the registry.

        Returns at once: it does not wait for the registry (see `wait_ready`). Raises
        RuntimeError when called twice.
        """
        if self._started:
            raise RuntimeError("RegistryClient.start() called twice")
        self._started = True
        path = self._config.cache_path
        if path is not None:
            cached = await asyncio.to_thread(_read_cache, Path(path))
            if cached is not None:
                self._load_cached(cached)
            self._persist_task = asyncio.create_task(
                self._persist_forever(), name=f"registry-cache {path}"
            )
        self._watch_task = asyncio.create_task(
            self._watch_forever(), name=f"registry-watch {self._target}"
        )

    async def close(self) -> None:
        """Stop watching, write the cache one last time, and release the connection.

        Idempotent. The state stays readable after close (it just never changes again).
        """
        if self._closed:
            return
        self._closed = True
        for task in (self._watch_task, self._persist_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._pending_write is not None:
            # A write cancelled mid-flight still runs in its thread: let it finish first
            # so it cannot replace the final write below with an older state.
            with contextlib.suppress(Exception):
                await self._pending_write
        if self._config.cache_path is not None and self._needs_persist():
            await self._persist()
        self._connected = False

    async def __aenter__(self) -> RegistryClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reads ------------------------------------------------------------------------------

    @property
    def target(self) -> str:
        """The registry address this client watches."""
        return self._target

    @property
    def kinds(self) -> frozenset[EntityKind]:
        """Entity kinds held; empty = all."""
        return self._kinds

    @property
    def revision(self) -> int:
        """Registry revision the state is at (0 before any state)."""
        return self._revision

    @property
    def state(self) -> Mapping[Key, registry_pb2.Entity]:
        """The held entities by key: a read-only mapping, consistent at `revision`.

        O(1). The mapping returned never changes (updates publish a new one), so it can be
        kept across awaits. The entities are shared: do not mutate them.
        """
        return self._state

    @property
    def registry_id(self) -> str:
        """Identity of the registry the held state came from; "" when unknown."""
        return self._registry_id

    @property
    def ready(self) -> bool:
        """Whether any state is held (from the registry or the cache)."""
        return self._has_state

    @property
    def connected(self) -> bool:
        """Whether a watch stream is up and has delivered a valid event."""
        return self._connected

    @property
    def from_cache(self) -> bool:
        """True while the state is the one loaded from the cache, not yet confirmed."""
        return self._from_cache

    @property
    def stats(self) -> ClientStats:
        """A copy of the client's counters."""
        return dataclasses.replace(self._stats)

    def staleness_s(self) -> float:
        """Seconds since the registry last confirmed the state (any event, progress too).

        For a state loaded from the cache this counts from when the registry last confirmed
        it before it was persisted. `math.inf` before any state: missing data is the
        stalest (DESIGN.md, Principle 6).
        """
        if self._heard_at is None:
            return math.inf
        return max(0.0, self._clock() - self._heard_at)

    def snapshot(self) -> registry_pb2.Snapshot:
        """The held state as a Snapshot at `revision` (each kind sorted by key)."""
        snapshot = snapshot_from_state(self._state, self._revision)
        snapshot.registry_id = self._registry_id
        return snapshot

    def entities(self, kind: EntityKind) -> list[registry_pb2.Entity]:
        """The held entities of `kind`, sorted by key ([] when the kind is not held)."""
        return [self._state[key] for key in sorted(k for k in self._state if k[0] == kind)]

    def get(self, key: Key) -> registry_pb2.Entity | None:
        """The held entity at `key`, or None."""
        return self._state.get(key)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until some state is held (from the registry or the cache).

        Raises TimeoutError naming the target when none arrives within `timeout` seconds.
        """
        await self._wait(
            lambda: self._has_state,
            timeout,
            lambda: (
                f"no registry state from {self._target} within {timeout}s "
                f"(connected={self._connected}, no usable cache)"
            ),
        )

    async def wait_for_revision(self, revision: int, timeout: float) -> None:
        """Wait until the held state is at `revision` or later.

        Raises TimeoutError (with the revision reached) when it is not within `timeout`
        seconds.
        """
        await self._wait(
            lambda: self._has_state and self._revision >= revision,
            timeout,
            lambda: (
                f"registry client for {self._target} is at revision {self._revision}, "
                f"not {revision}, after {timeout}s (connected={self._connected})"
            ),
        )

    async def _wait(
        self, done: Callable[[], bool], timeout: float, describe: Callable[[], str]
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    await self._updated.wait()
        except TimeoutError:
            raise TimeoutError(describe()) from None

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(revision)` after every change of `state`; returns an unsubscriber.

        Listeners run synchronously in the event loop right after the update (snapshot,
        changes or cache load), so they must be quick; a listener that raises is logged and
        kept. Updates are not coalesced.
        """
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    # -- test hook --------------------------------------------------------------------------

    def _drop_stream(self) -> None:
        """Cancel the current watch stream; the client reconnects and resumes (tests)."""
        if self._call is not None:
            self._call.cancel()

    # -- state updates ----------------------------------------------------------------------

    def _notify(self, state_changed: bool) -> None:
        self._dirty.set()
        updated, self._updated = self._updated, asyncio.Event()
        updated.set()
        if not state_changed:
            return
        for listener in list(self._listeners):
            try:
                listener(self._revision)
            except Exception:
                log.exception("registry client listener failed")

    def _publish(
        self, state: dict[Key, registry_pb2.Entity], revision: int, registry_id: str
    ) -> None:
        self._state = types.MappingProxyType(state)
        self._revision = revision
        self._registry_id = registry_id
        self._has_state = True
        self._notify(state_changed=True)

    def _held(self, state: dict[Key, registry_pb2.Entity]) -> dict[Key, registry_pb2.Entity]:
        if not self._kinds:
            return state
        return {key: entity for key, entity in state.items() if key[0] in self._kinds}

    def _load_cached(self, cached: _Cached) -> None:
        if cached.kinds and not (self._kinds and self._kinds <= cached.kinds):
            log.warning(
                "registry cache %s holds only kinds %s; ignoring it",
                self._config.cache_path,
                sorted(kind_name(k) for k in cached.kinds),
            )
            return
        age = max(0.0, self._wall_clock() - cached.heard_at)
        self._heard_at = self._clock() - age
        self._from_cache = True
        self._persisted = (cached.snapshot.revision, cached.snapshot.registry_id)
        self._stats.cache_loads += 1
        log.info(
            "registry state loaded from cache %s at revision %d (%.1fs old)",
            self._config.cache_path,
            cached.snapshot.revision,
            age,
        )
        self._publish(
            self._held(state_from_snapshot(cached.snapshot)),
            cached.snapshot.revision,
            cached.snapshot.registry_id,
        )

    def _on_event(self, event: registry_pb2.WatchEvent) -> None:
        """Apply one event, or raise ProtocolError leaving the state untouched."""
        which = event.WhichOneof("event")
        revision = event.revision
        registry_id = event.registry_id or event.snapshot.registry_id
        if which == "snapshot":
            if event.snapshot.revision != revision:
                raise ProtocolError(
                    f"snapshot at revision {event.snapshot.revision} in an event "
                    f"for revision {revision}"
                )
            try:
                state = state_from_snapshot(event.snapshot)
            except StoreError as exc:
                raise ProtocolError(f"malformed snapshot: {exc}") from None
            if self._has_state and self._registry_id not in ("", registry_id):
                log.warning(
                    "registry %s is another registry (id %s, was %s): state replaced",
                    self._target,
                    registry_id or "unknown",
                    self._registry_id,
                )
                self._stats.registry_changes += 1
            elif self._has_state and revision < self._revision:
                # Legal (the registry was restored from an older copy), but worth a trace.
                log.warning(
                    "registry %s went back from revision %d to %d",
                    self._target,
                    self._revision,
                    revision,
                )
            self._stats.snapshots += 1
            self._confirmed()
            self._publish(self._held(state), revision, registry_id)
            return
        if not self._has_state:
            raise ProtocolError(f"{which or 'progress'} at revision {revision} before any snapshot")
        if registry_id and self._registry_id and registry_id != self._registry_id:
            raise ProtocolError(
                f"{which or 'progress'} from registry {registry_id} while holding state of "
                f"registry {self._registry_id}"
            )
        # Held state of unknown origin (an older cache) adopts the id of the registry that
        # resumed it: from here on it is checked.
        registry_id = self._registry_id or registry_id
        if which == "changes":
            if revision != self._revision + 1:
                raise ProtocolError(
                    f"changes for revision {revision} while at revision {self._revision} "
                    f"(expected {self._revision + 1})"
                )
            changes = list(event.changes.changes)
            for change in changes:
                if change.kind not in (
                    registry_pb2.CHANGE_KIND_PUT,
                    registry_pb2.CHANGE_KIND_DELETE,
                ):
                    raise ProtocolError(f"change of unknown kind {change.kind}")
                try:
                    entity_key(change.entity)
                except StoreError as exc:
                    raise ProtocolError(f"malformed change: {exc}") from None
            if self._kinds:
                changes = [c for c in changes if entity_key(c.entity)[0] in self._kinds]
            state = dict(self._state)
            apply_changes(state, changes)
            self._stats.change_events += 1
            self._confirmed()
            self._publish(state, revision, registry_id)
        else:
            # Progress: nothing (of our kinds) changed up to `revision`.
            if revision < self._revision or (revision > self._revision and not self._kinds):
                # Unfiltered, every revision carries changes, so progress past the held
                # revision means changes were skipped.
                raise ProtocolError(
                    f"progress at revision {revision} while at revision {self._revision}"
                )
            self._stats.progress_events += 1
            self._confirmed()
            self._registry_id = registry_id
            if revision > self._revision:
                # Filtered watch: the revisions in between changed other kinds only.
                self._revision = revision
                self._notify(state_changed=False)

    def _confirmed(self) -> None:
        self._heard_at = self._clock()
        self._from_cache = False
        self._connected = True

    # -- watch loop -------------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        c = self._config
        delay_ms = float(c.reconnect_initial_ms)
        while True:
            try:
                await self._watch_once()
                reason = "stream ended by the server"
            except _StreamDropped:
                reason = "stream cancelled locally"
            except ProtocolError as exc:
                self._stats.protocol_errors += 1
                reason = f"protocol error: {exc}"
                log.error(
                    "registry %s: %s; resuming from revision %d", self._target, exc, self._revision
                )
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except TimeoutError:
                reason = f"no event for {c.idle_timeout_ms} ms"
            except Exception as exc:
                # A bug must not stop the client for good: the hot path needs it following.
                log.exception("registry %s watch failed unexpectedly", self._target)
                reason = f"unexpected {type(exc).__name__}"
            self._stats.stream_failures += 1
            # A stream that delivered a valid event worked: start the backoff afresh.
            healthy, self._connected = self._connected, False
            if healthy:
                delay_ms = float(c.reconnect_initial_ms)
                log.warning(
                    "registry %s watch lost (%s); serving held revision %d",
                    self._target,
                    reason,
                    self._revision,
                )
            else:
                log.debug("registry %s watch failed: %s", self._target, reason)
            jittered = delay_ms * (1 - c.reconnect_jitter * self._rng.random())
            delay_ms = min(float(c.reconnect_max_ms), delay_ms * c.reconnect_multiplier)
            await asyncio.sleep(jittered / 1000)

    async def _watch_once(self) -> None:
        """Follow one Watch stream until it ends.

        Raises what ended it: AioRpcError, ProtocolError, TimeoutError (idle too long) or
        _StreamDropped; returns only when the server ended the stream cleanly.
        """
        c = self._config
        request = registry_pb2.WatchRequest(
            # 0 asks for a snapshot: without state there is nothing to resume from.
            from_revision=self._revision if self._has_state else 0,
            kinds=sorted(self._kinds),
            progress_interval_ms=c.progress_interval_ms,
            # The registry answers a revision of another registry with a fresh snapshot.
            registry_id=self._registry_id if self._has_state else "",
        )
        # A channel per stream: a fresh connection attempt follows our backoff, not the
        # channel's own reconnect backoff (which grows to minutes).
        async with grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            call = stub.Watch(request)
            self._call = call
            try:
                while True:
                    try:
                        async with asyncio.timeout(c.idle_timeout_ms / 1000):
                            response = await call.read()
                    except asyncio.CancelledError:
                        # Our task is not being cancelled, so the call was (`_drop_stream`).
                        task = asyncio.current_task()
                        if task is not None and not task.cancelling():
                            raise _StreamDropped() from None
                        raise
                    if not isinstance(response, registry_pb2.WatchResponse):
                        return  # EOF: the server ended the stream
                    self._on_event(response.event)
            finally:
                self._call = None
                call.cancel()

    # -- cache ------------------------------------------------------------------------------

    def _needs_persist(self) -> bool:
        return self._has_state and self._persisted != (self._revision, self._registry_id)

    async def _persist_forever(self) -> None:
        interval = self._config.cache_interval_ms / 1000
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._needs_persist():
                await self._persist()
                await asyncio.sleep(interval)

    async def _persist(self) -> None:
        path = self._config.cache_path
        assert path is not None
        revision, registry_id = self._revision, self._registry_id
        heard_at = self._wall_clock() - self.staleness_s() if self._heard_at is not None else 0.0
        # The registry id travels in the snapshot (a cache without one resumes unchecked).
        header = {"revision": revision, "kinds": sorted(self._kinds), "heard_at": heard_at}
        data = (
            _CACHE_MAGIC + json.dumps(header).encode() + b"\n" + self.snapshot().SerializeToString()
        )
        self._pending_write = asyncio.ensure_future(
            asyncio.to_thread(_write_atomic, Path(path), data)
        )
        try:
            await asyncio.shield(self._pending_write)
        except OSError as exc:
            log.warning("cannot write registry cache %s: %s", path, exc)
            return
        finally:
            if self._pending_write.done():
                self._pending_write = None
        self._persisted = (revision, registry_id)
        self._stats.cache_writes += 1


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not every platform lets a directory be fsynced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_cache(path: Path) -> _Cached | None:
    """The cache at `path`, or None when it is missing or unreadable (logged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read registry cache %s: %s", path, exc)
        return None
    try:
        if not data.startswith(_CACHE_MAGIC):
            raise ValueError("not a spillgate registry cache (or another format version)")
        header_line, _, body = data[len(_CACHE_MAGIC) :].partition(b"\n")
        header = json.loads(header_line)
        snapshot = registry_pb2.Snapshot.FromString(body)
        if snapshot.revision != header["revision"]:
            raise ValueError("header and snapshot revisions differ")
        kinds = frozenset(registry_pb2.EntityKind.ValueType(int(k)) for k in header["kinds"])
        if any(kind_name(k) == "unknown" for k in kinds):
            raise ValueError(f"unknown kinds {sorted(kinds)}")
        return _Cached(snapshot, kinds, float(header["heard_at"]))
    except Exception as exc:
        log.warning("ignoring unusable registry cache %s: %s", path, exc)
        return None
