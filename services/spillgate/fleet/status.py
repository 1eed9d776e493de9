"""`spillgate status`: one look at a running fleet (admission summaries + replica metrics).

Per region, from the admission's WatchRegion stream (its first summary; counters summed
over the instances when a region runs several): healthy replicas, queue depth, overflow
in/out and shed counters, headroom per model version. Per replica, from its
Prometheus endpoint (admission.signals.parse_metrics, simulator mapping): running and
waiting sequences and KV-cache use. A source that does not answer shows as `-` (never 0).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from spillgate._proto import admission_pb2, admission_pb2_grpc, common_pb2
from spillgate.admission.signals import MetricsParseError, parse_metrics
from spillgate.registry.cli import render_table

TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ReplicaLoad:
    running: int | None
    waiting: int | None
    kv_usage: float | None


def region_summary(address: str, timeout: float = TIMEOUT_S) -> common_pb2.RegionSummary | None:
    """The admission's current RegionSummary, or None when it does not answer in time."""
    with grpc.insecure_channel(address) as channel:
        stub = admission_pb2_grpc.AdmissionServiceStub(channel)
        stream = stub.WatchRegion(admission_pb2.WatchRegionRequest(), timeout=timeout)
        try:
            for response in stream:
                summary: common_pb2.RegionSummary = response.summary
                return summary
        except grpc.RpcError:
            return None
        finally:
            stream.cancel()
    return None


def replica_load(metrics_url: str, timeout: float = TIMEOUT_S) -> ReplicaLoad | None:
    """Running/waiting sequences (summed over models) and KV use (highest model)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as resp:
            text = resp.read().decode()
        signals = parse_metrics(text, "simulator", time.monotonic())
    except (OSError, MetricsParseError, ValueError):
        return None
    loads = list(signals.models.values())

    def total(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    kv = [m.kv_usage for m in loads if m.kv_usage is not None]
    return ReplicaLoad(
        total([m.running for m in loads]), total([m.waiting for m in loads]), max(kv, default=None)
    )


def merge_summaries(
    summaries: list[common_pb2.RegionSummary | None],
) -> common_pb2.RegionSummary | None:
    """One region's summary from its admission instances' (None: none answered).

    Each instance counts what it decided (queue, overflow, shed): those add up. Replicas
    and headroom come from the same scrapes on every instance: the first answer's stand.
    """
    answered = [s for s in summaries if s is not None]
    if not answered:
        return None
    merged = common_pb2.RegionSummary()
    merged.CopyFrom(answered[0])
    for other in answered[1:]:
        merged.queue_depth += other.queue_depth
        merged.overflow_in_total += other.overflow_in_total
        merged.overflow_out_total += other.overflow_out_total
        merged.shed_total += other.shed_total
    return merged


def collect(endpoints: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(region -> summary or None, replica id -> ReplicaLoad or None), fetched in parallel."""
    regions: dict[str, Any] = endpoints.get("regions", {})
    admissions = {
        rid: [a["grpc"] for a in e.get("admissions") or [e.get("admission") or {}] if a.get("grpc")]
        for rid, e in regions.items()
    }
    replicas = {r["id"]: r["metrics"] for e in regions.values() for r in e.get("replicas", [])}
    with ThreadPoolExecutor(max_workers=8) as pool:
        summaries = {
            rid: [pool.submit(region_summary, addr) for addr in addrs]
            for rid, addrs in admissions.items()
        }
        loads = {rid: pool.submit(replica_load, url) for rid, url in replicas.items()}
        return (
            {rid: merge_summaries([f.result() for f in fs]) for rid, fs in summaries.items()},
            {rid: f.result() for rid, f in loads.items()},
        )


def _n(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(endpoints: Mapping[str, Any]) -> str:
    """The two status tables: regions, then replicas."""
    summaries, loads = collect(endpoints)
    regions: dict[str, Any] = endpoints.get("regions", {})
    region_rows = []
    for rid, entry in regions.items():
        s = summaries.get(rid)
        total = len(entry.get("replicas", []))
        if s is None:
            region_rows.append([rid, f"?/{total}", "-", "-", "-", "-", "admission not answering"])
            continue
        headroom = " ".join(
            f"{m.model}@{m.version}:{m.headroom_ratio:.0%}/{m.predicted_queue_ms:.0f}ms"
            for m in s.models
        )
        region_rows.append(
            [
                rid,
                f"{s.healthy_replicas}/{total}",
                str(s.queue_depth),
                str(s.overflow_in_total),
                str(s.overflow_out_total),
                str(s.shed_total),
                headroom or "-",
            ]
        )
    replica_rows = []
    for rid, entry in regions.items():
        for r in entry.get("replicas", []):
            load = loads.get(r["id"])
            state = "up" if load is not None else ("exited" if not r.get("alive", True) else "?")
            replica_rows.append(
                [
                    r["id"],
                    rid,
                    state,
                    _n(load.running if load else None),
                    _n(load.waiting if load else None),
                    _n(load.kv_usage if load else None, "{:.1%}"),
                ]
            )
    return "\n".join(
        [
            render_table(
                (
                    "REGION",
                    "HEALTHY",
                    "QUEUE",
                    "OVERFLOW_IN",
                    "OVERFLOW_OUT",
                    "SHED",
                    "HEADROOM (version:free/predicted wait)",
                ),
                region_rows,
            ),
            "",
            render_table(("REPLICA", "REGION", "STATE", "RUNNING", "WAITING", "KV"), replica_rows),
        ]
    )
