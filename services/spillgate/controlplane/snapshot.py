"""Pure Envoy snapshot builder: (registry state, region summaries, mode, node) -> Snapshot.

Modelled on go-control-plane's cache: a Snapshot is immutable, holds every resource a node
gets (clusters, endpoints, listeners, routes) by type and name, and carries one version per
type that is a hash of that type's content, so rebuilding from the same input yields the
same versions and an unchanged type is never re-sent. `check_consistent` proves references
resolve before a snapshot may be served.

What a node gets (names in parentheses):

ingress-<R> (a region's front door)
  listeners `ingress_grpc` (+ `ingress_http` when the region's gateway HTTP address is known)
  cluster `ingress_gateway`: R's gateways at priority 0, every other region's at 1..n by RTT
    from R; one locality per region weighted by live headroom; outlier detection, active
    gRPC health checks and circuit breakers. A region whose gateways all fail (or that is
    draining) is skipped through priorities.
  cluster `admission|R`: R's admission instances. An Admit is ring-hashed on `x-session-id`
    with a hash balance factor (bounded load); the route answers with the instance it
    reached in `x-spillgate-admission-host`, and a RenewTicket/Release that sends that
    header back goes to exactly that instance (override_host), where the ticket lives.
mesh-<R> (the egress R's gateway uses for overflow hops; also its admission and replicas)
  listener `mesh`: a call with `x-spillgate-destination-region: R2` goes to `gateway|R2`,
    whose circuit breakers cap the spill from R to R2; in local mode the route delays each
    call by RTT(R, R2) so one machine feels like several regions. Triton calls go to
    `replicas|R` (override_host on `x-gateway-destination-endpoint`, else round robin),
    admission calls to `admission|R` (as on the ingress; gateways with several admission
    instances in their region reach them this way).

Endpoint health: replica READY -> HEALTHY, DRAINING -> DRAINING, anything else -> UNHEALTHY;
a draining region's gateways -> DRAINING (view.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf.message import Message

from spillgate._proto import common_pb2, registry_pb2
from spillgate.controlplane import resources as res
from spillgate.controlplane.view import (
    ADMISSION_SERVICE,
    TRITON_SERVICE,
    MeshView,
    Mode,
    NodeInfo,
    RegionView,
    Role,
    mesh_view,
)
from spillgate.registry.store import Key

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# The order a change is pushed in: a cluster before its endpoints, a listener before its
# routes (and after the clusters its routes name).
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

DESTINATION_REGION_HEADER = "x-spillgate-destination-region"
SESSION_HEADER = "x-session-id"
# The admission instance (ip:port) that answered an Admit, in its response headers; the
# caller sends it back on RenewTicket/Release to reach the instance holding the ticket.
ADMISSION_HOST_HEADER = "x-spillgate-admission-host"
# Set only by gateways on region-to-region hops: a client must not claim to be a hop (a
# request with hops >= 1 is never overflowed) or pick its origin region.
HOP_HEADERS = ("x-spillgate-hops", "x-spillgate-origin-region")
INGRESS_GATEWAY = "ingress_gateway"
INGRESS_GATEWAY_HTTP = "ingress_gateway_http"


def gateway_cluster(region: str) -> str:
    return f"gateway|{region}"


def admission_cluster(region: str) -> str:
    return f"admission|{region}"


def replicas_cluster(region: str) -> str:
    return f"replicas|{region}"


@dataclass(frozen=True)
class BuildConfig:
    """Policy knobs of the generated config (defaults sized for one host; tune per fleet)."""

    connect_timeout_ms: int = 1_000
    # Priority spill: with 140, priority 0 keeps all traffic while >= 1/1.4 of it is healthy.
    overprovisioning_factor: int = 140
    # Ingress gateway cluster limits (a safety net, not admission control).
    ingress_max_requests: int = 10_000
    ingress_max_pending: int = 1_000
    # Hard cap on concurrent overflow requests from this region to each neighbour.
    spill_max_requests: int = 64
    spill_max_pending: int = 64
    max_retries: int = 3
    outlier_consecutive_5xx: int = 5
    outlier_interval_ms: int = 1_000
    outlier_base_ejection_ms: int = 5_000
    health_check_interval_ms: int = 1_000
    # Ring hash bounded load: no admission instance takes more than 1.5x the average.
    hash_balance_factor: int = 150
    # Locality weight = max(1, headroom quantised to this many steps) ... see locality_weight.
    weight_steps: int = 20


def locality_weight(headroom: float, steps: int) -> int:
    """Headroom 0..1 -> locality weight 1..steps (quantised so small jitter is no change).

    Never 0: with locality_weighted_lb_config a locality without weight gets no traffic at
    all, and a saturated region must still take traffic when it is the only one left.
    """
    return max(1, round(max(0.0, min(1.0, headroom)) * steps))


@dataclass(frozen=True)
class Snapshot:
    """Every resource one node gets, by type URL then name, with per-type versions."""

    node: NodeInfo
    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str]
    # Hash over all types: changes when anything changes.
    version: str
    # Registry entries left out (not fatal; see MeshView.skipped).
    warnings: tuple[str, ...] = ()

    @staticmethod
    def of(
        node: NodeInfo, resources: Mapping[str, Iterable[Message]], warnings: Iterable[str] = ()
    ) -> Snapshot:
        """Index resources by name and compute content-hash versions."""
        by_type: dict[str, dict[str, Message]] = {}
        versions: dict[str, str] = {}
        overall = hashlib.sha256()
        for type_url in TYPE_ORDER:
            named: dict[str, Message] = {}
            for message in resources.get(type_url, ()):
                name = resource_name(message)
                if name in named:
                    raise InconsistentSnapshot([f"{_short(type_url)} {name!r} appears twice"])
                named[name] = message
            digest = hashlib.sha256()
            for name in sorted(named):
                digest.update(name.encode() + b"\0")
                digest.update(named[name].SerializeToString(deterministic=True) + b"\0")
            by_type[type_url] = {name: named[name] for name in sorted(named)}
            versions[type_url] = digest.hexdigest()[:16]
            overall.update(versions[type_url].encode())
        return Snapshot(node, by_type, versions, overall.hexdigest()[:16], tuple(warnings))

    def get(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, {})


class InconsistentSnapshot(ValueError):
    """A snapshot whose references do not resolve; `problems` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("inconsistent snapshot: " + "; ".join(problems))
        self.problems = problems


