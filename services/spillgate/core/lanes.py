"""Per (replica, model version) capacity, load merge and latency model: a ``Lane``.

A Triton replica runs one engine per model, so slots, queue, KV cache and learned speed are
per lane. Load merges the last scrape with this admission's own accounting:

    load = max(scraped_running + scraped_waiting + own_admitted_since_scrape
               - own_released_since_scrape, own_in_flight)

The scrape sees every admission instance's traffic; the delta covers what this instance did
since; own in-flight is a floor the scrape cannot undercut (it may predate our admits).
A lane with no scrape, a partial scrape (running/waiting unknown) or one older than the
staleness limit is saturated: it is not a candidate and reports no headroom.
"""

from __future__ import annotations

import math

from spillgate.core.breaker import Breaker
from spillgate.core.decision import Priority
from spillgate.core.fleet import ReplicaInfo, VersionInfo
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.signals import ModelLoad

_SCALE_MIN, _SCALE_MAX = 0.25, 8.0  # learned speed factors stay within sane bounds
_INBOUND = len(Priority) + 1  # offset of the overflow-in slot classes in ``Lane.usable``


def slot_class(priority: int, hops: int) -> int:
    """Index into ``Lane.usable``: the priority, shifted for a request another region sent.

    An overflowed request (hops >= 1) only takes capacity the region does not need for its
    own users: ``PolicyConfig.overflow_in_reserve`` more slots stay free for local traffic.
    """
    return priority if hops == 0 else priority + _INBOUND


