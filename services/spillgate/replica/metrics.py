"""Prometheus metrics read live from the repository at scrape time (no per-request cost).

Names and labels follow Triton (`nv_inference_*`, labels model/version; counters without a
`_total` suffix, as Triton exports them) and the vLLM backend (`vllm:*`, same labels).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from spillgate.replica.repository import Repository

_LABELS = ("model", "version")

# (name, help, type, attribute of ModelStats; microsecond counters are converted from ns)
_TRITON = (
    ("nv_inference_request_success", "Number of successful inference requests", "counter"),
    ("nv_inference_request_failure", "Number of failed inference requests", "counter"),
    ("nv_inference_count", "Number of inferences performed", "counter"),
    ("nv_inference_exec_count", "Number of model executions performed", "counter"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration", "counter"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration", "counter"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration", "counter"),
    ("nv_inference_pending_request_count", "Instantaneous number of pending requests", "gauge"),
)
_VLLM = (
    ("vllm:num_requests_running", "Number of requests currently running", "gauge"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed", "gauge"),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage", "gauge"),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of tokens", "counter"),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of tokens", "counter"),
    # Not a vLLM metric: the simulator publishes its decode slots (vLLM's max_num_seqs) so
    # admission knows its capacity without configuration (`simulator` mapping only).
    ("spillgate:max_num_seqs", "Decode slots of the simulated engine (max_num_seqs)", "gauge"),
)


class RepositoryCollector(Collector):
    def __init__(self, repository: Repository) -> None:
        self._repo = repository

    def collect(self) -> Iterable[Metric]:
        families = {name: Metric(name, doc, typ) for name, doc, typ in (*_TRITON, *_VLLM)}

        def add(name: str, labels: dict[str, str], value: float) -> None:
            family = families[name]
            sample = (
                name + "_total" if family.type == "counter" and name.startswith("vllm:") else name
            )
            family.add_sample(sample, labels, value)

        for name in sorted(self._repo.loaded):
            model = self._repo.loaded[name]
            s = model.stats
            labels = dict(zip(_LABELS, (model.name, model.version), strict=True))
            add("nv_inference_request_success", labels, s.success_count)
            for reason, count in s.failures.items():
                add("nv_inference_request_failure", {**labels, "reason": reason}, count)
            add("nv_inference_count", labels, s.inference_count)
            add("nv_inference_exec_count", labels, s.execution_count)
            add("nv_inference_request_duration_us", labels, (s.success_ns + s.fail_ns) // 1000)
            add("nv_inference_queue_duration_us", labels, s.queue_ns // 1000)
            add("nv_inference_compute_infer_duration_us", labels, s.compute_ns // 1000)
            pending = s.pending
            if model.runner is not None:
                e = model.runner.stats()
                pending += e.waiting
                add("vllm:num_requests_running", labels, e.running)
                add("vllm:num_requests_waiting", labels, e.waiting)
                add("vllm:kv_cache_usage_perc", labels, e.kv_usage)
                add("vllm:prefix_cache_queries", labels, e.prefix_queries_tokens)
                add("vllm:prefix_cache_hits", labels, e.prefix_hits_tokens)
                add("spillgate:max_num_seqs", labels, model.runner.engine.config.max_num_seqs)
            add("nv_inference_pending_request_count", labels, pending)
        yield from families.values()


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text format, with Triton's counter names in the HELP/TYPE lines.

    prometheus_client names a counter family `<name>_total` in its header lines; Triton's
    counters carry no `_total`, so those headers are renamed to match their samples.
    """
    text = generate_latest(registry).decode()
    for name, _, typ in _TRITON:
        if typ == "counter":
            text = text.replace(f"# HELP {name}_total ", f"# HELP {name} ")
            text = text.replace(f"# TYPE {name}_total counter", f"# TYPE {name} counter")
    return text.encode()


def make_registry(repository: Repository) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RepositoryCollector(repository))
    return registry