def resource_name(message: Message) -> str:
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return str(message.cluster_name)
    return str(getattr(message, "name"))  # noqa: B009 - every other xDS resource has .name


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def check_consistent(snapshot: Snapshot) -> None:
    """Raise InconsistentSnapshot unless every reference in `snapshot` resolves.

    Checked: each route's cluster exists; each EDS cluster has a load assignment and each
    assignment belongs to an EDS cluster; each listener's RDS name exists.
    """
    problems: list[str] = []
    clusters = snapshot.get(CLUSTER)
    assignments = snapshot.get(ENDPOINT)
    routes = snapshot.get(ROUTE)
    eds = {
        name
        for name, c in clusters.items()
        if isinstance(c, cluster_pb2.Cluster) and c.type == cluster_pb2.Cluster.EDS
    }
    for name in sorted(eds - set(assignments)):
        problems.append(f"EDS cluster {name!r} has no load assignment")
    for name in sorted(set(assignments) - eds):
        problems.append(f"load assignment {name!r} has no EDS cluster")
    for name, rc in routes.items():
        assert isinstance(rc, route_pb2.RouteConfiguration)
        for vhost in rc.virtual_hosts:
            for route in vhost.routes:
                if route.HasField("route"):
                    targets = [route.route.cluster] if route.route.cluster else []
                    targets += [w.name for w in route.route.weighted_clusters.clusters]
                    for target in targets:
                        if target not in clusters:
                            problems.append(
                                f"route {name!r}/{route.name!r} names unknown cluster {target!r}"
                            )
    for name, lst in snapshot.get(LISTENER).items():
        assert isinstance(lst, listener_pb2.Listener)
        for rds in res.route_config_name(lst):
            if rds not in routes:
                problems.append(f"listener {name!r} names unknown route config {rds!r}")
    if problems:
        raise InconsistentSnapshot(problems)


