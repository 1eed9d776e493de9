"""A real Envoy driven by the ADS server, in front of real gateways, admissions and replicas.

Two regions (us with two replicas, eu with one) share one registry. Most tests run the ADS
server in this process (on its own event loop thread) and set snapshots directly; the last
one runs `spillgate controlplane serve` as a process following the registry.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from spillgate._proto import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2
from spillgate.controlplane.ads import start_server
from spillgate.controlplane.cache import NodeStatus, SnapshotCache
from spillgate.controlplane.envoy import Bootstrap, EnvoyProcess, free_port
from spillgate.controlplane.metrics import ControlPlaneHTTP
from spillgate.controlplane.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    TYPE_ORDER,
    BuildConfig,
    Snapshot,
    build_snapshot,
)
from spillgate.controlplane.view import Mode, NodeInfo, Role
from spillgate.registry.store import Key
from tests.conftest import ServiceProcess, eventually, start_replica, start_service
from tests.fleet_helpers import (
    LOADED,
    Fleet,
    apply,
    replica,
    start_admission,
    start_fleet,
    start_gateway,
    state,
    wait_serving,
)

T = TypeVar("T")
RTT_MS = 80.0
_CP_READY = re.compile(r"spillgate controlplane ready grpc=(\S+)(?: metrics=(\S+))?")


class AdsThread:
    """The ADS server on its own event loop thread, so tests can block while it serves."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.cache = self.call(SnapshotCache)

        async def start() -> tuple[grpc.aio.Server, int]:
            return await start_server(self.cache)

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result()

    def call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def set(self, snapshot: Snapshot) -> None:
        self.call(lambda: self.cache.set(snapshot.node.id, snapshot))

    def status(self, node_id: str) -> NodeStatus:
        return self.call(lambda: self.cache.status(node_id))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


class Mesh:
    """Fleet `us` (from start_fleet) plus region `eu`, both in one registry."""

    def __init__(self, tmp: Path) -> None:
        self.us: Fleet = start_fleet(tmp / "registry.db")
        self.eu: list[ServiceProcess] = []
        try:
            registry = self.us.registry.address
            rp = start_replica("--speed", "20")
            self.eu.append(rp)
            admission = start_admission("eu", registry)
            self.eu.append(admission)
            gateway = start_gateway("eu", registry, admission.ready[0])
            self.eu.append(gateway)
            self.entities = [e for e in self.us.entities if e.WhichOneof("entity") != "region"]
            self.regions = {
                "us": registry_pb2.Region(
                    id="us",
                    residency_zone="us",
                    rtt_ms={"eu": RTT_MS},
                    gateway_endpoint=self.us.gateway_address,
                    admission_endpoint=self.us.admission.ready[0],
                ),
                "eu": registry_pb2.Region(
                    id="eu",
                    residency_zone="eu",
                    rtt_ms={"us": RTT_MS},
                    gateway_endpoint=gateway.ready[0],
                    admission_endpoint=admission.ready[0],
                ),
            }
            self.entities += [registry_pb2.Entity(region=r) for r in self.regions.values()]
            self.entities.append(replica("eu-0", "eu", rp, LOADED))
            apply(registry, self.entities)
            wait_serving(admission.ready[0])
            wait_serving(gateway.ready[0])
        except BaseException:
            self.stop()
            raise

    @property
    def registry(self) -> str:
        return self.us.registry.address

    def state(
        self, draining: tuple[str, ...] = (), drained_regions: tuple[str, ...] = ()
    ) -> dict[Key, registry_pb2.Entity]:
        """Registry state with the named replicas DRAINING and regions drained (flag)."""
        out = state(self.entities)
        for key, entity in out.items():
            which = entity.WhichOneof("entity")
            if which == "replica" and entity.replica.id in draining:
                copy = registry_pb2.Entity()
                copy.CopyFrom(entity)
                copy.replica.state = common_pb2.REPLICA_STATE_DRAINING
                out[key] = copy
            elif which == "region" and entity.region.id in drained_regions:
                copy = registry_pb2.Entity()
                copy.CopyFrom(entity)
                copy.region.draining = True
                out[key] = copy
        return out

    def replica_endpoint(self, id: str) -> str:
        for e in self.entities:
            if e.WhichOneof("entity") == "replica" and e.replica.id == id:
                return str(e.replica.endpoint)
        raise KeyError(id)

    def stop(self) -> None:
        for proc in reversed(self.eu):
            proc.stop()
        self.us.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    yield m
    m.stop()


