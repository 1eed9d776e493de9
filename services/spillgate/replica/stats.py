"""Per-model counters: the single source for ModelStatistics and the Prometheus endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

# Triton's nv_inference_request_failure `reason` label values.
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@dataclass
class ModelStats:
    """Cumulative Triton-style statistics of one model version."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # sum of batch sizes of successful requests
    execution_count: int = 0
    last_inference_ms: int = 0
    failures: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0)
    )  # by Triton's `reason` label
    pending: int = 0  # accepted, not yet executing (queued)
    in_flight: int = 0  # accepted, not yet answered

    def success(self, batch: int, total_ns: int, queue_ns: int, now_ms: int) -> None:
        self.success_count += 1
        self.success_ns += total_ns
        self.queue_ns += queue_ns
        self.compute_ns += max(0, total_ns - queue_ns)
        self.inference_count += batch
        self.execution_count += 1
        self.last_inference_ms = now_ms

    def failure(self, total_ns: int, now_ms: int, reason: str = "OTHER") -> None:
        self.fail_count += 1
        self.failures[reason] += 1
        self.fail_ns += total_ns
        self.last_inference_ms = now_ms
