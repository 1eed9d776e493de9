"""Protobuf <-> core conversions for the admission service (the only place that knows both).

Times: the policy runs on the admission's monotonic clock (seconds); the wire uses wall-clock
Timestamps. `Clocks` converts between them at one instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from spillgate._proto import common_pb2, registry_pb2
from spillgate.core.decision import (
    Decision,
    Priority,
    Request,
    Ticket,
    resolve_budget_ms,
)
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
from spillgate.core.policy_config import PolicyConfig
from spillgate.registry.store import ALIAS, MODEL, REGION, REPLICA, VERSION, Key

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_NO_AVOID: frozenset[str] = frozenset()  # most requests are not retries

_STATUS = {
    common_pb2.REPLICA_STATE_READY: ReplicaStatus.READY,
    common_pb2.REPLICA_STATE_DRAINING: ReplicaStatus.DRAINING,
}


@dataclass(frozen=True)
class Clocks:
    """One reading of both clocks: monotonic seconds `mono` taken at wall time `wall`."""

    mono: float
    wall: datetime

    def to_mono(self, ts: timestamp_pb2.Timestamp) -> float:
        """A wire timestamp on the monotonic clock."""
        return self.mono + (ts.ToDatetime(tzinfo=UTC) - self.wall).total_seconds()

    def to_wire(self, mono: float) -> timestamp_pb2.Timestamp:
        """A monotonic instant as a wire timestamp."""
        ts = timestamp_pb2.Timestamp()
        self.write_wire(ts, mono)
        return ts

    def write_wire(self, ts: timestamp_pb2.Timestamp, mono: float) -> None:
        """Set ``ts`` to a monotonic instant: what ``Timestamp.FromDatetime`` gives, in
        integer microseconds (a fifth of its cost, which goes to ``calendar.timegm``)."""
        wall = self.wall if self.wall.tzinfo is not None else self.wall.replace(tzinfo=UTC)
        micros = (wall + timedelta(seconds=mono - self.mono) - _EPOCH) // _MICROSECOND
        seconds, micros = divmod(micros, 1_000_000)
        ts.seconds = seconds
        ts.nanos = micros * 1000


# -- registry -> fleet ----------------------------------------------------------------------


def _targets(targets: registry_pb2.AliasTargets) -> tuple[AliasTarget, ...]:
    return tuple(AliasTarget(t.model, t.version, t.weight) for t in targets.targets)


def fleet_from_state(state: Mapping[Key, registry_pb2.Entity], revision: int) -> FleetView:
    """The policy's view of a registry snapshot (a consistent revision)."""
    regions, models, versions, aliases, replicas = [], [], [], [], []
    for (kind, _), e in sorted(state.items()):
        if kind == REGION:
            r = e.region
            regions.append(
                RegionInfo(r.id, r.residency_zone, r.gateway_endpoint, dict(r.rtt_ms), r.draining)
            )
        elif kind == MODEL:
            m = e.model
            models.append(ModelInfo(m.id, m.max_output_tokens or 4096, m.fallback_model))
        elif kind == VERSION:
            v = e.version
            versions.append(
                VersionInfo(v.model, v.version, v.triton_model_name, v.triton_model_version)
            )
        elif kind == ALIAS:
            a = e.alias
            region_targets = {r: _targets(t) for r, t in a.region_targets.items()}
            aliases.append(AliasInfo(a.name, _targets(a.default_targets), region_targets))
        elif kind == REPLICA:
            p = e.replica
            replicas.append(
                ReplicaInfo(
                    p.id,
                    p.region,
                    p.endpoint,
                    _STATUS.get(p.state, ReplicaStatus.NOT_READY),
                    tuple((v.model, v.version) for v in p.loaded),
                )
            )
    return FleetView(regions, models, versions, aliases, replicas, revision)


# -- requests and decisions -----------------------------------------------------------------


def request_from_proto(
    ctx: common_pb2.RequestContext, clocks: Clocks, config: PolicyConfig
) -> Request:
    """The core Request; the budget is the earlier of budget_ms and deadline (or the
    priority's default when neither is set). Raises InvalidRequest for a bad priority."""
    priority = Priority.from_wire(ctx.priority)
    deadline = clocks.to_mono(ctx.deadline) if ctx.HasField("deadline") else None
    budget = resolve_budget_ms(config.budgets_ms[priority], ctx.budget_ms, deadline, clocks.mono)
    return Request(
        request_id=ctx.request_id,
        model=ctx.model,
        arrival=clocks.mono,
        budget_ms=budget,
        priority=priority,
        tenant=ctx.tenant,
        session_id=ctx.session_id,
        prompt_tokens=ctx.prompt_tokens,
        # A slice copies the repeated field in one C call: ~30% faster than iterating it.
        prefix_block_hashes=tuple(ctx.prefix_block_hashes[:]),
        block_size_tokens=ctx.block_size_tokens or 16,
        cache_salt=ctx.cache_salt,
        max_tokens=ctx.max_tokens,
        residency_zone=ctx.residency_zone,
        allow_degrade=ctx.allow_degrade,
        hops=ctx.hops,
        origin_region=ctx.origin_region,
        avoid_replicas=frozenset(ctx.avoid_replicas) if ctx.avoid_replicas else _NO_AVOID,
    )


