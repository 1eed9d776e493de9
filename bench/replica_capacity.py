"""Capacity of the replica simulator itself on this machine.

Starts one real `spillgate replica` (loopback, free ports) with a fast LLM (`llm-bench`) and
Triton's `simple`, then drives it with `tritonclient.grpc.aio` from this process:

  floor    ServerLive: no work in the replica, so it measures gRPC + Python for one call
  unary    ModelInfer on `simple` (INT32 [1,16] add/sub)
  stream   ModelStreamInfer on `llm-bench`, one bidirectional stream per worker, requests
           sent one after another (stream=True, ignore_eos, max_tokens responses each)

each at --concurrency workers for --duration seconds after --warmup seconds, plus ServerLive
and `simple` at concurrency 1 for unloaded latency. CPU time of the replica process and of
this client process is sampled over each measured window, so the table says which side ran
out of CPU. Later benchmarks use these numbers to tell when the simulator, not the router, is
the bottleneck.

    .venv/bin/python bench/replica_capacity.py [--concurrency 32] [--duration 5] [--json PATH]

Loopback only; every phase is bounded in time and count; the replica is stopped on exit,
Ctrl-C or error. Progress goes to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import begin, header, log

ROOT = Path(__file__).resolve().parent.parent
LLM = "llm-bench"
PROMPT = "Where should this request run, given the budget and the queues of every region?"
_READY = re.compile(r"spillgate replica ready grpc=(\S+) metrics=(\S+)")
_TICK = os.sysconf("SC_CLK_TCK")

# Timings so fast that, at --speed 1000, a 64-token stream is ~0.07 ms of wall time in the
# engine model: the engine never limits, only the serving path does.
CONFIG_TOML = """\
# bench/replica_capacity.py: the engine model must never be the limit.
seed = 0
load = ["simple", "{llm}"]

[llm.{llm}]
max_num_seqs = 256
max_waiting = 4096
num_kv_blocks = 65536
block_size = 16
ttft_overhead_ms = 1.0
prefill_ms_per_token = 0.0
itl_base_ms = 1.0
itl_per_seq_ms = 0.0
jitter = 0.0
max_model_tokens = 8192
"""


# -- machine ---------------------------------------------------------------------------------


def cpu_seconds(pid: int, main_thread: bool = False) -> float:
    """utime + stime of a process (all threads) or of its main thread only, in seconds.

    The main thread runs the asyncio loop, i.e. all the Python code: at ~1.0 core it is the
    limit, whatever the gRPC core's own threads do.
    """
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_sample(pid: int) -> tuple[float, float]:
    return cpu_seconds(pid), cpu_seconds(pid, main_thread=True)


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (busy = not idle, not iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK


# -- the replica process ---------------------------------------------------------------------


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    grpc: str = ""
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def stop(self, wait_first: float = 0.0) -> int | None:
        """Stop the replica: SIGTERM (graceful), SIGKILL after 15 s. With `wait_first`, give
        it that long to exit on its own first (a terminal Ctrl-C reached it too)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=wait_first)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: lets --profile-server write
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


