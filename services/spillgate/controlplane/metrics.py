"""The control plane's HTTP port: Prometheus `/metrics` and a JSON `/status` per node.

GET /metrics  spillgate_xds_acks_total, spillgate_xds_nacks_total (a NACK is Envoy rejecting
              a pushed config; the node keeps serving its last good one),
              spillgate_xds_streams (open ADS streams) and spillgate_xds_serving_last_good
              (1 while the node's latest snapshot is one it rejected), labelled by node.
GET /status   per node: streams, acks, nacks, the last NACK (type, version, Envoy's message),
              the snapshot version set and the one the node last accepted.

Read from the SnapshotCache on the event loop that owns it (the server runs there too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spillgate.controlplane.cache import SnapshotCache
from spillgate.minihttp import MiniHTTP


class XdsCollector(Collector):
    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    def collect(self) -> Iterable[Metric]:
        acks = CounterMetricFamily(
            "spillgate_xds_acks", "xDS responses the node accepted", labels=["node"]
        )
        nacks = CounterMetricFamily(
            "spillgate_xds_nacks",
            "xDS responses the node rejected (it keeps its last good config)",
            labels=["node"],
        )
        streams = GaugeMetricFamily("spillgate_xds_streams", "open ADS streams", labels=["node"])
        last_good = GaugeMetricFamily(
            "spillgate_xds_serving_last_good",
            "1 while the node rejected its latest snapshot and is served its last good one",
            labels=["node"],
        )
        for node in self._cache.known_nodes():
            status = self._cache.status(node)
            acks.add_metric([node], status.acks)
            nacks.add_metric([node], status.nacks)
            streams.add_metric([node], status.streams)
            latest = self._cache.get(node)
            rejected = latest is not None and latest.version in status.rejected
            last_good.add_metric([node], 1.0 if rejected else 0.0)
        return [acks, nacks, streams, last_good]


def status_json(cache: SnapshotCache) -> dict[str, object]:
    out: dict[str, object] = {}
    for node in cache.known_nodes():
        status = cache.status(node)
        latest = cache.get(node)
        nack = status.last_nack
        out[node] = {
            "streams": status.streams,
            "acks": status.acks,
            "nacks": status.nacks,
            "last_nack": None
            if nack is None
            else {"type_url": nack.type_url, "version": nack.version, "message": nack.message},
            "latest_version": latest.version if latest is not None else None,
            "accepted_version": status.good_version or None,
        }
    return out


class ControlPlaneHTTP(MiniHTTP):
    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(XdsCollector(cache))

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path not in ("/metrics", "/status"):
            return 404, "text/plain", b"not found: try /metrics or /status\n"
        if method != "GET":
            return 405, "text/plain", b"use GET\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", generate_latest(self._registry)
        return 200, "application/json", json.dumps(status_json(self._cache), indent=1).encode()
