"""Every benchmark at least starts: its imports resolve and its arguments parse (`--help`).

The benches are not run by the suite (they take minutes and measure the machine), so a
helper moved between bench modules would otherwise break one silently."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCHES = sorted(p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))


def test_there_are_benches() -> None:
    assert "gateway_overhead.py" in BENCHES and len(BENCHES) >= 10


@pytest.mark.parametrize("bench", BENCHES)
def test_a_bench_starts_and_explains_its_arguments(bench: str) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / bench), "--help"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout
