"""Gateway overhead: the same generation through the gateway and straight to the replica,
side by side in one run.

Fleet (real processes on loopback, free ports): a registry, --replicas replica simulators
with a fast LLM (`llm-bench`: 1 ms TTFT/ITL in model time at --speed 1000, 256 decode slots,
so the engine model never limits), an admission for region `us` (real scraping and health
checks) and that region's gateway (gRPC + HTTP). Four arms send the same prompt and
max_tokens, so the replica does the same work for each:

  direct   tritonclient.grpc.aio ModelStreamInfer to a replica (vLLM contract, streamed)
  grpc     GatewayService.Chat on the gateway (model alias `chat`)
  http     POST /v1/chat/completions stream=true (SSE) over a keep-alive httpx.AsyncClient
  triton   tritonclient.grpc.aio ModelStreamInfer to the gateway's passthrough, model `chat`
  zero-proxy  the same Chat through spillgate.zeroproxy.ZeroProxyClient: what a mesh-aware
           caller embeds instead of calling a gateway (the gateway's code in the caller's
           process: Admit, stream from the replica admission picked, Release)

Every arm measures time to first token (first non-empty text) and to the last token (the
final response), runs at each --concurrency, and the arms alternate in --rounds rounds (the
order rotating) so drift hits all of them alike. CPU time of the gateway and the admission
processes is sampled per arm. "added" = arm - direct, for p50 and p99 of the total.

    .venv/bin/python bench/gateway_overhead.py [--requests 1000] [--concurrency 1,16]
        [--json PATH] [--profile-gateway PATH]

Goal (issue): added p50 <= 1.5 ms. Progress goes to stderr, the Markdown tables to stdout.
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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))

import grpc
import httpx
import tritonclient.grpc.aio as triton
from _arms import Sample, measure, other_load_line, wait_served
from _common import begin, header, log

from spillgate._proto import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from spillgate.gateway.chat import render_prompt
from spillgate.gateway.forward import vllm_inputs
from spillgate.zeroproxy import ZeroProxyClient

ROOT = Path(__file__).resolve().parent.parent
LLM = "llm-bench"
ALIAS = "chat"
PROMPT = "Where should this request run, given the budget and the queues of every region?"
DIGEST = "sha256:" + "ab" * 32
ARMS = ("direct", "grpc", "http", "triton", "zero-proxy")

# As bench/replica_capacity.py: at --speed 1000 a 16-token stream is ~0.02 ms of model time.
CONFIG_TOML = """\
# bench/gateway_overhead.py: the engine model must never be the limit.
seed = 0
load = ["{llm}"]

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


# -- processes -------------------------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[str]
    ready: tuple[str, ...]
    lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def service(
    args: list[str], ready: str, profile: Path | None = None, timeout: float = 30.0
) -> Iterator[Service]:
    """Run `python [-m cProfile -o PROFILE] args...` until its ready line; SIGTERM it after
    (graceful, so a profile gets written), SIGKILL after 15 s."""
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += args
    log(f"starting {shlex.join(args[:2])}")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    svc = Service(proc, ())
    found = threading.Event()

    def pump() -> None:  # keeps draining, so the process never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            svc.lines.append(line)
            del svc.lines[:-200]
            m = re.search(ready, line)
            if m and not svc.ready:
                svc.ready = m.groups()
                found.set()
        found.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        if not found.wait(timeout) or not svc.ready:
            raise RuntimeError(f"{args[:2]} did not become ready:\n" + "".join(svc.lines[-30:]))
        yield svc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        thread.join(timeout=5)


