"""A tiny asyncio HTTP/1.1 GET client with keep-alive, for scraping Prometheus endpoints.

Scraping every replica every 50-100 ms must not pay a TCP handshake per scrape, and the
project has no asyncio HTTP client dependency, so this keeps one small idle pool per
`host:port`. It only speaks what metrics endpoints need: GET, `Content-Length` or chunked
bodies, `Connection: close`. Callers bound each call with a timeout; a call that is
cancelled or fails closes its connection, so a half-read response never gets reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_MAX_LINE = 8 * 1024
_MAX_HEADERS = 100


class HttpError(Exception):
    """The endpoint answered with something other than a usable 200 response."""


class _StaleConnection(HttpError):
    """The peer closed the connection before answering (a pooled one may have gone idle)."""


@dataclass(frozen=True)
class Url:
    host: str
    port: int
    path: str

    @property
    def key(self) -> tuple[str, int]:
        return self.host, self.port


def parse_url(url: str, default_path: str = "/metrics") -> Url:
    """`http://host:port/path` or bare `host:port` (path defaults to `default_path`)."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs can be scraped, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {url!r}")
    path = parts.path or default_path
    if parts.query:
        path += "?" + parts.query
    return Url(parts.hostname, parts.port or 80, path)


class HttpClient:
    """GETs over pooled keep-alive connections. One per scraper; close() when done."""

    def __init__(self, max_body_bytes: int = 8 * 1024 * 1024, max_idle_per_host: int = 2):
        self._max_body = max_body_bytes
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._busy: set[asyncio.StreamWriter] = set()
        self._closed = False

    async def get(self, url: Url) -> bytes:
        """The body of a 200 response; HttpError for other statuses, OSError on I/O failure."""
        if self._closed:
            raise RuntimeError("HttpClient is closed")
        pooled = self._idle.get(url.key)
        if pooled:
            conn = pooled.pop()
            try:
                return await self._exchange(url, conn)
            except (OSError, asyncio.IncompleteReadError, _StaleConnection):
                pass  # the server closed an idle keep-alive connection: retry once, fresh
        reader, writer = await asyncio.open_connection(url.host, url.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await self._exchange(url, (reader, writer))

    async def _exchange(self, url: Url, conn: _Conn) -> bytes:
        reader, writer = conn
        self._busy.add(writer)
        reusable = False
        try:
            request = (
                f"GET {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                "Accept: text/plain\r\nConnection: keep-alive\r\n\r\n"
            )
            writer.write(request.encode("latin-1"))
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise _StaleConnection("connection closed before a response")
            status, headers = await self._head(reader, status_line)
            body, reusable = await self._body(reader, headers)
            if status != 200:
                raise HttpError(f"HTTP {status} from {url.host}:{url.port}{url.path}")
            return body
        finally:
            self._busy.discard(writer)
            if reusable and not self._closed:
                idle = self._idle.setdefault(url.key, [])
                if len(idle) < self._max_idle:
                    idle.append(conn)
                else:
                    writer.close()
            else:
                writer.close()

    async def _head(self, reader: asyncio.StreamReader, line: bytes) -> tuple[int, dict[str, str]]:
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            h = await reader.readline()
            if h in (b"\r\n", b"\n"):
                return int(parts[1]), headers
            if not h or len(h) > _MAX_LINE:
                raise HttpError("truncated or oversized response headers")
            key, _, value = h.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        raise HttpError("too many response headers")

    async def _body(
        self, reader: asyncio.StreamReader, headers: dict[str, str]
    ) -> tuple[bytes, bool]:
        """(body, whether the connection may be reused)."""
        keep = headers.get("connection", "").lower() != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            size = 0
            while True:
                line = await reader.readline()
                try:
                    n = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HttpError(f"bad chunk size line {line[:40]!r}") from None
                if n == 0:
                    while (trailer := await reader.readline()) not in (b"\r\n", b"\n", b""):
                        del trailer
                    return b"".join(chunks), keep
                size += n
                self._check_size(size)
                chunks.append(await reader.readexactly(n))
                await reader.readexactly(2)  # CRLF after each chunk
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise HttpError("bad Content-Length") from None
            self._check_size(length)
            return await reader.readexactly(length), keep
        # No framing: the body runs to EOF and the connection is done.
        body = await reader.read(self._max_body + 1)
        self._check_size(len(body))
        return body, False

    def _check_size(self, n: int) -> None:
        if n > self._max_body:
            raise HttpError(f"response body larger than {self._max_body} bytes")

    async def close(self) -> None:
        """Close every pooled connection (in-flight calls are the caller's to cancel first)."""
        self._closed = True
        writers = [w for idle in self._idle.values() for _, w in idle] + list(self._busy)
        self._idle.clear()
        self._busy.clear()
        for w in writers:
            w.close()
        for w in writers:
            with contextlib.suppress(OSError):
                await w.wait_closed()
