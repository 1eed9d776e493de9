"""Stock tritonclient (sync, aio, streaming) against a real replica simulator process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import ReplicaProcess, eventually, start_replica
from tests.triton_helpers import Stream, final_flag, llm_inputs, simple_inputs, tensor


@pytest.fixture
def client(replica: ReplicaProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(replica.grpc)
    yield c
    c.close()


def error_of(fn: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    return info.value


def test_health_and_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "triton"
    assert {"model_repository", "sequence", "statistics", "parameters"} <= set(meta["extensions"])


def test_model_ready_metadata_and_config(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_model_metadata("simple", as_json=True)
    assert meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "INT32", ["-1", "16"]),
        ("INPUT1", "INT32", ["-1", "16"]),
    ]
    config = client.get_model_config("repeat_int32", as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    assert [i["name"] for i in config["input"]] == ["IN", "DELAY", "WAIT"]


def test_simple_add_sub_batched(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("simple", simple_inputs(batch=3), request_id="r1")
    a = np.arange(16, dtype=np.int32)
    assert (result.as_numpy("OUTPUT0") == np.stack([a + 1] * 3)).all()
    assert (result.as_numpy("OUTPUT1") == np.stack([a - 1] * 3)).all()
    assert result.get_response().id == "r1"


def test_requested_output_subset(client: grpcclient.InferenceServerClient) -> None:
    out = [grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", simple_inputs(), outputs=out)
    assert result.as_numpy("OUTPUT0") is None
    assert result.as_numpy("OUTPUT1") is not None


def test_simple_int8_wraps_like_the_compiled_model(
    client: grpcclient.InferenceServerClient,
) -> None:
    a = np.full((1, 16), 127, dtype=np.int8)
    b = np.ones((1, 16), dtype=np.int8)
    result = client.infer("simple_int8", [tensor("INPUT0", a, "INT8"), tensor("INPUT1", b, "INT8")])
    assert (result.as_numpy("OUTPUT0") == -128).all()
    assert (result.as_numpy("OUTPUT1") == 126).all()


def test_simple_string(client: grpcclient.InferenceServerClient) -> None:
    a = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    b = np.array([[b"1"] * 16], dtype=np.object_)
    result = client.infer(
        "simple_string", [tensor("INPUT0", a, "BYTES"), tensor("INPUT1", b, "BYTES")]
    )
    assert [int(x) for x in result.as_numpy("OUTPUT0")[0]] == [i + 1 for i in range(16)]
    assert [int(x) for x in result.as_numpy("OUTPUT1")[0]] == [i - 1 for i in range(16)]


def test_simple_identity(client: grpcclient.InferenceServerClient) -> None:
    data = np.array([[b"hello", b"\x00binary\xff"]], dtype=np.object_)
    result = client.infer("simple_identity", [tensor("INPUT0", data, "BYTES")])
    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()


def test_sequence_matches_the_stock_sequence_client(
    client: grpcclient.InferenceServerClient,
) -> None:
    # simple_grpc_sequence_sync_infer_client.py: OUTPUT = INPUT (+1 on the START request).
    values = [11, 7, 5, 3, 2, 0, 1]
    for cid, first, sign in ((1000, 0, 1), (1001, 100, -1), ("uuid-like-id", 20, -1)):
        sent = [first] + [sign * v for v in values]
        got = []
        for i, value in enumerate(sent):
            result = client.infer(
                "simple_sequence",
                [tensor("INPUT", np.full((1, 1), value, dtype=np.int32), "INT32")],
                sequence_id=cid,
                sequence_start=i == 0,
                sequence_end=i == len(sent) - 1,
            )
            got.append(int(result.as_numpy("OUTPUT")[0][0]))
        assert got == [first + 1] + [sign * v for v in values]


def test_dyna_sequence_adds_correlation_id_at_end(client: grpcclient.InferenceServerClient) -> None:
    sent = [0, 11, 7, 1]
    got = []
    for i, value in enumerate(sent):
        result = client.infer(
            "simple_dyna_sequence",
            [tensor("INPUT", np.full((1, 1), value, dtype=np.int32), "INT32")],
            sequence_id=1000,
            sequence_start=i == 0,
            sequence_end=i == len(sent) - 1,
        )
        got.append(int(result.as_numpy("OUTPUT")[0][0]))
    assert got == [1, 11, 7, 1 + 1000]


def test_sequence_errors(client: grpcclient.InferenceServerClient) -> None:
    data = [tensor("INPUT", np.full((1, 1), 1, dtype=np.int32), "INT32")]
    err = error_of(client.infer, "simple_sequence", data)
    assert "must specify a non-zero or non-empty correlation ID" in err.message()
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    err = error_of(client.infer, "simple_sequence", data, sequence_id=424242)
    assert "must specify the START flag" in err.message()
    # After END the sequence is over: continuing it needs a new START.
    client.infer("simple_sequence", data, sequence_id=5, sequence_start=True, sequence_end=True)
    err = error_of(client.infer, "simple_sequence", data, sequence_id=5)
    assert "must specify the START flag" in err.message()


@pytest.mark.parametrize(
    ("model", "inputs_fn", "expected_status", "expected_text"),
    [
        (
            "no_such_model",
            lambda: simple_inputs(),
            "NOT_FOUND",
            "Request for unknown model: 'no_such_model' is not found",
        ),
        ("simple", lambda: simple_inputs()[:1], "INVALID_ARGUMENT", "expected 2 inputs but got 1"),
        (
            "simple",
            lambda: [tensor("INPUT0", np.zeros((1, 16), np.float32), "FP32"), simple_inputs()[1]],
            "INVALID_ARGUMENT",
            "data-type is 'FP32', but model 'simple' expects 'INT32'",
        ),
        (
            "simple",
            lambda: [
                tensor("INPUT0", np.zeros((1, 8), np.int32), "INT32"),
                tensor("INPUT1", np.zeros((1, 8), np.int32), "INT32"),
            ],
            "INVALID_ARGUMENT",
            "unexpected shape for input 'INPUT0'",
        ),
        ("simple", lambda: simple_inputs(batch=9), "INVALID_ARGUMENT", "batch-size must be <= 8"),
        (
            "simple",
            lambda: [simple_inputs()[0], tensor("EXTRA", np.zeros((1, 16), np.int32), "INT32")],
            "INVALID_ARGUMENT",
            "unexpected inference input 'EXTRA' for model 'simple'",
        ),
        (
            "simple",
            lambda: [*simple_inputs(), tensor("EXTRA", np.zeros((1, 16), np.int32), "INT32")],
            "INVALID_ARGUMENT",
            "expected 2 inputs but got 3 inputs for model 'simple'",
        ),
        (
            "repeat_int32",
            lambda: [
                tensor("IN", np.array([1], np.int32), "INT32"),
                tensor("DELAY", np.array([0], np.uint32), "UINT32"),
                tensor("WAIT", np.array([0], np.uint32), "UINT32"),
            ],
            "UNIMPLEMENTED",
            "ModelInfer RPC doesn't support models with decoupled transaction policy",
        ),
    ],
)
def test_infer_errors(
    client: grpcclient.InferenceServerClient,
    model: str,
    inputs_fn: Any,
    expected_status: str,
    expected_text: str,
) -> None:
    err = error_of(client.infer, model, inputs_fn())
    assert err.status() == f"StatusCode.{expected_status}"
    assert expected_text in err.message()


def test_byte_size_mismatch_is_rejected(client: grpcclient.InferenceServerClient) -> None:
    inputs = simple_inputs()
    inputs[0]._raw_content = inputs[0]._raw_content[:-4]  # shorter than [1,16] INT32
    err = error_of(client.infer, "simple", inputs)
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "byte size" in err.message()


def test_reserved_triton_parameters(
    replica: ReplicaProcess, client: grpcclient.InferenceServerClient
) -> None:
    # tritonclient refuses these itself, so speak the protocol directly to test the server.
    request = service_pb2.ModelInferRequest(model_name="simple")
    for t in simple_inputs():
        request.inputs.append(t._get_tensor())
        request.raw_input_contents.append(t._get_content())
    request.parameters["triton_custom"].int64_param = 1
    with grpc.insecure_channel(replica.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reserved for Triton usage" in (info.value.details() or "")
        request.parameters["sequence_start"].string_param = "yes"
        del request.parameters["triton_custom"]
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert "expected bool_param" in (info.value.details() or "")
    # Ordinary custom parameters are accepted.
    client.infer("simple", simple_inputs(), parameters={"my_param": "x"})


def test_oversized_message_gets_resource_exhausted(replica: ReplicaProcess) -> None:
    # The replica accepts up to 256 MiB per message (Triton accepts up to 2 GiB); above the
    # limit gRPC itself answers RESOURCE_EXHAUSTED and the server keeps serving.
    big = np.zeros((1, 300 * 1024 * 1024 // 4 // 16 // 1, 16), dtype=np.int32)
    c = grpcclient.InferenceServerClient(replica.grpc)
    try:
        t = grpcclient.InferInput("INPUT0", list(big.shape), "INT32")
        t.set_data_from_numpy(big)
        err = error_of(c.infer, "simple", [t, t])
        assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert c.is_server_live()
    finally:
        c.close()


def test_shared_memory_rpcs_answer_like_an_unsupported_triton(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.get_system_shared_memory_status(as_json=True) == {}
    err = error_of(client.register_system_shared_memory, "region", "/key", 64)
    assert err.status() == "StatusCode.UNIMPLEMENTED"
    err = error_of(client.register_cuda_shared_memory, "region", b"aGFuZGxl", 0, 64)
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "GPUs not supported" in err.message()


def test_statistics_count_success_and_failure(client: grpcclient.InferenceServerClient) -> None:
    def stats() -> Any:
        return client.get_inference_statistics("simple_int8", as_json=True)["model_stats"][0]

    before = stats()
    a = np.zeros((2, 16), dtype=np.int8)
    client.infer("simple_int8", [tensor("INPUT0", a, "INT8"), tensor("INPUT1", a, "INT8")])
    error_of(client.infer, "simple_int8", [tensor("INPUT0", a, "INT8")])
    after = stats()
    succ = int(after["inference_stats"]["success"].get("count", 0))
    assert succ == int(before["inference_stats"]["success"].get("count", 0)) + 1
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 2


def test_repository_index_load_unload(client: grpcclient.InferenceServerClient) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["simple"]["state"] == "READY"
    assert "state" not in index["llm-large"]  # in the repository, never loaded: name only
    client.load_model("llm-large")
    assert client.is_model_ready("llm-large")
    client.unload_model("llm-large")
    assert not client.is_model_ready("llm-large")
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["llm-large"]["state"] == "UNAVAILABLE"


def test_load_with_config_override_creates_a_model(
    client: grpcclient.InferenceServerClient,
) -> None:
    config = {
        "name": "adder_wide",
        "backend": "add_sub",
        "max_batch_size": 2,
        "input": [
            {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [4]},
            {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": [4]},
        ],
        "output": [
            {"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": [4]},
            {"name": "OUTPUT1", "data_type": "TYPE_INT32", "dims": [4]},
        ],
    }
    client.load_model("adder_wide", config=json.dumps(config))
    a = np.full((1, 4), 5, dtype=np.int32)
    result = client.infer(
        "adder_wide", [tensor("INPUT0", a, "INT32"), tensor("INPUT1", a, "INT32")]
    )
    assert (result.as_numpy("OUTPUT0") == 10).all()
    client.unload_model("adder_wide")
    assert not client.is_model_ready("adder_wide")


def test_load_failures(client: grpcclient.InferenceServerClient) -> None:
    err = error_of(client.load_model, "not_in_repository")
    assert (
        err.message() == "failed to load 'not_in_repository', failed to poll from model repository"
    )
    assert err.status() == "StatusCode.INTERNAL"
    err = error_of(client.load_model, "bad", config="{not json")
    assert "failed to load 'bad'" in err.message()
    err = error_of(client.load_model, "simple", files={"file:1/model.graphdef": b"x"})
    assert "failed to load 'simple'" in err.message()
    assert client.is_model_ready("simple")  # a failed load leaves the old one serving


def test_unload_unknown_model_succeeds_like_triton(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.unload_model("never_heard_of_it")
    assert client.is_model_ready("simple")


def test_unloaded_and_bad_version_lookups(client: grpcclient.InferenceServerClient) -> None:
    err = error_of(client.get_model_metadata, "simple", model_version="7")
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'simple' version 7 is not found"
    err = error_of(client.get_model_metadata, "simple", model_version="abc")
    assert err.status() == "StatusCode.INVALID_ARGUMENT"


# -- streaming -------------------------------------------------------------------------------


def repeat_inputs(values: list[int], delay_ms: int = 0, wait_ms: int = 0) -> list[Any]:
    return [
        tensor("IN", np.array(values, np.int32), "INT32"),
        tensor("DELAY", np.array([delay_ms] * len(values), np.uint32), "UINT32"),
        tensor("WAIT", np.array([wait_ms], np.uint32), "UINT32"),
    ]


def test_decoupled_repeat_streams_one_response_per_element(replica: ReplicaProcess) -> None:
    s = Stream(replica.grpc)
    try:
        s.client.async_stream_infer(
            "repeat_int32",
            repeat_inputs([4, 2, 0, 1]),
            request_id="rep",
            enable_empty_final_response=True,
        )
        seen = []
        while True:
            result, error = s.get()
            assert error is None
            if final_flag(result):
                assert result.get_response().outputs == []  # flags-only final response
                break
            assert result.get_response().id == "rep"
            seen.append((int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])))
        assert seen == [(4, 0), (2, 1), (0, 2), (1, 3)]
    finally:
        s.close()


def test_stream_errors_keep_the_stream_open(replica: ReplicaProcess) -> None:
    s = Stream(replica.grpc)
    try:
        s.client.async_stream_infer("no_such_model", simple_inputs(), request_id="bad")
        result, error = s.get()
        assert result is None and "unknown model" in str(error)
        s.client.async_stream_infer("simple", simple_inputs(), request_id="good")
        result, error = s.get()
        assert error is None and result.get_response().id == "good"
        assert final_flag(result)  # non-decoupled models answer once, marked final
    finally:
        s.close()


def test_llm_streaming_returns_deltas_and_token_counts(replica: ReplicaProcess) -> None:
    s = Stream(replica.grpc)
    try:
        s.client.async_stream_infer(
            "llm-small",
            llm_inputs(
                "tell me about routing",
                True,
                12,
                return_finish_reason=True,
                return_num_input_tokens=True,
                return_num_output_tokens=True,
            ),
            request_id="llm-1",
        )
        deltas, counted = [], 0
        while True:
            result, error = s.get()
            assert error is None
            deltas.append(result.as_numpy("text_output")[0].decode())
            counted += int(result.as_numpy("num_output_tokens")[0])  # a delta, like vLLM's
            assert int(result.as_numpy("num_input_tokens")[0]) == 4
            if final_flag(result):
                assert result.as_numpy("finish_reason")[0] == b"length"
                break
            assert result.as_numpy("finish_reason")[0] == b"None"
        assert counted == 12
        assert len("".join(deltas).split()) == 12  # one word per token, no repeats
        assert len(deltas) == 12
    finally:
        s.close()


def test_llm_non_streaming_prepends_the_prompt_by_default(replica: ReplicaProcess) -> None:
    s = Stream(replica.grpc)
    try:
        s.client.async_stream_infer("llm-small", llm_inputs("hello world", False, 3))
        result, error = s.get()
        assert error is None and final_flag(result)
        text = result.as_numpy("text_output")[0].decode()
        assert text.startswith("hello world") and len(text.split()) == 2 + 3
        s.client.async_stream_infer(
            "llm-small", llm_inputs("hello world", True, 3, exclude_input_in_output=False)
        )
        result, error = s.get()
        assert result is None and "exclude_input_in_output" in str(error)
    finally:
        s.close()


def test_llm_cancellation_frees_the_slot(replica: ReplicaProcess) -> None:
    def metric(name: str) -> float:
        with urllib.request.urlopen(f"http://{replica.metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + '{model="llm-small"'):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not exported")

    s = Stream(replica.grpc)
    s.client.async_stream_infer("llm-small", llm_inputs("long answer please", True, 4000))
    s.get()  # first token arrived: the sequence holds a slot
    assert metric("vllm:num_requests_running") >= 1
    s.client.stop_stream(cancel_requests=True)
    s.client.close()
    eventually(lambda: metric("vllm:num_requests_running") == 0)
    eventually(lambda: metric("vllm:kv_cache_usage_perc") == 0.0)


async def test_aio_client_infer_and_stream(replica: ReplicaProcess) -> None:
    client = aioclient.InferenceServerClient(replica.grpc)
    try:
        assert await client.is_server_ready()
        result = await client.infer("simple", simple_inputs(mod=aioclient))
        assert result.as_numpy("OUTPUT0")[0][3] == 4

        async def requests() -> Any:
            yield {
                "model_name": "llm-small",
                "inputs": llm_inputs(
                    "hi there", False, 5, mod=aioclient, exclude_input_in_output=True
                ),
                "request_id": "aio-1",
            }

        texts = []
        async for result, error in client.stream_infer(requests()):
            assert error is None
            texts.append(result.as_numpy("text_output")[0].decode())
            if final_flag(result):
                break
        assert len(texts) == 1 and len(texts[0].split()) == 5  # excluded prompt, 5 tokens
    finally:
        await client.close()


def test_stream_answers_non_decoupled_requests_in_order() -> None:
    # With 100 ms added latency, a valid request finishes long after an invalid one that
    # fails validation at once; Triton's stream handler still answers in request order.
    rp = start_replica("--speed", "20")
    s = Stream(rp.grpc)
    try:
        body = json.dumps({"added_latency_ms": 100}).encode()
        req = urllib.request.Request(f"http://{rp.metrics}/faults", data=body, method="POST")
        urllib.request.urlopen(req, timeout=5).close()
        s.client.async_stream_infer("simple", simple_inputs(), request_id="slow")
        s.client.async_stream_infer("simple", simple_inputs()[:1], request_id="invalid")
        s.client.async_stream_infer("simple", simple_inputs(), request_id="last")
        first, error = s.get()
        assert error is None and first.get_response().id == "slow"
        second, error = s.get()
        assert second is None and "expected 2 inputs" in str(error)
        third, error = s.get()
        assert error is None and third.get_response().id == "last"
    finally:
        s.close()
        rp.stop()


def test_generate_cli_streams_text_and_reports_token_counts(replica: ReplicaProcess) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spillgate.cli",
            "generate",
            "--url",
            replica.grpc,
            "--max-tokens",
            "5",
            "count my tokens please",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert "4 prompt + " in summary
    n_out = int(summary.split("+ ")[1].split(" ")[0])
    assert 1 <= n_out <= 5
    assert len(done.stdout.strip().splitlines()[0].split()) == n_out