@pytest.fixture(scope="module")
def ads() -> Iterator[AdsThread]:
    server = AdsThread()
    yield server
    server.close()


@pytest.fixture
def envoys(tmp_path: Path) -> Iterator[Callable[[Bootstrap], EnvoyProcess]]:
    started: list[EnvoyProcess] = []

    def start(config: Bootstrap) -> EnvoyProcess:
        envoy = EnvoyProcess(config, tmp_path)
        started.append(envoy)
        envoy.start()
        return envoy

    yield start
    for envoy in started:
        envoy.stop()


def node(region: str, role: Role) -> NodeInfo:
    return NodeInfo(region, role, free_port(), free_port() if role is Role.INGRESS else 0)


def bootstrap(info: NodeInfo, xds: str) -> Bootstrap:
    return Bootstrap(info.region, info.role, xds, info.grpc_port, info.http_port)


def gateway_health(port: int, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply = stub.Health(gateway_pb2.HealthRequest(), timeout=5, metadata=metadata)
        return str(reply.region)


def server_live(port: int, n: int = 1) -> bool:
    """n Triton ServerLive calls; True when all say live (raises on a failed call)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return all(
            stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live for _ in range(n)
        )


def acked(ads: AdsThread, snapshot: Snapshot) -> bool:
    status = ads.status(snapshot.node.id)
    return all(status.acked.get(t) == snapshot.versions[t] for t in TYPE_ORDER)


def dynamic_names(envoy: EnvoyProcess) -> dict[str, set[str]]:
    """Active listener and cluster names in Envoy's config_dump."""
    dump = envoy.config_dump()
    names: dict[str, set[str]] = {"listeners": set(), "clusters": set(), "versions": set()}
    for config in dump["configs"]:  # type: ignore[attr-defined]
        for lst in config.get("dynamic_listeners", []):
            if "active_state" in lst:
                names["listeners"].add(lst["name"])
                names["versions"].add(lst["active_state"]["version_info"])
        for c in config.get("dynamic_active_clusters", []):
            names["clusters"].add(c["cluster"]["name"])
            names["versions"].add(c["version_info"])
    return names


def host_stats(envoy: EnvoyProcess, cluster: str) -> dict[str, dict[str, str]]:
    """/clusters for one cluster: host address -> {stat or flag: value}."""
    out: dict[str, dict[str, str]] = {}
    for line in envoy.get("/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and re.fullmatch(r"[\d.]+:\d+", parts[1]):
            out.setdefault(parts[1], {})[parts[2]] = parts[3]
    return out


def test_ingress_per_region_reaches_its_own_gateway(
    mesh: Mesh, ads: AdsThread, envoys: Callable[[Bootstrap], EnvoyProcess]
) -> None:
    xds = f"127.0.0.1:{ads.port}"
    for region in ("us", "eu"):
        info = node(region, Role.INGRESS)
        snapshot = build_snapshot(mesh.state(), {}, Mode.LOCAL, info)
        ads.set(snapshot)
        envoy = envoys(bootstrap(info, xds))
        envoy.wait_ready()
        eventually(lambda s=snapshot: acked(ads, s))  # type: ignore[misc]
        names = dynamic_names(envoy)
        assert names["listeners"] == {"ingress_grpc", "ingress_http"}
        assert names["clusters"] == {"ingress_gateway", f"admission|{region}"}
        assert names["versions"] <= {snapshot.versions[CLUSTER], snapshot.versions[LISTENER]}
        assert ads.status(info.id).nacks == 0
        # Health checks must pass before Envoy routes (priority 0 = this region's gateway).
        assert eventually(lambda p=info.grpc_port: gateway_health(p)) == region  # type: ignore[misc]


def test_draining_region_spills_to_next_priority(
    mesh: Mesh, ads: AdsThread, envoys: Callable[[Bootstrap], EnvoyProcess]
) -> None:
    info = node("us", Role.INGRESS)
    ads.set(build_snapshot(mesh.state(), {}, Mode.LOCAL, info))
    envoy = envoys(bootstrap(info, f"127.0.0.1:{ads.port}"))
    envoy.wait_ready()
    assert eventually(lambda: gateway_health(info.grpc_port)) == "us"
    ads.set(build_snapshot(mesh.state(draining=("us-0", "us-1")), {}, Mode.LOCAL, info))
    eventually(lambda: gateway_health(info.grpc_port) == "eu", timeout=5)
    assert {gateway_health(info.grpc_port) for _ in range(10)} == {"eu"}
    ads.set(build_snapshot(mesh.state(), {}, Mode.LOCAL, info))
    eventually(lambda: gateway_health(info.grpc_port) == "us", timeout=5)
    # The operator drains the whole region (Region.draining): same spill, replicas untouched.
    ads.set(build_snapshot(mesh.state(drained_regions=("us",)), {}, Mode.LOCAL, info))
    eventually(lambda: gateway_health(info.grpc_port) == "eu", timeout=5)
    assert {gateway_health(info.grpc_port) for _ in range(10)} == {"eu"}
    ads.set(build_snapshot(mesh.state(), {}, Mode.LOCAL, info))
    eventually(lambda: gateway_health(info.grpc_port) == "us", timeout=5)


def test_mesh_hop_goes_to_the_named_region_after_the_rtt(
    mesh: Mesh, ads: AdsThread, envoys: Callable[[Bootstrap], EnvoyProcess]
) -> None:
    info = node("us", Role.MESH)
    ads.set(build_snapshot(mesh.state(), {}, Mode.LOCAL, info))
    envoy = envoys(bootstrap(info, f"127.0.0.1:{ads.port}"))
    envoy.wait_ready()
    hop = (("x-spillgate-destination-region", "eu"),)
    assert eventually(lambda: gateway_health(info.grpc_port, hop)) == "eu"
    start = time.monotonic()
    assert gateway_health(info.grpc_port, hop) == "eu"
    assert time.monotonic() - start >= RTT_MS / 1000
    # Triton calls go to this region's replicas.
    assert server_live(info.grpc_port, 4)


def test_nack_keeps_the_previous_config_serving(
    mesh: Mesh, ads: AdsThread, envoys: Callable[[Bootstrap], EnvoyProcess]
) -> None:
    info = node("us", Role.INGRESS)
    # The control plane's metrics and status port, on the loop that owns the cache.
    http = ControlPlaneHTTP(ads.cache)
    port = asyncio.run_coroutine_threadsafe(http.start("127.0.0.1", 0), ads.loop).result(10)
    good = build_snapshot(mesh.state(), {}, Mode.LOCAL, info)
    ads.set(good)
    envoy = envoys(bootstrap(info, f"127.0.0.1:{ads.port}"))
    envoy.wait_ready()
    eventually(lambda: acked(ads, good))
    # Consistent (no references broken) but invalid for Envoy: a negative connect timeout.
    broken = cluster_pb2.Cluster(
        name="broken",
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=-1),
    )
    resources = {t: list(good.get(t).values()) for t in TYPE_ORDER}
    resources[CLUSTER].append(broken)
    bad = Snapshot.of(info, resources)
    ads.set(bad)
    eventually(lambda: ads.status(info.id).nacks > 0)
    status = ads.status(info.id)
    assert status.last_nack is not None and status.last_nack.type_url == CLUSTER
    assert bad.version in status.rejected
    assert status.acked[CLUSTER] == good.versions[CLUSTER]
    assert "broken" not in dynamic_names(envoy)["clusters"]
    assert eventually(lambda: gateway_health(info.grpc_port)) == "us"
    metrics = xds_metrics(port)
    assert metrics[("spillgate_xds_nacks_total", info.id)] == status.nacks >= 1
    assert metrics[("spillgate_xds_serving_last_good", info.id)] == 1.0
    assert metrics[("spillgate_xds_streams", info.id)] == 1.0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
        reported = json.loads(resp.read())[info.id]
    assert reported["last_nack"]["type_url"] == CLUSTER and reported["last_nack"]["message"]
    assert reported["accepted_version"] == good.version != reported["latest_version"]
    # The next good snapshot is pushed and accepted.
    fixed = build_snapshot(mesh.state(draining=("us-1",)), {}, Mode.LOCAL, info)
    ads.set(fixed)
    eventually(lambda: acked(ads, fixed))
    assert ads.status(info.id).nacks == status.nacks
    assert gateway_health(info.grpc_port) == "us"
    assert {ROUTE, ENDPOINT} <= set(ads.status(info.id).acked)
    assert xds_metrics(port)[("spillgate_xds_serving_last_good", info.id)] == 0.0
    asyncio.run_coroutine_threadsafe(http.stop(), ads.loop).result(10)


def xds_metrics(port: int) -> dict[tuple[str, str], float]:
    """(sample name, node) -> value from the control plane's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (sample.name, sample.labels["node"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "node" in sample.labels
    }


def start_controlplane(registry: str, port: int = 0) -> ServiceProcess:
    args = [
        "spillgate.controlplane.app",
        "serve",
        "--registry",
        registry,
        "--port",
        str(port),
        "--mode",
        "local",
        "--metrics-port",
        "0",
    ]
    return start_service(args, _CP_READY)


def test_controlplane_restart_resyncs_and_drain_reaches_envoy_within_a_second(
    mesh: Mesh, envoys: Callable[[Bootstrap], EnvoyProcess]
) -> None:
    cp = start_controlplane(mesh.registry)
    try:
        xds = cp.ready[0]
        info = node("us", Role.MESH)
        envoy = envoys(bootstrap(info, xds))
        envoy.wait_ready()
        eventually(lambda: server_live(info.grpc_port, 4))
        # Control plane gone: Envoy keeps serving its last config.
        cp.stop(signal.SIGKILL)
        assert server_live(info.grpc_port, 10)
        assert gateway_health(info.grpc_port, (("x-spillgate-destination-region", "eu"),)) == "eu"
        cp = start_controlplane(mesh.registry, int(xds.rsplit(":", 1)[1]))
        eventually(lambda: any("node mesh-us connected" in line for line in cp.output))
        eventually(lambda: "control_plane.connected_state: 1" in envoy.get("/stats"))
        metrics_port = int(cp.ready[1].rsplit(":", 1)[1])
        eventually(lambda: xds_metrics(metrics_port).get(("spillgate_xds_acks_total", info.id)))
        # Drain us-1 in the registry: Envoy marks it DRAINING within a second.
        drained = mesh.replica_endpoint("us-1")
        entity = mesh.state(draining=("us-1",))
        target = [e for e in entity.values() if e.WhichOneof("entity") == "replica"]
        start = time.monotonic()
        apply(mesh.registry, [e for e in target if e.replica.id == "us-1"])
        eventually(
            lambda: (
                "eds_status_draining"
                in host_stats(envoy, "replicas|us")[drained].get("health_flags", "")
            ),
            timeout=5,
            interval=0.01,
        )
        assert time.monotonic() - start < 1.0
        before = int(host_stats(envoy, "replicas|us")[drained]["rq_total"])
        assert server_live(info.grpc_port, 20)
        stats = host_stats(envoy, "replicas|us")
        assert int(stats[drained]["rq_total"]) == before
        assert sum(int(h["rq_total"]) for h in stats.values()) >= before + 20
        # Drain the whole eu region by its flag: its gateway reaches mesh-us as DRAINING
        # within a second too (overflow from us stops going there).
        drained_eu = mesh.state(drained_regions=("eu",))
        start = time.monotonic()
        apply(mesh.registry, [e for e in drained_eu.values() if e.WhichOneof("entity") == "region"])
        assert host_stats(envoy, "gateway|eu")  # eu's gateway is a host of mesh-us
        eventually(
            lambda: all(
                "eds_status_draining" in h.get("health_flags", "")
                for h in host_stats(envoy, "gateway|eu").values()
            ),
            timeout=5,
            interval=0.01,
        )
        assert time.monotonic() - start < 1.0
    finally:
        apply(
            mesh.registry,
            [e for e in mesh.entities if e.WhichOneof("entity") in ("replica", "region")],
        )
        cp.stop()
    print("".join(cp.output))
    assert not [line for line in cp.output if "Traceback" in line or " ERROR " in line]


def test_dump_prints_what_a_node_would_receive(mesh: Mesh) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "spillgate.cli",
            "controlplane",
            "dump",
            "--node",
            "mesh-us",
            "--registry",
            mesh.registry,
            "--mode",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    dumped = yaml.safe_load(out)
    expected = build_snapshot(mesh.state(), {}, Mode.LOCAL, NodeInfo("us", Role.MESH, 10000))
    assert dumped["node"] == "mesh-us"
    assert dumped["version"] == expected.version
    assert [c["name"] for c in dumped["Cluster"]] == list(expected.get(CLUSTER))
    assert dumped["Listener"][0]["address"]["socket_address"]["port_value"] == 10000


def test_the_mesh_circuit_breaker_caps_the_spill_to_a_region(
    mesh: Mesh, ads: AdsThread, envoys: Callable[[Bootstrap], EnvoyProcess]
) -> None:
    """At most `spill_max_requests` overflow streams to one neighbour at a time: the rest
    are refused by Envoy (x-envoy-overloaded), never queued onto the neighbour."""
    info = node("us", Role.MESH)
    capped = BuildConfig(spill_max_requests=1, spill_max_pending=1)
    ads.set(build_snapshot(mesh.state(), {}, Mode.LOCAL, info, capped))
    envoy = envoys(bootstrap(info, f"127.0.0.1:{ads.port}"))
    envoy.wait_ready()
    hop = (("x-spillgate-destination-region", "eu"),)
    assert eventually(lambda: gateway_health(info.grpc_port, hop)) == "eu"
    request = gateway_pb2.ChatRequest(
        model="chat",
        messages=[gateway_pb2.ChatMessage(role="user", content="spill")],
        max_tokens=120,
        budget_ms=60_000,
    )

    async def one(stub: gateway_pb2_grpc.GatewayServiceAsyncStub) -> str:
        try:
            async for _ in stub.Chat(request, metadata=hop, timeout=30):
                pass
        except grpc.aio.AioRpcError as exc:
            headers = [*(exc.initial_metadata() or ()), *(exc.trailing_metadata() or ())]
            overloaded = any(k == "x-envoy-overloaded" for k, _ in headers)
            return "refused" if overloaded else exc.code().name
        return "ok"

    async def burst() -> list[str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info.grpc_port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            return await asyncio.gather(*(one(stub) for _ in range(6)))

    outcomes = asyncio.run(burst())
    assert outcomes.count("ok") >= 1, outcomes
    assert outcomes.count("refused") >= 3, outcomes
    assert set(outcomes) <= {"ok", "refused"}, outcomes
