"""The gateway's gRPC API end to end: registry, replicas, two regions' admissions and gateways."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest

from spillgate._proto import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2
from spillgate.fleet.status import region_summary
from tests import fleet_helpers as fh
from tests.conftest import ReplicaProcess, ServiceProcess, eventually, set_faults, start_replica
from tests.fleet_helpers import start_admission, start_fleet, start_gateway
from tests.test_registry_service import Registry, start_registry

DIGEST = "sha256:" + "ef" * 32


@dataclass
class Fleet:
    registry: Registry
    replicas: dict[str, ReplicaProcess]
    admissions: dict[str, ServiceProcess]
    gateways: dict[str, ServiceProcess]

    def gateway(self, region: str) -> str:
        return self.gateways[region].ready[0]


def _entities(fleet: Fleet) -> list[registry_pb2.Entity]:
    def region(id: str, peer: str) -> registry_pb2.Entity:
        e = fh.region(id, fleet.admissions[id].ready[0], fleet.gateway(id))
        e.region.rtt_ms[peer] = 80.0
        return e

    return [
        region("us", "eu"),
        region("eu", "us"),
        *fh.model("llm-small"),
        fh.alias("chat", "llm-small", "v1"),
        registry_pb2.Entity(
            placement=registry_pb2.Placement(
                model="llm-small", version="v1", region="us", pool="default", max_replicas=4
            )
        ),
        *(
            fh.replica(rid, rid.split("-")[0], rp, [("llm-small", "v1")])
            for rid, rp in fleet.replicas.items()
        ),
    ]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    registry = start_registry(tmp_path_factory.mktemp("gateway") / "registry.db")
    replicas = {rid: start_replica("--speed", "20") for rid in ("us-0", "us-1", "eu-0")}
    admissions = {r: start_admission(r, registry.address) for r in ("us", "eu")}
    gateways = {r: start_gateway(r, registry.address, admissions[r].ready[0]) for r in ("us", "eu")}
    f = Fleet(registry, replicas, admissions, gateways)
    try:
        from spillgate._proto import registry_pb2_grpc

        with grpc.insecure_channel(registry.address) as channel:
            registry_pb2_grpc.RegistryServiceStub(channel).Apply(
                registry_pb2.ApplyRequest(
                    mutations=[registry_pb2.Mutation(put=e) for e in _entities(f)]
                )
            )
        for address in (*(a.ready[0] for a in admissions.values()), *map(f.gateway, gateways)):
            fh.wait_serving(address)
        yield f
    finally:
        for proc in (*gateways.values(), *admissions.values(), *replicas.values(), registry):
            proc.stop()


def chat_request(**fields: object) -> gateway_pb2.ChatRequest:
    base: dict[str, object] = {
        "model": "chat",
        "messages": [gateway_pb2.ChatMessage(role="user", content="where does this run?")],
        "max_tokens": 12,
    }
    base.update(fields)
    return gateway_pb2.ChatRequest(**base)  # type: ignore[arg-type]


@dataclass
class Answer:
    responses: list[gateway_pb2.ChatResponse]
    initial: dict[str, str]
    trailing: dict[str, str]

    @property
    def text(self) -> str:
        return "".join(r.delta for r in self.responses)

    @property
    def route(self) -> gateway_pb2.RouteInfo:
        return self.responses[-1].route


async def chat(target: str, request: gateway_pb2.ChatRequest, **kw: object) -> Answer:
    async with grpc.aio.insecure_channel(target) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Chat(request, **kw)  # type: ignore[arg-type]
        responses = [r async for r in call]
        initial = {k: str(v) for k, v in (await call.initial_metadata() or ())}
        trailing = {k: str(v) for k, v in (await call.trailing_metadata() or ())}
    return Answer(responses, initial, trailing)


async def chat_until_served(target: str, request: gateway_pb2.ChatRequest) -> Answer:
    """Right after start the admission has no fresh signals yet and sheds: poll."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            return await chat(target, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_chat_is_served_in_the_entry_region_and_says_how(fleet: Fleet) -> None:
    answer = await chat_until_served(fleet.gateway("us"), chat_request())
    first, last = answer.responses[0], answer.responses[-1]
    assert first.request_id and first.route.region == "us"
    assert first.route.replica in ("us-0", "us-1")
    assert first.route.action == common_pb2.ACTION_SERVE and first.route.reason
    assert first.route.model == "llm-small" and first.route.version == "v1"
    assert last.finish_reason in (gateway_pb2.FINISH_REASON_STOP, gateway_pb2.FINISH_REASON_LENGTH)
    assert 0 < last.usage.completion_tokens <= 12
    assert last.usage.prompt_tokens > 0
    assert answer.text.strip()
    assert sum(1 for r in answer.responses if r.finish_reason) == 1
    for metadata in (answer.initial, answer.trailing):
        assert metadata["x-spillgate-region"] == "us"
        assert metadata["x-spillgate-action"] == "SERVE"
        assert metadata["x-spillgate-replica"] == first.route.replica
        assert metadata["x-spillgate-version"] == "v1"


