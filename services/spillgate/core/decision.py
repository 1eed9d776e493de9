"""Pure request and decision types of the admission policy (mirrors of spillgate.v1 messages).

Every type here maps 1:1 onto a protobuf message of ``common.proto`` / ``admission.proto``;
the admission service converts at its edge. Times are clock seconds (the injected clock),
durations carry their unit in the name, exactly like the wire contract.

All of them are values: nothing changes one after construction (``dataclasses.replace``
makes a changed copy). ``Request``, ``Estimate``, ``Ticket`` and ``Decision`` are built for
every request, so they are plain slotted dataclasses: a frozen one pays an
``object.__setattr__`` call per field on construction (4x the cost for ``Decision``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from spillgate.core.errors import InvalidRequest


class Priority(enum.IntEnum):
    """Scheduling class; values equal ``spillgate.v1.Priority`` (smaller = more important)."""

    CRITICAL = 1
    HIGH = 2
    NORMAL = 3
    LOW = 4
    BATCH = 5

    @classmethod
    def from_wire(cls, value: int) -> Priority:
        """Map a wire value; 0 (UNSPECIFIED) is NORMAL, anything else unknown is invalid."""
        if value == 0:
            return cls.NORMAL
        try:
            return cls(value)
        except ValueError:
            raise InvalidRequest("priority", f"unknown priority {value}") from None


class Action(enum.IntEnum):
    """What admission decided; values equal ``spillgate.v1.Action``."""

    SERVE = 1
    OVERFLOW = 2
    QUEUE = 3  # transient: a queued request later ends SERVE or SHED (Policy.drain_queue)
    DEGRADE = 4
    SHED = 5


class Outcome(enum.IntEnum):
    """How a served request ended; values equal ``spillgate.v1.Outcome`` (0 reads as ERROR)."""

    OK = 1
    ERROR = 2
    CANCELLED = 3
    TIMEOUT = 4


class Reason(enum.StrEnum):
    """Machine-readable decision reasons (``Decision.reason``); stable, lower_snake."""

    LOCAL_FIT = "local_fit"  # SERVE: best local prediction fits the budget
    SESSION_AFFINITY = "session_affinity"  # SERVE: the session's replica, within bounded load
    PREFIX_AFFINITY = "prefix_affinity"  # SERVE: replica holding the prompt prefix, bounded
    QUEUE_SERVED = "queue_served"  # SERVE: a queued request got a slot
    OVERFLOW_FIT = "overflow_fit"  # OVERFLOW: neighbour fits RTT + wait + inference
    QUEUED = "queued"  # QUEUE: waits for a local slot (transient)
    DEGRADE_FALLBACK = "degrade_fallback"  # DEGRADE: fallback model fits
    DEGRADE_MAX_TOKENS = "degrade_max_tokens"  # DEGRADE: capped max_tokens fits
    RESIDENCY = "residency"  # SHED: no in-zone target
    NO_REPLICAS = "no_replicas"  # SHED: no ready replica with fresh signals serves it
    NO_HEADROOM = "no_headroom"  # SHED: would fit unloaded, but capacity is taken
    BUDGET_EXCEEDED = "budget_exceeded"  # SHED: cannot fit the budget even unloaded
    QUEUE_FULL = "queue_full"  # SHED: admission queue (or its band) is full
    QUEUE_TTL = "queue_ttl"  # SHED: waited longer than its band's TTL
    QUEUE_DEADLINE = "queue_deadline"  # SHED: can no longer start in time
    DISPLACED = "displaced"  # SHED: pushed out of a full queue by a higher priority


@dataclass(slots=True)  # not frozen: see the module docstring
class Request:
    """Routing attributes of one request (``RequestContext``) with the budget resolved.

    ``budget_ms`` is the remaining end-to-end budget at ``arrival`` (clock seconds); use
    :func:`resolve_budget_ms` to derive it from ``budget_ms``/``deadline``/priority default.
    ``max_tokens`` 0 means the model's limit. ``hops`` >= 1 marks a forwarded request.
    """

    request_id: str
    model: str  # alias or "name@version"
    arrival: float
    budget_ms: float
    priority: Priority = Priority.NORMAL
    tenant: str = ""
    session_id: str = ""
    prompt_tokens: int = 0
    prefix_block_hashes: tuple[int, ...] = ()
    block_size_tokens: int = 16
    cache_salt: str = ""
    max_tokens: int = 0
    residency_zone: str = ""
    allow_degrade: bool = False
    hops: int = 0
    origin_region: str = ""
    avoid_replicas: frozenset[str] = frozenset()  # replicas a retry must not land on

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` naming the first bad field."""
        if not self.model:
            raise InvalidRequest("model", "model is required")
        if self.prompt_tokens < 0:
            raise InvalidRequest("prompt_tokens", "must be >= 0")
        if self.max_tokens < 0:
            raise InvalidRequest("max_tokens", "must be >= 0")
        if self.hops < 0:
            raise InvalidRequest("hops", "must be >= 0")
        if self.prefix_block_hashes and self.block_size_tokens < 1:
            raise InvalidRequest("block_size_tokens", "must be >= 1 with prefix hashes")
        if len(self.prefix_block_hashes) * max(self.block_size_tokens, 1) > max(
            self.prompt_tokens, 0
        ):
            raise InvalidRequest("prefix_block_hashes", "more blocks than the prompt holds")
        if not math.isfinite(self.budget_ms) or not math.isfinite(self.arrival):
            raise InvalidRequest("budget_ms", "budget and arrival must be finite")

    def remaining_ms(self, now: float) -> float:
        """Budget left at ``now`` (negative once past the deadline)."""
        return self.budget_ms - (now - self.arrival) * 1000.0


def resolve_budget_ms(
    default_ms: float, budget_ms: float, deadline: float | None, now: float
) -> float:
    """Remaining budget at ``now``: ``budget_ms`` (0 = ``default_ms``), capped by ``deadline``.

    ``deadline`` is an absolute clock time in seconds (None = unset); the earlier wins.
    """
    budget = float(budget_ms) if budget_ms > 0 else float(default_ms)
    if deadline is not None:
        budget = min(budget, (deadline - now) * 1000.0)
    return budget


@dataclass(slots=True)  # not frozen: see the module docstring
class Estimate:
    """Latency prediction behind a decision, in ms (``spillgate.v1.Estimate``)."""

    network_ms: float = 0.0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    budget_ms: float = 0.0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Degrade:
    """What was degraded (``spillgate.v1.Degrade``): fallback model and/or capped tokens."""

    fallback_model: str = ""
    max_tokens: int = 0


@dataclass(slots=True)  # not frozen: see the module docstring
class Ticket:
    """Lease on one admitted slot (``spillgate.v1.Ticket``); times in clock seconds."""

    id: str
    region: str
    replica: str
    lease_expires_at: float
    lease_ms: int


@dataclass(slots=True)  # not frozen: see the module docstring
class Decision:
    """The policy's answer (``spillgate.v1.Decision``); ``reason`` is a :class:`Reason`."""

    action: Action
    reason: Reason
    detail: str
    estimate: Estimate
    region: str = ""
    replica: str = ""
    endpoint: str = ""
    model: str = ""
    version: str = ""
    triton_model_name: str = ""
    triton_model_version: str = ""
    degrade: Degrade | None = None
    retry_after_ms: int = 0
    queue_ms: float = 0.0
    ticket: Ticket | None = None

    @property
    def terminal(self) -> bool:
        """True for every action except the transient QUEUE."""
        return self.action is not Action.QUEUE