def entities(admission: str, gateway: str, replicas: list[Service]) -> list[registry_pb2.Entity]:
    loaded = [common_pb2.VersionRef(model=LLM, version="v1")]
    out = [
        registry_pb2.Entity(
            region=registry_pb2.Region(
                id="us", residency_zone="us", admission_endpoint=admission,
                gateway_endpoint=gateway,
            )
        ),
        registry_pb2.Entity(
            model=registry_pb2.Model(
                id=LLM, kind=common_pb2.MODEL_KIND_LLM, max_context_tokens=4096,
                max_output_tokens=512,
            )
        ),
        registry_pb2.Entity(
            version=registry_pb2.Version(
                model=LLM, version="v1", artifact_digest=DIGEST, triton_model_name=LLM
            )
        ),
        registry_pb2.Entity(
            alias=registry_pb2.Alias(
                name=ALIAS,
                default_targets=registry_pb2.AliasTargets(
                    targets=[registry_pb2.AliasTarget(model=LLM, version="v1", weight=100)]
                ),
            )
        ),
    ]  # fmt: skip
    for i, r in enumerate(replicas):
        out.append(
            registry_pb2.Entity(
                replica=registry_pb2.Replica(
                    id=f"us-{i}", region="us", pool="default", endpoint=r.ready[0],
                    metrics_endpoint=f"http://{r.ready[1]}/metrics",
                    backend=common_pb2.BACKEND_KIND_SIMULATOR, loaded=loaded,
                    state=common_pb2.REPLICA_STATE_READY,
                )
            )
        )  # fmt: skip
    return out


@dataclass
class BenchFleet:
    """The benchmark's region `us`: registry, replica simulators, admission, gateway."""

    registry: Service
    replicas: list[Service]
    admission: Service
    gateway: Service
    entities: list[registry_pb2.Entity]

    def pids(self) -> dict[str, int]:
        """Process name -> pid, this benchmark's own process included (as `client`)."""
        return {
            "gateway": self.gateway.proc.pid,
            "admission": self.admission.proc.pid,
            "registry": self.registry.proc.pid,
            "client": os.getpid(),
            **{f"replica{i}": r.proc.pid for i, r in enumerate(self.replicas)},
        }


def start_fleet(
    st: contextlib.ExitStack, tmp: str, replicas: int, speed: float, http: bool = True,
    profile: Path | None = None,
) -> BenchFleet:  # fmt: skip
    """Start the fleet (stopped when `st` closes) and apply its registry entities."""
    config = Path(tmp) / "replica.toml"
    config.write_text(CONFIG_TOML.format(llm=LLM))
    registry = st.enter_context(
        service(
            ["-m", "spillgate.registry.app", "--db", f"{tmp}/r.db", "--port", "0"],
            r"registry ready grpc=(\S+)",
        )
    )
    replica_args = ["-m", "spillgate.cli", "replica", "--grpc-port", "0",
                    "--metrics-port", "0", "--host", "127.0.0.1", "--speed",
                    f"{speed:g}", "--config", str(config)]  # fmt: skip
    started = [
        st.enter_context(service(replica_args, r"replica ready grpc=(\S+) metrics=(\S+)"))
        for _ in range(replicas)
    ]
    reg = registry.ready[0]
    admission = st.enter_context(
        service(
            ["-m", "spillgate.admission.app", "--region", "us", "--registry", reg,
             "--port", "0", "--log-level", "WARNING"],
            r"admission ready grpc=(\S+)",
        )
    )  # fmt: skip
    gateway = st.enter_context(
        service(
            ["-m", "spillgate.gateway.app", "--region", "us", "--registry", reg,
             "--admission", admission.ready[0], "--port", "0",
             "--http-port", "0" if http else "-1", "--log-level", "WARNING"],
            r"gateway ready grpc=(\S+) http=(\S+)",
            profile=profile,
        )
    )  # fmt: skip
    fleet = entities(admission.ready[0], gateway.ready[0], started)
    with grpc.insecure_channel(reg) as channel:
        registry_pb2_grpc.RegistryServiceStub(channel).Apply(
            registry_pb2.ApplyRequest(mutations=[registry_pb2.Mutation(put=e) for e in fleet])
        )
    return BenchFleet(registry, started, admission, gateway, fleet)


# -- the arms: one request each, (ttft_s, total_s, text pieces) ------------------------------