# -- the builder ------------------------------------------------------------------------------


def build_snapshot(
    state: Mapping[Key, registry_pb2.Entity] | MeshView,
    summaries: Mapping[str, common_pb2.RegionSummary],
    mode: Mode,
    node: NodeInfo,
    config: BuildConfig | None = None,
    gateways_http: Mapping[str, str] | None = None,
) -> Snapshot:
    """The snapshot `node` should run, from registry state (or a MeshView) and summaries.

    Pure and deterministic. Summaries must already be filtered for freshness. A node whose
    region is not in the registry gets an empty snapshot (Envoy then serves nothing
    rather than stale routes). The result is not checked: call `check_consistent`.
    """
    cfg = config or BuildConfig()
    view = state if isinstance(state, MeshView) else mesh_view(state, summaries, gateways_http)
    own = view.regions.get(node.region)
    if own is None:
        return Snapshot.of(node, {}, (*view.skipped, f"region {node.region!r} is not registered"))
    if node.role is Role.INGRESS:
        out = _ingress(view, own, node, cfg)
    else:
        out = _mesh(view, own, node, mode, cfg)
    return Snapshot.of(node, out, view.skipped)


def _by_rtt(view: MeshView, own: RegionView) -> list[RegionView]:
    """Other regions, nearest first (unknown RTT last, ties by id)."""
    others = [r for r in view.regions.values() if r.id != own.id]
    return sorted(others, key=lambda r: (own.rtt_to(r), r.id))


def _admission(
    own: RegionView, cfg: BuildConfig
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]:
    name = admission_cluster(own.id)
    cluster = res.eds_cluster(
        name,
        connect_timeout_ms=cfg.connect_timeout_ms,
        circuit_breakers=res.thresholds(
            cfg.ingress_max_requests, cfg.ingress_max_pending, cfg.ingress_max_requests, 3
        ),
    )
    # Admit: ring hash on x-session-id with bounded load. RenewTicket/Release name the
    # instance that issued the ticket (ADMISSION_HOST_HEADER, from the Admit's response
    # headers), which bounded load alone could not promise.
    cluster.load_balancing_policy.CopyFrom(
        res.override_host_policy(ADMISSION_HOST_HEADER, cfg.hash_balance_factor)
    )
    cluster.outlier_detection.CopyFrom(
        res.outlier_detection(
            cfg.outlier_consecutive_5xx, cfg.outlier_interval_ms, cfg.outlier_base_ejection_ms
        )
    )
    cla = res.assignment(
        name, [res.locality_endpoints(own.id, 0, 1, own.admissions)], cfg.overprovisioning_factor
    )
    return cluster, cla


def _admission_route(cluster: str) -> route_components_pb2.Route:
    return res.grpc_route(
        cluster,
        prefix=f"/{ADMISSION_SERVICE}/",
        hash_header=SESSION_HEADER,
        upstream_host_header=ADMISSION_HOST_HEADER,
    )


