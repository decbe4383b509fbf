"""Python SDK for a dask-provisioner service.

``Provisioner`` talks REST to the service; ``ProvisionedCluster`` is a real
``distributed.deploy.Cluster``, so ``get_client()``, ``scale()``, the Jupyter widget and
``Client(cluster)`` work as with any Dask cluster, while scaling and adaptivity are done by
the service (which enforces the tenant's quota).

Kept light on purpose (httpx, dask and distributed only): it runs in tenants' notebooks,
which should not need the service's own dependencies.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dask.config
import httpx
from distributed import Client
from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster
from distributed.security import Security
from distributed.utils import LoopRunner, SyncMethodMixin

from provisioner.versions import differences, installed_versions

__all__ = [
    "AuthenticationError",
    "ClusterInfo",
    "ClusterNotFound",
    "DashboardLink",
    "ProvisionedCluster",
    "Provisioner",
    "ProvisionerError",
    "QuotaExceeded",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Statuses after which a cluster never runs again.
TERMINAL = frozenset({"stopped", "failed"})
ENDING = TERMINAL | {"stopping"}
#: Longest single long-poll asked of the service (its limit is 600 s).
MAX_POLL = 60.0
DEFAULT_START_TIMEOUT = 300.0
#: Clusters asked for per request when listing; the SDK follows `next` to the end.
LIST_PAGE = 500
#: What ``cluster_options`` fills from the tenant's defaults.
OPTION_DEFAULTS = ("worker_cores", "worker_memory", "idle_timeout", "no_client_timeout")
#: A cluster's signed dashboard link is fetched again this long before it expires.
LINK_MARGIN = 60.0


# -- errors -----------------------------------------------------------------------------------


class ProvisionerError(Exception):
    """The service refused or failed a request; ``str()`` is the service's own message."""

    def __init__(self, message: str, status_code: int | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body or {}


class AuthenticationError(ProvisionerError):
    """Missing or wrong token (HTTP 401)."""


class QuotaExceeded(ProvisionerError):
    """The tenant's quota does not allow the request (HTTP 403)."""


class VersionMismatch(UserWarning):
    """The client's Python or key packages differ from the cluster's environment."""


class ClusterNotFound(ProvisionerError):
    """No such cluster for this tenant (HTTP 404)."""


_ERRORS: dict[int, type[ProvisionerError]] = {
    401: AuthenticationError, 403: QuotaExceeded, 404: ClusterNotFound,
}


def _raise_for(response: httpx.Response) -> None:
    """Turn an error response into a ProvisionerError carrying the service's message."""
    if response.is_success:
        return
    body: dict[str, Any] = {}
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    detail = body.get("detail")
    if not isinstance(detail, str) or not detail:
        detail = response.text.strip() or response.reason_phrase or "request failed"
    cls = _ERRORS.get(response.status_code, ProvisionerError)
    raise cls(detail, response.status_code, body)


# -- cluster records --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterInfo:
    """A cluster as the service reports it (the REST contract's cluster JSON)."""

    id: str
    status: str
    project: str = "default"
    tenant: str = ""
    scheduler_address: str | None = None
    dashboard_url: str | None = None
    workers_requested: int = 0
    workers_running: int = 0
    worker_cores: float = 0.0
    worker_memory: int = 0
    adaptive: tuple[int, int] | None = None
    idle_timeout: float | None = None
    tls: bool = False
    created_at: float | None = None
    stopped_at: float | None = None
    stop_reason: str | None = None
    #: While queued: its place (1: next) and what it waits for; while its processes wait in a
    #: batch queue (Slurm): why.
    queue_position: int | None = None
    waiting_for: str | None = None
    waiting: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterInfo:
        """Tolerant of fields added later: unknown ones stay in ``raw``."""
        workers = data.get("workers") or {}
        adaptive = data.get("adaptive")
        return cls(
            id=str(data["id"]),
            status=str(data.get("status", "unknown")),
            project=str(data.get("project", "default")),
            tenant=str(data.get("tenant", "")),
            scheduler_address=data.get("scheduler_address"),
            dashboard_url=data.get("dashboard_url"),
            workers_requested=int(workers.get("requested", 0)),
            workers_running=int(workers.get("running", 0)),
            worker_cores=float(data.get("worker_cores") or 0),
            worker_memory=int(data.get("worker_memory") or 0),
            adaptive=(int(adaptive.get("minimum", 0)), int(adaptive["maximum"]))
            if isinstance(adaptive, dict) and "maximum" in adaptive else None,
            idle_timeout=data.get("idle_timeout"),
            tls=bool(data.get("tls", False)),
            created_at=data.get("created_at"),
            stopped_at=data.get("stopped_at"),
            stop_reason=data.get("stop_reason"),
            queue_position=data.get("queue_position"),
            waiting_for=data.get("waiting_for"),
            waiting=data.get("waiting"),
            raw=dict(data),
        )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def why_waiting(self) -> str | None:
        """Why it is not running yet, in one line (None when nothing says)."""
        if self.status == "queued":
            place = f"#{self.queue_position} in the queue" if self.queue_position else "queued"
            return f"{place}: {self.waiting_for}" if self.waiting_for else place
        return self.waiting

    @property
    def name(self) -> str:
        """The cluster's id (dask-gateway calls it the cluster's name)."""
        return self.id

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard through the service (needs the token; ``Provisioner.dashboard_link``
        gives a signed link a browser opens alone)."""
        return self.dashboard_url


@dataclass(frozen=True)
class DashboardLink:
    """A signed link to a cluster's dashboard through the service, for a browser.

    ``url`` opens the dashboard (and a browser session on it); ``path_url`` carries the
    link in its path, for tools that append pages to a URL (the JupyterLab Dask extension).
    """

    url: str
    path_url: str
    expires_at: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DashboardLink:
        return cls(url=str(data["url"]), path_url=str(data["path_url"]),
                   expires_at=float(data["expires_at"]))

    def fresh(self, margin: float = LINK_MARGIN) -> bool:
        return self.expires_at - time.time() > margin


def security_from_credentials(credentials: dict[str, Any]) -> Security:
    """A client-side ``Security`` from the service's PEM strings (no files written)."""
    return Security(
        tls_ca_file=credentials["tls_ca"],
        tls_client_cert=credentials["tls_cert"],
        tls_client_key=credentials["tls_key"],
        require_encryption=True,
    )


def _adaptive_body(adaptive: Any) -> Any:
    """Accept ``(min, max)`` as well as ``{"minimum": .., "maximum": ..}``."""
    if isinstance(adaptive, (tuple, list)) and len(adaptive) == 2:
        return {"minimum": adaptive[0], "maximum": adaptive[1]}
    return adaptive


# -- the service ------------------------------------------------------------------------------


class Provisioner(SyncMethodMixin):
    """A connection to a dask-provisioner service for one tenant (its token).

    Synchronous by default (a background event loop, as ``distributed.Client`` does); with
    ``asynchronous=True`` every method returns an awaitable and must be used in a running loop.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 address: str | None = None, asynchronous: bool = False, loop: Any = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``address`` is ``url``'s other name (dask-gateway's ``Gateway(address=...)``)."""
        url = (url or address or os.environ.get("PROVISIONER_URL")
               or dask.config.get("provisioner.url", None))
        token = (token or os.environ.get("PROVISIONER_TOKEN")
                 or dask.config.get("provisioner.token", None))
        if not url:
            raise ValueError("no service URL: pass url=, set PROVISIONER_URL, "
                             "or set the dask config key provisioner.url")
        self.url = str(url).rstrip("/")
        self.token = token
        self._asynchronous = asynchronous
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._loop_runner = LoopRunner(loop=loop, asynchronous=asynchronous)
        self._loop_runner.start()
        self.loop = self._loop_runner.loop
        self._closed = False

    def __repr__(self) -> str:
        return f"Provisioner<{self.url}>"

    # -- plumbing ---------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        """Made lazily, inside the loop it is used from."""
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._http = httpx.AsyncClient(base_url=self.url, headers=headers,
                                           timeout=httpx.Timeout(30.0), transport=self._transport)
        return self._http

    async def _request(self, method: str, path: str, *, json: Any = None,
                       params: dict[str, Any] | None = None, wait: float = 0) -> Any:
        timeout = httpx.Timeout(30.0 + wait)
        try:
            response = await self._client().request(method, path, json=json, params=params,
                                                     timeout=timeout)
        except httpx.TransportError as exc:
            raise ProvisionerError(f"cannot reach the service at {self.url}: {exc}") from exc
        _raise_for(response)
        return response.json() if response.content else None

    def _sync(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise RuntimeError("this Provisioner is closed")
        return self.sync(func, *args, **kwargs)

    # -- REST calls, one per endpoint ---------------------------------------------------------

    async def _create(self, options: dict[str, Any], wait: float = 0) -> ClusterInfo:
        body = {k: v for k, v in options.items() if v is not None}
        if "adaptive" in body:
            body["adaptive"] = _adaptive_body(body["adaptive"])
        params = {"wait": wait} if wait else None
        data = await self._request("POST", "/clusters", json=body, params=params, wait=wait)
        return ClusterInfo.from_json(data)

    async def _get(self, cluster_id: str, wait: float = 0) -> ClusterInfo:
        params = {"wait": wait} if wait else None
        data = await self._request("GET", f"/clusters/{cluster_id}", params=params, wait=wait)
        return ClusterInfo.from_json(data)

    async def _list(self, status: str | None = None, project: str | None = None,
                    include_stopped: bool = False) -> list[ClusterInfo]:
        params: dict[str, Any] = {k: v for k, v in (("status", status), ("project", project)) if v}
        if not status and not include_stopped:
            params["live"] = "true"
        params["limit"] = LIST_PAGE
        infos: list[ClusterInfo] = []
        while True:
            data = await self._request("GET", "/clusters", params=params)
            infos.extend(ClusterInfo.from_json(c) for c in data.get("clusters", []))
            if not data.get("next"):
                return infos
            params["after"] = data["next"]

    async def _scale(self, cluster_id: str, workers: int) -> ClusterInfo:
        data = await self._request("POST", f"/clusters/{cluster_id}/scale", json={"workers": workers})
        return ClusterInfo.from_json(data)

    async def _adapt(self, cluster_id: str, minimum: int, maximum: int | None) -> ClusterInfo:
        body: dict[str, Any] = {"minimum": minimum}
        if maximum is not None:
            body["maximum"] = maximum
        data = await self._request("POST", f"/clusters/{cluster_id}/adapt", json=body)
        return ClusterInfo.from_json(data)

    async def _stop(self, cluster_id: str) -> ClusterInfo:
        return ClusterInfo.from_json(await self._request("DELETE", f"/clusters/{cluster_id}"))

    async def _security(self, cluster_id: str) -> Security:
        return security_from_credentials(await self._credentials(cluster_id))

    async def _credentials(self, cluster_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/clusters/{cluster_id}/credentials")

    async def _dashboard_link(self, cluster_id: str, ttl: float | None = None) -> DashboardLink:
        params = {"ttl": ttl} if ttl is not None else None
        data = await self._request("GET", f"/clusters/{cluster_id}/dashboard-link", params=params)
        return DashboardLink.from_json(data)

    async def _environments(self) -> dict[str, Any]:
        return await self._request("GET", "/environments")

    async def _tenant(self) -> dict[str, Any]:
        return await self._request("GET", "/tenants/me")

    async def _usage(self, since: float | None = None) -> dict[str, Any]:
        params = {"since": int(since)} if since is not None else None
        return await self._request("GET", "/tenants/me/usage", params=params)

    async def _wait_running(self, cluster_id: str, timeout: float,
                            info: ClusterInfo | None = None) -> ClusterInfo:
        """Long-poll until the scheduler is up; raise if the cluster ends or time runs out."""
        deadline = time.monotonic() + timeout
        while info is None or info.status != "running":
            if info is not None and info.status in ENDING:
                reason = f": {info.stop_reason}" if info.stop_reason else ""
                raise ProvisionerError(f"cluster {cluster_id} is {info.status}{reason}")
            remaining = deadline - time.monotonic()
            if info is not None and remaining <= 0:
                raise ProvisionerError(
                    f"cluster {cluster_id} not running after {timeout:g}s (status {info.status}"
                    + (f"; {info.why_waiting}" if info.why_waiting else "") + ")")
            info = await self._get(cluster_id, wait=max(1.0, min(MAX_POLL, remaining)))
        return info

    async def _new_cluster(self, options: dict[str, Any], shutdown_on_close: bool,
                           timeout: float) -> ProvisionedCluster:
        info = await self._create(options, wait=min(MAX_POLL, timeout))
        try:
            info = await self._wait_running(info.id, timeout, info)
            return await ProvisionedCluster._connected(self, info, shutdown_on_close)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._stop(info.id)
            raise

    async def _connect(self, cluster_id: str, shutdown_on_close: bool,
                       timeout: float) -> ProvisionedCluster:
        info = await self._wait_running(cluster_id, timeout)
        return await ProvisionedCluster._connected(self, info, shutdown_on_close)

    # -- public API ---------------------------------------------------------------------------

    def new_cluster(self, cluster_options: dict[str, Any] | None = None, *,
                    shutdown_on_close: bool = True, timeout: float = DEFAULT_START_TIMEOUT,
                    **options: Any) -> Any:
        """Start a cluster and connect to it once its scheduler runs.

        ``options`` are the REST body of ``POST /clusters``: ``project``, ``workers``,
        ``worker_cores``, ``worker_memory`` (bytes or "2GiB"), ``adaptive`` ((min, max) or a
        dict), ``idle_timeout``, ``no_client_timeout``, ``env``, ``image``. The service
        validates them and fills the rest from the tenant's defaults. ``cluster_options``
        (from :meth:`cluster_options`, as with dask-gateway) gives them as one dict;
        keywords win over it.
        """
        return self._sync(self._new_cluster, {**(cluster_options or {}), **options},
                          shutdown_on_close, timeout)

    def environments(self) -> Any:
        """The Python environments this tenant's clusters may run, with their versions:
        ``{"default": {...}, "environments": [{"name", "image", "versions"}]}``."""
        return self._sync(self._environments)

    def cluster_options(self) -> Any:
        """The options a new cluster takes, filled with this tenant's defaults: change what
        you need and pass the dict to ``new_cluster`` (dask-gateway's habit)."""
        return self._sync(self._cluster_options)

    async def _cluster_options(self) -> dict[str, Any]:
        defaults = (await self._tenant()).get("defaults") or {}
        return {"project": "default", "workers": 1,
                **{key: defaults[key] for key in OPTION_DEFAULTS if key in defaults},
                "env": {}}

    def connect(self, cluster_id: str, *, shutdown_on_close: bool = False,
                timeout: float = DEFAULT_START_TIMEOUT) -> Any:
        """Attach to an existing cluster (closing it leaves the cluster running by default)."""
        return self._sync(self._connect, cluster_id, shutdown_on_close, timeout)

    def list_clusters(self, status: str | None = None, project: str | None = None,
                      include_stopped: bool = False) -> Any:
        """The tenant's clusters that have not ended (all with ``include_stopped``, or those
        in ``status``), newest first, as ``ClusterInfo``."""
        return self._sync(self._list, status, project, include_stopped)

    def get_cluster(self, cluster_id: str, wait: float = 0) -> Any:
        """One cluster's record; ``wait`` long-polls until it runs or ends."""
        return self._sync(self._get, cluster_id, wait)

    def events(self, cluster_id: str) -> Any:
        """What happened to the cluster and why, oldest first: dicts of ``at`` (epoch
        seconds), ``kind`` (queued, admitted, running, scaled, worker-lost, stopped, ...) and
        ``detail``."""
        return self._sync(self._events, cluster_id)

    async def _events(self, cluster_id: str) -> list[dict[str, Any]]:
        data = await self._request("GET", f"/clusters/{cluster_id}/events")
        return list(data.get("events") or [])

    def create_cluster(self, wait: float = 0, **options: Any) -> Any:
        """Only ask for a cluster (no connection): for scripts and the CLI."""
        return self._sync(self._create, options, wait)

    def scale_cluster(self, cluster_id: str, workers: int) -> Any:
        return self._sync(self._scale, cluster_id, workers)

    def adapt_cluster(self, cluster_id: str, minimum: int = 0, maximum: int | None = None) -> Any:
        return self._sync(self._adapt, cluster_id, minimum, maximum)

    def stop_cluster(self, cluster_id: str) -> Any:
        """Stop a cluster (idempotent)."""
        return self._sync(self._stop, cluster_id)

    def security(self, cluster_id: str) -> Any:
        """The ``Security`` to reach a TLS cluster: ``Client(address, security=...)``."""
        return self._sync(self._security, cluster_id)

    def dashboard_link(self, cluster_id: str, ttl: float | None = None) -> Any:
        """A signed ``DashboardLink`` to open the cluster's dashboard in a browser (no
        token needed); valid for ``ttl`` seconds (the service's default when None)."""
        return self._sync(self._dashboard_link, cluster_id, ttl)

    def tenant(self) -> Any:
        """``GET /tenants/me``: quota, current usage and defaults."""
        return self._sync(self._tenant)

    def usage(self, since: float | None = None) -> Any:
        """``GET /tenants/me/usage``: resources used per project since ``since`` (epoch s)."""
        return self._sync(self._usage, since)

    async def _close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def close(self) -> Any:
        """Close the HTTP connections (clusters keep running; close those separately)."""
        if self._closed:
            return _done() if self.asynchronous else None
        result = self.sync(self._close)
        self._closed = True
        if not self._asynchronous:
            self._loop_runner.stop()
        return result

    def __enter__(self) -> Provisioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Provisioner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _done() -> None:
    return None


# -- the cluster ------------------------------------------------------------------------------


class ProvisionedCluster(Cluster):
    """A cluster run by the service, usable wherever Dask expects a cluster object.

    Made by ``Provisioner.new_cluster`` or ``Provisioner.connect``. ``scale`` and ``adapt``
    ask the service (never Dask's local ``Adaptive``), so the tenant's quota holds.
    ``close()`` stops the cluster when ``shutdown_on_close`` is true.
    """

    def __init__(self, provisioner: Provisioner, info: ClusterInfo,
                 shutdown_on_close: bool) -> None:
        super().__init__(asynchronous=provisioner._asynchronous, loop=provisioner.loop,
                         quiet=True, name=info.id)
        self._loop_runner.start()
        self.provisioner = provisioner
        self.info = info
        self.shutdown_on_close = shutdown_on_close
        self.security: Security = Security()
        self._dashboard: DashboardLink | None = None
        _live.add(self)

    @classmethod
    async def _connected(cls, provisioner: Provisioner, info: ClusterInfo,
                         shutdown_on_close: bool) -> ProvisionedCluster:
        cluster = cls(provisioner, info, shutdown_on_close)
        try:
            await cluster._start()
        except BaseException:
            cluster.shutdown_on_close = False  # the caller decides whether to stop it
            with contextlib.suppress(Exception):
                await cluster._close()
            raise
        return cluster

    @property
    def cluster_id(self) -> str:
        return self.info.id

    async def _start(self) -> None:
        """Open ``scheduler_comm`` to the cluster's scheduler, with TLS if it has it."""
        address = self.info.scheduler_address
        if self.info.tls:
            credentials = await self.provisioner._credentials(self.info.id)
            self.security = security_from_credentials(credentials)
            address = credentials.get("scheduler_address") or address
        if not address:
            raise ProvisionerError(f"cluster {self.info.id} has no scheduler address yet")
        self.scheduler_comm = rpc(address, connection_args=self.security.get_connection_args("client"))
        await super()._start()
        await self._fetch_dashboard_link()
        await self._compare_versions()

    async def _compare_versions(self) -> None:
        """Say plainly, before any task fails, what differs between this client and the
        cluster's environment (python, dask, distributed, cloudpickle, msgpack, ...)."""
        name = self.info.raw.get("environment")
        try:
            known = await self.provisioner._environments()
        except ProvisionerError as exc:  # an older service: nothing to compare with
            logger.debug("no environments to compare with: %s", exc)
            return
        if name:
            theirs = next((e.get("versions") or {} for e in known.get("environments", [])
                           if e.get("name") == name), {})
        else:
            theirs = known.get("default") or {}
        found = differences(await asyncio.to_thread(installed_versions), theirs) if theirs else []
        if found:
            where = f"environment {name!r}" if name else "the service's environment"
            warnings.warn(f"cluster {self.info.id} runs {where}, which differs from this client: "
                          + "; ".join(found), VersionMismatch, stacklevel=2)

    async def _fetch_dashboard_link(self) -> None:
        """Best effort: without a link, ``dashboard_link`` shows the proxy's plain URL."""
        try:
            self._dashboard = await self.provisioner._dashboard_link(self.info.id)
        except ProvisionerError as exc:
            logger.debug("no dashboard link for %s: %s", self.info.id, exc)

    # -- scaling, done by the service -------------------------------------------------------

    async def _scale(self, n: int) -> ClusterInfo:
        self.info = await self.provisioner._scale(self.info.id, n)
        return self.info

    async def _adapt(self, minimum: int, maximum: int | None) -> ClusterInfo:
        self.info = await self.provisioner._adapt(self.info.id, minimum, maximum)
        return self.info

    async def _refresh(self) -> ClusterInfo:
        self.info = await self.provisioner._get(self.info.id)
        return self.info

    def scale(self, n: int) -> Any:  # type: ignore[override]
        """Ask the service for ``n`` workers (turns adaptivity off)."""
        return self.sync(self._scale, n)

    def adapt(self, minimum: int | None = None, maximum: int | None = None,  # type: ignore[override]
              active: bool = True, **kwargs: Any) -> Any:
        """Let the service scale between ``minimum`` (default 0) and ``maximum`` workers
        (default: as many as the tenant's quota allows), as dask-gateway's ``adapt``;
        ``active=False`` turns adaptivity off and keeps the workers there are.

        Dask's own ``Adaptive`` options (``interval``, ``wait_count``, ...) do not apply: the
        service decides from the scheduler's adaptive target within the tenant's quota.
        """
        if kwargs:
            warnings.warn(f"ignored by the service's adaptive scaling: {sorted(kwargs)}",
                          UserWarning, stacklevel=2)
        if not active:
            return self.sync(self._freeze)
        return self.sync(self._adapt, minimum or 0, maximum)

    async def _freeze(self) -> ClusterInfo:
        """Adaptivity off at the worker count the service holds now (not a stale one)."""
        return await self._scale((await self._refresh()).workers_requested)

    def get_client(self, set_as_default: bool = True) -> Client:
        """A ``distributed.Client`` of this cluster (TLS handled): the current one if it is
        this cluster's; with ``set_as_default=False`` a new one that does not become the
        default (dask-gateway's argument)."""
        if set_as_default:
            return super().get_client()
        return Client(self, set_as_default=False)

    def refresh(self) -> Any:
        """Fetch the service's current record for this cluster into ``info``."""
        return self.sync(self._refresh)

    def shutdown(self) -> Any:
        """Stop the cluster now, whatever ``shutdown_on_close`` says."""
        self.shutdown_on_close = True
        return self.close()

    # -- closing ------------------------------------------------------------------------------

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        try:
            await super()._close()
        finally:
            _live.discard(self)
            if self.shutdown_on_close:
                self.info = await self.provisioner._stop(self.info.id)

    def close(self, timeout: float | None = None, shutdown: bool | None = None) -> Any:
        """Disconnect; the cluster stops if ``shutdown`` (default: ``shutdown_on_close``)."""
        if shutdown is not None:
            self.shutdown_on_close = shutdown
        result = super().close(timeout=timeout)
        if not self.asynchronous:
            self._loop_runner.stop()
        return result

    # -- display ------------------------------------------------------------------------------

    @property
    def dashboard_link(self) -> str:
        """The dashboard through the service, as a signed link a browser opens without the
        tenant's token (fetched again near its expiry); the plain proxy URL, which needs
        the token, when no link can be had. Never the scheduler's own address."""
        if (self._dashboard is None or not self._dashboard.fresh()) and not self.asynchronous \
                and self.status == Status.running:
            with contextlib.suppress(Exception):  # e.g. called on the event loop's own thread
                self.sync(self._fetch_dashboard_link)
        if self._dashboard is not None and self._dashboard.fresh(0):
            return self._dashboard.url
        return self.info.dashboard_url or ""

    def _scaling_status(self) -> str:
        if self.info.adaptive:
            lo, hi = self.info.adaptive
            mode = f"Adaptive (service): {lo} to {hi}"
        else:
            mode = "Manual (service)"
        running = len(self.scheduler_info["workers"])
        return (f'<table><tr><td style="text-align: left;">Scaling mode: {mode}</td></tr>'
                f'<tr><td style="text-align: left;">Workers: {running} / '
                f"{self.info.workers_requested}</td></tr></table>")

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        rows = [("Cluster id", self.info.id), ("Project", self.info.project),
                ("Service status", self.info.status), ("TLS", "yes" if self.info.tls else "no"),
                ("Stops on close", "yes" if self.shutdown_on_close else "no")]
        table = "".join(f'<tr><td style="text-align: left;"><strong>{k}:</strong> {v}</td></tr>'
                        for k, v in rows)
        return super()._repr_html_(cluster_status=f"<table>{table}</table>")


# -- stop forgotten clusters at interpreter exit ------------------------------------------------

_live: weakref.WeakSet[ProvisionedCluster] = weakref.WeakSet()


@atexit.register
def _stop_forgotten_clusters() -> None:
    """A notebook that exits without ``close()`` should not leave its clusters running."""
    for cluster in list(_live):
        if not cluster.shutdown_on_close or cluster.status == Status.closed:
            continue
        prov = cluster.provisioner
        headers = {"Authorization": f"Bearer {prov.token}"} if prov.token else {}
        with contextlib.suppress(Exception):
            httpx.delete(f"{prov.url}/clusters/{cluster.info.id}", headers=headers, timeout=5)

