"""Cluster dashboards, reached only through the service: a signed link, and the proxy.

``GET /clusters/{id}/dashboard-link`` (bearer) gives a browser a short-lived link. Under
``/clusters/{id}/dashboard/`` every request and websocket is authenticated (bearer, link or
session cookie, :mod:`api.dashboard_auth`), scoped to the caller's own running cluster, kept
inside the cluster's dashboard (:mod:`api.dashboard_paths`) and forwarded over the cluster's
client certificate (:mod:`api.dashboard_proxy`). The scheduler serves its dashboard under the
same prefix, so nothing in what it sends is rewritten.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.requests import HTTPConnection

from api.auth import current_tenant, get_provisioner
from api.dashboard_auth import MAX_LINK_TTL, Access, authenticate, new_link, session_cookie
from api.dashboard_paths import LANDING, BadPath, Target, split_query, target
from api.dashboard_proxy import (
    TooManySockets,
    UpstreamError,
    Upstreams,
    forward,
    open_socket,
    relay,
    subprotocols,
)
from api.schemas import DashboardLink, ErrorOut
from api.urls import dashboard_base, is_secure, public_base
from clusters.logs import cluster_log
from provisioner.models import ClusterRecord, Status
from provisioner.service import ClusterService, Conflict, NotFound
from provisioner.tenants import Tenant

logger = logging.getLogger("provisioner.dashboards")

router = APIRouter(tags=["dashboards"])

#: What the proxy forwards; the dashboard itself only ever GETs, Bokeh's pages also HEAD/POST.
METHODS = ["GET", "HEAD", "POST"]


@router.get("/clusters/{cluster_id}/dashboard-link", response_model=DashboardLink,
            responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut},
                       409: {"model": ErrorOut}, 422: {"model": ErrorOut}})
async def dashboard_link(
    cluster_id: str,
    conn: HTTPConnection,
    tenant: Annotated[Tenant, Depends(current_tenant)],
    service: Annotated[ClusterService, Depends(get_provisioner)],
    ttl: Annotated[float | None, Query(ge=10, le=MAX_LINK_TTL,
                                       description="seconds the link stays valid")] = None,
) -> DashboardLink:
    """A link that opens the cluster's dashboard in a browser without the tenant's token."""
    record = await service.get(tenant, cluster_id)
    if record.status.terminal:
        raise Conflict("status", f"cluster {cluster_id} is {record.status}: it has no dashboard")
    token, expires_at = new_link(service, tenant, cluster_id,
                                 ttl or service.settings.dashboard_link_ttl)
    base = dashboard_base(public_base(conn), cluster_id)
    return DashboardLink(url=f"{base}/{LANDING}?token={token}", path_url=f"{base}/t/{token}",
                         expires_at=expires_at)


def _serving(record: ClusterRecord) -> ClusterRecord:
    """The record if its dashboard is up; 409 saying why not otherwise."""
    if record.status != Status.RUNNING:
        when = "is not up yet" if not record.status.terminal else "is gone"
        raise Conflict("status", f"cluster {record.id} is {record.status}: its dashboard {when}")
    if not record.dashboard_url:
        raise Conflict("dashboard", f"cluster {record.id} has no dashboard")
    return record


async def _resolve(conn: HTTPConnection, cluster_id: str
                   ) -> tuple[Target, str, bool, Access, ClusterRecord]:
    """Where the request goes, the query to pass on, whether a link came in the query,
    who asks, and their running cluster."""
    try:
        where = target(conn.scope.get("raw_path") or conn.scope["path"].encode(), cluster_id)
        query_link, query = split_query(conn.scope.get("query_string", b""))
    except BadPath as exc:
        raise HTTPException(404, f"no such dashboard page ({exc})") from None
    access = authenticate(conn, cluster_id, where.link if where.link is not None else query_link)
    record = await get_provisioner(conn).get(access.tenant, cluster_id)
    return where, query, query_link is not None, access, _serving(record)


def _upstreams(conn: HTTPConnection) -> Upstreams:
    return conn.app.state.dashboards


def _with_session(response: Response, conn: HTTPConnection, access: Access,
                  cluster_id: str) -> Response:
    """A request a link let in gives its browser a session on this cluster's dashboard."""
    if access.by_link:
        cookie = session_cookie(get_provisioner(conn), access.tenant, cluster_id, is_secure(conn))
        response.raw_headers.append((b"set-cookie", cookie.encode("latin-1")))
    return response


