"""`spillgate admission serve`: one region's admission service, wired to its inputs.

Registry (RegistryClient: fleet view, scrape/health/peer targets) -> Policy; replica
metrics (Scraper) -> load signals; health checks (ServerLive/ModelReady/canary) -> replica
breakers; neighbour admissions (WatchRegion) -> overflow headroom. The gRPC server reports
NOT_SERVING on grpc.health.v1 until the first registry snapshot has arrived (Admit answers
UNAVAILABLE until then) and keeps deciding on the last snapshot if the registry goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spillgate._proto import admission_pb2, admission_pb2_grpc, common_pb2
from spillgate.admission.convert import fleet_from_state, summary_from_proto
from spillgate.admission.health import CheckKind, HealthChecker, HealthEvent, HealthTarget
from spillgate.admission.peers import Peers
from spillgate.admission.service import AdmissionServicer
from spillgate.admission.signals import Scraper, ScrapeTarget, backend_kind
from spillgate.core.policy import Policy
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.signals import ModelLoad, Signals
from spillgate.registry.client import RegistryClient
from spillgate.registry.store import MODEL, REGION, REPLICA
from spillgate.registry.validate import admission_endpoints

log = logging.getLogger(__name__)
SERVICE_NAME = admission_pb2.DESCRIPTOR.services_by_name["AdmissionService"].full_name


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 0


class Admission:
    """The running admission of one region: policy, servicer and its input feeds.

    ``static_signals`` (benchmarks and tests only) replaces scraping and health checks: every
    replica of the region reads idle (no running or waiting requests) with fresh signals, and
    no breaker ever sees a probe failure, so the registered replicas need not exist. Load then
    comes from this admission's own ticket accounting alone.
    """

    def __init__(
        self,
        region: str,
        registry: str,
        config: PolicyConfig | None = None,
        seed: int = 0,
        static_signals: bool = False,
    ) -> None:
        self.region = region
        self.config = config or PolicyConfig()
        self.static_signals = static_signals
        self._static: dict[str, tuple[str, ...]] = {}  # replica -> Triton model names
        instance = uuid.uuid4().hex[:6]
        self.policy = Policy(self.config, region, random.Random(seed), instance=instance)
        self.servicer = AdmissionServicer(self.policy, region, self.config)
        self.registry = RegistryClient(registry)
        self.scraper = Scraper(on_signals=self._on_signals)
        self.health = HealthChecker(on_event=self._on_health)
        self.peers = Peers(region, self._on_summary, on_failure=self._on_peer_failure)
        self.health_servicer = health.aio.HealthServicer()
        self._serving_task: asyncio.Task[None] | None = None

    # -- feeds ------------------------------------------------------------------------------

    def _on_signals(self, replica: str, signals: Signals) -> None:
        self.policy.observe_signals(replica, signals, time.monotonic())
        self.servicer.kick()

    def _on_health(self, event: HealthEvent) -> None:
        if event.kind in (CheckKind.LIVE, CheckKind.CANARY) or not event.ok:
            self.policy.record_result(event.replica_id, event.ok, time.monotonic())

    def _on_summary(self, summary: common_pb2.RegionSummary) -> None:
        clocks = self.servicer.clocks()
        self.policy.observe_neighbour(summary_from_proto(summary, clocks), clocks.mono)
        self.policy.record_neighbour_result(summary.region, True, clocks.mono)

    def _on_peer_failure(self, region: str) -> None:
        self.policy.record_neighbour_result(region, False, time.monotonic())

    def _on_registry(self, revision: int) -> None:
        state = self.registry.state
        try:
            fleet = fleet_from_state(state, revision)
        except ValueError:
            log.exception("registry revision %d is inconsistent; keeping the last one", revision)
            return
        first = self.policy.fleet is None
        self.policy.set_fleet(fleet)
        kinds = {}
        for (kind, key), entity in state.items():
            if kind == MODEL:
                kinds[key] = entity.model.kind
        scrape, checks = {}, {}
        self._static = {}
        for (kind, _), entity in state.items():
            if kind != REPLICA or entity.replica.region != self.region:
                continue
            r = entity.replica
            served = [
                (v.model, fleet.versions[(v.model, v.version)].triton_model_name)
                for v in r.loaded
                if (v.model, v.version) in fleet.versions
            ]
            names = tuple(name for _, name in served)
            llm = [name for model, name in served if kinds.get(model) == common_pb2.MODEL_KIND_LLM]
            if self.static_signals:
                self._static[r.id] = names
                continue
            if r.metrics_endpoint:
                backend = common_pb2.BackendKind.Name(r.backend).removeprefix("BACKEND_KIND_")
                scrape[r.id] = ScrapeTarget(r.metrics_endpoint, backend_kind(backend))
            checks[r.id] = HealthTarget(r.endpoint, names, llm[0] if llm else None)
        self.scraper.set_targets(scrape)
        self.health.set_targets(checks)
        self.peers.set_targets(
            {
                e.region.id: admission_endpoints(e.region)
                for (kind, _), e in state.items()
                if kind == REGION and e.region.id != self.region
            }
        )
        self.servicer.kick()
        if first:
            log.info("first registry snapshot: revision %d", revision)
            # Kept: a task with no reference may be garbage-collected before it runs.
            self._serving_task = asyncio.get_running_loop().create_task(self._serving())

    async def _static_feed(self) -> None:
        """``static_signals``: report every local replica idle and fresh, each scrape period."""
        while True:
            now = time.monotonic()
            for replica, names in self._static.items():
                idle = ModelLoad(running=0, waiting=0, kv_usage=0.0, pending=0)
                self.policy.observe_signals(replica, Signals(now, dict.fromkeys(names, idle)), now)
            self.servicer.kick()
            await asyncio.sleep(self.config.scrape_interval_s)

    async def _serving(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, listen: Listen, stop: asyncio.Event) -> None:
        # Peers ping their WatchRegion streams every 2 s (peers.py): allow it.
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ]
        )
        admission_pb2_grpc.add_AdmissionServiceServicer_to_server(self.servicer, server)
        for name in ("", SERVICE_NAME):
            await self.health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server
        )
        bound = server.add_insecure_port(f"{listen.host}:{listen.port}")
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {listen.host}:{listen.port}")
        await server.start()
        await self.servicer.start()
        self.registry.add_listener(self._on_registry)
        await self.registry.start()
        self.scraper.start()
        self.health.start()
        static = asyncio.create_task(self._static_feed()) if self.static_signals else None
        print(
            f"spillgate admission ready grpc={listen.host}:{bound} region={self.region}",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            if static is not None:
                static.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await static
            await server.stop(grace=1.0)
            await self.peers.close()
            await self.health.close()
            await self.scraper.close()
            await self.registry.close()
            await self.servicer.close()


async def serve(
    region: str,
    registry: str,
    listen: Listen,
    static_signals: bool = False,
    config: PolicyConfig | None = None,
) -> None:
    """Run until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Admission(region, registry, config, static_signals=static_signals).run(listen, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m spillgate.admission.app --region us --registry HOST:PORT [--port N]`."""
    parser = argparse.ArgumentParser(prog="spillgate admission serve")
    parser.add_argument("--region", required=True, help="region id (as in the registry)")
    parser.add_argument(
        "--registry",
        default=os.environ.get("SPILLGATE_REGISTRY", "127.0.0.1:7070"),
        help="registry gRPC address (default: $SPILLGATE_REGISTRY or %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7080, help="gRPC port; 0 = any free port")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--static-signals",
        action="store_true",
        help="benchmarks/tests only: no scraping or health checks; every replica of the "
        "region counts as idle with fresh signals (replicas need not exist)",
    )
    parser.add_argument(
        "--ticket-lease-s",
        type=float,
        default=PolicyConfig.ticket_lease_s,
        help="lease of an admitted slot; holders renew it (default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        config = PolicyConfig(ticket_lease_s=args.ticket_lease_s)
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        try:
            listen = Listen(args.host, args.port)
            asyncio.run(serve(args.region, args.registry, listen, args.static_signals, config))
        except OSError as exc:
            print(f"spillgate admission: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
