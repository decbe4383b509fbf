"""A small HTTP/1.1 server on asyncio streams.

Written by hand (rather than on uvicorn) so the double controls exactly what goes on the
wire: status lines, header order, chunk boundaries of the event stream, and the moment a
subscription connection closes — the things a Mesos client must be tested against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

log = logging.getLogger(__name__)

MAX_HEADER_LINE = 16 * 1024
MAX_BODY = 64 * 1024 * 1024


@dataclass
class Request:
    """One parsed HTTP request; header names are lower-cased."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Response:
    """A complete (Content-Length) response."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, message: str = "", **headers: str) -> Response:
        hdrs = {"Content-Type": "text/plain; charset=utf-8"} if message else {}
        hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
        return cls(status, message.encode(), hdrs)

    @classmethod
    def json(cls, status: int, obj: Any) -> Response:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, body, {"Content-Type": "application/json"})


ChunkSender = Callable[[bytes], Awaitable[None]]


class StreamResponse:
    """A chunked response; `produce` writes the body and returns when it should end.

    `produce(send, peer_closed)` gets a coroutine that sends one HTTP chunk and an event
    that is set once the client closes its side of the connection.
    """

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        produce: Callable[[ChunkSender, asyncio.Event], Awaitable[None]],
    ) -> None:
        self.status = status
        self.headers = headers
        self.produce = produce


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class _BadRequest(Exception):
    pass


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


class HTTPServer:
    """Serves `handler` on host:port with keep-alive and chunked streaming responses."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port, limit=MAX_HEADER_LINE)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # pragma: no cover - a bug in the double; keep serving others
            log.exception("HTTP connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await self._read_request(reader)
            except _BadRequest as exc:
                await self._write(writer, Response.text(400, str(exc)), close=True)
                return
            if request is None:
                return
            response = await self.handler(request)
            if isinstance(response, StreamResponse):
                await self._stream(reader, writer, response)
                return
            close = request.header("connection") == "close"
            await self._write(writer, response, close=close)
            if close:
                return

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            line = await reader.readline()
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise _BadRequest("Request line too long") from exc
        if not line:
            return None
        parts = line.decode("latin-1").strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest("Malformed request line")
        method, target, _version = parts
        headers: dict[str, str] = {}
        while True:
            raw = await reader.readline()
            if not raw:
                return None
            text = raw.decode("latin-1").rstrip("\r\n")
            if not text:
                break
            name, sep, value = text.partition(":")
            if not sep:
                raise _BadRequest("Malformed header line")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError as exc:
                raise _BadRequest("Bad Content-Length") from exc
            if length < 0 or length > MAX_BODY:
                raise _BadRequest("Bad Content-Length")
            body = await reader.readexactly(length)
        path, _, query = target.partition("?")
        return Request(method.upper(), path, query, headers, body)

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size_line = (await reader.readline()).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError as exc:
                raise _BadRequest("Bad chunk size") from exc
            if size == 0:
                while (await reader.readline()).strip():
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(body) > MAX_BODY:
                raise _BadRequest("Body too large")

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, close: bool) -> None:
        head = [_status_line(resp.status)]
        headers = dict(resp.headers)
        headers["Content-Length"] = str(len(resp.body))
        if close:
            headers["Connection"] = "close"
        head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()]
        writer.write(b"".join(head) + b"\r\n" + resp.body)
        await writer.drain()

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, resp: StreamResponse) -> None:
        head = [_status_line(resp.status)]
        headers = dict(resp.headers)
        headers["Transfer-Encoding"] = "chunked"
        head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()]
        writer.write(b"".join(head) + b"\r\n")
        await writer.drain()

        peer_closed = asyncio.Event()

        async def watch_peer() -> None:
            # The client sends nothing more on a subscription connection; EOF means it left.
            with contextlib.suppress(Exception):
                while await reader.read(4096):
                    pass
            peer_closed.set()

        async def send(data: bytes) -> None:
            if not data:
                return
            if writer.is_closing():
                raise ConnectionResetError("stream closed")
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        watcher = asyncio.create_task(watch_peer())
        try:
            await resp.produce(send, peer_closed)
            if not peer_closed.is_set() and not writer.is_closing():
                with contextlib.suppress(Exception):
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
