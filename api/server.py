"""Serving the app with uvicorn, bounded against slow and numerous clients.

uvicorn has no limit on how long a client may take to send a request's headers: a client
trickling one header byte a second holds its socket (and a slot of the connection limit)
forever, and so do 200 of them. :class:`HeaderDeadline` adds that limit to uvicorn's own
HTTP protocol classes (h11 or httptools): a timer armed when a connection opens, and again
on the first byte of each next request, cancelled once that request's headers are complete,
and closing the connection when it fires. Once the headers are in the request is the app's:
a long-poll (``GET /clusters/{id}?wait=600``) is never cut. The body has its own limit, in
the app (:class:`api.app.BodyLimit`); idle kept-alive connections are uvicorn's
``timeout_keep_alive``; past ``max_connections`` uvicorn answers 503.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from fastapi import FastAPI

    from provisioner.settings import Settings

logger = logging.getLogger("provisioner.http")

#: What a client whose headers were too slow is told before the connection closes.
TOO_SLOW = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: 33\r\nconnection: close\r\n\r\nrequest headers not sent in time\n")


class HeaderDeadline:
    """Mixin for uvicorn's HTTP protocol classes: a request's headers must be complete within
    ``header_timeout`` seconds of the connection opening, or of the first byte of the next
    request on a kept-alive connection.

    Both of uvicorn's protocols start a new request/response cycle (``self.cycle``) exactly
    when a request's headers are complete, so that is what ends the wait.
    """

    header_timeout: float = 10.0
    # From uvicorn's protocol classes.
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    _header_timer: asyncio.TimerHandle | None = None
    _partial: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # between requests: headers come next
            self._arm()
            self._partial = True
        super().data_received(data)  # type: ignore[misc]
        # Headers complete: a new cycle, or an upgrade that handed the connection to the
        # websocket protocol (which has no cycle here and must not be cut by our timer).
        if self.cycle is not cycle or self.transport.get_protocol() is not self:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        if self._header_timer is None:
            self._partial = False
            self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._partial = False

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._partial:  # a request was begun: say why it ends; a silent socket just closes
            self.transport.write(TOO_SLOW)
        logger.debug("closed a connection that sent no complete request headers in %gs",
                     self.header_timeout)
        self.transport.close()


def protocol_class(header_timeout: float, parser: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, with "auto"; else h11) with a
    deadline for request headers."""
    if parser == "httptools" or (parser == "auto" and importlib.util.find_spec("httptools")):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]
    return type(f"HeaderDeadline{base.__name__}", (HeaderDeadline, base),
                {"header_timeout": header_timeout})


def listen_socket(host: str, port: int) -> socket.socket:
    """The service's listening socket, bound before the service starts anything, so a busy
    port is a start-up error and not a failure after clusters were recovered."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def run(app: FastAPI, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve ``app`` until stopped: on ``sock`` (from :func:`listen_socket`), else on the
    settings' host and port."""
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        # The standard asyncio loop, not uvloop: process exits are watched with pidfds on the
        # loop, and uvloop (libuv) defers closing a poll handle, so a new pidfd that reuses
        # the number of one just closed can lose its registration and its exit is never seen.
        loop="asyncio",
        http=protocol_class(settings.header_timeout, settings.http_parser),
        ws="wsproto",  # dashboards' websockets; wsproto logs no error for a refused handshake
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        # uvicorn counts the connection asking too: this serves max_connections at once.
        limit_concurrency=settings.max_connections + 1,
    )
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
