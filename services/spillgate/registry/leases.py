"""Replica lease bookkeeping (no I/O): who is due to be marked NOT_READY or removed.

A lease runs out twice: the first time the service marks the replica NOT_READY (a normal
committed change), the second time, one lease length later, it removes the replica. A
heartbeat can only renew a lease that has not run out yet; after that the replica must
register again. Time comes from an injected clock so tests control it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass
class Lease:
    """One replica's lease: when it runs out, its length and whether it already ran out once."""

    expires_at: datetime
    length: timedelta
    expired: bool = False


class Leases:
    """Leases by replica id, read and written from one asyncio task at a time."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}

    def grant(self, replica: str, length: timedelta) -> datetime:
        """Start (or restart) a live lease; returns when it runs out."""
        expires_at = self._clock() + length
        self._leases[replica] = Lease(expires_at, length)
        return expires_at

    def renew(self, replica: str, length: timedelta) -> datetime | None:
        """Extend a live lease from now; None when there is none or it already ran out."""
        lease = self._leases.get(replica)
        if lease is None or lease.expired:
            return None
        lease.expires_at = self._clock() + length
        lease.length = length
        return lease.expires_at

    def due(self) -> tuple[list[str], list[str]]:
        """(replicas whose live lease ran out, replicas whose grace period ran out too)."""
        now = self._clock()
        lapsed = [r for r, lease in self._leases.items() if lease.expires_at <= now]
        return (
            sorted(r for r in lapsed if not self._leases[r].expired),
            sorted(r for r in lapsed if self._leases[r].expired),
        )

    def mark_expired(self, replica: str) -> None:
        """Record the first run-out: the replica gets one more lease length before removal."""
        lease = self._leases[replica]
        lease.expired = True
        lease.expires_at = self._clock() + lease.length

    def drop(self, replica: str) -> None:
        """Forget a replica's lease (removed, or deleted by an operator)."""
        self._leases.pop(replica, None)
