"""Policy state helpers: the lane set of a region, neighbour choice, region summary.

Split from ``policy.py`` to keep each module small; everything here is pure and driven by
the ``Policy`` that owns the state.
"""

from __future__ import annotations

from spillgate.core.affinity import PrefixIndex
from spillgate.core.breaker import Breaker
from spillgate.core.decision import Estimate, Priority, Request
from spillgate.core.fleet import FleetView, RegionInfo
from spillgate.core.lanes import Lane, slot_class
from spillgate.core.overflow import ModelHeadroom, NeighbourState, NeighbourSummary
from spillgate.core.policy_config import PolicyConfig


class LaneSet:
    """Lanes of one region, indexed by (model, version) and by replica.

    Rebuilt on every fleet change (not per decision); lanes that survive a rebuild are the
    same objects (their load, signals, learned rates and the tickets on them carry on);
    lane ids are never reused.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self._cfg = config
        self._by_key: dict[tuple[str, str, str], Lane] = {}
        self._by_version: dict[tuple[str, str], list[Lane]] = {}
        self._by_replica: dict[str, list[Lane]] = {}
        self._draining: set[str] = set()
        self._next_id = 0

    def rebuild(
        self, fleet: FleetView, region: str, prefix: PrefixIndex, breakers: dict[str, Breaker]
    ) -> None:
        """Recompute the lanes of ``region`` from ``fleet``."""
        old = self._by_key
        by_key: dict[tuple[str, str, str], Lane] = {}
        by_version: dict[tuple[str, str], list[Lane]] = {}
        by_replica: dict[str, list[Lane]] = {}
        for model, version in fleet.local_keys(region):
            info = fleet.versions[(model, version)]
            for rep in fleet.serving(region, model, version):
                key = (rep.id, model, version)
                lane = old.get(key)
                if lane is not None:
                    # The same object, not a copy: live tickets hold a reference to their
                    # lane and release into it. A copy left them releasing into a dead
                    # object, so the live lane's own in-flight floor only ever grew and
                    # the replica looked full for good after any fleet change.
                    lane.refresh(rep, info)
                else:
                    self._next_id += 1
                    lane = Lane(self._next_id, rep, info, self._cfg)
                lane.breaker = breakers.get(rep.id)
                lane.draining = rep.id in self._draining
                prefix.add_lane(lane.id, lane.kv_blocks)
                by_key[key] = lane
                by_version.setdefault((model, version), []).append(lane)
                by_replica.setdefault(rep.id, []).append(lane)
        for key, lane in old.items():
            if key not in by_key:
                prefix.remove_lane(lane.id)
        self._by_key, self._by_version, self._by_replica = by_key, by_version, by_replica

    def of_version(self, model: str, version: str) -> list[Lane]:
        """Lanes serving ``model@version`` (candidates before the freshness/breaker check)."""
        return self._by_version.get((model, version), _NONE)

    def get(self, replica: str, model: str, version: str) -> Lane | None:
        """The lane of ``model@version`` on ``replica``, if it serves it."""
        return self._by_key.get((replica, model, version))

    def of_replica(self, replica: str) -> list[Lane]:
        """Lanes of one replica (one per loaded version)."""
        return self._by_replica.get(replica, _NONE)

    def versions(self) -> dict[tuple[str, str], list[Lane]]:
        """(model, version) -> lanes."""
        return self._by_version

    def set_draining(self, replica: str, draining: bool) -> None:
        """Mark a replica draining (kept across rebuilds until resumed)."""
        if draining:
            self._draining.add(replica)
        else:
            self._draining.discard(replica)
        for lane in self.of_replica(replica):
            lane.draining = draining


_NONE: list[Lane] = []  # shared empty result, never mutated


def pick_neighbour(
    fleet: FleetView,
    origin: str,
    neighbours: dict[str, NeighbourState],
    cfg: PolicyConfig,
    req: Request,
    version: tuple[str, str],
    alias: str,
    output_tokens: int,
    remaining_ms: float,
    now: float,
) -> tuple[RegionInfo, NeighbourState, str, str, Estimate] | None:
    """Nearest neighbour that passes every overflow condition (DESIGN.md step 6), or None.

    Conditions: residency zone allowed, fresh summary, breaker closed, a bucket token,
    the version (or, for an unpinned ``alias``, any of its versions there) listed with
    headroom past the hysteresis threshold, and RTT + predicted wait + inference within
    ``remaining_ms``. Pure: spends nothing.
    """
    if not neighbours:
        return None
    rtts = fleet.regions[origin].rtt_ms if origin in fleet.regions else {}
    prior = cfg.prior
    for region in fleet.neighbours(origin):
        state = neighbours.get(region.id)
        if state is None or now - state.received > cfg.neighbour_stale_s:
            continue  # no or stale summary = no headroom (principle 6)
        zone = region.residency_zone or state.summary.residency_zone
        if req.residency_zone and zone != req.residency_zone:
            continue
        rtt = rtts[region.id]
        if rtt >= remaining_ms or state.bucket.available(now) < 1.0:
            continue
        if not state.breaker.allows(now):
            continue
        candidates = [version]
        if alias:
            candidates += [v for v in fleet.alias_versions(alias, region.id) if v != version]
        for model, ver in candidates:
            head = state.summary.headroom(model, ver)
            if head is None or head.free_slots < 1 or not state.admitting.get((model, ver)):
                continue
            per_token = (
                head.prefill_ms_per_1k_tokens / 1000.0
                if head.prefill_ms_per_1k_tokens > 0
                else prior.prefill_ms_per_token
            )
            itl = head.itl_ms if head.itl_ms > 0 else prior.itl_base_ms
            prefill = prior.ttft_overhead_ms + req.prompt_tokens * per_token
            decode = output_tokens * itl
            total = rtt + head.predicted_queue_ms + prefill + decode
            if total <= remaining_ms:
                est = Estimate(
                    rtt, head.predicted_queue_ms, prefill, decode, total, remaining_ms, 0
                )
                return region, state, model, ver, est
    return None


def build_summary(
    lanes: LaneSet,
    region: str,
    zone: str,
    now: float,
    cfg: PolicyConfig,
    queue_depth: int,
    sequence: int,
    overflow_in: int,
    overflow_out: int,
    revision: int,
) -> NeighbourSummary:
    """This region's summary; stale/unavailable lanes contribute no headroom."""
    fresh_after = now - cfg.stale_after_s
    # Headroom is what a neighbour's overflowed request may actually take: free slots of the
    # overflow-in class of a NORMAL request (below its priority and overflow-in reserves),
    # not raw free slots. Counting raw free slots advertised capacity this region keeps for
    # its own users, so neighbours spilled into it and its own traffic queued behind them.
    inbound = slot_class(Priority.NORMAL, 1)
    healthy_replicas: set[str] = set()
    models: list[ModelHeadroom] = []
    depth_total = queue_depth
    for (model, version), group in sorted(lanes.versions().items()):
        healthy = [lane for lane in group if lane.available(now, fresh_after)]
        healthy_replicas.update(lane.replica for lane in healthy)
        capacity = sum(lane.slots for lane in healthy)
        free = sum(max(0, lane.usable[inbound] - lane.load) for lane in healthy)
        depth = sum(max(0, lane.load - lane.slots) for lane in healthy)
        depth_total += depth
        n = len(healthy)
        models.append(
            ModelHeadroom(
                model=model,
                version=version,
                healthy_replicas=len({lane.replica for lane in healthy}),
                free_slots=free,
                headroom_ratio=free / capacity if capacity else 0.0,
                predicted_queue_ms=min((lane.queue_ms(inbound) for lane in healthy), default=0.0),
                queue_depth=depth,
                prefill_ms_per_1k_tokens=(
                    sum(lane.prefill_per_token for lane in healthy) * 1000.0 / n if n else 0.0
                ),
                itl_ms=sum(lane.itl_ms() for lane in healthy) / n if n else 0.0,
            )
        )
    return NeighbourSummary(
        region=region,
        time=now,
        residency_zone=zone,
        healthy_replicas=len(healthy_replicas),
        queue_depth=depth_total,
        models=tuple(models),
        sequence=sequence,
        overflow_in_total=overflow_in,
        overflow_out_total=overflow_out,
        registry_revision=revision,
    )
