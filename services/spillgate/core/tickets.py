"""Ticket book: leases on admitted slots, so unreleased requests stop counting (pure).

Every SERVE/DEGRADE holds a ticket on its lane until Release, or until its lease runs out
(a caller that crashed must not leak a slot forever). Expiry is O(expired log n) through a
heap of leases; renewed or released tickets leave stale heap entries that are skipped.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from spillgate.core.decision import Ticket
from spillgate.core.lanes import Lane


@dataclass(slots=True)
class Held:
    """A live ticket with what the learning step needs at release."""

    ticket: Ticket
    lane: Lane
    predicted_prefill_ms: float  # queue + prefill predicted at admission
    predicted_itl_ms: float
    max_tokens: int = 0  # the request's max_tokens as planned (capped when degraded)


class TicketBook:
    """Issues deterministic ticket ids ``<region>-<n>`` and tracks their leases."""

    def __init__(self, region: str, lease_s: float, prefix: str = "") -> None:
        self._region = region
        self._prefix = prefix or region
        self._lease_ms = int(lease_s * 1000)
        self._held: dict[str, Held] = {}
        self._leases: list[tuple[float, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._held)

    def issue(
        self, lane: Lane, now: float, prefill_ms: float, itl_ms: float, max_tokens: int = 0
    ) -> Ticket:
        """Open a ticket on ``lane`` with the default lease."""
        self._seq += 1
        expires = now + self._lease_ms / 1000.0
        ticket = Ticket(
            f"{self._prefix}-{self._seq}", self._region, lane.replica, expires, self._lease_ms
        )
        self._held[ticket.id] = Held(ticket, lane, prefill_ms, itl_ms, max_tokens)
        heapq.heappush(self._leases, (expires, ticket.id))
        return ticket

    def pop(self, ticket_id: str) -> Held | None:
        """Close a ticket; None when unknown or already expired."""
        return self._held.pop(ticket_id, None)

    def renew(self, ticket_id: str, now: float, lease_ms: int) -> Ticket | None:
        """Extend a live lease (0 = default; never longer than the default)."""
        held = self._held.get(ticket_id)
        if held is None or held.ticket.lease_expires_at <= now:
            return None
        granted = min(lease_ms, self._lease_ms) if lease_ms > 0 else self._lease_ms
        old = held.ticket
        held.ticket = Ticket(old.id, old.region, old.replica, now + granted / 1000.0, granted)
        heapq.heappush(self._leases, (held.ticket.lease_expires_at, old.id))
        return held.ticket

    def expire(self, now: float) -> list[Held]:
        """Remove and return every ticket whose lease ended at or before ``now``."""
        out: list[Held] = []
        heap = self._leases
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            held = self._held.get(key)
            if held is not None and held.ticket.lease_expires_at == expires:
                del self._held[key]
                out.append(held)
        return out

    def drop_replica(self, replica: str) -> list[Held]:
        """Remove and return every ticket held on ``replica`` (a drain's hard deadline)."""
        out = [h for h in self._held.values() if h.lane.replica == replica]
        for held in out:
            del self._held[held.ticket.id]
        return out

    def on_replica(self, replica: str) -> int:
        """Live tickets held on ``replica``."""
        return sum(1 for h in self._held.values() if h.lane.replica == replica)
