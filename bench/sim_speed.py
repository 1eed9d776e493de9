"""Global simulator speed: simulated requests per wall second, per policy, at a given scale.

    .venv/bin/python bench/sim_speed.py [--scale 1.0] [--duration 10] [--policy spillgate,nearest]
        [--json PATH]

Runs the `steady` preset (global peak, ~50k req/s at scale 1) compressed to ``--duration``
simulated seconds, one policy at a time on one core, and prints requests, wall time and
requests per wall second. Full scale, 60 s of peak is ~3M requests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))

from _common import log, machine

from spillgate.sim.cli import routers
from spillgate.sim.harness import SimConfig, Simulator
from spillgate.sim.scenarios import SCENARIOS
from spillgate.sim.world import World


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--scenario", default="steady")
    p.add_argument("--policy", default="spillgate,nearest,global-least,llm-d")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    world = World().with_scale(args.scale)
    scenario = SCENARIOS[args.scenario].compressed(args.duration)
    rows = []
    for name in args.policy.split(","):
        log(f"{name}: {args.scenario} at scale {args.scale} for {args.duration} s ...")
        result = Simulator(world, scenario, routers()[name](), SimConfig(seed=args.seed)).run()
        rows.append(
            {
                "policy": name,
                "requests": result.requests,
                "wall_s": round(result.wall_s, 2),
                "requests_per_wall_s": round(result.requests_per_wall_s),
                "projected_60s_peak_min": round(
                    result.wall_s * 60.0 / args.duration / 60.0 / args.scale, 1
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        out = {"machine": machine(), "scale": args.scale, "duration_s": args.duration, "runs": rows}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
