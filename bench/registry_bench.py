"""Registry throughput, watch fan-out and snapshot cost on this machine.

Starts one real registry (`python -m spillgate.registry.app --db <tmp> --port 0`), loads
--regions x --replicas-per-region replicas through Apply, then measures over gRPC:

  writes     Put of one replica (a heartbeat-sized write), sequentially and from
             --writers concurrent asyncio tasks: throughput and p50/p99 latency
  fan-out    --watchers Watch streams in --watch-procs child processes; for --fanout-writes
             Puts, the time from the Put's acknowledgement until every watcher has seen
             that revision (CLOCK_MONOTONIC is shared by all processes)
  snapshot   GetSnapshot size and latency, the time until a Watch from revision 0 delivers
             its snapshot, and the restart time (process start to ready line) on that db

    .venv/bin/python bench/registry_bench.py [--replicas-per-region 10000] [--json PATH]

Loopback only; the registry is stopped on exit, Ctrl-C or error. Progress goes to stderr,
the Markdown table to stdout. Clients raise their gRPC receive limit (default 4 MiB) so a
large snapshot arrives; the table says whether the snapshot would fit the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from _common import begin, header, log
from google.protobuf import timestamp_pb2

from spillgate._proto import common_pb2, registry_pb2, registry_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
_READY = re.compile(r"spillgate registry ready grpc=(\S+) revision=(\d+)")
_TICK = os.sysconf("SC_CLK_TCK")
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]
DIGEST = "sha256:" + "ab" * 32
REGION_IDS = ["us", "eu", "apac", "sa", "af", "me", "au", "ca"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100.0 * len(ordered)))]


# -- the registry process --------------------------------------------------------------------


@dataclass
class Registry:
    proc: subprocess.Popen[str]
    address: str = ""
    revision: int = 0
    ready_s: float = 0.0  # process start to ready line
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def stop(self) -> int | None:
        """SIGTERM (graceful), SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pump is not None:
            self.pump.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def start_registry(db: Path, timeout: float) -> Registry:
    cmd = [sys.executable, "-m", "spillgate.registry.app", "--db", str(db), "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    registry = Registry(proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            registry.lines.append(line)
            del registry.lines[:-200]  # keep the tail for error reports
            m = _READY.search(line)
            if m and not registry.address:
                registry.ready_s = time.monotonic() - t0
                registry.address, registry.revision = m.group(1), int(m.group(2))
                ready.set()
        ready.set()

    registry.pump = threading.Thread(target=pump, name="registry-output", daemon=True)
    registry.pump.start()
    if not ready.wait(timeout) or not registry.address:
        registry.stop()
        raise RuntimeError("registry did not become ready:\n" + "".join(registry.lines[-40:]))
    log(f"registry ready at {registry.address} in {registry.ready_s:.2f} s (pid {proc.pid})")
    return registry


# -- entities --------------------------------------------------------------------------------


def replica(region: str, i: int, generation: int = 0) -> registry_pb2.Entity:
    """A replica as a Triton replica registers itself: two loaded versions, one GPU."""
    host = f"10.{REGION_IDS.index(region)}.{i // 250}.{i % 250 + 1}"
    state = (
        common_pb2.REPLICA_STATE_READY
        if generation % 2 == 0
        else common_pb2.REPLICA_STATE_NOT_READY
    )
    return registry_pb2.Entity(
        replica=registry_pb2.Replica(
            id=f"{region}-{i:05d}",
            region=region,
            pool="default",
            endpoint=f"{host}:8001",
            metrics_endpoint=f"http://{host}:8002/metrics",
            backend=common_pb2.BACKEND_KIND_TRITON_VLLM,
            loaded=[
                common_pb2.VersionRef(model="llama-3.1-8b", version="v3"),
                common_pb2.VersionRef(model="llama-3.1-8b", version=f"v{4 + generation % 2}"),
            ],
            gpus=[i % 8],
            gpu_type="H100-80GB",
            state=state,
            # Distinct per update, as a heartbeat's new lease is: every Put is a real write.
            lease_expires_at=timestamp_pb2.Timestamp(seconds=1_750_000_000 + generation),
        )
    )


def foundation(regions: list[str]) -> list[registry_pb2.Mutation]:
    entities = [
        registry_pb2.Entity(region=registry_pb2.Region(id=r, residency_zone=r)) for r in regions
    ]
    entities.append(
        registry_pb2.Entity(
            model=registry_pb2.Model(id="llama-3.1-8b", kind=common_pb2.MODEL_KIND_LLM)
        )
    )
    entities += [
        registry_pb2.Entity(
            version=registry_pb2.Version(model="llama-3.1-8b", version=v, artifact_digest=DIGEST)
        )
        for v in ("v3", "v4")
    ]
    entities += [
        registry_pb2.Entity(
            placement=registry_pb2.Placement(
                model="llama-3.1-8b", version="v3", region=r, pool="default", max_replicas=10
            )
        )
        for r in regions
    ]
    return [registry_pb2.Mutation(put=e) for e in entities]


# -- watch fan-out child process -------------------------------------------------------------


def watcher_child(address: str, watchers: int, from_revision: int, conn: Connection) -> None:
    """Run `watchers` Watch streams; send (revision, monotonic time) when all have seen it."""
    asyncio.run(_watchers(address, watchers, from_revision, conn))


async def _watchers(address: str, watchers: int, from_revision: int, conn: Connection) -> None:
    seen: dict[int, int] = {}
    async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)

        async def watch() -> None:
            last = from_revision
            request = registry_pb2.WatchRequest(from_revision=from_revision)
            async for response in stub.Watch(request):
                revision = response.event.revision
                if revision <= last:
                    continue  # a progress event
                last = revision
                count = seen.get(revision, 0) + 1
                seen[revision] = count
                if count == watchers:
                    # The first revision after from_revision only proves the subscriptions.
                    conn.send((revision, time.monotonic()))
                    del seen[revision]

        tasks = [asyncio.create_task(watch()) for _ in range(watchers)]
        stop = asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- phases ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, registry: Registry, db: Path) -> None:
        self.args = args
        self.registry = registry
        self.db = db
        self.regions = REGION_IDS[: args.regions]
        self.results: dict[str, Any] = {}
        self.generation = 0

    def next_put(self, n: int) -> registry_pb2.PutRequest:
        """The n-th heartbeat-like update: a replica flips its state and a loaded version."""
        region = self.regions[n % len(self.regions)]
        i = (n // len(self.regions)) % self.args.replicas_per_region
        self.generation += 1
        return registry_pb2.PutRequest(entity=replica(region, i, self.generation))

    async def load(self, stub: registry_pb2_grpc.RegistryServiceAsyncStub) -> None:
        a = self.args
        t0 = time.monotonic()
        await stub.Apply(registry_pb2.ApplyRequest(mutations=foundation(self.regions)))
        batch: list[registry_pb2.Mutation] = []
        applies = 0
        total = len(self.regions) * a.replicas_per_region
        for region in self.regions:
            for i in range(a.replicas_per_region):
                batch.append(registry_pb2.Mutation(put=replica(region, i)))
                if len(batch) == a.batch:
                    await stub.Apply(registry_pb2.ApplyRequest(mutations=batch))
                    applies, batch = applies + 1, []
        if batch:
            await stub.Apply(registry_pb2.ApplyRequest(mutations=batch))
            applies += 1
        elapsed = time.monotonic() - t0
        log(f"loaded {total} replicas in {applies} Applies in {elapsed:.1f} s")
        self.results["load"] = {
            "replicas": total,
            "applies": applies,
            "batch": a.batch,
            "seconds": elapsed,
            "replicas_per_s": total / elapsed,
        }

    async def writes(
        self, stub: registry_pb2_grpc.RegistryServiceAsyncStub, name: str, writers: int, count: int
    ) -> None:
        latencies: list[float] = []
        counter = iter(range(count))
        cpu0 = cpu_seconds(self.registry.proc.pid)

        async def writer() -> None:
            for n in counter:
                request = self.next_put(n)
                t0 = time.perf_counter()
                await stub.Put(request)
                latencies.append((time.perf_counter() - t0) * 1000.0)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(self.registry.proc.pid) - cpu0
        r = {
            "writers": writers,
            "writes": count,
            "writes_per_s": count / elapsed,
            "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99),
            "server_cpu_us_per_write": 1e6 * cpu / count,
        }
        self.results[name] = r
        log(
            f"{name}: {r['writes_per_s']:.0f} writes/s, p50 {r['p50_ms']:.2f} ms, "
            f"p99 {r['p99_ms']:.2f} ms, registry CPU {r['server_cpu_us_per_write']:.0f} µs/write"
        )

    async def fanout(self, stub: registry_pb2_grpc.RegistryServiceAsyncStub) -> None:
        a = self.args
        start = (await stub.GetSnapshot(registry_pb2.GetSnapshotRequest())).snapshot.revision
        # Subscribe one revision back: the stream resumes from history (no 30k snapshot per
        # watcher) and its first event proves every watcher is subscribed.
        from_revision = start - 1
        ctx = mp.get_context("spawn")
        per_proc = [
            a.watchers // a.watch_procs + (i < a.watchers % a.watch_procs)
            for i in range(a.watch_procs)
        ]
        pipes: list[Connection] = []
        procs = []
        for n in per_proc:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=watcher_child, args=(self.registry.address, n, from_revision, child)
            )
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        loop = asyncio.get_running_loop()

        async def all_seen(revision: int, timeout: float) -> float:
            """Monotonic time when the last child reported every watcher past `revision`."""
            times: list[float] = []
            for pipe in pipes:
                while True:
                    ready = await loop.run_in_executor(None, pipe.poll, timeout)
                    if not ready:
                        raise TimeoutError(f"watchers did not see revision {revision}")
                    got, t = pipe.recv()
                    if got >= revision:
                        times.append(t)
                        break
            return max(times)

        try:
            await all_seen(start, 60.0)
            log(f"fan-out: {a.watchers} watchers in {a.watch_procs} process(es) subscribed")
            after_ack: list[float] = []
            after_send: list[float] = []
            cpu0 = cpu_seconds(self.registry.proc.pid)
            for n in range(a.fanout_writes):
                request = self.next_put(n)
                t_send = time.monotonic()
                response = await stub.Put(request)
                t_ack = time.monotonic()
                t_all = await all_seen(response.revision, 10.0)
                after_ack.append((t_all - t_ack) * 1000.0)
                after_send.append((t_all - t_send) * 1000.0)
                await asyncio.sleep(a.fanout_gap_ms / 1000.0)
            cpu = cpu_seconds(self.registry.proc.pid) - cpu0
        finally:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send("stop")
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        r = {
            "watchers": a.watchers,
            "watch_procs": a.watch_procs,
            "writes": a.fanout_writes,
            "ack_to_all_p50_ms": pct(after_ack, 50),
            "ack_to_all_p99_ms": pct(after_ack, 99),
            "send_to_all_p50_ms": pct(after_send, 50),
            "send_to_all_p99_ms": pct(after_send, 99),
            "server_cpu_ms_per_write": 1e3 * cpu / a.fanout_writes,
        }
        self.results["fanout"] = r
        log(
            f"fan-out: ack -> all {a.watchers} seen p50 {r['ack_to_all_p50_ms']:.2f} ms, "
            f"p99 {r['ack_to_all_p99_ms']:.2f} ms"
        )

    async def snapshot(self, stub: registry_pb2_grpc.RegistryServiceAsyncStub) -> None:
        a = self.args
        get_ms: list[float] = []
        size = 0
        for _ in range(a.snapshot_repeats):
            t0 = time.perf_counter()
            response = await stub.GetSnapshot(registry_pb2.GetSnapshotRequest())
            get_ms.append((time.perf_counter() - t0) * 1000.0)
            size = response.ByteSize()
        snapshot = response.snapshot
        watch_ms: list[float] = []
        for _ in range(a.snapshot_repeats):
            t0 = time.perf_counter()
            call = stub.Watch(registry_pb2.WatchRequest(from_revision=0))
            first = await call.read()
            watch_ms.append((time.perf_counter() - t0) * 1000.0)
            call.cancel()
            assert isinstance(first, registry_pb2.WatchResponse)
            if len(first.event.snapshot.replicas) != len(snapshot.replicas):
                raise RuntimeError("Watch from 0 delivered an incomplete snapshot")
        r = {
            "replicas": len(snapshot.replicas),
            "revision": snapshot.revision,
            "bytes": size,
            "fits_default_4mib": size <= DEFAULT_MAX_MESSAGE,
            "get_p50_ms": statistics.median(get_ms),
            "get_max_ms": max(get_ms),
            "watch0_p50_ms": statistics.median(watch_ms),
            "watch0_max_ms": max(watch_ms),
        }
        self.results["snapshot"] = r
        log(
            f"snapshot: {size / 1e6:.2f} MB, GetSnapshot p50 {r['get_p50_ms']:.0f} ms, "
            f"Watch-from-0 first event p50 {r['watch0_p50_ms']:.0f} ms"
        )

    def restart(self) -> None:
        times: list[float] = []
        for _ in range(self.args.restarts):
            code = self.registry.stop()
            if code != 0:
                raise RuntimeError(f"registry exited with code {code} on SIGTERM")
            self.registry = start_registry(self.db, timeout=60)
            times.append(self.registry.ready_s)
        self.results["restart"] = {
            "restarts": len(times),
            "ready_p50_s": statistics.median(times),
            "ready_max_s": max(times),
            "revision": self.registry.revision,
        }

    async def run(self) -> dict[str, Any]:
        a = self.args
        async with grpc.aio.insecure_channel(self.registry.address, options=CLIENT_OPTIONS) as ch:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            # Empty registry first: the restart baseline.
            self.results["empty_ready_s"] = self.registry.ready_s
            await self.load(stub)
            await self.writes(stub, "put_seq", 1, a.writes)
            await self.writes(stub, f"put_c{a.writers}", a.writers, a.writes)
            await self.fanout(stub)
            await self.snapshot(stub)
        return self.results


