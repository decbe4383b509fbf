"""Talk to a running cluster's scheduler: long-poll its plugin, retire workers.

Everything a scheduler sends is hostile input: tenant code runs in it and can answer in its
plugin's place. So the service never uses Dask's RPC with a scheduler (its protocol unpickles
what the far end sends, whatever the caller asks for); it speaks plain JSON over HTTPS to the
routes of :mod:`clusters.plugin`, with the cluster's client certificate, reads at most
``MAX_BODY`` bytes of an answer and accepts it only in the exact shape of :class:`Report`.
Backend-agnostic: anything with a scheduler's HTTP address is observed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

logger = logging.getLogger("provisioner.watch")

#: The most a scheduler's answer may hold (a report naming ten thousand workers fits).
MAX_BODY = 2**20
MAX_WORKERS = 10_000
WorkerName = Annotated[str, Field(max_length=256)]
Duration = Annotated[float, Field(ge=0, le=10 * 365 * 86400, allow_inf_nan=False)]


class SchedulerReplyError(Exception):
    """A scheduler answered with something other than what was asked for."""


class Report(BaseModel):
    """What a scheduler says of its cluster; anything else is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: Annotated[StrictInt, Field(ge=0, le=2**53)]
    workers: Annotated[list[WorkerName], Field(max_length=MAX_WORKERS)]
    clients: Annotated[StrictInt, Field(ge=0, le=2**31)]
    busy: StrictBool
    idle_for: Duration | None
    no_client_for: Duration | None
    adaptive_target: Annotated[StrictInt, Field(ge=0, le=2**31)]


class _Names(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    names: Annotated[list[WorkerName], Field(max_length=MAX_WORKERS)]


def client_context(credentials: dict[str, str] | None) -> ssl.SSLContext | None:
    """An SSL context that trusts only the cluster's own CA and shows its client certificate
    (blocking: the PEMs go through private temporary files, as ssl wants files)."""
    if not credentials:
        return None
    context = ssl.create_default_context(cadata=credentials["ca"])
    # The cluster's CA signs nothing but its processes' certificate: the chain is the check.
    context.check_hostname = False
    with tempfile.TemporaryDirectory(prefix="provisioner-tls-") as folder:
        paths = []
        for part in ("cert", "key"):
            path = os.path.join(folder, part)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(credentials[part])
            paths.append(path)
        context.load_cert_chain(*paths)
    return context


class SchedulerLink:
    """One HTTP(S) connection to a cluster's scheduler."""

    def __init__(self, http_url: str, context: ssl.SSLContext | None) -> None:
        self._http = httpx.AsyncClient(
            base_url=http_url, verify=context if context is not None else False,
            timeout=httpx.Timeout(10.0), follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2))

    @classmethod
    async def open(cls, http_url: str, credentials: dict[str, str] | None = None) -> SchedulerLink:
        """A link using the cluster's client certificate (set up off the event loop)."""
        return cls(http_url, await asyncio.to_thread(client_context, credentials))

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, timeout: float = 10.0,
                    **kwargs: Any) -> bytes:
        request = self._http.build_request(method, "/dask-provisioner/" + path,
                                           timeout=httpx.Timeout(timeout), **kwargs)
        response = await self._http.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise SchedulerReplyError(f"scheduler answered HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_raw():
                body.extend(chunk)
                if len(body) > MAX_BODY:
                    raise SchedulerReplyError(f"scheduler's answer is over {MAX_BODY} bytes")
            return bytes(body)
        finally:
            await response.aclose()

    async def report(self, version: int, timeout: float) -> Report:
        body = await self._call("GET", "report", timeout + 10,
                                params={"version": version, "timeout": timeout})
        try:
            return Report.model_validate_json(body)
        except ValidationError as exc:
            raise SchedulerReplyError(f"invalid report: {exc.error_count()} error(s)") from None

    async def workers_to_close(self, n: int, idle_only: bool = False) -> list[str]:
        """Up to ``n`` workers to close, best first; with ``idle_only``, only those Dask's
        adaptive rules would let go now (idle, their data fits on the rest)."""
        body = await self._call("GET", "workers-to-close",
                                params={"n": n, "idle": int(idle_only)})
        try:
            return _Names.model_validate_json(body).names
        except ValidationError as exc:
            raise SchedulerReplyError(f"invalid answer: {exc.error_count()} error(s)") from None

    async def retire(self, names: list[str]) -> None:
        """Retire gracefully: their data moves to other workers first, then they close."""
        await self._call("POST", "retire", 120, json=names)


async def follow(
    link: SchedulerLink, on_report: Callable[[Report], Awaitable[None]],
    hold: float,
) -> None:
    """Feed every state change of the cluster to ``on_report`` until cancelled."""
    version = -1
    delay = 0.1
    while True:
        try:
            report = await link.report(version, hold)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # scheduler restarting, unreachable, closing, or lying
            logger.debug("report failed: %r", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
            continue
        delay = 0.1
        version = report.version
        await on_report(report)
