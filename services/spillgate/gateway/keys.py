"""The gateway's `Authenticate` over an API key store (gateway/auth.py + sqlite_keys.py).

Each call authenticates the presented key, checks the scope the call needs, then charges the
tenant's request rate limit; refusals become `GatewayError`s with the codes of auth.py's
table (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED + retry_after_ms).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from spillgate.core.ratelimit import TokenBuckets
from spillgate.gateway.auth import AccessError, Authenticator, Caller, RateLimited
from spillgate.gateway.errors import GatewayError
from spillgate.gateway.service import Authenticate
from spillgate.gateway.sqlite_keys import SQLiteKeyStore

log = logging.getLogger(__name__)


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


def key_authenticator(path: Path) -> tuple[Authenticate, SQLiteKeyStore]:
    """`(authenticate, store)` for the key store file at `path`; close the store when done.

    The store is created when missing (empty: every key is refused until `spillgate keys
    create` adds one; the store is read on every request, so no restart is needed).
    """
    store = SQLiteKeyStore(path)
    if not store.list():
        log.warning("key store %s has no keys: every request will get 401", path)
    return authenticate_with(Authenticator(store, TokenBuckets())), store
