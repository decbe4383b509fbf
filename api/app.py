"""The FastAPI application: routers, error mapping, body limits and the service's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import routes_clusters, routes_dashboard, routes_tenants
from api.dashboard_proxy import Upstreams
from provisioner import __version__
from provisioner.service import ClusterService, Conflict, InvalidRequest, NotFound, OverQuota

MAX_BODY = 64 * 1024


def _error(status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


#: What pydantic puts before a validator's own message; the message says enough.
_PREFIXES = ("Value error, ", "Assertion failed, ")


def _message(error: dict[str, Any]) -> str:
    text = str(error.get("msg", ""))
    for prefix in _PREFIXES:
        text = text.removeprefix(prefix)
    return text


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        # A body that is not JSON at all is the body's fault, not field "0"'s.
        {"field": "body" if e.get("type") == "json_invalid" else _field(tuple(e.get("loc", ()))),
         "message": _message(e)}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return _error(422, detail, errors)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI answers a body it cannot decode (bad UTF-8, say) with a bare 400; our contract
    is 422 naming the field, like every other bad input."""
    if exc.status_code == 400:
        detail = f"body: {exc.detail}" if isinstance(exc.detail, str) else "body: cannot be parsed"
        return _error(422, detail, [{"field": "body", "message": str(exc.detail)}])
    response = _error(exc.status_code, str(exc.detail))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


class BodyRefused(HTTPException):
    """A request body refused while it is read; raised from the wrapped ``receive``.

    An HTTPException because FastAPI's body reading passes those through untouched (any
    other exception becomes a bare "error parsing the body"). It answers with ``response``,
    which closes the connection: the rest of the body is never read.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, f"body: {message}", headers={"connection": "close"})
        self.response = _error(status, f"body: {message}", [{"field": "body", "message": message}])
        self.response.headers["connection"] = "close"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes before they are read into memory (422, the
    contract's answer to bad input), and bodies not all in within ``timeout`` seconds of
    the request's headers (408): a client trickling its body would hold its socket for ever.

    Once the body is complete, ``receive`` is the app's as is: a long-poll waiting for a
    disconnect is never timed out.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY, timeout: float = 30) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._too_big().response(scope, receive, send)
            return
        seen = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyRefused(408, f"not all sent within {self.timeout:g}s") from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._too_big()
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyRefused as exc:  # raised where no exception handler stood in between
            await exc.response(scope, receive, send)

    def _too_big(self) -> BodyRefused:
        # 422 like every other bad input (the contract's choice over 413), naming the field.
        return BodyRefused(422, f"request body larger than {self.limit} bytes")


def create_app(provisioner: ClusterService, manage_lifecycle: bool = True,
               on_started: Callable[[], None] | None = None) -> FastAPI:
    """The app for ``provisioner``; with ``manage_lifecycle`` it starts and stops it too.
    ``on_started`` (blocking) runs once it has started, before the server accepts requests."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await provisioner.start()
        if on_started is not None:
            await asyncio.to_thread(on_started)
        try:
            yield
        finally:
            await app.state.dashboards.close()
            if manage_lifecycle:
                await provisioner.stop()

    app = FastAPI(
        title="dask-provisioner",
        version=__version__,
        description="Per-tenant Dask clusters on demand.",
        lifespan=lifespan,
    )
    app.state.provisioner = provisioner
    app.state.dashboards = Upstreams(provisioner.records)
    app.include_router(routes_clusters.router)
    app.include_router(routes_dashboard.router)
    app.include_router(routes_tenants.router)

    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]

    @app.exception_handler(BodyRefused)
    async def _body_refused(_: Request, exc: BodyRefused) -> JSONResponse:
        return exc.response

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, f"cluster {exc.args[0]!s} not found")

    @app.exception_handler(OverQuota)
    async def _quota(_: Request, exc: OverQuota) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        status = 409 if isinstance(exc, Conflict) else 422
        return _error(status, str(exc), [{"field": exc.field, "message": exc.message}])

    app.add_middleware(BodyLimit, timeout=provisioner.settings.body_timeout)
    return app