def ticket_to_proto(ticket: Ticket, clocks: Clocks) -> common_pb2.Ticket:
    out = common_pb2.Ticket()
    _write_ticket(out, ticket, clocks)
    return out


def _write_ticket(out: common_pb2.Ticket, ticket: Ticket, clocks: Clocks) -> None:
    out.id = ticket.id
    clocks.write_wire(out.lease_expires_at, ticket.lease_expires_at)
    out.lease_ms = ticket.lease_ms
    out.region = ticket.region
    out.replica = ticket.replica


def decision_to_proto(d: Decision, clocks: Clocks) -> common_pb2.Decision:
    """The wire Decision (field for field)."""
    out = common_pb2.Decision()
    write_decision(out, d, clocks)
    return out


def write_decision(out: common_pb2.Decision, d: Decision, clocks: Clocks) -> None:
    """Fill ``out`` (e.g. ``AdmitResponse.decision``) with ``d`` in place: passing a built
    message to a constructor copies it, which cost as much as building it."""
    out.action = int(d.action)  # type: ignore[assignment]  # same numbering as the enum
    out.reason = str(d.reason)
    out.detail = d.detail
    e, est = d.estimate, out.estimate
    est.network_ms = e.network_ms
    est.queue_ms = e.queue_ms
    est.prefill_ms = e.prefill_ms
    est.decode_ms = e.decode_ms
    est.total_ms = e.total_ms
    est.budget_ms = e.budget_ms
    est.cached_tokens = e.cached_tokens
    out.region = d.region
    out.replica = d.replica
    out.endpoint = d.endpoint
    out.model = d.model
    out.version = d.version
    out.triton_model_name = d.triton_model_name
    out.triton_model_version = d.triton_model_version
    out.retry_after_ms = d.retry_after_ms
    out.queue_ms = d.queue_ms
    if d.degrade is not None:
        out.degrade.fallback_model = d.degrade.fallback_model
        out.degrade.max_tokens = d.degrade.max_tokens
    if d.ticket is not None:
        _write_ticket(out.ticket, d.ticket, clocks)


# -- region summaries -----------------------------------------------------------------------


def summary_to_proto(
    s: NeighbourSummary, clocks: Clocks, models: frozenset[str] = frozenset()
) -> common_pb2.RegionSummary:
    """This region's summary for peers; `models` (non-empty) keeps only those model ids."""
    out = common_pb2.RegionSummary(
        region=s.region,
        time=clocks.to_wire(s.time),
        sequence=s.sequence,
        instance=s.instance,
        residency_zone=s.residency_zone,
        healthy_replicas=s.healthy_replicas,
        queue_depth=s.queue_depth,
        overflow_in_total=s.overflow_in_total,
        overflow_out_total=s.overflow_out_total,
        registry_revision=s.registry_revision,
    )
    for h in s.models:
        if models and h.model not in models:
            continue
        out.models.append(
            common_pb2.ModelHeadroom(
                model=h.model,
                version=h.version,
                healthy_replicas=h.healthy_replicas,
                free_slots=h.free_slots,
                headroom_ratio=h.headroom_ratio,
                predicted_queue_ms=h.predicted_queue_ms,
                queue_depth=h.queue_depth,
                prefill_ms_per_1k_tokens=h.prefill_ms_per_1k_tokens,
                itl_ms=h.itl_ms,
            )
        )
    return out


def summary_from_proto(s: common_pb2.RegionSummary, clocks: Clocks) -> NeighbourSummary:
    """A peer's summary on this admission's clock (its age is what matters)."""
    return NeighbourSummary(
        region=s.region,
        time=min(clocks.to_mono(s.time), clocks.mono),
        residency_zone=s.residency_zone,
        healthy_replicas=s.healthy_replicas,
        queue_depth=s.queue_depth,
        models=tuple(
            ModelHeadroom(
                model=h.model,
                version=h.version,
                healthy_replicas=h.healthy_replicas,
                free_slots=h.free_slots,
                headroom_ratio=h.headroom_ratio,
                predicted_queue_ms=h.predicted_queue_ms,
                queue_depth=h.queue_depth,
                prefill_ms_per_1k_tokens=h.prefill_ms_per_1k_tokens,
                itl_ms=h.itl_ms,
            )
            for h in s.models
        ),
        sequence=s.sequence,
        instance=s.instance,
        overflow_in_total=s.overflow_in_total,
        overflow_out_total=s.overflow_out_total,
        registry_revision=s.registry_revision,
    )
