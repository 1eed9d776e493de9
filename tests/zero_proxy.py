"""A bare zero-proxy client for tests and benches: Admit -> stream from the chosen replica
with raw tritonclient -> Release (the product's client, which runs the gateway's whole
request path, is `spillgate.zeroproxy.ZeroProxyClient`).

`TritonZeroProxy.admitted` is what a mesh-aware caller does (DESIGN.md "Zero-proxy mode"):
ask the admission, stream the completion straight from the replica it picked with
tritonclient.grpc.aio, then Release the ticket with the outcome and measured timings (an
error on the replica is released as OUTCOME_ERROR, never dropped). `direct` streams to a
replica the test picked itself (the round-robin / random baselines). `run_load` runs a list
of calls through either at a fixed concurrency.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc.aio import InferenceServerClient, InferInput
from tritonclient.utils import InferenceServerException

from spillgate._proto import admission_pb2, admission_pb2_grpc, common_pb2
from spillgate.core.prefix import block_hashes, tokenize

BLOCK_SIZE = 16  # the simulator's KV block size (replica config block_size)


@dataclass(frozen=True)
class Call:
    """One completion request: the prompt and how many tokens to generate (ignore_eos)."""

    prompt: str
    max_tokens: int
    prefix: bool = False  # send prefix_block_hashes to the admission

    def context(self, model: str, request_id: str) -> common_pb2.RequestContext:
        """The Admit context; block hashes use the simulator's tokenizer and block size."""
        tokens = tokenize(self.prompt)
        hashes = block_hashes(tokens, BLOCK_SIZE) if self.prefix else ()
        return common_pb2.RequestContext(
            request_id=request_id,
            model=model,
            prompt_tokens=len(tokens),
            max_tokens=self.max_tokens,
            prefix_block_hashes=hashes,
            block_size_tokens=BLOCK_SIZE,
        )


@dataclass
class Result:
    """What happened to one call (times in ms; `start`/`admitted_at` on time.monotonic)."""

    start: float
    replica: str  # replica id (admitted) or endpoint (direct); "" when not served
    ok: bool
    latency_ms: float  # Admit (if any) + the whole stream
    action: int = common_pb2.ACTION_SERVE
    reason: str = ""
    admitted_at: float = 0.0  # when Admit returned
    ticket: str = ""
    released: bool | None = None  # Release found the ticket (None: nothing to release)
    outcome: int = 0  # the outcome released
    error: str = ""


def _inputs(call: Call) -> list[InferInput]:
    params = json.dumps({"max_tokens": call.max_tokens, "ignore_eos": True}).encode()
    values: list[tuple[str, np.ndarray[Any, Any], str]] = [
        ("text_input", np.array([call.prompt.encode()], np.object_), "BYTES"),
        ("stream", np.array([True]), "BOOL"),
        ("sampling_parameters", np.array([params], np.object_), "BYTES"),
    ]
    out = []
    for name, value, dtype in values:
        t = InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        out.append(t)
    return out


class TritonZeroProxy:
    """Admission stub plus one tritonclient per replica endpoint; `close()` closes them all."""

    def __init__(self, admission: str, model: str = "llm-small", timeout: float = 20.0) -> None:
        self._channel = grpc.aio.insecure_channel(admission)
        self.stub = admission_pb2_grpc.AdmissionServiceStub(self._channel)
        self.model = model
        self.timeout = timeout
        self._triton: dict[str, InferenceServerClient] = {}
        self._ids = itertools.count()

    async def close(self) -> None:
        for client in self._triton.values():
            await client.close()
        self._triton.clear()
        await self._channel.close()

    def _client(self, endpoint: str) -> InferenceServerClient:
        client = self._triton.get(endpoint)
        if client is None:
            client = self._triton[endpoint] = InferenceServerClient(
                endpoint, channel_args=[("grpc.max_reconnect_backoff_ms", 200)]
            )
        return client

    async def stream(self, endpoint: str, model: str, call: Call) -> tuple[float, int]:
        """Stream one completion; (ms to the first response, tokens). Raises on errors."""
        request = {"model_name": model, "inputs": _inputs(call), "request_id": f"zp-{id(call)}"}

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        started = time.monotonic()
        ttft = 0.0
        responses = self._client(endpoint).stream_infer(requests(), stream_timeout=self.timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    raise error
                if not ttft:
                    ttft = (time.monotonic() - started) * 1000.0
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return ttft, call.max_tokens
        finally:
            responses.cancel()
        raise InferenceServerException("stream ended without a final response")

    async def direct(self, endpoint: str, call: Call) -> Result:
        """Stream `call` from the replica at `endpoint` (no admission involved)."""
        start = time.monotonic()
        try:
            await self.stream(endpoint, self.model, call)
        except (InferenceServerException, grpc.RpcError) as exc:
            return Result(start, endpoint, False, (time.monotonic() - start) * 1e3, error=str(exc))
        return Result(start, endpoint, True, (time.monotonic() - start) * 1000.0)

    async def admitted(self, call: Call) -> Result:
        """Admit, stream from the decision's replica, Release with outcome and timings."""
        start = time.monotonic()
        ctx = call.context(self.model, f"zp-{next(self._ids)}")
        d = (await self.stub.Admit(admission_pb2.AdmitRequest(context=ctx))).decision
        admitted_at = time.monotonic()
        result = Result(start, d.replica, False, 0.0, d.action, d.reason, admitted_at, d.ticket.id)
        if d.action != common_pb2.ACTION_SERVE:
            result.latency_ms = (admitted_at - start) * 1000.0
            result.error = f"not served: {d.reason}"
            return result
        outcome, ttft, tokens = admission_pb2.OUTCOME_OK, 0.0, 0
        try:
            ttft, tokens = await self.stream(d.endpoint, d.triton_model_name, call)
        except (InferenceServerException, grpc.RpcError) as exc:
            outcome, result.error = admission_pb2.OUTCOME_ERROR, str(exc)
        done = time.monotonic()
        result.ok = outcome == admission_pb2.OUTCOME_OK
        result.latency_ms = (done - start) * 1000.0
        release = admission_pb2.ReleaseRequest(
            ticket_id=d.ticket.id,
            outcome=outcome,
            ttft_ms=ttft,
            total_ms=(done - admitted_at) * 1000.0,
            usage=common_pb2.Usage(
                prompt_tokens=ctx.prompt_tokens, completion_tokens=tokens if result.ok else 0
            ),
        )
        result.released = (await self.stub.Release(release)).found
        result.outcome = outcome
        return result


async def run_load(
    calls: Sequence[Call], concurrency: int, send: Callable[[int, Call], Awaitable[Result]]
) -> list[Result]:
    """Send every call (`send(index, call)`) with `concurrency` workers; results in call order."""
    results: list[Result | None] = [None] * len(calls)
    feed = iter(enumerate(calls))

    async def worker() -> None:
        for i, call in feed:
            results[i] = await send(i, call)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
