"""Per-key token buckets for tenant rate limits (pure: the caller passes the clock value).

Each bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; a request costing
``cost`` tokens is accepted only when that many are available. So over any window of length
W the accepted cost is at most ``burst + rate_per_s * W``.

The state of one bucket is a single number, ``full_at``: the clock time at which it will be
full again (the virtual-scheduling form of the token bucket, as in GCRA). Tokens at ``now``
are ``burst - rate_per_s * max(0, full_at - now)``. Two consequences:

* a request is accepted iff ``now >= full_at - (burst - cost) / rate_per_s``, one comparison
  against a value that does not depend on ``now``, so ``retry_after_ms`` is exact: the same
  request succeeds at ``now + retry_after_ms / 1000`` and fails one millisecond earlier;
* a bucket with ``full_at <= now`` (idle long enough to refill) is indistinguishable from a
  fresh one, so evicting it loses nothing. Buckets are kept in LRU order and idle ones are
  dropped as calls pass by; past ``max_keys`` the least recently used bucket is dropped even
  if not full (that key then starts again from a full bucket: lenient, never stricter).

The limit travels with each call rather than living in the limiter, so one limiter serves
tenants with different limits and a key's new limit applies on its next request; a store
shared between gateways (Redis) can take the same arguments.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

DEFAULT_RATE_PER_S = 20.0
"""Default sustained requests per second of a tenant."""
DEFAULT_BURST = 40.0
"""Default bucket size: requests a tenant may send at once after being idle (2 s of rate)."""
DEFAULT_MAX_KEYS = 65_536
"""Default bound on buckets kept in memory (~10 MB); see `TokenBuckets`."""
_IDLE_SWEEP_PER_CALL = 2  # idle buckets dropped per call at most: O(1) per call, no scans


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket's size and refill rate.

    ``rate_per_s`` > 0 tokens are added per second up to ``burst`` >= 1 (a burst below one
    request could never admit anything).
    """

    rate_per_s: float = DEFAULT_RATE_PER_S
    burst: float = DEFAULT_BURST

    def __post_init__(self) -> None:
        if not 0 < self.rate_per_s < math.inf:  # also refuses NaN
            raise ValueError(f"rate_per_s must be a finite number > 0, got {self.rate_per_s}")
        if not 1 <= self.burst < math.inf:
            raise ValueError(f"burst must be a finite number >= 1, got {self.burst}")


class RateLimiter(Protocol):
    """What the gateway needs from a rate limiter (in process now, Redis-backed later)."""

    def try_acquire(
        self, key: str, cost: float, now: float, limit: RateLimit | None = None
    ) -> tuple[bool, int]:
        """Spend ``cost`` tokens of ``key``'s bucket at clock time ``now`` (seconds).

        Returns ``(True, 0)`` when accepted; otherwise ``(False, retry_after_ms)`` with
        nothing spent, where ``retry_after_ms`` > 0 is the wait until the same request
        would be accepted if nothing else is spent meanwhile. ``limit`` defaults to the
        limiter's own default. Raises ValueError unless ``0 < cost <= limit.burst``.
        """
        ...


class TokenBuckets:
    """In-process `RateLimiter`: one token bucket per key, bounded memory.

    Not thread-safe: use one per event loop (the gateway's), or guard it with a lock.
    """

    __slots__ = ("_buckets", "default_limit", "max_keys")

    def __init__(
        self, default_limit: RateLimit | None = None, *, max_keys: int = DEFAULT_MAX_KEYS
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.default_limit = default_limit if default_limit is not None else RateLimit()
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, float] = OrderedDict()  # key -> full_at, LRU first

    def __len__(self) -> int:
        return len(self._buckets)

    def try_acquire(
        self, key: str, cost: float, now: float, limit: RateLimit | None = None
    ) -> tuple[bool, int]:
        """See `RateLimiter.try_acquire`."""
        limit = limit if limit is not None else self.default_limit
        if not 0 < cost <= limit.burst:
            raise ValueError(f"cost must be > 0 and <= burst ({limit.burst}), got {cost}")
        self._drop_idle_head(now)
        full_at = self._buckets.get(key)
        if full_at is None or full_at <= now:
            # Full bucket (fresh or refilled): cost <= burst always fits.
            self._store(key, now + cost / limit.rate_per_s)
            return True, 0
        allowed_at = full_at - (limit.burst - cost) / limit.rate_per_s
        if now >= allowed_at:
            self._store(key, full_at + cost / limit.rate_per_s)
            return True, 0
        self._buckets.move_to_end(key)
        return False, _wait_ms(now, allowed_at)

    def available(self, key: str, now: float, limit: RateLimit | None = None) -> float:
        """Tokens in ``key``'s bucket at ``now`` (no state change)."""
        limit = limit if limit is not None else self.default_limit
        full_at = self._buckets.get(key, now)
        return max(0.0, limit.burst - limit.rate_per_s * max(0.0, full_at - now))

    def evict_idle(self, now: float) -> int:
        """Drop every bucket that is full again at ``now``; returns how many (O(buckets))."""
        idle = [key for key, full_at in self._buckets.items() if full_at <= now]
        for key in idle:
            del self._buckets[key]
        return len(idle)

    def _store(self, key: str, full_at: float) -> None:
        self._buckets[key] = full_at
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def _drop_idle_head(self, now: float) -> None:
        # The least recently used buckets are the likeliest to have refilled; dropping a
        # couple per call keeps memory near the number of active keys without scanning.
        for _ in range(_IDLE_SWEEP_PER_CALL):
            if not self._buckets:
                return
            key, full_at = next(iter(self._buckets.items()))
            if full_at > now:
                return
            del self._buckets[key]


def _wait_ms(now: float, allowed_at: float) -> int:
    """Least whole milliseconds ``ms`` > 0 with ``now + ms / 1000 >= allowed_at``.

    Computed in the same float expression a caller uses to come back, so rounding can never
    make the advertised time one millisecond too early (or late).
    """
    ms = max(1, math.ceil((allowed_at - now) * 1000.0))
    while now + ms / 1000.0 < allowed_at:
        ms += 1
    while ms > 1 and now + (ms - 1) / 1000.0 >= allowed_at:
        ms -= 1
    return ms
