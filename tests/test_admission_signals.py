"""Load signals: the per-backend mapping tables (pure) and the Scraper against real replicas.

Pure tests feed fixed exposition texts; the others read real replica simulator processes
(and, for broken endpoints, a small HTTP server in the test) and poll with deadlines.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import tritonclient.grpc as grpcclient

from spillgate.admission.signals import (
    MAPPINGS,
    MetricsParseError,
    ScrapeConfig,
    Scraper,
    ScrapeState,
    ScrapeTarget,
    parse_metrics,
)
from spillgate.core.signals import ModelLoad, Signals
from tests.conftest import ReplicaProcess, eventually, start_replica, until
from tests.triton_helpers import llm_inputs

T = TypeVar("T")


def load(signals: Signals, model: str) -> ModelLoad:
    got = signals.load(model)
    assert got is not None, f"{model} not in {sorted(signals.models)}"
    return got


# -- mapping tables (pure) -------------------------------------------------------------------

# Triton core as tritonserver prints it: counters without `_total`, failures by `reason`, two
# versions of one model, plus server-wide and histogram metrics that no table maps.
TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="resnet",version="1"} 10
nv_inference_request_success{model="resnet",version="2"} 5
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="resnet",reason="REJECTED",version="1"} 2
nv_inference_request_failure{model="resnet",reason="BACKEND",version="2"} 1
# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="resnet",version="1"} 4
nv_inference_exec_count{model="resnet",version="2"} 3
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="resnet",version="1"} 1000
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="resnet",version="1"} 250
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="resnet",version="1"} 3
nv_inference_pending_request_count{model="resnet",version="2"} 1
nv_inference_pending_request_count{model="bert",version="1"} 0
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
# HELP nv_inference_first_response_histogram_ms Duration from request to first response
# TYPE nv_inference_first_response_histogram_ms histogram
nv_inference_first_response_histogram_ms_bucket{model="resnet",version="1",le="100"} 4
nv_inference_first_response_histogram_ms_bucket{model="resnet",version="1",le="+Inf"} 4
nv_inference_first_response_histogram_ms_sum{model="resnet",version="1"} 40
nv_inference_first_response_histogram_ms_count{model="resnet",version="1"} 4
"""

