"""Small constructors for the Envoy v3 resources the snapshot builder emits.

Each function returns one protobuf message and does no I/O. Values that are policy (limits,
intervals) come in through `BuildConfig` (snapshot.py); what is fixed here is protocol glue
(HTTP/2 upstreams for gRPC, ADS config sources, filter names).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from spillgate.controlplane.view import EndpointView, Health

FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Header a gateway sets to pick the replica Envoy must use (falls back to round robin when
# the host is unknown); see DESIGN.md "Verified facts".
DESTINATION_ENDPOINT_HEADER = "x-gateway-destination-endpoint"

_EDS_HEALTH = {
    Health.HEALTHY: health_check_pb2.HEALTHY,
    Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
    Health.DRAINING: health_check_pb2.DRAINING,
}


def pack(message: Message) -> any_pb2.Any:
    """Any with deterministic bytes, so equal content hashes equal."""
    out = any_pb2.Any()
    out.Pack(message, deterministic=True)
    return out


def duration_ms(ms: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(ms * 1_000_000))
    return d


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def socket_address(address: str) -> address_pb2.Address:
    host, _, port = address.rpartition(":")
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host.strip("[]"), port_value=int(port))
    )


# -- clusters ---------------------------------------------------------------------------------


def eds_cluster(
    name: str,
    *,
    connect_timeout_ms: int,
    circuit_breakers: circuit_breaker_pb2.CircuitBreakers,
) -> cluster_pb2.Cluster:
    """An EDS cluster over ADS whose upstreams speak HTTP/2 (gRPC)."""
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration_ms(connect_timeout_ms),
        circuit_breakers=circuit_breakers,
    )
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(http2))
    return cluster


def http1_eds_cluster(
    name: str, *, connect_timeout_ms: int, circuit_breakers: circuit_breaker_pb2.CircuitBreakers
) -> cluster_pb2.Cluster:
    """An EDS cluster over ADS for plain HTTP/1.1 upstreams (the gateway's OpenAI API)."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration_ms(connect_timeout_ms),
        circuit_breakers=circuit_breakers,
    )


def thresholds(
    max_connections: int, max_pending: int, max_requests: int, max_retries: int
) -> circuit_breaker_pb2.CircuitBreakers:
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                priority=base_pb2.DEFAULT,
                max_connections=wrappers_pb2.UInt32Value(value=max_connections),
                max_pending_requests=wrappers_pb2.UInt32Value(value=max_pending),
                max_requests=wrappers_pb2.UInt32Value(value=max_requests),
                max_retries=wrappers_pb2.UInt32Value(value=max_retries),
            )
        ]
    )


def outlier_detection(
    consecutive_5xx: int, interval_ms: int, base_ejection_ms: int
) -> outlier_detection_pb2.OutlierDetection:
    """Eject on consecutive failures (gRPC UNAVAILABLE counts as 5xx). 100% may be ejected,
    so a region whose gateways all fail is skipped through priorities."""
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=consecutive_5xx),
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=consecutive_5xx),
        enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
        interval=duration_ms(interval_ms),
        base_ejection_time=duration_ms(base_ejection_ms),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
    )


def grpc_health_check(interval_ms: int) -> health_check_pb2.HealthCheck:
    """grpc.health.v1 checks, also while the cluster is idle (no_traffic_interval)."""
    return health_check_pb2.HealthCheck(
        timeout=duration_ms(interval_ms),
        interval=duration_ms(interval_ms),
        no_traffic_interval=duration_ms(interval_ms),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=2),
        healthy_threshold=wrappers_pb2.UInt32Value(value=1),
        grpc_health_check=health_check_pb2.HealthCheck.GrpcHealthCheck(),
    )


def _policy(name: str, config: Message) -> cluster_pb2.LoadBalancingPolicy:
    return cluster_pb2.LoadBalancingPolicy(
        policies=[
            cluster_pb2.LoadBalancingPolicy.Policy(
                typed_extension_config=extension_pb2.TypedExtensionConfig(
                    name=name, typed_config=pack(config)
                )
            )
        ]
    )


def override_host_policy(
    header: str = DESTINATION_ENDPOINT_HEADER, hash_balance_factor: int = 0
) -> cluster_pb2.LoadBalancingPolicy:
    """Use the host named in `header`, else round robin; with `hash_balance_factor`, else
    ring hash with that bounded load (the route's hash policy supplies the key)."""
    if hash_balance_factor:
        ring = ring_hash_pb2.RingHash()
        ring.consistent_hashing_lb_config.hash_balance_factor.value = hash_balance_factor
        fallback = _policy("envoy.load_balancing_policies.ring_hash", ring)
    else:
        rr = round_robin_pb2.RoundRobin()
        fallback = _policy("envoy.load_balancing_policies.round_robin", rr)
    override = override_host_pb2.OverrideHost(
        override_host_sources=[override_host_pb2.OverrideHost.OverrideHostSource(header=header)],
        fallback_policy=fallback,
    )
    return _policy("envoy.load_balancing_policies.override_host", override)


