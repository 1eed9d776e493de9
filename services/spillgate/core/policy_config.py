"""Every knob of the admission policy, in one typed, validated config with documented defaults.

Defaults come from ``shared/data/world.toml`` where a public figure exists (cited inline) and
from ``core/engine.py``'s ``EngineConfig`` for the latency prior, so an unobserved replica is
predicted like the simulator behaves. Durations in seconds end in ``_s``, in ms in ``_ms``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from spillgate.core.decision import Priority


def _per_priority(
    critical: float, high: float, normal: float, low: float, batch: float
) -> dict[Priority, float]:
    values = (critical, high, normal, low, batch)
    return dict(zip(Priority, values, strict=True))


@dataclass(frozen=True)
class LatencyPrior:
    """Latency/capacity model used until a replica's own observations arrive.

    Equal to ``EngineConfig``'s defaults (engine.py): TTFT = overhead + uncached x per-token,
    ITL = base + per_seq x (running - 1).
    """

    ttft_overhead_ms: float = 15.0
    prefill_ms_per_token: float = 0.05
    itl_base_ms: float = 8.0
    itl_per_seq_ms: float = 0.15
    max_num_seqs: int = 64  # decode slots when the registry does not say
    kv_blocks: int = 4096  # KV capacity in blocks, sizes the per-replica prefix index
    # Mean request for the prior service time (world.toml workload.high_cache: 2048 system +
    # 256 question prompt tokens, 256 output tokens).
    mean_prompt_tokens: int = 2304
    mean_output_tokens: int = 256

    def service_ms(self) -> float:
        """Prior mean time one request holds a slot, at a full batch."""
        itl = self.itl_base_ms + self.itl_per_seq_ms * (self.max_num_seqs - 1)
        prefill = self.ttft_overhead_ms + self.mean_prompt_tokens * self.prefill_ms_per_token
        return prefill + self.mean_output_tokens * itl


@dataclass(frozen=True)
class BreakerConfig:
    """Circuit breaker: open after N consecutive failures, probe after ``open_s``."""

    failure_threshold: int = 5  # world.toml baseline.envoy.outlier_consecutive_5xx
    open_s: float = 30.0  # world.toml baseline.envoy.outlier_base_ejection_s
    half_open_probes: int = 1  # trial requests let through while half-open


@dataclass(frozen=True)
class PolicyConfig:
    """All policy knobs. ``validate()`` raises ``ValueError`` naming the first bad field."""

    # End-to-end budget (network + queue + prefill + decode of the predicted output) when the
    # request sets neither budget_ms nor deadline. world.toml scale.sla_p99_ms_end_to_end = 1200
    # for interactive classes; LOW/BATCH are latency tolerant.
    budgets_ms: Mapping[Priority, float] = field(
        default_factory=lambda: _per_priority(1200, 1200, 1200, 5000, 30000)
    )
    # Output tokens predicted when the request leaves max_tokens at 0 (world.toml workload
    # output_tokens = 256), capped by the model's max_output_tokens.
    default_output_tokens: int = 256
    # Learned output length (core/output_ratio.py): decode is planned for
    # ceil(max_tokens x ratio), ratio = this quantile of completion_tokens / max_tokens over
    # the last ``output_ratio_window`` OK releases of the model version, never below the
    # floor, and 1.0 (the whole max_tokens) until ``output_ratio_min_samples`` are in. p80:
    # ~1 answer in 5 runs longer than planned, by < (1 - ratio) x max_tokens x ITL (the
    # budget's slack absorbs it); in `spillgate sim` (2 % scale, seeds 1 and 2) p80 raised SLA
    # attainment in all five scenarios, while p90 and p95 each lost a little in outage on one
    # seed. 1.0 as quantile, or min_samples above the window, turns learning off.
    output_ratio_quantile: float = 0.8
    output_ratio_window: int = 256
    output_ratio_min_samples: int = 50
    output_ratio_floor: float = 0.25
    # Bounded load: affinity only while (load + 1) / slots <= (1 + epsilon) x pool mean.
    # 0.25 = Envoy/llm-d hash_balance_factor 1.25; SGLang's balance_rel_threshold 1.0001
    # (world.toml baseline.sglang_cache_aware) is the near-zero extreme.
    epsilon: float = 0.25
    # Minimum prefix match (blocks) that counts for affinity, so a short shared system
    # prompt does not pin everything to one replica (4 x 16 tokens = 64 tokens).
    min_prefix_blocks: int = 4
    # Fraction of the prior KV capacity the prefix index remembers per replica (the index is
    # approximate: it cannot see the replica's evictions).
    prefix_index_fraction: float = 1.0
    # Index every Nth block only (its hash covers the blocks before it): N x cheaper updates
    # on the hot path, match length rounded down to N blocks (4 x 16 = 64 tokens).
    prefix_index_stride: int = 4
    session_capacity: int = 100_000  # session table entries (LRU)
    # Overflow: at most this fraction of a neighbour's concurrent capacity per refill window.
    # The bucket is the backstop for what a summary cannot see (one summary interval plus the
    # RTT of blindness, other origins spilling at the same time); the neighbour's advertised
    # headroom, its hysteresis and its overflow-in reserve already keep the sustained spill
    # within what it can spare. 0.1 made the bucket the binding limit instead: an origin at
    # 1.7x its capacity could move only ~10 % of a quiet neighbour's throughput and shed the
    # rest. 0.3 slots per second is about a third of a neighbour's throughput per origin at
    # ~1 s service times, so two origins together still leave it a third for its own users.
    overflow_fraction: float = 0.3
    overflow_refill_s: float = 1.0
    # Hysteresis on a neighbour's headroom ratio: start overflowing at >= enter, stop < exit.
    hysteresis_enter: float = 0.2
    hysteresis_exit: float = 0.1
    # Admission queue: total capacity, per-band capacity and TTL; TTL 0 = may not queue.
    queue_capacity: int = 1024
    band_capacity: Mapping[Priority, float] = field(
        default_factory=lambda: _per_priority(256, 256, 512, 512, 512)
    )
    # NORMAL: world.toml scale.budget_ms.queue = 100 ms.
    band_ttl_s: Mapping[Priority, float] = field(
        default_factory=lambda: _per_priority(0.5, 0.2, 0.1, 2.0, 10.0)
    )
    # Priority reserve: a priority may not take the last fraction of a replica's slots, so
    # lower priorities see queueing (and shed) first.
    priority_reserve: Mapping[Priority, float] = field(
        default_factory=lambda: _per_priority(0.0, 0.0, 0.05, 0.15, 0.3)
    )
    # Overflow-in reserve: a request another region spilled here (hops >= 1) may not take
    # the last fraction of a replica's slots on top of its priority reserve. Spill is a favour
    # to a neighbour; this region's own users, who have nowhere closer to go, keep first call
    # on the capacity they will need before the next RegionSummary (100 ms) reaches the
    # origin and its hysteresis stops the spill. The summary's headroom counts only the
    # slots below this reserve, so what a neighbour sees is what it may actually take.
    overflow_in_reserve: float = 0.1
    scrape_interval_s: float = 0.05  # world.toml baseline.llmd_weighted.scrape_interval_ms
    stale_after_s: float = 0.2  # world.toml baseline.llmd_weighted.stale_after_ms (4 scrapes)
    neighbour_stale_s: float = 1.0  # a RegionSummary older than this counts as no headroom
    retry_after_min_ms: int = 50
    retry_after_max_ms: int = 30_000
    retry_after_no_capacity_ms: int = 1000  # when no replica drains (all stale or down)
    ticket_lease_s: float = 30.0
    ewma_alpha: float = 0.2  # weight of a new observation in service-rate learning
    # While a replica sits idle, what was learned about it fades back to the prior with this
    # time constant, so a replica once measured slow (then fixed) gets traffic again and is
    # re-measured. 0 = never forget.
    learned_decay_s: float = 30.0
    min_degrade_tokens: int = 16  # never cap max_tokens below this
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    neighbour_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    prior: LatencyPrior = field(default_factory=LatencyPrior)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        for name in ("budgets_ms", "band_capacity", "band_ttl_s", "priority_reserve"):
            table: Mapping[Priority, float] = getattr(self, name)
            if set(table) != set(Priority):
                raise ValueError(f"{name} must have exactly one entry per priority")
            for prio, value in table.items():
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"{name}[{prio.name}] must be finite and >= 0")
        for prio, value in self.priority_reserve.items():
            if value >= 1:
                raise ValueError(f"priority_reserve[{prio.name}] must be < 1")
        positive = (
            "default_output_tokens",
            "session_capacity",
            "overflow_refill_s",
            "queue_capacity",
            "scrape_interval_s",
            "stale_after_s",
            "neighbour_stale_s",
            "retry_after_min_ms",
            "ticket_lease_s",
            "prefix_index_fraction",
            "prefix_index_stride",
            "output_ratio_window",
            "output_ratio_min_samples",
        )
        for name in positive:
            _check(name, getattr(self, name), low=0.0, strict=True)
        for name in ("epsilon", "min_prefix_blocks", "min_degrade_tokens", "learned_decay_s"):
            _check(name, getattr(self, name), low=0.0)
        if not 0 <= self.overflow_in_reserve < 1:
            raise ValueError("overflow_in_reserve must be >= 0 and < 1")
        for name in ("output_ratio_quantile", "output_ratio_floor"):
            _check(name, getattr(self, name), low=0.0, high=1.0, strict=True)
        for name in ("overflow_fraction", "hysteresis_exit", "hysteresis_enter", "ewma_alpha"):
            _check(name, getattr(self, name), low=0.0, high=1.0)
        if self.hysteresis_exit > self.hysteresis_enter:
            raise ValueError("hysteresis_exit must be <= hysteresis_enter")
        if self.stale_after_s < self.scrape_interval_s:
            raise ValueError("stale_after_s must be >= scrape_interval_s")
        if self.retry_after_max_ms < self.retry_after_min_ms:
            raise ValueError("retry_after_max_ms must be >= retry_after_min_ms")
        _check("retry_after_no_capacity_ms", self.retry_after_no_capacity_ms, low=0.0)
        for section in ("breaker", "neighbour_breaker"):
            cfg: BreakerConfig = getattr(self, section)
            _check(f"{section}.failure_threshold", cfg.failure_threshold, low=1.0)
            _check(f"{section}.open_s", cfg.open_s, low=0.0, strict=True)
            _check(f"{section}.half_open_probes", cfg.half_open_probes, low=1.0)
        for f in fields(LatencyPrior):
            low, strict = (1.0, False) if f.type == "int" else (0.0, False)
            _check(f"prior.{f.name}", getattr(self.prior, f.name), low=low, strict=strict)


def _check(
    name: str, value: float, low: float, high: float = math.inf, strict: bool = False
) -> None:
    ok = math.isfinite(value) and (value > low if strict else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{name} must be {bound} and <= {high}, got {value}")
