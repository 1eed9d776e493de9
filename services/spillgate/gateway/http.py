"""The OpenAI-compatible HTTP API, served by uvicorn inside the gateway's own event loop.

Routes: `POST /v1/chat/completions` (`stream` true -> SSE chunks ending with `data: [DONE]`,
false -> one JSON object with `usage`), `GET /v1/models[/{model}]` (the `x-spillgate-region`
header or `?region=` names the region, default this gateway's, `*` = all), `GET /health`
(no auth; 503 when not serving). Errors use
OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with the status from
gateway/errors.py; 429 carries `Retry-After` (whole seconds, rounded up) and `retry-after-ms`.

Every chat response names where it ran and why in `x-spillgate-*` headers. Those are only
known after admission, so the first `ChatResponse` (or the `GatewayError`) is awaited before
the response starts: anything that fails before the first token is a proper 4xx/5xx. After
that, an error is sent as one `data: {"error": ...}` event followed by `data: [DONE]` (what
vLLM does; the official client raises `APIError` on the error event). A client that goes
away cancels `Gateway.chat`, which cancels the replica request and releases the ticket.

Every accepted socket gets TCP_NODELAY: streamed chunks are small writes on kept-alive
connections, exactly where Nagle + delayed ACK stall ~40 ms per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from typing import Any, TypeVar

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from spillgate._proto import gateway_pb2
from spillgate.core.decision import Priority
from spillgate.gateway.chat import ChatCall, Gateway
from spillgate.gateway.errors import GatewayError, as_gateway_error, invalid
from spillgate.gateway.service import Authenticate, GatewayServicer, route_metadata

T = TypeVar("T")
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP = 4
_UINT32 = 2**32 - 1
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FINISH = {
    gateway_pb2.FINISH_REASON_STOP: "stop",
    gateway_pb2.FINISH_REASON_LENGTH: "length",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


# --- transport: TCP_NODELAY and an embedded uvicorn ------------------------------------------


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY set on every accepted TCP socket.

    asyncio's selector loop happens to set it too; doing it here keeps the guarantee
    whatever loop implementation runs the gateway.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The gateway owns SIGINT/SIGTERM (app.py); uvicorn must not swap the handlers.
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; raises OSError (instead of uvicorn's sys.exit) when it can't."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=2048)


# --- errors ----------------------------------------------------------------------------------


def error_response(exc: GatewayError) -> JSONResponse:
    """OpenAI's error JSON with the status (and Retry-After / WWW-Authenticate) for `exc`."""
    status, _ = exc.http()
    headers: dict[str, str] = {}
    if status == 429 and exc.retry_after_ms > 0:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
        headers["retry-after-ms"] = str(exc.retry_after_ms)
    if status == 401:
        headers["www-authenticate"] = 'Bearer realm="spillgate"'
    return JSONResponse(_error_body(exc), status_code=status, headers=headers)


def _error_body(exc: GatewayError) -> dict[str, Any]:
    _, kind = exc.http()
    return {
        "error": {
            "message": exc.message,
            "type": kind,
            "param": exc.field or None,
            "code": exc.code.name.lower(),
        }
    }


# --- request parsing -------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: Request) -> dict[str, Any]:
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT, f"body: larger than {MAX_BODY_BYTES} bytes"
            )
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except ValueError:
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT, "body: invalid JSON", field="body"
        ) from None
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    return body


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, "must be a number")
    return float(value)