def start_replica(config: Path, speed: float, profile: Path | None, timeout: float) -> Replica:
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "spillgate.cli", "replica", "--grpc-port", "0", "--metrics-port", "0"]
    cmd += ["--host", "127.0.0.1", "--speed", f"{speed:g}", "--config", str(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log(f"starting replica: {shlex.join(cmd)}")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    replica = Replica(proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            replica.lines.append(line)
            del replica.lines[:-200]  # keep the tail for error reports
            m = _READY.search(line)
            if m and not replica.grpc:
                replica.grpc = m.group(1)
                ready.set()
        ready.set()

    replica.pump = threading.Thread(target=pump, name="replica-output", daemon=True)
    replica.pump.start()
    if not ready.wait(timeout) or not replica.grpc:
        replica.stop()
        raise RuntimeError("replica did not become ready:\n" + "".join(replica.lines[-40:]))
    log(f"replica ready at {replica.grpc} (pid {proc.pid})")
    return replica


# -- load generation -------------------------------------------------------------------------


@dataclass
class Phase:
    """One measured run: counts and latencies inside the window [t_warm, t_end]."""

    name: str
    concurrency: int
    duration_s: float
    ok: int = 0  # completed calls / streams inside the window
    items: int = 0  # unary: = ok; stream: responses received inside the window
    errors: int = 0
    first_error: str = ""
    latencies_ms: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0
    server_main_s: float = 0.0  # the replica's main thread (asyncio loop: all its Python)
    client_cpu_s: float = 0.0
    client_main_s: float = 0.0
    machine_busy_s: float = 0.0  # everything on the machine, to spot other load
    total_calls: int = 0  # including warmup and calls that straddle the window

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))]

        d = self.duration_s
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "window_s": d,
            "completed": self.ok,
            "completed_per_s": self.ok / d,
            "items_per_s": self.items / d,
            "errors": self.errors,
            "first_error": self.first_error,
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "mean_ms": statistics.fmean(lat) if lat else None,
            "server_cpu_cores": self.server_cpu_s / d,
            "server_main_thread_cores": self.server_main_s / d,
            "client_cpu_cores": self.client_cpu_s / d,
            "client_main_thread_cores": self.client_main_s / d,
            "other_processes_cores": max(
                0.0, (self.machine_busy_s - self.server_cpu_s - self.client_cpu_s) / d
            ),
            "server_cpu_us_per_item": 1e6 * self.server_cpu_s / self.items if self.items else None,
            "client_cpu_us_per_item": 1e6 * self.client_cpu_s / self.items if self.items else None,
            "total_calls": self.total_calls,
        }


class Window:
    def __init__(self, warmup: float, duration: float, max_count: int) -> None:
        now = time.perf_counter()
        self.t_warm = now + warmup
        self.t_end = self.t_warm + duration
        self.max_count = max_count
        self.started = 0

    def more(self) -> bool:
        """May a worker start another call? Bounded by the window end and by count."""
        if time.perf_counter() >= self.t_end or self.started >= self.max_count:
            return False
        self.started += 1
        return True

    def inside(self, t0: float, t1: float) -> bool:
        return t0 >= self.t_warm and t1 <= self.t_end


def record_error(phase: Phase, exc: BaseException | str) -> None:
    phase.errors += 1
    if not phase.first_error:
        phase.first_error = str(exc).strip().splitlines()[0][:200] if str(exc) else repr(exc)
        log(f"  first error in {phase.name}: {phase.first_error}")


async def cpu_sampler(phase: Phase, window: Window, server_pid: int) -> None:
    await asyncio.sleep(max(0.0, window.t_warm - time.perf_counter()))
    s0, c0, m0 = cpu_sample(server_pid), cpu_sample(os.getpid()), machine_busy_seconds()
    await asyncio.sleep(max(0.0, window.t_end - time.perf_counter()))
    s1, c1, m1 = cpu_sample(server_pid), cpu_sample(os.getpid()), machine_busy_seconds()
    phase.machine_busy_s = m1 - m0
    phase.server_cpu_s, phase.server_main_s = s1[0] - s0[0], s1[1] - s0[1]
    phase.client_cpu_s, phase.client_main_s = c1[0] - c0[0], c1[1] - c0[1]


class ReplicaExited(RuntimeError):
    pass


async def monitor(phase: Phase, window: Window, proc: subprocess.Popen[str], quiet: bool) -> None:
    """Progress on stderr every second; raises as soon as the replica process is gone."""
    total = window.t_end - window.t_warm
    next_report = time.perf_counter() + 1.0
    while True:
        await asyncio.sleep(0.2)
        if proc.poll() is not None:
            raise ReplicaExited(f"the replica exited (code {proc.returncode}) during {phase.name}")
        now = time.perf_counter()
        if quiet or now < next_report:
            continue
        next_report += 1.0
        if now < window.t_warm:
            state = "warming up"
        else:
            state = f"{min(now, window.t_end) - window.t_warm:4.1f}/{total:g} s"
        log(
            f"  [{phase.name}] {state}  calls {phase.total_calls}  "
            f"in window {phase.ok}  errors {phase.errors}"
        )