# -- report ----------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f} ms"


def table(r: dict[str, Any], args: argparse.Namespace) -> str:
    seq, conc = r["put_seq"], r[f"put_c{args.writers}"]
    fo, snap, rs, load = r["fanout"], r["snapshot"], r["restart"], r["load"]
    rows = [
        (
            f"load: {load['replicas']:,} replicas via Apply ({load['batch']} per Apply)",
            f"{load['seconds']:.1f} s ({load['replicas_per_s']:,.0f} replicas/s)",
        ),
        ("Put writes/s, 1 writer", f"{seq['writes_per_s']:,.0f}"),
        ("Put p50 / p99, 1 writer", f"{_ms(seq['p50_ms'])} / {_ms(seq['p99_ms'])}"),
        (f"Put writes/s, {args.writers} writers", f"{conc['writes_per_s']:,.0f}"),
        (
            f"Put p50 / p99, {args.writers} writers",
            f"{_ms(conc['p50_ms'])} / {_ms(conc['p99_ms'])}",
        ),
        (
            "registry CPU per Put (1 / N writers)",
            f"{seq['server_cpu_us_per_write']:,.0f} µs / {conc['server_cpu_us_per_write']:,.0f} µs",
        ),
        (
            f"Put ack -> all {fo['watchers']} watchers saw it, p50 / p99 ({fo['writes']} writes)",
            f"{_ms(fo['ack_to_all_p50_ms'])} / {_ms(fo['ack_to_all_p99_ms'])}",
        ),
        (
            f"Put sent -> all {fo['watchers']} watchers saw it, p50 / p99",
            f"{_ms(fo['send_to_all_p50_ms'])} / {_ms(fo['send_to_all_p99_ms'])}",
        ),
        (
            f"registry CPU per write with {fo['watchers']} watchers",
            _ms(fo["server_cpu_ms_per_write"]),
        ),
        (
            f"snapshot size ({snap['replicas']:,} replicas)",
            f"{snap['bytes']:,} B ({snap['bytes'] / 2**20:.2f} MiB; "
            f"{'fits' if snap['fits_default_4mib'] else 'EXCEEDS'} gRPC's 4 MiB default)",
        ),
        (
            f"GetSnapshot latency p50 / max ({args.snapshot_repeats} calls)",
            f"{_ms(snap['get_p50_ms'], 0)} / {_ms(snap['get_max_ms'], 0)}",
        ),
        (
            "Watch from 0: snapshot delivered, p50 / max",
            f"{_ms(snap['watch0_p50_ms'], 0)} / {_ms(snap['watch0_max_ms'], 0)}",
        ),
        ("restart to ready line, empty db", f"{r['empty_ready_s']:.2f} s"),
        (
            f"restart to ready line, {snap['replicas']:,}-replica db, p50 / max "
            f"({rs['restarts']} restarts)",
            f"{rs['ready_p50_s']:.2f} s / {rs['ready_max_s']:.2f} s",
        ),
    ]
    out = ["| metric | value |", "|---|---:|"]
    out += [f"| {m} | {v} |" for m, v in rows]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="registry_bench.py", description="Measure the registry service on this machine."
    )
    p.add_argument("--regions", type=int, default=3, help="regions (default 3)")
    p.add_argument(
        "--replicas-per-region", type=int, default=10_000, help="replicas loaded per region"
    )
    p.add_argument("--batch", type=int, default=1000, help="replicas per Apply while loading")
    p.add_argument("--writes", type=int, default=1000, help="Puts per write phase")
    p.add_argument("--writers", type=int, default=8, help="concurrent writers (asyncio tasks)")
    p.add_argument("--watchers", type=int, default=100, help="concurrent Watch subscribers")
    p.add_argument("--watch-procs", type=int, default=1, help="client processes for watchers")
    p.add_argument("--fanout-writes", type=int, default=50, help="Puts timed for fan-out")
    p.add_argument("--fanout-gap-ms", type=float, default=20.0, help="pause between them")
    p.add_argument("--snapshot-repeats", type=int, default=5, help="GetSnapshot / Watch-0 calls")
    p.add_argument("--restarts", type=int, default=3, help="registry restarts timed")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.regions <= len(REGION_IDS):
        p.error(f"--regions must be 1..{len(REGION_IDS)}")
    positive = ("replicas_per_region", "batch", "writes", "writers", "watchers", "watch_procs")
    for name in (*positive, "fanout_writes", "snapshot_repeats", "restarts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.watch_procs > args.watchers:
        p.error("--watch-procs must not exceed --watchers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info, cmd = begin()
    registry: Registry | None = None
    with tempfile.TemporaryDirectory(prefix="spillgate-registry-bench-") as tmp:
        db = Path(tmp) / "registry.db"
        bench: Bench | None = None
        try:
            registry = start_registry(db, timeout=60)
            bench = Bench(args, registry, db)
            results = asyncio.run(asyncio.wait_for(bench.run(), 600))
            bench.restart()
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted: stopping the registry")
            return 130
        except (RuntimeError, TimeoutError, OSError, grpc.RpcError) as exc:
            log(f"registry_bench: {exc or type(exc).__name__}")
            if bench is not None:
                log("registry output (tail):\n" + "".join(bench.registry.lines[-20:]))
            return 1
        finally:
            current = bench.registry if bench is not None else registry
            if current is not None:
                old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    code = current.stop()
                finally:
                    for s, handler in old.items():
                        signal.signal(s, handler)
                log(f"registry stopped (exit code {code})")
    print(header(info, cmd))
    print(
        f"Registry: SQLite store (WAL, synchronous=FULL) in {tempfile.gettempdir()}; "
        f"{args.regions} regions x {args.replicas_per_region:,} replicas; client grpc.aio, "
        f"one channel; watchers in {args.watch_procs} child process(es)"
    )
    print()
    print(table(results, args))
    if args.json is not None:
        data = {"machine": info, "command": cmd, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(data | {"results": results}, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
