"""The service as one Mesos framework: its identity (id and roles kept in the service's
database, so a restart, even on a fresh machine, is the same framework), its subscription's
FrameworkInfo, its roles (one per tenant, added with UPDATE_FRAMEWORK as tenants first need
them), and which roles want offers (SUPPRESS and REVIVE from the tasks waiting for one).
:class:`clusters.mesos.backend.MesosBackend` builds on it."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from clusters.base import BackendEvents, LaunchError
from clusters.mesos.client import CallError, MesosClient, NotSubscribed
from clusters.mesos.tasks import TaskRequest

logger = logging.getLogger("provisioner.mesos")


class Framework:
    """Identity, roles and offer interest of the framework; calls to the master."""

    framework_name: str
    user: str
    principal: str | None
    failover_timeout: float
    roles: set[str]
    client: MesosClient
    _events: BackendEvents | None
    #: tasks waiting for an offer, by task id
    _pending: dict[str, TaskRequest]
    #: roles suppressed at the master (None: unknown, tell it next time)
    _suppressed: set[str] | None
    #: roles with newly queued tasks: revived (which clears their filters)
    _fresh: set[str]
    _offer_lock: asyncio.Lock
    _persist_lock: asyncio.Lock
    _background: set[asyncio.Task[Any]]

    async def _load(self, events: BackendEvents) -> None:
        """The framework id and roles from the service's database, so a re-subscription (from
        this machine or a fresh one) is the same framework with the same roles."""
        saved = await events.load_backend_state() or {}
        self.roles.update(saved.get("roles") or [])
        self.client.framework_id = saved.get("framework_id") or None

    async def _persist(self, framework_id: str | None) -> None:
        """Save the framework id and roles (None: forget the framework), one write at a time."""
        async with self._persist_lock:
            if self._events is not None:
                await self._events.save_backend_state(
                    None if framework_id is None
                    else {"framework_id": framework_id, "roles": sorted(self.roles)})

    def framework_info(self, roles: set[str] | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "user": self.user,
            "name": self.framework_name,
            "roles": sorted(self.roles if roles is None else roles),
            "capabilities": [{"type": "MULTI_ROLE"}],
            "failover_timeout": self.failover_timeout,
            "checkpoint": True,
            "hostname": socket.gethostname(),
        }
        if self.principal:
            info["principal"] = self.principal
        return info

    def _wanted_roles(self) -> set[str]:
        return {r.role for r in self._pending.values()}

    def subscription(self) -> tuple[dict[str, Any], list[str]]:
        suppressed = sorted(self.roles - self._wanted_roles())
        self._suppressed = set(suppressed)
        return self.framework_info(), suppressed

    async def disconnected(self) -> None:
        self._suppressed = None
        logger.warning("mesos: disconnected from the master; re-subscribing")

    async def framework_removed(self, message: str) -> None:
        logger.error("mesos: framework removed by the master (%s); subscribing anew", message)
        await self._persist(None)

    async def _call(self, kind: str, payload: dict[str, Any] | None = None) -> bool:
        """Make a call; False (logged) when there is no subscription or the master refused."""
        try:
            await self.client.call(kind, payload)
            return True
        except NotSubscribed:
            logger.debug("mesos: %s skipped: not subscribed", kind)
        except CallError as exc:
            logger.warning("mesos: %s refused: %s", kind, exc)
        except Exception as exc:  # transport errors: the stream watchdog handles the rest
            logger.warning("mesos: %s failed: %r", kind, exc)
        return False

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sync_offers(self) -> None:
        """SUPPRESS roles with nothing pending and REVIVE those that have pending tasks."""
        async with self._offer_lock:
            if not self.client.subscribed.is_set():
                return
            wanted = self._wanted_roles() & self.roles
            suppress = self.roles - wanted
            current = self._suppressed
            revive = wanted if current is None else wanted & (current | self._fresh)
            self._fresh.clear()
            to_suppress = suppress if current is None else suppress - current
            ok = True
            if revive:
                ok = await self._call("REVIVE", {"roles": sorted(revive)}) and ok
            if to_suppress:
                ok = await self._call("SUPPRESS", {"roles": sorted(to_suppress)}) and ok
            self._suppressed = suppress if ok else None

    async def _ensure_role(self, role: str) -> None:
        """Subscribe the framework to a tenant's role the first time a cluster needs it.

        UPDATE_FRAMEWORK replaces the framework's whole role list (and its suppressed roles),
        so these calls go one at a time, under the lock SUPPRESS and REVIVE take, each with
        the list as it is then: two first clusters of two new tenants at once must not let an
        older, shorter list land last and leave a role without offers.
        """
        if role in self.roles:
            return
        async with self._offer_lock:
            if role in self.roles:
                return
            if not self.client.subscribed.is_set():
                self.roles.add(role)
                return  # the next SUBSCRIBE carries it (and SUBSCRIBED saves it)
            roles = self.roles | {role}
            suppressed = sorted(roles - self._wanted_roles())
            info = dict(self.framework_info(roles), id={"value": self.client.framework_id})
            try:
                await self.client.call("UPDATE_FRAMEWORK", {"framework_info": info,
                                                            "suppressed_roles": suppressed})
            except CallError as exc:
                raise LaunchError(f"Mesos refused role {role!r}: {exc}") from exc
            except NotSubscribed:
                self.roles.add(role)
                return
            self.roles.add(role)
            self._suppressed = set(suppressed)
        # Saved only once Mesos took it: a refused role must not be in every later SUBSCRIBE.
        await self._persist(self.client.framework_id)

    def _queue(self, request: TaskRequest) -> None:
        """Wait for an offer for this task (its role is revived at the next sync)."""
        self._pending[request.task_id] = request
        self._fresh.add(request.role)

    def _enqueue(self, request: TaskRequest) -> None:
        self._queue(request)
        self._spawn(self._sync_offers())
