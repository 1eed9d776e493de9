"""Bounded admission queue: priority bands, per-band TTL, per-request deadline, tenant fairness.

Pure data structure (no asyncio): the admission service parks the Admit call while its entry
is here and the policy pops entries when slots free. Within a band, tenants take turns
(round robin), so one tenant's burst cannot starve another's requests of the same priority.
When the queue is full, a more important arrival displaces the newest entry of the least
important non-empty band below it; that entry is returned to be shed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from spillgate.core.decision import Priority, Reason, Request

_PRIORITIES = tuple(sorted(Priority))  # ascending; iterating the enum class itself is slow


@dataclass(eq=False, slots=True)
class QueueEntry:
    """One parked request. ``expires_at`` = min(enqueue + band TTL, latest useful start)."""

    request: Request
    enqueued_at: float
    expires_at: float
    ttl_at: float
    seq: int


class AdmissionQueue:
    """Bands by priority; ``push``/``remove``/``expire``/``ordered``/``len`` are all pure."""

    def __init__(
        self,
        capacity: int,
        band_capacity: Mapping[Priority, float],
        band_ttl_s: Mapping[Priority, float],
    ) -> None:
        self._capacity = capacity
        self._band_capacity = {p: int(c) for p, c in band_capacity.items()}
        self._ttl = dict(band_ttl_s)
        # band -> tenant -> FIFO; OrderedDict order is the round-robin turn order.
        self._bands: dict[Priority, OrderedDict[str, deque[QueueEntry]]] = {
            p: OrderedDict() for p in Priority
        }
        self._band_len = dict.fromkeys(Priority, 0)
        self._len = 0
        self._seq = 0

    def __len__(self) -> int:
        return self._len

    def may_queue(self, priority: Priority) -> bool:
        """Whether the band accepts entries at all (TTL > 0 and capacity > 0)."""
        return self._ttl[priority] > 0 and self._band_capacity[priority] > 0

    def ttl_s(self, priority: Priority) -> float:
        """The band's TTL in seconds."""
        return self._ttl[priority]

    def ahead(self, priority: Priority) -> int:
        """Entries that would be served before a new arrival of ``priority``."""
        band_len = self._band_len
        n = 0
        for p in _PRIORITIES:  # a loop, not a generator: this runs on every SHED
            if p > priority:
                break
            n += band_len[p]
        return n

    def has_room(self, priority: Priority) -> bool:
        """Whether ``push`` would accept an arrival of ``priority`` (pure)."""
        if not self.may_queue(priority):
            return False
        if self._band_len[priority] >= self._band_capacity[priority]:
            return False
        return self._len < self._capacity or self._victim_band(priority) is not None

    def push(
        self, request: Request, now: float, latest_start: float
    ) -> tuple[QueueEntry | None, QueueEntry | None]:
        """Park ``request``; returns (entry or None if rejected, displaced entry or None)."""
        prio = request.priority
        if not self.has_room(prio):
            return None, None
        displaced = None
        if self._len >= self._capacity:
            band = self._victim_band(prio)
            assert band is not None  # has_room checked it
            displaced = self._pop_newest(band)
        ttl_at = now + self._ttl[prio]
        self._seq += 1
        entry = QueueEntry(request, now, min(ttl_at, latest_start), ttl_at, self._seq)
        self._bands[prio].setdefault(request.tenant, deque()).append(entry)
        self._band_len[prio] += 1
        self._len += 1
        return entry, displaced

    def band(self, priority: Priority) -> list[QueueEntry]:
        """Every entry of one priority band (any order)."""
        return [e for q in self._bands[priority].values() for e in q]

    def ordered(self) -> Iterator[QueueEntry]:
        """Entries in service order: bands by priority, tenants round robin within a band.

        Iterate over a materialized list if entries are removed while iterating.
        """
        for prio in Priority:
            tenants = self._bands[prio]
            queues = [list(q) for q in tenants.values()]
            depth = max((len(q) for q in queues), default=0)
            for i in range(depth):
                for q in queues:
                    if i < len(q):
                        yield q[i]

    def remove(self, entry: QueueEntry) -> bool:
        """Take ``entry`` out (served or cancelled); its tenant's turn moves to the back."""
        prio, tenant = entry.request.priority, entry.request.tenant
        tenants = self._bands[prio]
        q = tenants.get(tenant)
        if q is None or entry not in q:
            return False
        q.remove(entry)
        if q:
            tenants.move_to_end(tenant)
        else:
            del tenants[tenant]
        self._band_len[prio] -= 1
        self._len -= 1
        return True

    def expire(self, now: float) -> list[tuple[QueueEntry, Reason]]:
        """Remove and return every entry past its TTL (QUEUE_TTL) or deadline (QUEUE_DEADLINE)."""
        out: list[tuple[QueueEntry, Reason]] = []
        for entry in [e for e in self.ordered() if e.expires_at <= now]:
            self.remove(entry)
            reason = Reason.QUEUE_TTL if entry.ttl_at <= now else Reason.QUEUE_DEADLINE
            out.append((entry, reason))
        return out

    def _victim_band(self, priority: Priority) -> Priority | None:
        for prio in reversed(Priority):
            if prio <= priority:
                return None
            if self._band_len[prio]:
                return prio
        return None

    def _pop_newest(self, band: Priority) -> QueueEntry:
        tenants = self._bands[band]
        newest = max((q[-1] for q in tenants.values()), key=lambda e: e.seq)
        self.remove(newest)
        return newest
