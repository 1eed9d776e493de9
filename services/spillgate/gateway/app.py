"""`spillgate gateway serve`: one region's public entry point (gRPC + OpenAI-shaped HTTP).

Reads the registry through a cached RegistryClient (models, limits, regions), asks its
region's admission for every request, forwards to Triton replicas or neighbour gateways.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spillgate._proto import admission_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from spillgate.gateway.chat import ChargeTokens, Gateway, no_token_limit
from spillgate.gateway.models import ModelCatalog
from spillgate.gateway.service import Authenticate, GatewayServicer, no_auth
from spillgate.registry.client import RegistryClient

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


@dataclass(frozen=True)
class Options:
    region: str
    registry: str
    admission: str
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int | None = 0  # None: no HTTP API
    keys: Path | None = None  # API key store; None: no authentication (development)
    emulate_rtt: bool = False
    mesh: str = ""  # the region's mesh Envoy "host:port": overflow hops go through it


def _authenticator(keys: Path | None) -> tuple[Authenticate, object | None, ChargeTokens]:
    if keys is None:
        return no_auth, None, no_token_limit
    from spillgate.gateway.keys import key_authenticator

    return key_authenticator(keys)


async def serve(options: Options, stop: asyncio.Event) -> None:
    """Run the gateway until `stop` is set; prints one ready line once both ports listen."""
    registry = RegistryClient(options.registry)
    catalog = ModelCatalog()
    # grpc.health.v1 says NOT_SERVING until the first non-empty registry snapshot (without
    # one every model is unknown), so load balancers and Envoy's health checks wait for it.
    health_servicer = health.aio.HealthServicer()
    serving: list[asyncio.Task[None]] = []

    async def set_serving() -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    def on_registry(revision: int) -> None:
        catalog.state = registry.state
        if revision > 0 and not serving:
            serving.append(asyncio.get_running_loop().create_task(set_serving()))

    registry.add_listener(on_registry)
    admission_channel = grpc.aio.insecure_channel(options.admission)
    gateway = Gateway(
        options.region,
        admission_pb2_grpc.AdmissionServiceStub(admission_channel),
        catalog,
        emulate_rtt=options.emulate_rtt,
        mesh=options.mesh,
    )
    authenticate, auth_resource, charge_tokens = _authenticator(options.keys)
    gateway.charge_tokens = charge_tokens

    def registry_status() -> tuple[bool, int, float]:
        return registry.connected, registry.revision, registry.staleness_s() * 1000

    servicer = GatewayServicer(gateway, authenticate, registry_status)
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    from spillgate.gateway.triton import add_triton_passthrough

    triton_name = add_triton_passthrough(server, gateway, authenticate)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, triton_name, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server
    )
    bound = server.add_insecure_port(f"{options.host}:{options.port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {options.host}:{options.port}")
    await registry.start()
    await server.start()
    http = None
    http_address = "-"
    if options.http_port is not None:
        from spillgate.gateway.http import HttpServer

        http = HttpServer(gateway, authenticate, servicer)
        http_address = await http.start(options.host, options.http_port)
    print(
        f"spillgate gateway ready grpc={options.host}:{bound} http={http_address} "
        f"region={options.region}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        if http is not None:
            await http.stop()
        await server.stop(grace=2.0)
        await gateway.close()
        await admission_channel.close()
        await registry.close()
        close = getattr(auth_resource, "close", None)
        if close is not None:
            close()


def main(argv: Sequence[str] | None = None) -> int:
    """`spillgate gateway serve --region R --registry H:P --admission H:P [...]`."""
    p = argparse.ArgumentParser(prog="spillgate gateway serve")
    p.add_argument("--region", required=True)
    p.add_argument("--registry", default=os.environ.get("SPILLGATE_REGISTRY", "127.0.0.1:7070"))
    p.add_argument("--admission", required=True, help="this region's admission host:port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7090, help="gRPC port; 0 = any free port")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP port; -1 = no HTTP API")
    p.add_argument("--keys", type=Path, help="API key store (spillgate keys); omit = no auth")
    p.add_argument(
        "--emulate-rtt",
        action="store_true",
        help="sleep the modelled inter-region RTT before forwarding an overflow (local fleets; "
        "ignored with --mesh, whose Envoy adds the delay)",
    )
    p.add_argument(
        "--mesh",
        default="",
        metavar="HOST:PORT",
        help="this region's mesh Envoy: overflow hops go through it (header "
        "x-spillgate-destination-region) instead of straight to the neighbour's gateway",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    options = Options(
        region=args.region,
        registry=args.registry,
        admission=args.admission,
        host=args.host,
        port=args.port,
        http_port=None if args.http_port < 0 else args.http_port,
        keys=args.keys,
        emulate_rtt=args.emulate_rtt,
        mesh=args.mesh,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(options, stop)

    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(run())
        except OSError as exc:
            print(f"spillgate gateway: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
