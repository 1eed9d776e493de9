"""Region failover through a real ingress Envoy: kill every gateway of a region under load.

Three regions share one registry: us (two replicas), eu (one) and apac (one), with RTTs
us-eu 80 ms, us-apac 150 ms, eu-apac 210 ms. `spillgate controlplane serve` follows the
registry and drives the ingress Envoy of region us, whose `ingress_gateway` cluster holds
us's gateway at priority 0, eu's at 1 and apac's at 2.

A client loop sends GatewayService.Health through that Envoy (Health answers with the
gateway's region) at modest concurrency and records one outcome per call. The us gateway is
SIGKILLed, then restarted on the same port. What gives the switch: nothing retries (the
ingress routes carry no retry policy), so calls in flight on the killed connection and calls
sent before Envoy stops picking the dead host end UNAVAILABLE (Envoy's 503 for a reset or a
refused connection). Outlier detection ejects the host after 5 consecutive gateway failures
(at this load within milliseconds); active gRPC health checks (1 s interval, 2 failures)
mark it unhealthy too. With priority 0 empty, all traffic goes to priority 1 (eu). On
restart the next passing health check (healthy threshold 1) un-ejects the host
(`successful_active_health_check_uneject_host` defaults to true) and priority 0 takes
everything again.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from spillgate._proto import gateway_pb2, gateway_pb2_grpc, registry_pb2
from spillgate.controlplane.envoy import EnvoyProcess, free_port
from spillgate.controlplane.view import NodeInfo, Role
from tests.conftest import ReplicaProcess, ServiceProcess, eventually, start_replica
from tests.fleet_helpers import (
    LOADED,
    Fleet,
    apply,
    replica,
    start_admission,
    start_fleet,
    start_gateway,
    wait_serving,
)
from tests.test_controlplane_envoy import bootstrap, gateway_health, start_controlplane

RTT_MS = {("us", "eu"): 80.0, ("us", "apac"): 150.0, ("eu", "apac"): 210.0}
CONCURRENCY = 4
GAP_S = 0.005  # pause between one worker's calls: a few hundred calls/s in all
CALL_TIMEOUT_S = 2.0
SWITCH_LIMIT_S = 5.0
RETURN_LIMIT_S = 5.0
SETTLED = 300  # calls checked after the return


def rtts(region: str) -> dict[str, float]:
    out = {}
    for (a, b), ms in RTT_MS.items():
        if region in (a, b):
            out[b if region == a else a] = ms
    return out


class World:
    """Fleet `us` (start_fleet) plus regions eu and apac, one replica each."""

    def __init__(self, tmp: Path) -> None:
        self.us: Fleet = start_fleet(tmp / "registry.db")
        self.others: list[ServiceProcess] = []
        try:
            registry = self.us.registry.address
            with ThreadPoolExecutor(4) as pool:
                started = list(pool.map(self._start_region, ["eu", "apac"]))
            gateways = {"us": self.us.gateway_address}
            admissions = {"us": self.us.admission.ready[0]}
            entities = [e for e in self.us.entities if e.WhichOneof("entity") != "region"]
            for region, (rp, admission, gateway) in zip(["eu", "apac"], started, strict=True):
                gateways[region] = gateway.ready[0]
                admissions[region] = admission.ready[0]
                entities.append(replica(f"{region}-0", region, rp, LOADED))
            for region in ("us", "eu", "apac"):
                entities.append(
                    registry_pb2.Entity(
                        region=registry_pb2.Region(
                            id=region,
                            residency_zone=region,
                            rtt_ms=rtts(region),
                            gateway_endpoint=gateways[region],
                            admission_endpoint=admissions[region],
                        )
                    )
                )
            apply(registry, entities)
            for address in (*gateways.values(), *admissions.values()):
                wait_serving(address)
        except BaseException:
            self.stop()
            raise

    def _start_region(self, region: str) -> tuple[ReplicaProcess, ServiceProcess, ServiceProcess]:
        registry = self.us.registry.address
        with ThreadPoolExecutor(2) as pool:
            rp_future = pool.submit(start_replica, "--speed", "20")
            admission_future = pool.submit(start_admission, region, registry)
            for future in (rp_future, admission_future):
                exc = future.exception()
                if exc is None:
                    self.others.append(future.result())
            rp, admission = rp_future.result(), admission_future.result()
        gateway = start_gateway(region, registry, admission.ready[0])
        self.others.append(gateway)
        return rp, admission, gateway

    def restart_us_gateway(self) -> None:
        """SIGKILL must have happened already; start a new us gateway on the same port."""
        port = self.us.gateway_address.rsplit(":", 1)[1]
        registry = self.us.registry.address
        self.us.gateway = start_gateway("us", registry, self.us.admission.ready[0], "--port", port)
        assert self.us.gateway_address.endswith(f":{port}")

    def stop(self) -> None:
        for proc in reversed(self.others):
            proc.stop()
        self.us.stop()


@dataclass(frozen=True)
class Outcome:
    """One call's terminal status: region is set only for OK."""

    sent: float  # time.monotonic() when the call was sent
    done: float
    code: grpc.StatusCode
    region: str = ""


