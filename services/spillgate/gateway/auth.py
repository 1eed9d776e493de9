"""API keys, callers and per-tenant rate limits at the gateway's edge.

A key reads ``sg_<key_id>_<secret>``: ``key_id`` (16 hex digits) names the key in logs, the
CLI and the store; ``secret`` comes from ``secrets.token_urlsafe(32)`` (256 bits). Stores
keep only ``sha256(secret)``: for random secrets of that entropy a fast hash is the accepted
practice (GitHub and cloud providers' tokens), and a slow password hash would cost every
request milliseconds. Lookup goes by ``key_id`` and then compares digests in constant time.

Callers pass the key as gRPC metadata ``authorization: Bearer <key>`` (or ``x-api-key:
<key>``), or over HTTP as ``Authorization: Bearer <key>`` (what the official OpenAI client
sends). Failures map to one table here (`rpc_error`, `http_error`): missing or bad key ->
UNAUTHENTICATED / 401, missing scope -> PERMISSION_DENIED / 403, over the limit ->
RESOURCE_EXHAUSTED + RetryInfo / 429 + Retry-After. Messages never echo the key.

Rate limits are per tenant: all keys of a tenant share its buckets (``req:<tenant>`` and, with
a token limit, ``tok:<tenant>``), each request applying the limit of the key it presented,
so keep one tenant's keys on the same limits.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from spillgate.core.decision import Priority
from spillgate.core.ratelimit import DEFAULT_BURST, DEFAULT_RATE_PER_S, RateLimit, RateLimiter
from spillgate.status import RpcError, retry_info


class Scope(enum.StrEnum):
    """What a key may do; a key holds any set of these."""

    CHAT = "chat"  # inference: chat/completions, Generate, Triton infer passthrough
    MODELS = "models"  # read the model list and metadata
    ADMIN = "admin"  # change the fleet: repository load/unload


DEFAULT_SCOPES = frozenset({Scope.CHAT, Scope.MODELS})
DEFAULT_PRIORITY_CEILING = Priority.HIGH  # CRITICAL stays for keys granted it explicitly
TOKEN_BURST_S = 10.0
"""A token limit's bucket holds this many seconds of ``tokens_per_s``."""

KEY_PREFIX = "sg_"
_KEY_ID_HEX = 16
_MAX_KEY_LEN = 256  # refuse absurd inputs before hashing them
_KEY_RE = re.compile(r"sg_([0-9a-f]{16})_([A-Za-z0-9_-]{20,200})")
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's rate limits: requests/s with a burst, and optionally LLM tokens/s."""

    requests_per_s: float = DEFAULT_RATE_PER_S
    burst: int = int(DEFAULT_BURST)
    tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        RateLimit(self.requests_per_s, self.burst)  # validates
        if self.tokens_per_s is not None:
            self.token_limit()

    def request_limit(self) -> RateLimit:
        """The request bucket: ``requests_per_s`` refill, ``burst`` requests deep."""
        return RateLimit(self.requests_per_s, self.burst)

    def token_limit(self) -> RateLimit | None:
        """The token bucket (``TOKEN_BURST_S`` seconds deep), None without a token limit."""
        if self.tokens_per_s is None:
            return None
        return RateLimit(self.tokens_per_s, max(1.0, self.tokens_per_s * TOKEN_BURST_S))

    def describe(self) -> str:
        """Short human form, e.g. ``20/s burst 40, 5000 tok/s``."""
        text = f"{self.requests_per_s:g}/s burst {self.burst}"
        if self.tokens_per_s is not None:
            text += f", {self.tokens_per_s:g} tok/s"
        return text


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: what its key allows."""

    tenant: str
    key_id: str
    priority_ceiling: Priority = DEFAULT_PRIORITY_CEILING
    scopes: frozenset[str] = DEFAULT_SCOPES
    limits: TenantLimits = TenantLimits()

    def has_scope(self, scope: str) -> bool:
        """Whether the key holds ``scope`` (no scope implies another)."""
        return scope in self.scopes


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key as listed (never its secret). Times are epoch seconds."""

    caller: Caller
    created_at: float
    last_used: float | None = None
    revoked_at: float | None = None

    @property
    def key_id(self) -> str:
        return self.caller.key_id

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly created key: the only time its plaintext exists."""

    key: str
    record: KeyRecord


class KeyStore(Protocol):
    """Where keys live: SQLite embedded by default, a shared database later."""

    def lookup(self, presented_key: str) -> Caller | None:
        """The caller of an active key; None for malformed, unknown, wrong or revoked keys."""
        ...

    def create(
        self,
        tenant: str,
        *,
        priority_ceiling: Priority = DEFAULT_PRIORITY_CEILING,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        limits: TenantLimits | None = None,
    ) -> IssuedKey:
        """Make a new key; raises ValueError on a bad tenant or unknown scope."""
        ...

    def revoke(self, key_id: str) -> bool:
        """Revoke a key for good; False when there is no such key (revoking twice is fine)."""
        ...

    def list(self) -> Sequence[KeyRecord]:
        """Every key, revoked ones included, oldest first."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


