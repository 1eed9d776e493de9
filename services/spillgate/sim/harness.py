"""The discrete-event harness: one virtual clock (ms), one heap of events, deterministic.

Replicas are ``core.engine.Engine`` instances (no per-token events: ``token_events=False``).
A served request reaches its engine after the request path's measured overhead (the Admit
RPC for routers that make one, and the stream set-up: ``SimConfig.admit_ms`` / ``stream_ms``)
plus the network when it is served in another region.
Each request ends exactly once (ok, shed, error, or unfinished when the drain deadline
passes); the harness checks that, residency on every dispatch, and each origin's overflow
rate per neighbour against the token-bucket bound.
"""

from __future__ import annotations

import functools
import gc
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spillgate.core.engine import Engine, EventKind, SeqRequest, SubmitResult
from spillgate.sim.metrics import Recorder
from spillgate.sim.routers import Cluster, Route, RouteKind, Router
from spillgate.sim.scenarios import Scenario
from spillgate.sim.workload import SimRequest, TraceWorkload, Workload
from spillgate.sim.world import World, policy_config, replica_ids

_ARRIVAL, _ENGINE, _FORWARD, _DISPATCH, _CALL, _SCRAPE, _PUMP, _SAMPLE = range(8)
_STARTED, _TOKEN = EventKind.STARTED, EventKind.TOKEN

Progress = Callable[[float], None]  # fraction of simulated time done


@dataclass(frozen=True)
class SimConfig:
    """Harness knobs (times in ms)."""

    seed: int = 1
    scrape_ms: float = 50.0  # world.toml baseline.llmd_weighted.scrape_interval_ms
    pump_ms: float = 5.0  # admission queue re-evaluation while requests wait
    sample_ms: float = 500.0  # utilisation time series
    drain_ms: float = 120_000.0  # after the last arrival, how long requests may finish
    registry_lease_ms: float = 3_000.0  # a dead replica leaves the fleet view after this
    # Per-request overhead of the request path that the engine does not model, as (p50,
    # p90) ms; each request draws both parts from shifted exponentials with these quantiles
    # and pays them before it reaches the replica's engine. (0, 0), the default, turns a
    # part off; LOCAL_STACK_* below are this repository's local stack, measured.
    admit_ms: tuple[float, float] = (0.0, 0.0)  # Admit RPC seen by the client (admit_rpc routers)
    stream_ms: tuple[float, float] = (0.0, 0.0)  # stream set-up: stream TTFT - engine TTFT

    def __post_init__(self) -> None:
        for name in ("admit_ms", "stream_ms"):
            p50, p90 = getattr(self, name)
            if not 0.0 <= p50 <= p90 or math.isinf(p90):
                raise ValueError(f"{name} must be finite (p50, p90) with 0 <= p50 <= p90")


# The local stack's request-path overhead (gRPC and Python in client, admission and
# replica simulator): medians over 10 runs of `make bench-sim-fidelity` (bench/sim_fidelity.py:
# 300 requests each, Admit -> stream -> Release through 2 replica processes, all served) on
# this project's 2-vCPU machine, 2026-11-23, load average 2.2-3.8 (a quiet box measures about
# half). What `spillgate sim --local-overhead` uses; the fidelity bench calibrates its own
# from a separate trace in the same run; a production stack has its own.
LOCAL_STACK_ADMIT_MS = (3.6, 8.6)
LOCAL_STACK_STREAM_MS = (6.9, 16.2)


class _Overhead:
    """One overhead part: p50 and p90 of a shifted exponential (floor + Exp(mean))."""

    def __init__(self, p50: float, p90: float, rng: random.Random) -> None:
        # Exp(mean) has median mean x ln 2 and p90 mean x ln 10, so p90 - p50 = mean x ln 5.
        self.mean = (p90 - p50) / math.log(5.0)
        self.floor = max(0.0, p50 - self.mean * math.log(2.0))
        self._rng = rng
        self.on = p90 > 0.0

    def draw(self) -> float:
        if not self.mean:
            return self.floor
        return self.floor + self._rng.expovariate(1.0 / self.mean)


@dataclass
class RunResult:
    """One policy on one scenario."""

    policy: str
    scenario: str
    scale: float
    requests: int
    wall_s: float
    summary: dict[str, Any]
    samples: list[dict[str, Any]]
    e2e_ok_ms: list[float]

    @property
    def requests_per_wall_s(self) -> float:
        """Simulated requests per wall-clock second."""
        return self.requests / self.wall_s if self.wall_s > 0 else math.inf


