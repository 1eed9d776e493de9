"""A thin ADS server (state of the world) serving SnapshotCache snapshots to Envoy.

Protocol, per stream and resource type (envoy/service/discovery/v3/discovery.proto):
- Each response carries the type's content-hash version and a fresh nonce.
- A request whose `response_nonce` is not the last nonce sent for its type is stale and
  ignored (Envoy sends one for every response it has seen).
- A request answering the last nonce with `error_detail` is a NACK: it is counted and
  logged, and the rejected snapshot is never pushed to that node again (Envoy keeps its
  last good config; the server falls back to the node's last accepted snapshot). Without
  `error_detail` it is an ACK of `version_info`.
- The first request of each type on a stream is always answered (a restarted control
  plane builds the same versions, so a version match proves nothing); later ones only
  when the requested names change.
- A new snapshot is pushed in TYPE_ORDER (clusters, endpoints, listeners, routes), and
  every cluster push is followed by an endpoint push, every listener push by a route push,
  even when those did not change: Envoy keeps re-created clusters (listeners) warming until
  it sees their endpoints (routes) again.

Streams wait for a snapshot of their node: nodes are known by id, `on_node` lets the
application learn a node (its metadata) from the stream's first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from spillgate.controlplane.cache import Nack, SnapshotCache
from spillgate.controlplane.resources import pack
from spillgate.controlplane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER, Snapshot

log = logging.getLogger(__name__)

# Pushing these types forces a push of the second (see module docstring).
_FOLLOWERS = {CLUSTER: ENDPOINT, LISTENER: ROUTE}
_WILDCARD_TYPES = {CLUSTER, LISTENER}

_CHANGED = object()
_ENDED = object()

NodeHook = Callable[[base_pb2.Node], None]


@dataclass
class _TypeState:
    subscribed: bool = False
    names: frozenset[str] = frozenset()  # requested resource names; empty = all
    nonce: str = ""  # last nonce sent
    sent_version: str | None = None  # type version last sent
    sent_snapshot: str = ""  # snapshot version the last response came from
    pending: bool = False  # send at the next flush


@dataclass
class _Stream:
    node_id: str = ""
    types: dict[str, _TypeState] = field(
        default_factory=lambda: {t: _TypeState() for t in TYPE_ORDER}
    )


class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """envoy.service.discovery.v3.AggregatedDiscoveryService over a SnapshotCache."""

    def __init__(self, cache: SnapshotCache, on_node: NodeHook | None = None) -> None:
        self._cache = cache
        self._on_node = on_node
        self._nonces = itertools.count(1)

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        # Requests, `_CHANGED` (the node's snapshot changed) and `_ENDED` (Envoy hung up).
        events: asyncio.Queue[object] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    events.put_nowait(request)
            finally:
                events.put_nowait(_ENDED)

        reader = asyncio.create_task(read(), name="ads-read")
        stream = _Stream()
        unwatch: Callable[[], None] | None = None
        try:
            while True:
                event = await events.get()
                if event is _ENDED:
                    return
                if event is _CHANGED:
                    self._on_change(stream)
                elif isinstance(event, discovery_pb2.DiscoveryRequest):
                    if not stream.node_id:
                        stream.node_id = event.node.id
                        if not stream.node_id:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.id missing")
                        if self._on_node is not None:
                            self._on_node(event.node)
                        self._cache.stream_opened(stream.node_id)
                        unwatch = self._cache.watch(
                            stream.node_id, lambda: events.put_nowait(_CHANGED)
                        )
                        log.info("node %s connected", stream.node_id)
                    self._on_request(stream, event)
                for response in self._flush(stream):
                    yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if unwatch is not None:
                unwatch()
                self._cache.stream_closed(stream.node_id)
                log.info("node %s disconnected", stream.node_id)

    # -- protocol -------------------------------------------------------------------------

    def _on_request(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> None:
        ts = stream.types.get(request.type_url)
        if ts is None:
            log.warning("node %s asks for unsupported type %s", stream.node_id, request.type_url)
            return
        if request.response_nonce and request.response_nonce != ts.nonce:
            return  # stale: answers a response that a later one replaced
        names = frozenset(request.resource_names)
        if request.response_nonce:
            if request.HasField("error_detail"):
                self._cache.nacked(
                    stream.node_id,
                    ts.sent_snapshot,
                    Nack(request.type_url, ts.sent_version or "", request.error_detail.message),
                )
            else:
                self._cache.acked(stream.node_id, request.type_url, request.version_info)
                self._maybe_accepted(stream)
        if not ts.subscribed or names != ts.names:
            ts.pending = True
        ts.subscribed = True
        ts.names = names
        # After a NACK the node falls back to its last good snapshot (maybe a new push).
        self._on_change(stream)

    def _maybe_accepted(self, stream: _Stream) -> None:
        snapshot = self._cache.serving(stream.node_id)
        if snapshot is None:
            return
        status = self._cache.status(stream.node_id)
        subscribed = [t for t, ts in stream.types.items() if ts.subscribed]
        if subscribed and all(
            stream.types[t].sent_snapshot == snapshot.version
            and status.acked.get(t) == snapshot.versions[t]
            for t in subscribed
        ):
            self._cache.accepted(stream.node_id, snapshot)

    def _on_change(self, stream: _Stream) -> None:
        snapshot = self._cache.serving(stream.node_id)
        if snapshot is None:
            return
        for type_url, ts in stream.types.items():
            if ts.subscribed and ts.sent_version != snapshot.versions[type_url]:
                ts.pending = True

    def _flush(self, stream: _Stream) -> list[discovery_pb2.DiscoveryResponse]:
        snapshot = self._cache.serving(stream.node_id)
        if snapshot is None:
            return []  # wait for the node's first snapshot
        out = []
        for type_url in TYPE_ORDER:
            ts = stream.types[type_url]
            if not (ts.subscribed and ts.pending):
                continue
            out.append(self._response(snapshot, type_url, ts))
            follower = _FOLLOWERS.get(type_url)
            if follower is not None and stream.types[follower].subscribed:
                stream.types[follower].pending = True
        return out

    def _response(
        self, snapshot: Snapshot, type_url: str, ts: _TypeState
    ) -> discovery_pb2.DiscoveryResponse:
        resources = snapshot.get(type_url)
        if ts.names and type_url not in _WILDCARD_TYPES:
            chosen = [resources[n] for n in sorted(ts.names) if n in resources]
        else:
            chosen = list(resources.values())
        ts.nonce = str(next(self._nonces))
        ts.sent_version = snapshot.versions[type_url]
        ts.sent_snapshot = snapshot.version
        ts.pending = False
        return discovery_pb2.DiscoveryResponse(
            version_info=ts.sent_version,
            type_url=type_url,
            nonce=ts.nonce,
            resources=[pack(r) for r in chosen],
        )


async def start_server(
    cache: SnapshotCache, host: str = "127.0.0.1", port: int = 0, on_node: NodeHook | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start an ADS gRPC server on `host:port` (0 = free port); returns it and the port.

    The server also answers grpc.health.v1 (SERVING) for process supervisors.
    """
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        AggregatedDiscoveryService(cache, on_node), server
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    return server, bound
