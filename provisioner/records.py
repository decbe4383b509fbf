"""Cluster records as the running service sees them: the store plus a cache and change signals.

Every write goes through here, so the cache of live records is always what the store holds,
and anything waiting for a change (``?wait=``, a cluster's runner) wakes on the write itself
instead of polling. Writes to one cluster are taken one at a time: the store runs them on a
pool of threads, and two that finish out of order would otherwise leave the older record in
the cache (a cluster the store has ended still holding quota in memory).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from provisioner.models import ClusterRecord, Outcome, Status, Wanted
from provisioner.quota import Pool, Usage
from provisioner.store import Store
from provisioner.tenants import Quota

#: What says how a cluster ends: written while it is live only.
_ENDING_FIELDS = frozenset({"wanted", "stop_reason", "stop_detail"})

#: Called with (previous live record or None, new record) after every write.
Listener = Callable[[ClusterRecord | None, ClusterRecord], None]


class Records:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._live: dict[str, ClusterRecord] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.listeners: list[Listener] = []
        self._write_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _write_lock(self, cluster_id: str) -> asyncio.Lock:
        """The lock that orders writes to one cluster; it lives while anyone holds it."""
        lock = self._write_locks.get(cluster_id)
        if lock is None:
            lock = self._write_locks[cluster_id] = asyncio.Lock()
        return lock

    def _put(self, record: ClusterRecord) -> ClusterRecord:
        previous = self._live.get(record.id)
        for listener in self.listeners:
            listener(previous, record)
        if record.status.terminal:
            self._live.pop(record.id, None)
        else:
            self._live[record.id] = record
        for fut in self._waiters.pop(record.id, ()):
            if not fut.done():
                fut.set_result(None)
        return record

    async def load_live(self) -> list[ClusterRecord]:
        for record in await self.store.list_live():
            self._put(record)
        return list(self._live.values())

    def live(self) -> list[ClusterRecord]:
        return list(self._live.values())

    def cached(self, cluster_id: str) -> ClusterRecord | None:
        return self._live.get(cluster_id)

    async def get(self, cluster_id: str) -> ClusterRecord:
        """The record (NotFound if none); live ones come from memory."""
        return self._live.get(cluster_id) or await self.store.get(cluster_id)

    async def admit(self, record: ClusterRecord, quota: Quota, pool: Pool = Pool(),
                    queue: bool = False) -> tuple[ClusterRecord, str | None]:
        """The new record, admitted or (with ``queue``) queued with the reason it waits."""
        admitted, reason = await self.store.admit(record, quota, pool, queue)
        return self._put(admitted), reason

    async def promote(self, cluster_id: str, quota: Quota,
                      pool: Pool) -> tuple[ClusterRecord | None, str | None]:
        """Admit a queued cluster if it fits now (see :meth:`Store.promote`)."""
        async with self._write_lock(cluster_id):
            record, reason = await self.store.promote(cluster_id, quota, pool)
            return (self._put(record) if record is not None else None), reason

    async def resize(self, cluster_id: str, quota: Quota, workers: int, *,
                     best_effort: bool = False, pool: Pool = Pool(),
                     **changes: Any) -> ClusterRecord:
        async with self._write_lock(cluster_id):
            record = await self.store.resize(cluster_id, quota, workers,
                                             best_effort=best_effort, pool=pool, **changes)
            return self._put(record)

    async def update(self, cluster_id: str, **changes: Any) -> ClusterRecord:
        async with self._write_lock(cluster_id):
            if _ENDING_FIELDS & set(changes) and cluster_id not in self._live:
                # Ended meanwhile (a lost scheduler, say): how it ended is not rewritten.
                return await self.store.get(cluster_id)
            return self._put(await self.store.update(cluster_id, **changes))

    async def end(self, cluster_id: str, outcome: Outcome) -> ClusterRecord:
        """The one way a record ends: stopped for a reason, or failed with what happened.
        Whoever calls it has seen the cluster's processes gone; a record already ended keeps
        its first outcome."""
        async with self._write_lock(cluster_id):
            record = await self.get(cluster_id)
            if record.status.terminal:
                return record
            if record.outcome is not None:
                outcome = record.outcome  # decided first (a stop asked, a failure said): it stands
            ending: dict[str, Any] = {"stop_reason": outcome.reason,
                                      "stop_detail": outcome.detail, "workers_running": 0}
            if outcome.is_failure:  # what was wanted stays as it was: it failed
                return self._put(await self.store.update(cluster_id, status=Status.FAILED,
                                                         **ending))
            ending["wanted"] = Wanted.STOPPED
            if record.status not in (Status.STOPPING, Status.QUEUED):  # queued: nothing runs
                self._put(await self.store.update(cluster_id, status=Status.STOPPING, **ending))
            return self._put(await self.store.update(cluster_id, status=Status.STOPPED, **ending))

    async def usage(self, tenant: str) -> Usage:
        return Usage.of(r for r in self._live.values() if r.tenant == tenant)

    async def wait_for(
        self, cluster_id: str, done: Callable[[ClusterRecord], bool], timeout: float
    ) -> ClusterRecord:
        """Return the record once ``done(record)`` holds, or as it is after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            record = await self.get(cluster_id)
            remaining = deadline - loop.time()
            if done(record) or record.status.terminal or remaining <= 0:
                return record
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(cluster_id, set()).add(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(cluster_id)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        self._waiters.pop(cluster_id, None)