class Simulator:
    """Runs one router through one scenario at one scale."""

    def __init__(
        self,
        world: World,
        scenario: Scenario,
        router: Router,
        config: SimConfig | None = None,
        trace: TraceWorkload | None = None,
    ) -> None:
        self.world = world
        self.scenario = scenario
        self.router = router
        self.cfg = config or SimConfig()
        seed = self.cfg.seed
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = itertools.count()
        self._ids = replica_ids(world)
        self._eng_rng = [random.Random(f"{seed}:engine:{rid}") for rid, _ in self._ids]
        self.engines = [Engine(world.engine, rng) for rng in self._eng_rng]
        self.cluster = Cluster(world, self._ids, self.engines, self._schedule)
        self._up = [True] * len(self._ids)
        self._sched = [math.inf] * len(self._ids)
        self._live_on: list[dict[str, SimRequest]] = [{} for _ in self._ids]
        self._live: dict[int, SimRequest] = {}
        self._net = random.Random(f"{seed}:net")
        self.rec = Recorder(world.regions)
        budgets = dict(policy_config(world).budgets_ms)
        demand = {r: world.demand_scale(r) for r in world.regions}
        self.workload: Workload | TraceWorkload = trace or Workload(
            scenario.workload,
            world.regions,
            lambda r, t: scenario.rate(r, t, demand[r]),
            scenario.duration_s,
            budgets,
            seed,
        )
        self._end = scenario.duration_s * 1000.0
        self._pump_at = math.inf
        self._last_pump = -math.inf
        self._inbound = dict.fromkeys(world.regions, 0)
        self._overflow_window: dict[tuple[str, str, int], int] = {}
        overhead = random.Random(f"{seed}:overhead")
        admit = self.cfg.admit_ms if router.admit_rpc else (0.0, 0.0)
        self._admit = _Overhead(*admit, overhead)
        self._stream = _Overhead(*self.cfg.stream_ms, overhead)
        self._slots_by_region = {
            r: len(self.cluster.by_region[r]) * world.engine.max_num_seqs for r in world.regions
        }
        self.requests = 0

    # -- plumbing ---------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, a, b))

    def _schedule(self, t: float, fn: Callable[[float], None]) -> None:
        self._push(t, _CALL, fn)

    def _engine_touched(self, i: int) -> None:
        nt = self.engines[i].next_event_time()
        if nt is not None and nt < self._sched[i]:
            self._sched[i] = nt
            self._push(nt, _ENGINE, i)

    def _kick(self, now: float) -> None:
        # Capacity changed: re-run the admission queue soon. Kicks coalesce (at most one
        # pump per ms, like the service's pump task batching wake-ups on its event loop).
        at = max(now, self._last_pump + 1.0)
        if self.router.queued() and self._pump_at > at:
            self._pump_at = at
            self._push(at, _PUMP)

    # -- run --------------------------------------------------------------------------------

    def run(self, progress: Progress | None = None) -> RunResult:
        """Simulate to the end (arrivals stop at the scenario's duration, then a drain)."""
        # A run allocates millions of GC-tracked objects (requests, heap entries, events)
        # and makes no reference cycles (tests/test_sim.py checks that), so the cyclic
        # collector would only re-scan the growing live state, ~10 % of the run time;
        # reference counting frees everything. It is switched back on afterwards.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(progress)
        finally:
            if enabled:
                gc.enable()

    def _run(self, progress: Progress | None) -> RunResult:
        wall0 = time.perf_counter()
        self.router.start(self.cluster, self.cfg.seed)
        workload = self.workload
        # The next arrival waits outside the heap with the (time, insertion number) key it
        # would have had inside it, so the order of events is the same, ties included.
        first = workload.next_time()
        arrival = None if first is None else (first, next(self._seq))
        self._push(0.0, _SCRAPE)
        self._push(0.0, _SAMPLE)
        for o in self.scenario.outages:
            start, stop = o.start_s * 1000.0, (o.start_s + o.duration_s) * 1000.0
            self._schedule(start, functools.partial(self._outage, o.region, True))
            self._schedule(stop, functools.partial(self._outage, o.region, False))
        deadline = self._end + self.cfg.drain_ms
        heap, pop = self._heap, heapq.heappop
        next_report, report_every = 0.0, self._end / 200.0
        now = 0.0
        sched = self._sched
        while True:
            if heap and (arrival is None or heap[0] < arrival):
                now, _, kind, a, b = pop(heap)
            elif arrival is not None:
                now, kind = arrival[0], _ARRIVAL
            else:
                break
            if now > deadline:
                break
            if kind == _ENGINE:
                if sched[a] == now:
                    sched[a] = math.inf
                    self._engine_events(a, now)
            elif kind == _ARRIVAL:
                req = workload.pop()
                nt = workload.next_time()
                arrival = None if nt is None else (nt, next(self._seq))
                if req is not None:
                    self._arrive(req, now)
            elif kind == _DISPATCH:
                self._dispatch(a, b, now)
            elif kind == _FORWARD:
                self._decide(a, b, 1, now)
            elif kind == _CALL:
                a(now)
            elif kind == _PUMP:
                if now == self._pump_at:  # else superseded by an earlier pump
                    self._pump(now)
            elif kind == _SCRAPE:
                self.router.scrape(now)
                self._kick(now)
                if now < self._end or self._live:
                    self._push(now + self.cfg.scrape_ms, _SCRAPE)
            elif kind == _SAMPLE:
                self._sample(now)
                if now < self._end or self._live:
                    self._push(now + self.cfg.sample_ms, _SAMPLE)
            if progress is not None and now >= next_report:
                progress(min(1.0, now / self._end))
                next_report = now + report_every
            if not self._live and now >= self._end and arrival is None:
                break
        for req in list(self._live.values()):
            self._abandon(req, now)
        if progress is not None:
            progress(1.0)
        wall = time.perf_counter() - wall0
        summary = self.rec.summary(self.scenario.duration_s)
        e2e = [float(x) for x in self.rec.e2e if x == x]
        return RunResult(
            self.router.name,
            self.scenario.name,
            self.world.scale,
            self.requests,
            wall,
            summary,
            self.rec.samples,
            e2e,
        )

    # -- requests ---------------------------------------------------------------------------

    def _arrive(self, req: SimRequest, now: float) -> None:
        self.requests += 1
        self._live[req.id] = req
        self._decide(req, req.origin, 0, now)

    def _decide(self, req: SimRequest, region: str, hops: int, now: float) -> None:
        self._apply(req, self.router.route(req, region, hops, now), region, now)

    def _apply(self, req: SimRequest, route: Route, region: str, now: float) -> None:
        kind = route.kind
        if kind is RouteKind.SERVE:
            i = route.replica
            dest = self.cluster.region_of[i]
            req.served_region, req.replica, req.ticket = dest, i, route.ticket
            if route.max_tokens:
                req.degraded = True
                req.output_tokens = min(req.output_tokens, route.max_tokens)
            self.cluster.inflight[i] += 1
            self.router.on_dispatch(req, i, now)
            # The client learns the decision (Admit), then opens its stream (network and
            # set-up); the engine sees the request after all of it.
            lead = 0.0
            if self._admit.on:
                lead += self._admit.draw()
            if self._stream.on:
                req.setup_ms = self._stream.draw()
                lead += req.setup_ms
            if dest != region:
                delay = self.world.one_way_ms(region, dest, self._net)
                req.net_ms += delay
                self._push(now + delay + lead, _DISPATCH, req, i)
            elif lead:
                self._push(now + lead, _DISPATCH, req, i)
            else:
                self._dispatch(req, i, now)
        elif kind is RouteKind.FORWARD:
            dest = route.region
            delay = self.world.one_way_ms(region, dest, self._net)
            req.net_ms += delay
            self._count_overflow(req.origin, dest, now)
            if self._admit.on:  # the origin's Admit answered OVERFLOW
                delay += self._admit.draw()
            self._push(now + delay, _FORWARD, req, dest)
        elif kind is RouteKind.QUEUED:
            req.queued = True
        else:
            self._end_request(req, "shed", now)

    def _count_overflow(self, origin: str, dest: str, now: float) -> None:
        key = (origin, dest, int(now // 1000.0))
        n = self._overflow_window[key] = self._overflow_window.get(key, 0) + 1
        cfg = getattr(self.router, "config", None)
        if cfg is None:
            return
        # Token bucket bound (core/overflow.py): capacity = fraction x the neighbour's slots
        # (at least 1), refilled each refill_s, so one refill window sees <= 2 x capacity.
        cap = max(1.0, cfg.overflow_fraction * self._slots_by_region[dest])
        bound = 2.0 * cap * max(1.0, 1.0 / cfg.overflow_refill_s)
        self.rec.max_overflow_cap_ratio = max(self.rec.max_overflow_cap_ratio, n / bound)
        if n > bound + 1:
            self.rec.overflow_cap_violations += 1

    def _dispatch(self, req: SimRequest, i: int, now: float) -> None:
        region = self.cluster.region_of[i]
        if req.residency and self.world.zone(region) != req.residency:
            self.rec.residency_violations += 1
        if req.served_region != req.origin:
            self._inbound[region] += 1
        if not self._up[i]:
            self._fail(req, i, now)
            return
        seq = SeqRequest(str(req.id), req.prompt_tokens, req.hashes, req.output_tokens)
        result = self.engines[i].submit(seq, now)
        if result is not SubmitResult.ACCEPTED:
            self._fail(req, i, now)
            return
        req.submit = now
        self._live_on[i][seq.id] = req
        # Collect its STARTED event (due now) at once rather than through a second heap
        # entry at the same time: the engine already processed everything due at ``now``.
        self._engine_events(i, now)

    def _fail(self, req: SimRequest, i: int, now: float) -> None:
        self.cluster.inflight[i] -= 1
        self._end_request(req, "error", now)
        self.router.on_end(req, i, False, 0.0, now)
        self._kick(now)

    def _engine_events(self, i: int, now: float) -> None:
        live = self._live_on[i]
        region = self.cluster.region_of[i]
        for ev in self.engines[i].advance(now):
            req = live.get(ev.seq_id)
            if req is None:
                continue
            kind = ev.kind
            if kind is _TOKEN:
                req.ttft_ms = ev.time_ms - req.submit  # replica-side until the end
            elif kind is _STARTED:
                req.cached = ev.cached_tokens
                self.rec.started(region, req.prompt_tokens, ev.cached_tokens)
            else:
                del live[ev.seq_id]
                self.cluster.inflight[i] -= 1
                replica_ttft = req.ttft_ms
                # Client view: the request's way there (and queueing) plus the way back.
                req.ttft_ms = req.submit + replica_ttft + req.net_ms - req.arrival
                req.e2e_ms = ev.time_ms + req.net_ms - req.arrival
                self._end_request(req, "ok", ev.time_ms)
                # The ticket's TTFT as the client measures it, from the start of its stream.
                stream_ttft = replica_ttft + req.setup_ms
                self.router.on_end(req, i, True, stream_ttft, ev.time_ms)
                self._kick(now)
        self._engine_touched(i)

    def _pump(self, now: float) -> None:
        self._pump_at = math.inf
        self._last_pump = now
        for req, route in self.router.poll(now):
            region = req.served_region or req.origin
            if route.kind is RouteKind.SERVE:
                region = self.cluster.region_of[route.replica]
            self._apply(req, route, region, now)
        if self.router.queued():
            self._pump_at = now + self.cfg.pump_ms
            self._push(self._pump_at, _PUMP)

    def _end_request(self, req: SimRequest, status: str, now: float) -> None:
        if req.status or self._live.pop(req.id, None) is None:
            self.rec.ended_twice += 1
            return
        req.status = status
        self.rec.end(req)

    def _abandon(self, req: SimRequest, now: float) -> None:
        if req.replica >= 0 and self._live_on[req.replica].pop(str(req.id), None) is not None:
            self.engines[req.replica].cancel(str(req.id), max(now, self.engines[req.replica].now))
        self._end_request(req, "unfinished", now)

    # -- world events -----------------------------------------------------------------------

    def _outage(self, region: str, down: bool, now: float) -> None:
        pool = self.cluster.by_region[region]
        for i in pool:
            self._up[i] = not down
            self.cluster.reachable[i] = not down
            if down:
                for sid, req in list(self._live_on[i].items()):
                    self.engines[i].cancel(sid, max(now, self.engines[i].now))
                    del self._live_on[i][sid]
                    self._fail(req, i, now)
            else:
                self.engines[i] = Engine(self.world.engine, self._eng_rng[i])  # cold cache
                self._sched[i] = math.inf
        ids = frozenset(self.cluster.ids[i] for i in range(len(self._up)) if not self._up[i])
        delay = self.cfg.registry_lease_ms if down else 0.0
        self._schedule(now + delay, lambda t: self.router.on_fleet_change(ids, t))

    def _sample(self, now: float) -> None:
        slots = self.world.engine.max_num_seqs
        util: dict[str, float] = {}
        load: dict[str, float] = {}
        for r, pool in self.cluster.by_region.items():
            running = waiting = 0
            for i in pool:
                if self._up[i]:
                    s = self.engines[i].stats()
                    running += s.running
                    waiting += s.waiting
            util[r] = round(running / (slots * len(pool)), 4)
            load[r] = round((running + waiting) / (slots * len(pool)), 4)
        self.rec.samples.append(
            {
                "t_s": round(now / 1000.0, 3),
                "util": util,
                "load": load,
                "inbound": dict(self._inbound),
            }
        )
        self._inbound = dict.fromkeys(self.world.regions, 0)