class Lane:
    """One model version on one replica. Attributes are read directly on the hot path."""

    __slots__ = (
        "_alpha",
        "_decay_s",
        "_inbound_reserve",
        "_itl_base0",
        "_itl_per_seq0",
        "_prefill0",
        "_reserve",
        "_service0",
        "breaker",
        "delta",
        "draining",
        "endpoint",
        "id",
        "inflight",
        "itl_base",
        "itl_next",
        "itl_per_seq",
        "kv_blocks",
        "load",
        "model",
        "overhead",
        "prefill_per_token",
        "rate",
        "replica",
        "scraped",
        "service_ms",
        "signal_time",
        "slots",
        "triton_model_name",
        "triton_model_version",
        "usable",
        "version",
    )

    def __init__(
        self, lane_id: int, replica: ReplicaInfo, info: VersionInfo, config: PolicyConfig
    ) -> None:
        prior = config.prior
        self.id = lane_id
        self.replica = replica.id
        self.endpoint = replica.endpoint
        self.model, self.version = info.model, info.version
        self.triton_model_name = info.triton_model_name
        self.triton_model_version = info.triton_model_version
        self.slots = replica.max_num_seqs or prior.max_num_seqs
        kv = replica.kv_blocks or prior.kv_blocks
        # Index capacity in indexed blocks: the KV cache's blocks / stride, x fraction.
        self.kv_blocks = max(
            1, int(kv * config.prefix_index_fraction) // config.prefix_index_stride
        )
        self._reserve = tuple(config.priority_reserve.items())
        self._inbound_reserve = config.overflow_in_reserve
        self.usable = self._usable()
        self.scraped = 0
        self.signal_time = -math.inf
        self.delta = 0
        self.inflight = 0
        self.load = 0
        self.draining = False
        self.breaker: Breaker | None = None
        self._alpha = config.ewma_alpha
        self._decay_s = config.learned_decay_s
        self._service0 = prior.service_ms()
        self.service_ms = self._service0
        self.rate = self.slots / self.service_ms  # completions per ms with every slot busy
        self.overhead = prior.ttft_overhead_ms
        self._prefill0 = prior.prefill_ms_per_token
        self._itl_base0 = prior.itl_base_ms
        self._itl_per_seq0 = prior.itl_per_seq_ms
        self.prefill_per_token = self._prefill0
        self.itl_base, self.itl_per_seq = self._itl_base0, self._itl_per_seq0
        self.itl_next = self._itl_next()

    def _usable(self) -> tuple[int, ...]:
        # Slots a priority may fill before it must wait: the reserve keeps the last ones for
        # more important traffic (index = slot_class(priority, hops); 0 unused). Overflow-in
        # classes keep overflow_in_reserve more back, so a neighbour's spill can never take
        # the slots this region's own next arrivals need.
        usable = [self.slots] * (2 * _INBOUND)
        for prio, frac in self._reserve:
            usable[prio] = max(1, math.floor(self.slots * (1.0 - frac)))
            inbound = max(0.0, 1.0 - frac - self._inbound_reserve)
            usable[prio + _INBOUND] = max(1, math.floor(self.slots * inbound))
        return tuple(usable)

    def set_slots(self, slots: int) -> None:
        """Adopt the capacity the replica reports (its max running sequences)."""
        if slots > 0 and slots != self.slots:
            self.slots = slots
            self.usable = self._usable()
            self.rate = self.slots / self.service_ms
            self.itl_next = self._itl_next()

    def observe(self, load: ModelLoad | None, now: float) -> None:
        """Apply one scrape; unknown running/waiting marks the lane saturated (stale)."""
        in_system = None if load is None else load.in_system
        if in_system is None:
            self.signal_time = -math.inf
            return
        if load is not None and load.max_running:
            self.set_slots(load.max_running)
        if in_system == 0 and self.inflight == 0 and self._decay_s > 0:
            self._forget(now - self.signal_time)
        self.scraped, self.signal_time, self.delta = in_system, now, 0
        self._reload()

    def _forget(self, idle_s: float) -> None:
        """Fade learned rates toward the prior over ``idle_s`` seconds of idleness."""
        if not 0 < idle_s < math.inf:
            return
        f = 1.0 - math.exp(-idle_s / self._decay_s)
        self.service_ms += f * (self._service0 - self.service_ms)
        self.rate = self.slots / self.service_ms
        self.prefill_per_token += f * (self._prefill0 - self.prefill_per_token)
        self.itl_base += f * (self._itl_base0 - self.itl_base)
        self.itl_per_seq += f * (self._itl_per_seq0 - self.itl_per_seq)
        self.itl_next = self._itl_next()

    def admit(self) -> None:
        """Account one request this admission sent here."""
        self.inflight += 1
        self.delta += 1
        self._reload()

    def release(self) -> None:
        """Account one of our requests leaving."""
        self.inflight = max(0, self.inflight - 1)
        self.delta -= 1
        self._reload()

    def _reload(self) -> None:
        self.load = max(self.scraped + self.delta, self.inflight, 0)
        self.itl_next = self._itl_next()

    def _itl_next(self) -> float:
        # Kept in ``itl_next`` (the placement scan reads it for every candidate on every
        # decision); recomputed whenever load, slots or the learned speed change.
        return self.itl_base + self.itl_per_seq * (min(self.load + 1, self.slots) - 1)

    def available(self, now: float, fresh_after: float) -> bool:
        """Candidate check: fresh signals, not draining, breaker lets a request through."""
        if self.signal_time < fresh_after or self.draining:
            return False
        return self.breaker is None or self.breaker.allows(now)

    def queue_ms(self, priority: int) -> float:
        """Predicted wait before a new request of slot class ``priority`` gets a slot."""
        ahead = self.load - self.usable[priority] + 1
        return ahead / self.rate if ahead > 0 else 0.0

    def itl_ms(self) -> float:
        """Inter-token latency with one more sequence in the batch."""
        return self.itl_next

    def prefill_ms(self, uncached_tokens: int) -> float:
        """TTFT without queueing for ``uncached_tokens`` prompt tokens."""
        return self.overhead + uncached_tokens * self.prefill_per_token

    def learn(
        self,
        total_ms: float,
        ttft_ms: float,
        output_tokens: int,
        predicted_prefill_ms: float,
        predicted_itl_ms: float,
    ) -> None:
        """Fold one successful request's timings into the EWMA service rate and speed factors."""
        a = self._alpha
        if total_ms > 0:
            self.service_ms += a * (total_ms - self.service_ms)
            self.rate = self.slots / self.service_ms
        if ttft_ms > 0 and predicted_prefill_ms > 0:
            ratio = _clamp(ttft_ms / predicted_prefill_ms)
            cur = self.prefill_per_token / self._prefill0 if self._prefill0 else 1.0
            self.prefill_per_token = self._prefill0 * _clamp(cur + a * (ratio - cur))
        if output_tokens > 1 and total_ms > ttft_ms > 0 and predicted_itl_ms > 0:
            observed = (total_ms - ttft_ms) / (output_tokens - 1)
            ratio = _clamp(observed / predicted_itl_ms)
            cur = self.itl_base / self._itl_base0 if self._itl_base0 else 1.0
            scale = _clamp(cur + a * (ratio - cur))
            self.itl_base = self._itl_base0 * scale
            self.itl_per_seq = self._itl_per_seq0 * scale
            self.itl_next = self._itl_next()

    def refresh(self, replica: ReplicaInfo, info: VersionInfo) -> None:
        """Take a newer registry record of the same (replica, model, version); load,
        signals, learned rates and the capacity the replica reported carry on."""
        self.endpoint = replica.endpoint
        self.triton_model_name = info.triton_model_name
        self.triton_model_version = info.triton_model_version

    def adopt(self, old: Lane) -> None:
        """Carry load, signals and learned rates over from the lane this one replaces."""
        self.scraped, self.signal_time, self.delta = old.scraped, old.signal_time, old.delta
        self.inflight, self.service_ms, self.rate = old.inflight, old.service_ms, old.rate
        self.prefill_per_token, self.itl_base = old.prefill_per_token, old.itl_base
        self.itl_per_seq = old.itl_per_seq
        self.set_slots(old.slots)  # capacity the replica reported
        self._reload()


def _clamp(x: float) -> float:
    return min(_SCALE_MAX, max(_SCALE_MIN, x))