# A standalone vLLM server: `model_name` label, counters exported as `<name>_total` (plus
# `_created`), as prometheus_client writes them.
VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="llama"} 1.7e9
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 400.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="llama"} 7.0
"""

# TensorRT-LLM's Triton backend. The first text is the sample of the tensorrtllm_backend
# README, section "Triton Metrics" (github.com/triton-inference-server/tensorrtllm_backend):
# a release without the `waiting` request type and the `fraction` KV type.
TRTLLM_OLD_TEXT = """\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 0
# HELP nv_trt_llm_runtime_memory_metrics TRT LLM runtime memory metrics
# TYPE nv_trt_llm_runtime_memory_metrics gauge
nv_trt_llm_runtime_memory_metrics{memory_type="pinned",model="tensorrt_llm",version="1"} 0
nv_trt_llm_runtime_memory_metrics{memory_type="gpu",model="tensorrt_llm",version="1"} 1610236
nv_trt_llm_runtime_memory_metrics{memory_type="cpu",model="tensorrt_llm",version="1"} 0
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",\
model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 6239
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6239
# HELP nv_trt_llm_general_metrics General TRT LLM metrics
# TYPE nv_trt_llm_general_metrics gauge
nv_trt_llm_general_metrics{general_type="iteration_counter",model="tensorrt_llm",version="1"} 0
nv_trt_llm_general_metrics{general_type="timestamp",model="tensorrt_llm",version="1"} 1700074049
"""

# A current release: label values as NVIDIA/TensorRT-LLM's triton_backend
# custom_metrics_reporter.cc defines them (request_type adds `waiting`; kv_cache_block_type
# adds `reused` and `fraction`).
TRTLLM_TEXT = """\
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 7
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 64
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 2
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 1000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 600
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 400
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",\
model="tensorrt_llm",version="1"} 32
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="reused",model="tensorrt_llm",version="1"} 50
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",\
model="tensorrt_llm",version="1"} 0.45
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 0
nv_inference_pending_request_count{model="ensemble",version="1"} 0
"""


def test_every_backend_kind_has_a_table() -> None:
    assert set(MAPPINGS) == {"triton", "triton-vllm", "triton-trtllm", "simulator"}


def test_triton_core_sums_versions_and_failure_reasons_and_leaves_running_unknown() -> None:
    s = parse_metrics(TRITON_TEXT, "triton", now=12.5)
    assert s.time == 12.5
    assert set(s.models) == {"resnet", "bert"}
    r = load(s, "resnet")
    assert (r.pending, r.waiting) == (4, 4)
    assert r.running is None and r.kv_usage is None
    assert r.in_system == 4  # Triton core: its pending queue is the only load signal
    assert (r.success, r.failure, r.exec_count) == (15.0, 3.0, 7.0)
    assert (r.request_duration_us, r.queue_duration_us) == (1000.0, 250.0)
    assert load(s, "bert").pending == 0
    assert load(s, "bert").success == 0.0  # a counter the model lacks is 0 ...


def test_vllm_reads_model_name_label_and_total_counters() -> None:
    llama = load(parse_metrics(VLLM_TEXT, "triton-vllm", now=1.0), "llama")
    assert (llama.running, llama.waiting, llama.in_system) == (3, 2, 5)
    assert llama.kv_usage == 0.25
    assert (llama.prefix_queries_tokens, llama.prefix_hits_tokens) == (1000.0, 400.0)
    assert llama.pending is None  # ... but a gauge it lacks is unknown, not 0


def test_counters_with_and_without_total_suffix_read_the_same() -> None:
    bare = VLLM_TEXT.replace("_total", "")
    assert "_total" not in bare
    a = parse_metrics(VLLM_TEXT, "simulator", now=0.0)
    b = parse_metrics(bare, "simulator", now=0.0)
    assert a == b
    triton_total = TRITON_TEXT.replace("_success{", "_success_total{")
    assert load(parse_metrics(triton_total, "triton", 0.0), "resnet").success == 15.0


def test_trtllm_release_from_readme_derives_kv_usage_and_has_no_queue_gauge() -> None:
    t = load(parse_metrics(TRTLLM_OLD_TEXT, "triton-trtllm", now=0.0), "tensorrt_llm")
    assert (t.running, t.max_running) == (0, 512)
    assert t.waiting is None and t.in_system is None  # no `waiting` type: queue unknown
    assert t.kv_usage == pytest.approx(1 / 6239)


def test_trtllm_current_release_prefers_exported_fraction() -> None:
    s = parse_metrics(TRTLLM_TEXT, "triton-trtllm", now=0.0)
    t = load(s, "tensorrt_llm")
    assert (t.running, t.waiting, t.max_running, t.pending) == (7, 2, 64, 0)
    assert t.kv_usage == 0.45
    ensemble = load(s, "ensemble")  # Triton-core only: its load lives on tensorrt_llm
    assert ensemble.running is None and ensemble.pending == 0


def test_a_backend_reads_only_its_own_table() -> None:
    s = parse_metrics(VLLM_TEXT + TRTLLM_TEXT, "triton-trtllm", now=0.0)
    assert "llama" not in s.models
    assert load(parse_metrics(TRTLLM_TEXT, "triton-vllm", 0.0), "tensorrt_llm").running is None


def test_missing_gauges_are_none_never_zero() -> None:
    text = 'vllm:num_requests_running{model="m",version="1"} 2\n'
    m = load(parse_metrics(text, "simulator", now=0.0), "m")
    assert m.running == 2
    assert m.waiting is None and m.kv_usage is None and m.pending is None
    assert parse_metrics("", "simulator", now=0.0).models == {}


def test_unknown_metrics_unlabelled_and_non_finite_samples_are_ignored() -> None:
    text = (
        'unknown_metric{model="m"} 5\n'
        "vllm:num_requests_running 9\n"  # no model label: not attributable
        'vllm:num_requests_waiting{model="m",version="1"} NaN\n'
        'vllm:kv_cache_usage_perc{model="m",version="1"} -1\n'
        'vllm:num_requests_running{model="m",version="1"} 1\n'
    )
    m = load(parse_metrics(text, "simulator", now=0.0), "m")
    assert m.running == 1 and m.waiting is None and m.kv_usage is None


@pytest.mark.parametrize(
    "text",
    [
        'vllm:num_requests_running{model="m" 3\n',
        "vllm:num_requests_running{model=m} 3\n",
        "not a metric line at all\n",
        'vllm:num_requests_running{model="m"} three\n',
        'nv_gpu_utilization{gpu_uuid="GPU-1" 0.5\n',  # unmapped lines must be well-formed too
        "nv_gpu_utilization 0.5 1 2\n",
    ],
)
def test_malformed_text_raises_a_clear_error(text: str) -> None:
    with pytest.raises(MetricsParseError, match="malformed Prometheus text"):
        parse_metrics(text, "simulator", now=0.0)


def test_backend_kinds_are_checked_and_unspecified_means_triton() -> None:
    with pytest.raises(ValueError, match="unknown backend kind 'sglang'"):
        parse_metrics("", "sglang", now=0.0)
    assert parse_metrics(TRITON_TEXT, "", 0.0) == parse_metrics(TRITON_TEXT, "triton", 0.0)
    assert parse_metrics(TRITON_TEXT, "TRITON_VLLM", 0.0) == parse_metrics(
        TRITON_TEXT, "triton-vllm", 0.0
    )


# -- the replica simulator's real /metrics ---------------------------------------------------


def metrics_text(rp: ReplicaProcess) -> str:
    with urllib.request.urlopen(f"http://{rp.metrics}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def test_idle_simulator_reads_as_known_zero_load(replica: ReplicaProcess) -> None:
    def idle() -> Signals:
        s = parse_metrics(metrics_text(replica), "simulator", now=time.monotonic())
        assert load(s, "llm-small").in_system == 0
        return s

    s = eventually(idle)
    llm = load(s, "llm-small")
    assert (llm.running, llm.waiting, llm.pending) == (0, 0, 0)
    assert llm.kv_usage == 0.0  # exported and zero: known idle, not None
    assert llm.max_running == 64  # the simulator publishes its decode slots (default.toml)
    assert (
        load(parse_metrics(metrics_text(replica), "triton-vllm", 0.0), "llm-small").max_running
        is None
    )
    simple = load(s, "simple")  # no engine behind it: LLM gauges unknown, Triton queue known
    assert simple.running is None and simple.kv_usage is None and simple.pending == 0


SLOW_ENGINE = """\
load = ["llm-small"]
[llm.llm-small]
max_num_seqs = 2
max_waiting = 16
num_kv_blocks = 4096
itl_base_ms = 50.0
"""


@pytest.fixture
def slow_llm(tmp_path: Path) -> Iterator[ReplicaProcess]:
    """A replica whose LLM has 2 decode slots and 50 ms per token, at real-time speed."""
    config = tmp_path / "slow.toml"
    config.write_text(SLOW_ENGINE)
    rp = start_replica("--config", str(config), "--speed", "1")
    yield rp
    rp.stop()


def test_simulator_under_load_reports_running_waiting_and_kv(slow_llm: ReplicaProcess) -> None:
    client = grpcclient.InferenceServerClient(slow_llm.grpc)
    errors: list[object] = []

    def on_response(result: object, error: object) -> None:
        if error is not None:
            errors.append(error)

    client.start_stream(callback=on_response)
    try:
        for i in range(5):
            prompt = f"request {i}: " + "tell me a long story " * 20
            client.async_stream_infer("llm-small", llm_inputs(prompt, True, 2000))

        def busy() -> ModelLoad:
            m = load(parse_metrics(metrics_text(slow_llm), "simulator", 0.0), "llm-small")
            assert m.running == 2 and m.waiting == 3, m
            return m

        m = eventually(busy)
        assert m.kv_usage is not None and m.kv_usage > 0
        assert m.pending is not None and m.pending >= 3
        assert not errors
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()

    def drained() -> bool:
        m = load(parse_metrics(metrics_text(slow_llm), "simulator", 0.0), "llm-small")
        assert (m.running, m.waiting, m.kv_usage) == (0, 0, 0.0), m
        return True

    eventually(drained)  # cancelled generations give their slots and KV blocks back


# -- Scraper ---------------------------------------------------------------------------------


def scrape_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("spillgate-")]


@pytest.fixture
def pair() -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    a = start_replica("--speed", "20")
    b = start_replica("--speed", "20")
    yield a, b
    a.stop()
    b.stop()


async def test_scraper_tracks_two_replicas_and_a_killed_one_goes_stale(
    pair: tuple[ReplicaProcess, ReplicaProcess],
) -> None:
    a, b = pair
    seen: list[tuple[str, Signals]] = []
    failed: list[tuple[str, ScrapeState]] = []
    offset = 1000.0  # the injected clock, visibly not time.monotonic
    scraper = Scraper(
        ScrapeConfig(interval=0.05, timeout=0.5, max_backoff=0.2),
        clock=lambda: time.monotonic() + offset,
        on_signals=lambda rid, s: seen.append((rid, s)),
        on_failure=lambda rid, st: failed.append((rid, st)),
    )
    scraper.set_targets(
        {
            "a": (f"http://{a.metrics}/metrics", "simulator"),
            "b": ScrapeTarget(b.metrics, "simulator"),
        }
    )
    scraper.start()
    try:

        def both_scraped() -> bool:
            states = [scraper.state(r) for r in ("a", "b")]
            return all(st is not None and st.successes >= 3 for st in states)

        await until(both_scraped)
        latest_a = scraper.latest("a")
        assert latest_a is not None and latest_a.time > offset
        assert load(latest_a, "llm-small").running == 0
        assert {rid for rid, _ in seen} == {"a", "b"} and not failed

        a.stop(signal.SIGKILL)
        frozen = scraper.latest("a")
        await until(lambda: (st := scraper.state("a")) is not None and st.consecutive_failures >= 3)
        state_a = scraper.state("a")
        assert state_a is not None and state_a.last_error
        assert scraper.latest("a") is frozen  # failures never replace the last good Signals
        assert failed and {rid for rid, _ in failed} == {"a"}

        b_before = scraper.latest("b")
        assert b_before is not None
        await until(lambda: (s := scraper.latest("b")) is not None and s.time > b_before.time)
        state_b = scraper.state("b")
        assert state_b is not None and state_b.consecutive_failures == 0
        await until(lambda: scraper.fresh("a", max_age=0.3) is None)
        assert scraper.fresh("b", max_age=5.0) is not None
        assert state_a.age(time.monotonic() + offset) > 0.3
    finally:
        await scraper.close()
    assert scrape_tasks() == []


async def test_scraper_follows_target_changes(replica: ReplicaProcess) -> None:
    async with Scraper(ScrapeConfig(interval=0.05)) as scraper:
        scraper.set_targets({"r": (replica.metrics, "simulator")})
        await until(lambda: scraper.latest("r") is not None)
        with pytest.raises(ValueError, match="unknown backend kind"):
            scraper.set_targets({"r": (replica.metrics, "simulator"), "x": ("h:1", "nope")})
        assert set(scraper.targets()) == {"r"}  # a rejected update changes nothing

        scraper.set_targets({"t": (replica.metrics, "triton")})  # same replica, other table
        assert scraper.latest("r") is None and scraper.state("r") is None
        s = await until(lambda: scraper.latest("t"))
        assert s is not None
        llm = load(s, "llm-small")
        assert llm.running is None and llm.waiting == 0  # the triton table reads no vllm:*
        scraper.set_targets({})
        await until(lambda: scrape_tasks() == [])


async def _serve_broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers by path: what real endpoints do wrong, and framings that must still work."""
    ok = b'vllm:num_requests_running{model="m",version="1"} 4\n'
    try:
        while line := await reader.readline():
            path = line.split()[1].decode()
            while await reader.readline() not in (b"\r\n", b""):
                pass
            if path == "/hang":
                await reader.read()  # never answers; returns when the client gives up
                return
            if path == "/chunked":
                body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ok), ok)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
            elif path == "/eof":
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + ok)
                await writer.drain()
                return
            else:
                status, body = {
                    "/ok": (b"200 OK", ok),
                    "/garbage": (b"200 OK", b"this is { not prometheus\n"),
                }.get(path, (b"404 Not Found", b"no\n"))
                head = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n" % (status, len(body))
                writer.write(head + body)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def broken_server() -> AsyncIterator[str]:
    server = await asyncio.start_server(_serve_broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


async def test_scrape_failures_are_counted_not_raised(broken_server: str) -> None:
    paths = ("ok", "chunked", "eof", "garbage", "missing", "hang")
    async with Scraper(ScrapeConfig(interval=0.05, timeout=0.3, max_backoff=0.1)) as scraper:
        scraper.set_targets({p: (f"http://{broken_server}/{p}", "simulator") for p in paths})

        def settled() -> bool:
            states = {p: scraper.state(p) for p in paths}
            good = all(
                s is not None and s.successes >= 2 for p, s in states.items() if p in paths[:3]
            )
            bad = all(
                s is not None and s.failures >= 2 for p, s in states.items() if p in paths[3:]
            )
            return good and bad

        await until(settled)
        for p in paths[:3]:
            assert load(scraper.latest(p) or Signals(0.0), "m").running == 4, p
        errors = {
            p: (scraper.state(p) or ScrapeState(ScrapeTarget("", ""))).last_error for p in paths
        }
        assert "malformed Prometheus text" in str(errors["garbage"])
        assert "HTTP 404" in str(errors["missing"])
        assert "timed out after 0.3 s" in str(errors["hang"])
        assert all(scraper.latest(p) is None for p in paths[3:])
    assert scrape_tasks() == []
