"""AdmissionService over the pure Policy: Admit (with in-call queueing), Release,
RenewTicket, WatchRegion, Drain.

The policy is synchronous and fast, and everything here runs on one event loop, so the
policy needs no lock. A QUEUE decision parks the Admit call on a future that the pump task
resolves when `Policy.drain_queue` finishes the request (SERVE or SHED): every Admit ends in
exactly one terminal decision. A caller that goes away while queued still gets its slot
released (CANCELLED) if it was granted one later, so nothing admitted leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc

from spillgate._proto import admission_pb2, admission_pb2_grpc
from spillgate.admission.convert import (
    Clocks,
    request_from_proto,
    summary_to_proto,
    ticket_to_proto,
    write_decision,
)
from spillgate.admission.errors import to_rpc_error
from spillgate.core.decision import Action, Decision, Outcome, Request
from spillgate.core.policy import Policy
from spillgate.core.policy_config import PolicyConfig
from spillgate.status import ServiceError, guard

log = logging.getLogger(__name__)
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ServiceConfig:
    """Service tunables (the policy's knobs live in PolicyConfig)."""

    # While requests are queued, how often the queue is re-evaluated even without events.
    queue_tick_s: float = 0.005
    # How often expired tickets are collected.
    ticket_sweep_s: float = 0.25
    # WatchRegion: default and minimum interval between summaries.
    summary_interval_ms: int = 100
    min_summary_interval_ms: int = 20
    # Drain: how often in-flight counts are re-checked while waiting.
    drain_poll_s: float = 0.01


class AdmissionServicer(admission_pb2_grpc.AdmissionServiceServicer):
    """The gRPC edge of one region's Policy. `start()` inside the loop, `close()` after."""

    def __init__(
        self,
        policy: Policy,
        region: str,
        policy_config: PolicyConfig,
        config: ServiceConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.policy = policy
        self.region = region
        self._policy_config = policy_config
        self._config = config or ServiceConfig()
        self._clock = clock
        self._wall = wall
        self._waiting: dict[int, tuple[Request, asyncio.Future[Decision]]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.decisions: dict[str, int] = {}  # "ACTION:reason" -> count, for status/metrics
        self.shed_total = 0

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._pump(), name="admission-queue"),
            asyncio.create_task(self._sweep(), name="admission-tickets"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    def clocks(self) -> Clocks:
        return Clocks(self._clock(), self._wall())

    def kick(self) -> None:
        """Capacity may have changed (release, scrape, fleet change): re-run the queue."""
        self._wake.set()

    # -- plumbing ---------------------------------------------------------------------------

    async def _guard(self, context: Context, work: Awaitable[T]) -> T:
        return await guard(context, work, to_rpc_error)

    def _count(self, decision: Decision) -> None:
        key = f"{decision.action.name}:{decision.reason}"
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if decision.action is Action.SHED:
            self.shed_total += 1

    # -- Admit ------------------------------------------------------------------------------

    async def Admit(
        self, request: admission_pb2.AdmitRequest, context: Context
    ) -> admission_pb2.AdmitResponse:
        """Decide; a QUEUE decision waits here until it ends in SERVE or SHED."""
        return await self._guard(context, self._admit(request))

    async def _admit(self, request: admission_pb2.AdmitRequest) -> admission_pb2.AdmitResponse:
        clocks = self.clocks()
        req = request_from_proto(request.context, clocks, self._policy_config)
        if request.dry_run:
            decision = self.policy.decide(req, clocks.mono, commit=False)
            return _admit_response(decision, clocks)
        decision = self.policy.decide(req, clocks.mono)
        if decision.action is Action.QUEUE:
            future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
            self._waiting[id(req)] = (req, future)
            self.kick()
            # If this call is cancelled, the pump still finishes the queued request and
            # releases any slot it gets (see _finish).
            try:
                decision = await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    # Granted in the same loop turn the caller went away: give it back.
                    self._give_back(future.result(), self._clock())
                elif self.policy.cancel_queued(req):
                    # Still queued: leave now rather than hold a place until the TTL.
                    self._waiting.pop(id(req), None)
                raise
            clocks = self.clocks()
        self._count(decision)
        return _admit_response(decision, clocks)

    def _finish(self, req: Request, decision: Decision, now: float) -> None:
        entry = self._waiting.pop(id(req), None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(decision)
            return
        self._give_back(decision, now)

    def _give_back(self, decision: Decision, now: float) -> None:
        """The caller is gone (cancelled or deadline): release what it was granted."""
        if decision.ticket is not None:
            self.policy.release(decision.ticket.id, Outcome.CANCELLED, now)
        self._count(decision)

    async def _pump(self) -> None:
        while True:
            if self.policy.queue_len:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._config.queue_tick_s)
            else:
                await self._wake.wait()
            self._wake.clear()
            now = self._clock()
            try:
                finished = self.policy.drain_queue(now)
            except Exception:
                log.exception("admission queue pump failed; continuing")
                continue
            for req, decision in finished:  # one bad entry never strands the others
                try:
                    self._finish(req, decision, now)
                except Exception:
                    log.exception("finishing queued request %s failed", req.request_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._config.ticket_sweep_s)
            try:
                expired = self.policy.expire_tickets(self._clock())
            except Exception:
                log.exception("ticket sweep failed; continuing")
                continue
            if expired:
                log.info("expired %d unreleased tickets", len(expired))
                self.kick()

    # -- tickets ----------------------------------------------------------------------------

    async def Release(
        self, request: admission_pb2.ReleaseRequest, context: Context
    ) -> admission_pb2.ReleaseResponse:
        """End a ticket (idempotent: unknown or expired -> found=False)."""

        async def work() -> admission_pb2.ReleaseResponse:
            if not request.ticket_id:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "ticket_id: required")
            try:
                outcome = Outcome(request.outcome)
            except ValueError:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"outcome: must be OK, ERROR, CANCELLED or TIMEOUT, got {request.outcome}",
                ) from None
            found = self.policy.release(
                request.ticket_id,
                outcome,
                self._clock(),
                ttft_ms=request.ttft_ms,
                total_ms=request.total_ms,
                output_tokens=request.usage.completion_tokens,
            )
            if found:
                self.kick()
            return admission_pb2.ReleaseResponse(found=found)

        return await self._guard(context, work())

    async def RenewTicket(
        self, request: admission_pb2.RenewTicketRequest, context: Context
    ) -> admission_pb2.RenewTicketResponse:
        """Extend a live ticket's lease; NOT_FOUND once it expired."""

        async def work() -> admission_pb2.RenewTicketResponse:
            clocks = self.clocks()
            ticket = self.policy.renew(request.ticket_id, clocks.mono, request.lease_ms)
            if ticket is None:
                raise ServiceError(
                    grpc.StatusCode.NOT_FOUND,
                    f"ticket {request.ticket_id!r} is unknown or expired",
                )
            return admission_pb2.RenewTicketResponse(ticket=ticket_to_proto(ticket, clocks))

        return await self._guard(context, work())

    # -- peers ------------------------------------------------------------------------------

    async def WatchRegion(
        self, request: admission_pb2.WatchRegionRequest, context: Context
    ) -> AsyncIterator[admission_pb2.WatchRegionResponse]:
        """This region's summary now, then every interval."""
        c = self._config
        interval_ms = request.interval_ms or c.summary_interval_ms
        interval = max(interval_ms, c.min_summary_interval_ms) / 1000
        models = frozenset(request.models)
        while True:
            clocks = self.clocks()
            summary = summary_to_proto(self.policy.summary(clocks.mono), clocks, models)
            summary.shed_total = self.shed_total
            yield admission_pb2.WatchRegionResponse(summary=summary)
            await asyncio.sleep(interval)

    # -- drain ------------------------------------------------------------------------------

    async def Drain(
        self, request: admission_pb2.DrainRequest, context: Context
    ) -> admission_pb2.DrainResponse:
        """Stop (or resume) admitting to a replica or the region; optionally wait."""
        return await self._guard(context, self._drain(request))

    async def _drain(self, request: admission_pb2.DrainRequest) -> admission_pb2.DrainResponse:
        fleet = self.policy.fleet
        target = request.WhichOneof("target")
        if target == "replica":
            replica = fleet.replicas.get(request.replica) if fleet else None
            if replica is None or replica.region != self.region:
                raise ServiceError(
                    grpc.StatusCode.NOT_FOUND,
                    f"replica {request.replica!r} is not a replica of region {self.region!r}",
                )
            replicas = [request.replica]
        elif target == "region":
            if request.region != self.region:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"region: this admission serves {self.region!r}, not {request.region!r}",
                )
            replicas = sorted(
                r.id for r in (fleet.replicas.values() if fleet else ()) if r.region == self.region
            )
        else:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "target: replica or region")
        for replica_id in replicas:
            self.policy.set_draining(replica_id, not request.resume)
        self.kick()
        clocks = self.clocks()
        deadline = clocks.to_mono(request.deadline) if request.HasField("deadline") else None
        wait_until = clocks.mono + request.wait_ms / 1000
        if deadline is not None:
            wait_until = min(wait_until, deadline) if request.wait_ms else deadline
        while not request.resume and self._in_flight(replicas) and self._clock() < wait_until:
            await asyncio.sleep(self._config.drain_poll_s)
        if deadline is not None and not request.resume and self._clock() >= deadline:
            for replica_id in replicas:
                dropped = self.policy.drop_tickets(replica_id)
                if dropped:
                    log.warning("drain deadline: ended %d tickets on %s", len(dropped), replica_id)
        return admission_pb2.DrainResponse(replicas=replicas, in_flight=self._in_flight(replicas))

    def _in_flight(self, replicas: list[str]) -> int:
        return sum(self.policy.in_flight_on(r) for r in replicas)


def _admit_response(decision: Decision, clocks: Clocks) -> admission_pb2.AdmitResponse:
    response = admission_pb2.AdmitResponse()
    write_decision(response.decision, decision, clocks)  # in place: no copy of the message
    return response
