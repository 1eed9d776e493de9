"""The simulated world: regions, RTTs, GPU pools, the 70B replica engine and its fleet view.

Figures come from ``shared/data/world.toml``: the seed scale (us/eu/apac with 600/300/150
GPUs, 1.2 s end-to-end budget) and the AWS inter-region averages (us-east-1 / eu-west-1 /
ap-northeast-1: 80.5, 145.3, 212.4 ms), the same RTTs the local fleet uses.

The replica is a 70B-class model (Llama-3-70B shape) on H100 SXM with tensor parallel 4 in
FP8, derived as follows (documented so the numbers can be challenged):

* weights 70 GB (FP8) -> fits 4 x 80 GB with room for KV; TP=4 -> 600/300/150 GPUs give
  150/75/37 replicas.
* prefill: 2 x 70e9 FLOP per token; 4 x 1979 TFLOPS FP8 dense at ~35 % MFU -> ~0.05 ms per
  uncached prompt token, plus ~20 ms scheduling/first forward.
* decode is memory bound: 70 GB / (4 x 3.35 TB/s x ~0.55 achieved) ~ 10 ms per step at batch
  1, plus ~0.05 ms per extra sequence (reading its ~2.3k-token KV at 160 KB/token,
  ~370 MB, at the same bandwidth).
* KV: 4 x 80 GB x 0.9 - 70 GB weights - ~20 GB activations ~ 198 GB / 160 KB per token
  (80 layers x 8 KV heads x 128 dims x K,V x 1 byte) ~ 1.2 M tokens = 18,900 blocks of 64
  tokens (TensorRT-LLM's tokens_per_block 64).
* 256 decode slots (vLLM's max_num_seqs default on H100-class GPUs).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from spillgate.core.engine import EngineConfig
from spillgate.core.fleet import (
    AliasInfo,
    AliasTarget,
    FleetView,
    ModelInfo,
    RegionInfo,
    ReplicaInfo,
    ReplicaStatus,
    VersionInfo,
)
from spillgate.core.policy_config import LatencyPrior, PolicyConfig

MODEL, VERSION, ALIAS, TRITON_NAME = "llama-70b", "v1", "chat", "llama70b_v1"

ENGINE_70B = EngineConfig(
    max_num_seqs=256,
    max_waiting=1024,
    num_kv_blocks=18_900,
    block_size=64,
    ttft_overhead_ms=20.0,
    prefill_ms_per_token=0.05,
    itl_base_ms=10.0,
    itl_per_seq_ms=0.05,
    jitter=0.05,
    token_events=False,
)

# world.toml [scale] and [rtt_ms.aws_avg_2017].
GPUS = {"us": 600, "eu": 300, "apac": 150}
RTT_MS = {("us", "eu"): 80.5, ("us", "apac"): 145.3, ("eu", "apac"): 212.4}
UTC_OFFSET_H = {"us": -5.0, "eu": 1.0, "apac": 9.0}


@dataclass(frozen=True)
class World:
    """Regions, their replica counts and engine, RTTs (ms) and network jitter."""

    regions: tuple[str, ...] = ("us", "eu", "apac")
    gpus: dict[str, int] = field(default_factory=lambda: dict(GPUS))
    gpus_per_replica: int = 4  # tensor parallel 4 (see module docstring)
    scale: float = 1.0  # multiplies replica counts (and, in scenarios, arrival rates)
    engine: EngineConfig = ENGINE_70B
    rtt_ms: dict[tuple[str, str], float] = field(default_factory=lambda: dict(RTT_MS))
    # Relative one-way jitter: each crossing pays rtt/2 x (1 + Exp(mean)); right-skewed like
    # measured WAN latency (world.toml: Azure P95 sits ~10 % above the AWS averages).
    rtt_jitter: float = 0.03

    def replicas(self, region: str) -> int:
        """Replicas in ``region`` at this scale (at least one)."""
        return max(1, round(self.gpus[region] / self.gpus_per_replica * self.scale))

    def demand_scale(self, region: str) -> float:
        """Demand multiplier of ``region``: its replicas over the full-scale count, so the
        rounding of small fleets (at least one replica) keeps each region's load ratio."""
        return self.replicas(region) * self.gpus_per_replica / self.gpus[region]

    def rtt(self, a: str, b: str) -> float:
        """Round trip between two regions in ms (0 within a region)."""
        if a == b:
            return 0.0
        return self.rtt_ms.get((a, b)) or self.rtt_ms[(b, a)]

    def one_way_ms(self, a: str, b: str, rng: random.Random) -> float:
        """One network crossing a -> b with jitter (0 within a region)."""
        if a == b:
            return 0.0
        return self.rtt(a, b) / 2.0 * (1.0 + rng.expovariate(1.0 / self.rtt_jitter))

    def zone(self, region: str) -> str:
        """Residency zone of a region (one zone per region here)."""
        return region

    def with_scale(self, scale: float) -> World:
        """The same world with ``scale`` applied."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be > 0, got {scale}")
        return replace(self, scale=scale)


def replica_ids(world: World) -> list[tuple[str, str]]:
    """(replica id, region) for every replica, in a stable order."""
    return [(f"{r}-{i:03d}", r) for r in world.regions for i in range(world.replicas(r))]


def fleet_view(world: World, down: frozenset[str] = frozenset()) -> FleetView:
    """The registry view the admission policies use (``down`` replicas are NOT_READY)."""
    regions = []
    for r in world.regions:
        rtts = {p: world.rtt(r, p) for p in world.regions if p != r}
        regions.append(RegionInfo(r, world.zone(r), f"gw-{r}:443", rtts))
    model = ModelInfo(MODEL, max_output_tokens=4096)
    version = VersionInfo(MODEL, VERSION, TRITON_NAME)
    alias = AliasInfo(ALIAS, (AliasTarget(MODEL, VERSION, 100),))
    eng = world.engine
    replicas = [
        ReplicaInfo(
            rid,
            region,
            f"{rid}:8001",
            ReplicaStatus.NOT_READY if rid in down else ReplicaStatus.READY,
            ((MODEL, VERSION),),
            eng.max_num_seqs,
            eng.num_kv_blocks,
        )
        for rid, region in replica_ids(world)
    ]
    return FleetView(regions, [model], [version], [alias], replicas, revision=1)


def policy_config(world: World, mean_prompt: int = 2304, mean_output: int = 48) -> PolicyConfig:
    """PolicyConfig whose latency prior is the simulated replica (what an operator sets)."""
    eng = world.engine
    prior = LatencyPrior(
        ttft_overhead_ms=eng.ttft_overhead_ms,
        prefill_ms_per_token=eng.prefill_ms_per_token,
        itl_base_ms=eng.itl_base_ms,
        itl_per_seq_ms=eng.itl_per_seq_ms,
        max_num_seqs=eng.max_num_seqs,
        kv_blocks=eng.num_kv_blocks,
        mean_prompt_tokens=mean_prompt,
        mean_output_tokens=mean_output,
    )
    return PolicyConfig(default_output_tokens=mean_output, prior=prior)
