"""Admission end to end with real processes: registry, replica simulators, one admission per
test, and a zero-proxy client (Admit -> tritonclient.grpc.aio stream -> Release).

Each test compares the admission with a naive router (round-robin, uniform random) on the
same run, so the assertions are ratios that hold on a noisy 2-core machine.
"""

from __future__ import annotations

import random
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spillgate._proto import (
    admission_pb2,
    admission_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import ReplicaProcess, ServiceProcess, eventually, set_faults, start_replica
from tests.test_admission_service import DIGEST, start_admission
from tests.test_registry_service import Registry, start_registry
from tests.zero_proxy import Call, Result, TritonZeroProxy, percentile, run_load

MODEL = "llm-small"
# Speed 2: a 16-token answer takes ~75 ms of wall time, long enough that routing (not the
# Admit RPC) decides the latency, short enough for several hundred requests per test.
SPEED = 2.0
# Small KV cache (blocks of 16 tokens): ~12 of the shared system prompts below fit per
# replica, so where a prefix lands decides whether it hits.
REPLICA_TOML = """
speed = {speed}
seed = {seed}
load = ["llm-small"]

[llm.llm-small]
max_num_seqs = 64
max_waiting = 256
num_kv_blocks = 420
block_size = 16
jitter = 0.05
"""


@dataclass
class Fleet:
    """One region of the registry: its replicas and its admission."""

    region: str
    replicas: list[ReplicaProcess]
    admission: ServiceProcess
    ids: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.admission.ready[0]

    def replica_id(self, endpoint: str) -> str:
        return self.ids[[r.grpc for r in self.replicas].index(endpoint)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("integration") / "registry.db")
    entities = [
        registry_pb2.Entity(
            model=registry_pb2.Model(
                id=MODEL, kind=common_pb2.MODEL_KIND_LLM, max_context_tokens=8192,
                max_output_tokens=512,
            )
        ),
        registry_pb2.Entity(
            version=registry_pb2.Version(
                model=MODEL, version="v1", artifact_digest=DIGEST, triton_model_name=MODEL
            )
        ),
    ]  # fmt: skip
    try:
        _apply(reg, entities)
        yield reg
    finally:
        reg.stop()


def _apply(reg: Registry, entities: list[registry_pb2.Entity]) -> None:
    with grpc.insecure_channel(reg.address) as channel:
        registry_pb2_grpc.RegistryServiceStub(channel).Apply(
            registry_pb2.ApplyRequest(mutations=[registry_pb2.Mutation(put=e) for e in entities])
        )


def _healthy_replicas(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stream = admission_pb2_grpc.AdmissionServiceStub(channel).WatchRegion(
            admission_pb2.WatchRegionRequest(interval_ms=50)
        )
        try:
            summary = next(stream).summary
        finally:
            stream.cancel()
    return sum(h.healthy_replicas for h in summary.models if h.model == MODEL)


@pytest.fixture
def make_fleet(registry: Registry, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """`make_fleet(region, n, speed=SPEED)`: n fresh replicas + an admission for `region`,
    every replica scraped and healthy."""
    started: list[ServiceProcess] = []

    def make(region: str, n: int, speed: float = SPEED) -> Fleet:
        configs = []
        for i in range(n):
            path = tmp_path / f"{region}-{i}.toml"
            path.write_text(REPLICA_TOML.format(speed=speed, seed=i))
            configs.append(path)
        with ThreadPoolExecutor(n) as pool:
            replicas = list(pool.map(lambda p: start_replica("--config", str(p)), configs))
        started.extend(replicas)
        admission = start_admission(region, registry.address)
        started.append(admission)
        fleet = Fleet(region, replicas, admission, [f"{region}-{i}" for i in range(n)])
        entities = [
            registry_pb2.Entity(region=registry_pb2.Region(id=region, residency_zone=region))
        ]
        for rid, rp in zip(fleet.ids, replicas, strict=True):
            entities.append(
                registry_pb2.Entity(
                    replica=registry_pb2.Replica(
                        id=rid,
                        region=region,
                        pool="default",
                        endpoint=rp.grpc,
                        metrics_endpoint=f"http://{rp.metrics}/metrics",
                        backend=common_pb2.BACKEND_KIND_SIMULATOR,
                        loaded=[common_pb2.VersionRef(model=MODEL, version="v1")],
                        state=common_pb2.REPLICA_STATE_READY,
                    )
                )
            )
        _apply(registry, entities)
        with grpc.insecure_channel(fleet.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            eventually(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest()).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            )
        # Every replica scraped fresh and counted healthy before traffic starts.
        eventually(lambda: _healthy_replicas(fleet.address) == n)
        return fleet

    yield make
    for proc in reversed(started):
        proc.stop()


def _metric(rp: ReplicaProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://{rp.metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*model=\"{MODEL}\"[^}}]*\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _p99(results: list[Result]) -> float:
    return percentile([r.latency_ms for r in results], 0.99)


def _question(rng: random.Random, n: int) -> str:
    return " ".join(f"q{rng.randrange(10**6)}" for _ in range(n))


# -- 1: predicted latency beats round-robin under skew -------------------------------------------


async def test_skewed_load_admission_p99_beats_round_robin(
    make_fleet: Callable[..., Fleet],
) -> None:
    """One replica of three runs 6x slower: routing by predicted latency (scraped load and
    the timings learned from Release) keeps p99 near the fast replicas' latency, while
    round-robin sends a third of the requests to the slow one."""
    fleet = make_fleet("skew", 3)
    slow = fleet.replicas[2]
    set_faults(slow, slow_factor=6.0)
    rng = random.Random(1)
    calls = [Call(_question(rng, 100), 16) for _ in range(360)]
    warmup = [Call(_question(rng, 100), 16) for _ in range(24)]
    concurrency = 12
    client = TritonZeroProxy(fleet.address)
    endpoints = [r.grpc for r in fleet.replicas]
    try:
        # Warm-up (not measured, same for both arms): the admission learns each replica's
        # speed from the Releases of its first requests.
        await run_load(warmup, concurrency, lambda _, c: client.admitted(c))
        admitted = await run_load(calls, concurrency, lambda _, c: client.admitted(c))
        await run_load(
            warmup, concurrency, lambda i, c: client.direct(endpoints[i % len(endpoints)], c)
        )
        round_robin = await run_load(
            calls, concurrency, lambda i, c: client.direct(endpoints[i % len(endpoints)], c)
        )
    finally:
        await client.close()
    assert all(r.ok and r.released for r in admitted), [r for r in admitted if not r.ok][:3]
    assert all(r.ok for r in round_robin)
    spread = Counter(r.replica for r in admitted)
    p99_admission, p99_rr = _p99(admitted), _p99(round_robin)
    print(
        f"\nskew: p99 admission {p99_admission:.0f} ms vs round-robin {p99_rr:.0f} ms;"
        f" admission spread {dict(spread)}"
    )
    assert spread[fleet.ids[2]] < len(calls) * 0.05, spread
    assert p99_admission * 1.5 < p99_rr, (p99_admission, p99_rr)


# -- 2: prefix affinity raises cache hits without hurting p99 ------------------------------------


def _prefix_calls(rng: random.Random, tag: str, groups: int, per_group: int) -> list[Call]:
    """`groups` shared 512-token system prompts (32 blocks), each asked `per_group` distinct
    24-token questions with short answers (prefill matters), shuffled with `rng`."""
    systems = [" ".join(f"{tag}{g}w{i}" for i in range(512)) for g in range(groups)]
    calls = [
        Call(f"{systems[g]} {_question(rng, 24)}", 4, prefix=True)
        for g in range(groups)
        for _ in range(per_group)
    ]
    rng.shuffle(calls)
    return calls


def _hits(replicas: list[ReplicaProcess]) -> float:
    return sum(_metric(rp, "vllm:prefix_cache_hits_total") for rp in replicas)


async def test_prefix_affinity_raises_cache_hits_over_random_without_raising_p99(
    make_fleet: Callable[..., Fleet],
) -> None:
    """30 system prompts, a KV cache that holds ~12 per replica: the admission keeps each
    prompt on the replica that cached it (prefix_block_hashes over the simulator's own
    tokenizer and block size), random routing makes every replica cycle through all 30.

    A p99 of 600 requests is the 6th worst, and bounded load turns affinity away while a
    contended box makes replicas run behind, so one disturbed arm on this shared 2-core
    machine can spoil a round: a round that fails is measured again (up to 3 rounds, fresh
    prompts each), and only a persistent failure fails the test."""
    fleet = make_fleet("prefix", 3, speed=1.0)
    rng = random.Random(7)
    endpoints = [r.grpc for r in fleet.replicas]
    pick = random.Random(3)
    client = TritonZeroProxy(fleet.address)
    rounds: list[str] = []
    try:
        for r in range(3):
            # Distinct prompts per arm and round: the caches of one cannot help another.
            random_calls = _prefix_calls(rng, f"r{r}x", 30, 20)
            admission_calls = _prefix_calls(rng, f"a{r}x", 30, 20)
            before = _hits(fleet.replicas)
            randomly = await run_load(
                random_calls, 12, lambda _, c: client.direct(pick.choice(endpoints), c)
            )
            middle = _hits(fleet.replicas)
            admitted = await run_load(admission_calls, 12, lambda _, c: client.admitted(c))
            after = _hits(fleet.replicas)
            assert all(r.ok for r in randomly)
            assert all(r.ok and r.released for r in admitted), [r for r in admitted if not r.ok][:3]
            hits_random, hits_admission = middle - before, after - middle
            reasons = Counter(r.reason for r in admitted)
            p99_admission, p99_random = _p99(admitted), _p99(randomly)
            # The replica-side part (Admit returned -> last token) is what routing changes;
            # end to end adds the Admit and Release RPCs, whose tail on a busy 2-core box is
            # ~10-20 ms.
            p99_stream = percentile(
                [r.latency_ms - (r.admitted_at - r.start) * 1e3 for r in admitted], 0.99
            )
            rounds.append(
                f"prefix: hit tokens admission {hits_admission:.0f} vs random {hits_random:.0f};"
                f" p99 admission {p99_admission:.0f} ms (replica part {p99_stream:.0f})"
                f" vs random {p99_random:.0f} ms; {dict(reasons)}"
            )
            print("\n" + rounds[-1])
            # The cache hits are the claim; the affinity share only shows the mechanism
            # engaged (386-521 of 600 on a quiet box; bounded load lets fewer through when
            # the CPU is contended and replicas run behind).
            if (
                hits_admission >= 1.5 * hits_random
                and reasons["prefix_affinity"] > len(admission_calls) // 8
                and p99_stream <= p99_random * 1.2
                and p99_admission <= p99_random * 1.5
            ):
                return
    finally:
        await client.close()
    raise AssertionError(f"no round showed more cache hits at no p99 cost: {rounds}")


# -- 3: a killed replica is cut off; its failures are released as errors --------------------------


async def test_killed_replica_gets_no_new_requests_and_failures_are_released(
    make_fleet: Callable[[str, int], Fleet],
) -> None:
    """SIGKILL one of three replicas under load: its in-flight streams fail and are
    Released with OUTCOME_ERROR (found, not dropped), and within a bounded time (stale
    scrapes, failed health checks and the errors opening its breaker) no Admit picks it."""
    fleet = make_fleet("kill", 3)
    victim, victim_id = fleet.replicas[0], fleet.ids[0]
    rng = random.Random(5)
    calls = [Call(_question(rng, 100), 32) for _ in range(400)]
    client = TritonZeroProxy(fleet.address)
    killed_at: list[float] = []

    async def send(i: int, call: Call) -> Result:
        if i == 120 and not killed_at:
            victim.proc.kill()  # SIGKILL: no goodbye, connections reset mid-stream
            killed_at.append(time.monotonic())
        return await client.admitted(call)

    try:
        results = await run_load(calls, 9, send)
    finally:
        await client.close()
    kill = killed_at[0]
    served = [r for r in results if r.action == common_pb2.ACTION_SERVE]
    on_victim = [r for r in served if r.replica == victim_id]
    failed = [r for r in served if not r.ok]
    last_pick = max(r.admitted_at for r in on_victim) - kill
    after = [r for r in served if r.admitted_at > kill + 1.0]
    print(
        f"\nkill: {len(on_victim)} on the victim, {len(failed)} failed, last pick of the victim"
        f" {last_pick * 1000:.0f} ms after the kill, run ended {(results[-1].start - kill):.1f} s"
        f" after it; picks after kill+1s {dict(Counter(r.replica for r in after))}"
    )
    # Every failure is the victim's, and every one was released as an error the admission
    # still knew (found): none silently dropped.
    assert failed and all(r.replica == victim_id for r in failed), failed[:3]
    assert all(r.released is True for r in served)
    assert all(r.outcome == admission_pb2.OUTCOME_ERROR for r in failed)
    assert all(r.ok for r in served if r.replica != victim_id)
    # Detection: no decision for the victim 1 s after the kill, though traffic went on.
    assert last_pick < 1.0, last_pick
    assert max(r.admitted_at for r in served) - kill > 2.0
    assert after and {r.replica for r in after} <= set(fleet.ids[1:])
    # Nothing was shed: the two survivors absorbed the load.
    assert len(served) == len(results)


async def test_erroring_replica_with_fresh_metrics_is_cut_off_by_its_breaker(
    make_fleet: Callable[[str, int], Fleet],
) -> None:
    """A replica that answers every inference with INTERNAL but keeps exporting fresh
    metrics: only the breaker (fed by the client's OUTCOME_ERROR Releases and the failing
    canary) can exclude it, after `failure_threshold` (5) consecutive failures."""
    fleet = make_fleet("breaker", 3)
    bad, bad_id = fleet.replicas[1], fleet.ids[1]
    set_faults(bad, error_rate=1.0)
    rng = random.Random(9)
    calls = [Call(_question(rng, 100), 16) for _ in range(150)]
    client = TritonZeroProxy(fleet.address)
    try:
        results = await run_load(calls, 6, lambda _, c: client.admitted(c))
    finally:
        await client.close()
    on_bad = [r for r in results if r.replica == bad_id]
    print(f"\nbreaker: {len(on_bad)} requests reached the failing replica")
    assert all(not r.ok and r.outcome == admission_pb2.OUTCOME_ERROR for r in on_bad)
    assert all(r.released is True for r in results if r.action == common_pb2.ACTION_SERVE)
    # At most the threshold plus those already in flight when it opened.
    assert 1 <= len(on_bad) <= 5 + 6, len(on_bad)
    assert all(r.ok for r in results if r.replica != bad_id)
    assert len(results) - len(on_bad) >= 130
