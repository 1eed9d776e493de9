"""Consul catalog mirroring: a registry process on `--store consul` registers leased
replicas as services of the agent, with a TTL check its heartbeats keep passing.

Against tests/consul_fake.py (a fake, not Consul) and, when CONSUL_HTTP_ADDR is set, a
real agent (each test uses its own KV prefix and service name, removed afterwards).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import consul  # type: ignore[import-untyped]
import grpc
import pytest
from consul_fake import FakeConsul

from spillgate._proto import common_pb2, registry_pb2, registry_pb2_grpc
from spillgate.registry.consul_catalog import ConsulCatalog, check_id
from tests.conftest import eventually, start_service
from tests.test_registry_service import _READY_LINE, Registry

CONSUL_SKIP = (
    "CONSUL_HTTP_ADDR not set: the real-Consul catalog run needs an agent "
    "(e.g. `consul agent -dev`, then CONSUL_HTTP_ADDR=127.0.0.1:8500)"
)
# Lease lengths per backend: a real agent's TTL timer is coarser than the fake's.
LEASE_MS = {"consul-fake": 400, "consul": 1_500}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeConsul]:
    # No one-minute floor on DeregisterCriticalServiceAfter, so reaping is testable.
    with FakeConsul(min_deregister_after_s=0) as f:
        yield f


@pytest.fixture(params=list(LEASE_MS))
def backend(request: pytest.FixtureRequest, fake: FakeConsul) -> tuple[str, str]:
    """(backend name, agent address); skips the real agent when none is configured."""
    name: str = request.param
    if name == "consul-fake":
        return name, fake.addr
    addr = os.environ.get("CONSUL_HTTP_ADDR", "")
    if not addr:
        pytest.skip(CONSUL_SKIP)
    return name, addr


def _client(addr: str) -> consul.Consul:
    parsed = urllib.parse.urlparse(addr if "//" in addr else "//" + addr)
    return consul.Consul(host=parsed.hostname, port=parsed.port, scheme=parsed.scheme or "http")


@contextlib.contextmanager
def agent(addr: str) -> Iterator[consul.Consul]:
    client = _client(addr)
    try:
        yield client
    finally:
        client.http.session.close()


@contextlib.contextmanager
def consul_registry(addr: str, *extra: str) -> Iterator[tuple[Registry, str]]:
    """A registry process on a fresh KV prefix and service name; (registry, service name)."""
    tag = uuid.uuid4().hex[:8]
    prefix, service = f"spillgate-test/{tag}/", f"spillgate-test-{tag}"
    args = ["spillgate.registry.app", "--store", "consul", "--consul-addr", addr]
    args += ["--consul-prefix", prefix, "--consul-service", service, "--port", "0"]
    args += ["--lease-check-ms", "20", *extra]
    sp = start_service(args, _READY_LINE, 20.0)
    reg = Registry(sp.proc, sp.ready, sp.output, sp.pump)
    try:
        yield reg, service
    finally:
        reg.stop()
        with agent(addr) as client:
            client.kv.delete(prefix, recurse=True)


def replica(id: str) -> registry_pb2.Replica:
    return registry_pb2.Replica(
        id=id,
        region="cat-r",
        pool="gpu",
        endpoint="127.0.0.1:8001",
        metrics_endpoint="http://127.0.0.1:8002/metrics",
        backend=common_pb2.BACKEND_KIND_TRITON,
        loaded=[common_pb2.VersionRef(model="m", version="v1")],
        gpu_type="H100-80GB",
        state=common_pb2.REPLICA_STATE_READY,
    )


def instances(addr: str, service: str) -> dict[str, dict[str, Any]]:
    """The service's instances in the health view: id -> {"Service": ..., "Checks": [...]}."""
    with agent(addr) as client:
        _, entries = client.health.service(service)
    return {e["Service"]["ID"]: e for e in entries}


def check_status(addr: str, service: str, replica_id: str) -> str:
    entry = instances(addr, service).get(replica_id)
    if entry is None:
        return "absent"
    return str(next(c["Status"] for c in entry["Checks"] if c["CheckID"] == check_id(replica_id)))


# --- through a registry process ---------------------------------------------------------


def test_replicas_are_mirrored_while_their_lease_lives(backend: tuple[str, str]) -> None:
    name, addr = backend
    lease_ms = LEASE_MS[name]
    rid = f"cat-{uuid.uuid4().hex[:8]}"
    with consul_registry(addr) as (reg, service), grpc.insecure_channel(reg.address) as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        region = registry_pb2.Region(id="cat-r", residency_zone="us")
        stub.Put(registry_pb2.PutRequest(entity=registry_pb2.Entity(region=region)))
        stub.RegisterReplica(
            registry_pb2.RegisterReplicaRequest(replica=replica(rid), lease_ms=lease_ms)
        )
        eventually(lambda: check_status(addr, service, rid) == "passing")
        entry = instances(addr, service)[rid]
        svc = entry["Service"]
        assert (svc["Service"], svc["Address"], svc["Port"]) == (service, "127.0.0.1", 8001)
        assert {"region=cat-r", "pool=gpu", "backend=triton", "version=m@v1"} <= set(svc["Tags"])
        assert svc["Meta"]["region"] == "cat-r" and svc["Meta"]["gpu_type"] == "H100-80GB"
        with agent(addr) as client:
            checks = client.agent.checks()
        assert checks[check_id(rid)]["Type"] == "ttl"

        # Heartbeats keep the check passing well past its TTL (pacing, not a wait).
        deadline = time.monotonic() + 3 * lease_ms / 1000
        while time.monotonic() < deadline:
            time.sleep(lease_ms / 4000)
            stub.Heartbeat(registry_pb2.HeartbeatRequest(replica=rid, lease_ms=lease_ms))
            assert check_status(addr, service, rid) == "passing"

        # No more heartbeats: the lease lapses twice and the registry deregisters it.
        eventually(lambda: check_status(addr, service, rid) == "absent", timeout=15)
        listed = stub.List(registry_pb2.ListRequest(kind=registry_pb2.ENTITY_KIND_REPLICA))
        assert rid not in [e.replica.id for e in listed.entities]


