"""Token buckets of tenant rate limits (pure: clock values are passed in)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spillgate.core.ratelimit import RateLimit, RateLimiter, TokenBuckets


def test_full_bucket_admits_burst_then_refuses() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=10, burst=5))
    assert [buckets.try_acquire("t", 1, 100.0)[0] for _ in range(5)] == [True] * 5
    ok, retry_ms = buckets.try_acquire("t", 1, 100.0)
    assert not ok
    assert retry_ms == 100  # one token at 10/s
    assert buckets.available("t", 100.0) == pytest.approx(0.0)


def test_refill_is_linear_and_capped_at_burst() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=4, burst=8))
    for _ in range(8):
        assert buckets.try_acquire("t", 1, 0.0) == (True, 0)
    assert buckets.available("t", 0.5) == pytest.approx(2.0)
    assert buckets.available("t", 100.0) == pytest.approx(8.0)
    assert buckets.try_acquire("t", 2, 0.5) == (True, 0)
    assert buckets.try_acquire("t", 1, 0.5)[0] is False


def test_keys_are_independent_and_limits_travel_with_the_call() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1, burst=1))
    assert buckets.try_acquire("a", 1, 0.0) == (True, 0)
    assert buckets.try_acquire("a", 1, 0.0)[0] is False
    assert buckets.try_acquire("b", 1, 0.0) == (True, 0)
    wide = RateLimit(rate_per_s=1, burst=3)
    assert buckets.try_acquire("c", 3, 0.0, wide) == (True, 0)


def test_refused_request_spends_nothing() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1, burst=2))
    assert buckets.try_acquire("t", 2, 0.0) == (True, 0)
    for _ in range(10):
        assert buckets.try_acquire("t", 1, 0.5) == (False, 500)
    assert buckets.try_acquire("t", 1, 1.0) == (True, 0)


@pytest.mark.parametrize(
    ("limit", "cost"), [(RateLimit(3, 2), 3), (RateLimit(1, 1), 0), (RateLimit(1, 1), -1)]
)
def test_cost_outside_zero_to_burst_is_an_error(limit: RateLimit, cost: float) -> None:
    with pytest.raises(ValueError, match="cost"):
        TokenBuckets(limit).try_acquire("t", cost, 0.0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (-1, 1), (math.nan, 1), (math.inf, 1), (1, 0.5), (1, math.nan)]
)
def test_bad_limits_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        RateLimit(rate, burst)


def test_clock_going_backwards_never_adds_tokens() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1, burst=1))
    assert buckets.try_acquire("t", 1, 10.0) == (True, 0)
    ok, retry_ms = buckets.try_acquire("t", 1, 5.0)
    assert not ok
    assert retry_ms == 6000


def test_in_process_buckets_satisfy_the_protocol() -> None:
    limiter: RateLimiter = TokenBuckets()
    assert limiter.try_acquire("t", 1, 0.0) == (True, 0)


# --- retry_after is exact -------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    rate=st.floats(0.01, 10_000),
    burst=st.integers(1, 1000),
    start=st.floats(0, 1e7),
    spend=st.integers(1, 2000),
    cost_share=st.floats(0.001, 1.0),
)
def test_retry_after_is_the_first_millisecond_that_succeeds(
    rate: float, burst: int, start: float, spend: int, cost_share: float
) -> None:
    limit = RateLimit(rate, burst)
    buckets = TokenBuckets(limit)
    for _ in range(spend):
        if not buckets.try_acquire("t", 1, start)[0]:
            break
    cost = max(1.0, burst * cost_share)
    ok, retry_ms = buckets.try_acquire("t", cost, start)
    if ok:
        assert retry_ms == 0
        return
    assert retry_ms >= 1
    if retry_ms > 1:
        early = start + (retry_ms - 1) / 1000.0
        assert buckets.try_acquire("t", cost, early)[0] is False
    assert buckets.try_acquire("t", cost, start + retry_ms / 1000.0) == (True, 0)


# --- the rate bound over any window ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.1, 1000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2.0), min_size=1, max_size=300),
    costs=st.lists(st.integers(1, 50), min_size=1, max_size=300),
)
def test_accepted_cost_in_any_window_is_at_most_burst_plus_rate_times_length(
    rate: float, burst: int, gaps: list[float], costs: list[int]
) -> None:
    buckets = TokenBuckets(RateLimit(rate, burst))
    now = 0.0
    accepted: list[tuple[float, int]] = []
    for i, gap in enumerate(gaps):
        now += gap
        cost = min(costs[i % len(costs)], burst)
        if buckets.try_acquire("t", cost, now)[0]:
            accepted.append((now, cost))
    # The tightest windows start and end at accepted requests.
    for i, (t0, _) in enumerate(accepted):
        total = 0
        for t1, cost in accepted[i:]:
            total += cost
            assert total <= burst + rate * (t1 - t0) + 1e-6 * (1 + total)


def test_steady_overload_is_held_to_the_rate() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=50, burst=10))
    accepted = sum(buckets.try_acquire("t", 1, i / 1000)[0] for i in range(10_000))  # 1 kHz
    assert accepted == pytest.approx(10 + 50 * 10, abs=1)


# --- bounded memory -------------------------------------------------------------------------


def test_idle_buckets_are_evicted_without_changing_behaviour() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1, burst=2))
    for key in ("a", "b", "c"):
        buckets.try_acquire(key, 1, 0.0)
    assert buckets.try_acquire("d", 2, 0.0) == (True, 0)  # d refills at 2.0, the rest at 1.0
    assert len(buckets) == 4
    assert buckets.evict_idle(1.5) == 3
    assert len(buckets) == 1
    assert buckets.try_acquire("d", 2, 1.5) == (False, 500)  # the live one kept its state
    assert buckets.try_acquire("a", 2, 1.5) == (True, 0)  # evicted = full, as it should be


def test_calls_drop_refilled_buckets_on_the_way() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1, burst=1))
    for i in range(100):
        buckets.try_acquire(f"k{i}", 1, 0.0)
    assert len(buckets) == 100
    for i in range(50):
        buckets.try_acquire("hot", 1, 10.0 + i)
    assert len(buckets) == 1  # two refilled ones dropped per call


def test_max_keys_bounds_memory_evicting_least_recently_used() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1, burst=1), max_keys=3)
    for key in ("a", "b", "c"):
        assert buckets.try_acquire(key, 1, 0.0) == (True, 0)
    assert buckets.try_acquire("a", 1, 0.0)[0] is False  # touches a: b is now the oldest
    assert buckets.try_acquire("d", 1, 0.0) == (True, 0)
    assert len(buckets) == 3
    assert buckets.try_acquire("a", 1, 0.0)[0] is False  # still limited
    assert buckets.try_acquire("b", 1, 0.0) == (True, 0)  # forgotten: starts full (lenient)


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(max_keys=0)
