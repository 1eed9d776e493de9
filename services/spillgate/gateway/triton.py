"""Triton passthrough: the gateway also serves `inference.GRPCInferenceService`.

Stock `tritonclient` code pointed at a gateway gets routed. Model names are what the
registry knows: a model id, an alias or "model@version" (a request's `model_version`, when
set on a plain name, means "name@version").

- ServerLive / ServerReady / ServerMetadata: answered by the gateway; ready = it holds a
  registry snapshot and admission was reachable on the last Admit (or not asked yet).
- ModelReady / ModelMetadata / ModelConfig: the name resolves (catalog) to a version a ready
  replica of this region has loaded; the call goes to that replica under the version's
  Triton name, and the answer comes back under the name the client asked for. Unknown
  names are NOT_FOUND with Triton's text; known names without a ready replica here are
  not ready (UNAVAILABLE for metadata/config).
- ModelStatistics: summed over this region's ready replicas serving the name (all Triton
  models of those replicas, under their Triton names, when no name is given).
- ModelInfer / ModelStreamInfer: every request is authenticated (scope "chat") and admitted:
  SERVE/DEGRADE forward it to the chosen replica (name and version rewritten, responses
  rewritten back; DEGRADE caps `max_tokens` in `sampling_parameters`), OVERFLOW forwards it
  to the neighbour gateway's passthrough with hops + 1, SHED answers RESOURCE_EXHAUSTED
  with RetryInfo. Every admitted slot is released with timings and token counts; a client
  that goes away cancels the replica request. On the stream, a request's errors travel
  in-band as `error_message` (as Triton does) and the stream goes on; requests run
  concurrently, each request's responses stay in order.
- Routing attributes come from request parameters (`spillgate_priority`,
  `spillgate_session_id`, `spillgate_residency_zone`, `spillgate_allow_degrade`), else from
  gRPC metadata (`x-spillgate-priority`, `x-session-id`, `x-spillgate-residency-zone`,
  `x-spillgate-allow-degrade`). `spillgate_*` parameters are not passed to replicas.
- LLM requests: prompt = the `text_input` BYTES tensor, tokens and prefix block hashes as
  chat.py computes them (cache_salt from `sampling_parameters`), max_tokens from
  `sampling_parameters` (vLLM's default 16 when absent). Unary ModelInfer on an LLM
  (decoupled on the replica) is served over a replica stream and needs `stream` false.
  Other models: prompt_tokens = the number of input elements, max_tokens = 1.
- RepositoryIndex lists this region's model versions and aliases (scope "models");
  RepositoryModelLoad/Unload need scope "admin" and go to every ready replica here.
Statuses come from gateway/errors.py; replica error texts (Triton's, about the request)
pass through with the Triton model name replaced by the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

import spillgate
from spillgate._proto import admission_pb2, common_pb2
from spillgate.core.decision import Priority
from spillgate.core.prefix import block_hashes, tokenize
from spillgate.gateway.auth import Scope
from spillgate.gateway.chat import BLOCK_SIZE, HOPS_KEY, ORIGIN_KEY, Gateway
from spillgate.gateway.errors import GatewayError, as_gateway_error, invalid, shed
from spillgate.gateway.service import Authenticate
from spillgate.registry.store import ALIAS, MODEL, VERSION

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

VLLM_DEFAULT_MAX_TOKENS = 16  # vLLM's SamplingParams default, what the replica generates
_PARAM_PREFIX = "spillgate_"
# routing attribute -> gRPC metadata key used when the request parameter is absent
_METADATA = {
    "priority": "x-spillgate-priority",
    "session_id": "x-session-id",
    "residency_zone": "x-spillgate-residency-zone",
    "allow_degrade": "x-spillgate-allow-degrade",
}
_FORWARD_KEYS = ("authorization", "x-api-key", *_METADATA.values())
# Replica statuses whose (Triton) text is about the request and reaches the client.
_REQUEST_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def add_triton_passthrough(
    server: grpc.aio.Server, gateway: Gateway, authenticate: Authenticate
) -> str:
    """Serve Triton's inference service on `server`; returns its full name (reflection)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        TritonPassthrough(gateway, authenticate), server
    )
    return SERVICE_NAME


def unknown_model(name: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found"
    )


# -- tensors ---------------------------------------------------------------------------------


def _input(msg: pb.ModelInferRequest, name: str) -> int | None:
    return next((i for i, t in enumerate(msg.inputs) if t.name == name), None)


