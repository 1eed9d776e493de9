"""DEGRADE by max_tokens reuses the local scan: its free lanes give the same fit as a full pass.

``scan(..., degrade=True)`` collects the lanes with a free usable slot, and
``max_tokens_that_fit`` only looks at those. The reference below is the full second pass it
replaced (every candidate, availability checked again); both must pick the same lane and
output length for any lane states.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from spillgate.core.breaker import Breaker
from spillgate.core.fleet import ReplicaInfo, ReplicaStatus, VersionInfo
from spillgate.core.lanes import Lane
from spillgate.core.placement import max_tokens_that_fit, scan
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.signals import ModelLoad

CONFIG = PolicyConfig()
NOW = 100.0
FRESH_AFTER = NOW - CONFIG.stale_after_s

lane_state = st.tuples(
    st.integers(0, 80),  # in system
    st.integers(1, 64),  # max running
    st.sampled_from(["fresh", "fresh", "fresh", "stale", "draining", "broken"]),
    st.floats(0.25, 4.0),  # learned speed factor
)


def _lane(i: int, state: tuple[int, int, str, float]) -> Lane:
    in_system, slots, kind, speed = state
    replica = ReplicaInfo(f"r{i}", "us", f"h{i}:1", ReplicaStatus.READY, (("m", "v1"),))
    lane = Lane(i, replica, VersionInfo("m", "v1", "m"), CONFIG)
    load = ModelLoad(running=min(in_system, slots), waiting=max(0, in_system - slots))
    lane.observe(load, NOW - 60.0 if kind == "stale" else NOW)
    lane.draining = kind == "draining"
    if kind == "broken":
        lane.breaker = Breaker(CONFIG.breaker)
        for _ in range(CONFIG.breaker.failure_threshold):
            lane.breaker.record(False, NOW)
    # one learned result makes prefill and decode ~``speed`` x the prior
    lane.learn(2000.0 * speed, 500.0 * speed, 100, 500.0, 15.0)
    return lane


def _full_pass(
    lanes: list[Lane], priority: int, prompt_tokens: int, remaining_ms: float
) -> tuple[int, Lane | None]:
    best_tokens, best_lane = -1, None
    for lane in lanes:
        if not lane.available(NOW, FRESH_AFTER) or lane.queue_ms(priority) > 0:
            continue
        left = remaining_ms - lane.queue_ms(priority) - lane.prefill_ms(prompt_tokens)
        tokens = math.floor(left / lane.itl_ms()) if left > 0 else 0
        if tokens > best_tokens:
            best_tokens, best_lane = tokens, lane
    return (0, None) if best_lane is None else (best_tokens, best_lane)


@settings(max_examples=300, deadline=None)
@given(
    states=st.lists(lane_state, min_size=0, max_size=12),
    priority=st.integers(1, 11),
    prompt_tokens=st.integers(0, 8192),
    remaining_ms=st.floats(1.0, 20_000.0),
)
def test_free_lanes_of_the_scan_give_the_full_pass_fit(
    states: list[tuple[int, int, str, float]],
    priority: int,
    prompt_tokens: int,
    remaining_ms: float,
) -> None:
    lanes = [_lane(i, s) for i, s in enumerate(states)]
    local = scan(
        lanes, NOW, FRESH_AFTER, priority, prompt_tokens, 256, remaining_ms, 0.25, (), 0, None,
        degrade=True,
    )  # fmt: skip
    tokens, pick = max_tokens_that_fit(local.free, priority, prompt_tokens, remaining_ms)
    want_tokens, want_lane = _full_pass(lanes, priority, prompt_tokens, remaining_ms)
    assert (tokens, pick.lane if pick else None) == (want_tokens, want_lane)
    if pick is not None:
        assert pick.queue_ms == 0.0 and pick.decode_ms == tokens * pick.itl_ms
