"""`spillgate controlplane serve|dump`: the xDS control plane as a process.

serve: follows the registry (RegistryClient) and every region's admission (WatchRegion, for
headroom -> locality weights), rebuilds the snapshot of every known node after a change
(debounced) and serves them over ADS. Nodes become known when their Envoy connects: the
node id says role and region, the node metadata the listener ports (envoy/bootstrap.yaml).
Registry or admissions going away only freezes the inputs: nodes keep their snapshots,
and a summary older than `summary_stale_s` counts as no headroom (DESIGN.md principle 6).

dump: prints, as YAML, the snapshot a node would receive now.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import yaml
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from spillgate._proto import common_pb2
from spillgate.admission.peers import Peers, PeersConfig
from spillgate.controlplane.ads import start_server
from spillgate.controlplane.cache import SnapshotCache
from spillgate.controlplane.metrics import ControlPlaneHTTP
from spillgate.controlplane.snapshot import (
    TYPE_ORDER,
    BuildConfig,
    InconsistentSnapshot,
    Snapshot,
    build_snapshot,
)
from spillgate.controlplane.view import Mode, NodeIdError, NodeInfo, Role
from spillgate.registry.client import RegistryClient
from spillgate.registry.store import REGION, REPLICA
from spillgate.registry.validate import admission_endpoints

log = logging.getLogger(__name__)


def node_info(node: base_pb2.Node) -> NodeInfo:
    """NodeInfo from an Envoy node (id `<role>-<region>`, metadata ports); NodeIdError."""
    role, region = NodeInfo.parse_id(node.id)
    fields = node.metadata.fields
    grpc_port = int(fields["grpc_port"].number_value) if "grpc_port" in fields else 0
    http_port = int(fields["http_port"].number_value) if "http_port" in fields else 0
    if not 0 < grpc_port < 65536:
        raise NodeIdError(f"node {node.id!r} has no grpc_port in its metadata")
    return NodeInfo(region, role, grpc_port, http_port if role is Role.INGRESS else 0)


@dataclass(frozen=True)
class ControlPlaneConfig:
    mode: Mode = Mode.PROD
    build: BuildConfig = field(default_factory=BuildConfig)
    # Wait this long after a change before rebuilding (coalesces bursts of changes).
    debounce_s: float = 0.02
    # Summaries older than this count as no headroom.
    summary_stale_s: float = 2.0
    # Asked of each admission's WatchRegion.
    summary_interval_ms: int = 500
    # Region id -> gateway OpenAI HTTP address; overrides Region.gateway_http_endpoint.
    gateways_http: Mapping[str, str] = field(default_factory=dict)


class ControlPlane:
    """Registry + admissions in, per-node snapshots into a SnapshotCache out."""

    def __init__(
        self,
        registry: str,
        cache: SnapshotCache,
        config: ControlPlaneConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.config = config or ControlPlaneConfig()
        self.registry = RegistryClient(registry, kinds=(REGION, REPLICA))
        self._clock = clock
        self._nodes: dict[str, NodeInfo] = {}
        self._summaries: dict[str, tuple[common_pb2.RegionSummary, float]] = {}
        self._peers = Peers(
            "",
            self._on_summary,
            PeersConfig(interval_ms=self.config.summary_interval_ms),
        )
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rebuilds = 0

    async def start(self) -> None:
        self.registry.add_listener(lambda _: self._dirty.set())
        await self.registry.start()
        self._task = asyncio.create_task(self._rebuild_forever(), name="controlplane-rebuild")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._peers.close()
        await self.registry.close()

    def on_node(self, node: base_pb2.Node) -> None:
        """ADS hook: learn a node from its first request and build its snapshot now."""
        try:
            info = node_info(node)
        except NodeIdError as exc:
            log.warning("ignoring node: %s", exc)
            return
        if self._nodes.get(info.id) != info:
            log.info("node %s: %s", info.id, info)
            self._nodes[info.id] = info
            self.cache.clear(info.id)
        if self.registry.ready:
            self._build(info)

    def _on_summary(self, summary: common_pb2.RegionSummary) -> None:
        self._summaries[summary.region] = (summary, self._clock())
        self._dirty.set()

    def fresh_summaries(self) -> dict[str, common_pb2.RegionSummary]:
        now = self._clock()
        return {
            region: summary
            for region, (summary, at) in self._summaries.items()
            if now - at <= self.config.summary_stale_s
        }

    async def _rebuild_forever(self) -> None:
        while True:
            # Summaries age out without an event: rebuild at least every stale period.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.summary_stale_s):
                    await self._dirty.wait()
            await asyncio.sleep(self.config.debounce_s)
            self._dirty.clear()
            self.rebuild()

    def rebuild(self) -> None:
        """Rebuild every known node's snapshot from the current inputs."""
        if not self.registry.ready:
            return
        self.rebuilds += 1
        admissions = {
            e.region.id: admission_endpoints(e.region) for e in self.registry.entities(REGION)
        }
        self._peers.set_targets(admissions)
        for info in list(self._nodes.values()):
            self._build(info)

    def _build(self, info: NodeInfo) -> None:
        c = self.config
        snapshot = build_snapshot(
            self.registry.state,
            self.fresh_summaries(),
            c.mode,
            info,
            c.build,
            c.gateways_http,
        )
        try:
            if self.cache.set(info.id, snapshot):
                log.info("node %s: snapshot %s", info.id, snapshot.version)
                for warning in snapshot.warnings:
                    log.warning("node %s: %s", info.id, warning)
        except InconsistentSnapshot as exc:
            # A builder bug, not bad input: keep serving the previous snapshot.
            log.error("node %s: not serving snapshot %s: %s", info.id, snapshot.version, exc)


