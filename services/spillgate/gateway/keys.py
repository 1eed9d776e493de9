"""The gateway's `Authenticate` over an API key store (gateway/auth.py + sqlite_keys.py).

Each call authenticates the presented key, checks the scope the call needs, then charges the
tenant's request rate limit; refusals become `GatewayError`s with the codes of auth.py's
table (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED + retry_after_ms).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from spillgate.core.decision import Priority
from spillgate.core.ratelimit import TokenBuckets
from spillgate.gateway.auth import (
    DEFAULT_PRIORITY_CEILING,
    DEFAULT_SCOPES,
    AccessError,
    Authenticator,
    Caller,
    IssuedKey,
    KeyRecord,
    RateLimited,
    TenantLimits,
)
from spillgate.gateway.chat import ChargeTokens
from spillgate.gateway.errors import GatewayError
from spillgate.gateway.service import Authenticate
from spillgate.gateway.sqlite_keys import SQLiteKeyStore

log = logging.getLogger(__name__)

LOOKUP_CACHE_S = 5.0


class CachedLookups:
    """Remembers key lookups for `ttl_s`, so the event loop does not read SQLite on every
    request (a `keys create/revoke` holding the write lock would stall every stream). The
    price: a revoked key keeps working for up to `ttl_s`. Only a hash of the key is kept."""

    def __init__(
        self, store: SQLiteKeyStore, ttl_s: float = LOOKUP_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._store = store
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[bytes, tuple[float, Caller | None]] = {}

    def lookup(self, presented_key: str) -> Caller | None:
        digest = hashlib.sha256(presented_key.encode()).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        caller = self._store.lookup(presented_key)
        if len(self._cache) >= 10_000:  # bounded: drop everything rather than track LRU
            self._cache.clear()
        self._cache[digest] = (now + self._ttl_s, caller)
        return caller

    def create(
        self,
        tenant: str,
        *,
        priority_ceiling: Priority = DEFAULT_PRIORITY_CEILING,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        limits: TenantLimits | None = None,
    ) -> IssuedKey:
        return self._store.create(
            tenant, priority_ceiling=priority_ceiling, scopes=scopes, limits=limits
        )

    def revoke(self, key_id: str) -> bool:
        self._cache.clear()  # this process's own revokes apply at once
        return self._store.revoke(key_id)

    def list(self) -> Sequence[KeyRecord]:
        return self._store.list()

    def close(self) -> None:
        self._store.close()


def authenticate_with(
    authenticator: Authenticator, clock: Callable[[], float] = time.monotonic
) -> Authenticate:
    """An `Authenticate` that uses `authenticator` and charges rate limits at `clock()`."""

    def authenticate(metadata: Mapping[str, str], scope: str) -> Caller:
        try:
            caller = authenticator.authenticate(metadata)
            authenticator.require_scope(caller, scope)
            authenticator.check_rate(caller, clock())
        except AccessError as exc:
            retry_after_ms = exc.retry_after_ms if isinstance(exc, RateLimited) else 0
            raise GatewayError(exc.grpc_code, str(exc), retry_after_ms=retry_after_ms) from None
        return caller

    return authenticate


def key_authenticator(path: Path) -> tuple[Authenticate, SQLiteKeyStore, ChargeTokens]:
    """`(authenticate, store, charge_tokens)` for the key store at `path`; close the store
    when done.

    The store is created when missing (empty: every key is refused until `spillgate keys
    create` adds one). Lookups are cached for LOOKUP_CACHE_S seconds: a new key works at
    once, a revoked one stops within that time; no restart is needed.
    """
    store = SQLiteKeyStore(path)
    if not store.list():
        log.warning("key store %s has no keys: every request will get 401", path)
    authenticator = Authenticator(CachedLookups(store), TokenBuckets())
    return authenticate_with(authenticator), store, charge_tokens_with(authenticator)


def charge_tokens_with(
    authenticator: Authenticator, clock: Callable[[], float] = time.monotonic
) -> ChargeTokens:
    """A `ChargeTokens` that spends the tenant's token budget (GatewayError when over)."""

    def charge(caller: Caller, tokens: int) -> None:
        try:
            authenticator.charge_tokens(caller, clock(), tokens)
        except AccessError as exc:
            retry_after_ms = exc.retry_after_ms if isinstance(exc, RateLimited) else 0
            raise GatewayError(exc.grpc_code, str(exc), retry_after_ms=retry_after_ms) from None

    return charge