async def test_residency_eu_from_us_is_overflowed_to_eu_with_one_hop(fleet: Fleet) -> None:
    await chat_until_served(fleet.gateway("eu"), chat_request())  # eu has fresh signals

    async def overflowed() -> Answer:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                return await chat(fleet.gateway("us"), chat_request(residency_zone="eu"))
            except grpc.aio.AioRpcError as exc:
                # Until us has eu's first summary, the only in-zone target is unknown: shed.
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)

    answer = await overflowed()
    route = answer.route
    assert route.region == "eu" and route.replica == "eu-0"
    assert route.action == common_pb2.ACTION_OVERFLOW and route.reason == "overflow_fit"
    assert route.hops == 1
    assert answer.trailing["x-spillgate-region"] == "eu"


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, ""),
        ({"messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        ({"max_tokens": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            {"messages": [gateway_pb2.ChatMessage(role="wizard", content="hi")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role",
        ),
        ({"temperature": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"priority": 9}, grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    ],
)
async def test_bad_requests_get_clear_statuses(
    fleet: Fleet, fields: dict[str, object], code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat(fleet.gateway("us"), chat_request(**fields))
    assert err.value.code() == code
    if field:
        assert (err.value.details() or "").startswith(field + ":")


async def test_list_models_and_health(fleet: Fleet) -> None:
    async with grpc.aio.insecure_channel(fleet.gateway("us")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        listed = await stub.ListModels(gateway_pb2.ListModelsRequest(region="*"))
        names = {m.model: m for m in listed.models}
        assert names["chat"].alias and names["llm-small"].versions == ["v1"]
        assert sorted(names["llm-small"].regions) == ["eu", "us"]
        eu_only = await stub.ListModels(gateway_pb2.ListModelsRequest(region="eu"))
        assert {m.model for m in eu_only.models} == {"chat", "llm-small"}
        here = await stub.ListModels(gateway_pb2.ListModelsRequest())  # this gateway's: us
        assert {m.model for m in here.models} == {"chat", "llm-small"}
        nowhere = await stub.ListModels(gateway_pb2.ListModelsRequest(region="mars"))
        assert list(nowhere.models) == []
        health = await stub.Health(gateway_pb2.HealthRequest())
        assert health.region == "us" and health.registry_reachable
        assert health.registry_revision >= 1 and health.ready_replicas == 2


def _executions(rp: ReplicaProcess) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{rp.metrics}/executions", timeout=5) as resp:
        body: dict[str, object] = json.loads(resp.read())
    return body


async def test_cancelled_client_cancels_the_replica_request(fleet: Fleet) -> None:
    await chat_until_served(fleet.gateway("eu"), chat_request())
    request = chat_request(max_tokens=500, session_id="cancel-me", budget_ms=60_000)
    async with grpc.aio.insecure_channel(fleet.gateway("eu")) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Chat(request)
        it: AsyncIterator[gateway_pb2.ChatResponse] = call.__aiter__()
        await it.__anext__()
        call.cancel()
    replica = fleet.replicas["eu-0"]

    def idle() -> bool:
        with urllib.request.urlopen(f"http://{replica.metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        running = [
            line for line in text.splitlines() if line.startswith("vllm:num_requests_running{")
        ]
        return all(line.rstrip().endswith(" 0.0") for line in running)

    eventually(idle, timeout=10)


async def test_replica_killed_under_load_every_request_ends_exactly_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Its own fleet: one region, three replicas; one is SIGKILLed mid-run."""
    f = start_fleet(tmp_path_factory.mktemp("kill") / "registry.db", replicas=3, speed="10")
    try:
        target = f.gateway_address
        await chat_until_served(target, chat_request())
        outcomes: Counter[str] = Counter()

        async def one(i: int) -> None:
            request = chat_request(max_tokens=40, session_id=f"k{i}", budget_ms=30_000)
            try:
                answer = await chat(target, request)
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                return
            assert sum(1 for r in answer.responses if r.finish_reason) == 1, answer.responses
            outcomes["OK"] += 1

        tasks = [asyncio.create_task(one(i)) for i in range(60)]
        await asyncio.sleep(0.3)
        f.replicas[2].proc.kill()
        await asyncio.gather(*tasks)
        assert sum(outcomes.values()) == 60, outcomes
        assert outcomes["OK"] >= 30, outcomes
        assert set(outcomes) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}, outcomes
        seen: Counter[str] = Counter()
        for rp in f.replicas[:2]:
            body = _executions(rp)
            assert body["duplicates"] == [], body
            executions = body["executions"]
            assert isinstance(executions, dict)
            seen.update(executions.keys())
        assert all(n == 1 for n in seen.values()), "a request ran on two replicas"
    finally:
        f.stop()


async def test_a_retry_after_a_refusal_goes_to_another_replica(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Its own fleet: one region, two replicas. The replica a session ran on starts refusing
    every request at the door: the session's next request goes there first (session
    affinity), is refused, and is retried on the other replica, not on the refusing one
    again; the route says so in `refused_by`. No request ends on the refusing replica.
    """
    f = start_fleet(tmp_path_factory.mktemp("refuse") / "registry.db", replicas=2, speed="20")
    try:
        target = f.gateway_address
        first = await chat_until_served(target, chat_request(session_id="pinned"))
        refusing = first.route.replica
        other = {"us-0": "us-1", "us-1": "us-0"}[refusing]
        bad = f.replicas[int(refusing[-1])]
        before = _executions(bad)["executions"]
        set_faults(bad, refuse_rate=1.0)
        routes = []
        for i in range(4):  # fewer refusals than the retry budget's half (gRFC A6: 10 / 2)
            message = gateway_pb2.ChatMessage(role="user", content=f"question {i} of the refusal")
            try:
                answer = await chat(target, chat_request(messages=[message], session_id="pinned"))
            except grpc.aio.AioRpcError as exc:  # say why: the gateway's and admission's view
                logs = "".join(f.gateway.output[-20:] + f.admission.output[-20:])
                why = f"request {i}: {exc.code().name} {exc.details()}"
                raise AssertionError(f"{why}\n{logs}") from exc
            routes.append(answer.route)
            assert answer.trailing.get("x-spillgate-refused-by", "") == ",".join(
                answer.route.refused_by
            )
        assert [r.replica for r in routes] == [other] * 4
        assert all(list(r.refused_by) in ([], [refusing]) for r in routes), routes
        assert list(routes[0].refused_by) == [refusing]  # the session's replica, tried first
        assert _executions(bad)["executions"] == before  # refused: nothing ran
    finally:
        f.stop()


async def test_a_long_client_deadline_does_not_widen_the_sla_budget(fleet: Fleet) -> None:
    """A 60 s gRPC timeout caps the budget; it must not replace the priority's 1.2 s."""
    answer = await chat_until_served(fleet.gateway("us"), chat_request())
    default = answer.responses[0].route.estimate.budget_ms
    timed = await chat(fleet.gateway("us"), chat_request(), timeout=60)
    assert timed.responses[0].route.estimate.budget_ms <= default <= 1200
    short = await chat(fleet.gateway("us"), chat_request(), timeout=0.9)
    assert short.responses[0].route.estimate.budget_ms <= 900


@pytest.mark.parametrize("hops", ["-1", "x", "99"])
async def test_a_bad_hops_header_is_invalid_argument(fleet: Fleet, hops: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat(fleet.gateway("us"), chat_request(), metadata=(("x-spillgate-hops", hops),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_longer_than_its_ticket_lease_keeps_the_ticket_renewed(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Lease 0.6 s, a ~2 s generation: the gateway renews, so admission never expires it
    (its log would say "expired N unreleased tickets") and the final Release finds it (the
    gateway would log "release of ..."). Both are checked once the region is idle again,
    which takes either the Release or, had it been lost, the lease's expiry."""
    f = start_fleet(
        tmp_path_factory.mktemp("lease") / "registry.db",
        replicas=1,
        speed="1",
        admission_args=("--ticket-lease-s", "0.6"),
    )
    try:

        def free_slots() -> list[int]:
            summary = region_summary(f.admission.ready[0])
            return [m.free_slots for m in summary.models] if summary is not None else []

        idle = await asyncio.to_thread(eventually, lambda: all(free_slots()) and free_slots())
        answer = await chat_until_served(
            f.gateway_address, chat_request(max_tokens=250, budget_ms=20_000)
        )
        assert answer.responses[-1].usage.completion_tokens > 100
        await asyncio.to_thread(eventually, lambda: free_slots() == idle)
        assert not any("unreleased tickets" in line for line in f.admission.output)
        assert not any("release of" in line for line in f.gateway.output)
    finally:
        f.stop()


async def test_load_model_takes_a_pinned_version_onto_its_placements_replicas(
    fleet: Fleet,
) -> None:
    async with grpc.aio.insecure_channel(fleet.gateway("us")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        loaded = await stub.LoadModel(gateway_pb2.LoadModelRequest(model="llm-small@v1"))
        assert sorted(loaded.replicas) == ["us-0", "us-1"]
        one = await stub.LoadModel(
            gateway_pb2.LoadModelRequest(model="llm-small@v1", replica="us-1")
        )
        assert list(one.replicas) == ["us-1"]
        for request, code in (
            (gateway_pb2.LoadModelRequest(model="chat"), grpc.StatusCode.INVALID_ARGUMENT),
            (gateway_pb2.LoadModelRequest(model="llm-small@v9"), grpc.StatusCode.NOT_FOUND),
            (
                gateway_pb2.LoadModelRequest(model="llm-small@v1", region="eu"),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(request)
            assert err.value.code() == code, request
