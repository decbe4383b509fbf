"""Forward dashboard requests and websockets to a cluster's scheduler, with its client certificate.

The scheduler's HTTP server runs tenant code, so what it answers is hostile: only listed
response headers pass (no cookies, no hop-by-hop headers, nothing that would act on the
service's origin), a redirect must stay inside the cluster's dashboard, bodies stream
through in bounded chunks up to :data:`MAX_RESPONSE`, and websocket messages are bounded
by :data:`MAX_MESSAGE`. Towards the scheduler only listed request headers go: never the
tenant's ``Authorization`` header or cookies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketState
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from api.dashboard_paths import location_inside
from provisioner.models import ClusterRecord, Status
from provisioner.records import Records
from provisioner.tls import client_credentials
from provisioner.watch import client_context

logger = logging.getLogger("provisioner.dashboards")

#: Largest response body relayed (Bokeh's biggest script is a few MiB).
MAX_RESPONSE = 64 * 2**20
#: Largest websocket message relayed from a scheduler (uvicorn bounds the browser's side).
MAX_MESSAGE = 16 * 2**20
#: Connections to one scheduler at once; more requests wait for one, then fail as 502.
MAX_CONNECTIONS = 16
#: Websockets one tenant may hold open through the service (each holds two sockets).
MAX_SOCKETS_PER_TENANT = 64
TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=10.0)
OPEN_TIMEOUT = 10.0

#: Request headers a dashboard needs; nothing that identifies the caller to the service.
REQUEST_HEADERS = frozenset({
    "accept", "accept-encoding", "accept-language", "cache-control", "content-length",
    "content-type", "if-match", "if-modified-since", "if-none-match", "if-range",
    "if-unmodified-since", "pragma", "range", "user-agent", "x-requested-with",
})
#: Response headers passed back; the rest (Set-Cookie, hop-by-hop, Alt-Svc, HSTS,
#: Clear-Site-Data, ...) could act on the service's origin for every tenant.
RESPONSE_HEADERS = frozenset({
    "accept-ranges", "cache-control", "content-disposition", "content-encoding",
    "content-language", "content-length", "content-range", "content-type", "etag", "expires",
    "last-modified", "location", "retry-after", "vary", "x-content-type-options",
})
#: Close codes a scheduler's websocket close may pass on to the browser as they are.
_PASSABLE_CLOSE = frozenset({1000, 1001, 1003, *range(1007, 1012), *range(3000, 5000)})


class UpstreamError(Exception):
    """The scheduler could not be reached, or answered beyond what is relayed (a 502)."""


class TooManySockets(Exception):
    """A tenant holds as many dashboard websockets as it may (a 429)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One cluster's scheduler HTTP server, and the client that talks to it."""

    base: str
    context: ssl.SSLContext | None
    http: httpx.AsyncClient

    def url(self, path: str, query: str) -> httpx.URL:
        """The exact URL: the path is already canonical (api.dashboard_paths), so nothing
        is re-encoded or normalised on the way."""
        raw = path + ("?" + query if query else "")
        return httpx.URL(self.base).copy_with(raw_path=raw.encode("ascii"))

    def ws_url(self, path: str, query: str) -> str:
        scheme, rest = self.base.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}{'?' + query if query else ''}"


