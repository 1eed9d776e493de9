"""The replica's Prometheus endpoint, read through Prometheus' own text parser.

Tests on the shared `replica` only send ordinary requests and compare before/after values;
the queue-overflow test starts a replica with its own config.
"""

from __future__ import annotations

import itertools
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from spillgate.core.prefix import tokenize
from tests.conftest import ReplicaProcess, eventually, start_replica
from tests.triton_helpers import Stream, final_flag, llm_inputs, tensor

TRITON_NAMES = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_pending_request_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
)
TRITON_COUNTERS = tuple(n for n in TRITON_NAMES if n != "nv_inference_pending_request_count")
VLLM_NAMES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(rp: ReplicaProcess) -> str:
    with urllib.request.urlopen(f"http://{rp.metrics}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


def scrape(rp: ReplicaProcess) -> Samples:
    """Every sample, keyed by (sample name, labels), parsed by prometheus_client."""
    out: Samples = {}
    for family in text_string_to_metric_families(scrape_text(rp)):
        for s in family.samples:
            # The parser reports a counter's samples as `<name>_total`; Triton's counters
            # (nv_*) are exported without the suffix, so key them by their exported name.
            name = family.name if s.name.startswith("nv_") else s.name
            key = (name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = float(s.value)
    return out


def value(samples: Samples, name: str, model: str, **labels: str) -> float:
    key = (name, frozenset({"model": model, "version": "1", **labels}.items()))
    assert key in samples, f"{name} for {model} {labels} not exported"
    return samples[key]


# -- exposition ------------------------------------------------------------------------------


def test_every_documented_metric_is_exported_per_model_and_version(replica: ReplicaProcess) -> None:
    samples = scrape(replica)
    for name in TRITON_NAMES:
        labels = {"reason": "BACKEND"} if name == "nv_inference_request_failure" else {}
        for model in ("simple", "llm-small", "repeat_int32"):
            assert value(samples, name, model, **labels) >= 0
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        value(samples, "nv_inference_request_failure", "simple", reason=reason)
    for name in VLLM_NAMES:
        assert value(samples, name, "llm-small") >= 0
        # vLLM metrics describe engines: the example models have none.
        assert not any(n == name and ("model", "simple") in lbl for n, lbl in samples)
    assert 0.0 <= value(samples, "vllm:kv_cache_usage_perc", "llm-small") <= 1.0
    # Every sample carries exactly model/version (plus `reason` on failures).
    for name, label_set in samples:
        keys = {k for k, _ in label_set}
        extra = {"reason"} if name == "nv_inference_request_failure" else set()
        assert keys == {"model", "version", *extra}, (name, label_set)


def test_triton_counters_are_typed_counters_holding_their_samples(
    replica: ReplicaProcess,
) -> None:
    text = scrape_text(replica)
    for name in TRITON_COUNTERS:
        assert f"# TYPE {name} counter" in text.splitlines()
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} split in pieces"
        families[family.name] = family
    for name in TRITON_COUNTERS:
        assert families[name].type == "counter"
        assert families[name].samples


def test_counters_move_with_successful_requests(replica: ReplicaProcess) -> None:
    a = np.arange(64, dtype=np.int32).reshape(4, 16)
    client = grpcclient.InferenceServerClient(replica.grpc)
    try:
        snapshots = [scrape(replica)]
        for batch in (4, 1):
            inputs = [tensor("INPUT0", a[:batch], "INT32"), tensor("INPUT1", a[:batch], "INT32")]
            result = client.infer("simple", inputs)
            assert (result.as_numpy("OUTPUT0") == 2 * a[:batch]).all()
            snapshots.append(scrape(replica))
    finally:
        client.close()

    def deltas(name: str, **labels: str) -> list[float]:
        values = [value(x, name, "simple", **labels) for x in snapshots]
        return [after - before for before, after in itertools.pairwise(values)]

    assert deltas("nv_inference_request_success") == [1, 1]
    assert deltas("nv_inference_count") == [4, 1]  # batch sizes, not requests
    assert deltas("nv_inference_exec_count") == [1, 1]
    for name in ("nv_inference_request_duration_us", "nv_inference_compute_infer_duration_us"):
        assert all(d >= 0 for d in deltas(name)), name
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        assert deltas("nv_inference_request_failure", reason=reason) == [0, 0]
    assert value(snapshots[-1], "nv_inference_pending_request_count", "simple") == 0


def test_request_duration_covers_the_time_a_request_took(replica: ReplicaProcess) -> None:
    # repeat_int32 holds the request for DELAY ms: a deterministic lower bound on duration.
    before = scrape(replica)
    s = Stream(replica.grpc)
    try:
        inputs = [
            tensor("IN", np.array([7, 8], np.int32), "INT32"),
            tensor("DELAY", np.array([30, 30], np.uint32), "UINT32"),
            tensor("WAIT", np.array([0], np.uint32), "UINT32"),
        ]
        s.client.async_stream_infer("repeat_int32", inputs, enable_empty_final_response=True)
        while not final_flag(s.get()[0]):
            pass
    finally:
        s.close()
    after = scrape(replica)

    def delta(name: str) -> float:
        return value(after, name, "repeat_int32") - value(before, name, "repeat_int32")

    assert delta("nv_inference_request_success") == 1
    assert delta("nv_inference_exec_count") == 1
    assert delta("nv_inference_request_duration_us") >= 60_000 - 1
    assert delta("nv_inference_compute_infer_duration_us") >= 60_000 - 1


# -- prefix caching --------------------------------------------------------------------------


def test_prefix_cache_hits_on_the_second_identical_prompt(replica: ReplicaProcess) -> None:
    # A unique first word gives a block-hash chain no earlier test can have cached.
    prompt = uuid.uuid4().hex + " " + " ".join(f"word{i}" for i in range(200))
    n_tokens = len(tokenize(prompt))
    block_size = 16  # llm-small in default.toml
    s = Stream(replica.grpc)
    try:
        snapshots = [scrape(replica)]
        for _ in range(2):
            s.finish("llm-small", llm_inputs(prompt, True, 2))
            snapshots.append(scrape(replica))
    finally:
        s.close()
    queries = [value(x, "vllm:prefix_cache_queries_total", "llm-small") for x in snapshots]
    hits = [value(x, "vllm:prefix_cache_hits_total", "llm-small") for x in snapshots]
    assert [queries[1] - queries[0], queries[2] - queries[1]] == [n_tokens, n_tokens]
    assert hits[1] - hits[0] == 0  # first time: nothing cached
    assert hits[2] - hits[1] == (n_tokens // block_size) * block_size  # every full block


# -- queue overflow --------------------------------------------------------------------------

ONE_SLOT = """
speed = 20.0
load = ["llm-one"]

[llm.llm-one]
max_num_seqs = 1
max_waiting = 1
ttft_overhead_ms = 10.0
prefill_ms_per_token = 0.0
itl_base_ms = 2000.0
itl_per_seq_ms = 0.0
jitter = 0.0
"""


def test_full_slots_queue_and_overflow_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "one_slot.toml"
    config.write_text(ONE_SLOT)
    rp = start_replica("--speed", "20", "--config", str(config))
    s = Stream(rp.grpc)
    try:
        # 6 tokens = 10 + 5 x 2000 model ms = ~500 ms wall each: r1 waits for r0's slot.
        for i in range(3):
            s.client.async_stream_infer(
                "llm-one", llm_inputs(f"req {i}", True, 6), request_id=f"r{i}"
            )

        def queued() -> bool:
            samples = scrape(rp)
            return (
                value(samples, "vllm:num_requests_running", "llm-one") == 1
                and value(samples, "vllm:num_requests_waiting", "llm-one") == 1
                and value(samples, "nv_inference_pending_request_count", "llm-one") >= 1
            )

        eventually(queued)
        finals: list[str] = []
        errors: list[str] = []
        while len(finals) + len(errors) < 3:
            result, error = s.get()
            if error is not None:
                errors.append(error.message())
            elif final_flag(result):
                finals.append(result.get_response().id)
        s.close()  # half-close and wait: every response the server sends has arrived
        assert s.events.empty(), "a request got more than one terminal outcome"
        assert errors == ["Exceeds maximum queue size"]
        assert finals == ["r0", "r1"]  # FIFO; the overflowing request is the third
        samples = scrape(rp)
        assert value(samples, "nv_inference_request_failure", "llm-one", reason="REJECTED") == 1
        assert value(samples, "nv_inference_request_success", "llm-one") == 2
        assert value(samples, "vllm:num_requests_running", "llm-one") == 0
        assert value(samples, "vllm:num_requests_waiting", "llm-one") == 0
    finally:
        s.close()
        rp.stop()


# -- HTTP --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/", 404),
        ("POST", "/metrics", 405),
        ("PUT", "/faults", 405),
        ("DELETE", "/metrics", 405),
    ],
)
def test_unknown_paths_and_methods(
    replica: ReplicaProcess, method: str, path: str, status: int
) -> None:
    req = urllib.request.Request(f"http://{replica.metrics}{path}", data=None, method=method)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    with info.value:
        assert info.value.code == status
        assert info.value.read()


def test_metrics_ignores_a_query_string(replica: ReplicaProcess) -> None:
    with urllib.request.urlopen(f"http://{replica.metrics}/metrics?x=1", timeout=10) as resp:
        assert b"nv_inference_request_success" in resp.read()