async def serve(
    registry: str,
    host: str,
    port: int,
    config: ControlPlaneConfig,
    stop: asyncio.Event | None = None,
    metrics_port: int = -1,
) -> None:
    """Serve ADS (and /metrics + /status on `metrics_port` unless it is -1) until `stop` is
    set or SIGINT/SIGTERM; prints the ready line."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    cache = SnapshotCache()
    plane = ControlPlane(registry, cache, config)
    server, bound = await start_server(cache, host, port, on_node=plane.on_node)
    http = ControlPlaneHTTP(cache)
    try:
        await plane.start()
        metrics = ""
        if metrics_port >= 0:
            metrics = f" metrics={host}:{await http.start(host, metrics_port)}"
        print(f"spillgate controlplane ready grpc={host}:{bound}{metrics}", flush=True)
        await stop.wait()
    finally:
        await http.stop()
        await server.stop(grace=1.0)
        await plane.close()


def snapshot_yaml(snapshot: Snapshot) -> str:
    """A snapshot as YAML: version, per-type versions, then the resources by type."""
    out: dict[str, object] = {
        "node": snapshot.node.id,
        "version": snapshot.version,
        "versions": {t.rsplit(".", 1)[-1]: snapshot.versions[t] for t in TYPE_ORDER},
        "warnings": list(snapshot.warnings),
    }
    for type_url in TYPE_ORDER:
        out[type_url.rsplit(".", 1)[-1]] = [
            # Via JSON: MessageToDict leaves OrderedDicts (for Any) that safe_dump refuses.
            json.loads(json_format.MessageToJson(m, preserving_proto_field_name=True))
            for m in snapshot.get(type_url).values()
        ]
    return yaml.safe_dump(out, sort_keys=False)


async def dump(
    registry: str, node: NodeInfo, config: ControlPlaneConfig, timeout: float = 10.0
) -> Snapshot:
    """The snapshot `node` would get now (registry state only: no summaries, weight 1)."""
    async with RegistryClient(registry, kinds=(REGION, REPLICA)) as client:
        await client.wait_ready(timeout)
        return build_snapshot(
            client.state, {}, config.mode, node, config.build, config.gateways_http
        )


def _gateways_http(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for value in values:
        region, sep, address = value.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--gateway-http {value!r} is not REGION=HOST:PORT")
        out[region] = address
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`spillgate controlplane serve [...]` or `spillgate controlplane dump --node ID [...]`."""
    parser = argparse.ArgumentParser(prog="spillgate controlplane")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "dump"):
        p = sub.add_parser(name)
        p.add_argument(
            "--registry",
            default=os.environ.get("SPILLGATE_REGISTRY", "127.0.0.1:7070"),
            help="registry gRPC address (default: $SPILLGATE_REGISTRY or %(default)s)",
        )
        p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.PROD.value)
        p.add_argument(
            "--gateway-http",
            action="append",
            default=[],
            metavar="REGION=HOST:PORT",
            help="a region's gateway OpenAI HTTP address (repeatable); overrides the "
            "registry's Region.gateway_http_endpoint",
        )
    serve_p = sub.choices["serve"]
    serve_p.add_argument("--host", default="127.0.0.1")
    serve_p.add_argument("--port", type=int, default=18000, help="ADS gRPC port; 0 = any free")
    serve_p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="HTTP port for /metrics (ACK/NACK counts) and /status; 0 = any free, -1 = none",
    )
    serve_p.add_argument("--log-level", default="INFO")
    dump_p = sub.choices["dump"]
    dump_p.add_argument("--node", required=True, help="node id: ingress-<region> | mesh-<region>")
    dump_p.add_argument("--grpc-port", type=int, default=10000)
    dump_p.add_argument("--http-port", type=int, default=10001)
    args = parser.parse_args(argv)
    try:
        config = ControlPlaneConfig(
            mode=Mode(args.mode), gateways_http=_gateways_http(args.gateway_http)
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.command == "dump":
        try:
            role, region = NodeInfo.parse_id(args.node)
        except NodeIdError as exc:
            parser.error(str(exc))
        http = args.http_port if role is Role.INGRESS else 0
        node = NodeInfo(region, role, args.grpc_port, http)
        try:
            snapshot = asyncio.run(dump(args.registry, node, config))
        except TimeoutError as exc:
            print(f"spillgate controlplane: {exc}", file=sys.stderr)
            return 1
        print(snapshot_yaml(snapshot), end="")
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(
                serve(args.registry, args.host, args.port, config, metrics_port=args.metrics_port)
            )
        except OSError as exc:
            print(f"spillgate controlplane: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
