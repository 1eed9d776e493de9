"""`spillgate replica`: run one Triton-protocol replica simulator until signalled."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass

from spillgate.replica.config import ReplicaConfig
from spillgate.replica.faults import Faults
from spillgate.replica.http import AdminHTTP
from spillgate.replica.metrics import make_registry
from spillgate.replica.repository import Repository
from spillgate.replica.server import serve


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    grpc_port: int = 8001  # Triton's defaults; 0 picks a free port (printed)
    metrics_port: int = 8002
    max_message_bytes: int = 256 * 1024 * 1024


async def run(config: ReplicaConfig, listen: Listen, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    repo = Repository(config)
    faults = Faults(config.seed)
    for name in config.load:
        await repo.load(name)
    server, grpc_port, servicer = await serve(
        repo, faults, listen.host, listen.grpc_port, listen.max_message_bytes
    )
    admin = AdminHTTP(
        make_registry(repo), faults, repo.set_slow_factor, executions=servicer.executions
    )
    try:
        metrics_port = await admin.start(listen.host, listen.metrics_port)
    except OSError as exc:
        await server.stop(0)
        raise OSError(
            f"cannot bind metrics port {listen.host}:{listen.metrics_port}: {exc}"
        ) from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    host = listen.host
    print(
        f"spillgate replica ready grpc={host}:{grpc_port} metrics={host}:{metrics_port} "
        f"speed={config.speed:g} models={','.join(sorted(repo.loaded))}",
        flush=True,
    )
    print(
        f"""
  Triton gRPC   {host}:{grpc_port}   (inference.GRPCInferenceService; stock tritonclient works)
  metrics       http://{host}:{metrics_port}/metrics
  faults        http://{host}:{metrics_port}/faults   (or: spillgate fault --url ...)

  Try it:
    .venv/bin/python -c "import tritonclient.grpc as g; \\
      print(g.InferenceServerClient('{host}:{grpc_port}').get_server_metadata())"
    .venv/bin/spillgate generate --url {host}:{grpc_port} --model llm-small "Hello from spillgate"
  Ctrl-C stops it.
""",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        servicer.ready = False
        await server.stop(grace=1.0)
        await admin.stop()
        for name in list(repo.loaded):
            await repo.unload(name)
