"""Runtime fault injection (`/faults`, `spillgate fault`) against real replica processes.

Tests that send inference under faults own their replica; admin-API-only tests share one
module replica and reset its faults first. The session `replica` is never touched.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import NO_FAULTS, ROOT, ReplicaProcess, eventually, set_faults, start_replica
from tests.triton_helpers import final_flag, llm_inputs, simple_inputs

DEFAULTS = NO_FAULTS


@pytest.fixture
def own() -> Iterator[ReplicaProcess]:
    """A replica of this test's own, so faults never leak into other tests."""
    rp = start_replica("--speed", "20")
    yield rp
    rp.stop()


@pytest.fixture(scope="module")
def admin() -> Iterator[ReplicaProcess]:
    """A replica for tests that only touch the admin API; each resets the faults first."""
    rp = start_replica("--speed", "20")
    yield rp
    rp.stop()


@pytest.fixture
def client(own: ReplicaProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(own.grpc)
    yield c
    c.close()


# -- helpers ----------------------------------------------------------------------------------


def http(rp: ReplicaProcess, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request to the replica's metrics port."""
    req = urllib.request.Request(f"http://{rp.metrics}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def get_faults(rp: ReplicaProcess) -> dict[str, Any]:
    status, settings = http(rp, "GET", "/faults")
    assert status == 200
    return dict(settings)


def metric(rp: ReplicaProcess, name: str, model: str, **labels: str) -> float:
    """One sample from /metrics, selected by sample name and labels (version 1)."""
    with urllib.request.urlopen(f"http://{rp.metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    want = {"model": model, "version": "1", **labels}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # Triton's nv_* counters have no `_total`; the parser adds it to counter samples.
            exported = family.name if sample.name.startswith("nv_") else sample.name
            if exported == name and sample.labels == want:
                return float(sample.value)
    raise AssertionError(f"{name}{want} not exported")


def assert_simple_result(result: Any) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    assert (result.as_numpy("OUTPUT0") == a + 1).all()
    assert (result.as_numpy("OUTPUT1") == a - 1).all()


# -- error_rate ------------------------------------------------------------------------------


def test_error_rate_one_fails_every_request_with_internal_then_recovers(
    own: ReplicaProcess, client: grpcclient.InferenceServerClient
) -> None:
    backend_failures = metric(own, "nv_inference_request_failure", "simple", reason="BACKEND")
    successes = metric(own, "nv_inference_request_success", "simple")
    assert set_faults(own, error_rate=1.0) == {**DEFAULTS, "error_rate": 1.0}

    for _ in range(3):
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", simple_inputs())
        assert info.value.status() == "StatusCode.INTERNAL"
        assert "injected fault" in info.value.message()
    after = metric(own, "nv_inference_request_failure", "simple", reason="BACKEND")
    assert after == backend_failures + 3
    assert metric(own, "nv_inference_request_success", "simple") == successes
    assert client.is_server_live() and own.proc.poll() is None

    assert set_faults(own, error_rate=0) == DEFAULTS
    assert_simple_result(client.infer("simple", simple_inputs()))
    assert metric(own, "nv_inference_request_success", "simple") == successes + 1
    assert metric(own, "nv_inference_request_failure", "simple", reason="BACKEND") == after


# -- refuse_rate -----------------------------------------------------------------------------


def test_refuse_rate_one_refuses_unary_and_streams_unavailable_and_runs_nothing(
    own: ReplicaProcess, client: grpcclient.InferenceServerClient
) -> None:
    assert set_faults(own, refuse_rate=1.0) == {**DEFAULTS, "refuse_rate": 1.0}
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", simple_inputs(), request_id="refused-unary")
    assert info.value.status() == "StatusCode.UNAVAILABLE"

    async def stream() -> None:
        async with aioclient.InferenceServerClient(own.grpc) as aio:

            async def one() -> Any:
                yield {
                    "model_name": "llm-small",
                    "inputs": llm_inputs("hi", True, 4, aioclient),
                    "request_id": "refused-stream",
                }

            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _result, _error in aio.stream_infer(one()):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(stream())
    status, body = http(own, "GET", "/executions")
    assert status == 200 and not {"refused-unary", "refused-stream"} & set(body["executions"])

    assert set_faults(own, refuse_rate=0) == DEFAULTS
    assert_simple_result(client.infer("simple", simple_inputs()))


# -- stall -----------------------------------------------------------------------------------


def test_stall_holds_a_request_until_cleared(
    own: ReplicaProcess, client: grpcclient.InferenceServerClient
) -> None:
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def callback(result: Any, error: Any) -> None:
        done.put((result, error))

    assert set_faults(own, stall=True)["stall"] is True
    client.async_infer("simple", simple_inputs(), callback=callback, request_id="held")
    eventually(lambda: metric(own, "nv_inference_pending_request_count", "simple") >= 1)
    # The server keeps answering everything else while inference is stalled.
    for _ in range(3):
        assert client.is_model_ready("simple")
    assert done.empty(), "a stalled request was answered"
    assert metric(own, "nv_inference_pending_request_count", "simple") == 1

    assert set_faults(own, stall=False)["stall"] is False
    result, error = done.get(timeout=10)
    assert error is None
    assert result.get_response().id == "held"
    assert_simple_result(result)
    assert metric(own, "nv_inference_pending_request_count", "simple") == 0


# -- latency ---------------------------------------------------------------------------------


def test_added_latency_delays_each_request_at_least_that_long(
    own: ReplicaProcess, client: grpcclient.InferenceServerClient
) -> None:
    client.infer("simple", simple_inputs())  # connect first: only the request is timed
    assert set_faults(own, added_latency_ms=150)["added_latency_ms"] == 150.0
    for _ in range(2):
        start = time.perf_counter()
        result = client.infer("simple", simple_inputs())
        assert time.perf_counter() - start >= 0.150
        assert_simple_result(result)


DETERMINISTIC_LLM = """
speed = 20.0
load = ["llm-det"]

[llm.llm-det]
max_num_seqs = 4
ttft_overhead_ms = 20.0
prefill_ms_per_token = 0.0
itl_base_ms = 150.0
itl_per_seq_ms = 0.0
jitter = 0.0
"""
# 16 tokens: TTFT 20 ms + 15 inter-token gaps of 150 ms, in model time (no jitter).
LLM_MODEL_MS = 20.0 + 15 * 150.0


def timed_stream(url: str, prompt: str) -> float:
    """Wall seconds from sending a 16-token streaming request to its final response."""
    c = grpcclient.InferenceServerClient(url)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        assert c.is_model_ready("llm-det")
        start = time.perf_counter()
        c.async_stream_infer("llm-det", llm_inputs(prompt, True, 16))
        tokens = 0
        while True:
            result, error = results.get(timeout=30)
            assert error is None
            tokens += 1
            if final_flag(result):
                break
        elapsed = time.perf_counter() - start
        assert tokens == 16
        return elapsed
    finally:
        c.stop_stream()
        c.close()


def test_slow_factor_makes_llm_time_run_slower(tmp_path: Path) -> None:
    config = tmp_path / "det.toml"
    config.write_text(DETERMINISTIC_LLM)
    rp = start_replica("--speed", "20", "--config", str(config))
    try:
        baseline = timed_stream(rp.grpc, "how long does this take")
        assert baseline >= LLM_MODEL_MS / 1000 / 20
        assert set_faults(rp, slow_factor=4)["slow_factor"] == 4.0
        slow = timed_stream(rp.grpc, "how long does this take")
        # Lower bounds only (model time is exact; wall-clock upper bounds would be flaky):
        # without slow mode this stream takes ~1/4 of that.
        assert slow >= 4 * LLM_MODEL_MS / 1000 / 20, (baseline, slow)
        assert set_faults(rp, slow_factor=1)["slow_factor"] == 1.0
    finally:
        rp.stop()


# -- crash -----------------------------------------------------------------------------------


def test_crash_makes_the_process_exit_with_code_70() -> None:
    rp = start_replica("--speed", "20")
    try:
        assert http(rp, "POST", "/faults", b'{"crash": true}') == (200, {"crash": True})
        assert rp.proc.wait(timeout=10) == 70
    finally:
        assert rp.stop() == 70


# -- bad updates -----------------------------------------------------------------------------


BASELINE = {**NO_FAULTS, "added_latency_ms": 5.0, "slow_factor": 2.0}


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"bogus": 1}', "bogus"),
        (b'{"error_rate": 0.5, "nope": true}', "nope"),
        (b'{"error_rate": 2}', "error_rate"),
        (b'{"error_rate": -0.1}', "error_rate"),
        (b'{"error_rate": NaN}', "error_rate"),
        (b'{"refuse_rate": 1.5}', "refuse_rate"),
        (b'{"slow_factor": 0.5}', "slow_factor"),
        (b'{"added_latency_ms": -1}', "added_latency_ms"),
        (b'{"error_rate": "lots"}', "must be a number"),
        (b'{"slow_factor": null}', "must be a number"),
        (b"[1, 2]", "JSON object"),
        (b'"stall"', "JSON object"),
        (b"not json", ""),
        (b'{"error_rate": 0.5', ""),
    ],
)
def test_bad_fault_updates_get_400_and_change_nothing(
    admin: ReplicaProcess, body: bytes, names: str
) -> None:
    assert set_faults(admin, **BASELINE) == BASELINE
    status, answer = http(admin, "POST", "/faults", body)
    assert status == 400
    assert isinstance(answer["error"], str) and answer["error"]
    assert names in answer["error"]
    assert get_faults(admin) == BASELINE


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"stall": "false"}'),
        pytest.param(b'{"error_rate": true}'),
        pytest.param(b'{"slow_factor": Infinity}'),
        pytest.param(b'{"added_latency_ms": NaN}'),
        pytest.param(b'{"added_latency_ms": Infinity}'),
    ],
)
def test_fault_values_of_the_wrong_type_or_not_finite_are_rejected(
    admin: ReplicaProcess, body: bytes
) -> None:
    set_faults(admin, **DEFAULTS)
    try:
        status, answer = http(admin, "POST", "/faults", body)
        assert status == 400, answer
        assert get_faults(admin) == DEFAULTS
    finally:
        set_faults(admin, **DEFAULTS)


