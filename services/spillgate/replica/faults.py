"""Fault injection: what an operator (or a test) can make a replica do wrong, at runtime."""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Any

from spillgate.replica.errors import TritonError, internal, unavailable


@dataclass
class FaultSettings:
    error_rate: float = 0.0  # share of inference requests failed with INTERNAL
    added_latency_ms: float = 0.0  # wall delay before each inference request executes
    stall: bool = False  # accept requests but answer none until cleared
    slow_factor: float = 1.0  # LLM model time runs this many times slower
    refuse_rate: float = 0.0  # share of inference RPCs refused UNAVAILABLE before any work

    def validate(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")
        if not 0.0 <= self.refuse_rate <= 1.0:
            raise ValueError("refuse_rate must be within [0, 1]")
        if self.added_latency_ms < 0:
            raise ValueError("added_latency_ms must be >= 0")
        if self.slow_factor < 1.0:
            raise ValueError("slow_factor must be >= 1")


class Faults:
    """Current fault settings plus the waiting room for stalled requests."""

    def __init__(self, seed: int = 0) -> None:
        self.settings = FaultSettings()
        self._rng = random.Random(seed)
        self._unstalled = asyncio.Event()
        self._unstalled.set()

    def update(self, changes: dict[str, Any]) -> FaultSettings:
        """Apply a partial update (unknown keys or bad values -> ValueError, nothing applied)."""
        known = {f.name: f.type for f in fields(FaultSettings)}
        unknown = sorted(set(changes) - set(known) - {"crash"})
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}")
        merged = {**asdict(self.settings), **{k: v for k, v in changes.items() if k != "crash"}}
        for key, value in merged.items():
            if key == "stall":
                if not isinstance(value, bool):
                    raise ValueError("stall must be true or false")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number")
            elif not math.isfinite(value):
                raise ValueError(f"{key} must be finite")
        candidate = FaultSettings(
            error_rate=float(merged["error_rate"]),
            added_latency_ms=float(merged["added_latency_ms"]),
            stall=merged["stall"],
            slow_factor=float(merged["slow_factor"]),
            refuse_rate=float(merged["refuse_rate"]),
        )
        candidate.validate()
        self.settings = candidate
        if candidate.stall:
            self._unstalled.clear()
        else:
            self._unstalled.set()
        return candidate

    def refuses(self) -> bool:
        """Whether to refuse this inference RPC at the door (UNAVAILABLE, nothing run),
        the way a server that is shutting down or shedding at its front end does."""
        rate = self.settings.refuse_rate
        return rate > 0 and self._rng.random() < rate

    async def before_inference(self) -> None:
        """Run the configured faults for one request (may wait, may raise)."""
        await self._unstalled.wait()
        if self.settings.added_latency_ms > 0:
            await asyncio.sleep(self.settings.added_latency_ms / 1000.0)
        if self.settings.error_rate > 0 and self._rng.random() < self.settings.error_rate:
            raise injected()


def injected() -> TritonError:
    return internal("injected fault: simulated backend failure")


def refused() -> TritonError:
    return unavailable("injected fault: the server refused the request before any work")
