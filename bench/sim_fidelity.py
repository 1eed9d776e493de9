"""Simulator fidelity: one seeded trace through real replica processes and through the sim.

    .venv/bin/python bench/sim_fidelity.py [--replicas 2] [--requests 300] [--rate 30]
        [--speed 1] [--seed 1] [--json PATH]

One region: a registry, ``--replicas`` replica simulator processes (`spillgate replica`, the
engine config below) and an admission service. A fixed seeded workload (Poisson arrivals at
``--rate`` req/s of model time, prompts of 64-512 unique words, 16-48 output tokens) is
written as a JSONL trace (``SimRequest.to_json`` lines, the sim's ``--trace`` format), replayed
open loop by a zero-proxy client (Admit -> tritonclient stream from the chosen replica ->
Release), and the same trace runs through the simulator with a one-region World whose
engine is the replicas' engine. Real wall times are converted to model time (x ``--speed``).
Prints p50/p99 TTFT and end-to-end for both and the relative error of the simulator.

The simulator also pays the per-request overhead of this stack that its engine does not
model (the Admit RPC; the stream set-up beyond the engine's TTFT), drawn from a (p50, p90)
fit. That fit comes from a second, independent trace run first on the same fleet, never
from the trace being compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

import grpc
import numpy as np
from _common import command_line, log, machine
from tritonclient.utils import InferenceServerException

from spillgate._proto import admission_pb2, common_pb2
from spillgate.core.decision import Priority
from spillgate.core.engine import EngineConfig
from spillgate.sim.harness import SimConfig, Simulator
from spillgate.sim.scenarios import SCENARIOS
from spillgate.sim.spillgate_router import SpillgateRouter
from spillgate.sim.workload import SimRequest, TraceWorkload
from spillgate.sim.world import World, policy_config
from tests.fleet_helpers import apply, model, region, replica, start_admission, wait_serving
from tests.test_registry_service import start_registry
from tests.zero_proxy import Call, TritonZeroProxy

MODEL = "llm-small"
# The replicas' engine (and the sim's): llm-small of replica/default.toml with fewer slots,
# so a few hundred requests see some batching.
ENGINE = EngineConfig(
    max_num_seqs=16,
    max_waiting=256,
    num_kv_blocks=4096,
    block_size=16,
    ttft_overhead_ms=15.0,
    prefill_ms_per_token=0.05,
    itl_base_ms=8.0,
    itl_per_seq_ms=0.15,
    jitter=0.05,
)
REPLICA_TOML = """
speed = {speed}
seed = {seed}
load = ["{model}"]

[llm.{model}]
max_num_seqs = {e.max_num_seqs}
max_waiting = {e.max_waiting}
num_kv_blocks = {e.num_kv_blocks}
block_size = {e.block_size}
ttft_overhead_ms = {e.ttft_overhead_ms}
prefill_ms_per_token = {e.prefill_ms_per_token}
itl_base_ms = {e.itl_base_ms}
itl_per_seq_ms = {e.itl_per_seq_ms}
jitter = {e.jitter}
max_model_tokens = 8192
"""
WORDS = [f"w{i}" for i in range(5000)]


def make_trace(n: int, rate: float, seed: int) -> tuple[list[SimRequest], list[str]]:
    """Seeded requests (model-time arrivals) and their prompts (one token per word)."""
    rng = random.Random(seed)
    t, reqs, prompts = 0.0, [], []
    for i in range(n):
        t += rng.expovariate(rate) * 1000.0
        words = rng.randint(64, 512)
        out = rng.randint(16, 48)
        # A unique leading word per request: no prefix hits on the replicas (none in the sim).
        prompts.append(" ".join([f"r{seed}x{i}", *rng.choices(WORDS, k=words - 1)]))
        req = SimRequest(i, "us", t, int(Priority.NORMAL), 10_000.0, words, (), out, out)
        reqs.append(req)
    return reqs, prompts


Timing = tuple[float, float, float, float]  # TTFT, e2e, Admit RPC, stream TTFT (wall ms)
NOT_SERVED: Timing = (math.nan, math.nan, math.nan, math.nan)


async def admitted(client: TritonZeroProxy, call: Call, rid: str) -> Timing:
    """Admit -> stream -> Release (like TritonZeroProxy.admitted); client-side TTFT and e2e,
    and their parts: the Admit RPC and the stream's own TTFT (wall ms); NaN when not served."""
    start = time.monotonic()
    ctx = call.context(MODEL, rid)
    d = (await client.stub.Admit(admission_pb2.AdmitRequest(context=ctx))).decision
    admitted_at = time.monotonic()
    if d.action != common_pb2.ACTION_SERVE:
        return NOT_SERVED
    outcome = admission_pb2.OUTCOME_OK
    try:
        ttft, tokens = await client.stream(d.endpoint, d.triton_model_name, call)
    except (InferenceServerException, grpc.RpcError):
        outcome, ttft, tokens = admission_pb2.OUTCOME_ERROR, math.nan, 0
    done = time.monotonic()
    release = admission_pb2.ReleaseRequest(
        ticket_id=d.ticket.id,
        outcome=outcome,
        ttft_ms=ttft,
        total_ms=(done - admitted_at) * 1000.0,
        usage=common_pb2.Usage(prompt_tokens=ctx.prompt_tokens, completion_tokens=tokens),
    )
    await client.stub.Release(release)
    if outcome != admission_pb2.OUTCOME_OK:
        return NOT_SERVED
    admit_ms = (admitted_at - start) * 1000.0
    return admit_ms + ttft, (done - start) * 1000.0, admit_ms, ttft