# -- `spillgate fault` -----------------------------------------------------------------------


def fault_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spillgate.cli", "fault", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_fault_cli_sets_shows_and_clears(admin: ReplicaProcess) -> None:
    set_faults(admin, **DEFAULTS)
    run = fault_cli("--url", admin.metrics, "--error-rate", "0.5", "--stall", "on")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {**DEFAULTS, "error_rate": 0.5, "stall": True}
    assert get_faults(admin) == {**DEFAULTS, "error_rate": 0.5, "stall": True}

    # No change requested: it shows the settings (and accepts a full URL).
    run = fault_cli("--url", f"http://{admin.metrics}/")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {**DEFAULTS, "error_rate": 0.5, "stall": True}

    run = fault_cli("--url", admin.metrics, "--added-latency-ms", "7", "--slow-factor", "3")
    assert json.loads(run.stdout)["added_latency_ms"] == 7.0
    assert get_faults(admin)["slow_factor"] == 3.0

    run = fault_cli("--url", admin.metrics, "--clear")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == DEFAULTS
    assert get_faults(admin) == DEFAULTS


def test_fault_cli_reports_a_rejected_update(admin: ReplicaProcess) -> None:
    set_faults(admin, **DEFAULTS)
    run = fault_cli("--url", admin.metrics, "--slow-factor", "0.5")
    assert run.returncode == 1
    assert "400" in run.stderr and "slow_factor" in run.stderr
    assert run.stdout == ""
    assert get_faults(admin) == DEFAULTS


def test_fault_cli_unreachable_url_exits_1_with_a_clear_message() -> None:
    # A bound socket that never listens: connecting to it is refused, and no one else can
    # take the port while the test runs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        run = fault_cli("--url", f"127.0.0.1:{port}", "--error-rate", "0.1")
    assert run.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


def test_executions_count_each_request_id(admin: ReplicaProcess) -> None:
    """`GET /executions` proves upstream never ran a request twice (or shows it did)."""
    with grpcclient.InferenceServerClient(admin.grpc) as client:
        client.infer("simple", simple_inputs(), request_id="once")
        client.infer("simple", simple_inputs(), request_id="twice")
        client.infer("simple", simple_inputs(), request_id="twice")
    status, body = http(admin, "GET", "/executions")
    assert status == 200
    assert body["executions"]["once"] == 1 and body["executions"]["twice"] == 2
    assert body["duplicates"] == ["twice"]
