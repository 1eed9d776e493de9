"""spillgate in the simulator: one core ``Policy`` per region, wired like the admission service.

* Signals: every ``scrape_interval_s`` (50 ms) each region scrapes its replicas' engine stats
  (vLLM-style running / waiting / KV use plus max_num_seqs, as the replica simulator
  exports); a down replica does not answer, so its signals age into staleness.
* Neighbours: every 100 ms (WatchRegion's default interval) each region publishes
  ``Policy.summary`` to its peers, delivered one jittered one-way RTT later.
* Tickets: a served request releases its ticket when it ends, with the timings a zero-proxy
  client measures (TTFT and total from the start of the stream), ERROR on a dead replica.
* OVERFLOW: the harness carries the request to the neighbour (paying the RTT), whose Policy
  decides with hops=1; the origin learns the result on its neighbour breaker.
* QUEUE: drained (``drain_queue``) after every capacity change and every 5 ms while queued.
* Registry: a dead replica leaves the fleet view after its 3 s lease; it is back when it
  re-registers.
"""

from __future__ import annotations

import random

from spillgate.core.decision import Action, Decision, Outcome, Priority, Request
from spillgate.core.policy import Policy
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.signals import ModelLoad, Signals
from spillgate.sim.routers import Cluster, Route, RouteKind, Router
from spillgate.sim.workload import BLOCK, SimRequest
from spillgate.sim.world import ALIAS, TRITON_NAME, fleet_view, policy_config


class SpillgateRouter(Router):
    """spillgate's admission policy (core.Policy), one instance per region."""

    name = "spillgate"
    description = "spillgate admission (core.Policy per region, bounded overflow)"
    admit_rpc = True
    summary_interval_ms = 100.0
    ticket_sweep_ms = 250.0

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self._config = config

    def start(self, cluster: Cluster, seed: int) -> None:
        super().start(cluster, seed)
        world = cluster.world
        self.config = self._config or policy_config(world)
        self.policies = {
            r: Policy(self.config, r, random.Random(f"{seed}:policy:{r}")) for r in cluster.regions
        }
        fleet = fleet_view(world)
        for p in self.policies.values():
            p.set_fleet(fleet)
        self._net = random.Random(f"{seed}:summaries")
        self._queued: dict[str, tuple[SimRequest, str]] = {}
        self._requests: dict[str, Request] = {}
        self._prio = {int(p): p for p in Priority}
        self.scrape(0.0)
        self._exchange(0.0)
        cluster.schedule(self.ticket_sweep_ms, self._sweep)

    # -- periodic ---------------------------------------------------------------------------

    def scrape(self, now: float) -> None:
        c = self.cluster
        t = now / 1000.0
        slots = c.slots
        for region, pool in c.by_region.items():
            policy = self.policies[region]
            for i in pool:
                if not c.reachable[i]:
                    continue
                s = c.engines[i].stats()
                load = ModelLoad(
                    running=s.running,
                    waiting=s.waiting,
                    kv_usage=s.kv_usage,
                    max_running=slots,
                    prefix_queries_tokens=s.prefix_queries_tokens,
                    prefix_hits_tokens=s.prefix_hits_tokens,
                )
                policy.observe_signals(c.ids[i], Signals(t, {TRITON_NAME: load}), t)

    def _exchange(self, now: float) -> None:
        c = self.cluster
        for region, policy in self.policies.items():
            summary = policy.summary(now / 1000.0)
            for peer, other in self.policies.items():
                if peer == region:
                    continue
                at = now + c.world.one_way_ms(region, peer, self._net)

                def deliver(t: float, other: Policy = other, s: object = summary) -> None:
                    other.observe_neighbour(s, t / 1000.0)  # type: ignore[arg-type]

                c.schedule(at, deliver)
        c.schedule(now + self.summary_interval_ms, self._exchange)

    def _sweep(self, now: float) -> None:
        for policy in self.policies.values():
            policy.expire_tickets(now / 1000.0)
        self.cluster.schedule(now + self.ticket_sweep_ms, self._sweep)

    def on_fleet_change(self, down: frozenset[str], now: float) -> None:
        fleet = fleet_view(self.cluster.world, down)
        for p in self.policies.values():
            p.set_fleet(fleet)

    # -- requests ---------------------------------------------------------------------------

    def route(self, req: SimRequest, region: str, hops: int, now: float) -> Route:
        r = Request(
            request_id=str(req.id),
            model=ALIAS,
            arrival=req.arrival / 1000.0,
            budget_ms=req.budget_ms,
            priority=self._prio[req.priority],
            session_id=req.session,
            prompt_tokens=req.prompt_tokens,
            prefix_block_hashes=req.hashes,
            block_size_tokens=BLOCK,
            max_tokens=req.max_tokens,
            residency_zone=req.residency,
            allow_degrade=req.allow_degrade,
            hops=hops,
            origin_region=req.origin,
        )
        decision = self.policies[region].decide(r, now / 1000.0)
        if decision.action is Action.QUEUE:
            self._queued[r.request_id] = (req, region)
        return self._route(decision)

    def _route(self, d: Decision) -> Route:
        action = d.action
        if action is Action.SERVE or action is Action.DEGRADE:
            assert d.ticket is not None
            cap = d.degrade.max_tokens if d.degrade is not None else 0
            return Route(
                RouteKind.SERVE,
                self.cluster.index[d.replica],
                d.region,
                d.ticket.id,
                cap,
                str(d.reason),
            )
        if action is Action.OVERFLOW:
            return Route(RouteKind.FORWARD, region=d.region, reason=str(d.reason))
        if action is Action.QUEUE:
            return Route(RouteKind.QUEUED, reason=str(d.reason))
        return Route(RouteKind.SHED, reason=str(d.reason))

    def poll(self, now: float) -> list[tuple[SimRequest, Route]]:
        out: list[tuple[SimRequest, Route]] = []
        if not self._queued:
            return out
        for policy in self.policies.values():
            if policy.queue_len == 0:
                continue
            for r, decision in policy.drain_queue(now / 1000.0):
                req, _ = self._queued.pop(r.request_id)
                out.append((req, self._route(decision)))
        return out

    def queued(self) -> int:
        return len(self._queued)

    def on_end(self, req: SimRequest, replica: int, ok: bool, ttft_ms: float, now: float) -> None:
        if not req.ticket:
            return
        region = self.cluster.region_of[replica]
        outcome = Outcome.OK if ok else Outcome.ERROR
        total = now - req.submit + req.setup_ms if ok else 0.0  # from the client's stream start
        out = req.output_tokens if ok else 0
        t = now / 1000.0
        self.policies[region].release(req.ticket, outcome, t, ttft_ms, total, out)
        if region != req.origin:
            self.policies[req.origin].record_neighbour_result(region, ok, t)