async def run_phase(
    phase: Phase,
    window: Window,
    worker: Callable[[int], Awaitable[None]],
    proc: subprocess.Popen[str],
    quiet: bool,
    grace_s: float,
) -> dict[str, Any]:
    log(
        f"phase {phase.name}: concurrency {phase.concurrency}, "
        f"warmup {window.t_warm - time.perf_counter():.1f} s + {phase.duration_s:g} s"
    )

    async def guarded(i: int) -> None:
        try:
            await worker(i)
        except Exception as exc:  # a bug in a worker: count it, keep the others going
            record_error(phase, exc)

    sampler = asyncio.ensure_future(cpu_sampler(phase, window, proc.pid))
    watch = asyncio.ensure_future(monitor(phase, window, proc, quiet))
    workers = asyncio.gather(*(guarded(i) for i in range(phase.concurrency)))
    try:
        budget = window.t_end - time.perf_counter() + grace_s
        await asyncio.wait([workers, watch], timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            watch.result()  # raises ReplicaExited
        if not workers.done():
            record_error(phase, f"workers still busy {grace_s:g} s after the end of the phase")
        await sampler
    finally:
        for task in (workers, watch, sampler):
            task.cancel()
        await asyncio.gather(workers, watch, sampler, return_exceptions=True)
    s = phase.summary()
    p50 = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.2f}"
    log(
        f"  done: {s['completed_per_s']:.0f}/s completed, {s['items_per_s']:.0f} items/s, "
        f"p50 {p50} ms, errors {phase.errors}, CPU cores (process/main thread): replica "
        f"{s['server_cpu_cores']:.2f}/{s['server_main_thread_cores']:.2f}, client "
        f"{s['client_cpu_cores']:.2f}/{s['client_main_thread_cores']:.2f}"
    )
    if s["other_processes_cores"] > 0.2:
        log(
            f"  WARNING: other processes used {s['other_processes_cores']:.2f} cores during "
            f"{phase.name}: the machine is not quiet, these numbers are low"
        )
    return s


def simple_inputs() -> list[Any]:
    import tritonclient.grpc.aio as triton

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones_like(a)
    i0 = triton.InferInput("INPUT0", [1, 16], "INT32")
    i0.set_data_from_numpy(a)
    i1 = triton.InferInput("INPUT1", [1, 16], "INT32")
    i1.set_data_from_numpy(b)
    return [i0, i1]


