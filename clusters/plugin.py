"""A small plugin inside each Dask scheduler that tells the service what the cluster is doing.

The service talks to it over the scheduler's own HTTP server (the dashboard's port), in plain
JSON: with TLS that server requires a client certificate of the cluster's own CA
(:func:`clusters.runner.require_client_certificates`), so only the service and the cluster's
owner reach it. Dask's RPC is never used for this: its protocol unpickles what the far end
sends, and every byte a scheduler sends is tenant-controlled (tenant code runs in the
scheduler and may replace these very handlers), so the service reads nothing but bounded,
validated JSON (:mod:`provisioner.watch`).

``GET /dask-provisioner/report?version=V&timeout=T`` is a long-poll: it answers at once when
something changed since version V (workers, clients, busy/idle, adaptive target), or after T
seconds. That is push in effect over a connection the service opens, so it works the same on
local processes and on Mesos agents and needs no route back from the cluster to the service.
``GET /dask-provisioner/workers-to-close?n=N[&idle=1]`` and ``POST /dask-provisioner/retire``
(a JSON list of names) serve scale-down. The paths lie outside the dashboard's prefix, so the
service's dashboard proxy never forwards a tenant's request to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler
from tornado import web

from clusters.base import REAP_EXIT_CODES, REAPED_FILE, StopReason

logger = logging.getLogger("provisioner.plugin")

FIRE_AND_FORGET = "fire-and-forget"
#: Where the control routes live on the scheduler's HTTP server (not under the dashboard's prefix).
CONTROL_PREFIX = "/dask-provisioner"
#: Most worker names one retire request may carry.
MAX_RETIRE = 10_000


class _Handler(web.RequestHandler):
    plugin: ProvisionerPlugin

    def initialize(self, plugin: ProvisionerPlugin) -> None:
        self.plugin = plugin

    def check_xsrf_cookie(self) -> None:  # a JSON API for the service, no browser forms
        return None

    def _number(self, name: str, default: float, low: float, high: float) -> float:
        try:
            value = float(self.get_query_argument(name, str(default)))
        except ValueError:
            raise web.HTTPError(400, f"{name} must be a number") from None
        return min(max(value, low), high)

    def _reply(self, payload: dict[str, Any]) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))


class ReportHandler(_Handler):
    async def get(self) -> None:
        version = int(self._number("version", -1, -1, 2**53))
        timeout = self._number("timeout", 30.0, 0.0, 300.0)
        self._reply(await self.plugin.report(version, timeout))


class WorkersToCloseHandler(_Handler):
    def get(self) -> None:
        n = int(self._number("n", 0, 0, MAX_RETIRE))
        scheduler = self.plugin.scheduler
        assert scheduler is not None
        if not n:
            names = []
        elif self._number("idle", 0, 0, 1):  # only what Dask's adaptive rules let go now
            names = scheduler.workers_to_close(attribute="name")[:n]
        else:  # the n best to close, whatever they hold
            names = scheduler.workers_to_close(n=n, attribute="name")
        self._reply({"names": [str(name) for name in names]})


class RetireHandler(_Handler):
    async def post(self) -> None:
        try:
            names = json.loads(self.request.body or b"null")
        except ValueError:
            raise web.HTTPError(400, "body must be a JSON list of worker names") from None
        if not isinstance(names, list) or len(names) > MAX_RETIRE \
                or not all(isinstance(n, str) for n in names):
            raise web.HTTPError(400, "body must be a JSON list of worker names")
        scheduler = self.plugin.scheduler
        assert scheduler is not None
        retired = await scheduler.retire_workers(names=names, close_workers=True, remove=True)
        self._reply({"retired": len(retired)})


class ProvisionerPlugin(SchedulerPlugin):
    """Observes the scheduler and answers the service's long-polls."""

    name = "dask-provisioner"

    def __init__(self, tick: float = 0.25, reap: dict[str, Any] | None = None) -> None:
        self.tick = tick
        #: idle_timeout, no_client_timeout, lease (s), folder: applied only without the service.
        self.reap = reap or {}
        self._last_polled = time.monotonic()
        self._polls_open = 0
        self._reaping = False
        #: Why this scheduler reaped itself, if it did.
        self.reaped: StopReason | None = None
        self.version = 0
        self._snapshot: tuple[Any, ...] | None = None
        self._changed = asyncio.Event()
        self._no_client_since: float | None = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._changed = asyncio.Event()
        app = getattr(scheduler, "http_application", None)
        if app is not None:
            args = {"plugin": self}
            app.add_handlers(r".*", [
                (CONTROL_PREFIX + "/report", ReportHandler, args),
                (CONTROL_PREFIX + "/workers-to-close", WorkersToCloseHandler, args),
                (CONTROL_PREFIX + "/retire", RetireHandler, args),
            ])
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

    # -- hooks that change what we report ------------------------------------------------

    def _clients(self) -> int:
        assert self.scheduler is not None
        return sum(1 for c in self.scheduler.clients if c != FIRE_AND_FORGET)

    def add_client(self, scheduler: Scheduler, client: str) -> None:
        if client != FIRE_AND_FORGET:
            self._no_client_since = None
        self._refresh()

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        # Called before the client is removed from scheduler.clients.
        remaining = sum(1 for c in scheduler.clients if c not in (FIRE_AND_FORGET, client))
        if remaining == 0 and self._no_client_since is None:
            self._no_client_since = time.monotonic()
        self._refresh()

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self._refresh()

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self._refresh()

    # -- state -----------------------------------------------------------------------------

    def _busy(self) -> bool:
        s = self.scheduler
        assert s is not None
        return s.check_idle() is None

    def _state(self) -> tuple[Any, ...]:
        s = self.scheduler
        assert s is not None
        workers = tuple(sorted(str(ws.name) for ws in s.workers.values()))
        target = s.adaptive_target() if s.workers or s.queued or s.unrunnable else 0
        return (workers, self._clients(), self._busy(), target)

    def _refresh(self) -> None:
        if self.scheduler is None:
            return
        state = self._state()
        if state != self._snapshot:
            self._snapshot = state
            self.version += 1
            self._changed.set()
            self._changed = asyncio.Event()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self._refresh()
                self._reap_if_orphaned()
            except Exception:  # never let observation kill the scheduler
                logger.exception("provisioner plugin refresh failed")

    def _reap_if_orphaned(self) -> None:
        """Apply the cluster's idle rules ourselves when the service has been gone too long."""
        lease = float(self.reap.get("lease") or 0)
        now = time.monotonic()
        if not lease or self._reaping or self._polls_open or now - self._last_polled < lease:
            return
        s = self.scheduler
        assert s is not None and self._snapshot is not None
        if self._snapshot[2]:  # busy
            return
        reason: StopReason | None = None
        no_client = self.reap.get("no_client_timeout") or 0
        idle = self.reap.get("idle_timeout") or 0
        if self._no_client_since is not None and no_client and now - self._no_client_since >= no_client:
            reason = StopReason.NO_CLIENT
        elif idle and s.idle_since and time.time() - s.idle_since >= idle:
            reason = StopReason.IDLE
        if reason is None:
            return
        self._reaping = True
        self.reaped = reason
        logger.warning("no word from the service for %.0fs: reaping this cluster (%s)",
                       now - self._last_polled, reason)
        folder = self.reap.get("folder")
        if folder:  # the local backend reads this back (one word) if it was away meanwhile
            with contextlib.suppress(OSError):
                with open(os.path.join(folder, REAPED_FILE), "w") as f:
                    f.write(reason)
        self._closing = asyncio.ensure_future(s.close(reason=f"reaped-{reason}"))

    def exit_code(self) -> int | None:
        """The status this scheduler's process ends with if it reaped itself."""
        return REAP_EXIT_CODES.get(self.reaped) if self.reaped else None

    async def report(self, version: int = -1, timeout: float = 30.0) -> dict[str, Any]:
        """Return the cluster's state once it differs from ``version`` (or after ``timeout``)."""
        self._last_polled = time.monotonic()
        self._refresh()
        if version == self.version:
            waiter = self._changed
            self._polls_open += 1
            try:
                await asyncio.wait_for(waiter.wait(), timeout)
            except TimeoutError:
                pass
            finally:
                self._polls_open -= 1
                self._last_polled = time.monotonic()
        s = self.scheduler
        assert s is not None and self._snapshot is not None
        workers, clients, busy, target = self._snapshot
        now = time.monotonic()
        idle_since = s.idle_since
        return {
            "version": self.version,
            "workers": list(workers),
            "clients": clients,
            "busy": busy,
            "idle_for": None if busy or not idle_since else max(0.0, time.time() - idle_since),
            "no_client_for": None if self._no_client_since is None
            else now - self._no_client_since,
            "adaptive_target": target,
        }
