"""Named scenario presets: demand curve, flash crowds, outages, workload mix.

Demand follows the sun: each region's rate is its share of users times a diurnal factor of
its local hour (peak 15:00, trough 03:00 at 10 % of peak), normalized so the global maximum
over a day is ``peak_qps`` (world.toml scale.peak_qps = 50,000). At the global peak
(17:00 UTC) eu runs slightly past its capacity and apac sleeps; at 06:00 UTC apac is at its
own peak, ~1.7x its capacity, while us and eu are quiet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from spillgate.sim.workload import WorkloadSpec
from spillgate.sim.world import UTC_OFFSET_H

USER_SHARE = {"us": 0.45, "eu": 0.33, "apac": 0.22}


def diurnal(local_hour: float) -> float:
    """Relative demand at a local hour: 1.0 at 15:00, 0.1 at 03:00."""
    return 0.55 + 0.45 * math.cos(2 * math.pi * (local_hour - 15.0) / 24.0)


def _global(hour_utc: float) -> float:
    return sum(s * diurnal(hour_utc + UTC_OFFSET_H[r]) for r, s in USER_SHARE.items())


_NORM = max(_global(h / 10.0) for h in range(240))  # the day's global maximum


@dataclass(frozen=True)
class Flash:
    """Demand of ``region`` multiplied by ``factor`` during [start_s, start_s + duration_s)."""

    region: str
    start_s: float
    duration_s: float
    factor: float


@dataclass(frozen=True)
class Outage:
    """Every replica of ``region`` is down during [start_s, start_s + duration_s)."""

    region: str
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class Scenario:
    """One named preset. Rates are at world scale 1; the simulator multiplies by its scale."""

    name: str
    description: str
    duration_s: float
    start_hour_utc: float = 17.0
    peak_qps: float = 50_000.0
    time_warp: float = 1.0  # diurnal hours that pass per simulated hour
    flashes: tuple[Flash, ...] = ()
    outages: tuple[Outage, ...] = ()
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)

    def rate(self, region: str, t_s: float, scale: float = 1.0) -> float:
        """Arrivals per second from ``region``'s users at simulated second ``t_s``."""
        hour = self.start_hour_utc + t_s * self.time_warp / 3600.0 + UTC_OFFSET_H[region]
        r = self.peak_qps * scale * USER_SHARE[region] * diurnal(hour) / _NORM
        for f in self.flashes:
            if f.region == region and f.start_s <= t_s < f.start_s + f.duration_s:
                r *= f.factor
        return r

    def compressed(self, duration_s: float) -> Scenario:
        """The same story in ``duration_s``: flash and outage windows scale along."""
        k = duration_s / self.duration_s
        return replace(
            self,
            duration_s=duration_s,
            flashes=tuple(
                replace(f, start_s=f.start_s * k, duration_s=f.duration_s * k) for f in self.flashes
            ),
            outages=tuple(
                replace(o, start_s=o.start_s * k, duration_s=o.duration_s * k) for o in self.outages
            ),
        )


_HIGH_CACHE = WorkloadSpec(shapes={"high_cache": 0.9, "low_cache": 0.1})

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("steady", "global peak (17:00 UTC): us busy, eu just past capacity", 60.0),
        Scenario(
            "apac-over",
            "06:00 UTC: apac at its daily peak, ~1.7x its capacity",
            60.0,
            start_hour_utc=6.0,
        ),
        Scenario(
            "outage",
            "global peak; every eu replica down for 5 minutes",
            420.0,
            outages=(Outage("eu", 60.0, 300.0),),
        ),
        Scenario(
            "shared-prefix",
            "global peak; 90 % high-cache shared-prefix traffic",
            60.0,
            workload=_HIGH_CACHE,
        ),
        Scenario(
            "flash",
            "00:00 UTC (apac morning); apac demand x3 for 60 s",
            150.0,
            start_hour_utc=0.0,
            flashes=(Flash("apac", 45.0, 60.0, 3.0),),
        ),
        Scenario(
            "day",
            "a whole day compressed into 240 s (diurnal rotation)",
            240.0,
            start_hour_utc=0.0,
            time_warp=360.0,
        ),
    )
}
