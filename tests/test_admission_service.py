"""The admission service as processes: registry + replica simulators + two regions' admissions."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spillgate._proto import (
    admission_pb2,
    admission_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from spillgate.admission.peers import Peers, PeersConfig
from tests.conftest import ReplicaProcess, ServiceProcess, eventually, start_replica, until
from tests.fleet_helpers import region, replica, start_admission
from tests.test_registry_service import Registry, start_registry

LLM_SMALL = (("llm-small", "v1"),)
DIGEST = "sha256:" + "cd" * 32
SERVE = common_pb2.ACTION_SERVE
OVERFLOW = common_pb2.ACTION_OVERFLOW
SHED = common_pb2.ACTION_SHED


@dataclass
class World:
    registry: Registry
    replicas: list[ReplicaProcess]
    us: ServiceProcess
    eu: ServiceProcess

    def stub(self, admission: ServiceProcess) -> admission_pb2_grpc.AdmissionServiceStub:
        channel = grpc.insecure_channel(admission.ready[0])
        self._channels.append(channel)
        return admission_pb2_grpc.AdmissionServiceStub(channel)

    def __post_init__(self) -> None:
        self._channels: list[grpc.Channel] = []

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    registry = start_registry(tmp_path_factory.mktemp("admission") / "registry.db")
    replicas = [start_replica("--speed", "20") for _ in range(3)]
    us = start_admission("us", registry.address)
    eu = start_admission("eu", registry.address)
    entities = [
        region("us", us.ready[0], rtt={"eu": 80.0}),
        region("eu", eu.ready[0], rtt={"us": 80.0}),
        registry_pb2.Entity(
            model=registry_pb2.Model(
                id="llm-small",
                kind=common_pb2.MODEL_KIND_LLM,
                max_context_tokens=4096,
                max_output_tokens=512,
            )
        ),
        registry_pb2.Entity(
            version=registry_pb2.Version(
                model="llm-small",
                version="v1",
                artifact_digest=DIGEST,
                triton_model_name="llm-small",
            )
        ),
        registry_pb2.Entity(
            alias=registry_pb2.Alias(
                name="chat",
                default_targets=registry_pb2.AliasTargets(
                    targets=[registry_pb2.AliasTarget(model="llm-small", version="v1", weight=100)]
                ),
            )
        ),
        replica("us-0", "us", replicas[0], LLM_SMALL),
        replica("us-1", "us", replicas[1], LLM_SMALL),
        replica("eu-0", "eu", replicas[2], LLM_SMALL),
    ]
    with grpc.insecure_channel(registry.address) as channel:
        registry_pb2_grpc.RegistryServiceStub(channel).Apply(
            registry_pb2.ApplyRequest(mutations=[registry_pb2.Mutation(put=e) for e in entities])
        )
    w = World(registry, replicas, us, eu)
    try:
        for admission in (us, eu):
            with grpc.insecure_channel(admission.ready[0]) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                eventually(
                    lambda h=health: (
                        h.Check(health_pb2.HealthCheckRequest()).status  # type: ignore[misc]
                        == health_pb2.HealthCheckResponse.SERVING
                    )
                )
        yield w
    finally:
        w.close()
        for proc in (us, eu, *replicas, registry):
            proc.stop()


def ctx(**fields: object) -> common_pb2.RequestContext:
    base: dict[str, object] = {"model": "chat", "prompt_tokens": 100, "max_tokens": 16}
    base.update(fields)
    return common_pb2.RequestContext(**base)  # type: ignore[arg-type]


Stub = admission_pb2_grpc.AdmissionServiceStub


def release(stub: Stub, ticket_id: str) -> bool:
    ok = admission_pb2.ReleaseRequest(ticket_id=ticket_id, outcome=admission_pb2.OUTCOME_OK)
    found: bool = stub.Release(ok).found
    return found


def admit_serving(stub: Stub, **fields: object) -> common_pb2.Decision:
    """Admit until the admission has fresh signals (right after start it sheds: no_replicas)."""

    def attempt() -> common_pb2.Decision | None:
        d = stub.Admit(admission_pb2.AdmitRequest(context=ctx(**fields))).decision
        if d.action == SHED and d.reason == "no_replicas":
            return None
        return d

    result: common_pb2.Decision = eventually(attempt)
    return result


def test_admit_serves_locally_with_a_ticket_and_release_is_idempotent(world: World) -> None:
    stub = world.stub(world.us)
    d = admit_serving(stub)
    assert d.action == SERVE, d
    assert d.reason in ("local_fit", "prefix_affinity", "session_affinity")
    assert d.region == "us" and d.replica in ("us-0", "us-1")
    assert d.endpoint == {"us-0": world.replicas[0].grpc, "us-1": world.replicas[1].grpc}[d.replica]
    assert d.model == "llm-small" and d.version == "v1" and d.triton_model_name == "llm-small"
    assert d.ticket.id and d.ticket.replica == d.replica and d.ticket.region == "us"
    assert 0 < d.estimate.total_ms <= d.estimate.budget_ms
    release = admission_pb2.ReleaseRequest(
        ticket_id=d.ticket.id, outcome=admission_pb2.OUTCOME_OK, ttft_ms=20, total_ms=150
    )
    assert stub.Release(release).found is True
    assert stub.Release(release).found is False


def test_dry_run_reserves_nothing(world: World) -> None:
    stub = world.stub(world.us)
    admit_serving(stub, request_id="warm")
    d = stub.Admit(admission_pb2.AdmitRequest(context=ctx(), dry_run=True)).decision
    assert d.action == SERVE and not d.ticket.id


def test_bad_input_gets_clear_statuses(world: World) -> None:
    stub = world.stub(world.us)
    with pytest.raises(grpc.RpcError) as err:
        stub.Admit(admission_pb2.AdmitRequest(context=ctx(model="nope")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (err.value.details() or "")

    with pytest.raises(grpc.RpcError) as err:
        stub.Admit(admission_pb2.AdmitRequest(context=ctx(priority=42)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(err.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "priority"

    with pytest.raises(grpc.RpcError) as err:
        stub.Admit(admission_pb2.AdmitRequest(context=ctx(model="")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as err:
        stub.Release(admission_pb2.ReleaseRequest(ticket_id="x", outcome=9))  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as err:
        stub.RenewTicket(admission_pb2.RenewTicketRequest(ticket_id="us-gone-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as err:
        stub.Drain(admission_pb2.DrainRequest(replica="eu-0"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.Drain(admission_pb2.DrainRequest(region="eu"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_renew_extends_a_live_ticket(world: World) -> None:
    stub = world.stub(world.us)
    d = admit_serving(stub)
    renewed = stub.RenewTicket(admission_pb2.RenewTicketRequest(ticket_id=d.ticket.id)).ticket
    assert renewed.id == d.ticket.id
    assert renewed.lease_expires_at.ToDatetime() >= d.ticket.lease_expires_at.ToDatetime()
    stub.Release(
        admission_pb2.ReleaseRequest(ticket_id=d.ticket.id, outcome=admission_pb2.OUTCOME_OK)
    )


def test_drained_replica_gets_no_new_requests_until_resumed(world: World) -> None:
    stub = world.stub(world.us)
    admit_serving(stub)
    drained = stub.Drain(admission_pb2.DrainRequest(replica="us-0"))
    assert list(drained.replicas) == ["us-0"]
    tickets = []
    for i in range(20):
        d = stub.Admit(admission_pb2.AdmitRequest(context=ctx(session_id=f"s{i}"))).decision
        assert d.replica != "us-0", d
        if d.ticket.id:
            tickets.append(d.ticket.id)
    for t in tickets:
        release(stub, t)
    stub.Drain(admission_pb2.DrainRequest(replica="us-0", resume=True))
    seen = set()
    for i in range(40):
        d = stub.Admit(admission_pb2.AdmitRequest(context=ctx(session_id=f"r{i}"))).decision
        seen.add(d.replica)
        if d.ticket.id:
            stub.Release(
                admission_pb2.ReleaseRequest(
                    ticket_id=d.ticket.id, outcome=admission_pb2.OUTCOME_OK
                )
            )
    assert "us-0" in seen


def test_watch_region_streams_this_regions_headroom(world: World) -> None:
    stub = world.stub(world.eu)
    admit_serving(stub)
    stream = stub.WatchRegion(admission_pb2.WatchRegionRequest(interval_ms=50))
    try:
        summaries = [next(stream).summary for _ in range(3)]
    finally:
        stream.cancel()
    assert [s.region for s in summaries] == ["eu"] * 3
    assert summaries[0].sequence < summaries[1].sequence < summaries[2].sequence
    last = summaries[-1]
    assert last.residency_zone == "eu" and last.registry_revision >= 1
    heads = {(h.model, h.version): h for h in last.models}
    assert heads[("llm-small", "v1")].healthy_replicas == 1
    assert heads[("llm-small", "v1")].free_slots > 0


def test_residency_keeps_an_eu_request_out_of_us(world: World) -> None:
    stub = world.stub(world.us)
    admit_serving(stub)

    def overflowed() -> common_pb2.Decision | None:
        d = stub.Admit(admission_pb2.AdmitRequest(context=ctx(residency_zone="eu"))).decision
        return d if d.action == OVERFLOW else None

    # us is outside zone eu: the only legal target is the eu neighbour, once its summary
    # arrived over WatchRegion.
    d = eventually(overflowed)
    assert d is not None and d.region == "eu" and d.reason == "overflow_fit"
    assert d.estimate.network_ms == pytest.approx(80.0)
    hop = stub.Admit(admission_pb2.AdmitRequest(context=ctx(residency_zone="eu", hops=1))).decision
    assert hop.action == SHED and hop.reason == "residency"
    assert hop.retry_after_ms > 0


def test_region_summary_counts_shed_requests(world: World) -> None:
    stub = world.stub(world.eu)
    admit_serving(stub)

    def shed_total() -> int:
        stream = stub.WatchRegion(admission_pb2.WatchRegionRequest(interval_ms=50))
        try:
            total: int = next(stream).summary.shed_total
        finally:
            stream.cancel()
        return total

    before = shed_total()
    d = stub.Admit(admission_pb2.AdmitRequest(context=ctx(residency_zone="us", hops=1))).decision
    assert d.action == SHED and d.reason == "residency"
    assert shed_total() == before + 1


async def test_peers_fail_over_to_the_regions_next_admission_instance(world: World) -> None:
    """A region with several admission instances: when the first one listed does not
    answer, the subscription moves on to the next and summaries keep coming."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    got: list[common_pb2.RegionSummary] = []
    failures: list[str] = []
    peers = Peers(
        "us",
        got.append,
        PeersConfig(interval_ms=50, backoff_initial_s=0.05, backoff_max_s=0.1),
        on_failure=failures.append,
    )
    try:
        peers.set_targets({"eu": [dead, world.eu.ready[0]]})
        await until(lambda: got)
        assert got[0].region == "eu" and failures == ["eu"]  # the dead one, once
        assert peers.connected["eu"]
    finally:
        await peers.close()
