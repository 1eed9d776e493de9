"""A minimal HTTP/1.1 server on asyncio (keep-alive, Content-Length bodies) for the small
admin and metrics ports (the replica's metrics and faults, the control plane's metrics and
status): subclasses implement `handle`. Not a general web server: requests in sequence per
connection, no chunked bodies, bodies capped at 64 KiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

_MAX_BODY = 64 * 1024


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


class MiniHTTP:
    """Serves `handle(method, path, body) -> (status, content type, body)` over HTTP/1.1."""

    _server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free); returns the bound port."""
        self._server = await asyncio.start_server(self._conn, host, port)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        raise NotImplementedError

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