class Arms:
    """Open clients for every arm; `one(arm)` sends one request and times it."""

    def __init__(
        self, replica: str, gateway: str, http: str, registry: str, admission: str,
        max_tokens: int, timeout: float,
    ) -> None:  # fmt: skip
        self.timeout = timeout
        self.direct = triton.InferenceServerClient(replica)
        self.zero = ZeroProxyClient("us", registry=registry, admission=admission)
        self.passthrough = triton.InferenceServerClient(gateway)
        self.channel = grpc.aio.insecure_channel(gateway)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.http = httpx.AsyncClient(
            base_url=f"http://{http}",
            timeout=timeout,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
        )
        messages = [gateway_pb2.ChatMessage(role="user", content=PROMPT)]
        # The gateway renders the chat into exactly this prompt and asks for these sampling
        # parameters: the direct and passthrough arms send what the gateway would.
        self.inputs = vllm_inputs(render_prompt(messages), {"max_tokens": max_tokens})
        self.chat = gateway_pb2.ChatRequest(model=ALIAS, messages=messages, max_tokens=max_tokens)

        self.body = {
            "model": ALIAS,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "stream": True,
        }

    async def close(self) -> None:
        await self.zero.close()
        await self.http.aclose()
        await self.channel.close()
        await self.direct.close()
        await self.passthrough.close()

    def one(self, arm: str) -> Awaitable[Sample]:
        if arm == "direct":
            return self._triton(self.direct, LLM)
        if arm == "triton":
            return self._triton(self.passthrough, ALIAS)
        if arm == "grpc":
            return self._grpc(self.stub.Chat(self.chat, timeout=self.timeout))
        if arm == "zero-proxy":
            return self._grpc(self.zero.chat(self.chat, timeout=self.timeout))
        return self._http()

    async def _triton(self, client: triton.InferenceServerClient, model: str) -> Sample:
        inputs = self.inputs

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model, "inputs": inputs}

        t0 = time.perf_counter()
        ttft = 0.0
        pieces = 0
        it = client.stream_infer(requests(), stream_timeout=self.timeout)
        try:
            async for result, error in it:
                now = time.perf_counter()
                if error is not None:
                    raise RuntimeError(str(error))
                text = result.as_numpy("text_output")
                if text is not None and len(text) and text[0]:
                    pieces += 1
                    ttft = ttft or now - t0
                params = result.get_response().parameters
                if params["triton_final_response"].bool_param:
                    return Sample(now - t0, ttft, pieces)
        finally:
            it.cancel()
        raise RuntimeError("stream ended before the final response")

    async def _grpc(self, responses: AsyncIterator[gateway_pb2.ChatResponse]) -> Sample:
        t0 = time.perf_counter()
        ttft = total = 0.0
        pieces = 0
        async for response in responses:
            now = time.perf_counter()
            if response.delta:
                pieces += 1
                ttft = ttft or now - t0
            if response.finish_reason:
                total = now - t0
        if not total:
            raise RuntimeError("Chat ended without a finish reason")
        return Sample(total, ttft, pieces)

    async def _http(self) -> Sample:
        t0 = time.perf_counter()
        ttft = total = 0.0
        pieces = 0
        async with self.http.stream("POST", "/v1/chat/completions", json=self.body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                if line == "data: [DONE]":
                    break
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    pieces += 1
                    ttft = ttft or now - t0
                if choices and choices[0]["finish_reason"]:
                    total = now - t0
        if not total:
            raise RuntimeError("SSE ended without a finish reason")
        return Sample(total, ttft, pieces)


# -- measurement ------------------------------------------------------------------------------


def table(concurrency: int, s: dict[str, dict[str, Any]]) -> str:
    d = s["direct"]
    out = [
        f"concurrency {concurrency}:",
        "",
        "| arm | TTFT p50 / p99 (ms) | total p50 / p99 (ms) | added p50 / p99 (ms) | req/s "
        "| gateway CPU/req | admission CPU/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        a = s[arm]
        added = (
            "-"
            if arm == "direct"
            else f"{a['total_p50_ms'] - d['total_p50_ms']:+.2f} / "
            f"{a['total_p99_ms'] - d['total_p99_ms']:+.2f}"
        )
        cpu = "-" if arm == "direct" else f"{a['cpu_us_per_req']['gateway']:,.0f} µs"
        adm = "-" if arm == "direct" else f"{a['cpu_us_per_req']['admission']:,.0f} µs"
        out.append(
            f"| {arm} | {a['ttft_p50_ms']:.2f} / {a['ttft_p99_ms']:.2f} "
            f"| {a['total_p50_ms']:.2f} / {a['total_p99_ms']:.2f} | {added} "
            f"| {a['per_s']:,.0f} | {cpu} | {adm} | {a['errors']} |"
        )
    out += ["", other_load_line(s)]
    return "\n".join(out)


async def run(args: argparse.Namespace, addr: dict[str, str], pids: dict[str, int]) -> Any:
    arms = Arms(
        addr["replica"], addr["gateway"], addr["http"], addr["registry"], addr["admission"],
        args.max_tokens, args.timeout,
    )  # fmt: skip
    try:
        await arms.zero.start()
        await wait_served(arms.one, "grpc", 30, "the gateway never served a chat")
        out = {}
        for c in args.concurrency:
            log(f"measuring {args.requests} requests per arm at concurrency {c}")
            results = await measure(
                arms.one, ARMS, c, lambda _: args.requests, args.rounds, pids, max(20, 2 * c)
            )
            out[c] = {arm: r.summary() for arm, r in results.items()}
        return out
    finally:
        await arms.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gateway_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="timed requests per arm (1000)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (10)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrencies")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (16)")
    p.add_argument("--replicas", type=int, default=1, help="replica simulators (1)")
    p.add_argument("--speed", type=float, default=1000.0, help="replica model-time speed")
    p.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--profile-gateway", type=Path, help="run the gateway under cProfile")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    if args.requests < 1 or not 1 <= args.rounds <= args.requests or args.replicas < 1:
        p.error("need --requests >= --rounds >= 1 and --replicas >= 1")
    if min(args.concurrency) < 1 or max(args.concurrency) > 256 or args.max_tokens < 1:
        p.error("need 1 <= concurrency <= 256 and --max-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info, cmd = begin()
    budget = 60 + len(args.concurrency) * (4 * args.requests * args.timeout / 100 + 60)
    with (
        tempfile.TemporaryDirectory(prefix="spillgate-bench-") as tmp,
        contextlib.ExitStack() as st,
    ):
        try:
            f = start_fleet(st, tmp, args.replicas, args.speed, profile=args.profile_gateway)
            addr = {
                "replica": f.replicas[0].ready[0],
                "gateway": f.gateway.ready[0],
                "http": f.gateway.ready[1],
                "admission": f.admission.ready[0],
                "registry": f.registry.ready[0],
            }
            pids = f.pids()
            results = asyncio.run(asyncio.wait_for(run(args, addr, pids), budget))
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted: stopping the fleet")
            return 130
        except (RuntimeError, TimeoutError, OSError, grpc.RpcError) as exc:
            log(f"gateway_overhead: {exc or type(exc).__name__}")
            return 1
    if args.profile_gateway is not None:
        import pstats

        log(f"gateway profile written to {args.profile_gateway}; top 30 by own time:")
        stats = pstats.Stats(str(args.profile_gateway), stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(30)
    print(header(info, cmd))
    print(
        f"Fleet: registry, {args.replicas} replica(s) (`{LLM}` 1 ms TTFT/ITL, --speed "
        f"{args.speed:g}), admission, gateway; {args.max_tokens} tokens per answer; "
        f"{args.requests} timed requests per arm in {args.rounds} alternating rounds. "
        "added = arm - direct (total, p50 / p99); CPU/req = process CPU time per request."
    )
    for c, s in results.items():
        print()
        print(table(c, s))
    errors = sum(a["errors"] for s in results.values() for a in s.values())
    pieces = {arm: a["pieces"] for s in results.values() for arm, a in s.items()}
    if len({tuple(p) for p in pieces.values()}) != 1:
        log(f"WARNING: the arms got different numbers of text pieces: {pieces}")
    if args.json is not None:
        data = {
            "machine": info,
            "command": cmd,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "replica_config": CONFIG_TOML.format(llm=LLM),
            "results": {str(c): s for c, s in results.items()},
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