def test_an_unreachable_agent_never_fails_register_or_heartbeat(fake: FakeConsul) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    with (
        consul_registry(fake.addr, "--consul-catalog-addr", dead) as (reg, service),
        grpc.insecure_channel(reg.address) as ch,
    ):
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        region = registry_pb2.Region(id="cat-r", residency_zone="us")
        stub.Put(registry_pb2.PutRequest(entity=registry_pb2.Entity(region=region)))
        registered = stub.RegisterReplica(
            registry_pb2.RegisterReplicaRequest(replica=replica("cat-down"), lease_ms=10_000)
        )
        assert registered.revision > 0
        stub.Heartbeat(registry_pb2.HeartbeatRequest(replica="cat-down"))
        got = stub.Get(
            registry_pb2.GetRequest(
                key=registry_pb2.EntityKey(kind=registry_pb2.ENTITY_KIND_REPLICA, id="cat-down")
            )
        )
        assert got.entity.replica.state == common_pb2.REPLICA_STATE_READY
        eventually(lambda: any("consul catalog at" in line for line in reg.output))
        assert instances(fake.addr, service) == {}


def test_consul_reaps_the_replicas_of_a_registry_that_died(fake: FakeConsul) -> None:
    extra = ("--consul-deregister-after-ms", "300")
    with (
        consul_registry(fake.addr, *extra) as (reg, service),
        grpc.insecure_channel(reg.address) as ch,
    ):
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        region = registry_pb2.Region(id="cat-r", residency_zone="us")
        stub.Put(registry_pb2.PutRequest(entity=registry_pb2.Entity(region=region)))
        stub.RegisterReplica(
            registry_pb2.RegisterReplicaRequest(replica=replica("cat-orphan"), lease_ms=300)
        )
        eventually(lambda: check_status(fake.addr, service, "cat-orphan") == "passing")
        reg.stop(signal.SIGKILL)
        # Nobody deregisters it: the TTL runs out, then DeregisterCriticalServiceAfter.
        eventually(lambda: check_status(fake.addr, service, "cat-orphan") == "critical")
        eventually(lambda: check_status(fake.addr, service, "cat-orphan") == "absent")


# --- ConsulCatalog in-process -----------------------------------------------------------


def test_a_lost_registration_is_repaired_on_the_next_heartbeat(fake: FakeConsul) -> None:
    service = f"spillgate-test-{uuid.uuid4().hex[:8]}"
    catalog = ConsulCatalog(fake.addr, service=service)
    lease = timedelta(seconds=30)
    try:
        rep = replica("cat-heal")
        catalog.registered(rep, lease)
        eventually(lambda: check_status(fake.addr, service, "cat-heal") == "passing")
        with agent(fake.addr) as client:
            client.agent.service.deregister("cat-heal")  # as an agent that lost its state
        catalog.renewed(rep, lease)  # its check is gone: fails, counted
        eventually(lambda: catalog.stats.failures == 1)
        catalog.renewed(rep, lease)  # registers again
        eventually(lambda: check_status(fake.addr, service, "cat-heal") == "passing")
        not_ready = registry_pb2.Replica()
        not_ready.CopyFrom(rep)
        not_ready.state = common_pb2.REPLICA_STATE_NOT_READY
        catalog.renewed(not_ready, lease)
        eventually(lambda: check_status(fake.addr, service, "cat-heal") == "warning")
        catalog.removed("cat-heal")
        eventually(lambda: check_status(fake.addr, service, "cat-heal") == "absent")
        # The catalog counts a call when it returns, which can be just after the agent
        # already shows its effect.
        eventually(lambda: catalog.stats.deregistrations == 1)
        stats = catalog.stats
        assert stats.registrations == 2 and stats.deregistrations == 1
        assert stats.check_updates == 1 and stats.failures == 1
    finally:
        catalog.close()


# --- the fake's Consul semantics ----------------------------------------------------------


def test_fake_agent_ttl_checks_follow_consul(fake: FakeConsul) -> None:
    service = f"fake-{uuid.uuid4().hex[:8]}"
    with agent(fake.addr) as client:
        check = {"TTL": "200ms", "DeregisterCriticalServiceAfter": "300ms"}
        assert client.agent.service.register(service, service_id="s1", port=1, check=check)
        # No Status: a new check starts critical; its id is "service:<id>".
        assert client.agent.checks()["service:s1"]["Status"] == "critical"
        assert client.agent.check.ttl_pass("service:s1", "ok")
        _, passing = client.health.service(service, passing=True)
        assert [e["Service"]["ID"] for e in passing] == ["s1"]
        assert passing[0]["Checks"][0]["Output"] == "ok"
        _, catalog = client.catalog.service(service)
        assert [(e["ServiceID"], e["ServicePort"]) for e in catalog] == [("s1", 1)]
        # Not updated within its TTL: critical, "TTL expired"; then reaped.
        eventually(lambda: client.agent.checks()["service:s1"]["Output"] == "TTL expired")
        assert client.health.service(service, passing=True)[1] == []
        eventually(lambda: client.catalog.service(service)[1] == [])
        # Unknown ids: the agent answers 404 (py-consul returns False).
        assert client.agent.service.deregister("s1") is False
        assert client.agent.check.ttl_pass("service:s1") is False