def llm_inputs(max_tokens: int) -> list[Any]:
    import tritonclient.grpc.aio as triton

    params = json.dumps({"max_tokens": max_tokens, "ignore_eos": True}).encode()
    out = []
    for name, dtype, value in (
        ("text_input", "BYTES", np.array([PROMPT.encode()], dtype=np.object_)),
        ("stream", "BOOL", np.array([True])),
        ("sampling_parameters", "BYTES", np.array([params], dtype=np.object_)),
    ):
        tensor = triton.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, replica: Replica) -> None:
        self.args = args
        self.replica = replica
        self.timeout_s = args.call_timeout

    async def unary(self, name: str, concurrency: int, duration: float, call: str) -> Phase:
        import tritonclient.grpc.aio as triton

        phase = Phase(name, concurrency, duration)
        window = Window(self.args.warmup, duration, self.args.max_calls)
        clients = [triton.InferenceServerClient(self.replica.grpc) for _ in self._channels()]
        inputs = simple_inputs()
        timeout = self.timeout_s

        async def worker(i: int) -> None:
            client = clients[i % len(clients)]
            while window.more():
                t0 = time.perf_counter()
                try:
                    if call == "live":
                        await client.is_server_live(client_timeout=timeout)
                    else:
                        await client.infer("simple", inputs, client_timeout=timeout)
                except Exception as exc:
                    record_error(phase, exc)
                    await asyncio.sleep(0.01)  # don't spin on a failing replica
                    continue
                finally:
                    phase.total_calls += 1
                t1 = time.perf_counter()
                if window.inside(t0, t1):
                    phase.ok += 1
                    phase.items += 1
                    phase.latencies_ms.append((t1 - t0) * 1000.0)

        try:
            self.results[name] = await run_phase(
                phase, window, worker, self.replica.proc, self.args.quiet, timeout + 5
            )
        finally:
            for c in clients:
                await c.close()
        return phase

    async def stream(self, name: str, concurrency: int, duration: float) -> Phase:
        import tritonclient.grpc.aio as triton

        phase = Phase(name, concurrency, duration)
        window = Window(self.args.warmup, duration, self.args.max_calls)
        clients = [triton.InferenceServerClient(self.replica.grpc) for _ in self._channels()]
        inputs = llm_inputs(self.args.max_tokens)
        expected = self.args.max_tokens
        timeout = self.timeout_s

        async def worker(i: int) -> None:
            client = clients[i % len(clients)]
            go: asyncio.Queue[bool] = asyncio.Queue()

            async def requests() -> AsyncIterator[dict[str, Any]]:
                # One request at a time on this worker's stream: the next goes after the
                # previous one's final response.
                while await go.get():
                    yield {"model_name": LLM, "inputs": inputs}

            if not window.more():
                return
            go.put_nowait(True)
            deadline = window.t_end - time.perf_counter() + timeout
            it = client.stream_infer(requests(), stream_timeout=deadline)
            t0 = time.perf_counter()
            got = 0
            closing = False
            try:
                async for result, error in it:
                    now = time.perf_counter()
                    if error is not None:
                        record_error(phase, error)
                        final = True
                    else:
                        got += 1
                        if window.t_warm <= now <= window.t_end:
                            phase.items += 1
                        response = result.get_response()
                        final = response.parameters["triton_final_response"].bool_param
                    if not final:
                        continue
                    phase.total_calls += 1
                    if error is None and got != expected:
                        record_error(phase, f"stream gave {got} responses, expected {expected}")
                    elif error is None and window.inside(t0, now):
                        phase.ok += 1
                        phase.latencies_ms.append((now - t0) * 1000.0)
                    got = 0
                    if not window.more():
                        # Half-close: the replica finishes the stream and the loop ends.
                        closing = True
                        go.put_nowait(False)
                        continue
                    t0 = time.perf_counter()
                    go.put_nowait(True)
                if not closing:
                    record_error(phase, "the replica ended a stream before the client did")
            finally:
                go.put_nowait(False)
                it.cancel()

        try:
            self.results[name] = await run_phase(
                phase, window, worker, self.replica.proc, self.args.quiet, timeout + 5
            )
        finally:
            for c in clients:
                await c.close()
        return phase

    def _channels(self) -> range:
        return range(max(1, self.args.channels))

    async def run(self) -> dict[str, dict[str, Any]]:
        import tritonclient.grpc.aio as triton

        self.results: dict[str, dict[str, Any]] = {}
        async with triton.InferenceServerClient(self.replica.grpc) as client:
            for model in ("simple", LLM):
                if not await client.is_model_ready(model):
                    raise RuntimeError(f"model {model!r} is not ready on the replica")
        a = self.args
        c, d = a.concurrency, a.duration
        await self.unary(f"live_c{c}", c, d, "live")
        await self.unary(f"simple_c{c}", c, d, "simple")
        await self.stream(f"stream_c{c}", c, d)
        if a.latency_duration > 0:
            await self.unary("live_c1", 1, a.latency_duration, "live")
            await self.unary("simple_c1", 1, a.latency_duration, "simple")
        return self.results


