"""End to end on a real local fleet (`spillgate up --detach`): routing, overflow, residency.

Small replicas (2 decode slots) so a burst saturates a region; the simulators run 10x
faster than real time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from spillgate._proto import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.test_fleet import REGISTRY_PART, spillgate

REPLICA_CONFIG = """
seed = 0
load = ["llm-small"]

[llm.llm-small]
max_num_seqs = 2
max_waiting = 64
num_kv_blocks = 4096
block_size = 16
ttft_overhead_ms = 15.0
prefill_ms_per_token = 0.05
itl_base_ms = 8.0
itl_per_seq_ms = 0.15
jitter = 0.0
max_model_tokens = 4096
"""


def _spec() -> str:
    regions = {
        "us": ({"eu": 80.5, "apac": 145.3}, 2),
        "eu": ({"us": 80.5, "apac": 212.4}, 1),
        "apac": ({"us": 145.3, "eu": 212.4}, 1),
    }
    parts = [
        "[fleet]\nspeed = 10.0\nlease_ms = 1500\nstartup_timeout_s = 60\n"
        'replica_config = "r.toml"\n'
    ]
    for rid, (rtt, n) in regions.items():
        peers = ", ".join(f"{p} = {ms}" for p, ms in rtt.items())
        parts.append(
            f'[[region]]\nid = "{rid}"\nresidency_zone = "{rid}"\n'
            f"rtt_ms = {{ {peers} }}\nreplicas = {n}\n"
        )
    parts.append(REGISTRY_PART)
    for rid in regions:
        parts.append(
            f'[[placement]]\nmodel = "llm-small"\nversion = "v1"\nregion = "{rid}"\n'
            'pool = "default"\nmin_replicas = 1\nmax_replicas = 4\n'
        )
    return "\n".join(parts)


@dataclass
class Running:
    state: Path
    endpoints: dict[str, object]
    key: str

    def gateway(self, region: str) -> str:
        regions = self.endpoints["regions"]
        assert isinstance(regions, dict)
        return str(regions[region]["gateway"]["grpc"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("e2e")
    (root / "r.toml").write_text(REPLICA_CONFIG)
    (root / "fleet.toml").write_text(_spec())
    state = root / "state"
    # Routing policy is the point here, not Envoy (tests/test_fleet_envoy.py): call the
    # gateways directly.
    started = spillgate(
        "up", "-f", str(root / "fleet.toml"), "--detach", "--no-envoy", state=state, timeout=120
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        endpoints = json.loads((state / "endpoints.json").read_text())
        yield Running(state, endpoints, (state / "dev-key").read_text().strip())
    finally:
        stopped = spillgate("down", state=state, timeout=60)
        assert stopped.returncode == 0, stopped.stderr


def request(**fields: object) -> gateway_pb2.ChatRequest:
    base: dict[str, object] = {
        "model": "chat",
        "messages": [gateway_pb2.ChatMessage(role="user", content="route me")],
        "max_tokens": 24,
    }
    base.update(fields)
    return gateway_pb2.ChatRequest(**base)  # type: ignore[arg-type]


async def chat(
    fleet: Running, region: str, req: gateway_pb2.ChatRequest, key: str | None = None
) -> gateway_pb2.RouteInfo:
    """The final route of one streamed chat; raises AioRpcError."""
    metadata = (("authorization", f"Bearer {key or fleet.key}"),)
    async with grpc.aio.insecure_channel(fleet.gateway(region)) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        route = gateway_pb2.RouteInfo()
        finishes = 0
        async for response in stub.Chat(req, metadata=metadata):
            if response.HasField("route"):
                route = response.route
            finishes += bool(response.finish_reason)
        assert finishes == 1
    return route


async def warm(fleet: Running) -> None:
    """Until every region serves (admissions need fresh signals and neighbour summaries)."""
    deadline = asyncio.get_running_loop().time() + 30
    for region in ("us", "eu", "apac"):
        while True:
            try:
                await chat(fleet, region, request())
                break
            except grpc.aio.AioRpcError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{region} never served: {exc.details()}") from exc
                await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # a few WatchRegion summaries reach every neighbour


async def burst(
    fleet: Running, region: str, n: int, **fields: object
) -> tuple[list[gateway_pb2.RouteInfo], Counter[str]]:
    routes: list[gateway_pb2.RouteInfo] = []
    errors: Counter[str] = Counter()

    async def one(i: int) -> None:
        try:
            routes.append(await chat(fleet, region, request(session_id=f"{region}-{i}", **fields)))
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return routes, errors


async def test_a_request_entering_us_is_served_in_us(fleet: Running) -> None:
    await warm(fleet)
    route = await chat(fleet, "us", request())
    assert route.region == "us" and route.action == common_pb2.ACTION_SERVE and route.hops == 0


async def test_a_burst_into_apac_is_partly_overflowed_within_budget(fleet: Running) -> None:
    await warm(fleet)
    routes, errors = await burst(fleet, "apac", 16, max_tokens=60)
    assert len(routes) + sum(errors.values()) == 16
    where = Counter(r.region for r in routes)
    overflowed = [r for r in routes if r.action == common_pb2.ACTION_OVERFLOW]
    assert where["apac"] >= 1, where
    assert overflowed, f"nothing left apac: {where} {errors}"
    for r in overflowed:
        assert r.region in ("us", "eu") and r.reason == "overflow_fit" and r.hops == 1
        assert r.estimate.network_ms > 0
        assert r.estimate.total_ms <= r.estimate.budget_ms


async def test_residency_eu_never_leaves_eu_even_when_eu_is_saturated(fleet: Running) -> None:
    await warm(fleet)
    routes, errors = await burst(fleet, "eu", 16, max_tokens=80, residency_zone="eu")
    assert all(r.region == "eu" for r in routes), Counter(r.region for r in routes)
    assert set(errors) <= {"RESOURCE_EXHAUSTED"}, errors
    # The same request entering us must also stay in eu: once eu has room again it is
    # overflowed there; until then it is shed, never served in us.
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            route = await chat(fleet, "us", request(residency_zone="eu", max_tokens=8))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            assert asyncio.get_running_loop().time() < deadline, "eu never had room again"
            await asyncio.sleep(0.2)
    assert route.region == "eu" and route.action == common_pb2.ACTION_OVERFLOW


async def test_bad_key_unknown_model_and_rate_limit(fleet: Running) -> None:
    await warm(fleet)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat(fleet, "us", request(), key="sg_nope_nope")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat(fleet, "us", request(model="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    store = str(fleet.state / "keys.db")
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "spillgate.cli",
            "keys",
            "create",
            "--store",
            store,
            "--tenant",
            "tiny",
            "--rps",
            "1",
            "--burst",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    tiny = created.stdout.strip()
    await chat(fleet, "us", request(max_tokens=4), key=tiny)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat(fleet, "us", request(max_tokens=4), key=tiny)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.ToMilliseconds() > 0


async def test_chat_burst_prints_how_requests_were_routed(fleet: Running) -> None:
    await warm(fleet)
    done = spillgate("chat", "hello", "--region", "us", "--burst", "6", state=fleet.state)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "6 requests into us:"
    counts = [int(line.split()[0]) for line in lines[1:]]
    assert sum(counts) == 6 and "ran in us" in done.stdout


async def test_a_tenant_token_limit_is_charged_prompt_plus_output(fleet: Running) -> None:
    await warm(fleet)
    store = str(fleet.state / "keys.db")
    options = ["--store", store, "--tenant", "wordy", "--tokens-per-s", "30"]  # 300 tokens
    created = subprocess.run(
        [sys.executable, "-m", "spillgate.cli", "keys", "create", *options],
        capture_output=True,
        text=True,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    await chat(fleet, "us", request(max_tokens=200), key=key)  # ~205 of 300 tokens
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat(fleet, "us", request(max_tokens=200), key=key)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "token" in (err.value.details() or "")
