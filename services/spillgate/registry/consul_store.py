"""Consul store: the registry in Consul's KV store, for production (py-consul).

Key layout, under a prefix (default "spillgate/registry/"):

    identity                        JSON {"registry_id": "<32 hex digits>"}
    state/meta                      JSON {"revision": N, "materialized": M}, M is N or N-1
    state/entities/<kind>/<id>      one serialized registry_pb2.Entity per entity
    changes/<revision:020d>         serialized registry_pb2.WatchEvent of that revision

The change log is the truth; entity keys are its materialized view. Every key under the
prefix except `identity` is only ever written by a /v1/txn that also does a `cas` on
`state/meta` (its ModifyIndex), so one `cas` serializes all writers and nothing can be
written by a writer that has not seen the latest commit. `identity` (Store.registry_id) is
written once, by the first handle opened on the prefix, with cas=0 (create only; when two
race, the first wins and both read it back) and never changed: it lives outside state/ so
that writers and readers of the state never touch it.

An apply of revision N is:
1. One txn (the commit point): cas state/meta to {N, N} or {N, N-1}, set changes/N,
   delete changes/<N - history_revisions> (retention), and, when they fit into the txn
   (Consul takes at most 64 operations and ~512 KiB per txn), the entity writes too, in
   which case meta says materialized = N and the apply is done in one round trip.
2. Only for batches too large for one txn: the entity writes in further txns of at most
   63 writes each, each again a cas on state/meta; the last one sets materialized = N.

Crash safety: an apply is acknowledged only after txn 1 committed, and txn 1 alone holds
the whole revision (the change record). If the writer dies during step 2, meta stays at
materialized = N-1: readers replay changes/N over the entity keys (puts and deletes are
idempotent, and only revision N's writes can be partial), and the next writer finishes
step 2 from changes/N before it may commit N+1. A stale writer's late step-2 txn fails its
cas and writes nothing. Retention never prunes an unmaterialized record: N is committed
only when materialized = N-1, and it prunes revision N - history_revisions <= N-1.

Reads are consistent at one revision: a full load is one recursive GET of state/ (Consul
serves it from one snapshot of its state store) plus, when materialized < revision, the
one change record to replay. Each handle caches the state and, before every call, reads
state/meta (one GET); it catches up through the change records when a few revisions
behind and reloads otherwise. All handles on one prefix must use one history_revisions.
`wait_for_revision` is a blocking query on state/meta for watchers of other writers.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import consul  # type: ignore[import-untyped]
from consul.exceptions import ClientError  # type: ignore[import-untyped]

from spillgate._proto import registry_pb2
from spillgate.registry.store import (
    Key,
    MemoryCachedStore,
    RevisionMismatch,
    StoreError,
    StoreUnavailable,
    ValidationError,
    apply_changes,
    entity_key,
    kind_name,
    new_registry_id,
    snapshot_from_state,
)
from spillgate.registry.validate import plan_apply

DEFAULT_PREFIX = "spillgate/registry/"
DEFAULT_HISTORY_REVISIONS = 10_000
DEFAULT_ADDR = "127.0.0.1:8500"
# Older Consul releases cap a txn at 64 operations (newer ones at 128): use the lower.
MAX_TXN_OPS = 64
# Raw value bytes per txn. Base64 makes them 4/3 larger, which stays below Consul's
# default limits.txn_max_req_len (512 KiB) with room for the JSON around them.
MAX_TXN_BYTES = 360 * 1024
# Catch up through change records when this many revisions behind; reload beyond.
_CATCH_UP_REVISIONS = 16
# CAS conflicts one apply retries (re-planning on the new state) before giving up.
_MAX_ATTEMPTS = 50

T = TypeVar("T")
_Op = dict[str, dict[str, Any]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Meta:
    revision: int
    materialized: int
    index: int  # ModifyIndex of state/meta; 0 while the key does not exist


_EMPTY = _Meta(0, 0, 0)


class _Conflict(Exception):
    """A txn was rolled back (409): a cas or check lost against another writer."""


def parse_addr(addr: str) -> tuple[str, int, str]:
    """(host, port, scheme) of "host:port" or "scheme://host:port"."""
    parsed = urllib.parse.urlparse(addr if "//" in addr else "//" + addr)
    if not parsed.hostname:
        raise ValueError(f"consul address {addr!r} must be host:port or scheme://host:port")
    return parsed.hostname, parsed.port or 8500, parsed.scheme or "http"


def _change_key(revision: int) -> str:
    return f"changes/{revision:020d}"


def _entity_path(key: Key) -> str:
    return f"state/entities/{kind_name(key[0])}/{key[1]}"


class ConsulStore(MemoryCachedStore):
    """Registry store in Consul's KV store under `prefix` (see the module docstring).

    `addr` is "host:port" or "http(s)://host:port" of a Consul agent; None takes
    CONSUL_HTTP_ADDR (then 127.0.0.1:8500) as the consul CLI does. `history_revisions`
    bounds the change history as in SQLiteStore; `clock` stamps new versions' create_time;
    `timeout` bounds each HTTP call. Raises StoreUnavailable when the agent is unreachable.
    """

    def __init__(
        self,
        addr: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        token: str | None = None,
        history_revisions: int = DEFAULT_HISTORY_REVISIONS,
        clock: Callable[[], datetime] = _utcnow,
        timeout: float = 10.0,
    ) -> None:
        if history_revisions < 1:
            raise ValueError("history_revisions must be at least 1")
        if not prefix or prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must not start with '/' and must end with '/'")
        self._addr = addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR
        host, port, scheme = parse_addr(self._addr)
        self._client_args: dict[str, Any] = {
            "host": host,
            "port": port,
            "scheme": scheme,
            "token": token,
            "connections_timeout": timeout,
        }
        self._prefix = prefix
        self._history = history_revisions
        self._clock = clock
        self._consul = consul.Consul(**self._client_args)
        self._lock = threading.Lock()
        self._state: dict[Key, registry_pb2.Entity] = {}
        self._revision = 0
        self._meta = _EMPTY
        self._loaded = False
        try:
            self._registry_id = self._ensure_identity()
            with self._lock:
                self._refresh()
        except BaseException:
            self._close_client(self._consul)
            raise

    # --- Consul calls ----------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one Consul call, mapping transport and server errors to store errors."""
        try:
            return fn()
        except consul.ConsulException as exc:
            text = f"consul at {self._addr}: {what} failed: {exc}"
            if type(exc) is consul.ConsulException or isinstance(exc, consul.Timeout):
                raise StoreUnavailable(text) from exc  # 5xx: no leader, agent trouble
            raise StoreError(text) from exc  # 4xx: ACLs, a request Consul refuses
        except OSError as exc:  # requests' errors are OSErrors: refused, reset, timeout
            raise StoreUnavailable(f"consul at {self._addr} unreachable: {what}: {exc}") from exc

    def _op(self, verb: str, key: str, value: bytes | None = None, index: int | None = None) -> _Op:
        kv: dict[str, Any] = {"Verb": verb, "Key": self._prefix + key}
        if value is not None:
            kv["Value"] = base64.b64encode(value).decode("ascii")
        if index is not None:
            kv["Index"] = index
        return {"KV": kv}

    def _txn(self, ops: list[_Op]) -> list[dict[str, Any]]:
        """Run one txn; its results, or _Conflict when Consul rolled it back (409)."""
        assert 0 < len(ops) <= MAX_TXN_OPS
        try:
            response = self._call("txn", lambda: self._consul.txn.put(ops))
        except StoreError as exc:
            cause = exc.__cause__
            # py-consul raises ClientError("409 <body>") for a rolled-back txn.
            if isinstance(cause, ClientError) and str(cause).startswith("409 "):
                raise _Conflict(str(cause)[4:]) from None
            raise
        return list(response.get("Results") or [])

    def _read_meta(self) -> _Meta:
        _, entry = self._call(
            "read state/meta", lambda: self._consul.kv.get(self._prefix + "state/meta")
        )
        return _meta_of(entry)

    def _fetch_events(self, after: int, upto: int) -> list[registry_pb2.WatchEvent] | None:
        """The change records (after, upto] in order, or None when any is gone (pruned)."""
        events: list[registry_pb2.WatchEvent] = []
        revisions = list(range(after + 1, upto + 1))
        for start in range(0, len(revisions), MAX_TXN_OPS):
            chunk = revisions[start : start + MAX_TXN_OPS]
            try:
                results = self._txn([self._op("get", _change_key(r)) for r in chunk])
            except _Conflict:  # a "get" of a missing key rolls the read txn back
                return None
            for revision, result in zip(chunk, results, strict=True):
                event = registry_pb2.WatchEvent()
                event.ParseFromString(base64.b64decode(result["KV"]["Value"] or ""))
                if event.revision != revision:
                    raise StoreError(f"change record {revision} holds revision {event.revision}")
                events.append(event)
        return events

    def _ensure_identity(self) -> str:
        """The prefix's registry id, created (cas=0, create only) when it has none yet."""
        key = self._prefix + "identity"
        value = json.dumps({"registry_id": new_registry_id()}).encode()
        self._call("create identity", lambda: self._consul.kv.put(key, value, cas=0))
        _, entry = self._call("read identity", lambda: self._consul.kv.get(key))
        try:
            return str(json.loads(entry["Value"])["registry_id"])
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(f"{key} holds no spillgate identity record: {exc}") from exc

    # --- cache ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Bring the cache to the store's current revision. Lock held."""
        meta = self._read_meta()
        if self._loaded and meta.revision == self._revision:
            self._meta = meta
            return
        if self._loaded and self._revision < meta.revision <= self._revision + _CATCH_UP_REVISIONS:
            events = self._fetch_events(self._revision, meta.revision)
            if events is not None:
                state = dict(self._state)
                for event in events:
                    apply_changes(state, event.changes.changes)
                self._state, self._revision, self._meta = state, meta.revision, meta
                return
        self._load()

    def _load(self) -> None:
        """Read the whole state at one revision. Lock held."""
        for _ in range(_MAX_ATTEMPTS):
            _, entries = self._call(
                "read state/",
                lambda: self._consul.kv.get(self._prefix + "state/", recurse=True),
            )
            meta, state = _EMPTY, {}
            for entry in entries or []:
                name = entry["Key"][len(self._prefix) :]
                if name == "state/meta":
                    meta = _meta_of(entry)
                elif name.startswith("state/entities/") and entry.get("Value") is not None:
                    entity = registry_pb2.Entity()
                    entity.ParseFromString(entry["Value"])
                    state[entity_key(entity)] = entity
            if meta.materialized < meta.revision:
                events = self._fetch_events(meta.materialized, meta.revision)
                if events is None:
                    continue  # pruned by writers that moved on meanwhile: read again
                for event in events:
                    apply_changes(state, event.changes.changes)
            self._state, self._revision, self._meta = state, meta.revision, meta
            self._loaded = True
            return
        raise StoreUnavailable(f"consul at {self._addr}: the state kept changing while read")

    # --- reads ----------------------------------------------------------------------------

    def registry_id(self) -> str:
        """The prefix's id, read (or created) when this handle opened (see Store.registry_id)."""
        return self._registry_id

    def snapshot(self) -> registry_pb2.Snapshot:
        """The full state at the current revision."""
        with self._lock:
            self._refresh()
            return snapshot_from_state(self._state, self._revision)

    def changes_since(self, revision: int) -> list[registry_pb2.WatchEvent] | None:
        """Changes events for every revision after `revision` (see Store.changes_since)."""
        with self._lock:
            self._refresh()
            current = self._revision
            if revision == current:
                return []
            if revision < 0 or revision > current or revision < current - self._history:
                return None
            # Records are immutable once written, so later commits cannot skew this read;
            # one pruned meanwhile makes it None, as it would be a moment later anyway.
            return self._fetch_events(revision, current)

    def wait_for_revision(self, after: int, timeout: float) -> int:
        """Block until the revision passes `after` or `timeout` seconds pass; the revision.

        Consul blocking queries on state/meta, on a connection of their own so other calls
        on this handle are not held up. Lets watchers follow writes of other registry
        instances sharing the prefix without polling.
        """
        deadline = time.monotonic() + timeout
        client = consul.Consul(**self._client_args)
        try:
            index, meta = self._read_meta_with(client)
            while meta.revision <= after:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                index, meta = self._read_meta_with(client, index, f"{max(int(left * 1000), 1)}ms")
            return meta.revision
        finally:
            self._close_client(client)

    def _read_meta_with(
        self, client: Any, index: int | None = None, wait: str | None = None
    ) -> tuple[int, _Meta]:
        key = self._prefix + "state/meta"
        got_index, entry = self._call(
            "watch state/meta", lambda: client.kv.get(key, index=index, wait=wait)
        )
        return int(got_index), _meta_of(entry)

    # --- writes ---------------------------------------------------------------------------

    def apply(
        self, mutations: list[registry_pb2.Mutation], expected_revision: int | None = None
    ) -> tuple[int, list[registry_pb2.Change]]:
        """Apply `mutations` atomically at one new revision (see Store.apply)."""
        with self._lock:
            for _ in range(_MAX_ATTEMPTS):
                self._refresh()
                current = self._revision
                if expected_revision is not None and expected_revision != current:
                    raise RevisionMismatch(current, expected_revision)
                if self._meta.materialized < current:
                    self._finish_materializing()
                    continue
                state, changes = plan_apply(self._state, mutations, self._clock())
                if not changes:
                    return current, []
                try:
                    self._commit(current + 1, changes)
                except _Conflict:
                    continue  # another writer committed first: re-read and re-check
                self._state, self._revision = state, current + 1
                return current + 1, changes
        raise StoreUnavailable(
            f"consul at {self._addr}: apply lost {_MAX_ATTEMPTS} races with other writers"
        )

    def _commit(self, revision: int, changes: list[registry_pb2.Change]) -> None:
        """Write revision `revision` (steps 1 and 2 of the module docstring). Lock held."""
        event = registry_pb2.WatchEvent(revision=revision)
        event.changes.changes.extend(changes)
        record = event.SerializeToString(deterministic=True)
        if len(record) > MAX_TXN_BYTES:
            raise ValidationError(
                "mutations",
                f"the batch's changes take {len(record)} bytes; the consul store takes at "
                f"most {MAX_TXN_BYTES} per revision: split the batch",
            )
        writes = self._entity_writes(changes)
        head = [self._op("set", _change_key(revision), record)]
        if revision - self._history >= 1:
            head.append(self._op("delete", _change_key(revision - self._history)))
        size = len(record) + sum(len(w["KV"].get("Value", "")) * 3 // 4 for w in writes)
        one_txn = 1 + len(head) + len(writes) <= MAX_TXN_OPS and size <= MAX_TXN_BYTES
        materialized = revision if one_txn else revision - 1
        ops = [self._meta_op(revision, materialized), *head, *(writes if one_txn else [])]
        results = self._txn(ops)
        self._meta = _Meta(revision, materialized, int(results[0]["KV"]["ModifyIndex"]))
        if not one_txn:
            self._materialize(revision, writes)

    def _meta_op(self, revision: int, materialized: int) -> _Op:
        value = json.dumps({"revision": revision, "materialized": materialized}).encode()
        return self._op("cas", "state/meta", value, index=self._meta.index)

    def _entity_writes(self, changes: Iterable[registry_pb2.Change]) -> list[_Op]:
        """One set/delete per entity key touched, the last change to each key winning."""
        final: dict[Key, registry_pb2.Change] = {}
        for change in changes:
            final[entity_key(change.entity)] = change
        ops: list[_Op] = []
        for key, change in final.items():
            if change.kind == registry_pb2.CHANGE_KIND_DELETE:
                ops.append(self._op("delete", _entity_path(key)))
            else:
                body = change.entity.SerializeToString(deterministic=True)
                ops.append(self._op("set", _entity_path(key), body))
        return ops

    def _materialize(self, revision: int, writes: list[_Op]) -> None:
        """Step 2: write the entity keys of `revision` in txns that each cas state/meta.

        Stops quietly when a cas fails: another writer took over (or moved on), and the
        change record already holds the revision. Lock held.
        """
        chunks: list[list[_Op]] = [[]]
        size = 0
        for write in writes:
            write_size = len(write["KV"].get("Value", "")) * 3 // 4
            if len(chunks[-1]) == MAX_TXN_OPS - 1 or size + write_size > MAX_TXN_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(write)
            size += write_size
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            materialized = revision if last else revision - 1
            try:
                results = self._txn([self._meta_op(revision, materialized), *chunk])
            except _Conflict:
                return
            self._meta = _Meta(revision, materialized, int(results[0]["KV"]["ModifyIndex"]))

    def _finish_materializing(self) -> None:
        """Finish step 2 of the current revision left undone by a writer. Lock held."""
        revision = self._meta.revision
        events = self._fetch_events(revision - 1, revision)
        if not events:
            raise StoreError(f"change record {revision} is missing below an unfinished write")
        self._materialize(revision, self._entity_writes(events[0].changes.changes))

    # --- lifecycle ------------------------------------------------------------------------

    @staticmethod
    def _close_client(client: Any) -> None:
        # py-consul's close() is a no-op for the requests transport; close its pool.
        client.http.session.close()

    def close(self) -> None:
        """Close the HTTP connections to the agent."""
        with self._lock:
            self._close_client(self._consul)


def _meta_of(entry: dict[str, Any] | None) -> _Meta:
    """The meta record of a state/meta KV entry (None: the store is empty)."""
    if entry is None:
        return _EMPTY
    try:
        value = json.loads(entry["Value"])
        return _Meta(int(value["revision"]), int(value["materialized"]), int(entry["ModifyIndex"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise StoreError(f"state/meta holds no spillgate meta record: {exc}") from exc