# -- report ----------------------------------------------------------------------------------


def _ratio(value: float | None, floor: float | None) -> str:
    if value is None or not floor:
        return "-"
    return f"{value / floor:.2f}x"


def _n(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    c = args.concurrency
    live, simple, stream = results[f"live_c{c}"], results[f"simple_c{c}"], results[f"stream_c{c}"]
    live1, simple1 = results.get("live_c1"), results.get("simple_c1")
    rows: list[tuple[str, str, str]] = [
        (f"ServerLive calls/s (c={c}) — the floor", _n(live["completed_per_s"]), "1.00x"),
        (
            f"ServerLive p50 / p99 (c={c})",
            f"{_n(live['p50_ms'], ' ms', 2)} / {_n(live['p99_ms'], ' ms', 2)}",
            "1.00x",
        ),
    ]
    if live1 is not None:
        rows.append(
            (
                "ServerLive p50 / p99 (c=1)",
                f"{_n(live1['p50_ms'], ' ms', 2)} / {_n(live1['p99_ms'], ' ms', 2)}",
                "1.00x",
            )
        )
    rows += [
        (
            f"`simple` ModelInfer req/s (c={c})",
            _n(simple["completed_per_s"]),
            _ratio(simple["completed_per_s"], live["completed_per_s"]),
        ),
        (
            f"`simple` p50 / p99 (c={c})",
            f"{_n(simple['p50_ms'], ' ms', 2)} / {_n(simple['p99_ms'], ' ms', 2)}",
            f"{_ratio(simple['p50_ms'], live['p50_ms'])} / "
            f"{_ratio(simple['p99_ms'], live['p99_ms'])}",
        ),
    ]
    if simple1 is not None and live1 is not None:
        rows.append(
            (
                "`simple` p50 / p99 (c=1)",
                f"{_n(simple1['p50_ms'], ' ms', 2)} / {_n(simple1['p99_ms'], ' ms', 2)}",
                f"{_ratio(simple1['p50_ms'], live1['p50_ms'])} / "
                f"{_ratio(simple1['p99_ms'], live1['p99_ms'])}",
            )
        )
    rows += [
        (
            f"`{LLM}` streamed responses/s ({c} streams)",
            _n(stream["items_per_s"]),
            _ratio(stream["items_per_s"], live["completed_per_s"]),
        ),
        (
            f"`{LLM}` completed streams/s ({args.max_tokens} responses each)",
            _n(stream["completed_per_s"], "", 1),
            _ratio(stream["completed_per_s"], live["completed_per_s"]),
        ),
        (
            f"`{LLM}` stream duration p50 / p99 (c={c})",
            f"{_n(stream['p50_ms'], ' ms', 1)} / {_n(stream['p99_ms'], ' ms', 1)}",
            "-",
        ),
    ]
    for label, r in (
        ("ServerLive call", live),
        ("`simple` request", simple),
        (f"`{LLM}` streamed response", stream),
    ):
        rows.append(
            (
                f"replica CPU per {label} (c={c})",
                _n(r["server_cpu_us_per_item"], " µs"),
                _ratio(r["server_cpu_us_per_item"], live["server_cpu_us_per_item"]),
            )
        )
    for label, r in (("ServerLive", live), ("`simple`", simple), ("stream", stream)):
        rows.append(
            (
                f"CPU cores, replica (main thread) / client (main thread), {label}",
                f"{r['server_cpu_cores']:.2f} ({r['server_main_thread_cores']:.2f}) / "
                f"{r['client_cpu_cores']:.2f} ({r['client_main_thread_cores']:.2f})",
                "-",
            )
        )
    other = max(r["other_processes_cores"] for r in results.values())
    rows.append(("CPU cores used by other processes (max over phases)", f"{other:.2f}", "-"))
    errors = sum(r["errors"] for r in results.values())
    rows.append(("errors (all phases)", str(errors), "-"))
    out = ["| metric | value | vs ServerLive floor |", "|---|---:|---:|"]
    out += [f"| {m} | {v} | {r} |" for m, v, r in rows]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="replica_capacity.py",
        description="Measure the replica simulator's own capacity on this machine.",
    )
    p.add_argument("--concurrency", type=int, default=32, help="concurrent workers (default 32)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument(
        "--latency-duration",
        type=float,
        default=2.0,
        help="seconds for the concurrency-1 latency phases (0 skips them)",
    )
    p.add_argument("--speed", type=float, default=1000.0, help="replica model-time speed factor")
    p.add_argument("--max-tokens", type=int, default=64, help="responses per LLM stream")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels the workers share")
    p.add_argument("--max-calls", type=int, default=1_000_000, help="cap on calls per phase")
    p.add_argument("--call-timeout", type=float, default=10.0, help="per call/stream, seconds")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument(
        "--profile-server", type=Path, help="run the replica under cProfile, write stats here"
    )
    p.add_argument("--quiet", action="store_true", help="no per-second progress on stderr")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.speed <= 0:
        p.error("need --concurrency >= 1, --duration > 0, --warmup >= 0, --speed > 0")
    if args.max_tokens < 2 or args.max_calls < 1 or args.call_timeout <= 0:
        p.error("need --max-tokens >= 2, --max-calls >= 1, --call-timeout > 0")
    if args.duration > 120 or args.latency_duration > 120:
        p.error("phases are capped at 120 s")
    return args