# --- key material ---------------------------------------------------------------------------


def new_key() -> tuple[str, str, bytes]:
    """A fresh ``(key, key_id, sha256(secret))``."""
    key_id = secrets.token_hex(_KEY_ID_HEX // 2)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}{key_id}_{secret}", key_id, secret_digest(secret)


def secret_digest(secret: str) -> bytes:
    """What stores keep of a secret."""
    return hashlib.sha256(secret.encode()).digest()


def parse_key(presented_key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None.

    The secret may itself contain ``_`` (URL-safe base64); the key id never does.
    """
    if len(presented_key) > _MAX_KEY_LEN:
        return None
    match = _KEY_RE.fullmatch(presented_key)
    if match is None:
        return None
    return match.group(1), match.group(2)


_DUMMY_DIGEST = secret_digest("spillgate: no such key")


def digest_matches(secret: str, stored: bytes | None) -> bool:
    """Constant-time check of ``secret`` against a stored digest (None: unknown key id).

    Unknown ids still pay for a comparison, so timing does not tell which ids exist.
    """
    ok = hmac.compare_digest(secret_digest(secret), stored or _DUMMY_DIGEST)
    return ok and stored is not None


def validate_tenant(tenant: str) -> str:
    """``tenant`` if usable as a bucket key and metric label, else ValueError."""
    if _TENANT_RE.fullmatch(tenant) is None:
        raise ValueError(
            f"tenant must be 1-128 of letters, digits and . _ : - (starting alphanumeric), "
            f"got {tenant!r}"
        )
    return tenant


def validate_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes as a frozenset of `Scope` values, else ValueError naming the unknown one."""
    known = {s.value for s in Scope}
    result = frozenset(s.strip() for s in scopes if s.strip())
    unknown = sorted(result - known)
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return frozenset(Scope(s) for s in result)


# --- priority -------------------------------------------------------------------------------


def clamp_priority(requested: Priority, ceiling: Priority) -> Priority:
    """The priority a request runs at: ``requested``, but never more important than ``ceiling``.

    A request asking for more than its key allows is served at the ceiling rather than
    refused: priority is a hint for shedding order, and refusing would turn an over-eager
    client setting into an outage. (Smaller values are more important.)
    """
    return Priority(max(requested, ceiling))


# --- failures and their wire forms ----------------------------------------------------------


class AccessError(Exception):
    """Base of the request refusals raised here; each has one gRPC and one HTTP form."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    http_status: int = 500


class AuthError(AccessError):
    """No usable API key. The message is safe for clients and never contains the key."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401

    MISSING = "missing API key"
    INVALID = "invalid API key"


class PermissionDenied(AccessError):
    """The key is valid but lacks the scope the call needs."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403

    def __init__(self, scope: str) -> None:
        super().__init__(f"API key lacks the {scope!r} scope")
        self.scope = scope


class RateLimited(AccessError):
    """The tenant is over its limit; come back after ``retry_after_ms``."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, retry_after_ms: int, what: str = "requests") -> None:
        super().__init__(f"rate limit exceeded ({what}); retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms
        self.what = what


def rpc_error(error: AccessError) -> RpcError:
    """The gRPC status for ``error`` (RESOURCE_EXHAUSTED carries google.rpc.RetryInfo)."""
    details = [retry_info(error.retry_after_ms)] if isinstance(error, RateLimited) else []
    return RpcError(error.grpc_code, str(error), tuple(details))


def http_error(error: AccessError) -> tuple[int, dict[str, str], str]:
    """``(status, headers, message)`` for ``error`` over HTTP.

    429 carries ``Retry-After`` in whole seconds (rounded up); 401 carries
    ``WWW-Authenticate: Bearer`` (RFC 6750).
    """
    headers: dict[str, str] = {}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_ms / 1000)))
    elif isinstance(error, AuthError):
        headers["WWW-Authenticate"] = 'Bearer realm="spillgate"'
    return error.http_status, headers, str(error)


