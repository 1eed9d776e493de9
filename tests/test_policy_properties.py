"""Hypothesis properties of the policy over random seeded simulations (simulated clock).

One simulation = a random stream of scrapes, neighbour summaries, breaker results, drains,
requests, releases and queue drains against the us policy of the test fleet. Every property
is checked against an independent mirror of the inputs (not the policy's internals).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from spillgate.core.breaker import Breaker
from spillgate.core.decision import Action, Decision, Outcome, Priority, Request
from spillgate.core.fleet import ReplicaStatus
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.signals import ModelLoad, Signals
from tests.test_policy_world import SMALL, TRITON, V1, V2, ZONES, make_fleet, make_policy, neighbour

LOCAL = ("us-0", "us-1", "us-2", "us-3", "us-4", "us-5")
MODEL_OF = {"us-4": V2, "us-5": SMALL}
CFG = PolicyConfig(queue_capacity=4)  # small, so displacement and queue_full happen
PREFIXES = [tuple(range(g * 100, g * 100 + 40)) for g in range(4)]


@dataclass
class Trace:
    """What a simulation did, for the properties."""

    decisions: list[tuple[Request, Decision, float]] = field(default_factory=list)
    drained: list[tuple[Request, Decision, float]] = field(default_factory=list)
    overflow_times: dict[str, list[float]] = field(default_factory=dict)
    max_bucket: dict[str, float] = field(default_factory=dict)

    def key(self) -> list[tuple[object, ...]]:
        rows = self.decisions + self.drained
        return [
            (r.request_id, d.action, d.reason, d.region, d.replica, d.version, d.retry_after_ms)
            for r, d, _ in rows
        ]


def simulate(seed: int, steps: int = 250, dry_runs: bool = False) -> Trace:
    """Run one random scenario; asserts the per-decision safety properties as it goes."""
    rnd = random.Random(seed)
    states = {r: rnd.choice([ReplicaStatus.READY] * 3 + list(ReplicaStatus)) for r in LOCAL}
    policy = make_policy(CFG, seed=seed, fleet=make_fleet(states))
    unready = {r for r, s in states.items() if s is not ReplicaStatus.READY}
    draining: set[str] = set()
    breakers: dict[str, Breaker] = {}
    scraped: dict[str, float] = {}
    tickets: list[tuple[str, str]] = []
    trace = Trace()
    now, n = 0.0, 0
    for _ in range(steps):
        now += rnd.choice([0.0, 0.001, 0.01, 0.03, 0.1])
        op = rnd.random()
        if op < 0.25:
            for rid in rnd.sample(LOCAL, rnd.randint(1, len(LOCAL))):
                load = rnd.choice([0, 2, 6, 8, 12, 40])
                name = TRITON[MODEL_OF.get(rid, V1)]
                ml = ModelLoad(running=min(load, 8), waiting=max(0, load - 8))
                policy.observe_signals(rid, Signals(now, {name: ml}), now)
                if rid in breakers and scraped.get(rid, -1e9) < now - CFG.stale_after_s:
                    breakers[rid].recovered(now)  # a silent replica answers again: probe
                scraped[rid] = now
        elif op < 0.31:
            region = rnd.choice(["us-west", "eu", "apac"])
            summary = neighbour(
                region, now, rnd.choice([0, 3, 20]), rnd.choice([0.0, 0.15, 0.5]),
                rnd.choice([0.0, 300.0]), sequence=n + 1,
            )  # fmt: skip
            slots = summary.capacity_slots()
            cap = max(1.0, CFG.overflow_fraction * slots) if slots > 0 else 0.0
            trace.max_bucket[region] = max(trace.max_bucket.get(region, 0.0), cap)
            policy.observe_neighbour(summary, now)
        elif op < 0.35:
            rid, ok = rnd.choice(LOCAL), rnd.random() < 0.3
            _mirror(breakers, rid, ok, now)
            policy.record_result(rid, ok, now)
        elif op < 0.38:
            rid, on = rnd.choice(LOCAL), rnd.random() < 0.6
            (draining.add if on else draining.discard)(rid)
            policy.set_draining(rid, on)
        elif op < 0.48 and tickets:
            tid, rid = tickets.pop(rnd.randrange(len(tickets)))
            outcome = rnd.choice(list(Outcome))
            if outcome is Outcome.OK:
                _mirror(breakers, rid, True, now)
            elif outcome is Outcome.ERROR:
                _mirror(breakers, rid, False, now)
            policy.release(tid, outcome, now, 40.0, 400.0, 32)
        elif op < 0.55:
            for r, d in policy.drain_queue(now):
                _check_target(d, r, now, unready, draining, breakers, scraped)
                trace.drained.append((r, d, now))
                if d.ticket is not None:
                    tickets.append((d.ticket.id, d.replica))
        else:
            n += 1
            r = _request(rnd, n, now)
            if dry_runs:
                policy.decide(r, now, commit=False)
            d = policy.decide(r, now)
            _check_target(d, r, now, unready, draining, breakers, scraped)
            trace.decisions.append((r, d, now))
            if d.ticket is not None:
                tickets.append((d.ticket.id, d.replica))
            if d.action is Action.OVERFLOW:
                trace.overflow_times.setdefault(d.region, []).append(now)
    for r, d in policy.drain_queue(now + 100.0):  # everything left expires
        trace.drained.append((r, d, now + 100.0))
    assert policy.queue_len == 0
    return trace


def _request(rnd: random.Random, n: int, now: float) -> Request:
    prefix = rnd.choice([(), *PREFIXES])
    return Request(
        request_id=f"q{n}",
        model=rnd.choice(["chat", "chat", "llama-8b@v1", "llama-1b@v1"]),
        arrival=now - rnd.choice([0.0, 0.0, 0.3]),
        budget_ms=rnd.choice([400.0, 1200.0, 3000.0]),
        priority=rnd.choice(list(Priority)),
        tenant=rnd.choice(["a", "b", "c"]),
        session_id=rnd.choice(["", "", "s1", "s2", f"x{n}"]),
        prompt_tokens=max(len(prefix) * 16, rnd.choice([0, 256, 2048])),
        prefix_block_hashes=prefix,
        max_tokens=rnd.choice([0, 16, 64, 200]),
        residency_zone=rnd.choice(["", "", "", "us", "eu", "apac"]),
        allow_degrade=rnd.random() < 0.3,
        hops=rnd.choice([0, 0, 1]),
    )


def _mirror(breakers: dict[str, Breaker], rid: str, ok: bool, now: float) -> None:
    if rid not in breakers and ok:
        return
    breakers.setdefault(rid, Breaker(CFG.breaker)).record(ok, now)


def _check_target(
    d: Decision,
    r: Request,
    now: float,
    unready: set[str],
    draining: set[str],
    breakers: dict[str, Breaker],
    scraped: dict[str, float],
) -> None:
    assert d.action in (Action.SERVE, Action.OVERFLOW, Action.QUEUE, Action.DEGRADE, Action.SHED)
    if r.hops >= 1:
        assert d.action is not Action.OVERFLOW
    if d.action in (Action.SERVE, Action.DEGRADE):
        assert d.replica not in unready and d.replica not in draining
        assert scraped[d.replica] >= now - CFG.stale_after_s
        breaker = breakers.get(d.replica)
        assert breaker is None or breaker.allows(now)
        if breaker is not None:
            breaker.on_attempt(now)
        assert d.ticket is not None and d.region == "us"
    if r.residency_zone and d.action in (Action.SERVE, Action.DEGRADE, Action.OVERFLOW):
        assert ZONES[d.region] == r.residency_zone
    if d.action is Action.SHED:
        assert d.retry_after_ms >= CFG.retry_after_min_ms and d.ticket is None


SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(SEEDS)
def test_never_targets_unavailable_replicas_hop_or_zone(seed: int) -> None:
    simulate(seed)  # the per-decision checks run inside


@settings(max_examples=60, deadline=None)
@given(SEEDS)
def test_overflow_never_exceeds_bucket_over_any_window(seed: int) -> None:
    trace = simulate(seed)
    for region, times in trace.overflow_times.items():
        cap = trace.max_bucket[region]
        for i in range(len(times)):
            for j in range(i, len(times)):
                window = times[j] - times[i]
                allowed = cap + cap * window / CFG.overflow_refill_s
                assert j - i + 1 <= allowed + 1e-9, (region, times[i], times[j])


@settings(max_examples=60, deadline=None)
@given(SEEDS)
def test_every_admit_ends_in_exactly_one_terminal_action(seed: int) -> None:
    trace = simulate(seed)
    queued = {r.request_id for r, d, _ in trace.decisions if d.action is Action.QUEUE}
    finished = [r.request_id for r, _, _ in trace.drained]
    assert sorted(finished) == sorted(queued)  # each queued request finishes exactly once
    for _, d, _ in trace.drained:
        assert d.action in (Action.SERVE, Action.SHED)


@settings(max_examples=20, deadline=None)
@given(SEEDS)
def test_same_seed_same_decisions_and_dry_runs_change_nothing(seed: int) -> None:
    first = simulate(seed).key()
    assert simulate(seed).key() == first
    assert simulate(seed, dry_runs=True).key() == first
