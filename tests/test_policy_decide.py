"""One test per branch of the decision flow (DESIGN.md "Admission policy"), reason asserted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from spillgate.core.decision import Action, Outcome, Priority, Reason
from spillgate.core.errors import InvalidRequest, NoFleet, UnknownModel
from spillgate.core.fleet import ReplicaStatus
from spillgate.core.policy import Policy
from spillgate.core.policy_config import PolicyConfig
from tests.test_policy_world import (
    LOCAL_8B,
    V1,
    V2,
    make_fleet,
    make_policy,
    neighbour,
    req,
    saturate,
    scrape,
)

PREFIX = tuple(range(1000, 1048))  # 48 blocks x 16 tokens = 768 cached tokens


def test_serve_local_fit() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    d = policy.decide(req(), 0.0)
    assert (d.action, d.reason) == (Action.SERVE, Reason.LOCAL_FIT)
    assert d.replica in LOCAL_8B and d.endpoint == f"{d.replica}:8001"
    assert (d.model, d.version, d.triton_model_name) == ("llama-8b", "v1", "llama8b_v1")
    assert d.estimate.total_ms == pytest.approx(15 + 256 * 0.05 + 32 * 8.0)
    assert d.ticket is not None and d.ticket.replica == d.replica
    assert policy.in_flight == 1


def test_serve_spreads_by_own_in_flight_between_scrapes() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    chosen = [policy.decide(req(), 0.0).replica for _ in range(8)]
    assert sorted(chosen) == sorted(LOCAL_8B * 2)


def test_serve_session_affinity_within_bounded_load() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    first = policy.decide(req(session_id="s1"), 0.0)
    others = [r for r in LOCAL_8B if r != first.replica]
    scrape(policy, 0.05, {first.replica: 3} | dict.fromkeys(others, 2))
    d = policy.decide(req(session_id="s1", arrival=0.05), 0.05)
    assert (d.action, d.reason, d.replica) == (Action.SERVE, Reason.SESSION_AFFINITY, first.replica)


def test_serve_prefix_affinity_within_bounded_load() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    first = policy.decide(req(prompt_tokens=1024, prefix_block_hashes=PREFIX), 0.0)
    others = [r for r in LOCAL_8B if r != first.replica]
    scrape(policy, 0.05, {first.replica: 3} | dict.fromkeys(others, 2))
    d = policy.decide(req(prompt_tokens=1024, prefix_block_hashes=PREFIX, arrival=0.05), 0.05)
    assert (d.action, d.reason, d.replica) == (Action.SERVE, Reason.PREFIX_AFFINITY, first.replica)
    assert d.estimate.cached_tokens == 768


def test_prefix_affinity_yields_to_bounded_load() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    first = policy.decide(req(prompt_tokens=1024, prefix_block_hashes=PREFIX), 0.0)
    others = [r for r in LOCAL_8B if r != first.replica]
    scrape(policy, 0.05, {first.replica: 7} | dict.fromkeys(others, 2))
    d = policy.decide(req(prompt_tokens=1024, prefix_block_hashes=PREFIX, arrival=0.05), 0.05)
    assert (d.action, d.reason) == (Action.SERVE, Reason.LOCAL_FIT)
    assert d.replica != first.replica


def test_short_prefix_below_minimum_gives_no_affinity() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    short = PREFIX[:3]  # min_prefix_blocks = 4
    policy.decide(req(prefix_block_hashes=short), 0.0)
    d = policy.decide(req(prefix_block_hashes=short), 0.0)
    assert d.reason is Reason.LOCAL_FIT and d.estimate.cached_tokens == 0


def test_prefix_is_namespaced_by_cache_salt() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    policy.decide(req(prompt_tokens=1024, prefix_block_hashes=PREFIX, cache_salt="a"), 0.0)
    d = policy.decide(req(prompt_tokens=1024, prefix_block_hashes=PREFIX, cache_salt="b"), 0.0)
    assert d.estimate.cached_tokens == 0


def test_overflow_fit_to_nearest_neighbour_with_headroom() -> None:
    policy = make_policy()
    saturate(policy, 0.0)
    for region in ("us-west", "eu"):
        policy.observe_neighbour(neighbour(region, 0.0), 0.0)
    d = policy.decide(req(), 0.0)
    assert (d.action, d.reason, d.region) == (Action.OVERFLOW, Reason.OVERFLOW_FIT, "us-west")
    assert d.endpoint == "gw-us-west:443" and d.estimate.network_ms == 40.0
    assert d.ticket is None and policy.overflow_out_total == 1


def test_overflow_skips_a_drained_neighbour_region() -> None:
    policy = make_policy(fleet=make_fleet(draining=frozenset({"us-west"})))
    saturate(policy, 0.0)
    for region in ("us-west", "eu"):
        policy.observe_neighbour(neighbour(region, 0.0), 0.0)
    d = policy.decide(req(), 0.0)
    assert (d.action, d.reason, d.region) == (Action.OVERFLOW, Reason.OVERFLOW_FIT, "eu")


def test_overflow_skips_neighbour_whose_prediction_misses_budget() -> None:
    policy = make_policy()
    saturate(policy, 0.0)
    policy.observe_neighbour(neighbour("us-west", 0.0, queue_ms=2000.0), 0.0)
    policy.observe_neighbour(neighbour("eu", 0.0), 0.0)
    assert policy.decide(req(), 0.0).region == "eu"


def test_overflow_ignores_stale_neighbour_summary() -> None:
    policy = make_policy()
    policy.observe_neighbour(neighbour("us-west", 0.0), 0.0)
    saturate(policy, 5.0)
    d = policy.decide(req(arrival=5.0, priority=Priority.HIGH), 5.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.NO_HEADROOM)


def test_forwarded_request_never_overflows_again() -> None:
    policy = make_policy()
    saturate(policy, 0.0)
    policy.observe_neighbour(neighbour("us-west", 0.0), 0.0)
    d = policy.decide(req(hops=1, priority=Priority.HIGH), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.NO_HEADROOM)


def test_overflow_hysteresis() -> None:
    policy = make_policy()
    saturate(policy, 0.0)
    seq = iter(range(1, 100))

    def admits(ratio: float) -> bool:
        summary = neighbour("us-west", 0.0, ratio=ratio, sequence=next(seq))
        policy.observe_neighbour(summary, 0.0)
        return policy.decide(req(), 0.0, commit=False).action is Action.OVERFLOW

    assert not admits(0.15)  # below enter (0.2)
    assert admits(0.25)
    assert admits(0.15)  # above exit (0.1): keeps admitting
    assert not admits(0.05)
    assert not admits(0.15)  # must climb past enter again


def test_queue_then_served_when_a_slot_frees() -> None:
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 6))  # LOW may use 6 of 8 slots
    r = req(priority=Priority.LOW)
    d = policy.decide(r, 0.0)
    assert (d.action, d.reason) == (Action.QUEUE, Reason.QUEUED)
    assert 0 < d.queue_ms <= 2000 and policy.queue_len == 1
    assert policy.drain_queue(0.01) == []
    scrape(policy, 0.3)
    [(done, final)] = policy.drain_queue(0.3)
    assert done is r
    assert (final.action, final.reason) == (Action.SERVE, Reason.QUEUE_SERVED)
    assert final.queue_ms == pytest.approx(300.0) and final.ticket is not None
    assert policy.queue_len == 0


def test_queue_band_ttl_expires_to_shed() -> None:
    ttl = dict(PolicyConfig().band_ttl_s) | {Priority.LOW: 0.6}
    policy = make_policy(PolicyConfig(band_ttl_s=ttl))
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 6))
    assert policy.decide(req(priority=Priority.LOW), 0.0).action is Action.QUEUE
    scrape(policy, 0.7, dict.fromkeys(LOCAL_8B, 6))
    [(_, final)] = policy.drain_queue(0.7)
    assert (final.action, final.reason) == (Action.SHED, Reason.QUEUE_TTL)
    assert final.retry_after_ms > 0


def test_queue_request_deadline_expires_to_shed() -> None:
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 6))
    assert policy.decide(req(priority=Priority.LOW, budget_ms=900.0), 0.0).action is Action.QUEUE
    [(_, final)] = policy.drain_queue(0.7)
    assert (final.action, final.reason) == (Action.SHED, Reason.QUEUE_DEADLINE)


def test_queue_full_sheds() -> None:
    policy = make_policy(PolicyConfig(queue_capacity=1))
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 6))
    assert policy.decide(req(priority=Priority.LOW), 0.0).action is Action.QUEUE
    d = policy.decide(req(priority=Priority.LOW), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.QUEUE_FULL)


def test_higher_priority_displaces_lowest_newest() -> None:
    ttl = dict(PolicyConfig().band_ttl_s) | {Priority.HIGH: 1.0}
    policy = make_policy(PolicyConfig(queue_capacity=1, band_ttl_s=ttl))
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 6))
    low = req(priority=Priority.LOW)
    assert policy.decide(low, 0.0).action is Action.QUEUE
    scrape(policy, 0.01, dict.fromkeys(LOCAL_8B, 8))
    assert policy.decide(req(priority=Priority.HIGH), 0.01).action is Action.QUEUE
    [(victim, final)] = policy.drain_queue(0.02)
    assert victim is low and (final.action, final.reason) == (Action.SHED, Reason.DISPLACED)


def test_degrade_to_fallback_model() -> None:
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys((*LOCAL_8B, "us-4"), 40))
    d = policy.decide(req(allow_degrade=True, priority=Priority.HIGH), 0.0)
    assert (d.action, d.reason) == (Action.DEGRADE, Reason.DEGRADE_FALLBACK)
    assert d.degrade is not None and d.degrade.fallback_model == "llama-1b"
    assert (d.model, d.replica, d.triton_model_name) == ("llama-1b", "us-5", "llama1b_v1")
    assert d.ticket is not None


def test_degrade_caps_max_tokens() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    d = policy.decide(req(allow_degrade=True, max_tokens=200), 0.0)
    assert (d.action, d.reason) == (Action.DEGRADE, Reason.DEGRADE_MAX_TOKENS)
    assert d.degrade is not None and d.degrade.max_tokens == int((1200 - 27.8) // 8)
    assert d.estimate.total_ms <= 1200


def test_no_degrade_unless_allowed() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    d = policy.decide(req(max_tokens=200), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.BUDGET_EXCEEDED)


def test_shed_residency_when_local_zone_differs() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    policy.observe_neighbour(neighbour("us-west", 0.0), 0.0)
    d = policy.decide(req(residency_zone="eu"), 0.0)
    assert (d.action, d.reason, d.replica) == (Action.SHED, Reason.RESIDENCY, "")


def test_residency_overflow_to_in_zone_neighbour() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    policy.observe_neighbour(neighbour("us-west", 0.0), 0.0)
    policy.observe_neighbour(neighbour("eu", 0.0), 0.0)
    d = policy.decide(req(residency_zone="eu"), 0.0)
    assert (d.action, d.reason, d.region) == (Action.OVERFLOW, Reason.OVERFLOW_FIT, "eu")


def test_shed_no_replicas_without_fresh_signals() -> None:
    policy = make_policy()
    d = policy.decide(req(), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.NO_REPLICAS)
    scrape(policy, 0.0)
    d = policy.decide(req(arrival=1.0), 1.0)  # scrape is 1 s old: stale = saturated
    assert (d.action, d.reason) == (Action.SHED, Reason.NO_REPLICAS)
    assert d.retry_after_ms == PolicyConfig().retry_after_no_capacity_ms


def test_shed_no_headroom_with_retry_after_from_drain_rate() -> None:
    policy = make_policy()
    saturate(policy, 0.0, extra=16)
    d = policy.decide(req(priority=Priority.HIGH), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.NO_HEADROOM)
    saturate(policy, 0.0, extra=64)
    later = policy.decide(req(priority=Priority.HIGH), 0.0)
    assert later.reason is Reason.NO_HEADROOM
    assert 50 <= d.retry_after_ms < later.retry_after_ms <= 30_000


def test_shed_budget_exceeded() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    d = policy.decide(req(prompt_tokens=100_000), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.BUDGET_EXCEEDED)
    late = policy.decide(req(arrival=0.0), 2.0)
    assert late.reason is Reason.BUDGET_EXCEEDED


def test_lower_priority_sheds_first() -> None:
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 7))  # 1 slot left of 8 on each
    assert policy.decide(req(priority=Priority.HIGH), 0.0, commit=False).action is Action.SERVE
    assert policy.decide(req(priority=Priority.BATCH), 0.0, commit=False).action is not Action.SERVE


def test_candidates_exclude_draining_not_ready_and_open_breakers() -> None:
    states = {"us-1": ReplicaStatus.DRAINING, "us-2": ReplicaStatus.NOT_READY}
    policy = make_policy(fleet=make_fleet(states))
    scrape(policy, 0.0)
    for _ in range(5):
        policy.record_result("us-0", False, 0.0)
    policy.set_draining("us-3", True)
    d = policy.decide(req(), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.NO_REPLICAS)
    policy.set_draining("us-3", False)
    assert {policy.decide(req(), 0.0).replica for _ in range(3)} == {"us-3"}
    scrape(policy, 31.0)  # breaker half-open after 30 s: exactly one probe
    replicas = [policy.decide(req(arrival=31.0), 31.0).replica for _ in range(6)]
    assert replicas.count("us-0") == 1


def test_a_retry_never_lands_on_the_replica_it_avoids() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    first = policy.decide(req(), 0.0, commit=False).replica  # the idle pool's first choice
    retry = policy.decide(req(avoid_replicas=frozenset({first})), 0.0, commit=False)
    assert retry.action == Action.SERVE and retry.replica not in ("", first)
    everyone = frozenset(LOCAL_8B)
    d = policy.decide(req(avoid_replicas=everyone), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.NO_REPLICAS)  # as if they were gone


def test_canary_weights_and_session_pinning() -> None:
    policy = make_policy(seed=3)
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 0))
    versions = [policy.decide(req(model="chat"), 0.0, commit=False).version for _ in range(1)]
    assert versions
    counts = {"v1": 0, "v2": 0}
    for i in range(2000):
        d = policy.decide(req(model="chat", session_id=f"s{i}"), 0.0)
        counts[d.version] += 1
        ticket = d.ticket
        assert ticket is not None
        policy.release(ticket.id, Outcome.OK, 0.0)
    assert 120 < counts["v2"] < 280  # 10 % canary in us
    pinned = next(i for i in range(2000) if counts and _version_of(policy, f"s{i}") == "v2")
    for _ in range(20):
        d = policy.decide(req(model="chat", session_id=f"s{pinned}"), 0.0)
        assert (d.model, d.version) == V2


def _version_of(policy: Policy, session: str) -> str:
    return policy.decide(req(model="chat", session_id=session), 0.0, commit=False).version


def test_dry_run_changes_nothing() -> None:
    policy = make_policy()
    saturate(policy, 0.0)
    # 2 slots x overflow_fraction 0.3 < 1: the bucket holds its floor of one token.
    one_token = neighbour("us-west", 0.0, free=1, ratio=0.5, versions=(V1,))
    policy.observe_neighbour(one_token, 0.0)
    dry = [policy.decide(req(request_id="same", model="chat"), 0.0, commit=False) for _ in range(5)]
    assert all(d == dry[0] for d in dry) and dry[0].action is Action.OVERFLOW
    assert policy.in_flight == 0 and policy.overflow_out_total == 0
    assert policy.decide(req(), 0.0).action is Action.OVERFLOW  # the token is still there
    assert policy.decide(req(), 0.0).action is Action.SHED


def test_errors() -> None:
    with pytest.raises(NoFleet):
        Policy(PolicyConfig(), "us", __import__("random").Random(0)).decide(req(), 0.0)
    policy = make_policy()
    with pytest.raises(UnknownModel):
        policy.decide(req(model="nope"), 0.0)
    with pytest.raises(UnknownModel):
        policy.decide(req(model="llama-8b@v9"), 0.0)
    with pytest.raises(InvalidRequest) as err:
        policy.decide(req(prompt_tokens=-1), 0.0)
    assert err.value.field == "prompt_tokens"
    with pytest.raises(InvalidRequest) as err:
        policy.decide(req(model="llama-8b"), 0.0)  # two versions: must pin
    assert err.value.field == "model"
    with pytest.raises(InvalidRequest):
        Priority.from_wire(9)
    assert Priority.from_wire(0) is Priority.NORMAL


def test_release_learns_and_expiry_heals() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    itl_before = policy.summary(0.0).models[1].itl_ms
    for _ in range(10):
        d = policy.decide(req(), 0.0)
        assert d.ticket is not None
        assert policy.release(
            d.ticket.id, Outcome.OK, 0.5, ttft_ms=30, total_ms=526, output_tokens=32
        )
        assert not policy.release(d.ticket.id, Outcome.OK, 0.5)
    assert policy.summary(0.0).models[1].itl_ms > itl_before
    d = policy.decide(req(), 0.0)
    assert d.ticket is not None and policy.in_flight == 1
    renewed = policy.renew(d.ticket.id, 20.0, 5_000)
    assert renewed is not None and renewed.lease_expires_at == pytest.approx(25.0)
    assert policy.expire_tickets(24.0) == []
    assert policy.expire_tickets(25.0) == [d.ticket.id]
    assert policy.in_flight == 0 and policy.renew(d.ticket.id, 26.0) is None


def test_summary_counts_stale_lanes_as_saturated() -> None:
    policy = make_policy()
    scrape(policy, 0.0, {"us-0": 2})
    fresh = {(m.model, m.version): m for m in policy.summary(0.0).models}
    v1 = fresh[("llama-8b", "v1")]
    # Headroom = slots an overflowed NORMAL request may take: floor(8 x (1 - 0.05 NORMAL
    # reserve - 0.1 overflow-in reserve)) = 6 per replica, minus us-0's load of 2.
    assert (v1.healthy_replicas, v1.free_slots) == (4, 4 + 3 * 6)
    assert v1.headroom_ratio == pytest.approx(22 / 32)
    stale = {(m.model, m.version): m for m in policy.summary(1.0).models}
    assert stale[("llama-8b", "v1")].free_slots == 0
    assert stale[("llama-8b", "v1")].headroom_ratio == 0.0


def test_summary_round_trips_as_neighbour_input() -> None:
    eu = Policy(PolicyConfig(), "eu", __import__("random").Random(0))
    eu.set_fleet(make_fleet())
    eu.observe_signals("eu-0", _signals_all(0.0), 0.0)
    us = make_policy()
    saturate(us, 0.0)
    us.observe_neighbour(eu.summary(0.0), 0.0)
    d = us.decide(req(), 0.0)
    assert (d.action, d.region) == (Action.OVERFLOW, "eu")


def _signals_all(now: float):  # type: ignore[no-untyped-def]
    from spillgate.core.signals import ModelLoad, Signals

    idle = ModelLoad(running=0, waiting=0)
    return Signals(now, {"llama8b_v1": idle, "llama1b_v1": idle})


def test_request_helpers() -> None:
    from spillgate.core.decision import resolve_budget_ms

    assert resolve_budget_ms(1200, 0, None, 0.0) == 1200
    assert resolve_budget_ms(1200, 500, None, 0.0) == 500
    assert resolve_budget_ms(1200, 500, 10.2, 10.0) == pytest.approx(200)
    r = replace(req(), budget_ms=100.0, arrival=1.0)
    assert r.remaining_ms(1.05) == pytest.approx(50.0)


def test_learned_slowness_fades_while_a_replica_is_idle() -> None:
    """A replica measured slow (then fixed) must not be shunned forever: idle scrapes fade
    what was learned back to the prior, so it gets traffic and is measured again."""
    from spillgate.core.fleet import ReplicaInfo, ReplicaStatus, VersionInfo
    from spillgate.core.lanes import Lane
    from spillgate.core.signals import ModelLoad

    config = PolicyConfig()
    replica = ReplicaInfo("r", "us", "h:1", ReplicaStatus.READY, (("m", "v1"),))
    lane = Lane(0, replica, VersionInfo("m", "v1", "m"), config)
    prior = lane.service_ms
    for _ in range(20):
        lane.learn(total_ms=prior * 8, ttft_ms=0, output_tokens=0, predicted_prefill_ms=0,
                   predicted_itl_ms=0)  # fmt: skip
    slow = lane.service_ms
    assert slow > prior * 5
    idle = ModelLoad(running=0, waiting=0)
    busy = ModelLoad(running=3, waiting=0)
    lane.observe(busy, 0.0)
    lane.observe(busy, 60.0)  # busy: nothing is forgotten
    assert lane.service_ms == slow
    for t in range(61, 61 + 6 * int(config.learned_decay_s)):
        lane.observe(idle, float(t))
    assert lane.service_ms == pytest.approx(prior, rel=0.05)
    assert lane.rate == pytest.approx(lane.slots / lane.service_ms)


def test_lane_adopts_the_capacity_the_replica_reports() -> None:
    """Scraped max running sequences replace the prior slot count (and the service rate)."""
    from spillgate.core.fleet import ReplicaInfo, ReplicaStatus, VersionInfo
    from spillgate.core.lanes import Lane
    from spillgate.core.signals import ModelLoad

    config = PolicyConfig()
    replica = ReplicaInfo("r", "us", "h:1", ReplicaStatus.READY, (("m", "v1"),))
    lane = Lane(0, replica, VersionInfo("m", "v1", "m"), config)
    assert lane.slots == config.prior.max_num_seqs
    lane.observe(ModelLoad(running=2, waiting=3, max_running=2), 1.0)
    assert lane.slots == 2 and lane.rate == pytest.approx(2 / lane.service_ms)
    assert max(lane.usable) == 2
    assert lane.queue_ms(int(Priority.NORMAL)) > 0  # 5 in system, 2 slots: a new one waits


def test_lanes_keep_their_tickets_across_a_fleet_change() -> None:
    """A registry update must not strand live tickets on a copy of their lane: releasing
    them after the rebuild frees the slot, so the replica does not look full for good."""
    policy = make_policy()
    scrape(policy, 0.0)
    tickets = [policy.decide(req(), 0.0).ticket for _ in range(4)]
    policy.set_fleet(make_fleet())  # same replicas, new registry revision
    for t in tickets:
        assert t is not None and policy.release(t.id, Outcome.OK, 0.1)
    assert policy.in_flight == 0
    v1 = {(m.model, m.version): m for m in policy.summary(0.1).models}[V1]
    assert v1.free_slots == 4 * 6  # every V1 slot below the reserves is free again


def test_overflow_in_leaves_the_reserve_to_local_traffic() -> None:
    """An overflowed request (hops=1) may not take the slots kept for this region's own
    users: with 6 of 8 slots busy a local NORMAL request is served, a spilled one is not."""
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys(("us-0", "us-1", "us-2", "us-3"), 6))
    local = policy.decide(req(), 0.0, commit=False)
    assert (local.action, local.reason) == (Action.SERVE, Reason.LOCAL_FIT)
    spilled = policy.decide(req(hops=1, origin_region="eu"), 0.0, commit=False)
    assert spilled.action is Action.SHED and spilled.reason is Reason.NO_HEADROOM
    scrape(policy, 0.05, dict.fromkeys(("us-0", "us-1", "us-2", "us-3"), 5))
    spilled = policy.decide(req(hops=1, origin_region="eu", arrival=0.05), 0.05)
    assert (spilled.action, spilled.reason) == (Action.SERVE, Reason.LOCAL_FIT)
    assert policy.overflow_in_total == 1


def test_summary_headroom_is_what_an_overflowed_request_may_take() -> None:
    """Published headroom and queue wait use the overflow-in class: a region whose free
    slots are all in its reserve advertises none (neighbours' hysteresis stops the spill)."""
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys(("us-0", "us-1", "us-2", "us-3"), 6))
    v1 = {(m.model, m.version): m for m in policy.summary(0.0).models}[V1]
    assert v1.free_slots == 0 and v1.headroom_ratio == 0.0
    assert v1.predicted_queue_ms > 0