class Upstreams:
    """A client per running cluster, made on first use (its SSL context off the event loop)
    and dropped once the cluster no longer runs."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self._upstreams: dict[str, Upstream] = {}
        self._lock = asyncio.Lock()
        self._sockets: Counter[str] = Counter()

    async def get(self, record: ClusterRecord) -> Upstream:
        assert record.dashboard_url is not None
        found = self._upstreams.get(record.id)
        if found is not None and found.base == record.dashboard_url:
            return found
        async with self._lock:
            found = self._upstreams.get(record.id)
            if found is not None and found.base == record.dashboard_url:
                return found
            await self._prune()
            context = await asyncio.to_thread(client_context, client_credentials(record.credentials))
            http = httpx.AsyncClient(
                verify=context if context is not None else False, timeout=TIMEOUT,
                follow_redirects=False, trust_env=False,
                limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                    max_keepalive_connections=4))
            upstream = Upstream(record.dashboard_url, context, http)
            self._upstreams[record.id] = upstream
            if found is not None:
                await found.http.aclose()
            return upstream

    async def _prune(self) -> None:
        """Close the clients of clusters that stopped running (their schedulers are gone)."""
        for cluster_id in list(self._upstreams):
            record = self._records.cached(cluster_id)
            if record is None or record.status != Status.RUNNING:
                await self._upstreams.pop(cluster_id).http.aclose()

    @contextlib.contextmanager
    def socket_slot(self, tenant: str) -> Iterator[None]:
        """Count one of ``tenant``'s websockets while it lasts; refuse past the bound."""
        if self._sockets[tenant] >= MAX_SOCKETS_PER_TENANT:
            raise TooManySockets(f"too many dashboard websockets open (at most "
                                 f"{MAX_SOCKETS_PER_TENANT} per tenant)")
        self._sockets[tenant] += 1
        try:
            yield
        finally:
            self._sockets[tenant] -= 1
            if not self._sockets[tenant]:
                del self._sockets[tenant]

    async def close(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.http.aclose()
        self._upstreams.clear()


def _why(exc: BaseException) -> str:
    """What went wrong, for a message: the exception's class, never its text (which may
    quote what the scheduler sent)."""
    return type(exc).__name__


async def _request_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return bool(length and length != "0") or "transfer-encoding" in request.headers


async def forward(upstream: Upstream, cluster_id: str, request: Request, path: str,
                  query: str) -> Response:
    """Send ``request`` to ``path`` on the scheduler and stream its answer back."""
    headers = [(k, v) for k, v in request.headers.items() if k in REQUEST_HEADERS]
    content = _request_body(request) if _has_body(request) else None
    outgoing = upstream.http.build_request(request.method, upstream.url(path, query),
                                           headers=headers, content=content)
    try:
        response = await upstream.http.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"the dashboard of cluster {cluster_id} cannot be reached "
                            f"({_why(exc)})") from None
    try:
        length = response.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_RESPONSE:
            raise UpstreamError(f"the dashboard of cluster {cluster_id} answered with a body "
                                f"over {MAX_RESPONSE} bytes")
        location = response.headers.get("location")
        if location is not None and not location_inside(location, path, cluster_id):
            raise UpstreamError(f"the dashboard of cluster {cluster_id} redirected outside "
                                "itself")
    except UpstreamError:
        await response.aclose()
        raise
    relayed = StreamingResponse(_relay_body(response, cluster_id),
                                status_code=response.status_code)
    relayed.raw_headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.multi_items() if k.lower() in RESPONSE_HEADERS
    ] + [(b"referrer-policy", b"same-origin")]
    return relayed


class _Truncated(Exception):
    """Raised mid-response: the ASGI server then drops the connection, so the browser
    sees a broken answer rather than a short one it would take as whole."""


async def _relay_body(response: httpx.Response, cluster_id: str) -> AsyncIterator[bytes]:
    sent = 0
    try:
        async for chunk in response.aiter_raw():
            sent += len(chunk)
            if sent > MAX_RESPONSE:
                raise _Truncated(f"cluster {cluster_id}: dashboard answer over {MAX_RESPONSE} bytes")
            yield chunk
    except httpx.HTTPError as exc:
        raise _Truncated(f"cluster {cluster_id}: dashboard answer broke off ({_why(exc)})") from None
    finally:
        await response.aclose()


def subprotocols(websocket: WebSocket) -> list[str]:
    """The subprotocols the browser offered (Bokeh sends its session token as one)."""
    offered = websocket.scope.get("subprotocols") or []
    return [str(p) for p in offered if p][:8]


async def open_socket(upstream: Upstream, cluster_id: str, path: str, query: str,
                      protocols: list[str]) -> ClientConnection:
    """The websocket to the scheduler, before the browser's is accepted."""
    try:
        return await ws_connect(
            upstream.ws_url(path, query), ssl=upstream.context,
            subprotocols=protocols or None,  # type: ignore[arg-type]
            open_timeout=OPEN_TIMEOUT, max_size=MAX_MESSAGE, max_queue=16, compression=None,
            proxy=None, user_agent_header=None)
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise UpstreamError(f"the dashboard of cluster {cluster_id} refused the websocket "
                            f"({_why(exc)})") from None


async def _to_upstream(client: WebSocket, upstream: ClientConnection) -> None:
    while True:
        message = await client.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        if data is not None:
            await upstream.send(data)


async def _to_client(client: WebSocket, upstream: ClientConnection) -> None:
    async for message in upstream:
        if isinstance(message, str):
            await client.send_text(message)
        else:
            await client.send_bytes(message)


async def relay(client: WebSocket, upstream: ClientConnection, cluster_id: str) -> None:
    """Accept the browser's websocket and pass messages both ways until either side
    closes; then close the other (with the scheduler's close code where it is a valid one)."""
    async with upstream:
        await client.accept(subprotocol=upstream.subprotocol)
        pumps = [asyncio.create_task(_to_upstream(client, upstream)),
                 asyncio.create_task(_to_client(client, upstream))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            ended = await asyncio.gather(*pumps, return_exceptions=True)
        why = [_why(e) for e in ended if isinstance(e, Exception)]
        logger.debug("cluster=%s dashboard websocket ended %s", cluster_id, why)
        await upstream.close()
    if client.application_state == WebSocketState.CONNECTED \
            and client.client_state == WebSocketState.CONNECTED:
        passed = upstream.close_code
        code = passed if passed is not None and passed in _PASSABLE_CLOSE else 1011
        with contextlib.suppress(RuntimeError, OSError):
            await client.close(code)
