"""`spillgate sim`: run scenario presets through spillgate and the baselines.

spillgate sim --scenario steady --scale 0.05 --out sim-out
spillgate sim --scenario all --policy spillgate,nearest --scale 0.02 --duration 20
spillgate sim --trace trace.jsonl --policy all
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from spillgate.sim.harness import (
    LOCAL_STACK_ADMIT_MS,
    LOCAL_STACK_STREAM_MS,
    RunResult,
    SimConfig,
    Simulator,
)
from spillgate.sim.report import markdown, plots, table, write_json
from spillgate.sim.routers import BASELINES, Router
from spillgate.sim.scenarios import SCENARIOS
from spillgate.sim.spillgate_router import SpillgateRouter
from spillgate.sim.workload import TraceWorkload
from spillgate.sim.world import World, policy_config

DEFAULT_SCENARIOS = ("steady", "apac-over", "outage", "shared-prefix", "flash")


def routers() -> dict[str, Callable[[], Router]]:
    """Every policy by name, spillgate first."""
    out: dict[str, Callable[[], Router]] = {"spillgate": SpillgateRouter}
    out.update(BASELINES)
    return out


def _names(
    value: str, known: dict[str, object] | tuple[str, ...], default: tuple[str, ...], what: str
) -> list[str]:
    if value == "all":
        return list(default)
    names = [v.strip() for v in value.split(",") if v.strip()]
    for n in names:
        if n not in known:
            raise SystemExit(f"spillgate sim: unknown {what} {n!r} (one of: {', '.join(known)})")
    return names


class Bar:
    """A one-line progress bar on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._last = -1

    def __call__(self, fraction: float) -> None:
        if not self.enabled:
            return
        n = int(fraction * 30)
        if n == self._last and fraction < 1.0:
            return
        self._last = n
        elapsed = time.perf_counter() - self._t0
        bar = "#" * n + "." * (30 - n)
        end = "\n" if fraction >= 1.0 else ""
        print(
            f"\r{self.label:32s} [{bar}] {100 * fraction:3.0f}% {elapsed:6.1f}s",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spillgate sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scenario", default="steady", help=f"comma list or 'all' ({', '.join(SCENARIOS)})"
    )
    p.add_argument("--policy", default="all", help=f"comma list or 'all' ({', '.join(routers())})")
    p.add_argument(
        "--scale",
        type=float,
        default=0.05,
        help="fleet and demand scale (1 = 1,050 GPUs at 50k req/s peak)",
    )
    p.add_argument("--duration", type=float, help="simulated seconds (presets scale along)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trace", type=Path, help="replay this JSONL trace instead of generating")
    p.add_argument("--dump-trace", type=Path, help="write the generated workload as JSONL")
    p.add_argument("--out", type=Path, help="folder for results.json and the PNG plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    p.add_argument(
        "--local-overhead",
        action="store_true",
        help="add the local stack's measured per-request Admit and stream set-up overhead",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not (0 < args.scale <= 4):
        print("spillgate sim: --scale must be in (0, 4]", file=sys.stderr)
        return 2
    world = World().with_scale(args.scale)
    scenario_names = _names(args.scenario, tuple(SCENARIOS), DEFAULT_SCENARIOS, "scenario")
    policy_names = _names(args.policy, tuple(routers()), tuple(routers()), "policy")
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    budgets = dict(policy_config(world).budgets_ms)
    config = SimConfig(seed=args.seed)
    if args.local_overhead:
        config = SimConfig(
            seed=args.seed, admit_ms=LOCAL_STACK_ADMIT_MS, stream_ms=LOCAL_STACK_STREAM_MS
        )
    results: list[RunResult] = []
    for sname in scenario_names:
        scenario = SCENARIOS[sname]
        if args.duration:
            scenario = scenario.compressed(args.duration)
        for pname in policy_names:
            trace = TraceWorkload(args.trace, budgets) if args.trace else None
            sim = Simulator(world, scenario, routers()[pname](), config, trace)
            if args.dump_trace and pname == policy_names[0]:
                _dump(sim, args.dump_trace)
                trace = TraceWorkload(args.dump_trace, budgets)
                sim = Simulator(world, scenario, routers()[pname](), config, trace)
            result = sim.run(Bar(f"{sname} / {pname}", show))
            results.append(result)
    print(markdown(results) if args.markdown else table(results))
    total = sum(r.requests for r in results)
    wall = sum(r.wall_s for r in results)
    print(
        f"\n{total} simulated requests in {wall:.1f} s wall "
        f"({total / wall if wall else 0:.0f} requests per wall second)"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "scale": args.scale,
            "seed": args.seed,
            "scenarios": scenario_names,
            "policies": policy_names,
            "duration_s": args.duration,
        }
        write_json(args.out / "results.json", results, meta)
        written = [] if args.no_plots else plots(args.out, results)
        print(f"wrote {args.out / 'results.json'} and {len(written)} plots")
    return 0


def _dump(sim: Simulator, path: Path) -> None:
    from spillgate.sim.workload import dump_trace

    def stream() -> object:
        while sim.workload.next_time() is not None:
            req = sim.workload.pop()
            if req is not None:
                yield req

    n = dump_trace(stream(), path)  # type: ignore[arg-type]
    print(f"wrote {n} requests to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