# --- presented credentials ------------------------------------------------------------------

Metadata = Mapping[str, str] | Iterable[tuple[str, str | bytes]]
"""gRPC invocation metadata, or HTTP headers: a mapping or ``(name, value)`` pairs (any case)."""


def key_from_authorization(value: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` value; None when absent or empty.

    A value with another scheme (``Basic ...``) yields "" so that it reads as invalid, not
    as missing.
    """
    if value is None or not value.strip():
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip() or None


def key_from_metadata(metadata: Metadata) -> str | None:
    """The key in metadata/headers: ``authorization: Bearer`` first, then ``x-api-key``."""
    authorization: str | None = None
    api_key: str | None = None
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    for name, value in pairs:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        lowered = name.lower()
        if lowered == "authorization" and authorization is None:
            authorization = text
        elif lowered == "x-api-key" and api_key is None:
            api_key = text
    key = key_from_authorization(authorization)
    if key is None and api_key is not None and api_key.strip():
        return api_key.strip()
    return key


class Authenticator:
    """Keys plus rate limits: what the gateway calls on every request.

    ``authenticate`` once per request, then ``check_rate`` with the injected clock's value.
    """

    def __init__(self, keys: KeyStore, limiter: RateLimiter) -> None:
        self.keys = keys
        self.limiter = limiter

    def authenticate(self, credentials: Metadata | str | None) -> Caller:
        """The caller presenting ``credentials``: gRPC metadata / HTTP header pairs, or the
        ``Authorization`` header value itself. Raises `AuthError` (UNAUTHENTICATED / 401)."""
        if credentials is None or isinstance(credentials, str):
            key = key_from_authorization(credentials)
        else:
            key = key_from_metadata(credentials)
        if key is None:
            raise AuthError(AuthError.MISSING)
        caller = self.keys.lookup(key) if key else None
        if caller is None:
            raise AuthError(AuthError.INVALID)
        return caller

    def check_rate(self, caller: Caller, now: float, tokens: int = 0) -> None:
        """Charge one request (and ``tokens`` LLM tokens, when the key has a token limit)
        to the caller's tenant at clock time ``now``; raises `RateLimited` when over.

        A request refused for tokens still counts as a request. A request estimated at more
        tokens than the bucket holds is charged the full bucket: it waits for a full bucket
        instead of being refused forever.
        """
        limits = caller.limits
        ok, retry_ms = self.limiter.try_acquire(
            f"req:{caller.tenant}", 1, now, limits.request_limit()
        )
        if not ok:
            raise RateLimited(retry_ms)
        self.charge_tokens(caller, now, tokens)

    def charge_tokens(self, caller: Caller, now: float, tokens: int) -> None:
        """Charge ``tokens`` LLM tokens (prompt + requested output) to the tenant's token
        bucket when its key has a token limit; raises `RateLimited` when over. Called once
        the request is validated and its token count known."""
        token_limit = caller.limits.token_limit()
        if token_limit is not None and tokens > 0:
            cost = min(float(tokens), token_limit.burst)
            ok, retry_ms = self.limiter.try_acquire(f"tok:{caller.tenant}", cost, now, token_limit)
            if not ok:
                raise RateLimited(retry_ms, "tokens")

    @staticmethod
    def require_scope(caller: Caller, scope: str) -> None:
        """Raise `PermissionDenied` (PERMISSION_DENIED / 403) unless the key holds ``scope``."""
        if not caller.has_scope(scope):
            raise PermissionDenied(scope)
