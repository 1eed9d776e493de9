"""The replica's HTTP port (Triton's 8002): Prometheus `/metrics` and the fault admin API.

GET  /metrics   Triton-core and vLLM-style metrics (Prometheus text format)
GET  /faults    current fault settings (JSON)
GET  /executions  executions per request id, and ids executed more than once (JSON)
POST /faults    JSON partial update, e.g. {"error_rate": 0.2} or {"stall": true};
                {"crash": true} makes the process exit at once (exit code 70)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from prometheus_client import CollectorRegistry

from spillgate.replica.executions import Executions
from spillgate.replica.faults import Faults
from spillgate.replica.metrics import render

CRASH_EXIT_CODE = 70
_MAX_BODY = 64 * 1024

Handler = Callable[[str, str, bytes], Awaitable[tuple[int, str, bytes]]]


def _reply(status: int, ctype: str, body: bytes) -> bytes:
    reason = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        413: "Payload Too Large",
    }.get(status, "OK")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


class AdminHTTP:
    """Minimal HTTP/1.1 server (keep-alive, Content-Length bodies) for metrics and faults."""

    def __init__(
        self,
        registry: CollectorRegistry,
        faults: Faults,
        on_slow: Callable[[float], None],
        exit_fn: Callable[[int], None] = os._exit,
        executions: Executions | None = None,
    ) -> None:
        self._registry = registry
        self._faults = faults
        self._on_slow = on_slow
        self._exit = exit_fn
        self._executions = executions or Executions()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._conn, host, port)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            if method != "GET":
                return 405, "text/plain", b"use GET\n"
            return 200, "text/plain; version=0.0.4", render(self._registry)
        if path == "/faults":
            if method == "GET":
                return 200, "application/json", json.dumps(asdict(self._faults.settings)).encode()
            if method != "POST":
                return 405, "text/plain", b"use GET or POST\n"
            try:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object")
                if changes.get("crash"):
                    asyncio.get_running_loop().call_soon(self._exit, CRASH_EXIT_CODE)
                    return 200, "application/json", b'{"crash": true}'
                settings = self._faults.update(changes)
            except ValueError as exc:
                return 400, "application/json", json.dumps({"error": str(exc)}).encode()
            self._on_slow(settings.slow_factor)
            return 200, "application/json", json.dumps(asdict(settings)).encode()
        if path == "/executions":
            return 200, "application/json", json.dumps(self._executions.as_json()).encode()
        return 404, "text/plain", b"not found: try /metrics, /faults or /executions\n"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                parts = line.decode("latin-1").split()
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    key, _, value = h.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                if len(parts) < 2:
                    writer.write(_reply(400, "text/plain", b"bad request line\n"))
                    return
                length = int(headers.get("content-length", "0") or 0)
                if length > _MAX_BODY:
                    writer.write(_reply(413, "text/plain", b"body too large\n"))
                    return
                body = await reader.readexactly(length) if length else b""
                status, ctype, payload = await self.handle(parts[0], parts[1], body)
                writer.write(_reply(status, ctype, payload))
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
