"""The pure snapshot builder: priorities, weights, draining, consistency, determinism."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2

from spillgate._proto import common_pb2, registry_pb2
from spillgate.controlplane.app import snapshot_yaml
from spillgate.controlplane.snapshot import (
    CLUSTER,
    ENDPOINT,
    INGRESS_GATEWAY,
    INGRESS_GATEWAY_HTTP,
    LISTENER,
    ROUTE,
    InconsistentSnapshot,
    Snapshot,
    build_snapshot,
    check_consistent,
)
from spillgate.controlplane.view import Mode, NodeInfo, Role
from spillgate.registry.store import REGION, Key, entity_key

RTT = {("us", "eu"): 80.0, ("us", "apac"): 150.0, ("eu", "apac"): 210.0}
PORTS = {"us": 1000, "eu": 2000, "apac": 3000}


def rtt(a: str, b: str) -> float:
    return RTT.get((a, b)) or RTT[(b, a)]


def world(
    draining: Sequence[str] = (), replica_states: dict[str, int] | None = None
) -> dict[Key, registry_pb2.Entity]:
    entities = []
    for region, base in PORTS.items():
        entities.append(
            registry_pb2.Entity(
                region=registry_pb2.Region(
                    id=region,
                    residency_zone=region,
                    rtt_ms={p: rtt(region, p) for p in PORTS if p != region},
                    gateway_endpoint=f"127.0.0.1:{base}",
                    admission_endpoint=f"127.0.0.1:{base + 1}",
                )
            )
        )
        for i in range(2):
            rid = f"{region}-{i}"
            state = (replica_states or {}).get(rid, common_pb2.REPLICA_STATE_READY)
            if region in draining:
                state = common_pb2.REPLICA_STATE_DRAINING
            entities.append(
                registry_pb2.Entity(
                    replica=registry_pb2.Replica(
                        id=rid,
                        region=region,
                        endpoint=f"127.0.0.1:{base + 10 + i}",
                        state=state,  # type: ignore[arg-type]
                    )
                )
            )
    return {entity_key(e): e for e in entities}


def summary(region: str, *ratios: float) -> common_pb2.RegionSummary:
    return common_pb2.RegionSummary(
        region=region,
        models=[
            common_pb2.ModelHeadroom(model=f"m{i}", headroom_ratio=r) for i, r in enumerate(ratios)
        ],
    )


INGRESS_US = NodeInfo("us", Role.INGRESS, 10000, 10001)
MESH_US = NodeInfo("us", Role.MESH, 10002)


def cla(snapshot: Snapshot, name: str) -> endpoint_pb2.ClusterLoadAssignment:
    out = snapshot.get(ENDPOINT)[name]
    assert isinstance(out, endpoint_pb2.ClusterLoadAssignment)
    return out


def test_ingress_priorities_follow_rtt() -> None:
    for region, expected in {
        "us": ["us", "eu", "apac"],
        "eu": ["eu", "us", "apac"],
        "apac": ["apac", "us", "eu"],
    }.items():
        node = NodeInfo(region, Role.INGRESS, 10000)
        snapshot = build_snapshot(world(), {}, Mode.PROD, node)
        check_consistent(snapshot)
        localities = cla(snapshot, INGRESS_GATEWAY).endpoints
        assert [(loc.locality.region, loc.priority) for loc in localities] == [
            (r, i) for i, r in enumerate(expected)
        ]


def test_locality_weights_follow_headroom_and_are_never_zero() -> None:
    summaries = {"us": summary("us", 1.0, 0.5), "eu": summary("eu", 0.0)}
    snapshot = build_snapshot(world(), summaries, Mode.PROD, INGRESS_US)
    weights = {
        loc.locality.region: loc.load_balancing_weight.value
        for loc in cla(snapshot, INGRESS_GATEWAY).endpoints
    }
    # us: mean headroom 0.75 of 20 steps; eu saturated and apac unknown: weight 1, not 0.
    assert weights == {"us": 15, "eu": 1, "apac": 1}
    cluster = snapshot.get(CLUSTER)[INGRESS_GATEWAY]
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.common_lb_config.HasField("locality_weighted_lb_config")
    assert cluster.outlier_detection.max_ejection_percent.value == 100
    assert cluster.circuit_breakers.thresholds[0].max_requests.value > 0


def test_draining_replica_and_region_reach_eds_as_draining() -> None:
    state = world(replica_states={"us-1": common_pb2.REPLICA_STATE_DRAINING})
    mesh = build_snapshot(state, {}, Mode.PROD, MESH_US)
    statuses = {
        e.endpoint.address.socket_address.port_value: e.health_status
        for e in cla(mesh, "replicas|us").endpoints[0].lb_endpoints
    }
    assert statuses == {1010: health_check_pb2.HEALTHY, 1011: health_check_pb2.DRAINING}
    # Every replica of eu draining: eu's gateway drains, in ingress and mesh alike.
    state = world(draining=["eu"])
    ingress = build_snapshot(state, {}, Mode.PROD, INGRESS_US)
    by_region = {
        loc.locality.region: loc.lb_endpoints[0].health_status
        for loc in cla(ingress, INGRESS_GATEWAY).endpoints
    }
    assert by_region == {
        "us": health_check_pb2.HEALTHY,
        "eu": health_check_pb2.DRAINING,
        "apac": health_check_pb2.HEALTHY,
    }
    mesh = build_snapshot(state, {}, Mode.PROD, MESH_US)
    assert cla(mesh, "gateway|eu").endpoints[0].lb_endpoints[0].health_status == (
        health_check_pb2.DRAINING
    )


def test_a_region_drained_by_its_flag_drains_its_gateways_though_its_replicas_serve() -> None:
    state = world()
    state[(REGION, "apac")].region.draining = True
    ingress = build_snapshot(state, {}, Mode.PROD, INGRESS_US)
    by_region = {
        loc.locality.region: loc.lb_endpoints[0].health_status
        for loc in cla(ingress, INGRESS_GATEWAY).endpoints
    }
    assert by_region["apac"] == health_check_pb2.DRAINING
    assert by_region["us"] == by_region["eu"] == health_check_pb2.HEALTHY
    own = build_snapshot(state, {}, Mode.PROD, NodeInfo("apac", Role.MESH, 10002))
    statuses = {e.health_status for e in cla(own, "replicas|apac").endpoints[0].lb_endpoints}
    assert statuses == {health_check_pb2.HEALTHY}  # running requests finish


def test_local_mode_delays_inter_region_routes_by_rtt() -> None:
    for mode, expected in ((Mode.LOCAL, {"eu": 80.0, "apac": 150.0}), (Mode.PROD, {})):
        snapshot = build_snapshot(world(), {}, mode, MESH_US)
        routes = snapshot.get(ROUTE)["mesh"]
        assert isinstance(routes, route_pb2.RouteConfiguration)
        delays = {}
        for route in routes.virtual_hosts[0].routes:
            if "envoy.filters.http.fault" in route.typed_per_filter_config:
                fault = fault_pb2.HTTPFault()
                route.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
                region = route.route.cluster.split("|")[1]
                delays[region] = fault.delay.fixed_delay.ToMilliseconds()
        assert delays == expected


def test_admission_cluster_hashes_sessions_with_bounded_load() -> None:
    snapshot = build_snapshot(world(), {}, Mode.PROD, INGRESS_US)
    cluster = snapshot.get(CLUSTER)["admission|us"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    # The host a Release names first (where its ticket lives), else ring hash, bounded load.
    policy = cluster.load_balancing_policy.policies[0].typed_extension_config
    override = override_host_pb2.OverrideHost()
    assert policy.typed_config.Unpack(override)
    assert [s.header for s in override.override_host_sources] == ["x-spillgate-admission-host"]
    fallback = override.fallback_policy.policies[0].typed_extension_config
    ring = ring_hash_pb2.RingHash()
    assert fallback.typed_config.Unpack(ring)
    assert ring.consistent_hashing_lb_config.hash_balance_factor.value == 150
    for node, name in ((INGRESS_US, "ingress_grpc"), (MESH_US, "mesh")):
        routes = build_snapshot(world(), {}, Mode.PROD, node).get(ROUTE)[name]
        assert isinstance(routes, route_pb2.RouteConfiguration)
        route = next(r for r in routes.virtual_hosts[0].routes if "admission" in r.route.cluster)
        assert route.route.cluster == "admission|us"
        assert route.route.hash_policy[0].header.header_name == "x-session-id"
        [added] = route.response_headers_to_add
        assert (added.header.key, added.header.value) == (
            "x-spillgate-admission-host",
            "%UPSTREAM_REMOTE_ADDRESS%",
        )


def test_every_admission_instance_of_a_region_is_an_endpoint() -> None:
    state = world()
    region = state[(REGION, "us")].region
    region.admission_endpoint = "127.0.0.1:7101"
    region.admission_endpoints.extend(["127.0.0.1:7101", "127.0.0.1:7102"])
    snapshot = build_snapshot(state, {}, Mode.PROD, MESH_US)
    cla = snapshot.get(ENDPOINT)["admission|us"]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    ports = [e.endpoint.address.socket_address.port_value for e in cla.endpoints[0].lb_endpoints]
    assert ports == [7101, 7102]


def test_builder_is_deterministic() -> None:
    summaries = {"us": summary("us", 0.4)}
    a = build_snapshot(world(), summaries, Mode.LOCAL, INGRESS_US)
    # Same content inserted in another order: same versions.
    b = build_snapshot(dict(reversed(list(world().items()))), summaries, Mode.LOCAL, INGRESS_US)
    assert a.version == b.version and a.versions == b.versions
    assert snapshot_yaml(a) == snapshot_yaml(b)
    # An endpoint-only change leaves the other types' versions alone.
    c = build_snapshot(world(), {"us": summary("us", 0.9)}, Mode.LOCAL, INGRESS_US)
    assert c.versions[ENDPOINT] != a.versions[ENDPOINT]
    assert {t: c.versions[t] for t in (CLUSTER, LISTENER, ROUTE)} == {
        t: a.versions[t] for t in (CLUSTER, LISTENER, ROUTE)
    }


def test_consistency_errors_name_the_broken_reference() -> None:
    good = build_snapshot(world(), {}, Mode.PROD, INGRESS_US)
    resources = {t: list(good.get(t).values()) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
    missing_cla = dict(resources, **{ENDPOINT: resources[ENDPOINT][1:]})
    with pytest.raises(InconsistentSnapshot, match="has no load assignment"):
        check_consistent(Snapshot.of(INGRESS_US, missing_cla))
    no_routes = dict(resources, **{ROUTE: []})
    with pytest.raises(InconsistentSnapshot, match="unknown route config 'ingress_grpc'"):
        check_consistent(Snapshot.of(INGRESS_US, no_routes))
    no_clusters = {ROUTE: resources[ROUTE]}
    with pytest.raises(InconsistentSnapshot, match="unknown cluster 'ingress_gateway'"):
        check_consistent(Snapshot.of(INGRESS_US, no_clusters))
    with pytest.raises(InconsistentSnapshot, match="appears twice"):
        Snapshot.of(INGRESS_US, {CLUSTER: resources[CLUSTER] * 2})


def test_unregistered_region_and_bad_endpoints() -> None:
    empty = build_snapshot(world(), {}, Mode.PROD, NodeInfo("mars", Role.INGRESS, 10000))
    check_consistent(empty)
    assert not any(empty.get(t) for t in (CLUSTER, LISTENER)) and empty.warnings
    state = world()
    bad = registry_pb2.Entity(
        replica=registry_pb2.Replica(id="us-9", region="us", endpoint="replica.local:8001")
    )
    state[entity_key(bad)] = bad
    snapshot = build_snapshot(state, {}, Mode.PROD, MESH_US)
    check_consistent(snapshot)
    assert any("us-9" in w for w in snapshot.warnings)


def test_gateway_http_endpoints_come_from_the_registry_and_the_override_wins() -> None:
    state = world()
    for entity in state.values():
        if entity.WhichOneof("entity") == "region":
            entity.region.gateway_http_endpoint = f"127.0.0.1:{PORTS[entity.region.id] + 5}"
    snapshot = build_snapshot(state, {}, Mode.PROD, INGRESS_US)
    check_consistent(snapshot)
    http = cla(snapshot, INGRESS_GATEWAY_HTTP).endpoints
    assert [(loc.locality.region, loc.priority) for loc in http] == [
        ("us", 0),
        ("eu", 1),
        ("apac", 2),
    ]
    assert http[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 1005
    # --gateway-http REGION=H:P still overrides what the registry says.
    override = build_snapshot(state, {}, Mode.PROD, INGRESS_US, None, {"us": "127.0.0.1:7"})
    us = cla(override, INGRESS_GATEWAY_HTTP).endpoints[0]
    assert us.lb_endpoints[0].endpoint.address.socket_address.port_value == 7
    # Without any HTTP endpoint the HTTP listener answers 503 (no cluster).
    assert INGRESS_GATEWAY_HTTP not in build_snapshot(world(), {}, Mode.PROD, INGRESS_US).get(
        CLUSTER
    )


def test_ingress_strips_the_headers_only_gateway_hops_may_set() -> None:
    """A client can't claim to be a hop (never overflowed) or pick its origin region."""
    node = NodeInfo("us", Role.INGRESS, 10000, 10001)
    ingress = build_snapshot(world(), {}, Mode.PROD, node, gateways_http={"us": "127.0.0.1:1"})
    for name in ("ingress_grpc", "ingress_http"):
        routes = ingress.get(ROUTE)[name]
        assert isinstance(routes, route_pb2.RouteConfiguration)
        assert list(routes.request_headers_to_remove) == [
            "x-spillgate-hops",
            "x-spillgate-origin-region",
        ]
    mesh = build_snapshot(world(), {}, Mode.PROD, MESH_US).get(ROUTE)["mesh"]
    assert isinstance(mesh, route_pb2.RouteConfiguration)
    assert not mesh.request_headers_to_remove  # hops between gateways keep them