# -- endpoints --------------------------------------------------------------------------------


def locality_endpoints(
    region: str, priority: int, weight: int, endpoints: Sequence[EndpointView]
) -> endpoint_components_pb2.LocalityLbEndpoints:
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(region=region),
        priority=priority,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
        lb_endpoints=[
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=socket_address(e.address)),
                health_status=_EDS_HEALTH[e.health],
            )
            for e in sorted(endpoints)
        ],
    )


def assignment(
    cluster: str,
    localities: Sequence[endpoint_components_pb2.LocalityLbEndpoints],
    overprovisioning_factor: int,
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=localities,
        policy=endpoint_pb2.ClusterLoadAssignment.Policy(
            overprovisioning_factor=wrappers_pb2.UInt32Value(value=overprovisioning_factor)
        ),
    )


# -- routes and listeners ---------------------------------------------------------------------


def grpc_route(
    cluster: str,
    *,
    prefix: str = "/",
    header: tuple[str, str] | None = None,
    hash_header: str = "",
    delay_ms: float = 0.0,
    upstream_host_header: str = "",
) -> route_components_pb2.Route:
    """A route for gRPC calls of any length (streams included).

    The route timeout is off (a Chat stream may run for minutes); the caller's own gRPC
    deadline (grpc-timeout header) bounds each call instead. `delay_ms` adds a fixed fault
    delay (local mode's emulated RTT).
    """
    match = route_components_pb2.RouteMatch(prefix=prefix)
    if header is not None:
        match.headers.append(
            route_components_pb2.HeaderMatcher(
                name=header[0], string_match=string_pb2.StringMatcher(exact=header[1])
            )
        )
    action = route_components_pb2.RouteAction(
        cluster=cluster,
        timeout=duration_ms(0),
        max_stream_duration=route_components_pb2.RouteAction.MaxStreamDuration(
            grpc_timeout_header_max=duration_ms(0)
        ),
    )
    if hash_header:
        action.hash_policy.append(
            route_components_pb2.RouteAction.HashPolicy(
                header=route_components_pb2.RouteAction.HashPolicy.Header(header_name=hash_header)
            )
        )
    route = route_components_pb2.Route(name=f"{cluster}{prefix}", match=match, route=action)
    if upstream_host_header:
        # Tells the caller which host served it (ip:port), so its follow-up calls can name
        # that host (override_host_policy).
        route.response_headers_to_add.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(
                    key=upstream_host_header, value="%UPSTREAM_REMOTE_ADDRESS%"
                ),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    if delay_ms > 0:
        fault = fault_pb2.HTTPFault(
            delay=common_fault_pb2.FaultDelay(
                fixed_delay=duration_ms(delay_ms),
                percentage=percent_pb2.FractionalPercent(
                    numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
                ),
            )
        )
        route.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(fault))
    return route


def unavailable_route(message: str) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name="unavailable",
        match=route_components_pb2.RouteMatch(prefix="/"),
        direct_response=route_components_pb2.DirectResponseAction(
            status=503, body=base_pb2.DataSource(inline_string=message)
        ),
    )


def route_config(
    name: str,
    routes: Sequence[route_components_pb2.Route],
    strip_headers: Sequence[str] = (),
) -> route_pb2.RouteConfiguration:
    """`routes` on any host; `strip_headers` are removed from every request first (an
    ingress drops headers only spillgate's own hops may set)."""
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=["*"], routes=routes)],
        request_headers_to_remove=list(strip_headers),
    )


def listener(name: str, host: str, port: int, route_name: str) -> listener_pb2.Listener:
    """An HTTP listener (HTTP/1.1 and HTTP/2, so gRPC too) whose routes come from RDS.

    The fault filter is always present but does nothing unless a route configures it.
    """
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=route_name),
        http_filters=[
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())),
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router())),
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=host, port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(manager))
                ]
            )
        ],
    )


def route_config_name(listener: listener_pb2.Listener) -> list[str]:
    """RDS names the listener's HTTP connection managers refer to."""
    names = []
    for chain in listener.filter_chains:
        for f in chain.filters:
            if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                manager = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(manager)
                if manager.HasField("rds"):
                    names.append(manager.rds.route_config_name)
    return names
