"""Load signals: one replica's scraped load, normalized across serving backends (pure data).

The admission service scrapes each replica's Prometheus endpoint and maps each backend's
metric names (Triton core, vLLM-style, TensorRT-LLM) onto these types; the policy only
ever sees these. A value the backend does not export is None: the policy treats unknown
load pessimistically (DESIGN.md principle 6), never as idle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelLoad:
    """Load of one model (Triton model name) on one replica at scrape time."""

    running: int | None = None  # sequences being executed / decoded now
    waiting: int | None = None  # requests queued inside the replica
    kv_usage: float | None = None  # KV-cache use, 0..1
    pending: int | None = None  # Triton's own queue (nv_inference_pending_request_count)
    max_running: int | None = None  # concurrent-sequence capacity, where the backend exports it
    # Cumulative counters (monotonic while the replica process lives; a drop = restart).
    success: float = 0.0  # successful requests
    failure: float = 0.0  # failed requests
    request_duration_us: float = 0.0  # summed request duration of finished requests
    queue_duration_us: float = 0.0  # summed time requests waited in Triton's queue
    exec_count: float = 0.0  # model executions (batches) performed
    prefix_queries_tokens: float = 0.0  # prompt tokens looked up in the prefix cache
    prefix_hits_tokens: float = 0.0  # of those, tokens found cached

    @property
    def in_system(self) -> int | None:
        """Requests inside the replica: running + waiting for engines that report them (vLLM,
        TensorRT-LLM); else Triton core's pending count (models without an engine, such as
        `simple`, only have that queue signal); None when nothing is known."""
        if self.running is not None and self.waiting is not None:
            return self.running + self.waiting
        return self.pending


@dataclass(frozen=True)
class Signals:
    """One successful scrape of one replica."""

    time: float  # clock seconds (the admission's injected clock) when the scrape completed
    models: Mapping[str, ModelLoad] = field(default_factory=dict)  # Triton model name -> load

    def load(self, triton_model_name: str) -> ModelLoad | None:
        """The model's load, or None when the replica did not report that model."""
        return self.models.get(triton_model_name)
