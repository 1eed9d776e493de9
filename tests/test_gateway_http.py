"""The OpenAI-compatible HTTP API end to end: real processes, the official `openai` client,
httpx for the wire format, and the server's sockets for TCP_NODELAY."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from spillgate._proto import admission_pb2_grpc, gateway_pb2
from spillgate.gateway.chat import ChatCall, Gateway
from spillgate.gateway.errors import GatewayError
from spillgate.gateway.http import HttpServer
from spillgate.gateway.models import ModelCatalog
from spillgate.gateway.service import GatewayServicer, no_auth
from tests.conftest import ROOT, ReplicaProcess, ServiceProcess, eventually, start_replica
from tests.fleet_helpers import (
    alias,
    apply,
    model,
    region,
    replica,
    start_admission,
    start_gateway,
    wait_serving,
)
from tests.test_registry_service import Registry, start_registry

MESSAGES: list[Any] = [{"role": "user", "content": "where does this run?"}]
LOADED = (("llm-small", "v1"),)
LONG_BUDGET = {"x-spillgate-budget-ms": "60000"}  # a long answer fits the SLA budget


@dataclass
class HttpFleet:
    registry: Registry
    replicas: list[ReplicaProcess]
    admission: ServiceProcess
    gateway: ServiceProcess  # no auth
    secured: ServiceProcess  # --keys
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return self.gateway.ready[1]

    @property
    def secured_http(self) -> str:
        return self.secured.ready[1]

    def running(self) -> float:
        """`vllm:num_requests_running` summed over the replicas."""
        total = 0.0
        for rp in self.replicas:
            with urllib.request.urlopen(f"http://{rp.metrics}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if (
                        line.startswith("vllm:num_requests_running{")
                        and 'model="llm-small"' in line
                    ):
                        total += float(line.rsplit(" ", 1)[1])
        return total


def _create_key(store: Path, tenant: str, *extra: str) -> str:
    args = ["spillgate.cli", "keys", "create", "--store", str(store), "--tenant", tenant, *extra]
    done = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpFleet]:
    tmp = tmp_path_factory.mktemp("gateway_http")
    store = tmp / "keys.db"
    keys = {
        "ok": _create_key(store, "acme"),
        "models_only": _create_key(store, "viewer", "--scopes", "models"),
        "slow": _create_key(store, "tiny", "--rps", "0.1", "--burst", "1"),
    }
    registry = start_registry(tmp / "registry.db")
    started: list[ServiceProcess] = [registry]
    try:
        # Model time = wall time: 8 ms between tokens, so Nagle stalls (~40 ms) would show
        # and a 500-token answer takes seconds (time to disconnect in the middle).
        rps = [start_replica("--speed", "1") for _ in range(2)]
        started += rps
        admission = start_admission("us", registry.address)
        started.append(admission)
        gateway = start_gateway("us", registry.address, admission.ready[0], "--http-port", "0")
        started.append(gateway)
        secured = start_gateway(
            "us", registry.address, admission.ready[0], "--http-port", "0", "--keys", str(store)
        )
        started.append(secured)
        apply(
            registry.address,
            [
                region("us", admission.ready[0], gateway.ready[0]),
                *model("llm-small"),
                alias("chat", "llm-small", "v1"),
                *(replica(f"us-{i}", "us", rp, LOADED) for i, rp in enumerate(rps)),
            ],
        )
        wait_serving(admission.ready[0])
        wait_serving(gateway.ready[0])
        f = HttpFleet(registry, rps, admission, gateway, secured, keys)

        def served() -> bool:  # admission sheds (no_replicas) until its first scrape
            body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
            r = httpx.post(f"http://{f.http}/v1/chat/completions", json=body, timeout=10)
            return r.status_code == 200

        eventually(served, timeout=20)
        yield f
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.fixture
def client(fleet: HttpFleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://{fleet.http}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
def http(fleet: HttpFleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{fleet.http}", timeout=30) as c:
        yield c


# -- the official client ----------------------------------------------------------------------


def test_openai_client_non_streaming_with_route_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, max_tokens=8
    )
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == "chat" and completion.system_fingerprint is None
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and 0 < usage.completion_tokens <= 8 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    h = raw.headers
    assert h["x-spillgate-region"] == "us" and h["x-spillgate-replica"] in ("us-0", "us-1")
    assert h["x-spillgate-model"] == "llm-small" and h["x-spillgate-version"] == "v1"
    assert h["x-spillgate-action"] == "SERVE" and h["x-spillgate-reason"]
    assert float(h["x-spillgate-queue-ms"]) >= 0 and h["x-spillgate-hops"] == "0"
    assert completion.id == f"chatcmpl-{h['x-request-id']}"


def test_openai_client_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat",
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text and finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None and usage.completion_tokens <= 10
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_client_maps_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert "nope" in nf.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=100_000)
    assert bad.value.param == "max_tokens"


def test_openai_client_lists_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"chat", "llm-small"} <= ids
    assert client.models.retrieve("chat").id == "chat"


# -- the wire format --------------------------------------------------------------------------


def test_sse_format_ends_with_done(http: httpx.Client) -> None:
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 6, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-spillgate-region"] == "us"
        assert r.headers["x-spillgate-model"] == "llm-small"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "chat" for c in chunks)
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_parts_user_and_spillgate_headers(http: httpx.Client) -> None:
    body = {
        "model": "llm-small",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": "\n\n",
        "user": "alice",
    }
    headers = {
        "x-spillgate-priority": "high",
        "x-spillgate-allow-degrade": "true",
        "x-spillgate-budget-ms": "5000",
        "x-spillgate-cache-salt": "s",
        "x-session-id": "s-1",
        "x-request-id": "req-123",
    }
    r = http.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "chatcmpl-req-123" and r.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        ({"model": "chat", "messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
        ({"model": "chat", "messages": MESSAGES, "max_tokens": 1.5}, "max_tokens"),
        ({"model": "chat", "messages": MESSAGES, "max_tokens": "8"}, "max_tokens"),
        (
            {"model": "chat", "messages": MESSAGES, "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
        ({"model": "chat", "messages": MESSAGES, "max_tokens": 100_000}, "max_tokens"),
        ({"model": "chat", "messages": []}, "messages"),
        ({"model": "chat"}, "messages"),
        ({"messages": MESSAGES}, "model"),
        ({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "chat", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "chat", "messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"model": "chat", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": "chat", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "chat", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "chat", "messages": MESSAGES, "stream_options": {}}, "stream_options"),
        ({"model": "chat", "messages": MESSAGES, "n": 2}, "n"),
    ],
)
def test_invalid_requests_are_400_naming_the_param(
    http: httpx.Client, body: Any, param: str
) -> None:
    if isinstance(body, bytes):
        r = http.post("/v1/chat/completions", content=body)
    else:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == "invalid_argument" and error["message"]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-spillgate-priority", "urgent"),
        ("x-spillgate-allow-degrade", "maybe"),
        ("x-spillgate-budget-ms", "-5"),
    ],
)
def test_invalid_spillgate_headers_are_400(http: httpx.Client, header: str, value: str) -> None:
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=body, headers={header: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == header


def test_unknown_model_and_path_are_404(http: httpx.Client) -> None:
    for stream in (False, True):
        body = {"model": "nope", "messages": MESSAGES, "stream": stream}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["type"] == "not_found_error"
    r = http.get("/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_models_filter_by_region_header(http: httpx.Client) -> None:
    everywhere = http.get("/v1/models", headers={"x-spillgate-region": "*"}).json()
    assert everywhere["object"] == "list"
    by_id = {m["id"]: m for m in everywhere["data"]}
    assert by_id["chat"]["alias"] is True and by_id["llm-small"]["versions"] == ["v1"]
    assert (
        by_id["llm-small"]["regions"] == ["us"] and by_id["llm-small"]["max_output_tokens"] == 512
    )
    us = http.get("/v1/models", headers={"x-spillgate-region": "us"}).json()["data"]
    assert {m["id"] for m in us} == {"chat", "llm-small"}
    here = http.get("/v1/models").json()["data"]  # default: this gateway's region (us)
    assert here == us
    assert http.get("/v1/models", headers={"x-spillgate-region": "eu"}).json()["data"] == []


def test_health(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["region"] == "us" and body["serving"] is True and body["ready_replicas"] == 2
    assert body["registry_reachable"] is True and body["registry_revision"] > 0


# -- cancellation and latency -----------------------------------------------------------------


def test_client_disconnect_cancels_the_replica_request(fleet: HttpFleet) -> None:
    eventually(lambda: fleet.running() == 0)
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 500, "stream": True}
    with (
        httpx.Client(base_url=f"http://{fleet.http}", timeout=30) as c,
        c.stream("POST", "/v1/chat/completions", json=body, headers=LONG_BUDGET) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):  # a few tokens in: the replica is generating (500 tokens ~ 4 s)
            next(lines)
        assert fleet.running() == 1
    # Closed early: the gateway must cancel the replica stream and release the ticket.
    started = time.monotonic()
    eventually(lambda: fleet.running() == 0, timeout=2.0)
    assert time.monotonic() - started < 2.0


def test_streaming_over_keep_alive_has_no_nagle_stalls(fleet: HttpFleet) -> None:
    """With Nagle on, a small write that follows another still unacknowledged waits for the
    client's delayed ACK (~40 ms on Linux): the headers then the first SSE event of every
    response on a reused connection, and chunks closer together than the ACK delay."""
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 40, "stream": True}
    first_event: list[float] = []  # response headers -> first SSE event
    gaps: list[float] = []  # between content chunks (a token every ~8 ms)
    with httpx.Client(base_url=f"http://{fleet.http}", timeout=30) as c:
        for _ in range(5):  # the same connection each time (keep-alive)
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                headers_at = time.perf_counter()
                last = None
                for line in r.iter_lines():
                    now = time.perf_counter()
                    if not line.startswith('data: {"id"'):
                        continue
                    if last is None:
                        first_event.append(now - headers_at)
                    else:
                        gaps.append(now - last)
                    last = now
    assert len(first_event) == 5 and len(gaps) > 150
    # Measured here: 0.2-10 ms with TCP_NODELAY; 40-42 ms on every reused connection without.
    assert max(first_event) < 0.025, first_event
    p90 = statistics.quantiles(gaps, n=10)[-1]
    assert statistics.median(gaps) < 0.020 and p90 < 0.030, (statistics.median(gaps), p90)


async def test_accepted_sockets_have_tcp_nodelay(fleet: HttpFleet) -> None:
    channel = grpc.aio.insecure_channel(fleet.admission.ready[0])
    gateway = Gateway("us", admission_pb2_grpc.AdmissionServiceStub(channel), ModelCatalog())
    server = HttpServer(gateway, no_auth, GatewayServicer(gateway))
    address = await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://{address}") as c:
            assert (await c.get("/health")).status_code == 503  # no registry: not serving
            assert server.server is not None
            connections = list(server.server.server_state.connections)
            assert len(connections) == 1
            sock = connections[0].transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await server.stop()
        await gateway.close()
        await channel.close()


class _FailsAfterFirstToken(Gateway):
    async def chat(self, call: ChatCall) -> AsyncIterator[gateway_pb2.ChatResponse]:
        route = gateway_pb2.RouteInfo(region="us", replica="us-0", model="llm-small")
        yield gateway_pb2.ChatResponse(delta="Hel", route=route, request_id="r1")
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, "replica us-0 failed the request")


async def test_error_after_the_first_token_is_an_sse_error_event(fleet: HttpFleet) -> None:
    channel = grpc.aio.insecure_channel(fleet.admission.ready[0])
    gateway = _FailsAfterFirstToken(
        "us", admission_pb2_grpc.AdmissionServiceStub(channel), ModelCatalog()
    )
    server = HttpServer(gateway, no_auth, GatewayServicer(gateway))
    address = await server.start("127.0.0.1", 0)
    try:
        body = {"model": "chat", "messages": MESSAGES, "stream": True}
        async with httpx.AsyncClient(base_url=f"http://{address}") as c:
            r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["x-spillgate-replica"] == "us-0"
        events = r.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]  # as vLLM does
        error = json.loads(events[-3].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable" and "us-0" in error["message"]
        assert json.loads(events[1].removeprefix("data: "))["choices"][0]["delta"] == {
            "content": "Hel"
        }
        async with openai.AsyncOpenAI(base_url=f"http://{address}/v1", api_key="x") as client:
            stream = await client.chat.completions.create(
                model="chat", messages=MESSAGES, stream=True
            )
            with pytest.raises(openai.APIError, match="us-0"):
                async for _ in stream:
                    pass
    finally:
        await server.stop()
        await gateway.close()
        await channel.close()


# -- API keys ---------------------------------------------------------------------------------


def _secured(fleet: HttpFleet, key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"http://{fleet.secured_http}", headers=headers, timeout=30)


def test_missing_or_bad_key_is_401(fleet: HttpFleet) -> None:
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
    for key in (None, "sg_0123456789abcdef_notarealsecretnotarealsecret"):
        with _secured(fleet, key) as c:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert c.get("/v1/models").status_code == 401
            assert c.get("/health").status_code == 200  # probes need no key


def test_valid_key_works_with_the_openai_client(fleet: HttpFleet) -> None:
    base = f"http://{fleet.secured_http}/v1"
    with openai.OpenAI(base_url=base, api_key=fleet.keys["ok"], max_retries=0) as client:
        completion = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=3)
        assert completion.choices[0].message.content
    with (
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.models.list()


def test_missing_scope_is_403(fleet: HttpFleet) -> None:
    with _secured(fleet, fleet.keys["models_only"]) as c:
        assert c.get("/v1/models").status_code == 200
        body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_over_the_rate_limit_is_429_with_retry_after(fleet: HttpFleet) -> None:
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
    with _secured(fleet, fleet.keys["slow"]) as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 10  # whole seconds, rounded up
    assert int(r.headers["retry-after-ms"]) > 0
