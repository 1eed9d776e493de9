"""The control plane's inputs as small typed values: which node asks, and what the mesh looks like.

`mesh_view(state, summaries)` condenses registry state (regions, replicas) and the regions'
latest RegionSummary into a `MeshView`; the snapshot builder reads only that view, so it
never depends on registry storage details.

Instances per region: one gateway (`Region.gateway_endpoint`, `gateway_http_endpoint`)
and one or more admissions (`Region.admission_endpoints`, else `admission_endpoint`); the
admission cluster ring-hashes `x-session-id` over all of them.

A region is *draining* when the operator drained it (`Region.draining`) or when it has
replicas and every one of them is DRAINING. Its gateways then reach Envoy as DRAINING, so
its ingress spills to the next priority and peers stop overflowing to it.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from spillgate._proto import common_pb2, registry_pb2
from spillgate.registry.store import Key
from spillgate.registry.validate import admission_endpoints

ADMISSION_SERVICE = "spillgate.v1.AdmissionService"
TRITON_SERVICE = "inference.GRPCInferenceService"


class Role(enum.StrEnum):
    """What an Envoy node is for."""

    # A region's public front door: gRPC + HTTP to the region's gateways (others by RTT).
    INGRESS = "ingress"
    # A region's egress for gateway -> gateway overflow hops, its admission and replicas.
    MESH = "mesh"


class Mode(enum.StrEnum):
    """`local` adds a fixed delay equal to the RTT on inter-region routes."""

    LOCAL = "local"
    PROD = "prod"


class NodeIdError(ValueError):
    """A node id that is not `<role>-<region>`."""


@dataclass(frozen=True)
class NodeInfo:
    """One Envoy node: its region, role and the ports its listeners bind.

    The node id is `<role>-<region>` ("ingress-us", "mesh-eu"). Listener ports cannot be 0
    (LDS gives Envoy concrete addresses), so whoever starts Envoy picks them and passes
    them in the node metadata (`grpc_port`, `http_port`; see envoy/bootstrap.yaml).
    `http_port` 0 = no HTTP listener (always so for mesh nodes).
    """

    region: str
    role: Role
    grpc_port: int
    http_port: int = 0
    host: str = "127.0.0.1"

    @property
    def id(self) -> str:
        return node_id(self.role, self.region)

    @staticmethod
    def parse_id(value: str) -> tuple[Role, str]:
        """`ingress-us` -> (Role.INGRESS, "us"); NodeIdError otherwise."""
        role, sep, region = value.partition("-")
        if not sep or not region or role not in {r.value for r in Role}:
            raise NodeIdError(f"node id {value!r} is not <ingress|mesh>-<region>")
        return Role(role), region


def node_id(role: Role, region: str) -> str:
    return f"{role.value}-{region}"


class Health(enum.Enum):
    """What the builder tells Envoy about an endpoint (EDS health_status)."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


@dataclass(frozen=True, order=True)
class EndpointView:
    address: str  # "ip:port"
    health: Health = Health.HEALTHY


@dataclass(frozen=True)
class RegionView:
    """One region as the builder needs it."""

    id: str
    residency_zone: str
    rtt_ms: Mapping[str, float]
    gateways: tuple[EndpointView, ...]
    admissions: tuple[EndpointView, ...]
    replicas: tuple[EndpointView, ...]
    # Gateway OpenAI HTTP endpoints (`Region.gateway_http_endpoint`).
    gateways_http: tuple[EndpointView, ...] = ()
    draining: bool = False
    # Mean headroom_ratio over the models of the region's last fresh summary; 0 = unknown,
    # stale or saturated (DESIGN.md principle 6: missing signals count as saturation).
    headroom: float = 0.0

    def rtt_to(self, other: RegionView) -> float:
        """RTT in ms as measured by this region, else by the other one, else infinity."""
        if other.id in self.rtt_ms:
            return self.rtt_ms[other.id]
        return other.rtt_ms.get(self.id, math.inf)


@dataclass(frozen=True)
class MeshView:
    regions: Mapping[str, RegionView]
    # Registry entries the builder had to leave out (e.g. an endpoint that is not ip:port).
    skipped: tuple[str, ...] = field(default=())


_HEALTH_BY_STATE = {
    common_pb2.REPLICA_STATE_READY: Health.HEALTHY,
    common_pb2.REPLICA_STATE_DRAINING: Health.DRAINING,
}


def is_ip_endpoint(address: str) -> bool:
    """Whether `address` is `ip:port` (Envoy takes only IP literals in EDS endpoints)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def mesh_view(
    state: Mapping[Key, registry_pb2.Entity],
    summaries: Mapping[str, common_pb2.RegionSummary],
    gateways_http: Mapping[str, str] | None = None,
) -> MeshView:
    """Condense registry state + fresh summaries (by region id) into a MeshView.

    Pure. The caller drops stale summaries first (the builder has no clock).
    `gateways_http` maps region id -> the gateway's OpenAI HTTP address; it overrides the
    registry's `Region.gateway_http_endpoint` (for gateways registered without it).
    """
    skipped: list[str] = []
    regions: list[registry_pb2.Region] = []
    replicas: dict[str, list[EndpointView]] = {}
    for key in sorted(state):
        entity = state[key]
        which = entity.WhichOneof("entity")
        if which == "region":
            regions.append(entity.region)
        elif which == "replica":
            r = entity.replica
            if not is_ip_endpoint(r.endpoint):
                skipped.append(f"replica {r.id}: endpoint {r.endpoint!r} is not ip:port")
                continue
            health = _HEALTH_BY_STATE.get(r.state, Health.UNHEALTHY)
            replicas.setdefault(r.region, []).append(EndpointView(r.endpoint, health))

    def endpoints(
        what: str, region: str, addresses: Iterable[str], health: Health
    ) -> tuple[EndpointView, ...]:
        out = []
        for address in addresses:
            if is_ip_endpoint(address):
                out.append(EndpointView(address, health))
            elif address:
                skipped.append(f"region {region}: {what} {address!r} is not ip:port")
        return tuple(out)

    views: dict[str, RegionView] = {}
    for region in regions:
        own = tuple(sorted(replicas.get(region.id, ())))
        draining = region.draining or (bool(own) and all(r.health is Health.DRAINING for r in own))
        gateway_health = Health.DRAINING if draining else Health.HEALTHY
        summary = summaries.get(region.id)
        headroom = 0.0
        if summary is not None and summary.models:
            ratios = [min(1.0, max(0.0, m.headroom_ratio)) for m in summary.models]
            headroom = sum(ratios) / len(ratios)
        http = (gateways_http or {}).get(region.id) or region.gateway_http_endpoint
        views[region.id] = RegionView(
            id=region.id,
            residency_zone=region.residency_zone,
            rtt_ms=dict(sorted(region.rtt_ms.items())),
            gateways=endpoints("gateway", region.id, [region.gateway_endpoint], gateway_health),
            admissions=endpoints(
                "admission", region.id, admission_endpoints(region), Health.HEALTHY
            ),
            replicas=own,
            gateways_http=endpoints("gateway http", region.id, [http], gateway_health),
            draining=draining,
            headroom=headroom,
        )
    return MeshView(views, tuple(skipped))