async def _measure(args: argparse.Namespace, replica: Replica, deadline: float) -> Any:
    # SIGTERM cancels the run like Ctrl-C does (asyncio.run handles SIGINT itself).
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await asyncio.wait_for(Bench(args, replica).run(), deadline)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info, cmd = begin()
    log(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"grpcio {info['grpcio']}"
    )
    phases = 3 * (args.warmup + args.duration) + 2 * (args.warmup + args.latency_duration)
    deadline = phases + 6 * (args.call_timeout + 5) + 30
    replica: Replica | None = None
    with tempfile.TemporaryDirectory(prefix="spillgate-bench-") as tmp:
        config = Path(tmp) / "replica.toml"
        config.write_text(CONFIG_TOML.format(llm=LLM))
        interrupted = False
        try:
            replica = start_replica(config, args.speed, args.profile_server, timeout=30)
            results = asyncio.run(_measure(args, replica, deadline))
        except (KeyboardInterrupt, asyncio.CancelledError):
            interrupted = True
            log("interrupted: stopping the replica")
            return 130
        except (RuntimeError, TimeoutError, OSError) as exc:
            log(f"replica_capacity: {exc or type(exc).__name__}")
            if replica is not None:
                log("replica output (tail):\n" + "".join(replica.lines[-20:]))
            return 1
        finally:
            if replica is not None:
                # Bounded (SIGTERM, then SIGKILL after 15 s); a second Ctrl-C can't skip it.
                old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    code = replica.stop(wait_first=3.0 if interrupted else 0.0)
                finally:
                    for s, handler in old.items():
                        signal.signal(s, handler)
                log(f"replica stopped (exit code {code})")
    if args.profile_server is not None:
        import pstats

        log(f"replica profile written to {args.profile_server}; top 25 by own time:")
        stats = pstats.Stats(str(args.profile_server), stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
    report = table(results, args)
    print(header(info, cmd))
    print(
        f"Replica: --speed {args.speed:g}, `{LLM}` jitter 0, max_num_seqs 256; client: "
        f"tritonclient.grpc.aio, {args.channels} channel(s), warmup {args.warmup:g} s, "
        f"{args.duration:g} s per phase"
    )
    print()
    print(report)
    if args.json is not None:
        data = {
            "machine": info,
            "command": cmd,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "replica_config": CONFIG_TOML.format(llm=LLM),
            "phases": results,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