def test_breaker_probes_as_soon_as_a_silent_replica_answers_again() -> None:
    """A replica that went silent (stale signals) and answers its scrape again gets one
    probe right away instead of after the 30 s ejection; the probe's result decides."""
    policy = make_policy()
    scrape(policy, 0.0)
    for _ in range(5):
        policy.record_result("us-0", False, 0.0)  # its in-flight requests failed: open
    others = ("us-1", "us-2", "us-3", "us-4", "us-5")
    scrape(policy, 1.0, replicas=others)  # us-0 down: no answer, its signals go stale
    assert "us-0" not in {policy.decide(req(arrival=1.0), 1.0).replica for _ in range(6)}
    scrape(policy, 2.0)  # us-0 is back
    replicas = [policy.decide(req(arrival=2.0), 2.0) for _ in range(8)]
    probes = [d for d in replicas if d.replica == "us-0"]
    assert len(probes) == 1  # half-open: exactly one trial request
    ticket = probes[0].ticket
    assert ticket is not None and policy.release(ticket.id, Outcome.OK, 2.5)
    scrape(policy, 2.5)
    after = [policy.decide(req(arrival=2.5), 2.5).replica for _ in range(8)]
    assert after.count("us-0") >= 2  # the probe succeeded: closed, a full member again


def test_breaker_recovered_goes_half_open_and_a_failed_probe_reopens() -> None:
    from spillgate.core.breaker import Breaker, BreakerState
    from spillgate.core.policy_config import BreakerConfig

    breaker = Breaker(BreakerConfig(failure_threshold=1, open_s=30.0))
    breaker.recovered(0.0)  # closed: nothing to do
    assert breaker.state(0.0) is BreakerState.CLOSED
    breaker.record(False, 1.0)
    assert not breaker.allows(2.0)
    breaker.recovered(2.0)
    assert breaker.state(2.0) is BreakerState.HALF_OPEN and breaker.allows(2.0)
    breaker.on_attempt(2.0)
    assert not breaker.allows(2.0)  # one probe at a time
    breaker.record(False, 3.0)
    assert breaker.state(3.0) is BreakerState.OPEN and not breaker.allows(32.9)