def _bytes_input(msg: pb.ModelInferRequest, name: str) -> list[bytes] | None:
    """Elements of a BYTES input (raw: 4-byte little-endian length + bytes, each)."""
    i = _input(msg, name)
    if i is None:
        return None
    if not msg.raw_input_contents:
        return list(msg.inputs[i].contents.bytes_contents)
    if i >= len(msg.raw_input_contents):
        raise invalid(name, "missing raw input contents")
    raw, out, pos = msg.raw_input_contents[i], [], 0
    while pos + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def _set_bytes_input(msg: pb.ModelInferRequest, name: str, value: bytes) -> None:
    i = _input(msg, name)
    assert i is not None
    if msg.raw_input_contents:
        msg.raw_input_contents[i] = struct.pack("<I", len(value)) + value
    else:
        del msg.inputs[i].contents.bytes_contents[:]
        msg.inputs[i].contents.bytes_contents.append(value)


def _bool_input(msg: pb.ModelInferRequest, name: str) -> bool:
    i = _input(msg, name)
    if i is None:
        return False
    if msg.raw_input_contents:
        raw = msg.raw_input_contents[i] if i < len(msg.raw_input_contents) else b""
        return bool(raw[:1] not in (b"", b"\x00"))
    return bool(msg.inputs[i].contents.bool_contents[:1] == [True])


def _elements(msg: pb.ModelInferRequest) -> int:
    return sum(math.prod(max(d, 1) for d in t.shape) for t in msg.inputs)


def _output(resp: pb.ModelInferResponse, name: str) -> tuple[str, bytes] | None:
    for i, t in enumerate(resp.outputs):
        if t.name == name and i < len(resp.raw_output_contents):
            return t.datatype, resp.raw_output_contents[i]
    return None


def _output_tokens(resp: pb.ModelInferResponse) -> int:
    """Tokens this response generated: num_output_tokens when present, else its text."""
    found = _output(resp, "num_output_tokens")
    if found is not None and found[0] == "UINT32":
        return int(np.frombuffer(found[1], dtype="<u4").sum())
    text = _output(resp, "text_output")
    if text is None:
        return 0
    raw, words, pos = text[1], 0, 0
    while pos + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        words += len(tokenize(raw[pos + 4 : pos + 4 + n].decode(errors="replace")))
        pos += 4 + n
    return words


def _final(resp: pb.ModelInferResponse) -> bool:
    p = resp.parameters.get("triton_final_response")
    return p is not None and p.bool_param


# -- routing attributes ----------------------------------------------------------------------


def _attribute(msg: pb.ModelInferRequest, metadata: Mapping[str, str], key: str) -> str:
    param = msg.parameters.get(_PARAM_PREFIX + key)
    if param is not None:
        which = param.WhichOneof("parameter_choice")
        return str(getattr(param, which)) if which else ""
    return metadata.get(_METADATA[key], "")


def _priority(value: str) -> int:
    if not value:
        return 0
    name = value.strip().upper().removeprefix("PRIORITY_")
    if name in Priority.__members__:
        return int(Priority[name])
    if value.isdigit() and int(value) in (0, *iter(Priority)):
        return int(value)
    raise invalid("priority", f"unknown priority {value!r} (critical, high, normal, low, batch)")


