"""Shared fixtures: real processes on port 0, polled with deadlines (never slept on)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call `check` until it returns a truthy value without raising, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (AssertionError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last error: {last!r})")
        time.sleep(interval)


async def until(check: Callable[[], T], timeout: float = 10.0) -> T:
    """The async twin of `eventually`, for checks on state owned by the test's event loop:
    await until `check()` is truthy (AssertionError counts as not yet), or fail."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last error: {last!r})")
        await asyncio.sleep(0.02)


@dataclass
class ServiceProcess:
    """A spillgate process started by a test, with its ready-line fields and output."""

    proc: subprocess.Popen[str]
    ready: tuple[str, ...]  # the groups of the ready-line pattern
    output: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process (if running), wait for it (kill after 10 s), reap its pipe."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.close()

    def close(self) -> int:
        """Reap the output pump and the pipe of an exited process."""
        self.proc.wait()
        if self.pump is not None:
            self.pump.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def start_service(
    args: list[str], ready_line: re.Pattern[str], timeout: float = 30.0
) -> ServiceProcess:
    """Run `python -m <args>` and wait for a line matching `ready_line` (or fail with output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    found: list[tuple[str, ...]] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = ready_line.search(line)
            if m and not found:
                found.append(m.groups())
                ready.set()
        ready.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        ServiceProcess(proc, (), lines, thread).close()
        raise RuntimeError(f"{args[0]} did not become ready:\n" + "".join(lines))
    return ServiceProcess(proc, found[0], lines, thread)


class ReplicaProcess(ServiceProcess):
    @property
    def grpc(self) -> str:
        return self.ready[0]

    @property
    def metrics(self) -> str:
        return self.ready[1]


_READY = re.compile(r"spillgate replica ready grpc=(\S+) metrics=(\S+)")


# Every fault setting at its no-fault value (POST it to clear a replica's faults).
NO_FAULTS: dict[str, Any] = {
    "error_rate": 0.0,
    "refuse_rate": 0.0,
    "added_latency_ms": 0.0,
    "stall": False,
    "slow_factor": 1.0,
}


def set_faults(rp: ReplicaProcess, **changes: Any) -> dict[str, Any]:
    """POST a partial fault update to a replica's /faults; returns the settings now in force."""
    req = urllib.request.Request(
        f"http://{rp.metrics}/faults", data=json.dumps(changes).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return dict(json.loads(resp.read()))


def start_replica(*args: str, timeout: float = 30.0) -> ReplicaProcess:
    """Start `spillgate replica` on free ports and wait for its ready line."""
    cli = ["spillgate.cli", "replica", "--grpc-port", "0", "--metrics-port", "0", *args]
    sp = start_service(cli, _READY, timeout)
    return ReplicaProcess(sp.proc, sp.ready, sp.output, sp.pump)


@pytest.fixture(scope="session")
def replica() -> Iterator[ReplicaProcess]:
    """One replica with the demo models, model time 20x faster than wall time."""
    rp = start_replica("--speed", "20")
    yield rp
    rp.stop()