async def replay(
    admission: str, reqs: list[SimRequest], prompts: list[str], speed: float
) -> list[Timing]:
    """Open loop: request i starts at its trace time / speed, whatever the others do."""
    client = TritonZeroProxy(admission, MODEL, timeout=60.0)
    # Warm the channels (first Admit, first stream per replica) outside the measurement.
    for k in range(8):
        await admitted(client, Call(f"warm {k} " + " ".join(WORDS[:32]), 4), f"warm-{k}")
    t0 = time.monotonic()

    async def one(req: SimRequest, prompt: str) -> Timing:
        delay = t0 + req.arrival / 1000.0 / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await admitted(client, Call(prompt, req.output_tokens), f"fid-{req.id}")

    try:
        return list(await asyncio.gather(*(one(r, p) for r, p in zip(reqs, prompts, strict=True))))
    finally:
        await client.close()


def real_run(
    traces: list[tuple[list[SimRequest], list[str]]], replicas: int, speed: float, tmp: Path
) -> list[dict[str, list[float]]]:
    """Per trace, one after the other on one real fleet: TTFT and end-to-end (model ms) of
    every request, and the per-request overhead parts the engine does not model."""
    from tests.conftest import start_replica

    reg = start_registry(tmp / "registry.db")
    procs: list[Any] = [reg]
    try:
        configs = []
        for i in range(replicas):
            path = tmp / f"us-{i}.toml"
            path.write_text(REPLICA_TOML.format(speed=speed, seed=i, model=MODEL, e=ENGINE))
            configs.append(path)
        with ThreadPoolExecutor(replicas) as pool:
            rps = list(pool.map(lambda p: start_replica("--config", str(p)), configs))
        procs += rps
        adm = start_admission("us", reg.address)
        procs.append(adm)
        entities = [region("us", adm.ready[0]), *model(MODEL)]
        entities += [replica(f"us-{i}", "us", rp, [(MODEL, "v1")]) for i, rp in enumerate(rps)]
        apply(reg.address, entities)
        wait_serving(adm.ready[0])
        time.sleep(1.0)  # let the admission scrape every replica once
        runs = [asyncio.run(replay(adm.ready[0], reqs, prompts, speed)) for reqs, prompts in traces]
    finally:
        for p in reversed(procs):
            p.stop()
    return [_timings(reqs, results, speed) for (reqs, _), results in zip(traces, runs, strict=True)]


def _timings(reqs: list[SimRequest], results: list[Timing], speed: float) -> dict[str, list[float]]:
    ok = [(r, timing) for r, timing in zip(reqs, results, strict=True) if timing[1] == timing[1]]
    if len(ok) < len(results):
        log(f"{len(results) - len(ok)} real requests not served")
    # Client-side TTFT (Admit + stream to the first response) and end-to-end, in model ms,
    # and the per-request overhead the engine does not model: the Admit RPC, and the stream's
    # TTFT beyond the engine's own.
    return {
        "ttft": [t[0] * speed for _, t in ok],
        "e2e": [t[1] * speed for _, t in ok],
        "admit": [t[2] * speed for _, t in ok],
        "stream": [t[3] * speed - engine_ttft(r) for r, t in ok],
    }


