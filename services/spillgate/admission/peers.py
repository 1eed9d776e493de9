"""Subscriptions to neighbour admissions' WatchRegion streams.

Each failed or ended subscription is reported (`on_failure`), which feeds the neighbour's
circuit breaker; each summary received counts as a success.

One task per neighbour keeps a stream open and hands every RegionSummary to a callback;
after any failure it reconnects with capped, jittered backoff, to the region's next admission
instance when it runs several (each instance scrapes the same replicas, so any one of them
speaks for the region). The policy ages summaries
itself: a neighbour whose stream is down simply stops being fresh and so is never an
overflow target (DESIGN.md principle 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from spillgate._proto import admission_pb2, admission_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

# A silent partition must end the stream (and feed the neighbour's breaker), not leave it
# waiting on a half-open connection: ping every 2 s, give up after 2 s without an answer.
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class PeersConfig:
    """Subscription tunables."""

    interval_ms: int = 100  # asked of each neighbour (also its liveness heartbeat)
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0


class Peers:
    """Keeps one WatchRegion subscription per neighbour region."""

    def __init__(
        self,
        region: str,
        on_summary: Callable[[common_pb2.RegionSummary], None],
        config: PeersConfig | None = None,
        on_failure: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._region = region
        self._on_summary = on_summary
        self._on_failure = on_failure or (lambda region: None)
        self._config = config or PeersConfig()
        self._rng = rng or random.Random()
        self._tasks: dict[str, tuple[tuple[str, ...], asyncio.Task[None]]] = {}
        self.connected: dict[str, bool] = {}

    def set_targets(self, endpoints: Mapping[str, Sequence[str]]) -> None:
        """Neighbour region -> its admission instances' endpoints; starts, restarts or stops
        subscriptions."""
        wanted = {r: tuple(e for e in eps if e) for r, eps in endpoints.items()}
        for region, (current, task) in list(self._tasks.items()):
            if wanted.get(region) != current:
                task.cancel()
                del self._tasks[region]
                self.connected.pop(region, None)
        for region, instances in wanted.items():
            if region != self._region and instances and region not in self._tasks:
                task = asyncio.create_task(self._follow(region, instances), name=f"peer-{region}")
                self._tasks[region] = (instances, task)

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, region: str, instances: tuple[str, ...]) -> None:
        c = self._config
        delay = c.backoff_initial_s
        request = admission_pb2.WatchRegionRequest(
            subscriber_region=self._region, interval_ms=c.interval_ms
        )
        attempt = 0
        while True:
            endpoint = instances[attempt % len(instances)]
            attempt += 1
            try:
                async with grpc.aio.insecure_channel(endpoint, options=_KEEPALIVE) as channel:
                    stub = admission_pb2_grpc.AdmissionServiceStub(channel)
                    async for response in stub.WatchRegion(request):
                        if not self.connected.get(region):
                            log.info("following neighbour %s at %s", region, endpoint)
                        self.connected[region] = True
                        delay = c.backoff_initial_s
                        if response.summary.region == region:
                            self._on_summary(response.summary)
                        else:
                            log.warning(
                                "%s answers for region %r, expected %r; ignoring it",
                                endpoint,
                                response.summary.region,
                                region,
                            )
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.connected.get(region, True):
                    log.warning("neighbour %s at %s: %s", region, endpoint, exc.code().name)
            except Exception:
                log.exception("neighbour %s subscription failed", region)
            self.connected[region] = False
            self._on_failure(region)
            await asyncio.sleep(delay * (1 - 0.2 * self._rng.random()))
            delay = min(delay * 2, c.backoff_max_s)
