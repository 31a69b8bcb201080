"""The dashboard's HTTP server: a small HTTP/1.1 server on asyncio (standard library only).

GET (or HEAD) of ``/`` (the page), ``/page.js``, ``/page.css``, ``/api/v1/state`` (JSON) and
``/metrics`` (Prometheus text). Connections are kept alive; a request head over 16 KiB, or
one that takes longer than ``read_timeout`` to arrive, closes the connection. The page and its
script are static files read once; data reaches the page only through the JSON, which is
encoded once per crawl (gzip when asked) and carries an ETag, so many open pages cost little.
"""
from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .crawler import SwarmState
from .view import metrics_text, state_json

logger = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent
MAX_HEAD_BYTES = 16 * 1024
REASONS = {200: "OK", 304: "Not Modified", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large"}
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
)


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    cache: str = "no-store"
    etag: str | None = None
    gzipped: bytes | None = None  # the body compressed, for clients that accept gzip
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Encoded:
    """The JSON and metrics of one state, encoded when first asked for."""

    state: SwarmState
    etag: str
    state_json: Response | None = None
    metrics: Response | None = None


class HealthServer:
    """Serves the page and the state that ``source()`` returns at the time of each request."""

    def __init__(self, source: Callable[[], SwarmState], read_timeout: float = 30.0):
        self.source, self.read_timeout = source, read_timeout
        self.server: asyncio.Server | None = None
        self._static = {name: (STATIC / name).read_bytes() for name in ("page.html", "page.js", "page.css")}
        self._connections: set[asyncio.Task] = set()  # one per open connection, cancelled on close
        self._encoded: _Encoded | None = None  # the latest state's answers
        self._versions = 0  # states seen, for ETags
        self._epoch = f"{time.time_ns():x}"  # ETags of an earlier run of the server never match

    @classmethod
    async def create(cls, source: Callable[[], SwarmState], host: str = "127.0.0.1", port: int = 8600,
                     read_timeout: float = 30.0) -> "HealthServer":
        """Listen on host:port (port 0 picks a free one: see ``url``)."""
        self = cls(source, read_timeout)
        self.server = await asyncio.start_server(self._accept, host, port, limit=MAX_HEAD_BYTES)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def close(self) -> None:
        self.server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the browser went away or idled out
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            except asyncio.LimitOverrunError:
                await self._send(writer, Response(431, "text/plain", b"request head too large\n"), False, False)
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                logger.debug("bad request line %r", lines[0][:80])
                await self._send(writer, Response(400, "text/plain", b"bad request line\n"), False, False)
                return
            method, target, version = parts
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            if method not in ("GET", "HEAD") and has_body:  # the method is what is wrong; its body stays unread
                await self._send(writer, Response(405, "text/plain", b"only GET and HEAD\n",
                                                  headers=[("Allow", "GET, HEAD")]), False, False)
                return
            if has_body:
                await self._send(writer, Response(400, "text/plain", b"requests carry no body here\n"), False, False)
                return
            connection = headers.get("connection", "").lower()
            keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
            if method not in ("GET", "HEAD"):
                response = Response(405, "text/plain", b"only GET and HEAD\n", headers=[("Allow", "GET, HEAD")])
            else:
                response = self.respond(target.split("?", 1)[0])
            if response.etag is not None and headers.get("if-none-match") == response.etag:
                response = Response(304, response.content_type, b"", response.cache, response.etag)
            gzip_ok = "gzip" in headers.get("accept-encoding", "")
            await self._send(writer, response, method == "HEAD", keep_alive, gzip_ok)
            if not keep_alive:
                return

    def respond(self, path: str) -> Response:
        """The response for a GET of ``path``."""
        if path in ("/", "/index.html"):
            return Response(200, "text/html; charset=utf-8", self._static["page.html"], "no-cache")
        if path in ("/page.js", "/page.css"):
            kind = "text/javascript" if path.endswith(".js") else "text/css"
            return Response(200, f"{kind}; charset=utf-8", self._static[path[1:]], "no-cache")
        if path == "/api/v1/state":
            encoded = self._current()
            if encoded.state_json is None:
                body = json.dumps(state_json(encoded.state), separators=(",", ":")).encode()
                encoded.state_json = Response(200, "application/json", body, "no-cache", encoded.etag,
                                              gzip.compress(body, compresslevel=5))
            return encoded.state_json
        if path == "/metrics":
            encoded = self._current()
            if encoded.metrics is None:
                body = metrics_text(encoded.state).encode()
                encoded.metrics = Response(200, "text/plain; version=0.0.4; charset=utf-8", body, "no-cache",
                                           encoded.etag, gzip.compress(body, compresslevel=5))
            return encoded.metrics
        return Response(404, "text/plain", b"not found: try / , /api/v1/state or /metrics\n")

    def _current(self) -> _Encoded:
        state = self.source()
        if self._encoded is None or self._encoded.state is not state:
            self._versions += 1
            self._encoded = _Encoded(state, f'W/"{self._epoch}-{self._versions}"')  # weak: gzip or not
        return self._encoded

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: Response, head_only: bool, keep_alive: bool,
                    gzip_ok: bool = False) -> None:
        body, headers = response.body, [("Content-Type", response.content_type)]
        if gzip_ok and response.gzipped is not None:
            body = response.gzipped
            headers.append(("Content-Encoding", "gzip"))
        if response.etag is not None:
            headers += [("ETag", response.etag), ("Vary", "Accept-Encoding")]
        if response.status != 304:  # a 304's length would have to be that of the 200 it stands for
            headers.append(("Content-Length", str(len(body))))
        headers += [("Cache-Control", response.cache),
                    ("Date", email.utils.formatdate(usegmt=True)),
                    ("Connection", "keep-alive" if keep_alive else "close"), *SECURITY_HEADERS, *response.headers]
        head = f"HTTP/1.1 {response.status} {REASONS[response.status]}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
        writer.write(head.encode("latin-1") + (b"" if head_only or response.status == 304 else body))
        await writer.drain()
