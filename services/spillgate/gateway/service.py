"""GatewayService over gRPC: Chat (streaming), ListModels, Health, Load/UnloadModel.

Thin: authenticate, build a ChatCall from the request and its metadata, stream
`Gateway.chat`, and report where the request ran and why in initial and trailing metadata
(`x-spillgate-region`, `-replica`, `-model`, `-version`, `-action`, `-reason`, `-queue-ms`,
`-hops`, and `-refused-by` when replicas refused it before a retry). Errors end the stream
with exactly one status from gateway/errors.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from spillgate._proto import common_pb2, gateway_pb2, gateway_pb2_grpc
from spillgate.core.decision import Priority
from spillgate.gateway.auth import Caller, Scope
from spillgate.gateway.chat import HOPS_KEY, ORIGIN_KEY, ChatCall, Gateway
from spillgate.gateway.errors import GatewayError, as_gateway_error

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
MAX_HOPS = 8  # region-to-region forwards a request may have taken (one in practice)
# (metadata, scope) -> Caller; raises GatewayError (UNAUTHENTICATED, PERMISSION_DENIED,
# RESOURCE_EXHAUSTED for rate limits).
Authenticate = Callable[[Mapping[str, str], str], Caller]


def route_metadata(route: gateway_pb2.RouteInfo) -> tuple[tuple[str, str], ...]:
    """Where and why, as `x-spillgate-*` pairs (gRPC metadata and HTTP headers alike)."""
    refused = (("x-spillgate-refused-by", ",".join(route.refused_by)),) if route.refused_by else ()
    return (
        ("x-spillgate-region", route.region),
        ("x-spillgate-replica", route.replica),
        ("x-spillgate-model", route.model),
        ("x-spillgate-version", route.version),
        ("x-spillgate-action", common_pb2.Action.Name(route.action).removeprefix("ACTION_")),
        ("x-spillgate-reason", route.reason),
        ("x-spillgate-queue-ms", f"{route.queue_ms:.1f}"),
        ("x-spillgate-hops", str(route.hops)),
        *refused,
    )


def _metadata(context: Context) -> dict[str, str]:
    """Text metadata of the call (binary `-bin` entries are left out)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def no_auth(metadata: Mapping[str, str], scope: str) -> Caller:
    """Development mode (no key store): everyone is the `anonymous` tenant, unrestricted."""
    return _ANONYMOUS


