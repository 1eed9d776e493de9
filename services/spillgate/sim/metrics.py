"""Per-request outcomes in compact arrays, and the per policy / region summary built from them."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spillgate.sim.workload import SimRequest

STATUS = {"ok": 0, "shed": 1, "error": 2, "unfinished": 3}
QUEUED, DEGRADED, OVERFLOWED = 1, 2, 4
# Bytes on the wire for a request that crosses regions: ~4 bytes of text per token both
# ways (prompt out, completion back) plus ~512 bytes of headers and framing.
BYTES_PER_TOKEN, BYTES_OVERHEAD = 4, 512


@dataclass
class Recorder:
    """Collects outcomes while the simulation runs (O(1) append per request)."""

    regions: tuple[str, ...]
    origin: array[int] = field(default_factory=lambda: array("b"))
    served: array[int] = field(default_factory=lambda: array("b"))
    status: array[int] = field(default_factory=lambda: array("b"))
    flags: array[int] = field(default_factory=lambda: array("b"))
    met: array[int] = field(default_factory=lambda: array("b"))
    ttft: array[float] = field(default_factory=lambda: array("f"))
    e2e: array[float] = field(default_factory=lambda: array("f"))
    flows: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # [requests, bytes]
    prefix_queries: dict[str, int] = field(default_factory=dict)
    prefix_hits: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    residency_violations: int = 0
    ended_twice: int = 0
    overflow_cap_violations: int = 0
    max_overflow_cap_ratio: float = 0.0

    def __post_init__(self) -> None:
        self._index = {r: i for i, r in enumerate(self.regions)}
        for r in self.regions:
            self.prefix_queries[r] = self.prefix_hits[r] = 0

    def end(self, req: SimRequest) -> None:
        """Record a request that just ended (its fields are final)."""
        idx = self._index
        self.origin.append(idx[req.origin])
        self.served.append(idx[req.served_region] if req.status == "ok" else -1)
        self.status.append(STATUS[req.status])
        flags = (QUEUED if req.queued else 0) | (DEGRADED if req.degraded else 0)
        if req.served_region and req.served_region != req.origin:
            flags |= OVERFLOWED
            key = (req.origin, req.served_region)
            flow = self.flows.setdefault(key, [0, 0])
            flow[0] += 1
            flow[1] += (
                BYTES_PER_TOKEN * (req.prompt_tokens + max(req.output_tokens, 0)) + BYTES_OVERHEAD
            )
        self.flags.append(flags)
        ok = req.status == "ok"
        self.met.append(1 if ok and req.e2e_ms <= req.budget_ms else 0)
        self.ttft.append(req.ttft_ms if ok else math.nan)
        self.e2e.append(req.e2e_ms if ok else math.nan)

    def started(self, region: str, prompt: int, cached: int) -> None:
        """A request started on a replica of ``region`` with ``cached`` prompt tokens hit."""
        self.prefix_queries[region] += prompt
        self.prefix_hits[region] += cached

    def summary(self, duration_s: float) -> dict[str, Any]:
        """Totals and per-origin-region metrics (JSON-ready)."""
        origin = np.frombuffer(self.origin, dtype=np.int8)
        out: dict[str, Any] = {"all": self._group(np.ones(len(origin), bool), duration_s)}
        q = sum(self.prefix_queries.values())
        out["all"]["prefix_hit_rate"] = round(sum(self.prefix_hits.values()) / q, 4) if q else 0.0
        regions: dict[str, Any] = {}
        for r, i in self._index.items():
            g = self._group(origin == i, duration_s)
            qr = self.prefix_queries[r]
            g["prefix_hit_rate"] = round(self.prefix_hits[r] / qr, 4) if qr else 0.0
            regions[r] = g
        out["regions"] = regions
        out["flows"] = {
            f"{a}->{b}": {"requests": v[0], "bytes": v[1]}
            for (a, b), v in sorted(self.flows.items())
        }
        out["cross_region_bytes"] = sum(v[1] for v in self.flows.values())
        out["invariants"] = {
            "residency_violations": self.residency_violations,
            "ended_twice": self.ended_twice,
            "overflow_cap_violations": self.overflow_cap_violations,
            "max_overflow_cap_ratio": round(self.max_overflow_cap_ratio, 4),
        }
        out["utilisation"] = _utilisation(self.samples, self.regions)
        return out

    def _group(self, mask: np.ndarray[Any, Any], duration_s: float) -> dict[str, Any]:
        status = np.frombuffer(self.status, dtype=np.int8)[mask]
        flags = np.frombuffer(self.flags, dtype=np.int8)[mask]
        met = np.frombuffer(self.met, dtype=np.int8)[mask]
        served = np.frombuffer(self.served, dtype=np.int8)[mask]
        origin = np.frombuffer(self.origin, dtype=np.int8)[mask]
        ttft = np.frombuffer(self.ttft, dtype=np.float32)[mask]
        e2e = np.frombuffer(self.e2e, dtype=np.float32)[mask]
        n = int(mask.sum())
        ok = status == 0

        def pct(a: np.ndarray[Any, Any]) -> dict[str, float]:
            a = a[ok]
            if not len(a):
                return {"p50": math.nan, "p90": math.nan, "p99": math.nan}
            p = np.percentile(a, [50, 90, 99])
            return {
                "p50": round(float(p[0]), 1),
                "p90": round(float(p[1]), 1),
                "p99": round(float(p[2]), 1),
            }

        overflowed = int(((served != origin) & ok).sum())
        return {
            "requests": n,
            "sla_attainment": round(float(met.sum()) / n, 4) if n else math.nan,
            "goodput_rps": round(float(met.sum()) / duration_s, 1),
            "served": int(ok.sum()),
            "shed": int((status == 1).sum()),
            "errors": int((status == 2).sum()),
            "unfinished": int((status == 3).sum()),
            "queued": int(((flags & QUEUED) != 0).sum()),
            "degraded": int(((flags & DEGRADED) != 0).sum()),
            "overflow_share": round(overflowed / n, 4) if n else 0.0,
            "ttft_ms": pct(ttft),
            "e2e_ms": pct(e2e),
        }


def _utilisation(samples: list[dict[str, Any]], regions: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in regions:
        util = [s["util"][r] for s in samples]
        load = [s["load"][r] for s in samples]
        inbound = [s["inbound"][r] for s in samples]
        under = [ld for ld, n in zip(load, inbound, strict=True) if n > 0]
        out[r] = {
            "gpu_util_mean": round(sum(util) / len(util), 4) if util else 0.0,
            "gpu_util_peak": round(max(util), 4) if util else 0.0,
            "load_peak": round(max(load), 4) if load else 0.0,
            # The cascade check: the region's peak load ((running + waiting) / slots) in the
            # sample windows where it received overflow; >= 1.0 = pushed into queueing.
            "load_peak_while_receiving_overflow": round(max(under), 4) if under else 0.0,
        }
    return out
