"""Events: what happened to each cluster and why, as a tenant reads it (``GET
/clusters/{id}/events``): queued and why, admitted, running, scaled, a worker lost, stopping
and why, stopped or failed.

Transitions are read off every record write (the records' listener); what only the caller
knows (why a cluster queued, that the queue admitted it, why a worker went) is added by it. Events are written in the
background, in order, a batch at a time, so no request waits on them; ``flush`` at shutdown.
Details are the service's own words, never text a cluster process sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from provisioner.models import ClusterRecord, Status, Wanted
from provisioner.records import Records
from provisioner.store import Event, Store

logger = logging.getLogger("provisioner.events")


def transitions(previous: ClusterRecord, record: ClusterRecord) -> list[tuple[str, str | None]]:
    """The events one record write makes."""
    found: list[tuple[str, str | None]] = []
    if record.status == Status.RUNNING and previous.status != Status.RUNNING:
        found.append(("running", record.scheduler_address))
    if record.workers_requested != previous.workers_requested and not record.status.terminal:
        found.append(("scaled", f"{previous.workers_requested} -> {record.workers_requested} "
                                "workers"))
    if record.wanted == Wanted.STOPPED and previous.wanted != Wanted.STOPPED \
            and not record.status.terminal:
        found.append(("stopping", record.outcome.summary() if record.outcome else None))
    if record.status.terminal and not previous.status.terminal:
        found.append((record.status.value, record.outcome.summary() if record.outcome else None))
    return found


class EventRecorder:
    def __init__(self, records: Records, store: Store) -> None:
        self.store = store
        self._pending: list[Event] = []
        self._task: asyncio.Task[None] | None = None
        records.listeners.append(self._on_change)

    def _on_change(self, previous: ClusterRecord | None, record: ClusterRecord) -> None:
        if previous is None:  # new (its creator says how), or loaded at start
            return
        for kind, detail in transitions(previous, record):
            self.add(record.id, kind, detail)

    def add(self, cluster_id: str, kind: str, detail: str | None = None) -> None:
        self._pending.append(Event(cluster_id, time.time(), kind, detail))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.store.add_events(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%d event(s) not written", len(batch))

    async def flush(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await self._task
