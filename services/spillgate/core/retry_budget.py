"""Retry throttling as in gRPC's gRFC A6: retries stop when too many recent attempts failed.

A token count starts at `max_tokens`; every failure costs 1, every success earns
`token_ratio`; a retry is allowed only while the count is above half of `max_tokens`. So at
steady state at most about `token_ratio` retries per success are sent, and a dead backend
quickly stops attracting retries. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RetryBudget:
    """gRFC A6 retry throttling (defaults: max_tokens 10, token_ratio 0.1)."""

    max_tokens: float = 10.0
    token_ratio: float = 0.1
    tokens: float = -1.0  # -1: start full

    def __post_init__(self) -> None:
        if self.max_tokens <= 0 or not 0 < self.token_ratio <= 1:
            raise ValueError("max_tokens must be > 0 and token_ratio in (0, 1]")
        if self.tokens < 0:
            self.tokens = self.max_tokens

    def on_success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def on_failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def allow_retry(self) -> bool:
        """Whether one more attempt may be sent now."""
        return self.tokens > self.max_tokens / 2