def engine_ttft(req: SimRequest) -> float:
    """The engine's TTFT for ``req`` at jitter 1: overhead + prompt x per-token cost (the
    prompts share no prefix, and at this load nothing queues on a replica)."""
    return ENGINE.ttft_overhead_ms + req.prompt_tokens * ENGINE.prefill_ms_per_token


def sim_run(
    trace: Path,
    replicas: int,
    seed: int,
    admit_ms: tuple[float, float],
    stream_ms: tuple[float, float],
) -> dict[str, list[float]]:
    """The same trace through the simulator, one region of ``replicas`` ENGINE replicas,
    with the request-path overhead (p50, p90) given."""
    world = World(
        regions=("us",),
        gpus={"us": replicas},
        gpus_per_replica=1,
        engine=replace(ENGINE, token_events=False),
        rtt_ms={},
    )
    budgets = dict(policy_config(world).budgets_ms)
    last = max(json.loads(line)["t_ms"] for line in trace.read_text().splitlines())
    scenario = replace(
        SCENARIOS["steady"], name="fidelity", duration_s=last / 1000.0 + 1.0, flashes=()
    )
    sim = Simulator(
        world,
        scenario,
        SpillgateRouter(),
        SimConfig(seed=seed, admit_ms=admit_ms, stream_ms=stream_ms),
        TraceWorkload(trace, budgets),
    )
    sim.run()
    ttft = [float(x) for x in sim.rec.ttft if x == x]
    e2e = [float(x) for x in sim.rec.e2e if x == x]
    return {"ttft": ttft, "e2e": e2e}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=30.0, help="arrivals per model second")
    p.add_argument("--speed", type=float, default=1.0, help="replica model time / wall time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    reqs, prompts = make_trace(args.requests, args.rate, args.seed)
    # A second, independent trace run first on the same fleet calibrates the overhead the
    # engine does not model (it moves with the machine's load), so the compared trace is
    # never the one the constants came from.
    calibration = make_trace(args.requests, args.rate, args.seed + 1000)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        trace = tmp / "trace.jsonl"
        trace.write_text("".join(json.dumps(r.to_json()) + "\n" for r in reqs))
        log(f"real stack: {args.replicas} replicas, 2 x {args.requests} requests ...")
        calibrated, real = real_run([calibration, (reqs, prompts)], args.replicas, args.speed, tmp)
        admit_ms = (pct(calibrated["admit"], 50), pct(calibrated["admit"], 90))
        stream_ms = (pct(calibrated["stream"], 50), pct(calibrated["stream"], 90))
        log("simulator ...")
        sim = sim_run(trace, args.replicas, args.seed, admit_ms, stream_ms)
    rows = []
    for metric in ("ttft", "e2e"):
        for q in (50, 99):
            r, s = pct(real[metric], q), pct(sim[metric], q)
            rows.append(
                {
                    "metric": f"{metric} p{q} ms",
                    "real": round(r, 1),
                    "sim": round(s, 1),
                    "error_pct": round(100.0 * (s - r) / r, 1),
                }
            )
    print(f"{'metric':14s} {'real':>9s} {'sim':>9s} {'error %':>8s}")
    for row in rows:
        print(f"{row['metric']:14s} {row['real']:9.1f} {row['sim']:9.1f} {row['error_pct']:8.1f}")
    print(f"served: real {len(real['e2e'])}, sim {len(sim['e2e'])} of {args.requests}")
    # The overhead parts as measured on the compared trace, next to what the simulator drew
    # from (calibrated on the other trace; `spillgate sim --local-overhead` uses the
    # LOCAL_STACK_* medians of earlier runs instead).
    overhead = []
    for part, name, (sim50, sim90) in (
        ("admit", "Admit RPC", admit_ms),
        ("stream", "stream set-up", stream_ms),
    ):
        p50, p90, p99 = (pct(real[part], q) for q in (50, 90, 99))
        overhead.append(
            {
                "part": name,
                "p50": round(p50, 2),
                "p90": round(p90, 2),
                "p99": round(p99, 2),
                "sim_p50_p90": [sim50, sim90],
            }
        )
        print(
            f"{name} p50 / p90 / p99 ms: real {p50:.1f} / {p90:.1f} / {p99:.1f}, "
            f"sim (calibrated) p50 / p90 {sim50:.1f} / {sim90:.1f}"
        )
    if args.json:
        out = {
            "machine": machine(),
            "command": command_line(),
            "args": vars(args) | {"json": str(args.json)},
            "engine": vars(ENGINE),
            "rows": rows,
            "overhead": overhead,
        }
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
