"""Helpers shared by the benchmarks (run as `python bench/NAME.py`: imports as `_common`)."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import signal
import sys
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays the result."""
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, CPU model, Python and grpcio versions."""
    import grpc

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def command_line() -> str:
    """The command that ran this benchmark, as the README quotes it."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    with contextlib.suppress(ValueError):
        argv[0] = os.path.relpath(argv[0]) if not argv[0].startswith("/") else argv[0]
    return shlex.join(argv)


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so a benchmark's cleanup (child processes,
    temporary files) runs when it is stopped like any other service."""

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)


def begin() -> tuple[dict[str, Any], str]:
    """A benchmark's start: SIGTERM stops it cleanly, the machine goes to the progress log.
    Returns (machine(), command_line()) for the report's header."""
    stop_on_sigterm()
    info = machine()
    log(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}")
    return info, command_line()


def header(info: dict[str, Any], cmd: str) -> str:
    """The report's first two lines: what it was measured on, and the command."""
    return (
        f"Machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"grpcio {info['grpcio']}, {info['platform']}\nCommand: `{cmd}`"
    )
