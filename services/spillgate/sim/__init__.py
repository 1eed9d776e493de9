"""spillgate.sim: discrete-event global simulator running the same core policy.

Public surface: ``Simulator`` (harness), ``World`` (regions, GPUs, RTTs, replica engine),
``SCENARIOS`` (named presets), the routers (``SpillgateRouter`` and ``BASELINES``).
"""

from spillgate.sim.harness import RunResult, SimConfig, Simulator
from spillgate.sim.routers import BASELINES, Route, RouteKind, Router
from spillgate.sim.scenarios import SCENARIOS, Scenario
from spillgate.sim.spillgate_router import SpillgateRouter
from spillgate.sim.world import World

__all__ = [
    "BASELINES",
    "SCENARIOS",
    "Route",
    "RouteKind",
    "Router",
    "RunResult",
    "Scenario",
    "SimConfig",
    "Simulator",
    "SpillgateRouter",
    "World",
]