def _sampling(msg: pb.ModelInferRequest) -> dict[str, Any]:
    values = _bytes_input(msg, "sampling_parameters")
    if not values:
        return {}
    try:
        params = json.loads(values[0].decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        params = None
    if not isinstance(params, dict):
        raise invalid("sampling_parameters", "must be a JSON object")
    return params


class TritonPassthrough(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's inference service in front of this region's replicas (see module doc)."""

    def __init__(self, gateway: Gateway, authenticate: Authenticate) -> None:
        self.gateway = gateway
        self._authenticate = authenticate

    # -- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _metadata(context: Context) -> dict[str, str]:
        return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}

    def _deadline(self, context: Context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _abort(self, context: Context, exc: BaseException) -> None:
        error = as_gateway_error(exc).rpc_error()
        await context.abort(error.code, error.message, error.trailing_metadata())

    def _replica_error(self, exc: grpc.aio.AioRpcError, triton_name: str, name: str) -> Exception:
        code = exc.code()
        if code in _REQUEST_CODES:
            text = (exc.details() or code.name).replace(f"'{triton_name}'", f"'{name}'")
            return GatewayError(code, text)
        return as_gateway_error(exc)

    def _resolve(self, name: str, version: str = "") -> tuple[list[str], list[str]]:
        """(this region's ready endpoints serving `name`, [triton name, triton version]).

        NOT_FOUND when the registry doesn't know the name; no endpoints when no ready
        replica here has a version of it loaded."""
        state = self.gateway.catalog.state
        if version and "@" not in name:
            name = f"{name}@{version}"
        refs: list[tuple[str, str]]
        if "@" in name:
            model_id, _, label = name.partition("@")
            refs = [(model_id, label)] if (VERSION, name) in state else []
        elif (MODEL, name) in state:
            refs = [
                (e.version.model, e.version.version)
                for (kind, _), e in sorted(state.items())
                if kind == VERSION and e.version.model == name
            ]
        elif (ALIAS, name) in state:
            alias = state[(ALIAS, name)].alias
            targets = alias.region_targets.get(self.gateway.region) or alias.default_targets
            by_weight = sorted(targets.targets, key=lambda t: -t.weight)
            refs = [(t.model, t.version) for t in by_weight]
        else:
            refs = []
        if not refs:
            raise unknown_model(name)
        for model, ver in refs:
            endpoints = [
                r.endpoint
                for r in self.gateway.catalog.ready_replicas(self.gateway.region)
                if any(v.model == model and v.version == ver for v in r.loaded)
            ]
            entity = state.get((VERSION, f"{model}@{ver}"))
            if endpoints and entity is not None:
                v = entity.version
                return endpoints, [v.triton_model_name or model, v.triton_model_version]
        return [], ["", ""]

    async def _one_replica(
        self, request: Any, context: Context, name: str, version: str
    ) -> tuple[pb_grpc.GRPCInferenceServiceStub, str, str]:
        self._authenticate(self._metadata(context), Scope.MODELS)
        endpoints, (triton_name, triton_version) = self._resolve(name, version)
        if not endpoints:
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE,
                f"model '{name}' has no ready replica in region {self.gateway.region}",
            )
        return self.gateway.replicas.stub(endpoints[0]), triton_name, triton_version

    # -- server and model health, metadata, config, statistics ------------------------------

    async def ServerLive(self, request: Any, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> pb.ServerReadyResponse:
        ready = bool(self.gateway.catalog.state) and self.gateway.admission_ok is not False
        return pb.ServerReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="spillgate",
            version=spillgate.__version__,
            extensions=["model_repository", "model_configuration", "parameters", "statistics"],
        )

    async def ModelReady(self, request: Any, context: Context) -> pb.ModelReadyResponse:
        try:
            self._authenticate(self._metadata(context), Scope.MODELS)
            try:
                endpoints, names = self._resolve(request.name, request.version)
            except GatewayError:
                endpoints = []  # Triton answers not-ready (not NOT_FOUND) for unknown names
            if not endpoints:
                return pb.ModelReadyResponse(ready=False)
            forwarded = pb.ModelReadyRequest(name=names[0], version=names[1])
            try:
                stub = self.gateway.replicas.stub(endpoints[0])
                response: pb.ModelReadyResponse = await stub.ModelReady(
                    forwarded, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError:
                return pb.ModelReadyResponse(ready=False)
            return response
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def _forward_named(
        self, request: Any, context: Context, method: str, message: type[Any]
    ) -> Any:
        """Ask one ready replica for `method` about the routed model, under its Triton name;
        the caller puts the client's name back into the answer."""
        stub, triton_name, triton_version = await self._one_replica(
            request, context, request.name, request.version
        )
        forwarded = message(name=triton_name, version=triton_version)
        try:
            return await getattr(stub, method)(forwarded, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            raise self._replica_error(exc, triton_name, request.name) from None

    async def ModelMetadata(self, request: Any, context: Context) -> pb.ModelMetadataResponse:
        try:
            response: pb.ModelMetadataResponse = await self._forward_named(
                request, context, "ModelMetadata", pb.ModelMetadataRequest
            )
            response.name = request.name
            return response
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def ModelConfig(self, request: Any, context: Context) -> pb.ModelConfigResponse:
        try:
            response: pb.ModelConfigResponse = await self._forward_named(
                request, context, "ModelConfig", pb.ModelConfigRequest
            )
            response.config.name = request.name
            return response
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def ModelStatistics(self, request: Any, context: Context) -> pb.ModelStatisticsResponse:
        """Statistics summed over this region's ready replicas; without a name, per Triton
        model name."""
        try:
            self._authenticate(self._metadata(context), Scope.MODELS)
            if request.name:
                endpoints, (name, version) = self._resolve(request.name, request.version)
            else:
                replicas = self.gateway.catalog.ready_replicas(self.gateway.region)
                endpoints, name, version = [r.endpoint for r in replicas], "", ""
            forwarded = pb.ModelStatisticsRequest(name=name, version=version)
            totals: dict[tuple[str, str], Any] = {}
            for endpoint in endpoints:
                try:
                    stats = await self.gateway.replicas.stub(endpoint).ModelStatistics(
                        forwarded, timeout=context.time_remaining()
                    )
                except grpc.aio.AioRpcError as exc:
                    log.warning("statistics from %s failed: %s", endpoint, exc.code().name)
                    continue
                for s in stats.model_stats:
                    _add_stats(totals, s, request.name)
            return pb.ModelStatisticsResponse(model_stats=[totals[k] for k in sorted(totals)])
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    # -- repository --------------------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Context) -> pb.RepositoryIndexResponse:
        """This region's model versions (by model id) and aliases, READY when served here."""
        try:
            self._authenticate(self._metadata(context), Scope.MODELS)
            state = self.gateway.catalog.state
            loaded = {
                (v.model, v.version)
                for r in self.gateway.catalog.ready_replicas(self.gateway.region)
                for v in r.loaded
            }
            response = pb.RepositoryIndexResponse()
            for (kind, key), e in sorted(state.items()):
                if kind == VERSION:
                    name, version = e.version.model, e.version.version
                    ready = (name, version) in loaded
                elif kind == ALIAS:
                    name, version = key, ""
                    ready = bool(self._resolve(key)[0])
                else:
                    continue
                if request.ready and not ready:
                    continue
                reason = "" if ready else f"no ready replica in region {self.gateway.region}"
                response.models.add(
                    name=name,
                    version=version,
                    state="READY" if ready else "UNAVAILABLE",
                    reason=reason,
                )
            return response
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def _repository(self, request: Any, context: Context, load: bool) -> None:
        self._authenticate(self._metadata(context), Scope.ADMIN)
        forwarded = type(request)()
        forwarded.CopyFrom(request)
        name = request.model_name
        triton_name = name
        try:
            _, names = self._resolve(name)
            triton_name = names[0] if names else name
        except GatewayError:
            pass  # not in the registry: a Triton model name the admin loads by hand
        forwarded.model_name = triton_name
        replicas = self.gateway.catalog.ready_replicas(self.gateway.region)
        if not replicas:
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE, f"no ready replica in region {self.gateway.region}"
            )
        for replica in replicas:
            stub = self.gateway.replicas.stub(replica.endpoint)
            call = stub.RepositoryModelLoad if load else stub.RepositoryModelUnload
            try:
                await call(forwarded, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                raise self._replica_error(exc, triton_name, name) from None

    async def RepositoryModelLoad(
        self, request: Any, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        """Admin: load on every ready replica of this region."""
        try:
            await self._repository(request, context, True)
            return pb.RepositoryModelLoadResponse()
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def RepositoryModelUnload(
        self, request: Any, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        """Admin: unload from every ready replica of this region."""
        try:
            await self._repository(request, context, False)
            return pb.RepositoryModelUnloadResponse()
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    # -- inference ---------------------------------------------------------------------------

    def _context(
        self, msg: pb.ModelInferRequest, metadata: Mapping[str, str]
    ) -> tuple[common_pb2.RequestContext, bool]:
        """The routing context and whether the model is an LLM (text_input contract)."""
        caller = self._authenticate(metadata, Scope.CHAT)
        if not msg.model_name:
            raise invalid("model_name", "required")
        name = msg.model_name
        if msg.model_version and "@" not in name:
            name = f"{name}@{msg.model_version}"
        try:
            limits = self.gateway.catalog.limits(name)
        except GatewayError:
            raise unknown_model(name) from None
        try:
            hops = int(metadata.get(HOPS_KEY, "0"))
        except ValueError:
            raise invalid(HOPS_KEY, "must be an integer") from None
        texts = _bytes_input(msg, "text_input")
        salt = ""
        if texts is not None:
            if len(texts) != 1:
                raise invalid("text_input", "exactly one prompt is required")
            sampling = _sampling(msg)
            salt = str(sampling.get("cache_salt", ""))
            max_tokens = sampling.get("max_tokens", VLLM_DEFAULT_MAX_TOKENS)
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
                raise invalid("max_tokens", "must be a positive integer")
            if max_tokens > limits.max_output_tokens:
                raise invalid(
                    "max_tokens",
                    f"{max_tokens} is above {name}'s limit of {limits.max_output_tokens}",
                )
            tokens = tokenize(texts[0].decode(errors="replace"))
            prompt_tokens, hashes = len(tokens), block_hashes(tokens, BLOCK_SIZE, salt)
        else:
            # No prompt to count: the request's size stands in for its cost.
            prompt_tokens, hashes, max_tokens = min(_elements(msg), 2**31), (), 1
        if texts is not None:  # an LLM request: spend the tenant's token budget
            self.gateway.charge_tokens(caller, prompt_tokens + max_tokens)
        priority = _priority(_attribute(msg, metadata, "priority")) or Priority.NORMAL
        context = common_pb2.RequestContext(
            request_id=msg.id or metadata.get("x-request-id", "") or uuid.uuid4().hex,
            tenant=caller.tenant,
            priority=max(priority, caller.priority_ceiling),  # type: ignore[arg-type]
            session_id=_attribute(msg, metadata, "session_id"),
            model=name,
            prompt_tokens=prompt_tokens,
            prefix_block_hashes=hashes,
            block_size_tokens=BLOCK_SIZE,
            cache_salt=salt,
            max_tokens=max_tokens,
            residency_zone=_attribute(msg, metadata, "residency_zone"),
            allow_degrade=_attribute(msg, metadata, "allow_degrade").lower() in ("true", "1"),
            hops=hops,
            origin_region=metadata.get(ORIGIN_KEY, "") or self.gateway.region,
        )
        return context, texts is not None

    async def _route(
        self,
        msg: pb.ModelInferRequest,
        metadata: Mapping[str, str],
        deadline: float | None,
        unary: bool,
    ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        """Admit one request and stream its responses (in-band errors from the far side
        included); raises GatewayError for errors of its own."""
        context, llm = self._context(msg, metadata)
        if unary and llm and _bool_input(msg, "stream"):
            raise invalid("stream", "ModelInfer returns one response: use ModelStreamInfer")
        decision = await self.gateway.admit(context, deadline)
        if decision.action == common_pb2.ACTION_SHED:
            raise shed(context.model, decision.reason, decision.retry_after_ms)
        if decision.action == common_pb2.ACTION_OVERFLOW:
            stream = self._overflow(msg, metadata, context, decision, deadline, unary)
        else:
            stream = self._serve(msg, context, decision, deadline, unary and not llm, llm)
        async for response in stream:
            yield response

    async def _serve(
        self,
        msg: pb.ModelInferRequest,
        context: common_pb2.RequestContext,
        decision: common_pb2.Decision,
        deadline: float | None,
        unary: bool,
        llm: bool,
    ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        forwarded = pb.ModelInferRequest()
        forwarded.CopyFrom(msg)
        forwarded.model_name = decision.triton_model_name
        forwarded.model_version = decision.triton_model_version
        forwarded.id = msg.id or context.request_id
        for key in [k for k in forwarded.parameters if k.startswith(_PARAM_PREFIX)]:
            del forwarded.parameters[key]
        if llm and decision.degrade.max_tokens and context.max_tokens > decision.degrade.max_tokens:
            sampling = {**_sampling(msg), "max_tokens": decision.degrade.max_tokens}
            if _input(forwarded, "sampling_parameters") is None:
                forwarded.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
                if forwarded.raw_input_contents:
                    forwarded.raw_input_contents.append(b"")
            _set_bytes_input(forwarded, "sampling_parameters", json.dumps(sampling).encode())
        stub = self.gateway.replicas.stub(decision.endpoint)
        start = time.monotonic()
        ttft_ms = 0.0
        outcome: Any = admission_pb2.OUTCOME_ERROR
        usage = common_pb2.Usage(prompt_tokens=context.prompt_tokens)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        call: Any = (
            stub.ModelInfer(forwarded, timeout=timeout)
            if unary
            else stub.ModelStreamInfer(iter([forwarded]), timeout=timeout)
        )
        try:
            async for item in _items(call, unary):
                if item.error_message:
                    item.error_message = item.error_message.replace(
                        f"'{decision.triton_model_name}'", f"'{context.model}'"
                    )
                    yield item
                    return
                r = item.infer_response
                if not ttft_ms:
                    ttft_ms = (time.monotonic() - start) * 1000
                usage.completion_tokens += _output_tokens(r)
                r.model_name, r.model_version = msg.model_name, msg.model_version
                if unary or _final(r) or not llm:
                    outcome = admission_pb2.OUTCOME_OK
                yield item
        except grpc.aio.AioRpcError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                outcome = admission_pb2.OUTCOME_TIMEOUT
            raise self._replica_error(exc, decision.triton_model_name, context.model) from None
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != admission_pb2.OUTCOME_OK:  # closed after the final response: it ran
                outcome = admission_pb2.OUTCOME_CANCELLED
            raise
        finally:
            call.cancel()
            if decision.ticket.id:
                total_ms = (time.monotonic() - start) * 1000
                self.gateway.release(decision.ticket.id, outcome, ttft_ms, total_ms, usage)

    async def _overflow(
        self,
        msg: pb.ModelInferRequest,
        metadata: Mapping[str, str],
        context: common_pb2.RequestContext,
        decision: common_pb2.Decision,
        deadline: float | None,
        unary: bool,
    ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        """Forward to the neighbour gateway's passthrough; it admits but never overflows."""
        if not decision.endpoint:
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE, f"region {decision.region} has no gateway endpoint"
            )
        forward = (
            (HOPS_KEY, str(context.hops + 1)),
            (ORIGIN_KEY, context.origin_region),
            ("x-request-id", context.request_id),
            *((k, metadata[k]) for k in _FORWARD_KEYS if k in metadata),
        )
        stub = self.gateway.replicas.stub(decision.endpoint)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        call: Any = (
            stub.ModelInfer(msg, timeout=timeout, metadata=forward)
            if unary
            else stub.ModelStreamInfer(iter([msg]), timeout=timeout, metadata=forward)
        )
        try:
            async for item in _items(call, unary):
                yield item
        except grpc.aio.AioRpcError as exc:
            raise as_gateway_error(exc) from None
        finally:
            call.cancel()

    async def ModelInfer(self, request: Any, context: Context) -> pb.ModelInferResponse:
        """One request, one response (an LLM's single `stream`=false response)."""
        try:
            metadata = self._metadata(context)
            result: pb.ModelInferResponse | None = None
            route = self._route(request, metadata, self._deadline(context), True)
            async with contextlib.aclosing(route):  # releases the slot before we answer
                async for item in route:
                    if item.error_message:
                        # The replica reported it in-band (LLMs are served over a stream).
                        raise GatewayError(grpc.StatusCode.INTERNAL, item.error_message)
                    if item.infer_response.outputs or result is None:
                        result = item.infer_response
            if result is None:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the replica sent no response")
            if "triton_final_response" in result.parameters:
                del result.parameters["triton_final_response"]
            return result
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        """Each request is routed on its own; its errors go in-band, the stream goes on."""
        metadata = self._metadata(context)
        deadline = self._deadline(context)
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(msg: pb.ModelInferRequest) -> None:
            route = self._route(msg, metadata, deadline, False)
            try:
                async with contextlib.aclosing(route):
                    async for item in route:
                        out.put_nowait(item)
            except Exception as exc:
                error = pb.ModelStreamInferResponse(error_message=as_gateway_error(exc).message)
                error.infer_response.id = msg.id
                error.infer_response.model_name = msg.model_name
                out.put_nowait(error)

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    task = asyncio.ensure_future(one(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                out.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await out.get()) is not None:
                yield item
            await reader  # surfaces an unreadable request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # -- shared memory: nothing a remote gateway can map -------------------------------------

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "shared memory is not supported through a gateway"
        )

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "shared memory is not supported through a gateway"
        )


async def _items(call: Any, unary: bool) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
    """A forwarded call's responses as stream messages (a unary call gives one)."""
    if unary:
        yield pb.ModelStreamInferResponse(infer_response=await call)
        return
    async for item in call:
        yield item


_STAT_FIELDS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


def _add_stats(totals: dict[tuple[str, str], Any], s: Any, name: str) -> None:
    """Add one replica's statistics (reported as `name` when the client named a model)."""
    key = (name or s.name, s.version)
    if key not in totals:
        totals[key] = pb.ModelStatistics(name=key[0], version=s.version)
    t = totals[key]
    t.last_inference = max(t.last_inference, s.last_inference)
    t.inference_count += s.inference_count
    t.execution_count += s.execution_count
    for name in _STAT_FIELDS:
        a, b = getattr(t.inference_stats, name), getattr(s.inference_stats, name)
        a.count += b.count
        a.ns += b.ns
