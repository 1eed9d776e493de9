"""Admit RPC latency and throughput against a real admission process, next to the floor: a
bare grpc.aio echo server, driven by the same client code.

World: a registry process holding 3 regions (us, eu, apac) x 64 replicas of llm-small; an
admission process for us started with ``--static-signals`` (every us replica counts as idle
with fresh signals; nothing is scraped or health-checked, so the replicas need not exist).
Requests look like world.toml's shared-prefix workload (2304 prompt tokens, 144 block
hashes over 256 prefix groups, sessions) with 64 output tokens so they fit the 1200 ms
budget. The Admit arm runs in rounds of ``--round`` decisions (SERVE reserves a slot); the
tickets of a round are released between rounds, untimed. The echo server returns the request
bytes; both arms send the same pre-serialized AdmitRequests and parse the reply.

    .venv/bin/python bench/admission_rpc.py [--requests 6000] [--concurrency 16] [--json PATH]

Goal (issue): Admit p50 within 1.3x of the bare echo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))

import grpc
from _common import log, machine

from spillgate._proto import (
    admission_pb2,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from spillgate.core.prefix import block_hashes

ROOT = Path(__file__).resolve().parent.parent
ADMIT = "/spillgate.v1.AdmissionService/Admit"
RELEASE = "/spillgate.v1.AdmissionService/Release"
ECHO = "/bench.Echo/Echo"
REPLICAS = 64
RTT = {"us": {"eu": 80.5, "apac": 145.3}, "eu": {"us": 80.5, "apac": 212.4},
       "apac": {"us": 145.3, "eu": 212.4}}  # fmt: skip
DIGEST = "sha256:" + "ab" * 32


# -- processes ---------------------------------------------------------------------------------


@contextlib.contextmanager
def process(args: list[str], ready: str, timeout: float = 30.0) -> Iterator[str]:
    """Run `python args...`, yield the first group of the `ready` regex; stop it after."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(ready, line)
            if m:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("".join(lines))
        else:
            raise RuntimeError(f"{args} exited:\n" + "".join(lines))
        # Keep draining its output so it never blocks on a full pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fleet_entities() -> list[registry_pb2.Entity]:
    out = [
        registry_pb2.Entity(
            model=registry_pb2.Model(
                id="llm-small", kind=common_pb2.MODEL_KIND_LLM, max_context_tokens=8192,
                max_output_tokens=512,
            )
        ),
        registry_pb2.Entity(
            version=registry_pb2.Version(
                model="llm-small", version="v1", artifact_digest=DIGEST,
                triton_model_name="llm-small",
            )
        ),
    ]  # fmt: skip
    for region, rtt in RTT.items():
        out.append(
            registry_pb2.Entity(
                region=registry_pb2.Region(id=region, residency_zone=region, rtt_ms=rtt)
            )
        )
        for i in range(REPLICAS):
            out.append(
                registry_pb2.Entity(
                    replica=registry_pb2.Replica(
                        id=f"{region}-{i}", region=region, pool="default",
                        endpoint=f"10.{len(out) % 250}.{i}.1:8001",
                        backend=common_pb2.BACKEND_KIND_SIMULATOR,
                        loaded=[common_pb2.VersionRef(model="llm-small", version="v1")],
                        state=common_pb2.REPLICA_STATE_READY,
                    )
                )
            )  # fmt: skip
    return out


def requests(n: int, seed: int) -> list[bytes]:
    """Pre-serialized AdmitRequests: 256 prefix groups of a 2048-token system prompt plus a
    256-token question (144 block hashes), 64 output tokens, one session per group."""
    rng = random.Random(seed)
    groups = [[f"g{g}t{i}" for i in range(2048)] for g in range(256)]
    out = []
    for k in range(n):
        g = rng.randrange(256)
        tokens = groups[g] + [f"q{k}t{i}" for i in range(256)]
        ctx = common_pb2.RequestContext(
            request_id=f"r{k}", model="llm-small", session_id=f"s{g}", prompt_tokens=len(tokens),
            max_tokens=64, prefix_block_hashes=block_hashes(tokens, 16), block_size_tokens=16,
        )  # fmt: skip
        out.append(admission_pb2.AdmitRequest(context=ctx).SerializeToString())
    return out


# -- echo server --------------------------------------------------------------------------------


async def echo_server() -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo ready grpc=127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# -- client -------------------------------------------------------------------------------------


