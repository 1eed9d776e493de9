"""Zero-proxy mode (DESIGN.md): the gateway's request path inside the caller's process.

A mesh-aware caller in a GPU region (an internal service, usually next to its sidecar
Envoy) that cannot afford the extra hop through a gateway embeds this client. Per request it
does exactly what a gateway does, with the same code (`gateway.chat.Gateway`): validate
against the registry's models, Admit at the region's admission (queueing inside Admit),
stream the answer straight from the replica admission picked (tritonclient, vLLM contract),
retry a replica that refused before any work elsewhere, send an OVERFLOW to the chosen
region's gateway (hop 1; through `mesh`, the region's mesh Envoy, when given), and always
Release the slot with outcome and timings (after the answer, off the response path). What
it adds over calling the replica directly is measured by `make bench-gateway` (arm
`zero-proxy`; README, Gateway).

    async with ZeroProxyClient("us", registry="127.0.0.1:7070", admission="127.0.0.1:7080") as c:
        async for response in c.chat(ChatRequest(model="chat", messages=[...])):
            print(response.delta, end="")

Errors are `gateway.errors.GatewayError` (`.code` a grpc.StatusCode, `.retry_after_ms`),
the same statuses the gateway answers with. The caller is trusted (no API key): its
requests carry `tenant` and may use every priority.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import TracebackType

import grpc

from spillgate._proto import admission_pb2_grpc, gateway_pb2
from spillgate.core.decision import Priority
from spillgate.gateway.auth import Caller
from spillgate.gateway.chat import ChatCall, Gateway
from spillgate.gateway.models import ModelCatalog
from spillgate.registry.client import RegistryClient


class ZeroProxyClient:
    """Admit -> replica -> Release from the caller's process; `start()` before use (or
    `async with`), `close()` after."""

    def __init__(
        self,
        region: str,
        *,
        registry: str,
        admission: str,
        tenant: str = "internal",
        mesh: str = "",
    ) -> None:
        self.region = region
        self._registry = RegistryClient(registry)
        self._catalog = ModelCatalog()
        self._registry.add_listener(self._on_registry)
        self._channel = grpc.aio.insecure_channel(admission)
        self.gateway = Gateway(
            region,
            admission_pb2_grpc.AdmissionServiceStub(self._channel),
            self._catalog,
            mesh=mesh,
            coalesce_tokens=False,  # the consumer is the caller itself: nothing to batch
        )
        self._caller = Caller(tenant=tenant, key_id="", priority_ceiling=Priority.CRITICAL)

    def _on_registry(self, revision: int) -> None:
        self._catalog.state = self._registry.state

    async def start(self, timeout: float = 10.0) -> None:
        """Connect to the registry and wait for its snapshot (TimeoutError after `timeout`)."""
        await self._registry.start()
        await self._registry.wait_ready(timeout)

    async def close(self) -> None:
        """Finish pending Releases, then close every connection."""
        await self.gateway.close()
        await self._channel.close()
        await self._registry.close()

    async def __aenter__(self) -> ZeroProxyClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def chat(
        self,
        request: gateway_pb2.ChatRequest,
        *,
        timeout: float | None = None,
        request_id: str = "",
    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        """Stream the answer (route on the first message, usage on the last); `timeout` in
        seconds caps the SLA budget like a gRPC deadline does at a gateway."""
        deadline = None if timeout is None else time.monotonic() + timeout
        call = ChatCall(request, self._caller, request_id=request_id, deadline=deadline)
        return self.gateway.chat(call)
