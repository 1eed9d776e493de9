"""One chat request through the gateway: validate, admit, then serve, overflow or shed.

Transport-neutral: the gRPC servicer, the Triton passthrough and the OpenAI HTTP API all
call `Gateway.chat`, which yields `ChatResponse`s (route first, text deltas, then the final
one with finish reason and usage) or raises `GatewayError`. Guarantees:
- every admitted slot is released exactly once (OK / ERROR / CANCELLED / TIMEOUT) with
  timings and token counts, whatever happens to the caller;
- a retry happens only before the first token reached the caller, only when the replica
  provably did no work (UNAVAILABLE before any response), and within the retry budget;
- an OVERFLOW forwards to the neighbour's gateway with hops + 1, the remaining deadline and
  the residency zone, so the neighbour never overflows it again. With a mesh address (the
  region's mesh Envoy) the hop goes there, naming the neighbour in
  DESTINATION_REGION_KEY; Envoy picks the neighbour's gateway (and, in local mode, adds
  the RTT). Without one the gateway dials the neighbour's gateway itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from spillgate._proto import (
    admission_pb2,
    admission_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
)
from spillgate.core.decision import Priority
from spillgate.core.prefix import block_hashes, tokenize
from spillgate.core.retry_budget import RetryBudget
from spillgate.gateway.auth import Caller
from spillgate.gateway.errors import GatewayError, as_gateway_error, invalid, shed
from spillgate.gateway.forward import ReplicaError, Replicas, coalesce
from spillgate.gateway.models import ModelCatalog

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # tokens per prefix block; the simulator's (and vLLM's) default
ADMIT_TIMEOUT_S = 60.0  # an Admit (queueing included) for a caller that set no deadline
HOPS_KEY = "x-spillgate-hops"
ORIGIN_KEY = "x-spillgate-origin-region"
# What the mesh Envoy routes overflow hops on (controlplane/snapshot.py
# DESTINATION_REGION_HEADER; a test keeps the two equal).
DESTINATION_REGION_KEY = "x-spillgate-destination-region"
# Several admission instances per region sit behind the region's mesh Envoy: it ring-hashes
# an Admit on ADMISSION_HASH_KEY (controlplane/snapshot.py SESSION_HEADER; the session id,
# else the request id) and names the instance that answered in ADMISSION_HOST_KEY, which
# the ticket's RenewTicket/Release send back so they reach the instance holding the ticket.
# Talking to one admission directly, the headers are simply unused.
ADMISSION_HASH_KEY = "x-session-id"
ADMISSION_HOST_KEY = "x-spillgate-admission-host"
MAX_TICKET_ROUTES = 100_000  # bound on tickets in flight remembered (never reached in use)
_FINISH = {"stop": gateway_pb2.FINISH_REASON_STOP, "length": gateway_pb2.FINISH_REASON_LENGTH}
_ROLES = {"system", "user", "assistant", "tool", "developer"}


# (caller, prompt + output tokens) -> None; raises GatewayError (RESOURCE_EXHAUSTED) when the
# tenant's token budget is spent.
ChargeTokens = Callable[[Caller, int], None]


def no_token_limit(caller: Caller, tokens: int) -> None:
    """Development mode (no key store): tokens are not rate limited."""


@dataclass(frozen=True)
class ChatCall:
    """A chat request with its transport facts."""

    request: gateway_pb2.ChatRequest
    caller: Caller
    request_id: str = ""
    hops: int = 0
    origin_region: str = ""
    deadline: float | None = None  # monotonic seconds; None = the priority's budget only
    forward_metadata: tuple[tuple[str, str], ...] = ()  # auth to pass on when overflowing


def render_prompt(messages: Sequence[gateway_pb2.ChatMessage]) -> str:
    """The text sent to the model: one `role: content` line per message, then `assistant:`."""
    lines = [f"{m.role}: {m.content}" for m in messages]
    lines.append("assistant:")
    return "\n".join(lines)


def validate(request: gateway_pb2.ChatRequest, catalog: ModelCatalog) -> tuple[str, int]:
    """Check the request; returns (prompt, max_tokens to ask for). Raises GatewayError."""
    prompt, max_tokens, _ = _validate(request, catalog)
    return prompt, max_tokens


def _validate(
    request: gateway_pb2.ChatRequest, catalog: ModelCatalog
) -> tuple[str, int, list[str]]:
    """`validate`, plus the prompt's tokens (tokenizing costs ~0.25 us/token: do it once)."""
    if not request.model:
        raise invalid("model", "required")
    limits = catalog.limits(request.model)  # NOT_FOUND for unknown models
    if not request.messages:
        raise invalid("messages", "at least one message is required")
    for i, m in enumerate(request.messages):
        if m.role not in _ROLES:
            raise invalid(f"messages[{i}].role", f"must be one of {', '.join(sorted(_ROLES))}")
    if request.max_tokens > limits.max_output_tokens:
        raise invalid(
            "max_tokens",
            f"{request.max_tokens} is above {request.model}'s limit of {limits.max_output_tokens}",
        )
    if request.HasField("temperature") and not 0 <= request.temperature <= 2:
        raise invalid("temperature", "must be between 0 and 2")
    if request.HasField("top_p") and not 0 < request.top_p <= 1:
        raise invalid("top_p", "must be in (0, 1]")
    if request.priority not in (0, *iter(Priority)):
        raise invalid("priority", f"unknown priority {request.priority}")
    prompt = render_prompt(request.messages)
    max_tokens = request.max_tokens or min(limits.max_output_tokens, 256)
    tokens = tokenize(prompt)
    n_prompt = len(tokens)
    if limits.max_context_tokens and n_prompt + max_tokens > limits.max_context_tokens:
        raise invalid(
            "messages",
            f"{n_prompt} prompt + {max_tokens} output tokens exceed {request.model}'s context "
            f"of {limits.max_context_tokens} tokens",
        )
    return prompt, max_tokens, tokens


