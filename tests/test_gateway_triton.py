"""The gateway's Triton passthrough, driven by stock tritonclient against real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from spillgate._proto import admission_pb2, admission_pb2_grpc, common_pb2
from spillgate.core.prefix import block_hashes, tokenize
from spillgate.gateway.chat import Caller, Gateway
from spillgate.gateway.errors import GatewayError
from spillgate.gateway.models import ModelCatalog
from spillgate.gateway.triton import SERVICE_NAME, add_triton_passthrough
from tests.conftest import eventually, until
from tests.fleet_helpers import Fleet, start_fleet, start_gateway, state
from tests.triton_helpers import Stream, final_flag, llm_inputs, simple_inputs


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = start_fleet(tmp_path_factory.mktemp("gateway-triton") / "registry.db")
    yield f
    f.stop()


@pytest.fixture(scope="module")
def served(fleet: Fleet) -> Fleet:
    """The fleet once its gateway serves `chat` (right after start admission has no fresh
    signals yet and sheds)."""
    client = grpcclient.InferenceServerClient(fleet.gateway_address)

    def serves() -> bool:
        try:
            return client.infer("chat", llm_inputs("warm up", False, 2)) is not None
        except InferenceServerException as exc:
            assert _status(exc) == "StatusCode.RESOURCE_EXHAUSTED", exc
            return False

    try:
        eventually(serves, timeout=30)
    finally:
        client.close()
    return fleet


@pytest.fixture
def client(served: Fleet) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(served.gateway_address)
    yield c
    c.close()


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_health_metadata_and_config_answer_for_the_routed_name(client: Any) -> None:
    assert client.is_server_live()
    assert eventually(client.is_server_ready)
    assert client.is_model_ready("chat")
    assert client.is_model_ready("llm-small@v1")
    assert client.is_model_ready("llm-small", "v1")
    assert not client.is_model_ready("nope")

    meta = client.get_model_metadata("chat", as_json=True)
    assert meta["name"] == "chat"
    assert "text_input" in {t["name"] for t in meta["inputs"]}
    config = client.get_model_config("chat").config
    assert config.name == "chat"
    assert config.model_transaction_policy.decoupled
    assert client.get_model_config("simple").config.name == "simple"


def test_unknown_model_is_not_found(client: Any) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert _status(err.value) == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'nope' is not found" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", simple_inputs())
    assert _status(err.value) == "StatusCode.NOT_FOUND"


def test_unary_infer_on_an_llm_non_streaming(client: Any) -> None:
    inputs = llm_inputs("Hello from tritonclient", False, 8, exclude_input_in_output=True)
    inputs += llm_inputs("", False, 8, return_num_output_tokens=True)[3:]
    result = client.infer("chat", inputs, request_id="unary-1")
    response = result.get_response()
    assert response.model_name == "chat" and response.id == "unary-1"
    text = result.as_numpy("text_output")[0].decode()
    assert len(text.split()) == 8 and "Hello" not in text
    assert int(result.as_numpy("num_output_tokens")[0]) == 8

    with pytest.raises(InferenceServerException) as err:  # streaming needs a stream
        client.infer("chat", llm_inputs("Hello", True, 4))
    assert _status(err.value) == "StatusCode.INVALID_ARGUMENT"


def test_non_llm_model_runs_end_to_end(client: Any) -> None:
    """Triton's `simple` has no engine gauges: its pending queue is the load signal, so the
    admission serves it instead of treating it as saturated."""

    def infer() -> Any:
        return client.infer("simple", simple_inputs(), request_id="simple-1")

    result = eventually(infer)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    assert (result.as_numpy("OUTPUT0") == a + 1).all()
    assert result.get_response().model_name == "simple"


async def test_aio_client_infers_and_reads_metadata(served: Fleet) -> None:
    client = aioclient.InferenceServerClient(served.gateway_address)
    try:
        assert await client.is_model_ready("chat")
        inputs = llm_inputs("aio prompt", False, 4, mod=aioclient, exclude_input_in_output=True)
        result = await client.infer("chat", inputs)
        assert len(result.as_numpy("text_output")[0].decode().split()) == 4
    finally:
        await client.close()


def test_streaming_follows_the_vllm_contract_and_errors_stay_in_band(served: Fleet) -> None:
    stream = Stream(served.gateway_address)
    try:
        stream.client.async_stream_infer("chat", llm_inputs("Stream me", True, 6), request_id="s1")
        texts = []
        while True:
            result, error = stream.get()
            assert error is None, error
            assert result.get_response().model_name == "chat"
            assert result.get_response().id == "s1"
            texts.append(result.as_numpy("text_output")[0].decode())
            if final_flag(result):
                break
        assert len(texts) >= 2 and len("".join(texts).split()) == 6

        # An error for one request goes in-band; the stream keeps serving the next one.
        stream.client.async_stream_infer("nope", simple_inputs(), request_id="bad")
        _, error = stream.get()
        assert error is not None and "unknown model: 'nope'" in error.message()
        final = stream.finish("chat", llm_inputs("after the error", True, 3))
        assert final.get_response().model_name == "chat"
    finally:
        stream.close()


def test_concurrent_stream_requests_keep_each_requests_order(served: Fleet) -> None:
    stream = Stream(served.gateway_address)
    try:
        for i in range(3):
            stream.client.async_stream_infer(
                "chat", llm_inputs(f"prompt {i}", True, 5), request_id=f"c{i}"
            )
        finals: dict[str, list[bool]] = {}
        while len([f for f in finals.values() if f and f[-1]]) < 3:
            result, error = stream.get()
            assert error is None, error
            finals.setdefault(result.get_response().id, []).append(final_flag(result))
        for flags in finals.values():
            assert flags[-1] and not any(flags[:-1])  # the final response comes last
    finally:
        stream.close()


def test_routing_attributes_are_validated(served: Fleet) -> None:
    client = grpcclient.InferenceServerClient(served.gateway_address)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer("simple", simple_inputs(), headers={"x-spillgate-priority": "urgent"})
        assert _status(err.value) == "StatusCode.INVALID_ARGUMENT"
        assert "priority" in err.value.message()
        result = client.infer(
            "chat", llm_inputs("x", False, 2), headers={"x-spillgate-priority": "high"}
        )
        assert result.as_numpy("text_output") is not None
        bad = llm_inputs("x", False, 4)
        bad[2].set_data_from_numpy(np.array([b"not json"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as err:
            client.infer("chat", bad)
        assert _status(err.value) == "StatusCode.INVALID_ARGUMENT"
        too_many = llm_inputs("x", False, 100_000)
        with pytest.raises(InferenceServerException) as err:
            client.infer("chat", too_many)
        assert "max_tokens" in err.value.message()
    finally:
        client.close()


def test_repository_index_statistics_and_admin_load(client: Any) -> None:
    index = {
        (m["name"], m.get("version", ""))
        for m in client.get_model_repository_index(as_json=True)["models"]
    }
    assert {("chat", ""), ("llm-small", "v1"), ("simple", "1")} <= index

    client.infer("chat", llm_inputs("count me", False, 2))
    stats = client.get_inference_statistics("chat", as_json=True)["model_stats"]
    assert stats[0]["name"] == "chat" and int(stats[0]["inference_count"]) >= 1

    # Without --keys everyone may administer: load/unload reach every replica.
    client.unload_model("simple_int8")
    assert not client.is_model_ready("simple_int8")  # not in the registry either way
    client.load_model("simple_int8")


def test_with_a_key_store_load_needs_admin_and_infer_needs_a_key(
    served: Fleet, tmp_path: Path
) -> None:
    store = tmp_path / "keys.db"
    args = ["keys", "create", "--store", str(store), "--tenant", "acme", "--scopes", "chat,models"]
    created = subprocess.run(
        [sys.executable, "-m", "spillgate.cli", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.split()[0]
    gateway = start_gateway(
        "us", served.registry.address, served.admission.ready[0], "--keys", str(store)
    )
    client = grpcclient.InferenceServerClient(gateway.ready[0])
    try:
        auth = {"authorization": f"Bearer {key}"}
        with pytest.raises(InferenceServerException) as err:
            client.load_model("simple", headers=auth)
        assert _status(err.value) == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as err:
            client.infer("chat", llm_inputs("no key", False, 2))
        assert _status(err.value) == "StatusCode.UNAUTHENTICATED"
        assert key not in err.value.message()
        # The registry snapshot arrives right after start: wait for the name to resolve.
        assert eventually(lambda: client.is_model_ready("chat", headers=auth))
        result = client.infer("chat", llm_inputs("with a key", False, 2), headers=auth)
        assert result.get_response().model_name == "chat"
    finally:
        client.close()
        gateway.stop()


# -- an in-process gateway over a scripted admission -------------------------------------------


def _deny_admin(metadata: Mapping[str, str], scope: str) -> Caller:
    if scope == "admin":
        raise GatewayError(grpc.StatusCode.PERMISSION_DENIED, "API key lacks the 'admin' scope")
    return Caller(tenant="t", key_id="k")


class ScriptedAdmission(admission_pb2_grpc.AdmissionServiceServicer):
    """Answers every Admit with `decision`; records what it was asked and given back."""

    def __init__(self) -> None:
        self.decision = common_pb2.Decision()
        self.admitted: list[common_pb2.RequestContext] = []
        self.released: list[admission_pb2.ReleaseRequest] = []

    async def Admit(self, request: Any, context: Any) -> admission_pb2.AdmitResponse:
        self.admitted.append(request.context)
        return admission_pb2.AdmitResponse(decision=self.decision)

    async def Release(self, request: Any, context: Any) -> admission_pb2.ReleaseResponse:
        self.released.append(request)
        return admission_pb2.ReleaseResponse(found=True)


@dataclass
class Scripted:
    address: str
    admission: ScriptedAdmission

    def serve(self, endpoint: str, model: str, ticket: str = "t-1") -> None:
        self.admission.decision = common_pb2.Decision(
            action=common_pb2.ACTION_SERVE,
            region="us",
            replica="us-0",
            endpoint=endpoint,
            model=model,
            version="v1",
            triton_model_name=model,
            ticket=common_pb2.Ticket(id=ticket),
        )


@pytest.fixture
async def scripted(fleet: Fleet) -> AsyncIterator[Scripted]:
    """The passthrough in this process, with the fleet's registry entities, an admission
    that answers what the test scripts, and an authenticator that denies `admin`."""
    server = grpc.aio.server()
    admission = ScriptedAdmission()
    admission_pb2_grpc.add_AdmissionServiceServicer_to_server(admission, server)
    port = server.add_insecure_port("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    catalog = ModelCatalog(state(fleet.entities))
    gateway = Gateway("us", admission_pb2_grpc.AdmissionServiceStub(channel), catalog)
    assert add_triton_passthrough(server, gateway, _deny_admin) == SERVICE_NAME
    await server.start()
    try:
        yield Scripted(f"127.0.0.1:{port}", admission)
    finally:
        await gateway.close()
        await channel.close()
        await server.stop(0)


async def test_repository_load_needs_the_admin_scope(scripted: Scripted) -> None:
    client = aioclient.InferenceServerClient(scripted.address)
    try:
        with pytest.raises(InferenceServerException) as err:
            await client.load_model("simple")
        assert _status(err.value) == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as err:
            await client.unload_model("simple")
        assert _status(err.value) == "StatusCode.PERMISSION_DENIED"
        assert "admin" in err.value.message()
    finally:
        await client.close()


async def test_shed_is_resource_exhausted_with_retry_info(scripted: Scripted) -> None:
    scripted.admission.decision = common_pb2.Decision(
        action=common_pb2.ACTION_SHED, reason="no_headroom", retry_after_ms=250
    )
    async with grpc.aio.insecure_channel(scripted.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="simple", id="r")
        request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.value.trailing_metadata() or ())
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info) and info.retry_delay.ToMilliseconds() == 250

        # On a stream the same error arrives in-band, once per request, and the stream ends
        # normally when the client half-closes.
        call = stub.ModelStreamInfer(iter([request, request]))
        errors = [r async for r in call]
        assert [e.infer_response.id for e in errors] == ["r", "r"]
        assert all("no capacity for simple" in e.error_message for e in errors)
        assert await call.code() == grpc.StatusCode.OK
    assert not scripted.admission.released  # nothing admitted, nothing to give back


async def test_non_llm_model_is_admitted_by_size_and_released(
    scripted: Scripted, fleet: Fleet
) -> None:
    scripted.serve(fleet.replicas[0].grpc, "simple")
    client = aioclient.InferenceServerClient(scripted.address)
    try:
        result = await client.infer(
            "simple", simple_inputs(mod=aioclient), parameters={"spillgate_priority": "low"}
        )
        assert result.as_numpy("OUTPUT0")[0][1] == 2
    finally:
        await client.close()
    (ctx,) = scripted.admission.admitted
    assert ctx.model == "simple" and ctx.prompt_tokens == 32 and ctx.max_tokens == 1
    assert ctx.priority == common_pb2.PRIORITY_LOW and ctx.tenant == "t"
    (release,) = await until(lambda: scripted.admission.released)  # sent after the answer
    assert release.ticket_id == "t-1" and release.outcome == admission_pb2.OUTCOME_OK


async def test_llm_context_matches_chat_and_release_counts_tokens(
    scripted: Scripted, fleet: Fleet
) -> None:
    scripted.serve(fleet.replicas[1].grpc, "llm-small")
    prompt = " ".join(f"word{i}" for i in range(40))
    inputs = llm_inputs(prompt, True, 7, mod=aioclient, return_num_output_tokens=True)
    inputs[2].set_data_from_numpy(
        np.array([json.dumps({"max_tokens": 7, "cache_salt": "s"}).encode()], dtype=np.object_)
    )

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": "chat", "inputs": inputs, "request_id": "llm-1"}

    client = aioclient.InferenceServerClient(scripted.address)
    metadata = {"x-session-id": "sess-9", "x-spillgate-residency-zone": "us"}
    try:
        tokens = 0
        async for result, error in client.stream_infer(requests(), headers=metadata):
            assert error is None, error
            assert result.get_response().model_name == "chat"
            tokens += int(result.as_numpy("num_output_tokens")[0])
            if final_flag(result):
                break
    finally:
        await client.close()
    assert tokens == 7
    (ctx,) = scripted.admission.admitted
    words = tokenize(prompt)
    assert ctx.model == "chat" and ctx.prompt_tokens == len(words) == 40
    assert list(ctx.prefix_block_hashes) == list(block_hashes(words, 16, "s"))
    assert ctx.cache_salt == "s" and ctx.max_tokens == 7 and ctx.block_size_tokens == 16
    assert ctx.session_id == "sess-9" and ctx.residency_zone == "us"
    released = await until(lambda: scripted.admission.released)
    assert released[0].outcome == admission_pb2.OUTCOME_OK
    assert released[0].usage.completion_tokens == 7 and released[0].usage.prompt_tokens == 40


async def test_overflow_forwards_to_the_neighbour_gateway(
    scripted: Scripted, served: Fleet
) -> None:
    # The "neighbour" is the fleet's real gateway: it admits the hop-1 request itself.
    scripted.admission.decision = common_pb2.Decision(
        action=common_pb2.ACTION_OVERFLOW,
        reason="overflow_fit",
        region="eu",
        endpoint=served.gateway_address,
    )
    client = aioclient.InferenceServerClient(scripted.address)
    try:
        inputs = llm_inputs("spill me", False, 3, mod=aioclient, exclude_input_in_output=True)
        result = await client.infer("chat", inputs)
        assert result.get_response().model_name == "chat"
        assert len(result.as_numpy("text_output")[0].decode().split()) == 3

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": "chat", "inputs": llm_inputs("spill", True, 4, mod=aioclient)}

        finals = []
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            finals.append(final_flag(result))
            if finals[-1]:
                break
        assert finals[-1] and len(finals) >= 2
    finally:
        await client.close()
    assert not scripted.admission.released  # the neighbour holds (and releases) the slot