class Load:
    """CONCURRENCY workers calling Health through `target` on their own event loop thread."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.sent = 0
        self.outcomes: list[Outcome] = []
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self._loop.close()

    async def _main(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            await asyncio.gather(*(self._worker(stub) for _ in range(CONCURRENCY)))

    async def _worker(self, stub: gateway_pb2_grpc.GatewayServiceAsyncStub) -> None:
        request = gateway_pb2.HealthRequest()
        while not self._stop.is_set():
            self.sent += 1
            t0 = time.monotonic()
            try:
                reply = await stub.Health(request, timeout=CALL_TIMEOUT_S)
                outcome = Outcome(t0, time.monotonic(), grpc.StatusCode.OK, reply.region)
            except grpc.aio.AioRpcError as exc:
                outcome = Outcome(t0, time.monotonic(), exc.code())
            self.outcomes.append(outcome)
            await asyncio.sleep(GAP_S)

    def since(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.sent >= t]

    def stop(self) -> None:
        """Let every call in flight finish (each has a deadline), then stop the loop."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=CALL_TIMEOUT_S + 10)
        assert not self._thread.is_alive(), "load generator did not stop"
        if self.error is not None:
            raise self.error


def all_from(load: Load, region: str, after: float, window_s: float = 0.5) -> bool:
    """The calls sent in the last `window_s` (and after `after`) all answered by `region`."""
    now = time.monotonic()
    recent = [o for o in load.since(after) if o.done <= now and o.sent >= now - window_s]
    return len(recent) >= 20 and all(o.region == region for o in recent)


def done_since(load: Load, t: float, n: int) -> list[Outcome]:
    """The first `n` calls to finish among those sent after `t`, once there are `n`; else []."""
    first = load.since(t)[:n]
    return first if len(first) == n else []


def last_other(outcomes: list[Outcome], region: str, start: float) -> float:
    """Seconds from `start` to the send time of the last call not answered by `region`."""
    bad = [o.sent for o in outcomes if o.sent >= start and o.region != region]
    return max(bad) - start if bad else 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("failover"))
    yield w
    w.stop()


def test_region_failover_under_load_and_return(world: World, tmp_path: Path) -> None:
    cp = start_controlplane(world.us.registry.address)
    envoy: EnvoyProcess | None = None
    load: Load | None = None
    try:
        info = NodeInfo("us", Role.INGRESS, free_port())
        envoy = EnvoyProcess(bootstrap(info, cp.ready[0]), tmp_path)
        envoy.start()
        envoy.wait_ready()
        assert eventually(lambda: gateway_health(info.grpc_port)) == "us"

        load = Load(f"127.0.0.1:{info.grpc_port}")
        t_load = time.monotonic()
        load.start()
        eventually(lambda: all_from(load, "us", t_load), timeout=10)

        # Kill every gateway of us (there is one): eu, the next region by RTT, takes over.
        t_kill = time.monotonic()
        world.us.gateway.stop(signal.SIGKILL)
        eventually(lambda: all_from(load, "eu", t_kill), timeout=SWITCH_LIMIT_S + 5)
        t_switched = time.monotonic()
        switch_s = last_other(load.since(t_kill), "eu", t_kill)

        # Restore on the same port: traffic returns to us once a health check passes.
        t_restart = time.monotonic()
        world.restart_us_gateway()
        t_ready = time.monotonic()
        eventually(lambda: all_from(load, "us", t_ready), timeout=RETURN_LIMIT_S + 5)
        return_s = last_other(load.since(t_restart), "us", t_ready)

        # After the return: the next SETTLED calls all go to us, none to the fallback.
        t_settled = time.monotonic()
        settled = eventually(lambda: done_since(load, t_settled, SETTLED), timeout=10)
    finally:
        if load is not None:
            load.stop()
        if envoy is not None:
            envoy.stop()
        cp.stop()

    outcomes = load.outcomes
    # Every call sent got exactly one terminal status.
    assert load.sent == len(outcomes)
    codes = collections.Counter(o.code.name for o in outcomes)
    during_switch = [o for o in outcomes if t_kill <= o.sent < t_switched]
    during_return = [o for o in outcomes if t_restart <= o.sent]
    failed_switch = sum(o.code is not grpc.StatusCode.OK for o in during_switch)
    failed_return = sum(o.code is not grpc.StatusCode.OK for o in during_return)
    print(
        f"\n{len(outcomes)} calls {dict(codes)}; switch to eu after {switch_s * 1000:.0f} ms "
        f"({failed_switch} failed of {len(during_switch)}); return to us "
        f"{return_s * 1000:.0f} ms after the restarted gateway was ready "
        f"(restart took {(t_ready - t_restart) * 1000:.0f} ms, {failed_return} failed); "
        f"{len(settled)} calls after the return, regions "
        f"{dict(collections.Counter(o.region for o in settled))}"
    )
    # Calls fail only while Envoy still picks the dead host, and only as UNAVAILABLE.
    assert set(codes) <= {"OK", "UNAVAILABLE"}
    assert switch_s < SWITCH_LIMIT_S
    assert return_s < RETURN_LIMIT_S
    assert failed_return == 0
    # Priorities follow RTT: apac (150 ms) never serves while eu (80 ms) is up.
    assert not [o for o in outcomes if o.region == "apac"]
    assert {o.region for o in settled} == {"us"}
    assert not [line for line in cp.output if "Traceback" in line or " ERROR " in line]
