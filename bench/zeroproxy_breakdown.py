"""Where a zero-proxy request's time goes, step by step, at concurrency 1.

Starts a one-region fleet (registry, one replica simulator at --speed 1000, admission; the
test suite's `start_fleet`), then sends --requests chats through ZeroProxyClient with each
step timed in place (the steps are wrapped, not changed): request validation, the request
context (prompt block hashes), the Admit RPC, building the request tensors, the replica's
first piece, then time to first token and total as the caller sees them. Prints p50s.

    .venv/bin/python bench/zeroproxy_breakdown.py [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests/

from _common import begin, header, log

import spillgate.gateway.chat as chat_mod
import spillgate.gateway.forward as forward
from spillgate._proto import gateway_pb2
from spillgate.zeroproxy import ZeroProxyClient
from tests.fleet_helpers import start_fleet

MESSAGES = [gateway_pb2.ChatMessage(role="user", content="Where should this request run?")]
TIMES: dict[str, list[float]] = {}


def record(step: str, since: float) -> None:
    TIMES.setdefault(step, []).append((time.perf_counter() - since) * 1000)


def timed(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            record(step, t0)

    return wrapper


def instrument() -> None:
    admit = chat_mod.Gateway.admit
    generate = forward.Replicas.generate

    async def timed_admit(self: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await admit(self, *args)
        finally:
            record("Admit RPC", t0)

    async def timed_generate(self: Any, *args: Any) -> AsyncGenerator[Any, None]:
        t0, first = time.perf_counter(), True
        async for piece in generate(self, *args):
            if first:
                record("replica: first piece", t0)
                first = False
            yield piece

    chat_mod._validate = timed("validate", chat_mod._validate)  # type: ignore[assignment]
    chat_mod.Gateway._context = timed("request context", chat_mod.Gateway._context)  # type: ignore[method-assign]
    chat_mod.Gateway.admit = timed_admit  # type: ignore[method-assign]
    forward.vllm_inputs = timed("request tensors", forward.vllm_inputs)
    forward.Replicas.generate = timed_generate  # type: ignore[method-assign]


async def run(requests: int) -> None:
    fleet = start_fleet(Path(tempfile.mkdtemp()) / "registry.db", replicas=1, speed="1000")
    request = gateway_pb2.ChatRequest(model="chat", messages=MESSAGES, max_tokens=16)
    try:
        address = fleet.admission.ready[0]
        async with ZeroProxyClient("us", registry=fleet.registry.address, admission=address) as c:
            for _ in range(200):  # until admission has fresh signals, then warm up
                try:
                    [r async for r in c.chat(request, timeout=10)]
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            for _ in range(50):
                [r async for r in c.chat(request, timeout=10)]
            TIMES.clear()
            log(f"timing {requests} requests")
            for _ in range(requests):
                t0, first = time.perf_counter(), 0.0
                async for _ in c.chat(request, timeout=10):
                    first = first or time.perf_counter()
                TIMES.setdefault("caller: first token", []).append((first - t0) * 1000)
                record("caller: total", t0)
    finally:
        fleet.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    info, cmd = begin()
    instrument()
    asyncio.run(run(args.requests))
    print(header(info, cmd) + "\n")
    print("| step | p50 (ms) |\n|---|---:|")
    for step, values in TIMES.items():
        print(f"| {step} | {statistics.median(values):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
