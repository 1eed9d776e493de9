"""The routing policies the simulator compares, behind one interface (``Router``).

Every router answers ``route(request, region, hops, now) -> Route``: serve on a replica
(anywhere: the harness charges the network), forward to a region (spillgate's overflow),
queue (finished later by ``poll``) or shed. Baselines see what their real counterparts see:
their own in-flight counts, scraped engine metrics (every 50 ms) and errors; never the
simulator's ground truth. Sources of each baseline's parameters are cited on its class;
the numbers themselves come from ``shared/data/world.toml`` [baseline.*].

Routers that sit behind an Envoy-style load balancer eject a replica after 5 consecutive
errors for 30 s x (ejections so far) (world.toml [baseline.envoy], Envoy outlier detection;
max_ejection_percent taken as 100 %, as Istio's locality-failover guide configures it).
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass

from spillgate.core.engine import Engine
from spillgate.sim.workload import BLOCK, SimRequest
from spillgate.sim.world import World


class RouteKind(enum.IntEnum):
    """What a router decided."""

    SERVE = 1
    FORWARD = 2  # spillgate OVERFLOW: send to ``region``, whose router decides with hops=1
    QUEUED = 3  # finished later by Router.poll
    SHED = 4


@dataclass(slots=True)
class Route:
    """A routing decision (``max_tokens`` > 0: degraded to that many output tokens)."""

    kind: RouteKind
    replica: int = -1
    region: str = ""
    ticket: str = ""
    max_tokens: int = 0
    reason: str = ""


SHED_NO_TARGET = Route(RouteKind.SHED, reason="no_target")


class Cluster:
    """What routers may look at: topology, engines (scrape only), the router-side in-flight
    counts (requests sent to a replica and not ended), and a timer service."""

    def __init__(
        self,
        world: World,
        ids: list[tuple[str, str]],
        engines: list[Engine],
        schedule: Callable[[float, Callable[[float], None]], None],
    ) -> None:
        self.world = world
        self.regions = world.regions
        self.ids = [rid for rid, _ in ids]
        self.region_of = [region for _, region in ids]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.by_region: dict[str, list[int]] = {r: [] for r in world.regions}
        for i, region in enumerate(self.region_of):
            self.by_region[region].append(i)
        self.engines = engines
        self.reachable = [True] * len(ids)  # scrape succeeds (False while the replica is down)
        self.inflight = [0] * len(ids)
        self.slots = world.engine.max_num_seqs
        self.schedule = schedule

    def allowed_regions(self, req: SimRequest) -> tuple[str, ...]:
        """Regions the request may be served in (its residency zone, or all)."""
        if not req.residency:
            return self.regions
        return tuple(r for r in self.regions if self.world.zone(r) == req.residency)

    def by_rtt(self, origin: str) -> list[str]:
        """Regions ordered by RTT from ``origin`` (origin first)."""
        return sorted(self.regions, key=lambda r: (self.world.rtt(origin, r), r))


class Router:
    """Base class: a router that never queues and ignores results."""

    name = "base"
    description = ""
    admit_rpc = False  # True: each decision is an Admit RPC (pays SimConfig.admit_ms)

    def start(self, cluster: Cluster, seed: int) -> None:
        """Called once before the first request."""
        self.cluster = cluster
        self.rng = random.Random(f"{seed}:{self.name}")

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        """Decide for ``req`` arriving at ``region`` at ``now`` (ms)."""
        raise NotImplementedError

    def on_dispatch(self, req: SimRequest, replica: int, now: float) -> None:
        """``req`` was sent to ``replica`` (in-flight counts are already updated)."""

    def on_end(self, req: SimRequest, replica: int, ok: bool, ttft_ms: float, now: float) -> None:
        """``req`` ended on ``replica`` (ok, or an error such as a dead replica)."""

    def scrape(self, now: float) -> None:
        """Called every scrape interval (50 ms); routers without metrics ignore it."""

    def on_fleet_change(self, down: frozenset[str], now: float) -> None:
        """The registry now lists ``down`` replicas as not ready."""

    def poll(self, now: float) -> list[tuple[SimRequest, Route]]:
        """Finished queued requests (SERVE or SHED); routers that never queue return []."""
        return []

    def queued(self) -> int:
        """Requests waiting inside the router."""
        return 0


class Outlier:
    """Envoy outlier detection: eject after N consecutive errors for base x ejections."""

    def __init__(self, n: int, consecutive: int = 5, base_ms: float = 30_000.0) -> None:
        self._errors = [0] * n
        self._times = [0] * n
        self.until = [0.0] * n
        self._consecutive = consecutive
        self._base = base_ms

    def ok(self, i: int, now: float) -> bool:
        """Not ejected at ``now``."""
        return self.until[i] <= now

    def record(self, i: int, ok: bool, now: float) -> None:
        """Count a result."""
        if ok:
            self._errors[i] = 0
            return
        self._errors[i] += 1
        if self._errors[i] >= self._consecutive and self.until[i] <= now:
            self._times[i] += 1
            self.until[i] = now + self._base * self._times[i]
            self._errors[i] = 0


class _EnvoyRouter(Router):
    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        self.outlier = Outlier(len(cluster.ids))

    def on_end(self, req: SimRequest, replica: int, ok: bool, ttft_ms: float, now: float) -> None:
        self.outlier.record(replica, ok, now)

    def _round_robin(self, pool: list[int], key: str, now: float) -> int:
        start = self._rr.get(key, 0)
        n = len(pool)
        for k in range(n):
            i = pool[(start + k) % n]
            if self.outlier.ok(i, now):
                self._rr[key] = (start + k + 1) % n
                return i
        return -1

    _rr: dict[str, int]


class NearestOnly(_EnvoyRouter):
    """GeoDNS: clients resolve to their own region's load balancer, which round-robins
    (Envoy's default LB policy) over the region's replicas; it never leaves the region."""

    name = "nearest"
    description = "GeoDNS nearest region, round-robin inside, never leaves"

    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        self._rr = {}

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        if req.residency and self.cluster.world.zone(region) != req.residency:
            return SHED_NO_TARGET
        i = self._round_robin(self.cluster.by_region[region], region, now)
        return Route(RouteKind.SERVE, i) if i >= 0 else SHED_NO_TARGET


class GlobalRoundRobin(_EnvoyRouter):
    """One global pool, round-robin over every replica of every region (residency-tagged
    requests over their zone's replicas), with outlier ejection."""

    name = "global-rr"
    description = "round-robin over all replicas worldwide"

    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        self._rr = {}
        self._pools: dict[tuple[str, ...], list[int]] = {}

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        allowed = self.cluster.allowed_regions(req)
        pool = self._pools.get(allowed)
        if pool is None:
            pool = self._pools[allowed] = [i for r in allowed for i in self.cluster.by_region[r]]
        i = self._round_robin(pool, ",".join(allowed), now)
        return Route(RouteKind.SERVE, i) if i >= 0 else SHED_NO_TARGET


class GlobalLeastLoaded(_EnvoyRouter):
    """One global pool, least outstanding requests (the router's own count, like Envoy's
    LEAST_REQUEST with full scan), ignoring RTT."""

    name = "global-least"
    description = "least outstanding requests worldwide, RTT ignored"

    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        self._heaps: dict[str, list[tuple[int, int, int]]] = {r: [] for r in cluster.regions}
        self._seq = 0
        for i in range(len(cluster.ids)):
            self._push(i)

    def _push(self, i: int) -> None:
        self._seq += 1
        heap = self._heaps[self.cluster.region_of[i]]
        heapq.heappush(heap, (self.cluster.inflight[i], self._seq, i))
        if len(heap) > 8 * len(self.cluster.by_region[self.cluster.region_of[i]]) + 64:
            live = {e[2]: e for e in heap if e[0] == self.cluster.inflight[e[2]]}
            heap[:] = sorted(live.values())

    def _top(self, region: str, now: float) -> tuple[int, int, int] | None:
        heap = self._heaps[region]
        ejected: list[tuple[int, int, int]] = []
        found = None
        while heap:
            load, _, i = heap[0]
            if load != self.cluster.inflight[i]:
                heapq.heappop(heap)
                continue
            if not self.outlier.ok(i, now):
                ejected.append(heapq.heappop(heap))
                continue
            found = heap[0]
            break
        for e in ejected:
            heapq.heappush(heap, e)
        return found

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        best = None
        for r in self.cluster.allowed_regions(req):
            top = self._top(r, now)
            if top is not None and (best is None or top < best):
                best = top
        return Route(RouteKind.SERVE, best[2]) if best is not None else SHED_NO_TARGET

    def on_dispatch(self, req: SimRequest, replica: int, now: float) -> None:
        self._push(replica)

    def on_end(self, req: SimRequest, replica: int, ok: bool, ttft_ms: float, now: float) -> None:
        super().on_end(req, replica, ok, ttft_ms, now)
        self._push(replica)


class LocalityFailover(_EnvoyRouter):
    """Istio/Consul locality failover: priority 0 = own region, then by RTT. Health only:
    a priority takes min(100 %, healthy share x 1.4) of what reaches it (Envoy's
    overprovisioning factor, world.toml); inside a region LEAST_REQUEST with two random
    choices (Istio's default LB). Load never moves traffic, only health."""

    name = "locality-failover"
    description = "health-only priority failover (Istio/Consul), P2C inside"
    overprovisioning = 1.4

    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        self._order = {r: cluster.by_rtt(r) for r in cluster.regions}

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        c = self.cluster
        allowed = c.allowed_regions(req)
        u = self.rng.random()
        for r in self._order[region]:
            if r not in allowed:
                continue
            pool = c.by_region[r]
            healthy = [i for i in pool if self.outlier.ok(i, now)]
            share = min(1.0, len(healthy) / len(pool) * self.overprovisioning)
            if healthy and u < share:
                return Route(RouteKind.SERVE, self._p2c(healthy))
            u = (u - share) / (1.0 - share) if share < 1.0 else 1.0
        return SHED_NO_TARGET

    def _p2c(self, pool: list[int]) -> int:
        a = pool[self.rng.randrange(len(pool))]
        b = pool[self.rng.randrange(len(pool))]
        return a if self.cluster.inflight[a] <= self.cluster.inflight[b] else b


class _PrefixIndex:
    """Router-side approximate prefix index of one region: block hash -> replicas that got a
    prompt with that block (no eviction, like SGLang's tree below its size limit)."""

    def __init__(self) -> None:
        self.holders: dict[int, set[int]] = {}

    def match(self, hashes: tuple[int, ...]) -> tuple[int, set[int]]:
        """(deepest matched depth, replicas holding it); (0, empty) when none."""
        holders = self.holders
        lo, hi = 0, len(hashes)
        # Chains are inserted whole, so holding block k implies holding blocks < k: binary
        # search the deepest block anyone holds.
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in holders:
                lo = mid
            else:
                hi = mid - 1
        return (lo, holders[hashes[lo - 1]]) if lo else (0, set())

    def insert(self, hashes: tuple[int, ...], replica: int) -> int:
        """Record ``replica`` as holding ``hashes``; returns how many blocks were new to it."""
        new = 0
        for h in hashes:
            s = self.holders.get(h)
            if s is None:
                self.holders[h] = {replica}
                new += 1
            elif replica not in s:
                s.add(replica)
                new += 1
        return new


class SGLangCacheAware(_EnvoyRouter):
    """SGLang router, cache-aware policy (sgl-project/sglang docs/router/router.md), one per
    region, nearest-only across regions. cache_threshold 0.5, balance_abs_threshold 32,
    balance_rel_threshold 1.0001 (world.toml [baseline.sglang_cache_aware]). Load = the
    router's running-request count per worker. If max - min > abs and max > min x rel:
    shortest queue; else the highest prefix match if match rate > threshold, else the
    worker with the smallest tree."""

    name = "sglang"
    description = "SGLang cache-aware in region (0.5 / 32 / 1.0001), nearest-only"
    cache_threshold = 0.5
    balance_abs = 32
    balance_rel = 1.0001

    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        self._index = {r: _PrefixIndex() for r in cluster.regions}
        self._tree = [0] * len(cluster.ids)

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        c = self.cluster
        if req.residency and c.world.zone(region) != req.residency:
            return SHED_NO_TARGET
        pool = [i for i in c.by_region[region] if self.outlier.ok(i, now)]
        if not pool:
            return SHED_NO_TARGET
        loads = c.inflight
        lo = min(loads[i] for i in pool)
        hi = max(loads[i] for i in pool)
        if hi - lo > self.balance_abs and hi > lo * self.balance_rel:
            target = min(pool, key=loads.__getitem__)
        else:
            depth, holders = self._index[region].match(req.hashes)
            rate = depth * BLOCK / max(req.prompt_tokens, 1)
            live = [i for i in holders if self.outlier.ok(i, now)] if holders else []
            if rate > self.cache_threshold and live:
                target = min(live, key=lambda i: (loads[i], i))
            else:
                target = min(pool, key=self._tree.__getitem__)
        return Route(RouteKind.SERVE, target)

    def on_dispatch(self, req: SimRequest, replica: int, now: float) -> None:
        region = self.cluster.region_of[replica]
        new = self._index[region].insert(req.hashes, replica)
        self._tree[replica] += new * BLOCK + req.prompt_tokens - len(req.hashes) * BLOCK


class LlmdWeighted(Router):
    """llm-d / Gateway API Inference Extension endpoint picker, one per region, nearest-only
    across regions: score = 2 x queue + 2 x KV-cache utilization + 3 x prefix (weights from
    GIE's epp-config defaults, world.toml [baseline.llmd_weighted]); max score wins, ties at
    random. Queue and KV come from scrapes every 50 ms; pods with metrics older than 200 ms
    are skipped. The prefix scorer is the router's own index of what it sent where (only
    the pods holding the deepest match are scored, a simplification)."""

    name = "llm-d"
    description = "llm-d weighted scorer in region (queue 2, KV 2, prefix 3), nearest-only"
    w_queue, w_kv, w_prefix = 2.0, 2.0, 3.0
    stale_ms = 200.0

    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        self._index = {r: _PrefixIndex() for r in cluster.regions}
        n = len(cluster.ids)
        self._base = [0.0] * n
        self._seen = [-1e18] * n
        self._waiting = [0] * n
        self._kv = [0.0] * n
        self._best: dict[str, tuple[float, list[int]]] = {r: (0.0, []) for r in cluster.regions}

    def scrape(self, now: float) -> None:
        """Refresh queue and KV scores from the engines that answer."""
        c = self.cluster
        for region, pool in c.by_region.items():
            for i in pool:
                if c.reachable[i]:
                    s = c.engines[i].stats()
                    self._waiting[i], self._kv[i], self._seen[i] = s.waiting, s.kv_usage, now
            fresh = [i for i in pool if now - self._seen[i] <= self.stale_ms]
            if not fresh:
                self._best[region] = (0.0, [])
                continue
            qs = [self._waiting[i] for i in fresh]
            qmin, qmax = min(qs), max(qs)
            for i, q in zip(fresh, qs, strict=True):
                qscore = 1.0 if qmax == qmin else (qmax - q) / (qmax - qmin)
                self._base[i] = self.w_kv * (1.0 - self._kv[i]) + self.w_queue * qscore
            top = max(self._base[i] for i in fresh)
            self._best[region] = (top, [i for i in fresh if self._base[i] >= top - 1e-12])

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        c = self.cluster
        if req.residency and c.world.zone(region) != req.residency:
            return SHED_NO_TARGET
        top, ties = self._best[region]
        if not ties:
            return SHED_NO_TARGET
        depth, holders = self._index[region].match(req.hashes)
        if depth:
            blocks = max(req.prompt_tokens // BLOCK, 1)
            bonus = self.w_prefix * depth / blocks
            for i in holders:
                if now - self._seen[i] > self.stale_ms:
                    continue
                s = self._base[i] + bonus
                if s > top + 1e-12:
                    top, ties = s, [i]
                elif s >= top - 1e-12 and i not in ties:
                    ties = [*ties, i]
        return Route(RouteKind.SERVE, ties[self.rng.randrange(len(ties))])

    def on_dispatch(self, req: SimRequest, replica: int, now: float) -> None:
        self._index[self.cluster.region_of[replica]].insert(req.hashes, replica)


BASELINES: dict[str, type[Router]] = {
    cls.name: cls
    for cls in (
        NearestOnly,
        GlobalRoundRobin,
        GlobalLeastLoaded,
        LocalityFailover,
        SGLangCacheAware,
        LlmdWeighted,
    )
}
