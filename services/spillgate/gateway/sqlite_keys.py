"""SQLite key store: the embedded default `KeyStore` (one file, shared by gateway and CLI).

Only ``sha256(secret)`` is stored, never a key. Every lookup reads the file, so a key revoked
by ``spillgate keys revoke`` in another process is refused on its next request. The file is
created owner-only (0600); WAL mode with synchronous=FULL like the registry store.

``last_used`` is written at most once per `LAST_USED_RESOLUTION_S` per key and process, so
a hot key does not turn every request into a synchronous disk write.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

from spillgate.core.decision import Priority
from spillgate.gateway.auth import (
    DEFAULT_PRIORITY_CEILING,
    DEFAULT_SCOPES,
    Caller,
    IssuedKey,
    KeyRecord,
    TenantLimits,
    digest_matches,
    new_key,
    parse_key,
    validate_scopes,
    validate_tenant,
)

LAST_USED_RESOLUTION_S = 60.0
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    secret_sha256 BLOB NOT NULL,
    tenant TEXT NOT NULL,
    priority_ceiling INTEGER NOT NULL,
    scopes TEXT NOT NULL,
    requests_per_s REAL NOT NULL,
    burst INTEGER NOT NULL,
    tokens_per_s REAL,
    created_at REAL NOT NULL,
    last_used REAL,
    revoked_at REAL
);
"""
_COLUMNS = (
    "key_id, tenant, priority_ceiling, scopes, requests_per_s, burst, tokens_per_s, "
    "created_at, last_used, revoked_at"
)
_Row = tuple[str, str, int, str, float, int, float | None, float, float | None, float | None]


def _record(row: _Row) -> KeyRecord:
    key_id, tenant, ceiling, scopes, rps, burst, tps, created, last_used, revoked = row
    caller = Caller(
        tenant=tenant,
        key_id=key_id,
        priority_ceiling=Priority(ceiling),
        scopes=frozenset(s for s in scopes.split(",") if s),
        limits=TenantLimits(rps, burst, tps),
    )
    return KeyRecord(caller, created, last_used, revoked)


class SQLiteKeyStore:
    """`KeyStore` in one SQLite file (created on first use). Thread-safe.

    ``clock`` gives epoch seconds for ``created_at``/``last_used``/``revoked_at``.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_used_written: dict[str, float] = {}
        path = Path(path)
        if not path.exists():
            # Owner-only before SQLite writes anything; its -wal/-shm files copy the mode.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > _SCHEMA_VERSION:
                raise ValueError(f"{path}: key store schema {version} is newer than this build")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> SQLiteKeyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()

    def lookup(self, presented_key: str) -> Caller | None:
        """See `KeyStore.lookup`."""
        parsed = parse_key(presented_key)
        if parsed is None:
            return None
        key_id, secret = parsed
        with self._lock:
            row = self._db.execute(
                f"SELECT secret_sha256, {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        stored: bytes | None = bytes(row[0]) if row is not None else None
        if not digest_matches(secret, stored):
            return None
        record = _record(row[1:])
        if record.revoked:
            return None
        self._touch(key_id)
        return record.caller

    def create(
        self,
        tenant: str,
        *,
        priority_ceiling: Priority = DEFAULT_PRIORITY_CEILING,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        limits: TenantLimits | None = None,
    ) -> IssuedKey:
        """See `KeyStore.create`."""
        tenant = validate_tenant(tenant)
        scope_set = validate_scopes(scopes)
        limits = limits if limits is not None else TenantLimits()
        priority_ceiling = Priority(priority_ceiling)
        key, key_id, digest = new_key()
        created = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, secret_sha256, tenant, priority_ceiling, scopes,"
                " requests_per_s, burst, tokens_per_s, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    digest,
                    tenant,
                    int(priority_ceiling),
                    ",".join(sorted(scope_set)),
                    limits.requests_per_s,
                    limits.burst,
                    limits.tokens_per_s,
                    created,
                ),
            )
        caller = Caller(tenant, key_id, priority_ceiling, scope_set, limits)
        return IssuedKey(key, KeyRecord(caller, created))

    def revoke(self, key_id: str) -> bool:
        """See `KeyStore.revoke`; the first revocation time is kept."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?",
                (self._clock(), key_id),
            )
        return cursor.rowcount > 0

    def list(self) -> Sequence[KeyRecord]:
        """See `KeyStore.list`."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, rowid"
            ).fetchall()
        return tuple(_record(row) for row in rows)

    def _touch(self, key_id: str) -> None:
        now = self._clock()
        with self._lock:
            last = self._last_used_written.get(key_id)
            if last is not None and now - last < LAST_USED_RESOLUTION_S:
                return
            self._last_used_written[key_id] = now
            self._db.execute("UPDATE api_keys SET last_used = ? WHERE key_id = ?", (now, key_id))