@router.api_route("/clusters/{cluster_id}/dashboard", methods=METHODS, include_in_schema=False)
@router.api_route("/clusters/{cluster_id}/dashboard/{path:path}", methods=METHODS,
                  include_in_schema=False)
async def dashboard(cluster_id: str, request: Request) -> Response:
    """One dashboard page or asset, for the cluster's own tenant only."""
    where, query, query_link, access, record = await _resolve(request, cluster_id)
    if query_link and access.by_link and request.method in ("GET", "HEAD"):
        # A clicked link: the browser gets its session, then the same page without the
        # token (so it is not kept in history, bookmarks or Referer headers).
        raw = (request.scope.get("raw_path") or request.scope["path"].encode()).decode("latin-1")
        return _with_session(RedirectResponse(raw + ("?" + query if query else ""), 303),
                             request, access, cluster_id)
    if where.root:
        return _with_session(RedirectResponse(f"{where.mount}/{LANDING}", 307), request,
                             access, cluster_id)
    try:
        upstream = await _upstreams(request).get(record)
        response = await forward(upstream, cluster_id, request, where.upstream, query)
    except UpstreamError as exc:
        cluster_log(logger, record.tenant, cluster_id).warning("dashboard: %s", exc)
        raise HTTPException(502, str(exc)) from None
    return _with_session(response, request, access, cluster_id)


def _allowed_origin(websocket: WebSocket) -> bool:
    """A browser's websocket must come from the service's own pages: a page elsewhere
    cannot ride on a session cookie (clients that send no Origin are not browsers)."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    own = public_base(websocket)
    scheme, _, rest = own.partition("://")
    return origin.lower() == f"{scheme}://{rest.split('/', 1)[0]}".lower()


async def _deny(websocket: WebSocket, status: int, detail: str) -> None:
    """Refuse a websocket handshake with an HTTP answer, as any other request is refused."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"detail": detail}, status))
    else:
        await websocket.close(1008)


@router.websocket("/clusters/{cluster_id}/dashboard/{path:path}")
async def dashboard_socket(websocket: WebSocket, cluster_id: str) -> None:
    """The dashboard's websockets, relayed once the caller and its cluster check out; a
    refusal is an HTTP answer to the handshake (401, 403, 404, 409, 502)."""
    tenant = "-"
    try:
        if not _allowed_origin(websocket):
            raise HTTPException(403, "websocket from a page outside the service")
        where, query, _, access, record = await _resolve(websocket, cluster_id)
        tenant = access.tenant.name
        upstreams = _upstreams(websocket)
        upstream = await upstreams.get(record)
        with upstreams.socket_slot(tenant):
            socket = await open_socket(upstream, cluster_id, where.upstream, query,
                                       subprotocols(websocket))
            await relay(websocket, socket, cluster_id)
    except HTTPException as exc:
        await _deny(websocket, exc.status_code, str(exc.detail))
    except NotFound as exc:
        await _deny(websocket, 404, f"cluster {exc.args[0]!s} not found")
    except Conflict as exc:
        await _deny(websocket, 409, str(exc))
    except TooManySockets as exc:
        await _deny(websocket, 429, str(exc))
    except UpstreamError as exc:
        cluster_log(logger, tenant, cluster_id).warning("dashboard: %s", exc)
        await _deny(websocket, 502, str(exc))
