"""Neighbour summaries, overflow token buckets and per-neighbour hysteresis (pure).

``NeighbourSummary``/``ModelHeadroom`` mirror ``spillgate.v1.RegionSummary``/``ModelHeadroom``
field for field (``time`` in clock seconds). A ``TokenBucket`` per (origin, neighbour) caps
spill at ``overflow_fraction`` of the neighbour's concurrent capacity per refill window, so
over any window of length W at most ``capacity x (1 + W / refill_s)`` requests are sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spillgate.core.breaker import Breaker
from spillgate.core.policy_config import PolicyConfig


@dataclass(frozen=True, slots=True)
class ModelHeadroom:
    """Live capacity of one model version in a region."""

    model: str
    version: str
    healthy_replicas: int = 0
    free_slots: int = 0
    headroom_ratio: float = 0.0
    predicted_queue_ms: float = 0.0
    queue_depth: int = 0
    prefill_ms_per_1k_tokens: float = 0.0
    itl_ms: float = 0.0


@dataclass(frozen=True)
class NeighbourSummary:
    """One region's published capacity (``RegionSummary``)."""

    region: str
    time: float
    residency_zone: str = ""
    healthy_replicas: int = 0
    queue_depth: int = 0
    models: tuple[ModelHeadroom, ...] = ()
    sequence: int = 0
    instance: str = ""
    overflow_in_total: int = 0
    overflow_out_total: int = 0
    registry_revision: int = 0
    _by_key: dict[tuple[str, str], ModelHeadroom] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._by_key.update({(m.model, m.version): m for m in self.models})

    def headroom(self, model: str, version: str) -> ModelHeadroom | None:
        """Headroom of ``model@version``, or None when the region does not serve it."""
        return self._by_key.get((model, version))

    def capacity_slots(self) -> float:
        """Concurrent slots behind the summary (free / ratio per model), 0 when unknown."""
        return sum(m.free_slots / m.headroom_ratio for m in self.models if m.headroom_ratio > 0)


class TokenBucket:
    """Classic token bucket; ``available`` is pure, ``take`` spends one token."""

    __slots__ = ("_last", "_sized", "_tokens", "capacity", "refill_s")

    def __init__(self, capacity: float, refill_s: float, now: float) -> None:
        self.capacity = capacity
        self.refill_s = refill_s
        self._tokens = capacity
        self._last = now
        self._sized = capacity > 0

    def available(self, now: float) -> float:
        """Tokens at ``now`` (no state change)."""
        if self.capacity <= 0:
            return 0.0
        elapsed = max(0.0, now - self._last)
        return min(self.capacity, self._tokens + elapsed * self.capacity / self.refill_s)

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        tokens = self.available(now)
        self._last = max(self._last, now)
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def set_capacity(self, capacity: float, now: float) -> None:
        """Resize (summary changed); tokens never exceed the new capacity.

        The first sizing of an unsized bucket fills it (a fresh neighbour gets its burst).
        """
        if self.capacity <= 0 and self._tokens <= 0 and not self._sized:
            self._tokens = capacity
        else:
            self._tokens = min(self.available(now), capacity)
        self._sized = self._sized or capacity > 0
        self._last = max(self._last, now)
        self.capacity = capacity


class NeighbourState:
    """What this region knows about one neighbour: last summary, bucket, hysteresis, breaker."""

    __slots__ = ("_known_capacity", "admitting", "breaker", "bucket", "received", "summary")

    def __init__(self, summary: NeighbourSummary, origin_bucket: TokenBucket, breaker: Breaker):
        self.summary = summary
        self.received = -float("inf")
        self.bucket = origin_bucket
        self.breaker = breaker
        self.admitting: dict[tuple[str, str], bool] = {}
        self._known_capacity = 0.0

    def update(self, summary: NeighbourSummary, now: float, config: PolicyConfig) -> None:
        """Take a newer summary: refresh hysteresis per model version and bucket size."""
        if summary.sequence and summary.sequence < self.summary.sequence:
            return  # an older summary from the same instance: drop
        self.summary, self.received = summary, now
        admitting: dict[tuple[str, str], bool] = {}
        for m in summary.models:
            key = (m.model, m.version)
            was = self.admitting.get(key, False)
            threshold = config.hysteresis_exit if was else config.hysteresis_enter
            admitting[key] = m.free_slots > 0 and m.headroom_ratio >= threshold
        self.admitting = admitting
        capacity = summary.capacity_slots()
        if capacity > 0:
            self._known_capacity = capacity  # a saturated summary keeps the last known size
        # At least one request per refill window: a fraction of a small neighbour (a few
        # slots) would otherwise round down to never.
        size = config.overflow_fraction * self._known_capacity
        self.bucket.set_capacity(max(1.0, size) if self._known_capacity > 0 else 0.0, now)
