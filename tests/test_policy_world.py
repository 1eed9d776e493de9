"""A small fleet for the policy tests (imported by the other test_policy_* modules).

Regions: us (zone us, the policy's region), us-west (zone us, 40 ms), eu (zone eu, 80 ms),
apac (zone apac, 150 ms). Models: llama-8b (v1, v2; fallback llama-1b) and llama-1b (v1).
Alias "chat": llama-8b@v1 by default, 90/10 v1/v2 canary in us. In us: us-0..us-3 serve
llama-8b@v1, us-4 serves llama-8b@v2, us-5 serves llama-1b@v1 (8 slots each, so tests can
saturate them with small numbers).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from spillgate.core.decision import Request
from spillgate.core.fleet import (
    AliasInfo,
    AliasTarget,
    FleetView,
    ModelInfo,
    RegionInfo,
    ReplicaInfo,
    ReplicaStatus,
    VersionInfo,
)
from spillgate.core.overflow import ModelHeadroom, NeighbourSummary
from spillgate.core.policy import Policy
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.signals import ModelLoad, Signals

SLOTS = 8
V1, V2, SMALL = ("llama-8b", "v1"), ("llama-8b", "v2"), ("llama-1b", "v1")
TRITON = {V1: "llama8b_v1", V2: "llama8b_v2", SMALL: "llama1b_v1"}
RTT = {
    "us": {"us-west": 40.0, "eu": 80.0, "apac": 150.0},
    "us-west": {"us": 40.0, "eu": 120.0, "apac": 110.0},
    "eu": {"us": 80.0, "us-west": 120.0, "apac": 210.0},
    "apac": {"us": 150.0, "us-west": 110.0, "eu": 210.0},
}
ZONES = {"us": "us", "us-west": "us", "eu": "eu", "apac": "apac"}
LOCAL_8B = ("us-0", "us-1", "us-2", "us-3")


def make_fleet(
    states: dict[str, ReplicaStatus] | None = None,
    per_region: int = 0,
    slots: int = SLOTS,
    draining: frozenset[str] = frozenset(),
) -> FleetView:
    """The test fleet; ``states`` overrides replica states; ``per_region`` adds replicas;
    ``draining`` names drained regions."""
    states = states or {}
    regions = [RegionInfo(r, ZONES[r], f"gw-{r}:443", RTT[r], r in draining) for r in RTT]
    models = [ModelInfo("llama-8b", 4096, "llama-1b"), ModelInfo("llama-1b", 2048)]
    versions = [VersionInfo(m, v, TRITON[(m, v)]) for (m, v) in TRITON]
    chat = AliasInfo(
        "chat",
        (AliasTarget(*V1, 100),),
        {"us": (AliasTarget(*V1, 90), AliasTarget(*V2, 10))},
    )
    loaded = {f"us-{i}": (V1,) for i in range(4)} | {"us-4": (V2,), "us-5": (SMALL,)}
    for i in range(per_region):
        loaded[f"us-x{i}"] = (V1,)
    replicas = [
        ReplicaInfo(rid, "us", f"{rid}:8001", states.get(rid, ReplicaStatus.READY), lv, slots)
        for rid, lv in loaded.items()
    ]
    replicas += [
        ReplicaInfo(f"{r}-0", r, f"{r}-0:8001", ReplicaStatus.READY, (V1, SMALL), slots)
        for r in ("us-west", "eu", "apac")
    ]
    return FleetView(regions, models, versions, [chat], replicas, revision=7)


def make_policy(
    config: PolicyConfig | None = None, seed: int = 1, fleet: FleetView | None = None
) -> Policy:
    """A us policy with the test fleet."""
    policy = Policy(config or PolicyConfig(), "us", random.Random(seed))
    policy.set_fleet(fleet or make_fleet())
    return policy


def scrape(
    policy: Policy,
    now: float,
    loads: dict[str, int] | None = None,
    replicas: tuple[str, ...] = ("us-0", "us-1", "us-2", "us-3", "us-4", "us-5"),
) -> None:
    """Give every replica a fresh scrape; ``loads`` = running + waiting per replica."""
    loads = loads or {}
    models = {
        "us-4": TRITON[V2],
        "us-5": TRITON[SMALL],
    }
    for rid in replicas:
        n = loads.get(rid, 0)
        running, waiting = min(n, SLOTS), max(0, n - SLOTS)
        name = models.get(rid, TRITON[V1])
        load = ModelLoad(running=running, waiting=waiting, kv_usage=0.1)
        policy.observe_signals(rid, Signals(now, {name: load}), now)


def saturate(policy: Policy, now: float, extra: int = 40) -> None:
    """Every local replica far past its slots."""
    scrape(policy, now, dict.fromkeys(("us-0", "us-1", "us-2", "us-3", "us-4", "us-5"), extra))


def neighbour(
    region: str,
    now: float,
    free: int = 20,
    ratio: float = 0.5,
    queue_ms: float = 0.0,
    versions: tuple[tuple[str, str], ...] = (V1, SMALL),
    sequence: int = 1,
) -> NeighbourSummary:
    """A neighbour summary with headroom for ``versions``."""
    models = tuple(ModelHeadroom(m, v, 1, free, ratio, queue_ms, 0, 50.0, 8.0) for m, v in versions)
    return NeighbourSummary(region, now, ZONES[region], 1, 0, models, sequence=sequence)


_COUNTER = [0]


def req(**kw: Any) -> Request:
    """A small chat request (prompt 256, 32 output tokens, 1200 ms) with overrides."""
    _COUNTER[0] += 1
    base = Request(
        request_id=f"r{_COUNTER[0]}",
        model="llama-8b@v1",
        arrival=kw.get("arrival", 0.0),
        budget_ms=1200.0,
        tenant="t1",
        prompt_tokens=256,
        max_tokens=32,
    )
    return replace(base, **kw)


def test_world_fleet_indexes_candidates() -> None:
    fleet = make_fleet({"us-1": ReplicaStatus.DRAINING})
    assert [r.id for r in fleet.serving("us", *V1)] == ["us-0", "us-2", "us-3"]
    assert [r.id for r in fleet.neighbours("us")] == ["us-west", "eu", "apac"]
    assert fleet.resolve("llama-8b@v2", "us", 0.0) == V2
    assert fleet.resolve("chat", "eu", 0.99) == V1
    assert fleet.resolve("chat", "us", 0.95) == V2
    assert fleet.resolve("llama-1b", "us", 0.0) == SMALL
