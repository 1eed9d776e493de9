"""The global simulator: determinism, invariants on every scenario, baselines as described."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

from spillgate.core.decision import Priority
from spillgate.sim import BASELINES, SCENARIOS, SimConfig, Simulator, SpillgateRouter, World
from spillgate.sim.cli import DEFAULT_SCENARIOS, main, routers
from spillgate.sim.harness import RunResult
from spillgate.sim.report import to_json
from spillgate.sim.routers import Router
from spillgate.sim.workload import TraceWorkload, dump_trace

SMALL = World().with_scale(0.005)  # one replica per region
BUDGETS = {p: 1200.0 if p <= Priority.NORMAL else 5000.0 for p in Priority}


def run(
    router: Router,
    scenario: str = "steady",
    duration: float = 3.0,
    seed: int = 1,
    world: World = SMALL,
) -> RunResult:
    sim = Simulator(world, SCENARIOS[scenario].compressed(duration), router, SimConfig(seed=seed))
    return sim.run()


def stable(result: RunResult) -> dict[str, Any]:
    out = to_json([result], {})["runs"][0]
    del out["wall_s"], out["requests_per_wall_s"]
    return out


def test_same_seed_same_results() -> None:
    a = stable(run(SpillgateRouter(), "flash", seed=7))
    b = stable(run(SpillgateRouter(), "flash", seed=7))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = stable(run(SpillgateRouter(), "flash", seed=8))
    assert c["summary"] != a["summary"]


@pytest.mark.parametrize("scenario", DEFAULT_SCENARIOS)
@pytest.mark.parametrize("policy", list(routers()))
def test_invariants_on_every_scenario(scenario: str, policy: str) -> None:
    result = run(routers()[policy](), scenario)
    s = result.summary
    inv = s["invariants"]
    assert result.requests > 100
    # Every simulated request ends exactly once, and none is left unfinished.
    assert inv["ended_twice"] == 0
    a = s["all"]
    assert a["requests"] == result.requests
    assert a["served"] + a["shed"] + a["errors"] + a["unfinished"] == result.requests
    assert a["unfinished"] == 0
    # Residency is never violated (by any policy: the baselines filter by zone too).
    assert inv["residency_violations"] == 0
    # spillgate's overflow stays within the token-bucket bound per neighbour and second.
    assert inv["overflow_cap_violations"] == 0
    assert 0.0 <= a["sla_attainment"] <= 1.0
    for region in s["regions"].values():
        assert region["served"] <= region["requests"]


@pytest.mark.parametrize("policy", list(routers()))
def test_a_run_makes_no_reference_cycles(policy: str) -> None:
    # Simulator.run switches the cyclic collector off, so all it allocates must be freed by
    # reference counting alone: a collection right after a run finds nothing (after a
    # first run, which may trigger one-off lazy imports that leave cycles behind).
    run(routers()[policy](), "outage", duration=1.0)
    sim = Simulator(SMALL, SCENARIOS["outage"].compressed(3.0), routers()[policy]())
    gc.collect()
    sim.run()
    assert gc.isenabled()
    assert gc.collect() == 0


def test_request_path_overhead_delays_every_request() -> None:
    # A constant stream set-up shifts a region-local router's whole timeline: every TTFT and
    # end-to-end grows by exactly that much. The Admit part only applies to routers that
    # make an Admit RPC (spillgate), not to nearest.
    def summary(cfg: SimConfig) -> dict[str, Any]:
        scenario = SCENARIOS["steady"].compressed(2.0)
        return Simulator(SMALL, scenario, routers()["nearest"](), cfg).run().summary["all"]

    none = summary(SimConfig(admit_ms=(0.0, 0.0), stream_ms=(0.0, 0.0)))
    some = summary(SimConfig(admit_ms=(50.0, 50.0), stream_ms=(20.0, 20.0)))
    assert some["served"] == none["served"]
    for metric in ("ttft_ms", "e2e_ms"):
        for q in ("p50", "p99"):
            assert some[metric][q] - none[metric][q] == pytest.approx(20.0, abs=0.2)
    with pytest.raises(ValueError):
        SimConfig(stream_ms=(5.0, 1.0))


@pytest.mark.parametrize("policy", ["nearest", "sglang", "llm-d"])
def test_region_local_baselines_never_leave_their_region(policy: str) -> None:
    result = run(routers()[policy](), "apac-over")
    assert result.summary["flows"] == {}
    assert result.summary["all"]["overflow_share"] == 0.0
    assert (
        result.summary["regions"]["apac"]["shed"] + result.summary["regions"]["apac"]["errors"] > 0
        or result.summary["regions"]["apac"]["sla_attainment"] < 1.0
    )


def test_locality_failover_moves_traffic_only_on_health() -> None:
    quiet = run(routers()["locality-failover"](), "steady", world=World().with_scale(0.02))
    moved = quiet.summary["flows"]
    errors = quiet.summary["all"]["errors"]
    # Cross-region traffic only after errors ejected local replicas (never for load).
    assert not moved or errors >= 5
    outage = run(routers()["locality-failover"](), "outage", duration=6.0)
    assert outage.summary["flows"].get("eu->us", {}).get("requests", 0) > 0


def test_global_round_robin_spreads_evenly() -> None:
    router = BASELINES["global-rr"]()
    sim = Simulator(SMALL, SCENARIOS["steady"].compressed(2.0), router)
    counts: dict[int, int] = {}
    original = router.on_dispatch

    def count(req: Any, replica: int, now: float) -> None:
        if not req.residency:  # residency-tagged requests rotate over their zone's pool
            counts[replica] = counts.get(replica, 0) + 1
        original(req, replica, now)

    router.on_dispatch = count  # type: ignore[method-assign]
    sim.run()
    assert len(counts) == len(sim.cluster.ids)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_spillgate_overflows_apac_and_respects_residency() -> None:
    result = run(SpillgateRouter(), "apac-over", duration=4.0, world=World().with_scale(0.02))
    flows = result.summary["flows"]
    assert flows.get("apac->us", {}).get("requests", 0) > 0
    assert result.summary["invariants"]["residency_violations"] == 0
    assert result.summary["cross_region_bytes"] > 0


def test_trace_round_trip(tmp_path: Path) -> None:
    sim = Simulator(SMALL, SCENARIOS["steady"].compressed(1.0), SpillgateRouter())
    reqs = []
    while sim.workload.next_time() is not None:
        r = sim.workload.pop()
        if r is not None:
            reqs.append(r)
    path = tmp_path / "trace.jsonl"
    assert dump_trace(iter(reqs), path) == len(reqs)
    trace = TraceWorkload(path, BUDGETS)
    replayed = Simulator(
        SMALL, SCENARIOS["steady"].compressed(1.0), SpillgateRouter(), trace=trace
    ).run()
    assert replayed.requests == len(reqs)


def test_cli_writes_table_json_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--scenario",
            "steady",
            "--policy",
            "spillgate,nearest",
            "--scale",
            "0.005",
            "--duration",
            "1",
            "--out",
            str(tmp_path),
            "--progress",
            "off",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "spillgate" in out and "nearest" in out and "requests per wall second" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["policy"] for r in data["runs"]} == {"spillgate", "nearest"}
    assert (tmp_path / "steady-latency-cdf.png").stat().st_size > 1000
    assert (tmp_path / "steady-utilisation.png").exists()
    assert (tmp_path / "steady-flows.png").exists()


def test_cli_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit):
        main(["--scenario", "nope", "--progress", "off"])