# -- learned output length (PolicyConfig.output_ratio_*) -------------------------------------


def _teach_output_ratio(policy: Policy, n: int, max_tokens: int, out: int) -> None:
    """``n`` OK completions of ``out`` tokens for requests of ``max_tokens`` (8 ms ITL)."""
    for _ in range(n):
        d = policy.decide(req(max_tokens=max_tokens), 0.0)
        assert d.action is Action.SERVE and d.ticket is not None
        total = 30.0 + (out - 1) * 8.0
        assert policy.release(
            d.ticket.id, Outcome.OK, 0.5, ttft_ms=30.0, total_ms=total, output_tokens=out
        )


def test_plans_whole_max_tokens_until_enough_observations() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    _teach_output_ratio(policy, PolicyConfig().output_ratio_min_samples - 1, 100, 50)
    assert policy.output_ratio("llama-8b", "v1") == 1.0
    d = policy.decide(req(max_tokens=200), 0.0)
    assert (d.action, d.reason) == (Action.SHED, Reason.BUDGET_EXCEEDED)
    assert d.estimate.decode_ms == pytest.approx(200 * 8.0)


def test_short_completions_let_a_long_max_tokens_request_serve() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    before = policy.decide(req(max_tokens=200), 0.0, commit=False)
    assert (before.action, before.reason) == (Action.SHED, Reason.BUDGET_EXCEEDED)
    _teach_output_ratio(policy, 60, 100, 50)  # every answer stops at half its max_tokens
    assert policy.output_ratio("llama-8b", "v1") == pytest.approx(0.5)
    assert policy.output_ratio("llama-8b", "v2") == 1.0  # learned per model version
    d = policy.decide(req(max_tokens=200), 0.0)
    assert (d.action, d.reason) == (Action.SERVE, Reason.LOCAL_FIT)
    assert d.estimate.decode_ms == pytest.approx(100 * 8.0)
    assert d.estimate.decode_ms < before.estimate.decode_ms
    assert d.estimate.total_ms <= 1200


