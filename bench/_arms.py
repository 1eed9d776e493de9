"""Side-by-side measurement of request "arms" (the same work by different paths), shared by
the overhead benchmarks (bench/gateway_overhead.py, bench/envoy_overhead.py).

An arm is a name and a coroutine that sends one request and times it (`Sample`). `measure`
warms every arm, then runs them in alternating rounds, the order rotating, so drift on a
noisy machine hits all arms alike; per arm it records latencies, wall time, the CPU time of
the named processes and the CPU other processes on the machine used meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import log

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    total_s: float
    ttft_s: float = 0.0  # time to the first token (streamed calls)
    pieces: int = 0  # text pieces received (streamed calls)


@dataclass
class ArmResult:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds
    other_cpu_s: float = 0.0  # processes outside this benchmark: the machine was not quiet
    errors: int = 0
    first_error: str = ""

    def summary(self) -> dict[str, Any]:
        total = [s.total_s * 1000 for s in self.samples]
        ttft = [s.ttft_s * 1000 for s in self.samples]
        n = len(self.samples)
        return {
            "requests": n,
            "errors": self.errors,
            "first_error": self.first_error,
            "total_p50_ms": pct(total, 50),
            "total_p99_ms": pct(total, 99),
            "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99),
            "per_s": n / self.wall_s if self.wall_s else 0.0,
            "pieces": sorted({s.pieces for s in self.samples}),
            "cpu_us_per_req": {
                name: 1e6 * s / n if n else float("nan") for name, s in self.cpu_s.items()
            },
            "other_processes_cores": self.other_cpu_s / self.wall_s if self.wall_s else 0.0,
        }


def pct(values: list[float], p: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))] if xs else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (busy = not idle, not iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK


One = Callable[[str], Awaitable[Sample]]


async def batch(one: One, arm: str, n: int, concurrency: int, out: ArmResult) -> None:
    """`n` requests on `arm` with `concurrency` workers; appends to `out`."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                out.samples.append(await one(arm))
            except Exception as exc:  # count it, keep going; a dead fleet shows as errors
                out.errors += 1
                out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"[:200]

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(
    one: One,
    arms: Sequence[str],
    concurrency: int,
    requests: Callable[[str], int],
    rounds: int,
    pids: Mapping[str, int],
    warm: int,
) -> dict[str, ArmResult]:
    """Warm every arm (`warm` untimed requests), then `rounds` alternating rounds of
    `requests(arm) // rounds` requests each; CPU time is recorded for every process in
    `pids` (name -> pid)."""
    results = {arm: ArmResult() for arm in arms}
    warmup = ArmResult()
    for arm in arms:  # channels, connections, caches: untimed
        await batch(one, arm, warm, concurrency, warmup)
    if warmup.errors:
        raise RuntimeError(f"warmup failed ({warmup.errors} errors): {warmup.first_error}")
    for r in range(rounds):
        order = [*arms[r % len(arms) :], *arms[: r % len(arms)]]
        for arm in order:
            res = results[arm]
            c0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
            m0, t0 = machine_busy_seconds(), time.perf_counter()
            await batch(one, arm, max(1, requests(arm) // rounds), concurrency, res)
            res.wall_s += time.perf_counter() - t0
            c1 = {k: cpu_seconds(pid) for k, pid in pids.items()}
            for k in pids:
                res.cpu_s[k] = res.cpu_s.get(k, 0.0) + c1[k] - c0[k]
            ours = sum(c1.values()) - sum(c0.values())
            res.other_cpu_s += max(0.0, machine_busy_seconds() - m0 - ours)
        log(f"  c={concurrency} round {r + 1}/{rounds} done")
    return results


async def wait_served(one: One, arm: str, timeout: float, what: str) -> None:
    """Poll `arm` until one request succeeds (registry applied, signals scraped, health
    checks passed); RuntimeError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await one(arm)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {exc}") from None
        await asyncio.sleep(0.1)


def other_load_line(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The line under a table that says how busy the rest of the machine was."""
    other = max(a["other_processes_cores"] for a in summaries.values())
    return f"CPU cores used by processes outside the benchmark (max over arms): {other:.2f}"
