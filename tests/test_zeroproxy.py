"""ZeroProxyClient on a real fleet (registry, two replicas, admission): the gateway's path
run in the caller's process, with no gateway in between."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from spillgate._proto import common_pb2, gateway_pb2
from spillgate.gateway.errors import GatewayError
from spillgate.zeroproxy import ZeroProxyClient
from tests.fleet_helpers import Fleet, start_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = start_fleet(tmp_path_factory.mktemp("zeroproxy") / "registry.db", replicas=2)
    yield f
    f.stop()


def client(fleet: Fleet) -> ZeroProxyClient:
    return ZeroProxyClient(
        "us", registry=fleet.registry.address, admission=fleet.admission.ready[0]
    )


def request(**fields: object) -> gateway_pb2.ChatRequest:
    base: dict[str, object] = {
        "model": "chat",
        "messages": [gateway_pb2.ChatMessage(role="user", content="no gateway in between?")],
        "max_tokens": 10,
    }
    return gateway_pb2.ChatRequest(**{**base, **fields})  # type: ignore[arg-type]


async def served(c: ZeroProxyClient, **fields: object) -> list[gateway_pb2.ChatResponse]:
    """Right after start the admission may not have fresh signals yet and sheds: poll."""
    for _ in range(100):
        try:
            return [r async for r in c.chat(request(**fields), timeout=20)]
        except GatewayError as exc:
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("never served")


def executions(fleet: Fleet) -> dict[str, int]:
    out: dict[str, int] = {}
    for rp in fleet.replicas:
        with urllib.request.urlopen(f"http://{rp.metrics}/executions", timeout=5) as resp:
            out.update(json.loads(resp.read())["executions"])
    return out


async def test_a_chat_is_admitted_and_streamed_from_the_replica_directly(fleet: Fleet) -> None:
    async with client(fleet) as c:
        responses = await served(c, session_id="zp-1")
        first, last = responses[0], responses[-1]
        assert first.route.region == "us" and first.route.action == common_pb2.ACTION_SERVE
        assert first.route.replica in ("us-0", "us-1") and first.route.reason
        assert "".join(r.delta for r in responses)
        assert last.finish_reason and last.usage.completion_tokens == 10
        ran = executions(fleet)
        assert ran[first.request_id] == 1  # the replica ran it once, for this client
        # The session stays where it ran (the admission's session affinity).
        again = await served(c, session_id="zp-1")
        assert again[0].route.replica == first.route.replica


async def test_errors_are_the_gateways_statuses(fleet: Fleet) -> None:
    async with client(fleet) as c:
        with pytest.raises(GatewayError) as err:
            [r async for r in c.chat(request(model="no-such-model"))]
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(GatewayError) as err:
            [r async for r in c.chat(request(max_tokens=100_000))]
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_start_fails_clearly_without_a_registry() -> None:
    c = ZeroProxyClient("us", registry="127.0.0.1:9", admission="127.0.0.1:9")
    with pytest.raises(TimeoutError, match="no registry state"):
        await c.start(timeout=0.5)
    await c.close()
