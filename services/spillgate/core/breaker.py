"""Circuit breaker (closed / open / half-open) on an injected clock (pure).

Used per replica and per neighbour region. Time is passed in (clock seconds); nothing here
reads a wall clock, so transitions are reproducible in tests and in the simulator.
"""

from __future__ import annotations

import enum

from spillgate.core.policy_config import BreakerConfig


class BreakerState(enum.Enum):
    """CLOSED lets everything through; OPEN nothing; HALF_OPEN a few probes."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``open_s`` it lets
    ``half_open_probes`` trial requests through: a success closes it, a failure re-opens it.

    :meth:`allows` is a pure query; :meth:`on_attempt` (commit) takes a half-open probe.
    """

    __slots__ = ("_cfg", "_failures", "_opened_at", "_probes", "_state")

    def __init__(self, config: BreakerConfig) -> None:
        self._cfg = config
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0

    def state(self, now: float) -> BreakerState:
        """State at ``now`` (an OPEN breaker past ``open_s`` reads HALF_OPEN)."""
        if self._state is BreakerState.OPEN and now - self._opened_at >= self._cfg.open_s:
            return BreakerState.HALF_OPEN
        return self._state

    def allows(self, now: float) -> bool:
        """Whether a new request may be sent at ``now`` (no state change)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        probes = self._probes if self._state is BreakerState.HALF_OPEN else 0
        return probes < self._cfg.half_open_probes

    def recovered(self, now: float) -> None:
        """The target showed signs of life again (it answers its load scrape after having
        gone silent): an OPEN breaker goes HALF_OPEN now instead of after ``open_s``.

        The trial requests still decide: a success closes the breaker, a failure re-opens
        it for a full ``open_s``. Without this a replica that crashed and restarted sat idle
        for the whole ejection time (Envoy un-ejects on a passing active health check for the
        same reason: ``successful_active_health_check_uneject_host``).
        """
        if self.state(now) is BreakerState.OPEN:
            self._state, self._probes = BreakerState.HALF_OPEN, 0

    def on_attempt(self, now: float) -> None:
        """Record that a request was sent (takes a probe while half-open)."""
        if self.state(now) is BreakerState.HALF_OPEN:
            if self._state is not BreakerState.HALF_OPEN:
                self._state, self._probes = BreakerState.HALF_OPEN, 0
            self._probes += 1

    def record(self, ok: bool, now: float) -> None:
        """Feed one result (health probe or released request)."""
        state = self.state(now)
        if ok:
            self._failures = 0
            if state is BreakerState.HALF_OPEN:
                self._state, self._probes = BreakerState.CLOSED, 0
            return
        self._failures += 1
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self._failures >= self._cfg.failure_threshold
        ):
            self._state, self._opened_at, self._probes = BreakerState.OPEN, now, 0