def test_degrade_caps_the_requests_max_tokens_not_the_planned_length() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    _teach_output_ratio(policy, 60, 100, 50)
    d = policy.decide(req(allow_degrade=True, max_tokens=400), 0.0)
    assert (d.action, d.reason) == (Action.DEGRADE, Reason.DEGRADE_MAX_TOKENS)
    fit = int((1200 - 27.8) // 8)  # planned tokens that fit the budget
    assert d.degrade is not None and d.degrade.max_tokens == 2 * fit  # ratio 0.5
    assert d.estimate.total_ms <= 1200


def test_output_ratio_never_below_the_floor() -> None:
    policy = make_policy()
    scrape(policy, 0.0)
    _teach_output_ratio(policy, 60, 100, 1)
    assert policy.output_ratio("llama-8b", "v1") == PolicyConfig().output_ratio_floor
    d = policy.decide(req(max_tokens=200), 0.0)
    assert d.estimate.decode_ms == pytest.approx(50 * 8.0)


def test_output_ratio_is_a_high_quantile_and_deterministic() -> None:
    def run() -> tuple[float, list[tuple[Action, float]]]:
        policy = make_policy()
        scrape(policy, 0.0)
        for out in (20, 40, 60, 80, 100) * 12:  # ratios 0.2..1.0, 60 observations
            _teach_output_ratio(policy, 1, 100, out)
        decisions = [policy.decide(req(max_tokens=m), 0.0) for m in (100, 140, 180)]
        return policy.output_ratio("llama-8b", "v1"), [
            (d.action, d.estimate.decode_ms) for d in decisions
        ]

    ratio, decisions = run()
    assert ratio == pytest.approx(0.8)  # p80 of the window, far above the mean 0.6
    assert (ratio, decisions) == run()


def test_output_ratio_config_is_validated() -> None:
    with pytest.raises(ValueError, match="output_ratio_floor"):
        PolicyConfig(output_ratio_floor=0.0).validate()
    with pytest.raises(ValueError, match="output_ratio_quantile"):
        PolicyConfig(output_ratio_quantile=1.5).validate()
    with pytest.raises(ValueError, match="output_ratio_window"):
        PolicyConfig(output_ratio_window=0).validate()


def test_cancel_queued_takes_a_request_out_and_it_never_ends_later() -> None:
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 6))  # LOW may use 6 of 8 slots: it queues
    r = req(priority=Priority.LOW)
    assert policy.decide(r, 0.0).action is Action.QUEUE and policy.queue_len == 1
    assert policy.cancel_queued(r) is True and policy.queue_len == 0
    scrape(policy, 0.3)
    assert policy.drain_queue(0.3) == []  # nothing granted to a caller that left
    assert policy.cancel_queued(r) is False