def _max_tokens(body: Mapping[str, Any]) -> int:
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    value = body.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, "must be an integer")
    if not 1 <= value <= _UINT32:
        raise invalid(name, "must be a positive integer")
    return value


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise invalid(f"{where}[{j}]", "only {type: text, text: string} parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}[{j}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)  # how vLLM joins text parts


def _messages(value: Any) -> list[gateway_pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid(f"messages[{i}].role", "must be a string")
        content = _content(m.get("content"), f"messages[{i}].content")
        out.append(gateway_pb2.ChatMessage(role=role, content=content))
    return out


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop sequences")
    return [s for s in stops if s]


def _header_priority(value: str) -> int:
    try:
        return int(Priority[value.strip().upper()])
    except KeyError:
        names = ", ".join(p.name.lower() for p in Priority)
        raise invalid("x-spillgate-priority", f"must be one of {names}") from None


def _header_bool(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise invalid(name, "must be true or false")


def _header_uint(name: str, value: str) -> int:
    text = value.strip()
    if not text.isdigit() or not 1 <= int(text) <= _UINT32:
        raise invalid(name, "must be a positive integer")
    return int(text)


def parse_chat(
    body: Mapping[str, Any], headers: Mapping[str, str]
) -> tuple[gateway_pb2.ChatRequest, bool, bool]:
    """`(request, stream, include_usage)` from an OpenAI chat body and spillgate headers.

    Raises GatewayError(INVALID_ARGUMENT) naming the bad field; limits that depend on the
    model (max_tokens, context) are checked by `Gateway.chat`.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "must be a non-empty string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", "must be a boolean")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict):
            raise invalid("stream_options", "must be an object")
        usage = options.get("include_usage", False)
        if not isinstance(usage, bool):
            raise invalid("stream_options.include_usage", "must be a boolean")
        include_usage = usage
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise invalid("n", "only n=1 is supported")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "must be a string")
    request = gateway_pb2.ChatRequest(
        model=model,
        messages=_messages(body.get("messages")),
        max_tokens=_max_tokens(body),
        stop=_stop(body.get("stop")),
        session_id=headers.get("x-session-id") or user or "",
        residency_zone=headers.get("x-spillgate-residency-zone", ""),
        cache_salt=headers.get("x-spillgate-cache-salt", ""),
    )
    temperature = _number(body, "temperature")
    if temperature is not None:
        request.temperature = temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        request.top_p = top_p
    if "x-spillgate-priority" in headers:
        request.priority = _header_priority(headers["x-spillgate-priority"])  # type: ignore[assignment]
    if "x-spillgate-allow-degrade" in headers:
        request.allow_degrade = _header_bool(
            "x-spillgate-allow-degrade", headers["x-spillgate-allow-degrade"]
        )
    if "x-spillgate-budget-ms" in headers:
        request.budget_ms = _header_uint("x-spillgate-budget-ms", headers["x-spillgate-budget-ms"])
    return request, bool(stream), include_usage


# --- response shapes -------------------------------------------------------------------------


def _usage(usage: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _ChunkWriter:
    """Builds the `chat.completion.chunk` SSE events of one response."""

    def __init__(self, id: str, created: int, model: str, include_usage: bool) -> None:
        self._base = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload: dict[str, Any] = {**self._base, "choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        return _sse(payload)

    def usage(self, usage: Any) -> bytes:
        return _sse({**self._base, "choices": [], "usage": _usage(usage)})


# --- disconnects -----------------------------------------------------------------------------


class _ClientGone(Exception):
    pass


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """`await work`, cancelling it (and raising _ClientGone) if the client disconnects.

    Used before the response starts: uvicorn tells the app about a lost connection only
    through `receive`, which nothing else reads while the body is already consumed.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its event generator, so a disconnect (which
    may cancel the stream between chunks) still reaches `Gateway.chat` at once."""

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


# --- the server ------------------------------------------------------------------------------


class HttpServer:
    """OpenAI-compatible HTTP for one gateway, run as a task in the current event loop."""

    def __init__(
        self,
        gateway: Gateway,
        authenticate: Authenticate,
        servicer: GatewayServicer,
        *,
        wall_clock: Callable[[], float] = time.time,
        graceful_shutdown_s: int = 2,
    ) -> None:
        self._gateway = gateway
        self._authenticate = authenticate
        self._servicer = servicer
        self._wall_clock = wall_clock
        self._graceful_shutdown_s = graceful_shutdown_s
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._model, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )
        self.server: uvicorn.Server | None = None  # exposed for inspection (tests)
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (0 = any free port); returns the bound "host:port"."""
        sock = _bind(host, port)
        config = uvicorn.Config(
            self.app,
            http=NoDelayH11Protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=self._graceful_shutdown_s,
        )
        server = _EmbeddedServer(config)
        self.server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="spillgate-http")
        while not server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"HTTP server on {host}:{port} stopped during start")
            await asyncio.sleep(0.005)
        bound = server.servers[0].sockets[0].getsockname()
        return f"{host}:{bound[1]}"

    async def stop(self) -> None:
        """Stop accepting, let in-flight responses finish (bounded), then return."""
        if self.server is None or self._task is None:
            return
        self.server.should_exit = True
        await self._task

    # -- handlers -----------------------------------------------------------------------------

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = grpc.StatusCode.NOT_FOUND if exc.status_code == 404 else grpc.StatusCode.UNKNOWN
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "not_found_error" if exc.status_code == 404 else "invalid_request_error",
                "param": None,
                "code": code.name.lower(),
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    def _headers(self, request: Request) -> dict[str, str]:
        return {k.lower(): v for k, v in request.headers.items()}

    async def _chat(self, request: Request) -> Response:
        stream: AsyncIterator[gateway_pb2.ChatResponse] | None = None
        try:
            headers = self._headers(request)
            caller = self._authenticate(headers, "chat")
            body = await _json_body(request)
            chat_request, streaming, include_usage = parse_chat(body, headers)
            request_id = headers.get("x-request-id", "")
            forward = tuple((k, headers[k]) for k in ("authorization", "x-api-key") if k in headers)
            call = ChatCall(
                request=chat_request,
                caller=caller,
                request_id=request_id if _REQUEST_ID.fullmatch(request_id) else "",
                forward_metadata=forward,
            )
            stream = self._gateway.chat(call)
            first = await _unless_disconnected(request.receive, anext(stream))
        except _ClientGone:
            return Response(status_code=499)
        except StopAsyncIteration:
            return error_response(as_gateway_error(RuntimeError("chat ended without a message")))
        except Exception as exc:
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]
            return error_response(as_gateway_error(exc))
        created = int(self._wall_clock())
        response_id = f"chatcmpl-{first.request_id}"
        out_headers = {**dict(route_metadata(first.route)), "x-request-id": first.request_id}
        if streaming:
            writer = _ChunkWriter(response_id, created, chat_request.model, include_usage)
            events = self._events(first, stream, writer)
            return _EventStream(events, {**out_headers, **_SSE_HEADERS})
        try:
            return await _unless_disconnected(
                request.receive,
                self._complete(first, stream, response_id, created, chat_request.model),
            )
        except _ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            return error_response(as_gateway_error(exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _complete(
        self,
        first: gateway_pb2.ChatResponse,
        stream: AsyncIterator[gateway_pb2.ChatResponse],
        response_id: str,
        created: int,
        model: str,
    ) -> Response:
        texts = [first.delta]
        last = first
        async for response in stream:
            texts.append(response.delta)
            last = response
        route = last.route if last.HasField("route") else first.route
        body = {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(texts)},
                    "logprobs": None,
                    "finish_reason": _FINISH.get(last.finish_reason, "stop"),
                }
            ],
            "usage": _usage(last.usage),
        }
        headers = {**dict(route_metadata(route)), "x-request-id": first.request_id}
        return JSONResponse(body, headers=headers)

    async def _events(
        self,
        first: gateway_pb2.ChatResponse,
        stream: AsyncIterator[gateway_pb2.ChatResponse],
        writer: _ChunkWriter,
    ) -> AsyncIterator[bytes]:
        try:
            yield writer.chunk({"role": "assistant", "content": ""})
            response = first
            while True:
                if response.delta:
                    yield writer.chunk({"content": response.delta})
                if response.finish_reason:
                    yield writer.chunk({}, _FINISH.get(response.finish_reason, "stop"))
                    if writer.include_usage:
                        yield writer.usage(response.usage)
                try:
                    response = await anext(stream)
                except StopAsyncIteration:
                    break
        except Exception as exc:  # after the first token: report in-band, then end
            yield _sse(_error_body(as_gateway_error(exc)))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        yield b"data: [DONE]\n\n"

    async def _models(self, request: Request) -> Response:
        try:
            headers = self._headers(request)
            self._authenticate(headers, "models")
            # As gRPC ListModels: this gateway's region by default, "*" for all regions.
            region = headers.get("x-spillgate-region") or request.query_params.get("region", "")
            listings = self._gateway.catalog.listings(region or self._gateway.region)
            return JSONResponse({"object": "list", "data": [_model(m) for m in listings]})
        except Exception as exc:
            return error_response(as_gateway_error(exc))

    async def _model(self, request: Request) -> Response:
        try:
            self._authenticate(self._headers(request), "models")
            name = request.path_params["model"]
            for m in self._gateway.catalog.listings():
                if m.model == name:
                    return JSONResponse(_model(m))
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"unknown model or alias {name!r}")
        except Exception as exc:
            return error_response(as_gateway_error(exc))

    async def _health(self, request: Request) -> Response:
        # The servicer's Health reads no request context; one answer for gRPC and HTTP.
        health = self._servicer.health()
        body = {
            "region": health.region,
            "serving": health.serving,
            "admission_reachable": health.admission_reachable,
            "registry_reachable": health.registry_reachable,
            "registry_revision": health.registry_revision,
            "registry_age_ms": health.registry_age_ms,
            "ready_replicas": health.ready_replicas,
        }
        return JSONResponse(body, status_code=200 if health.serving else 503)


def _model(m: gateway_pb2.ModelListing) -> dict[str, Any]:
    """An OpenAI model object, with spillgate's facts as extra fields."""
    return {
        "id": m.model,
        "object": "model",
        "created": 0,
        "owned_by": "spillgate",
        "alias": m.alias,
        "versions": list(m.versions),
        "regions": list(m.regions),
        "max_context_tokens": m.max_context_tokens,
        "max_output_tokens": m.max_output_tokens,
    }
