"""`spillgate registry serve`: run the registry gRPC service on a store until signalled.

The store is a SQLite file (`--db`, the default) or Consul's KV (`--store consul`). With
the Consul store, leased replicas are also mirrored into Consul's catalog as services with a
TTL check (`consul_catalog.ConsulCatalog`; `--no-consul-catalog` turns that off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spillgate._proto import registry_pb2, registry_pb2_grpc
from spillgate.registry.client import CHANNEL_OPTIONS
from spillgate.registry.consul_catalog import (
    DEFAULT_DEREGISTER_AFTER,
    DEFAULT_SERVICE,
    ConsulCatalog,
)
from spillgate.registry.consul_store import DEFAULT_PREFIX, ConsulStore
from spillgate.registry.directory import ReplicaDirectory
from spillgate.registry.service import RegistryServicer, ServiceConfig
from spillgate.registry.sqlite_store import SQLiteStore
from spillgate.registry.store import Store, StoreError

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
# Large fleets need more than gRPC's 4 MiB default (see client.MAX_MESSAGE_BYTES).
SERVER_OPTIONS = CHANNEL_OPTIONS


async def run(
    db_path: str | Path | Store,
    host: str = "127.0.0.1",
    port: int = 0,
    stop_event: asyncio.Event | None = None,
    config: ServiceConfig | None = None,
    directory: ReplicaDirectory | None = None,
) -> None:
    """Serve the registry until `stop_event` is set or SIGINT/SIGTERM arrives.

    `db_path` is a SQLite file or an opened Store (which `run` closes at the end), and
    `directory` where leased replicas are announced too (also closed at the end).
    Prints one ready line, `spillgate registry ready grpc=HOST:PORT revision=N`, once the
    port is bound (port 0 picks a free one).
    """
    stop = stop_event or asyncio.Event()
    store = db_path if isinstance(db_path, Store) else SQLiteStore(db_path)
    servicer = RegistryServicer(store, config, directory=directory)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {host}:{port}")
        await servicer.start()
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        print(
            f"spillgate registry ready grpc={host}:{bound} revision={store.revision()}",
            flush=True,
        )
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=1.0)
        await servicer.close()
        if directory is not None:
            directory.close()
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options (`--help`) and serve; returns 0.

    `--db PATH` (store sqlite, the default) or `--store consul [--consul-addr HOST:PORT]
    [--consul-prefix P] [--no-consul-catalog | --consul-catalog-addr HOST:PORT
    --consul-service NAME --consul-deregister-after-ms N]`, then `[--host H] [--port N]
    [--lease-check-ms N]`.
    """
    parser = argparse.ArgumentParser(prog="spillgate registry serve")
    parser.add_argument("--store", choices=("sqlite", "consul"), default="sqlite")
    parser.add_argument("--db", help="SQLite file (created if missing); needed for sqlite")
    parser.add_argument(
        "--consul-addr",
        help="Consul agent HOST:PORT or URL (default: $CONSUL_HTTP_ADDR, else 127.0.0.1:8500)",
    )
    parser.add_argument("--consul-prefix", default=DEFAULT_PREFIX, help="KV prefix of the registry")
    parser.add_argument(
        "--consul-catalog",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --store consul, register leased replicas as Consul services (TTL checks)",
    )
    parser.add_argument(
        "--consul-catalog-addr",
        help="agent that replicas are registered with (default: the --consul-addr agent)",
    )
    parser.add_argument(
        "--consul-service", default=DEFAULT_SERVICE, help="Consul service name of replicas"
    )
    parser.add_argument(
        "--consul-deregister-after-ms",
        type=int,
        default=int(DEFAULT_DEREGISTER_AFTER / timedelta(milliseconds=1)),
        help="DeregisterCriticalServiceAfter of replica checks (Consul enforces >= 1 minute)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7070, help="gRPC port; 0 = any free port")
    parser.add_argument(
        "--lease-check-ms",
        type=int,
        default=ServiceConfig.lease_check_ms,
        help="how often replica leases are checked",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.store == "sqlite" and not args.db:
        parser.error("--db is required with --store sqlite")
    config = ServiceConfig(lease_check_ms=args.lease_check_ms)
    store: str | Store = args.db
    directory: ReplicaDirectory | None = None
    if args.store == "consul":
        try:
            store = ConsulStore(args.consul_addr, prefix=args.consul_prefix)
        except StoreError as exc:
            parser.exit(1, f"spillgate registry: {exc}\n")
        if args.consul_catalog:
            directory = ConsulCatalog(
                args.consul_catalog_addr or args.consul_addr,
                service=args.consul_service,
                deregister_after=timedelta(milliseconds=args.consul_deregister_after_ms),
            )
    asyncio.run(run(store, args.host, args.port, config=config, directory=directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
