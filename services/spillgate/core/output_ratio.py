"""Learned output length: a high quantile of completion_tokens / max_tokens (pure).

Completions usually stop (stop token) before ``max_tokens``, so planning decode as
``max_tokens x ITL`` sheds requests whose real answers would fit the budget. Per model version
the policy keeps the last ``window`` ratios of OK releases in a ring buffer plus the same values
sorted, and plans ``ceil(max_tokens x ratio)`` with ``ratio`` the nearest-rank ``quantile`` of
the window, never below ``floor``. Until ``min_samples`` ratios are in, the ratio is 1.0 (plan
the whole ``max_tokens``). Deterministic: no randomness, no clock.
"""

from __future__ import annotations

import bisect
import math


class OutputRatio:
    """Sliding-window quantile of completion_tokens / max_tokens for one model version."""

    __slots__ = ("_floor", "_min_samples", "_next", "_q", "_ring", "_sorted", "_window", "ratio")

    def __init__(self, quantile: float, window: int, min_samples: int, floor: float) -> None:
        self._q = quantile
        self._window = window
        self._min_samples = min_samples
        self._floor = floor
        self._ring: list[float] = []
        self._sorted: list[float] = []
        self._next = 0
        self.ratio = 1.0  # the ratio to plan with (cached: decide reads it on every request)

    def __len__(self) -> int:
        return len(self._ring)

    def observe(self, output_tokens: int, max_tokens: int) -> None:
        """Add one OK completion (ignored when either count is unknown, i.e. <= 0)."""
        if output_tokens <= 0 or max_tokens <= 0:
            return
        value = min(1.0, output_tokens / max_tokens)
        if len(self._ring) < self._window:
            self._ring.append(value)
        else:
            old = self._ring[self._next]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            self._ring[self._next] = value
            self._next = (self._next + 1) % self._window
        bisect.insort(self._sorted, value)
        n = len(self._sorted)
        if n < self._min_samples:
            return
        rank = min(n, max(1, math.ceil(self._q * n)))  # nearest rank
        self.ratio = min(1.0, max(self._floor, self._sorted[rank - 1]))


def planned_tokens(max_tokens: int, ratio: float) -> int:
    """Output length to plan decode for: ``ceil(max_tokens x ratio)``, at least 1."""
    return max(1, math.ceil(max_tokens * ratio - 1e-9)) if ratio < 1.0 else max_tokens


def capped_max_tokens(fit_tokens: int, ratio: float) -> int:
    """Largest request ``max_tokens`` whose planned length is <= ``fit_tokens``."""
    if ratio >= 1.0:
        return fit_tokens
    cap = math.floor(fit_tokens / ratio + 1e-9)
    while cap > 0 and planned_tokens(cap, ratio) > fit_tokens:
        cap -= 1
    return cap
