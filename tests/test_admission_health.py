"""Health checks (ServerLive, ModelReady, canary inference) against real replica processes.

Fault tests share one module replica and reset its faults before and after each test; the
kill test owns its replica. Everything polls with deadlines.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import TypeVar

import pytest

from spillgate.admission.health import (
    CheckKind,
    HealthChecker,
    HealthConfig,
    HealthEvent,
    HealthStatus,
    HealthTarget,
)
from tests.conftest import NO_FAULTS, ReplicaProcess, set_faults, start_replica, until

T = TypeVar("T")

FAST = HealthConfig(live_interval=0.1, canary_interval=0.15, rpc_timeout=0.5, canary_timeout=0.5)


def clear_faults(rp: ReplicaProcess) -> None:
    set_faults(rp, **NO_FAULTS)


def health_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("spillgate-")]


@pytest.fixture(scope="module")
def shared() -> Iterator[ReplicaProcess]:
    rp = start_replica("--speed", "20")
    yield rp
    rp.stop()


@pytest.fixture
def faulty(shared: ReplicaProcess) -> Iterator[ReplicaProcess]:
    """The module replica with its faults cleared before and after the test."""
    clear_faults(shared)
    yield shared
    clear_faults(shared)


class Recorder:
    """Collects events; `after(t)` are those of checks that finished after clock time t."""

    def __init__(self) -> None:
        self.events: list[HealthEvent] = []

    def __call__(self, event: HealthEvent) -> None:
        self.events.append(event)

    def after(self, t: float, kind: CheckKind) -> list[HealthEvent]:
        return [e for e in self.events if e.time > t and e.kind is kind]


def status_of(checker: HealthChecker, rid: str) -> HealthStatus:
    status = checker.status(rid)
    assert status is not None
    return status


async def test_healthy_replica_passes_live_ready_and_canary(faulty: ReplicaProcess) -> None:
    rec = Recorder()
    target = HealthTarget(faulty.grpc, ("llm-small", "simple"), canary_model="llm-small")
    async with HealthChecker(FAST, on_event=rec) as checker:
        checker.set_targets({"r1": target})
        assert not status_of(checker, "r1").healthy  # nothing known yet: not healthy
        await until(lambda: status_of(checker, "r1").healthy)
        status = status_of(checker, "r1")
        assert status.live is not None and status.live.detail == "ok"
        assert set(status.ready) == {"llm-small", "simple"}
        assert status.canary is not None and status.canary.model == "llm-small"
        assert 0 < status.canary.latency < FAST.canary_timeout
        assert {e.kind for e in rec.events} == set(CheckKind)
        assert all(e.ok and e.replica_id == "r1" for e in rec.events), rec.events
    assert health_tasks() == []


async def test_a_model_the_replica_does_not_serve_is_not_ready(faulty: ReplicaProcess) -> None:
    rec = Recorder()
    target = HealthTarget(faulty.grpc, ("llm-small", "llm-large"))  # llm-large: not loaded
    async with HealthChecker(FAST, on_event=rec) as checker:
        checker.set_targets({"r1": target})
        await until(lambda: "llm-large" in status_of(checker, "r1").ready)
        status = status_of(checker, "r1")
        assert status.ready["llm-large"].ok is False and status.ready["llm-small"].ok
        assert status.live is not None and status.live.ok and not status.healthy
        assert status.consecutive_failures.get(CheckKind.READY, 0) >= 1


async def test_stall_fails_the_canary_but_not_liveness_and_clearing_heals(
    faulty: ReplicaProcess,
) -> None:
    rec = Recorder()
    target = HealthTarget(faulty.grpc, ("llm-small",), canary_model="llm-small")
    async with HealthChecker(FAST, on_event=rec) as checker:
        checker.set_targets({"r1": target})
        await until(lambda: status_of(checker, "r1").healthy)

        set_faults(faulty, stall=True)
        t_fault = time.monotonic()
        failed = await until(lambda: [e for e in rec.after(t_fault, CheckKind.CANARY) if not e.ok])
        assert "timed out after 0.5 s" in failed[0].detail
        assert failed[0].latency >= FAST.canary_timeout * 0.9
        assert not status_of(checker, "r1").healthy
        live = rec.after(t_fault, CheckKind.LIVE)
        assert live and all(e.ok for e in live)  # the server answers; only inference stalls

        clear_faults(faulty)
        t_clear = time.monotonic()
        await until(lambda: any(e.ok for e in rec.after(t_clear, CheckKind.CANARY)))
        await until(lambda: status_of(checker, "r1").healthy)
        assert status_of(checker, "r1").consecutive_failures[CheckKind.CANARY] == 0


async def test_injected_errors_fail_the_canary_with_the_replicas_error(
    faulty: ReplicaProcess,
) -> None:
    rec = Recorder()
    target = HealthTarget(faulty.grpc, ("llm-small",), canary_model="llm-small")
    async with HealthChecker(FAST, on_event=rec) as checker:
        checker.set_targets({"r1": target})
        await until(lambda: status_of(checker, "r1").healthy)

        set_faults(faulty, error_rate=1.0)
        t_fault = time.monotonic()
        failed = await until(lambda: [e for e in rec.after(t_fault, CheckKind.CANARY) if not e.ok])
        assert "injected fault" in failed[0].detail
        await until(lambda: status_of(checker, "r1").consecutive_failures[CheckKind.CANARY] >= 2)
        assert all(e.ok for e in rec.after(t_fault, CheckKind.LIVE))

        clear_faults(faulty)
        await until(lambda: status_of(checker, "r1").healthy)


async def test_a_killed_replica_fails_liveness(faulty: ReplicaProcess) -> None:
    victim = start_replica("--speed", "20")
    rec = Recorder()
    try:
        targets = {
            "victim": HealthTarget(victim.grpc, ("llm-small",), canary_model="llm-small"),
            "other": HealthTarget(faulty.grpc, ("simple",)),
        }
        async with HealthChecker(FAST, on_event=rec) as checker:
            checker.set_targets(targets)
            await until(lambda: all(status_of(checker, r).healthy for r in targets))

            victim.stop(signal.SIGKILL)
            t_kill = time.monotonic()

            def live_failed() -> list[HealthEvent]:
                return [
                    e
                    for e in rec.after(t_kill, CheckKind.LIVE)
                    if e.replica_id == "victim" and not e.ok
                ]

            failed = await until(live_failed)
            assert failed[0].detail.startswith("UNAVAILABLE: ")
            await until(
                lambda: status_of(checker, "victim").consecutive_failures[CheckKind.LIVE] >= 2
            )
            assert not status_of(checker, "victim").healthy
            assert status_of(checker, "other").healthy

            checker.set_targets({"other": targets["other"]})  # the registry drops it
            assert checker.status("victim") is None
    finally:
        victim.stop()
    assert health_tasks() == []