async def drive(
    address: str,
    method: str,
    payloads: list[bytes],
    concurrency: int,
    parse: Callable[[bytes], Any],
) -> tuple[list[float], float, list[Any]]:
    """Send every payload as a unary call with `concurrency` workers over one channel:
    (latencies in ms, wall seconds, parsed replies)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        latencies: list[float] = []
        replies: list[Any] = []
        feed = iter(payloads)

        async def worker() -> None:
            for payload in feed:
                t0 = time.perf_counter()
                reply = parse(await call(payload))
                latencies.append((time.perf_counter() - t0) * 1000.0)
                replies.append(reply)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started, replies


async def release_all(address: str, tickets: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(RELEASE)
        ok = admission_pb2.OUTCOME_OK
        payloads = [
            admission_pb2.ReleaseRequest(ticket_id=t, outcome=ok).SerializeToString()
            for t in tickets
        ]
        for i in range(0, len(payloads), 64):
            await asyncio.gather(*(call(p) for p in payloads[i : i + 64]))


def summarize(latencies: list[float], wall: float) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(q[98], 3),
        "per_s": round(len(latencies) / wall, 1),
    }


async def bench(
    args: argparse.Namespace, concurrency: int, admission: str, echo: str
) -> dict[str, Any]:
    payloads = requests(args.round, args.seed)
    warm = payloads[: min(500, len(payloads))]
    await drive(echo, ECHO, warm, concurrency, admission_pb2.AdmitRequest.FromString)
    e_lat, e_wall = [], 0.0
    for _ in range(max(1, args.requests // args.round)):
        lat, wall, _ = await drive(
            echo, ECHO, payloads, concurrency, admission_pb2.AdmitRequest.FromString
        )
        e_lat += lat
        e_wall += wall
    parse = admission_pb2.AdmitResponse.FromString
    _, _, replies = await drive(admission, ADMIT, warm, concurrency, parse)
    await release_all(admission, [r.decision.ticket.id for r in replies if r.decision.ticket.id])
    a_lat, a_wall, actions = [], 0.0, Counter[str]()
    for _ in range(max(1, args.requests // args.round)):
        lat, wall, replies = await drive(admission, ADMIT, payloads, concurrency, parse)
        a_lat += lat
        a_wall += wall
        actions.update(
            f"{common_pb2.Action.Name(r.decision.action)}:{r.decision.reason}" for r in replies
        )
        await release_all(
            admission, [r.decision.ticket.id for r in replies if r.decision.ticket.id]
        )
    echo_s, admit_s = summarize(e_lat, e_wall), summarize(a_lat, a_wall)
    return {
        "echo": echo_s,
        "admit": admit_s,
        "admit_actions": dict(actions),
        "ratio_p50": round(admit_s["p50_ms"] / echo_s["p50_ms"], 2),
        "ratio_p99": round(admit_s["p99_ms"] / echo_s["p99_ms"], 2),
        "ratio_per_s": round(admit_s["per_s"] / echo_s["per_s"], 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=6000, help="timed calls per arm")
    p.add_argument("--round", type=int, default=2000, help="Admits between releases")
    p.add_argument(
        "--concurrency", default="1,16", help="comma-separated client concurrencies to run"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_server:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(echo_server())
        return 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        log("starting registry, admission (--static-signals) and echo server")
        registry = stack.enter_context(
            process(
                ["-m", "spillgate.registry.app", "--db", f"{tmp}/r.db", "--port", "0"],
                r"registry ready grpc=(\S+)",
            )
        )
        with grpc.insecure_channel(registry) as channel:
            registry_pb2_grpc.RegistryServiceStub(channel).Apply(
                registry_pb2.ApplyRequest(
                    mutations=[registry_pb2.Mutation(put=e) for e in fleet_entities()]
                )
            )
        admission = stack.enter_context(
            process(
                ["-m", "spillgate.admission.app", "--region", "us", "--registry", registry,
                 "--port", "0", "--static-signals", "--log-level", "WARNING"],
                r"admission ready grpc=(\S+)",
            )
        )  # fmt: skip
        echo = stack.enter_context(
            process([str(Path(__file__)), "--echo-server"], r"echo ready grpc=(\S+)")
        )
        probe = admission_pb2.AdmitRequest(
            context=common_pb2.RequestContext(model="llm-small", prompt_tokens=10, max_tokens=8),
            dry_run=True,
        )
        with grpc.insecure_channel(admission) as channel:
            admit = channel.unary_unary(
                ADMIT, admission_pb2.AdmitRequest.SerializeToString,
                admission_pb2.AdmitResponse.FromString,
            )  # fmt: skip
            deadline = time.monotonic() + 20
            while admit(probe).decision.action != common_pb2.ACTION_SERVE:
                if time.monotonic() > deadline:
                    raise RuntimeError("admission never served (fleet not loaded?)")
                time.sleep(0.05)
        runs = {}
        for c in (int(x) for x in args.concurrency.split(",")):
            log(f"measuring {args.requests} calls per arm at concurrency {c}")
            runs[f"concurrency_{c}"] = asyncio.run(bench(args, c, admission, echo))
    result = {
        "machine": machine(),
        "fleet": f"3 regions x {REPLICAS} replicas (admission: us, static signals)",
        **runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