_ANONYMOUS = Caller(
    tenant="anonymous", key_id="", priority_ceiling=Priority.CRITICAL, scopes=frozenset(Scope)
)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public gRPC API of one region's gateway."""

    def __init__(
        self,
        gateway: Gateway,
        authenticate: Authenticate = no_auth,
        registry_status: Callable[[], tuple[bool, int, float]] = lambda: (False, 0, 0.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self._authenticate = authenticate
        self._registry_status = registry_status  # (reachable, revision, age_ms)
        self._clock = clock

    async def _abort(self, context: Context, exc: BaseException) -> None:
        error = as_gateway_error(exc).rpc_error()
        await context.abort(error.code, error.message, error.trailing_metadata())

    def _call(self, request: gateway_pb2.ChatRequest, context: Context) -> ChatCall:
        metadata = _metadata(context)
        caller = self._authenticate(metadata, "chat")
        remaining = context.time_remaining()
        try:
            hops = int(metadata.get(HOPS_KEY, "0"))
        except ValueError:
            hops = -1
        if not 0 <= hops <= MAX_HOPS:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{HOPS_KEY}: must be an integer from 0 to {MAX_HOPS}",
                field=HOPS_KEY,
            )
        forward = tuple((k, metadata[k]) for k in ("authorization", "x-api-key") if k in metadata)
        return ChatCall(
            request=request,
            caller=caller,
            request_id=metadata.get("x-request-id", ""),
            hops=hops,
            origin_region=metadata.get(ORIGIN_KEY, ""),
            deadline=None if remaining is None else self._clock() + remaining,
            forward_metadata=forward,
        )

    async def Chat(
        self, request: gateway_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        """Stream the answer; the first message carries the route."""
        try:
            call = self._call(request, context)
            route: gateway_pb2.RouteInfo | None = None
            async for response in self.gateway.chat(call):
                if route is None and response.HasField("route"):
                    route = response.route
                    await context.send_initial_metadata(route_metadata(route))
                if response.HasField("route"):
                    route = response.route
                yield response
            if route is not None:
                context.set_trailing_metadata(route_metadata(route))
        except Exception as exc:
            await self._abort(context, exc)

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: Context
    ) -> gateway_pb2.ListModelsResponse:
        """Models and aliases (optionally those served in one region)."""
        try:
            self._authenticate(_metadata(context), "models")
            _, revision, _ = self._registry_status()
            return gateway_pb2.ListModelsResponse(
                models=self.gateway.catalog.listings(request.region or self.gateway.region),
                registry_revision=revision,
            )
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def Health(
        self, request: gateway_pb2.HealthRequest, context: Context
    ) -> gateway_pb2.HealthResponse:
        """What this gateway can reach right now (no auth: for load balancers and probes)."""
        return self.health()

    def health(self) -> gateway_pb2.HealthResponse:
        """The Health answer (shared by gRPC and HTTP `/health`)."""
        reachable, revision, age_ms = self._registry_status()
        ready = len(self.gateway.catalog.ready_replicas(self.gateway.region))
        admission = self.gateway.admission_ok is not False
        return gateway_pb2.HealthResponse(
            region=self.gateway.region,
            serving=admission and revision > 0,
            admission_reachable=admission,
            registry_reachable=reachable,
            registry_revision=revision,
            registry_age_ms=age_ms,
            ready_replicas=ready,
        )

    async def _repository(self, request: Any, context: Context, load: bool) -> list[str]:
        """Load/unload a pinned version on the replicas its placement in this region assigns
        (or on one replica); returns the replicas that did it."""
        self._authenticate(_metadata(context), "admin")
        region = request.region or self.gateway.region
        if region != self.gateway.region:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"region: this gateway serves {self.gateway.region!r}; ask {region!r}'s gateway",
            )
        if "@" not in request.model:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "model: a pinned name@version is required (aliases are not loadable)",
                field="model",
            )
        version = self.gateway.catalog.version(request.model)  # NOT_FOUND when unknown
        pools = self.gateway.catalog.placement_pools(request.model, region)
        replicas = [
            r
            for r in self.gateway.catalog.ready_replicas(region)
            if (r.id == request.replica if request.replica else r.pool in pools)
        ]
        if request.replica and not replicas:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND, f"replica {request.replica!r} not ready in {region}"
            )
        if not replicas:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{request.model} has no placement with ready replicas in {region}",
            )
        done: list[str] = []
        for replica in replicas:
            client: aioclient.InferenceServerClient = self.gateway.replicas.client(replica.endpoint)
            try:
                if load:
                    await client.load_model(version.triton_model_name, client_timeout=60)
                else:
                    await client.unload_model(version.triton_model_name, client_timeout=60)
            except InferenceServerException as exc:
                log.warning("%s of %s on %s failed: %s", "load" if load else "unload",
                            request.model, replica.id, exc)  # fmt: skip
                raise GatewayError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"replica {replica.id} refused it; done so far: {', '.join(done) or 'none'}",
                ) from None
            done.append(replica.id)
        return done

    async def LoadModel(
        self, request: gateway_pb2.LoadModelRequest, context: Context
    ) -> gateway_pb2.LoadModelResponse:
        """Admin: load a model on this region's replicas (or one replica)."""
        try:
            return gateway_pb2.LoadModelResponse(
                replicas=await self._repository(request, context, True)
            )
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def UnloadModel(
        self, request: gateway_pb2.UnloadModelRequest, context: Context
    ) -> gateway_pb2.UnloadModelResponse:
        """Admin: unload a model from this region's replicas (or one replica)."""
        try:
            return gateway_pb2.UnloadModelResponse(
                replicas=await self._repository(request, context, False)
            )
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc
