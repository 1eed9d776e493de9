"""Local placement: predict every candidate lane and pick one with bounded-load affinity.

This is the hot path of ``Policy.decide``: one pass over the candidate lanes of a model
version, no allocation per lane. Prediction per lane (ms):

    queue   = max(0, load - usable_slots(priority) + 1) / rate   (rate = slots / service_ms)
    prefill = ttft_overhead + uncached_prompt_tokens x prefill_ms_per_token
    decode  = output_tokens x (itl_base + itl_per_seq x (min(load + 1, slots) - 1))

SERVE only dispatches into a usable slot that is free now: a request that would wait goes to
the admission queue instead, which is priority ordered (a replica's waiting queue is FIFO and
would let a BATCH request sit ahead of a CRITICAL one).

Affinity (session replica first, then the replica holding the longest prompt prefix) only
applies while that lane's load + 1 <= ceil((1 + epsilon) x pool mean load per slot x its
slots), so a hot session or prefix spreads instead of piling onto one replica.

A request that may be degraded also gets the lanes with a free usable slot from the same
pass, so DEGRADE by max_tokens (:func:`max_tokens_that_fit`) only looks at those lanes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from spillgate.core.decision import Estimate, Reason
from spillgate.core.lanes import Lane


@dataclass(slots=True)
class Pick:
    """A predicted placement on one lane."""

    lane: Lane
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    itl_ms: float
    cached_tokens: int
    reason: Reason

    @property
    def total_ms(self) -> float:
        """queue + prefill + decode (local: no network)."""
        return self.queue_ms + self.prefill_ms + self.decode_ms

    def estimate(self, budget_ms: float, network_ms: float = 0.0) -> Estimate:
        """The wire Estimate of this pick."""
        total = network_ms + self.total_ms
        return Estimate(
            network_ms,
            self.queue_ms,
            self.prefill_ms,
            self.decode_ms,
            total,
            budget_ms,
            self.cached_tokens,
        )


@dataclass(slots=True)
class Scan:
    """Result of scanning the candidates: the chosen pick (or None) and fit flags."""

    pick: Pick | None
    fits: bool  # a usable slot is free now and pick.total_ms <= remaining budget
    unloaded_fits: bool  # some candidate would fit with no queueing (waiting can help)
    candidates: int
    drain_rate: float  # requests per ms the candidates complete (sum of slots / service)
    backlog: int  # requests ahead of this priority beyond the candidates' usable slots
    free: Sequence[Lane] = ()  # only with ``scan(..., degrade=True)``: lanes free now


NO_CANDIDATES = Scan(None, False, False, 0, 0.0, 0)


def scan(
    lanes: list[Lane],
    now: float,
    fresh_after: float,
    priority: int,
    prompt_tokens: int,
    output_tokens: int,
    remaining_ms: float,
    epsilon: float,
    holders: tuple[int, ...],
    cached_tokens: int,
    session_lane: Lane | None,
    degrade: bool = False,
) -> Scan:
    """Predict every available lane and choose one (see module docstring).

    ``holders``/``cached_tokens``: lanes expected to hold the prompt's prefix and how many
    prompt tokens would hit. ``session_lane``: the session's previous lane (None = none).
    ``degrade``: also collect ``Scan.free`` (for DEGRADE by max_tokens).
    """
    # This loop runs for every candidate of every decision: it reads each attribute once,
    # and the lanes keep ``itl_next`` current instead of it being derived here.
    best: Lane | None = None
    best_total = best_q = best_prefill = math.inf
    min_unloaded = math.inf
    sum_load = sum_slots = skipped = backlog = 0
    rate = 0.0
    free: list[Lane] = []
    affine: list[Lane] | None = None
    affine_ids = set(holders)  # a hot prefix can have dozens of holders
    if session_lane is not None:
        affine_ids.add(session_lane.id)
    check_affinity = bool(affine_ids)
    for lane in lanes:
        if lane.signal_time < fresh_after or lane.draining:
            skipped += 1  # counted here, the rare case, rather than the candidates
            continue
        br = lane.breaker
        if br is not None and not br.allows(now):
            skipped += 1
            continue
        load = lane.load
        lane_rate = lane.rate
        sum_load += load
        sum_slots += lane.slots
        rate += lane_rate
        prefill = lane.overhead + prompt_tokens * lane.prefill_per_token
        pd = prefill + output_tokens * lane.itl_next
        ahead = load - lane.usable[priority] + 1
        if ahead > 0:
            backlog += ahead
            q = ahead / lane_rate
            total = q + pd
        else:
            q, total = 0.0, pd  # 0.0 + pd, one float addition less for most lanes
        if degrade and q == 0.0:
            free.append(lane)
        if pd < min_unloaded:
            min_unloaded = pd
        if total < best_total:
            best, best_total, best_q, best_prefill = lane, total, q, prefill
        if check_affinity and lane.id in affine_ids:
            if affine is None:
                affine = [lane]
            else:
                affine.append(lane)
    if best is None:
        return NO_CANDIDATES
    itl = best.itl_next
    pick = Pick(best, best_q, best_prefill, output_tokens * itl, itl, 0, Reason.LOCAL_FIT)
    if affine is not None:
        # Consistent hashing with bounded loads: a lane may take the request while
        # load + 1 <= ceil((1 + eps) x (pool load + 1) x its share of the pool's slots).
        bound = (1.0 + epsilon) * (sum_load + 1) / sum_slots
        pick = _affinity(
            affine, pick, priority, prompt_tokens, output_tokens, remaining_ms, bound,
            holders, cached_tokens, session_lane,
        )  # fmt: skip
    unloaded = min(min_unloaded, pick.prefill_ms + pick.decode_ms)
    fits = pick.queue_ms == 0.0 and pick.total_ms <= remaining_ms
    return Scan(
        pick, fits, unloaded <= remaining_ms, len(lanes) - skipped, rate, backlog,
        free,
    )  # fmt: skip


def _affinity(
    affine: list[Lane],
    best: Pick,
    priority: int,
    prompt_tokens: int,
    output_tokens: int,
    remaining_ms: float,
    bound: float,
    holders: tuple[int, ...],
    cached_tokens: int,
    session_lane: Lane | None,
) -> Pick:
    # Inlines predict() (same formulas, same float order); a Pick is built only for a winner.
    chosen = best
    chosen_q, chosen_total = best.queue_ms, best.total_ms
    ceil = math.ceil
    for lane in affine:
        load, slots = lane.load, lane.slots
        if load + 1 > ceil(bound * slots - 1e-9):
            continue  # bounded load: affinity never pushes a lane past (1 + eps) x mean
        ahead = load - lane.usable[priority] + 1
        q = ahead / lane.rate if ahead > 0 else 0.0
        if q > chosen_q:
            continue  # affinity never trades a free slot for a wait
        cached = cached_tokens if lane.id in holders else 0
        itl = lane.itl_next
        prefill = lane.overhead + max(0, prompt_tokens - cached) * lane.prefill_per_token
        decode = output_tokens * itl
        total = q + prefill + decode
        if lane is session_lane:
            if total <= remaining_ms:
                # stickiness wins whenever it fits within the load bound
                return Pick(lane, q, prefill, decode, itl, cached, Reason.SESSION_AFFINITY)
        elif cached and total < chosen_total:
            chosen = Pick(lane, q, prefill, decode, itl, cached, Reason.PREFIX_AFFINITY)
            chosen_q, chosen_total = q, total
    return chosen


def predict(
    lane: Lane,
    priority: int,
    prompt_tokens: int,
    output_tokens: int,
    cached_tokens: int,
    reason: Reason,
) -> Pick:
    """Prediction for one lane (same formulas as :func:`scan`)."""
    itl = lane.itl_ms()
    return Pick(
        lane,
        lane.queue_ms(priority),
        lane.prefill_ms(max(0, prompt_tokens - cached_tokens)),
        output_tokens * itl,
        itl,
        cached_tokens,
        reason,
    )


def max_tokens_that_fit(
    free: Sequence[Lane], priority: int, prompt_tokens: int, remaining_ms: float
) -> tuple[int, Pick | None]:
    """Largest output length any of the ``free`` lanes (``Scan.free``: available, with a free
    usable slot) finishes within ``remaining_ms``, and its pick; (0, None) with none."""
    # Inlines Lane.prefill_ms (same formulas, same float order; the queue wait is 0). A lane's
    # output length is floor(left / itl) (0 when left <= 0); the first lane with the largest
    # wins, and floor(x) > best <=> x >= best + 1, so floor() runs only for a new best.
    best_tokens, best_lane = -1, None
    for lane in free:
        left = remaining_ms - (lane.overhead + prompt_tokens * lane.prefill_per_token)
        if left > 0:
            tokens = left / lane.itl_next
            if tokens >= best_tokens + 1:
                best_tokens, best_lane = math.floor(tokens), lane
        elif best_tokens < 0:
            best_tokens, best_lane = 0, lane
    if best_lane is None:
        return 0, None
    pick = predict(best_lane, priority, prompt_tokens, best_tokens, 0, Reason.DEGRADE_MAX_TOKENS)
    return best_tokens, pick