class Gateway:
    """The region's gateway logic; thin transports call `chat`."""

    def __init__(
        self,
        region: str,
        admission: admission_pb2_grpc.AdmissionServiceAsyncStub,
        catalog: ModelCatalog,
        *,
        emulate_rtt: bool = False,
        mesh: str = "",
        max_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
        coalesce_tokens: bool = True,
    ) -> None:
        """`coalesce_tokens`: merge tokens that arrive while the consumer is still writing
        the previous message (forward.coalesce); right for a server writing to a network
        client, a needless task hop per token for an in-process consumer."""
        self.region = region
        self._coalesce = coalesce_tokens
        self._admission = admission
        self.catalog = catalog
        self.replicas = Replicas()
        self._mesh = mesh
        # The mesh delays inter-region hops itself (local mode): never pay the RTT twice.
        self._emulate_rtt = emulate_rtt and not mesh
        self._max_attempts = max_attempts
        self._clock = clock
        self._retry = RetryBudget()
        self._peers: dict[
            str, tuple[grpc.aio.Channel, gateway_pb2_grpc.GatewayServiceAsyncStub]
        ] = {}
        self.admission_ok: bool | None = None  # last Admit reached admission (None: not yet)
        self.charge_tokens: ChargeTokens = no_token_limit  # set when keys carry token limits
        self._background: set[asyncio.Future[Any]] = set()  # Releases in flight
        # Ticket id -> metadata that routes its RenewTicket/Release to the issuing instance.
        self._ticket_routes: dict[str, tuple[tuple[str, str], ...]] = {}

    async def close(self) -> None:
        """Wait for pending Releases, then close every connection."""
        await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.replicas.close()
        for channel, _ in self._peers.values():
            await channel.close()
        self._peers.clear()

    def _peer(self, endpoint: str) -> gateway_pb2_grpc.GatewayServiceAsyncStub:
        if endpoint not in self._peers:
            channel = grpc.aio.insecure_channel(endpoint)
            self._peers[endpoint] = (channel, gateway_pb2_grpc.GatewayServiceStub(channel))
        return self._peers[endpoint][1]

    def _remaining_s(self, call: ChatCall) -> float | None:
        return None if call.deadline is None else call.deadline - self._clock()

    # -- the flow ---------------------------------------------------------------------------

    async def chat(self, call: ChatCall) -> AsyncIterator[gateway_pb2.ChatResponse]:
        """Stream the answer; raises GatewayError (before or after the first message)."""
        request = call.request
        prompt, max_tokens, tokens = _validate(request, self.catalog)
        self.charge_tokens(call.caller, len(tokens) + max_tokens)
        request_id = call.request_id or uuid.uuid4().hex
        context = self._context(call, tokens, max_tokens, request_id)
        for attempt in range(1, self._max_attempts + 1):
            decision = await self._admit(context, call)
            if decision.action == common_pb2.ACTION_SHED:
                raise shed(request.model, decision.reason, decision.retry_after_ms)
            if decision.action == common_pb2.ACTION_OVERFLOW:
                async with contextlib.aclosing(self._overflow(call, decision, request_id)) as fw:
                    async for response in fw:
                        yield _with_refusals(response, context)
                return
            started = False
            serve = self._serve(call, decision, prompt, max_tokens, request_id)
            try:
                # aclosing: an abandoned stream releases its slot now, not at garbage collection.
                async with contextlib.aclosing(serve) as responses:
                    async for response in responses:
                        started = True
                        yield _with_refusals(response, context)
                self._retry.on_success()
                return
            except ReplicaError as exc:
                if exc.retryable:  # a request the replica refused as bad says nothing of it
                    self._retry.on_failure()
                if (
                    started
                    or not exc.retryable
                    or attempt == self._max_attempts
                    or not self._retry.allow_retry()
                ):
                    raise GatewayError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"replica {decision.replica} failed the request; retry later",
                    ) from None
                log.info("retrying %s after %s on %s", request_id, exc, decision.replica)
                context.avoid_replicas.append(decision.replica)
        raise AssertionError("unreachable")

    def _context(
        self, call: ChatCall, tokens: list[str], max_tokens: int, request_id: str
    ) -> common_pb2.RequestContext:
        r = call.request
        # Larger values are less important: a caller never gets above its key's ceiling.
        priority = max(int(r.priority or Priority.NORMAL), int(call.caller.priority_ceiling))
        context = common_pb2.RequestContext(
            request_id=request_id,
            tenant=call.caller.tenant,
            priority=priority,  # type: ignore[arg-type]
            session_id=r.session_id,
            model=r.model,
            prompt_tokens=len(tokens),
            prefix_block_hashes=block_hashes(tokens, BLOCK_SIZE, r.cache_salt),
            block_size_tokens=BLOCK_SIZE,
            cache_salt=r.cache_salt,
            max_tokens=max_tokens,
            residency_zone=r.residency_zone,
            allow_degrade=r.allow_degrade,
            budget_ms=r.budget_ms,
            hops=call.hops,
            origin_region=call.origin_region or self.region,
        )
        return context

    async def _admit(
        self, context: common_pb2.RequestContext, call: ChatCall
    ) -> common_pb2.Decision:
        return await self.admit(context, call.deadline)

    # -- public steps for other transports (the Triton passthrough) ---------------------

    async def admit(
        self, context: common_pb2.RequestContext, deadline: float | None = None
    ) -> common_pb2.Decision:
        """Ask admission for a decision (QUEUE waits inside); `deadline` is monotonic
        seconds and caps the context's budget. Raises GatewayError."""
        remaining = None if deadline is None else deadline - self._clock()
        if remaining is not None and remaining <= 0:
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if remaining is not None:
            # The caller's deadline caps the budget (budget_ms 0 still means the priority's
            # default): admission takes the earlier of the two.
            context.deadline.FromNanoseconds(time.time_ns() + int(remaining * 1e9))
        # Without a deadline, never wait on admission forever (queueing included).
        timeout = remaining if remaining is not None else ADMIT_TIMEOUT_S
        if not context.request_id:
            context.request_id = uuid.uuid4().hex
        key = ((ADMISSION_HASH_KEY, context.session_id or context.request_id),)
        try:
            call = self._admission.Admit(
                admission_pb2.AdmitRequest(context=context), timeout=timeout, metadata=key
            )
            response = await call
            headers = await call.initial_metadata()
        except grpc.aio.AioRpcError as exc:
            self.admission_ok = exc.code() != grpc.StatusCode.UNAVAILABLE
            raise as_gateway_error(exc) from None
        self.admission_ok = True
        decision: common_pb2.Decision = response.decision
        if decision.ticket.id:
            host = next((str(v) for k, v in headers or () if k == ADMISSION_HOST_KEY), "")
            self._remember_route(
                decision.ticket.id, (*key, (ADMISSION_HOST_KEY, host)) if host else key
            )
        return decision

    def _remember_route(self, ticket: str, metadata: tuple[tuple[str, str], ...]) -> None:
        if len(self._ticket_routes) >= MAX_TICKET_ROUTES:  # forget the oldest; never grow
            del self._ticket_routes[next(iter(self._ticket_routes))]
        self._ticket_routes[ticket] = metadata

    def release(
        self, ticket: str, outcome: Any, ttft_ms: float, total_ms: float, usage: common_pb2.Usage
    ) -> None:
        """Give an admitted slot back. The Release RPC runs in the background, off the
        response path, and outlives a cancelled caller; `close()` waits for pending ones.
        Never raises (a lost Release heals when the ticket's lease expires)."""
        request = admission_pb2.ReleaseRequest(
            ticket_id=ticket, outcome=outcome, usage=usage, ttft_ms=ttft_ms, total_ms=total_ms
        )
        route = self._ticket_routes.pop(ticket, ())
        task = asyncio.ensure_future(self._send_release(request, route))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_release(
        self, request: admission_pb2.ReleaseRequest, route: tuple[tuple[str, str], ...]
    ) -> None:
        try:
            response = await self._admission.Release(request, timeout=5, metadata=route)
        except Exception as exc:
            log.warning("release of %s failed (%s); its lease will expire", request.ticket_id, exc)
            return
        if not response.found:  # it expired first: admission's accounting already healed
            log.warning("release of %s: admission no longer knew the ticket", request.ticket_id)

    async def _serve(
        self,
        call: ChatCall,
        decision: common_pb2.Decision,
        prompt: str,
        max_tokens: int,
        request_id: str,
    ) -> AsyncGenerator[gateway_pb2.ChatResponse, None]:
        r = call.request
        if decision.HasField("degrade") and decision.degrade.max_tokens:
            max_tokens = min(max_tokens, decision.degrade.max_tokens)
        sampling: dict[str, Any] = {"max_tokens": max_tokens}
        if r.HasField("temperature"):
            sampling["temperature"] = r.temperature
        if r.HasField("top_p"):
            sampling["top_p"] = r.top_p
        if r.stop:
            sampling["stop"] = list(r.stop)
        if r.cache_salt:
            sampling["cache_salt"] = r.cache_salt
        route = gateway_pb2.RouteInfo(
            region=decision.region,
            replica=decision.replica,
            model=decision.model,
            version=decision.version,
            action=decision.action,
            reason=decision.reason,
            queue_ms=decision.queue_ms,
            hops=call.hops,
            estimate=decision.estimate,
        )
        start = self._clock()
        ttft_ms = 0.0
        outcome: Any = admission_pb2.OUTCOME_ERROR
        usage = common_pb2.Usage()
        renewing = self._keep_renewed(decision.ticket) if decision.ticket.id else None
        pieces = self.replicas.generate(
            decision.endpoint,
            decision.triton_model_name,
            decision.triton_model_version,
            prompt,
            sampling,
            request_id,
            self._remaining_s(call),
        )
        if self._coalesce:
            pieces = coalesce(pieces)
        try:
            first = True
            async for piece in pieces:
                usage.completion_tokens += piece.output_tokens
                response = gateway_pb2.ChatResponse(delta=piece.text)
                if first:
                    ttft_ms = (self._clock() - start) * 1000
                    response.route.CopyFrom(route)
                    response.request_id = request_id
                    first = False
                if piece.final:
                    usage.prompt_tokens = piece.input_tokens
                    response.finish_reason = _FINISH.get(
                        piece.finish_reason, gateway_pb2.FINISH_REASON_STOP
                    )
                    response.usage.CopyFrom(usage)
                    route.ttft_ms = ttft_ms
                    response.route.CopyFrom(route)
                    outcome = admission_pb2.OUTCOME_OK
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != admission_pb2.OUTCOME_OK:  # closed after the final piece: it ran
                outcome = admission_pb2.OUTCOME_CANCELLED
            raise
        except ReplicaError:
            outcome = admission_pb2.OUTCOME_ERROR
            raise
        finally:
            with contextlib.suppress(Exception):
                await pieces.aclose()
            remaining = self._remaining_s(call)
            if outcome != admission_pb2.OUTCOME_OK and remaining is not None and remaining <= 0:
                outcome = admission_pb2.OUTCOME_TIMEOUT  # the caller's deadline ended it
            if renewing is not None:
                renewing.cancel()
            total_ms = (self._clock() - start) * 1000
            if decision.ticket.id:
                self.release(decision.ticket.id, outcome, ttft_ms, total_ms, usage)

    def _keep_renewed(self, ticket: common_pb2.Ticket) -> asyncio.Task[None]:
        """Renew the ticket's lease every third of it while the stream runs, so a long
        generation keeps its slot accounted (an unrenewed lease expires at admission)."""

        async def renew() -> None:
            period = max(ticket.lease_ms, 300) / 3000
            request = admission_pb2.RenewTicketRequest(ticket_id=ticket.id)
            while True:
                await asyncio.sleep(period)
                try:
                    route = self._ticket_routes.get(ticket.id, ())
                    await self._admission.RenewTicket(request, timeout=5, metadata=route)
                except grpc.aio.AioRpcError as exc:
                    log.warning("renewing ticket %s failed: %s", ticket.id, exc.code().name)
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        return

        return asyncio.get_running_loop().create_task(renew())

    async def _overflow(
        self, call: ChatCall, decision: common_pb2.Decision, request_id: str
    ) -> AsyncGenerator[gateway_pb2.ChatResponse, None]:
        if not decision.endpoint and not self._mesh:
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE, f"region {decision.region} has no gateway endpoint"
            )
        if self._emulate_rtt and decision.estimate.network_ms:
            # Local fleets run every region on one machine: pay the modelled round trip.
            await asyncio.sleep(decision.estimate.network_ms / 1000)
        remaining = self._remaining_s(call)
        metadata = (
            (HOPS_KEY, str(call.hops + 1)),
            (ORIGIN_KEY, call.origin_region or self.region),
            ("x-request-id", request_id),
            *call.forward_metadata,
        )
        if self._mesh:
            metadata += ((DESTINATION_REGION_KEY, decision.region),)
        # The neighbour gets what is left of the end-to-end budget after the round trip.
        forwarded = gateway_pb2.ChatRequest()
        forwarded.CopyFrom(call.request)
        # The version admission resolved here (session pin, canary weights) is the one to
        # serve: the neighbour must not resolve the alias again.
        if decision.model and decision.version:
            forwarded.model = f"{decision.model}@{decision.version}"
        left = decision.estimate.budget_ms - decision.estimate.network_ms
        forwarded.budget_ms = max(1, int(left))
        peer = self._peer(self._mesh or decision.endpoint)
        stream = peer.Chat(forwarded, timeout=remaining, metadata=metadata)
        try:
            async for response in stream:
                if response.HasField("route"):
                    # Where it ran (the neighbour's route), why it went there and the
                    # end-to-end estimate including the round trip (ours).
                    response.route.action = common_pb2.ACTION_OVERFLOW
                    response.route.reason = decision.reason
                    response.route.estimate.CopyFrom(decision.estimate)
                yield response
        except grpc.aio.AioRpcError as exc:
            raise as_gateway_error(exc) from None
        finally:
            stream.cancel()


def _with_refusals(
    response: gateway_pb2.ChatResponse, context: common_pb2.RequestContext
) -> gateway_pb2.ChatResponse:
    """The route says which replicas refused the request before it ran (retries)."""
    if context.avoid_replicas and response.HasField("route"):
        response.route.refused_by.extend(context.avoid_replicas)
    return response
