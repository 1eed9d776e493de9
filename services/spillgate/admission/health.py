"""Health checks of replicas over Triton's gRPC protocol, reported as events.

Per replica: ServerLive, then ModelReady for each model it should serve, every
`live_interval`; and every `canary_interval` a tiny real inference (one token, vLLM tensor
contract, over ModelStreamInfer since LLM models are decoupled) on its canary model. A
stalled or failing engine passes ServerLive but fails the canary. Each check's outcome goes
to `on_event`; deciding what to do about failures (the circuit breaker) is the pure core's
job, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc.aio import InferenceServerClient, InferInput
from tritonclient.utils import InferenceServerException

log = logging.getLogger(__name__)


class CheckKind(StrEnum):
    LIVE = "live"  # ServerLive
    READY = "ready"  # ModelReady, one event per model
    CANARY = "canary"  # one real inference


@dataclass(frozen=True)
class HealthConfig:
    """Check periods and timeouts, seconds."""

    live_interval: float = 0.5  # ServerLive + ModelReady round
    canary_interval: float = 2.0
    rpc_timeout: float = 0.25  # ServerLive / ModelReady deadline
    canary_timeout: float = 2.0  # whole canary, first byte to final response
    canary_prompt: str = "spillgate health canary"
    canary_max_tokens: int = 1
    # gRPC backs off reconnecting to a dead endpoint up to 120 s by default; a replica that
    # comes back must be seen within about this long.
    max_reconnect_backoff_ms: int = 1000

    def __post_init__(self) -> None:
        periods = (self.live_interval, self.canary_interval, self.rpc_timeout)
        if min(*periods, self.canary_timeout) <= 0:
            raise ValueError("intervals and timeouts must be > 0")
        if self.canary_max_tokens < 1:
            raise ValueError("canary_max_tokens must be >= 1")


@dataclass(frozen=True)
class HealthTarget:
    """What to check on one replica."""

    endpoint: str  # Triton gRPC host:port
    models: tuple[str, ...] = ()  # ModelReady for each (the models it should serve)
    canary_model: str | None = None  # an LLM with the vLLM tensor contract; None = no canary


@dataclass(frozen=True)
class HealthEvent:
    """The outcome of one check."""

    replica_id: str
    kind: CheckKind
    ok: bool
    detail: str  # "ok", or why not (error text from the replica, "timed out ...")
    latency: float  # seconds the check took
    time: float  # clock time when it finished
    model: str | None = None  # READY and CANARY: the model checked


@dataclass(frozen=True)
class HealthStatus:
    """The latest event of each check of one replica."""

    target: HealthTarget
    live: HealthEvent | None = None
    ready: Mapping[str, HealthEvent] = field(default_factory=dict)
    canary: HealthEvent | None = None
    consecutive_failures: Mapping[CheckKind, int] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """Live, every target model ready and the last canary (if any ran) succeeded.

        False until the first live and ready results are in: unknown is not healthy.
        """
        if self.live is None or not self.live.ok:
            return False
        for model in self.target.models:
            ev = self.ready.get(model)
            if ev is None or not ev.ok:
                return False
        return self.canary is None or self.canary.ok


HealthListener = Callable[[HealthEvent], None]


@dataclass
class _Replica:
    target: HealthTarget
    client: InferenceServerClient | None = None
    status: HealthStatus | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class HealthChecker:
    """Runs the checks of a changing set of replicas; one gRPC channel per replica."""

    def __init__(
        self,
        config: HealthConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_event: HealthListener | None = None,
    ) -> None:
        self._cfg = config or HealthConfig()
        self._clock = clock
        self._on_event = on_event
        self._replicas: dict[str, _Replica] = {}
        self._retired: set[asyncio.Task[None]] = set()  # of dropped replicas, still unwinding
        self._running = False
        self._ids = itertools.count()

    async def __aenter__(self) -> HealthChecker:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def set_targets(self, targets: Mapping[str, HealthTarget]) -> None:
        """Replace the checked set; unchanged targets keep their status and channel."""
        for rid in list(self._replicas):
            if targets.get(rid) != self._replicas[rid].target:
                self._retire(self._replicas.pop(rid))
        for rid, target in targets.items():
            if rid not in self._replicas:
                self._replicas[rid] = _Replica(target, status=HealthStatus(target))
                if self._running:
                    self._spawn(rid)

    def status(self, replica_id: str) -> HealthStatus | None:
        replica = self._replicas.get(replica_id)
        return None if replica is None else replica.status

    def start(self) -> None:
        """Start checking every target (call from the running event loop)."""
        if self._running:
            return
        self._running = True
        for rid in self._replicas:
            self._spawn(rid)

    async def close(self) -> None:
        """Stop every check and close every channel; statuses are kept."""
        self._running = False
        for replica in self._replicas.values():
            self._retire(replica)
        retired = list(self._retired)
        for task in retired:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- checks ------------------------------------------------------------------------------

    async def check_live(self, replica_id: str) -> list[HealthEvent]:
        """One ServerLive + ModelReady round now; its events (also reported)."""
        replica = self._replicas[replica_id]
        client = self._client(replica)
        started = time.monotonic()
        live_ok, detail = await self._call(client.is_server_live, "server not live")
        events = [self._record(replica_id, CheckKind.LIVE, live_ok, detail, started)]
        if not live_ok:
            return events  # ModelReady would only repeat the failure
        for model in replica.target.models:
            started = time.monotonic()
            ok, detail = await self._call(
                lambda m=model, **kw: client.is_model_ready(m, **kw), "model not ready"
            )
            events.append(self._record(replica_id, CheckKind.READY, ok, detail, started, model))
        return events

    async def check_canary(self, replica_id: str) -> HealthEvent | None:
        """One canary inference now (None if the target has no canary model)."""
        replica = self._replicas[replica_id]
        model = replica.target.canary_model
        if model is None:
            return None
        client = self._client(replica)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._cfg.canary_timeout):
                ok, detail = await self._canary(client, model)
        except TimeoutError:
            ok, detail = False, f"timed out after {self._cfg.canary_timeout:g} s"
        except (InferenceServerException, grpc.RpcError) as exc:
            ok, detail = False, _error_text(exc)
        return self._record(replica_id, CheckKind.CANARY, ok, detail, started, model)

    async def _call(self, rpc: Callable[..., Any], not_ok: str) -> tuple[bool, str]:
        try:
            ok = bool(await rpc(client_timeout=self._cfg.rpc_timeout))
        except (InferenceServerException, grpc.RpcError) as exc:
            return False, _error_text(exc)
        return (True, "ok") if ok else (False, not_ok)

    async def _canary(self, client: InferenceServerClient, model: str) -> tuple[bool, str]:
        request = {
            "model_name": model,
            "inputs": self._canary_inputs(),
            "request_id": f"spillgate-canary-{next(self._ids)}",
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        responses = client.stream_infer(requests(), stream_timeout=self._cfg.canary_timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    return False, _error_text(error)
                final = result.get_response().parameters.get("triton_final_response")
                if final is None or final.bool_param:
                    return True, "ok"
            return False, "stream ended without a final response"
        finally:
            responses.cancel()

    def _canary_inputs(self) -> list[InferInput]:
        params = json.dumps({"max_tokens": self._cfg.canary_max_tokens}).encode()
        values: list[tuple[str, np.ndarray[Any, Any], str]] = [
            ("text_input", np.array([self._cfg.canary_prompt.encode()], np.object_), "BYTES"),
            ("stream", np.array([False]), "BOOL"),
            ("sampling_parameters", np.array([params], np.object_), "BYTES"),
            ("exclude_input_in_output", np.array([True]), "BOOL"),
        ]
        inputs = []
        for name, value, dtype in values:
            t = InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        return inputs

    def _record(
        self,
        rid: str,
        kind: CheckKind,
        ok: bool,
        detail: str,
        started: float,
        model: str | None = None,
    ) -> HealthEvent:
        event = HealthEvent(rid, kind, ok, detail, time.monotonic() - started, self._clock(), model)
        replica = self._replicas.get(rid)
        if replica is not None and replica.status is not None:
            s = replica.status
            failures = dict(s.consecutive_failures)
            failures[kind] = 0 if ok else failures.get(kind, 0) + 1
            if kind is CheckKind.LIVE:
                s = HealthStatus(s.target, event, s.ready, s.canary, failures)
            elif kind is CheckKind.READY and model is not None:
                ready = MappingProxyType({**s.ready, model: event})
                s = HealthStatus(s.target, s.live, ready, s.canary, failures)
            else:
                s = HealthStatus(s.target, s.live, s.ready, event, failures)
            replica.status = s
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("health listener failed for replica %s", rid)
        return event

    # -- tasks and channels ------------------------------------------------------------------

    def _client(self, replica: _Replica) -> InferenceServerClient:
        if replica.client is None:
            backoff = self._cfg.max_reconnect_backoff_ms
            replica.client = InferenceServerClient(
                replica.target.endpoint,
                channel_args=[
                    ("grpc.initial_reconnect_backoff_ms", min(100, backoff)),
                    ("grpc.min_reconnect_backoff_ms", min(100, backoff)),
                    ("grpc.max_reconnect_backoff_ms", backoff),
                ],
            )
        return replica.client

    async def _every(self, rid: str, period: float, check: Callable[[str], Any]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await check(rid)
            await asyncio.sleep(max(0.0, began + period - loop.time()))

    def _spawn(self, rid: str) -> None:
        replica = self._replicas[rid]
        loop = asyncio.get_running_loop()
        replica.tasks.append(
            loop.create_task(
                self._every(rid, self._cfg.live_interval, self.check_live),
                name=f"spillgate-health-live:{rid}",
            )
        )
        if replica.target.canary_model is not None:
            replica.tasks.append(
                loop.create_task(
                    self._every(rid, self._cfg.canary_interval, self.check_canary),
                    name=f"spillgate-health-canary:{rid}",
                )
            )

    def _retire(self, replica: _Replica) -> None:
        """Cancel the replica's checks; a task then closes its channel once they unwound."""
        tasks, replica.tasks = replica.tasks, []
        client, replica.client = replica.client, None
        for task in tasks:
            task.cancel()
        if not tasks and client is None:
            return

        async def finish() -> None:
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if client is not None:
                await client.close()

        closer = asyncio.get_running_loop().create_task(finish(), name="spillgate-health-close")
        self._retired.add(closer)
        closer.add_done_callback(self._retired.discard)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "").removeprefix("StatusCode.")  # "StatusCode.UNAVAILABLE"
        return f"{status}: {exc.message()}" if status else str(exc.message())
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