def _ingress(
    view: MeshView, own: RegionView, node: NodeInfo, cfg: BuildConfig
) -> dict[str, list[Message]]:
    limits = res.thresholds(
        cfg.ingress_max_requests, cfg.ingress_max_pending, cfg.ingress_max_requests, cfg.max_retries
    )
    ordered = [own, *_by_rtt(view, own)]
    out: dict[str, list[Message]] = {CLUSTER: [], ENDPOINT: [], LISTENER: [], ROUTE: []}

    def gateway_clusters(name: str, http2: bool, pick: str) -> None:
        make = res.eds_cluster if http2 else res.http1_eds_cluster
        cluster = make(name, connect_timeout_ms=cfg.connect_timeout_ms, circuit_breakers=limits)
        cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
        cluster.common_lb_config.locality_weighted_lb_config.SetInParent()
        cluster.outlier_detection.CopyFrom(
            res.outlier_detection(
                cfg.outlier_consecutive_5xx, cfg.outlier_interval_ms, cfg.outlier_base_ejection_ms
            )
        )
        if http2:
            cluster.health_checks.append(res.grpc_health_check(cfg.health_check_interval_ms))
        localities: list[Message] = []
        # Priorities stay contiguous: regions without endpoints take no priority number.
        for region in ordered:
            endpoints = region.gateways if pick == "grpc" else region.gateways_http
            if endpoints:
                weight = locality_weight(region.headroom, cfg.weight_steps)
                localities.append(
                    res.locality_endpoints(region.id, len(localities), weight, endpoints)
                )
        out[CLUSTER].append(cluster)
        out[ENDPOINT].append(res.assignment(name, localities, cfg.overprovisioning_factor))

    gateway_clusters(INGRESS_GATEWAY, True, "grpc")
    admission, admission_cla = _admission(own, cfg)
    out[CLUSTER].append(admission)
    out[ENDPOINT].append(admission_cla)
    out[ROUTE].append(
        res.route_config(
            "ingress_grpc",
            [
                _admission_route(admission.name),
                res.grpc_route(INGRESS_GATEWAY),
            ],
            strip_headers=HOP_HEADERS,
        )
    )
    out[LISTENER].append(res.listener("ingress_grpc", node.host, node.grpc_port, "ingress_grpc"))
    if node.http_port:
        if any(r.gateways_http for r in ordered):
            gateway_clusters(INGRESS_GATEWAY_HTTP, False, "http")
            http_routes = [res.grpc_route(INGRESS_GATEWAY_HTTP)]
        else:
            http_routes = [res.unavailable_route("no gateway HTTP endpoint is known")]
        out[ROUTE].append(res.route_config("ingress_http", http_routes, HOP_HEADERS))
        out[LISTENER].append(
            res.listener("ingress_http", node.host, node.http_port, "ingress_http")
        )
    return out


def _mesh(
    view: MeshView, own: RegionView, node: NodeInfo, mode: Mode, cfg: BuildConfig
) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = {CLUSTER: [], ENDPOINT: [], LISTENER: [], ROUTE: []}
    routes = []
    spill = res.thresholds(
        cfg.spill_max_requests, cfg.spill_max_pending, cfg.spill_max_requests, cfg.max_retries
    )
    for peer in _by_rtt(view, own):
        if not peer.gateways:
            continue
        name = gateway_cluster(peer.id)
        cluster = res.eds_cluster(
            name, connect_timeout_ms=cfg.connect_timeout_ms, circuit_breakers=spill
        )
        cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
        cluster.outlier_detection.CopyFrom(
            res.outlier_detection(
                cfg.outlier_consecutive_5xx, cfg.outlier_interval_ms, cfg.outlier_base_ejection_ms
            )
        )
        out[CLUSTER].append(cluster)
        out[ENDPOINT].append(
            res.assignment(
                name,
                [res.locality_endpoints(peer.id, 0, 1, peer.gateways)],
                cfg.overprovisioning_factor,
            )
        )
        rtt = own.rtt_to(peer)
        delay = rtt if mode is Mode.LOCAL and rtt != float("inf") else 0.0
        routes.append(
            res.grpc_route(name, header=(DESTINATION_REGION_HEADER, peer.id), delay_ms=delay)
        )
    replicas = replicas_cluster(own.id)
    cluster = res.eds_cluster(
        replicas,
        connect_timeout_ms=cfg.connect_timeout_ms,
        circuit_breakers=res.thresholds(
            cfg.ingress_max_requests, cfg.ingress_max_pending, cfg.ingress_max_requests, 3
        ),
    )
    cluster.load_balancing_policy.CopyFrom(res.override_host_policy())
    out[CLUSTER].append(cluster)
    out[ENDPOINT].append(
        res.assignment(
            replicas,
            [res.locality_endpoints(own.id, 0, 1, own.replicas)],
            cfg.overprovisioning_factor,
        )
    )
    admission, admission_cla = _admission(own, cfg)
    out[CLUSTER].append(admission)
    out[ENDPOINT].append(admission_cla)
    routes.append(res.grpc_route(replicas, prefix=f"/{TRITON_SERVICE}/"))
    routes.append(_admission_route(admission.name))
    out[ROUTE].append(res.route_config("mesh", routes))
    out[LISTENER].append(res.listener("mesh", node.host, node.grpc_port, "mesh"))
    return out
