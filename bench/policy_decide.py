"""In-process decision latency of the admission policy core (``Policy.decide``).

World: 3 regions (us, eu, apac; RTTs from world.toml) x 64 replicas each (64 slots, 4096 KV
blocks). The measured policy is us: 48 replicas serve llama-70b@v1, 8 the v2 canary (alias
"chat" 90/10 in us), 8 the fallback llama-8b. eu and apac publish summaries every 100 ms.
Requests follow world.toml's shared-prefix workload (256 groups, 2048-token system prompt,
256-token question, 256 output tokens => 144 block hashes per prompt), with sessions,
mixed priorities, residency zones and max_tokens. Simulated time advances 1/QPS per request
(QPS ~85 % of the pool's capacity); replicas are re-scraped every 50 ms with
drifting load, served requests are released after their predicted duration, and the queue
is drained every 10 ms. Only ``decide`` calls are timed (commit=True, the production path).

    .venv/bin/python bench/policy_decide.py [--requests 50000] [--seed 1] [--json PATH]

Goal (issue): p50 <= 50 us, p99 <= 200 us per decision.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))

from _common import machine

from spillgate.core.decision import Outcome, Priority, Request
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

REGIONS = {"us": "us", "eu": "eu", "apac": "apac"}
RTT = {  # world.toml rtt_ms.aws_avg_2017 (us-east-1 / eu-west-1 / ap-northeast-1)
    "us": {"eu": 80.5, "apac": 145.3},
    "eu": {"us": 80.5, "apac": 212.4},
    "apac": {"us": 145.3, "eu": 212.4},
}
V70, V70B, V8 = ("llama-70b", "v1"), ("llama-70b", "v2"), ("llama-8b", "v1")
TRITON = {V70: "llama70b_v1", V70B: "llama70b_v2", V8: "llama8b_v1"}
REPLICAS = 64
SLOTS = 64
# Arrival rate near the us pool's capacity (64 replicas x 64 slots / ~3 s per request is
# ~1.4k/s), so every branch is exercised; the measured cost does not depend on it.
QPS = 1200.0


def build_fleet() -> FleetView:
    regions = [RegionInfo(r, z, f"gw-{r}:443", RTT[r]) for r, z in REGIONS.items()]
    models = [ModelInfo("llama-70b", 4096, "llama-8b"), ModelInfo("llama-8b", 4096)]
    versions = [VersionInfo(m, v, TRITON[(m, v)]) for (m, v) in TRITON]
    chat = AliasInfo(
        "chat", (AliasTarget(*V70, 100),), {"us": (AliasTarget(*V70, 90), AliasTarget(*V70B, 10))}
    )
    replicas = []
    for region in REGIONS:
        for i in range(REPLICAS):
            loaded = (V70,) if i < 48 else (V70B,) if i < 56 else (V8,)
            replicas.append(
                ReplicaInfo(
                    f"{region}-{i}",
                    region,
                    f"10.0.{i}.1:8001",
                    ReplicaStatus.READY,
                    loaded,
                    SLOTS,
                    4096,
                )
            )
    return FleetView(regions, models, versions, [chat], replicas, revision=1)


def scrape_all(
    policy: Policy, loads: list[int], ours: dict[str, int], rnd: random.Random, now: float
) -> None:
    """Replica load = background traffic (other admissions; random walk) + our in-flight."""
    for i in range(REPLICAS):
        loads[i] = max(0, min(SLOTS // 2, loads[i] + rnd.randint(-3, 3)))
        name = TRITON[V70] if i < 48 else TRITON[V70B] if i < 56 else TRITON[V8]
        n = loads[i] + ours.get(f"us-{i}", 0)
        load = ModelLoad(running=min(n, SLOTS), waiting=max(0, n - SLOTS), kv_usage=n / 80)
        policy.observe_signals(f"us-{i}", Signals(now, {name: load}), now)


def summary(region: str, now: float, rnd: random.Random, seq: int) -> NeighbourSummary:
    models = tuple(
        ModelHeadroom(
            m, v, 8, rnd.randint(0, 200), rnd.uniform(0.0, 0.5), rnd.uniform(0, 200), 0, 50.0, 12.0
        )
        for m, v in (V70, V8)
    )
    return NeighbourSummary(region, now, REGIONS[region], 64, 0, models, sequence=seq)


def make_request(
    rnd: random.Random, n: int, now: float, prefixes: list[tuple[int, ...]]
) -> Request:
    group = rnd.randrange(len(prefixes))
    question = tuple(rnd.getrandbits(63) for _ in range(16))
    session = f"s{rnd.randrange(20_000)}" if rnd.random() < 0.5 else ""
    return Request(
        request_id=f"b{n}",
        model=rnd.choice(("chat", "chat", "chat", "llama-70b@v1", "llama-8b@v1")),
        arrival=now,
        budget_ms=rnd.choice((1200.0, 3000.0, 6000.0, 10000.0)),
        priority=rnd.choice(
            (Priority.HIGH, Priority.NORMAL, Priority.NORMAL, Priority.LOW, Priority.BATCH)
        ),
        tenant=f"t{rnd.randrange(50)}",
        session_id=session,
        prompt_tokens=2304,
        prefix_block_hashes=prefixes[group] + question,
        max_tokens=rnd.choice((64, 128, 256)),
        residency_zone=rnd.choice(("", "", "", "us", "eu")),
        allow_degrade=rnd.random() < 0.3,
        hops=1 if rnd.random() < 0.05 else 0,
    )


def run(requests: int, seed: int, warmup: int) -> dict[str, object]:
    rnd = random.Random(seed)
    policy = Policy(PolicyConfig(), "us", random.Random(seed))
    policy.set_fleet(build_fleet())
    prefixes = [tuple(g * 1_000_003 + i for i in range(128)) for g in range(256)]
    loads = [rnd.randint(0, SLOTS // 2) for _ in range(REPLICAS)]
    ours: collections.Counter[str] = collections.Counter()
    releases: list[tuple[float, str, str]] = []
    now, next_scrape, next_summary, next_drain, seq = 0.0, 0.0, 0.0, 0.0, 0
    samples: list[int] = []
    actions: collections.Counter[str] = collections.Counter()
    perf = time.perf_counter_ns
    for n in range(warmup + requests):
        now += 1.0 / QPS
        if now >= next_scrape:
            scrape_all(policy, loads, ours, rnd, now)
            next_scrape = now + 0.05
        if now >= next_summary:
            seq += 1
            for region in ("eu", "apac"):
                policy.observe_neighbour(summary(region, now, rnd, seq), now)
            next_summary = now + 0.1
        if now >= next_drain:
            for _, done in policy.drain_queue(now):
                if done.ticket is not None:
                    ours[done.replica] += 1
                    end = now + done.estimate.total_ms / 1000.0
                    heapq.heappush(releases, (end, done.ticket.id, done.replica))
            policy.expire_tickets(now)
            next_drain = now + 0.01
        while releases and releases[0][0] <= now:
            _, ticket, replica = heapq.heappop(releases)
            ours[replica] -= 1
            policy.release(ticket, Outcome.OK, now, 100.0, 1500.0, 128)
        req = make_request(rnd, n, now, prefixes)
        t0 = perf()
        d = policy.decide(req, now)
        t1 = perf()
        if n >= warmup:
            samples.append(t1 - t0)
            actions[f"{d.action.name}:{d.reason.value}"] += 1
        if d.ticket is not None:
            ours[d.replica] += 1
            end = now + d.estimate.total_ms / 1000.0
            heapq.heappush(releases, (end, d.ticket.id, d.replica))
    samples.sort()
    q = statistics.quantiles(samples, n=100)
    total_s = sum(samples) / 1e9
    return {
        "requests": requests,
        "p50_us": q[49] / 1000,
        "p90_us": q[89] / 1000,
        "p99_us": q[98] / 1000,
        "max_us": samples[-1] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
        "decisions_per_s": requests / total_s,
        "actions": dict(actions.most_common()),
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.requests, args.seed, args.warmup)
    m = result["machine"]
    assert isinstance(m, dict)
    print(f"policy decide: 3 regions x {REPLICAS} replicas, {args.requests} decisions")
    print(f"machine: {m['cpu_model']} ({m['nproc']} cpus), Python {m['python']}")
    print("| p50 us | p90 us | p99 us | max us | mean us | decisions/s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {result['p50_us']:.1f} | {result['p90_us']:.1f} | {result['p99_us']:.1f} "
        f"| {result['max_us']:.0f} | {result['mean_us']:.1f} | {result['decisions_per_s']:.0f} |"
    )
    actions = result["actions"]
    assert isinstance(actions, dict)
    print("actions:", ", ".join(f"{k}={v}" for k, v in actions.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
